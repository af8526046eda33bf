"""Centred discrete Fourier and Hartley transforms.

Convention (docs/dev/contracts.md): the real-space origin and the DC term both sit at
index ``D // 2`` of every transformed axis, and

``F = fftshift(fftn(ifftshift(x)))``, ``H = Re F - Im F``.

The forward transforms are unnormalised and the inverses carry the ``1 / D**ndim``
factor (numpy/torch "backward" normalisation). The discrete Hartley transform is its own
inverse up to that factor: ``x = ht(ht(x)) / D**ndim`` (Bracewell, *The Hartley
Transform*, 1986, eq. 3.2), which also holds for the centred form when ``D`` is even
because the centring shift is then an involution.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "fft2_centered",
    "fft3_centered",
    "fft_to_hartley",
    "ht2_centered",
    "ht3_centered",
    "ifft2_centered",
    "ifft3_centered",
    "iht2_centered",
    "iht3_centered",
    "negate_frequency",
]

_DIMS2 = (-2, -1)
_DIMS3 = (-3, -2, -1)


def _fftc(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    x = torch.fft.ifftshift(x, dim=dims)
    return torch.fft.fftshift(torch.fft.fftn(x, dim=dims), dim=dims)


def _ifftc(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    x = torch.fft.ifftshift(x, dim=dims)
    return torch.fft.fftshift(torch.fft.ifftn(x, dim=dims), dim=dims)


def fft_to_hartley(f: torch.Tensor) -> torch.Tensor:
    """Hartley coefficients from Fourier coefficients, ``H = Re F - Im F``.

    Parameters
    ----------
    f
        ``(...)`` complex Fourier coefficients.

    Returns
    -------
    torch.Tensor
        ``(...)`` real tensor.
    """
    return f.real - f.imag


def negate_frequency(x: torch.Tensor, ndim: int = 2) -> torch.Tensor:
    """Values at ``-k`` of a centred grid over the last ``ndim`` dims (``D`` even).

    ``out[..., i, j] = x[..., (D - i) % D, (D - j) % D]`` (``ndim = 2``; likewise for 3):
    index ``D // 2 + k`` goes to ``D // 2 - k``, and index 0 (the unpaired Nyquist
    frequency) maps to itself. Used to pair ``H(k)`` with ``H(-k)`` of a Hartley transform.

    Parameters
    ----------
    x
        ``(..., D, D)`` or ``(..., D, D, D)``.
    ndim
        Number of trailing dims (2 or 3).

    Returns
    -------
    torch.Tensor
        Same shape as ``x``.
    """
    dims = tuple(range(-ndim, 0))
    return torch.roll(torch.flip(x, dims=dims), shifts=(1,) * ndim, dims=dims)


def fft2_centered(x: torch.Tensor) -> torch.Tensor:
    """Centred 2-D DFT over the last two dims.

    Parameters
    ----------
    x
        ``(..., D, D)`` real or complex images, origin at ``D // 2``.

    Returns
    -------
    torch.Tensor
        ``(..., D, D)`` complex, DC at ``[D // 2, D // 2]``.
    """
    return _fftc(x, _DIMS2)


def ifft2_centered(f: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2_centered`; ``(..., D, D)`` complex in and out."""
    return _ifftc(f, _DIMS2)


def fft3_centered(x: torch.Tensor) -> torch.Tensor:
    """Centred 3-D DFT over the last three dims; ``(..., D, D, D)`` -> complex."""
    return _fftc(x, _DIMS3)


def ifft3_centered(f: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft3_centered`; ``(..., D, D, D)`` complex in and out."""
    return _ifftc(f, _DIMS3)


def ht2_centered(x: torch.Tensor) -> torch.Tensor:
    """Centred 2-D discrete Hartley transform, ``Re F - Im F`` of :func:`fft2_centered`.

    Parameters
    ----------
    x
        ``(..., D, D)`` real images.

    Returns
    -------
    torch.Tensor
        ``(..., D, D)`` real Hartley coefficients.
    """
    return fft_to_hartley(fft2_centered(x))


def iht2_centered(h: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`ht2_centered`: ``ht2(h) / D**2``; ``(..., D, D)`` real."""
    n = h.shape[-1] * h.shape[-2]
    return ht2_centered(h) / n


def ht3_centered(x: torch.Tensor) -> torch.Tensor:
    """Centred 3-D discrete Hartley transform; ``(..., D, D, D)`` real in and out."""
    return fft_to_hartley(fft3_centered(x))


def iht3_centered(h: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`ht3_centered`: ``ht3(h) / D**3``; ``(..., D, D, D)`` real."""
    n = math.prod(h.shape[-3:])
    return ht3_centered(h) / n
