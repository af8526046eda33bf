"""Frequency and pixel lattices on centred grids.

For an axis of length ``D`` (even), index ``i`` has frequency ``k = (i - D // 2) / D``
cycles/px, so ``k`` lies in ``[-0.5, 0.5)``, and real-space coordinate ``i - D // 2`` px.
Vector components are ordered ``(x, y[, z])``: ``x`` goes with the last array axis.
"""

from __future__ import annotations

import torch

__all__ = [
    "circle_mask_2d",
    "coords_1d",
    "freq_grid_2d",
    "freq_grid_3d",
    "radial_index_2d",
    "radial_index_3d",
    "sphere_mask_3d",
]


def coords_1d(
    D: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Centred pixel coordinates ``i - D // 2``, shape ``(D,)``."""
    return torch.arange(D, dtype=dtype, device=device) - (D // 2)


def freq_grid_2d(
    D: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """2-D frequency grid in cycles/px.

    Returns
    -------
    torch.Tensor
        ``(D, D, 2)``; ``grid[y, x] = [kx, ky]``.
    """
    k = coords_1d(D, dtype=dtype, device=device) / D
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    return torch.stack([kx, ky], dim=-1)


def freq_grid_3d(
    D: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """3-D frequency grid in cycles/px.

    Returns
    -------
    torch.Tensor
        ``(D, D, D, 3)``; ``grid[z, y, x] = [kx, ky, kz]``.
    """
    k = coords_1d(D, dtype=dtype, device=device) / D
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    return torch.stack([kx, ky, kz], dim=-1)


def radial_index_2d(
    D: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Distance from the centre ``(D // 2, D // 2)`` in px, shape ``(D, D)``."""
    c = coords_1d(D, dtype=dtype, device=device)
    return torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)


def radial_index_3d(
    D: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Distance from the centre voxel in px, shape ``(D, D, D)``."""
    c = coords_1d(D, dtype=dtype, device=device)
    return torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)


def circle_mask_2d(
    D: int, radius_px: float, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean disc ``r <= radius_px`` around the centre, shape ``(D, D)``."""
    return radial_index_2d(D, dtype=torch.float64, device=device) <= radius_px


def sphere_mask_3d(
    D: int, radius_px: float, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean ball ``r <= radius_px`` around the centre, shape ``(D, D, D)``."""
    return radial_index_3d(D, dtype=torch.float64, device=device) <= radius_px
