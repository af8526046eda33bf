"""Fourier-crop downsampling, low-pass filters and soft real-space masks.

Fourier cropping keeps the central ``D_new`` frequencies of a centred transform: the
result is the band-limited resampling of the image on a grid with pixel size
``apix_A * D / D_new`` (exact for signals with no power beyond the new Nyquist). Values
are scaled by ``(D_new / D)^ndim`` so pixel intensities (and the mean) are preserved.
"""

from __future__ import annotations

import math

import torch

from cryofield.physics.fourier import fft2_centered, fft3_centered, ifft2_centered, ifft3_centered
from cryofield.physics.lattice import radial_index_2d, radial_index_3d

__all__ = [
    "fourier_crop",
    "fourier_crop_3d",
    "lowpass",
    "lowpass_filter",
    "soft_circular_mask",
    "soft_spherical_mask",
]


def _check_crop(D: int, D_new: int) -> None:
    if D % 2 or D_new % 2 or not 0 < D_new <= D:
        raise ValueError(f"Fourier crop needs even sizes with 0 < D_new <= D, got {D} -> {D_new}")


def fourier_crop(images: torch.Tensor, D_new: int) -> torch.Tensor:
    """Downsample images by cropping their centred Fourier transform.

    Parameters
    ----------
    images
        ``(..., D, D)`` real images.
    D_new
        New (even) box size, ``<= D``.

    Returns
    -------
    torch.Tensor
        ``(..., D_new, D_new)`` real, same dtype; new pixel size ``apix_A * D / D_new``.
    """
    D = images.shape[-1]
    _check_crop(D, D_new)
    if D_new == D:
        return images.clone()
    lo = D // 2 - D_new // 2
    f = fft2_centered(images)[..., lo : lo + D_new, lo : lo + D_new]
    return (ifft2_centered(f).real * (D_new / D) ** 2).to(images.dtype)


def fourier_crop_3d(vol: torch.Tensor, D_new: int) -> torch.Tensor:
    """Downsample volumes by Fourier cropping, ``(..., D, D, D) -> (..., D_new, D_new, D_new)``."""
    D = vol.shape[-1]
    _check_crop(D, D_new)
    if D_new == D:
        return vol.clone()
    lo = D // 2 - D_new // 2
    f = fft3_centered(vol)[..., lo : lo + D_new, lo : lo + D_new, lo : lo + D_new]
    return (ifft3_centered(f).real * (D_new / D) ** 3).to(vol.dtype)


def _raised_cosine(r: torch.Tensor, radius: float, width: float) -> torch.Tensor:
    """1 for ``r <= radius``, cosine fall-off to 0 at ``radius + width``, 0 beyond."""
    if width <= 0:
        return (r <= radius).to(r.dtype)
    t = ((r - radius) / width).clamp(0.0, 1.0)
    return 0.5 * (1 + torch.cos(math.pi * t))


def lowpass_filter(
    D: int, cutoff_A: float, apix_A: float, ndim: int = 2, edge_px: float = 2.0
) -> torch.Tensor:
    """Centred low-pass filter on the ``D``-lattice.

    Frequencies up to ``apix_A / cutoff_A`` cycles/px (radius ``D * apix_A / cutoff_A``
    px) pass; a raised-cosine edge of ``edge_px`` px follows.

    Returns
    -------
    torch.Tensor
        ``(D, D)`` or ``(D, D, D)`` float32 in ``[0, 1]``.
    """
    if cutoff_A <= 0 or apix_A <= 0:
        raise ValueError(f"cutoff_A and apix_A must be positive, got {cutoff_A}, {apix_A}")
    r = radial_index_2d(D) if ndim == 2 else radial_index_3d(D)
    return _raised_cosine(r, D * apix_A / cutoff_A, edge_px)


def lowpass(
    x: torch.Tensor, cutoff_A: float, apix_A: float, ndim: int = 2, edge_px: float = 2.0
) -> torch.Tensor:
    """Low-pass filter images (``ndim=2``, ``(..., D, D)``) or volumes (``ndim=3``).

    Parameters
    ----------
    x
        Real tensor; the filter acts on the last ``ndim`` dims.
    cutoff_A
        Resolution (A) where the pass band ends.
    apix_A
        Pixel size in A.
    ndim
        2 or 3.
    edge_px
        Width of the raised-cosine edge in Fourier px (0: hard cut-off).

    Returns
    -------
    torch.Tensor
        Filtered tensor, same shape and dtype.
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    D = x.shape[-1]
    filt = lowpass_filter(D, cutoff_A, apix_A, ndim, edge_px).to(x.device)
    if ndim == 2:
        return (ifft2_centered(fft2_centered(x) * filt).real).to(x.dtype)
    return (ifft3_centered(fft3_centered(x) * filt).real).to(x.dtype)


def soft_circular_mask(
    D: int, radius_px: float, width_px: float = 3.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """Soft disc: 1 within ``radius_px`` of the centre, raised-cosine edge of ``width_px``.

    Returns
    -------
    torch.Tensor
        ``(D, D)`` float32 in ``[0, 1]``.
    """
    return _raised_cosine(radial_index_2d(D, device=device), radius_px, width_px)


def soft_spherical_mask(
    D: int,
    radius_px: float,
    width_px: float = 3.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Soft ball: 1 within ``radius_px`` of the centre voxel, raised-cosine edge.

    Returns
    -------
    torch.Tensor
        ``(D, D, D)`` in ``[0, 1]`` (``dtype``, default float32).
    """
    return _raised_cosine(radial_index_3d(D, dtype=dtype, device=device), radius_px, width_px)
