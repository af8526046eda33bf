"""Hierarchical SO(3) grid for pose search (HEALPix directions x in-plane angles).

Level ``l`` has ``12 * nside_l**2`` viewing directions (HEALPix, nested numbering,
``nside_l = base_nside * 2**l``; Gorski et al., ApJ 622, 2005) times ``n_psi_l =
base_psi * 2**l`` in-plane angles ``psi_j = (j + 1/2) 2 pi / n_psi_l``. A rotation id is
the pair ``(pixel, j)``; its 8 children at level ``l + 1`` are the 4 nested sub-pixels
``4 p + {0..3}`` times the in-plane angles ``2 j, 2 j + 1``. This is the grid of
cryoDRGN / DRGN-AI's hierarchical pose search (Zhong et al. 2021; Levy et al. 2024),
written here against our rotation convention: the direction ``(theta, phi)`` of a pixel
becomes RELION's ``(rot, tilt) = (phi, theta)``, so the third row of ``R`` is the
viewing direction.
"""

from __future__ import annotations

import functools
import math

import healpy
import numpy as np
import torch

from cryofield.physics.rotation import euler_relion_to_matrix


def grid_spacing_deg(base_nside: int, base_psi: int, level: int) -> float:
    """Approximate angular spacing of level ``level`` (in-plane step), degrees."""
    return 360.0 / (base_psi * 2**level)


@functools.lru_cache(maxsize=64)
def _directions(nside: int) -> tuple[np.ndarray, np.ndarray]:
    theta, phi = healpy.pix2ang(nside, np.arange(12 * nside * nside), nest=True)
    return theta, phi


def rotations_from_ids(
    pix: torch.Tensor, psi_idx: torch.Tensor, base_nside: int, base_psi: int, level: int
) -> torch.Tensor:
    """Rotation matrices of grid points.

    Parameters
    ----------
    pix, psi_idx
        ``(...)`` integer HEALPix pixel (nested) and in-plane index at ``level``.
    base_nside, base_psi, level
        Grid definition.

    Returns
    -------
    torch.Tensor
        ``(..., 3, 3)`` float32.
    """
    nside = base_nside * 2**level
    n_psi = base_psi * 2**level
    theta, phi = _directions(nside)
    p = pix.cpu().numpy()
    angles = np.stack(
        [phi[p], theta[p], (psi_idx.cpu().numpy() + 0.5) * (2 * math.pi / n_psi)], axis=-1
    )
    return euler_relion_to_matrix(torch.as_tensor(angles, dtype=torch.float64)).float()


def base_grid(base_nside: int, base_psi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All level-0 grid points.

    Returns
    -------
    rotations : torch.Tensor
        ``(Q, 3, 3)`` with ``Q = 12 base_nside^2 base_psi``.
    pix, psi_idx : torch.Tensor
        ``(Q,)`` int64 ids.
    """
    n_pix = 12 * base_nside * base_nside
    pix = torch.arange(n_pix).repeat_interleave(base_psi)
    psi = torch.arange(base_psi).repeat(n_pix)
    return rotations_from_ids(pix, psi, base_nside, base_psi, 0), pix, psi


def children(pix: torch.Tensor, psi_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 children ids at the next level of grid points ``(...)`` -> ``(..., 8)``."""
    sub = torch.arange(4, device=pix.device)
    cpix = (4 * pix[..., None, None] + sub[:, None]).expand(*pix.shape, 4, 2)
    cpsi = (2 * psi_idx[..., None, None] + torch.arange(2, device=pix.device)).expand(
        *pix.shape, 4, 2
    )
    return cpix.reshape(*pix.shape, 8), cpsi.reshape(*pix.shape, 8)
