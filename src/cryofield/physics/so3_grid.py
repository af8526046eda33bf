"""Hierarchical SO(3) grid: HEALPix viewing directions x in-plane angles.

Level ``L`` has ``12 * nside^2`` directions with ``nside = 4 * 2^L`` (HEALPix, nested
scheme; Gorski et al. 2005, ApJ 622:759) and ``24 * 2^L`` in-plane angles
``psi_j = (j + 1/2) 2 pi / n_psi``. Level 0 is the 192 x 24 = 4,608-point base grid
(~15 deg spacing) used by cryoDRGN / DRGN-AI pose search (their ``so3_grid``,
``base_healpy = 2``); each level halves the spacing.

A grid point's id is ``direction_pixel * n_psi + psi_index``. Its rotation, in our pose
convention (RELION matrix, :mod:`cryofield.physics.rotation`), is
``euler_relion_to_matrix(rot=phi, tilt=theta, psi=psi_j - s * phi)`` with
``(theta, phi)`` the HEALPix pixel centre, so the viewing direction ``R^T e_z`` is that
pixel centre. The offset ``-s * phi`` (``s = +1`` in the 8 northern and equatorial
HEALPix base pixels, ``-1`` in the 4 southern ones) makes the in-plane coordinate a
continuous function of direction inside each base pixel, including at the poles where
``rot`` and ``psi`` are degenerate (like the Hopf-fibration grid of Yershova et al. 2010,
IJRR 29:801, used by cryoDRGN). The children of a point at level ``L + 1`` are its 4
nested sub-pixels (same base pixel) x 2 in-plane halves (``2 j, 2 j + 1``): 8 points
around it at half the spacing.
"""

from __future__ import annotations

import functools
import math

import healpy
import numpy as np
import torch

from cryofield.physics.rotation import euler_relion_to_matrix, matrix_to_quaternion

__all__ = [
    "BASE_NPSI",
    "BASE_NSIDE",
    "base_grid",
    "children",
    "direction_pixels",
    "grid_quats",
    "grid_rotations",
    "grid_size",
    "grid_spacing_rad",
    "ids_to_quats",
    "ids_to_rotations",
]

BASE_NSIDE = 4
BASE_NPSI = 24


def grid_size(level: int) -> tuple[int, int]:
    """``(n_directions, n_psi)`` at a level (``level >= 0``)."""
    if level < 0:
        raise ValueError(f"grid level must be >= 0, got {level}")
    nside = BASE_NSIDE * 2**level
    return 12 * nside * nside, BASE_NPSI * 2**level


def grid_spacing_rad(level: int) -> float:
    """Nominal spacing: in-plane step ``2 pi / n_psi`` (~15 deg at level 0)."""
    return 2 * math.pi / grid_size(level)[1]


@functools.lru_cache(maxsize=8)
def _directions(level: int) -> tuple[np.ndarray, np.ndarray]:
    n_dirs, _ = grid_size(level)
    theta, phi = healpy.pix2ang(BASE_NSIDE * 2**level, np.arange(n_dirs), nest=True)
    return np.asarray(theta), np.asarray(phi)


def direction_pixels(vectors: np.ndarray | torch.Tensor, level: int = 0) -> np.ndarray:
    """HEALPix pixel (nested) of the grid's directions at ``level`` holding each vector.

    The pixels are the viewing directions of :func:`grid_rotations` (equal-area cells of
    the sphere, ``12 * nside^2`` of them).

    Parameters
    ----------
    vectors
        ``(..., 3)`` directions ``(x, y, z)``; need not be normalised (not zero).
    level
        Grid level (``nside = 4 * 2^level``).

    Returns
    -------
    np.ndarray
        ``(...)`` int64 pixel ids in ``[0, 12 nside^2)``.
    """
    grid_size(level)  # validates the level
    if isinstance(vectors, torch.Tensor):
        v = vectors.detach().cpu().double().numpy()
    else:
        v = np.asarray(vectors, np.float64)
    flat = v.reshape(-1, 3)
    pix = healpy.vec2pix(BASE_NSIDE * 2**level, flat[:, 0], flat[:, 1], flat[:, 2], nest=True)
    return np.asarray(pix, np.int64).reshape(v.shape[:-1])


def _euler(level: int, ids: torch.Tensor) -> torch.Tensor:
    n_dirs, n_psi = grid_size(level)
    ids = torch.as_tensor(ids, dtype=torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_dirs * n_psi):
        raise ValueError(f"grid ids out of range for level {level} ({n_dirs * n_psi} points)")
    pix = (ids // n_psi).cpu()
    j = (ids % n_psi).cpu()
    theta, phi = _directions(level)
    phi_t = torch.as_tensor(phi)[pix]
    nside = BASE_NSIDE * 2**level
    sign = torch.where(pix // (nside * nside) < 8, 1.0, -1.0).double()
    psi = (j.double() + 0.5) * (2 * math.pi / n_psi) - sign * phi_t
    return torch.stack([phi_t, torch.as_tensor(theta)[pix], psi], dim=-1)


def ids_to_rotations(
    level: int, ids: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Rotation matrices of grid points.

    Parameters
    ----------
    level
        Grid level.
    ids
        ``(K,)`` int64 point ids at that level.

    Returns
    -------
    torch.Tensor
        ``(K, 3, 3)`` poses in the RELION matrix convention.
    """
    return euler_relion_to_matrix(_euler(level, ids)).to(dtype)


def ids_to_quats(level: int, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit quaternions ``(w, x, y, z)`` of grid points, ``(K,) -> (K, 4)``."""
    return matrix_to_quaternion(euler_relion_to_matrix(_euler(level, ids))).to(dtype)


def grid_quats(level: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All points of a level as quaternions, ``(M, 4)`` ordered by id."""
    n_dirs, n_psi = grid_size(level)
    return ids_to_quats(level, torch.arange(n_dirs * n_psi), dtype)


def grid_rotations(level: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All points of a level as rotation matrices, ``(M, 3, 3)`` ordered by id."""
    n_dirs, n_psi = grid_size(level)
    return ids_to_rotations(level, torch.arange(n_dirs * n_psi), dtype)


def base_grid(level: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every point of a level: ``(quats (M, 4), ids (M,))``."""
    n_dirs, n_psi = grid_size(level)
    ids = torch.arange(n_dirs * n_psi)
    return ids_to_quats(level, ids), ids


def children(level: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 children at level ``level + 1`` of points at ``level``.

    Parameters
    ----------
    level
        Level of the parents.
    ids
        ``(K,)`` parent ids.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``(quats (K * 8, 4), child_ids (K * 8,))``; the children of parent ``k`` are rows
        ``8 k .. 8 k + 7``.
    """
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    _, n_psi = grid_size(level)
    pix, j = ids // n_psi, ids % n_psi
    sub_pix = (4 * pix)[:, None] + torch.arange(4)  # (K, 4) nested sub-pixels
    sub_psi = (2 * j)[:, None] + torch.arange(2)  # (K, 2)
    child = sub_pix[:, :, None] * (2 * n_psi) + sub_psi[:, None, :]  # (K, 4, 2)
    child = child.reshape(-1)
    return ids_to_quats(level + 1, child), child
