"""Fourier shell correlation and resolution at a threshold.

``FSC(r) = Re sum_{|k| in shell r} F1(k) F2(k)* / sqrt(sum |F1|^2 sum |F2|^2)``
(Harauz & van Heel 1986, Optik 73:146; van Heel & Schatz 2005, JSB 151:250). Shell
``r`` holds the voxels whose radius in px rounds to ``r``, ``r = 0 .. D/2 - 1``; shell
``r`` is frequency ``r / D`` cycles/px, i.e. resolution ``D * apix_A / r`` A.
"""

from __future__ import annotations

import torch

from cryofield.physics.fourier import fft3_centered
from cryofield.physics.lattice import radial_index_3d

__all__ = ["fsc", "resolution_at", "shell_resolution_A"]


def fsc(vol1: torch.Tensor, vol2: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fourier shell correlation of two real volumes.

    Parameters
    ----------
    vol1, vol2
        ``(D, D, D)`` real volumes on the same grid.
    mask
        Optional ``(D, D, D)`` real-space mask applied to both first.

    Returns
    -------
    torch.Tensor
        ``(D // 2,)`` float64 FSC per shell (0 for an empty or all-zero shell).
    """
    if vol1.shape != vol2.shape or vol1.dim() != 3:
        raise ValueError(f"fsc needs two (D, D, D) volumes, got {vol1.shape} and {vol2.shape}")
    D = vol1.shape[-1]
    v1, v2 = vol1.double(), vol2.double()
    if mask is not None:
        v1, v2 = v1 * mask, v2 * mask
    f1, f2 = fft3_centered(v1), fft3_centered(v2)
    shell = torch.round(radial_index_3d(D, dtype=torch.float64, device=vol1.device)).long()
    inside = shell < D // 2
    shell = shell[inside]
    f1, f2 = f1[inside], f2[inside]
    cross = torch.zeros(D // 2, dtype=torch.float64, device=vol1.device)
    p1, p2 = torch.zeros_like(cross), torch.zeros_like(cross)
    cross.index_add_(0, shell, (f1 * f2.conj()).real)
    p1.index_add_(0, shell, f1.abs() ** 2)
    p2.index_add_(0, shell, f2.abs() ** 2)
    denom = torch.sqrt(p1 * p2)
    return torch.where(denom > 0, cross / denom.clamp_min(1e-300), 0.0)


def shell_resolution_A(shell_px: float, D: int, apix_A: float) -> float:
    """Resolution in A of frequency shell ``shell_px`` (``D * apix_A / shell_px``)."""
    return float("inf") if shell_px <= 0 else D * apix_A / shell_px


def resolution_at(
    fsc_curve: torch.Tensor, threshold: float = 0.143, apix_A: float = 1.0
) -> tuple[float, float]:
    """Where an FSC curve first falls below a threshold.

    The crossing is linearly interpolated between the last shell at or above the
    threshold and the next one (searching from shell 1; shell 0 is the DC term). A curve
    that never falls below gives the last shell.

    Parameters
    ----------
    fsc_curve
        ``(D // 2,)`` FSC per shell (from :func:`fsc`).
    threshold
        E.g. 0.143 (gold standard, Rosenthal & Henderson 2003) or 0.5.
    apix_A
        Pixel size in A.

    Returns
    -------
    tuple[float, float]
        ``(shell_px, resolution_A)``: the fractional shell (frequency ``shell_px / D``
        cycles/px) and ``D * apix_A / shell_px``.
    """
    curve = [float(v) for v in fsc_curve]
    D = 2 * len(curve)
    shell = float(len(curve) - 1)
    for r in range(1, len(curve)):
        if curve[r] < threshold:
            lo, hi = curve[r - 1], curve[r]
            frac = 0.0 if lo == hi else (lo - threshold) / (lo - hi)
            shell = (r - 1) + min(max(frac, 0.0), 1.0)
            break
    return shell, shell_resolution_A(shell, D, apix_A)
