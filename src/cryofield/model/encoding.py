"""Positional encodings of 3-D frequency coordinates.

Gaussian random Fourier features (Tancik et al., NeurIPS 2020, "Fourier features let
networks learn high frequency functions in low dimensional domains"), the encoding the
DRGN-AI / cryoDRGN fields use: ``gamma(k) = [sin(2 pi B k'), cos(2 pi B k')]`` with
``B ~ N(0, sigma^2)`` of shape ``(n_freqs, 3)``.

Here ``k' = k * D`` is the frequency in index units (px of the Fourier box), so with
``sigma`` fixed the encoding resolves Fourier-space structure on the same relative scale
for every box size: a real-space object of radius ``a`` px gives Fourier oscillations of
``a / D`` cycles per index, and ``sigma = 0.5`` covers objects filling the box.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class GaussianFourierFeatures(nn.Module):
    """Gaussian random Fourier features of 3-D frequency coordinates.

    Parameters
    ----------
    D
        Box size (px); coordinates are multiplied by ``D`` before projection.
    n_freqs
        Number of random frequencies (output width is ``2 * n_freqs + 3``).
    sigma
        Standard deviation of the random frequencies (cycles per Fourier index).
    seed
        Seed of the frequency matrix (stored as a buffer, so it is saved with the weights).
    """

    def __init__(self, D: int, n_freqs: int = 64, sigma: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if n_freqs < 1:
            raise ValueError(f"n_freqs must be >= 1, got {n_freqs}")
        gen = torch.Generator().manual_seed(int(seed))
        self.D = int(D)
        self.n_freqs = int(n_freqs)
        self.sigma = float(sigma)
        self.register_buffer("freqs", torch.randn(n_freqs, 3, generator=gen) * sigma)

    @property
    def out_dim(self) -> int:
        """Width of the encoding: ``2 * n_freqs + 3`` (sin, cos and the raw coordinate)."""
        return 2 * self.n_freqs + 3

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """Encode coordinates.

        Parameters
        ----------
        coords
            ``(..., 3)`` frequencies ``(kx, ky, kz)`` in cycles/px, in ``[-0.5, 0.5]``.

        Returns
        -------
        torch.Tensor
            ``(..., 2 * n_freqs + 3)``.
        """
        phase = (2.0 * math.pi * self.D) * (coords @ self.freqs.T)  # (..., n_freqs)
        return torch.cat([torch.sin(phase), torch.cos(phase), coords * 2.0], dim=-1)
