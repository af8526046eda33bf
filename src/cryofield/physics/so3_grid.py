"""Hierarchical SO(3) grid: HEALPix viewing directions x in-plane angles.

The one SO(3) grid of the package: the pose search (:mod:`cryofield.inference.
pose_search`), the run diagnostics (:mod:`cryofield.inference.diagnostics`) and the map
alignment (:mod:`cryofield.analysis.align`) all take their rotations from here.

Level ``L`` of a grid with base ``(base_nside, base_psi)`` has ``12 * nside^2``
directions with ``nside = base_nside * 2^L`` (HEALPix, nested scheme; Gorski et al. 2005,
ApJ 622:759) and ``n_psi = base_psi * 2^L`` in-plane angles ``psi_j = (j + 1/2) 2 pi /
n_psi``. The default base ``(4, 24)`` makes level 0 the 192 x 24 = 4,608-point grid
(~15 deg spacing) used by cryoDRGN / DRGN-AI pose search (their ``so3_grid``,
``base_healpy = 2``); each level halves the spacing.

A grid point is the pair ``(pixel, j)`` (HEALPix pixel, nested, and in-plane index), or
its id ``pixel * n_psi + j``. Its rotation, in our pose convention (RELION matrix,
:mod:`cryofield.physics.rotation`), is ``euler_relion_to_matrix(rot=phi, tilt=theta,
psi=psi_j - s * phi)`` with ``(theta, phi)`` the HEALPix pixel centre, so the viewing
direction ``R^T e_z`` (third row of ``R``) is that pixel centre. With the pole offset
(``pole_offset=True``, the default), ``s = +1`` in the 8 northern and equatorial HEALPix
base pixels and ``-1`` in the 4 southern ones: it makes the in-plane coordinate a
continuous function of direction inside each base pixel, including at the poles where
``rot`` and ``psi`` are degenerate (like the Hopf-fibration grid of Yershova et al. 2010,
IJRR 29:801, used by cryoDRGN). Without it (``s = 0``) the rotations are RELION's Euler
angles ``(phi, theta, psi_j)``; the pose search uses that form (the grid its runs and
benchmarks were measured with). The children of a point at level ``L + 1`` are its 4
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
from cryofield.physics.symmetry import asymmetric_unit_mask

__all__ = [
    "BASE_NPSI",
    "BASE_NSIDE",
    "asymmetric_level_points",
    "base_grid",
    "child_pairs",
    "children",
    "direction_pixels",
    "grid_quats",
    "grid_rotations",
    "grid_size",
    "grid_spacing_rad",
    "ids_to_quats",
    "ids_to_rotations",
    "level_points",
    "pair_rotations",
]

BASE_NSIDE = 4
BASE_NPSI = 24


def grid_size(
    level: int, base_nside: int = BASE_NSIDE, base_psi: int = BASE_NPSI
) -> tuple[int, int]:
    """``(n_directions, n_psi)`` at a level (``level >= 0``)."""
    if level < 0:
        raise ValueError(f"grid level must be >= 0, got {level}")
    nside = base_nside * 2**level
    return 12 * nside * nside, base_psi * 2**level


def grid_spacing_rad(level: int, base_psi: int = BASE_NPSI) -> float:
    """Nominal spacing: in-plane step ``2 pi / n_psi`` (~15 deg at level 0 of the default)."""
    return 2 * math.pi / grid_size(level, base_psi=base_psi)[1]


@functools.lru_cache(maxsize=16)
def _directions(nside: int) -> tuple[np.ndarray, np.ndarray]:
    """``(theta, phi)`` of every nested HEALPix pixel centre of ``nside``."""
    theta, phi = healpy.pix2ang(nside, np.arange(12 * nside * nside), nest=True)
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


def pair_rotations(
    pix: torch.Tensor,
    psi_idx: torch.Tensor,
    level: int,
    *,
    base_nside: int = BASE_NSIDE,
    base_psi: int = BASE_NPSI,
    pole_offset: bool = True,
    psi_phase: float = 0.5,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rotation matrices of grid points given as ``(pixel, in-plane index)`` pairs.

    Parameters
    ----------
    pix, psi_idx
        ``(...)`` integer HEALPix pixel (nested) and in-plane index at ``level``.
    level
        Grid level.
    base_nside, base_psi
        Level-0 HEALPix ``nside`` (a power of 2) and number of in-plane angles.
    pole_offset
        Subtract ``s * phi`` from the in-plane angle (see the module docstring).
    psi_phase
        In-plane angles ``(j + psi_phase) 2 pi / n_psi`` (0.5: cell centres).
    dtype
        Output dtype (computed in float64).

    Returns
    -------
    torch.Tensor
        ``(..., 3, 3)`` poses in the RELION matrix convention, on the CPU.
    """
    n_dirs, n_psi = grid_size(level, base_nside, base_psi)
    pix = torch.as_tensor(pix, dtype=torch.int64).cpu()
    j = torch.as_tensor(psi_idx, dtype=torch.int64).cpu()
    if pix.numel() and (
        int(pix.min()) < 0 or int(pix.max()) >= n_dirs or int(j.min()) < 0 or int(j.max()) >= n_psi
    ):
        raise ValueError(f"grid ids out of range for level {level} ({n_dirs * n_psi} points)")
    theta, phi = _directions(base_nside * 2**level)
    phi_t = torch.as_tensor(phi)[pix]
    psi = (j.double() + psi_phase) * (2 * math.pi / n_psi)
    if pole_offset:
        nside = base_nside * 2**level
        sign = torch.where(pix // (nside * nside) < 8, 1.0, -1.0).double()
        psi = psi - sign * phi_t
    angles = torch.stack([phi_t, torch.as_tensor(theta)[pix], psi], dim=-1)
    return euler_relion_to_matrix(angles).to(dtype)


def level_points(
    level: int = 0,
    *,
    base_nside: int = BASE_NSIDE,
    base_psi: int = BASE_NPSI,
    pole_offset: bool = True,
    psi_phase: float = 0.5,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every point of a level, ordered by id: ``(rotations (M, 3, 3), pix (M,), psi_idx (M,))``.

    Keyword arguments as in :func:`pair_rotations`.
    """
    n_dirs, n_psi = grid_size(level, base_nside, base_psi)
    pix = torch.arange(n_dirs).repeat_interleave(n_psi)
    psi = torch.arange(n_psi).repeat(n_dirs)
    R = pair_rotations(
        pix, psi, level, base_nside=base_nside, base_psi=base_psi,
        pole_offset=pole_offset, psi_phase=psi_phase, dtype=dtype,
    )  # fmt: skip
    return R, pix, psi


def asymmetric_level_points(
    operators: torch.Tensor,
    level: int = 0,
    *,
    base_nside: int = BASE_NSIDE,
    base_psi: int = BASE_NPSI,
    pole_offset: bool = True,
    psi_phase: float = 0.5,
    margin: float = 0.5,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The points of a level whose viewing direction lies in one asymmetric unit.

    For a map with point-group symmetry the poses ``R`` and ``R g`` (``g`` in the group)
    give the same image (:mod:`cryofield.physics.symmetry`); their viewing directions are
    the orbit of ``R``'s direction. Keeping the points whose direction (the pixel centre)
    lies in the asymmetric unit of :func:`cryofield.physics.symmetry.asymmetric_unit_mask`
    keeps every in-plane angle of about ``1 / |G|`` of the pixels, so that every rotation
    is equivalent to one near a kept point. The unit is widened by ``margin`` times the
    largest pixel radius (``healpy.max_pixrad``, the farthest any direction is from its
    pixel centre): without it a rotation whose direction is near a boundary of the unit
    can be far from every kept point (measured on level 0 of the default grid: up to 23
    deg for D7 and C7 against 12.8 deg for the full grid); with 0.5 the kept points cover
    SO(3) modulo the group as closely as the full grid covers it (within 13 deg for C4,
    C7, D2, D3, D7, T, O and I; tests/physics/test_symmetry.py) and hold ``|G|`` / (1.3 to
    2.2) times fewer points than the full grid (C4: 1.31 / 4 of them; D7 1.53 / 14; T 1.56
    / 12; O 2.0 / 24; I 2.19 / 60).

    Parameters
    ----------
    operators
        ``(G, 3, 3)`` the group (:func:`cryofield.physics.symmetry.symmetry_operators`);
        ``G = 1`` keeps every point.
    level, base_nside, base_psi, pole_offset, psi_phase, dtype
        As in :func:`level_points`.
    margin
        Widening of the asymmetric unit in largest pixel radii of the level (>= 0).

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        ``(rotations (M', 3, 3), pix (M',), psi_idx (M',))``, ordered by id.
    """
    R, pix, psi = level_points(
        level, base_nside=base_nside, base_psi=base_psi, pole_offset=pole_offset,
        psi_phase=psi_phase, dtype=torch.float64,
    )  # fmt: skip
    if operators.shape[0] <= 1:
        return R.to(dtype), pix, psi
    radius = float(healpy.max_pixrad(base_nside * 2**level))
    keep = asymmetric_unit_mask(R[:, 2, :], operators, margin * radius)  # third row: direction
    return R[keep].to(dtype), pix[keep], psi[keep]


def child_pairs(pix: torch.Tensor, psi_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 children ``(pixel, in-plane index)`` at the next level, ``(...) -> (..., 8)``.

    Child ``2 a + b`` is sub-pixel ``4 pix + a`` (``a`` in 0..3) with in-plane index
    ``2 psi_idx + b`` (``b`` in 0..1). Stays on the device of the inputs.
    """
    sub = torch.arange(4, device=pix.device)
    cpix = (4 * pix[..., None, None] + sub[:, None]).expand(*pix.shape, 4, 2)
    cpsi = (2 * psi_idx[..., None, None] + torch.arange(2, device=pix.device)).expand(
        *pix.shape, 4, 2
    )
    return cpix.reshape(*pix.shape, 8), cpsi.reshape(*pix.shape, 8)


def _split_ids(level: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_psi = grid_size(level)[1]
    ids = torch.as_tensor(ids, dtype=torch.int64)
    return ids // n_psi, ids % n_psi


def ids_to_rotations(
    level: int, ids: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Rotation matrices of grid points (default base, pole offset).

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
    pix, j = _split_ids(level, ids)
    return pair_rotations(pix, j, level, dtype=torch.float64).to(dtype)


def ids_to_quats(level: int, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit quaternions ``(w, x, y, z)`` of grid points, ``(K,) -> (K, 4)``."""
    return matrix_to_quaternion(ids_to_rotations(level, ids, torch.float64)).to(dtype)


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
    pix, j = _split_ids(level, torch.as_tensor(ids, dtype=torch.int64).reshape(-1))
    cpix, cpsi = child_pairs(pix, j)
    child = (cpix * grid_size(level + 1)[1] + cpsi).reshape(-1)
    return ids_to_quats(level + 1, child), child
