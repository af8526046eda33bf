"""Image translation as a phase ramp in Fourier and Hartley space.

Convention (docs/dev/contracts.md): an image shifted by ``t = (tx, ty)`` px is
``I(x) = P(x - t)``, so ``I_hat(k) = P_hat(k) exp(-2 pi i k.t)`` (shift theorem).
To centre an observed image, shift it by ``-t``.

For Hartley coefficients (real signal) the same shift mixes ``H(k)`` and ``H(-k)``:
``H'(k) = cos(phi) H(k) + sin(phi) H(-k)`` with ``phi = 2 pi k.t`` (Bracewell, *The
Hartley Transform*, 1986, shift theorem), which follows from
``F = (H(k) + H(-k)) / 2 - i (H(k) - H(-k)) / 2``.
"""

from __future__ import annotations

import math

import torch

from cryofield.physics.fourier import negate_frequency
from cryofield.physics.lattice import freq_grid_2d

__all__ = ["phase_shift_fourier", "phase_shift_hartley", "shift_phase"]


def shift_phase(freqs: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Phase factors ``exp(-2 pi i k.t)`` of a translation ``t``.

    Parameters
    ----------
    freqs
        ``(..., 2)`` frequencies ``(kx, ky)`` in cycles/px.
    shift_px
        ``(N, 2)`` translations ``(tx, ty)`` in px.

    Returns
    -------
    torch.Tensor
        ``(N, ...)`` complex.
    """
    phi = _phase(freqs, shift_px)
    return torch.polar(torch.ones_like(phi), -phi)


def _phase(freqs: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    n = shift_px.shape[0]
    t = shift_px.to(freqs.dtype).reshape((n,) + (1,) * (freqs.dim() - 1) + (2,))
    return 2 * math.pi * (freqs[None] * t).sum(-1)


def phase_shift_fourier(f: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Translate images given by their centred Fourier transforms.

    Parameters
    ----------
    f
        ``(N, D, D)`` complex, centred (``fft2_centered``).
    shift_px
        ``(N, 2)`` translations ``(tx, ty)`` in px.

    Returns
    -------
    torch.Tensor
        ``(N, D, D)`` complex: the transform of ``x -> img(x - t)``.
    """
    D = f.shape[-1]
    real_dtype = torch.float64 if f.dtype == torch.complex128 else torch.float32
    freqs = freq_grid_2d(D, dtype=real_dtype, device=f.device)
    return f * shift_phase(freqs, shift_px)


def phase_shift_hartley(h: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Translate real images given by their centred Hartley transforms.

    Parameters
    ----------
    h
        ``(N, D, D)`` real, centred (``ht2_centered``).
    shift_px
        ``(N, 2)`` translations ``(tx, ty)`` in px.

    Returns
    -------
    torch.Tensor
        ``(N, D, D)``: the Hartley transform of ``x -> img(x - t)``.
    """
    D = h.shape[-1]
    phi = _phase(freq_grid_2d(D, dtype=h.dtype, device=h.device), shift_px)
    return torch.cos(phi) * h + torch.sin(phi) * negate_frequency(h, 2)
