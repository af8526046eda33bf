"""Central slices of a voxelised 3-D transform, and a real-space projection reference.

Fourier slice theorem in our convention (docs/dev/contracts.md): the projection of a
volume under pose ``R`` is ``P_R V (x, y) = integral V(R^T [x, y, z]) dz`` and its
centred 2-D transform at ``(kx, ky)`` equals the volume's centred 3-D transform at
``R^T [kx, ky, 0]``, i.e. the row vector ``[kx, ky, 0] @ R`` (Bracewell 1956; for
cryo-EM e.g. Frank, *Three-Dimensional Electron Microscopy of Macromolecular
Assemblies*, 2006, ch. 5). ``tests/physics/test_slicing.py`` proves it numerically.

:func:`extract_slices` works on any real or complex voxel grid (Fourier or Hartley
coefficients); it is the hot loop of voxel-based pose search and is written as eight
flat gathers with no Python loop over particles.
"""

from __future__ import annotations

import torch

from cryofield.physics.lattice import coords_1d, freq_grid_2d

__all__ = ["extract_slices", "project_real_space", "slice_coordinates", "trilinear_sample"]


def slice_coordinates(rotations: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """3-D frequency points ``[kx, ky, 0] @ R`` of central slices.

    Parameters
    ----------
    rotations
        ``(N, 3, 3)`` poses.
    freqs
        ``(M, 2)`` in-plane frequencies ``(kx, ky)``, cycles/px.

    Returns
    -------
    torch.Tensor
        ``(N, M, 3)`` points ``(kx, ky, kz)`` in cycles/px.
    """
    xy0 = torch.cat([freqs, torch.zeros_like(freqs[:, :1])], dim=-1)  # (M, 3)
    # row-vector product: out[n, m, j] = sum_i xy0[m, i] R[n, i, j]
    return torch.matmul(xy0[None].to(rotations.dtype), rotations)


def _corner_weights(frac: torch.Tensor) -> torch.Tensor:
    """Trilinear weights of the 8 cell corners, ``(..., 3) -> (..., 8)``.

    Corner ``c`` has offsets ``(dx, dy, dz) = (c & 1, (c >> 1) & 1, (c >> 2) & 1)``.
    """
    wx = torch.stack([1 - frac[..., 0], frac[..., 0]], dim=-1)
    wy = torch.stack([1 - frac[..., 1], frac[..., 1]], dim=-1)
    wz = torch.stack([1 - frac[..., 2], frac[..., 2]], dim=-1)
    w = wz[..., :, None, None] * wy[..., None, :, None] * wx[..., None, None, :]
    return w.reshape(*frac.shape[:-1], 8)


def _corner_offsets(G: int, device: torch.device) -> torch.Tensor:
    """Flat-index offsets of the 8 corners on a ``G^3`` lattice, ``(8,)``."""
    c = torch.arange(8, device=device)
    return ((c >> 2) & 1) * G * G + ((c >> 1) & 1) * G + (c & 1)


def trilinear_sample(vol: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of voxel grids at fractional indices, zero outside.

    Parameters
    ----------
    vol
        ``(D, D, D)`` one grid for all points, or ``(N, D, D, D)`` one grid per row of
        ``idx``; indexed ``vol[z, y, x]``; real or complex.
    idx
        ``(N, M, 3)`` fractional indices ``(ix, iy, iz)`` (x goes with the last axis).

    Returns
    -------
    torch.Tensor
        ``(N, M)`` interpolated values, dtype of ``vol``. The grid is embedded in a
        one-voxel border of zeros, so points outside contribute zero. Differentiable with
        respect to ``vol`` and (inside the grid) ``idx``.
    """
    D = vol.shape[-1]
    G = D + 2
    n = idx.shape[0]
    padded = torch.nn.functional.pad(vol, (1, 1, 1, 1, 1, 1))  # (..., G, G, G)
    flat = padded.reshape(-1)
    # shift into the padded frame and clamp into [0, D + 1): far points land on zeros
    pos = (idx + 1).clamp(0.0, float(D + 1))
    base = pos.floor().clamp(max=float(D))
    real_dtype = vol.real.dtype if vol.is_complex() else vol.dtype
    frac = (pos - base).to(real_dtype)
    i0 = base.long()
    lin = (i0[..., 2] * G + i0[..., 1]) * G + i0[..., 0]  # (N, M)
    if vol.dim() == 4:
        lin = lin + (torch.arange(n, device=idx.device) * G**3).view(n, 1)
    lin = lin[..., None] + _corner_offsets(G, idx.device)  # (N, M, 8)
    w = _corner_weights(frac)  # (N, M, 8)
    return (flat[lin] * w).sum(-1)


def extract_slices(
    vol_ft: torch.Tensor, rotations: torch.Tensor, freqs: torch.Tensor | None = None
) -> torch.Tensor:
    """Central slices of a centred 3-D transform by trilinear interpolation.

    Parameters
    ----------
    vol_ft
        ``(D, D, D)`` (or ``(N, D, D, D)``, one per pose) centred transform, real
        (Hartley) or complex (Fourier), DC at ``D // 2``.
    rotations
        ``(N, 3, 3)`` poses ``R``; slice point for ``(kx, ky)`` is ``[kx, ky, 0] @ R``.
    freqs
        ``(M, 2)`` in-plane frequencies in cycles/px, or None for the full ``D x D``
        image lattice. Frequencies are in cycles per *pixel of this grid*: for a
        zero-padded grid of size ``2D``, pass ``freq_grid_2d(D)`` to sample at the
        original image's frequencies.

    Returns
    -------
    torch.Tensor
        ``(N, M)`` when ``freqs`` is given, else ``(N, D, D)``; zero outside the grid.
    """
    D = vol_ft.shape[-1]
    n = rotations.shape[0]
    real_dtype = vol_ft.real.dtype if vol_ft.is_complex() else vol_ft.dtype
    if freqs is None:
        pts = freq_grid_2d(D, dtype=real_dtype, device=vol_ft.device).reshape(-1, 2)
    else:
        pts = freqs
    coords = slice_coordinates(rotations.to(real_dtype), pts.to(real_dtype))  # (N, M, 3)
    out = trilinear_sample(vol_ft, coords * D + (D // 2))
    return out.reshape(n, D, D) if freqs is None else out


def project_real_space(
    vol: torch.Tensor, rotations: torch.Tensor, chunk_size: int = 8
) -> torch.Tensor:
    """Reference projection ``sum_z V(R^T [x, y, z])`` by trilinear resampling.

    Slow (``O(N D^3)``); used to prove the Fourier slice theorem and for simulation
    cross-checks, not in training.

    Parameters
    ----------
    vol
        ``(D, D, D)`` real volume ``vol[z, y, x]``, origin at ``D // 2``.
    rotations
        ``(N, 3, 3)`` poses.
    chunk_size
        Poses resampled at once (memory ``chunk_size * D^3 * 3`` floats).

    Returns
    -------
    torch.Tensor
        ``(N, D, D)`` projections (voxel sums, 1 px spacing along z).
    """
    D = vol.shape[-1]
    c = coords_1d(D, dtype=vol.dtype, device=vol.device)
    gz, gy, gx = torch.meshgrid(c, c, c, indexing="ij")
    r = torch.stack([gx, gy, gz], dim=-1).reshape(-1, 3)  # (D^3, 3) [x, y, z]
    scale = 2.0 / (D - 1)
    out = []
    for start in range(0, rotations.shape[0], chunk_size):
        R = rotations[start : start + chunk_size].to(vol.dtype)
        p = torch.matmul(r[None], R)  # (n, D^3, 3): R^T r as row vectors
        grid = ((p + D // 2) * scale - 1).reshape(R.shape[0], D, D, D, 3)
        src = vol[None, None].expand(R.shape[0], 1, D, D, D)
        sampled = torch.nn.functional.grid_sample(
            src, grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )  # (n, 1, D, D, D) indexed [z, y, x]
        out.append(sampled[:, 0].sum(dim=1))
    return torch.cat(out, dim=0)
