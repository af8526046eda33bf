"""Handedness: mirror a map and its poses consistently.

An ab initio reconstruction cannot tell a structure from its mirror image: the
projections of a volume ``V`` at poses ``R`` are also the projections of the mirrored
volume ``V'`` at suitably transformed poses ``R'``. This module gives that pair of
transforms so that a user can switch to the other hand without re-running.

Derivation (in this project's convention, ``docs/dev/contracts.md``): the projection of
``V`` under pose ``R`` is ``P_R V(x, y) = integral V(R^T [x, y, z]) dz``. Mirror the
volume along z about the origin, ``V'(p) = V(M p)`` with ``M = diag(1, 1, -1)``. Then

``P_R' V'(x, y) = integral V(M R'^T [x, y, z]) dz``.

Choosing ``R' = M R M`` gives ``M R'^T = R^T M`` and ``R^T M [x, y, z] = R^T [x, y, -z]``;
the substitution ``z -> -z`` leaves the integral unchanged, so ``P_R' V' = P_R V`` for
every image, with the in-plane translations unchanged. ``M R M`` is a proper rotation
(``det = det R = 1``). For RELION's ZYZ matrix ``R = Rz(psi) Ry(tilt) Rz(rot)`` the
z rotations commute with ``M`` and ``M Ry(tilt) M = Ry(-tilt)``, so the mirrored pose is
``(rot, -tilt, psi)``, equivalently ``(rot + 180, tilt, psi + 180)`` deg. This is the
same mirror that RELION's and cryoSPARC's "flip hand" tools apply to the map (a reversal
of the z axis); see Rosenthal & Henderson (2003), J. Mol. Biol. 333:721, on the
hand ambiguity of single-particle reconstructions.

Point inversion (``invert=True``). The mirror image of a symmetric map has the group
``M G M``; for RELION's ``T``, ``I3`` and ``I4`` that is not ``G`` (the axes move). The
inversion through the origin, ``V''(p) = V(-p)``, is also a mirror image (``-I = M
Rz(180)``: the z-mirror followed by a half turn about z) and commutes with every
rotation, so ``V''`` has the group ``G`` in the same axes. Its poses are
``R'' = Rz(180) R``: ``-R''^T [x, y, z] = -R^T Rz(180) [x, y, z] = R^T [x, y, -z]``, so
``P_R'' V'' = P_R V`` with the shifts unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["flip_hand_poses", "flip_hand_volume", "mirror_matrix"]


def mirror_matrix(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return ``M = diag(1, 1, -1)``, the mirror along z.

    Returns
    -------
    torch.Tensor
        ``(3, 3)`` tensor.
    """
    return torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=dtype))


def flip_hand_volume(
    vol: torch.Tensor | np.ndarray, invert: bool = False
) -> torch.Tensor | np.ndarray:
    """Mirror a volume along z about the origin voxel ``D // 2`` (``invert``: invert it
    through that voxel, ``V(-p)``, every axis reversed the same way; see the module
    docstring).

    The result is ``V'[z, y, x] = V[(D - z) mod D, y, x]``: voxel ``D // 2 + j`` takes the
    value of voxel ``D // 2 - j``, so the real-space origin (index ``D // 2``) stays fixed
    and ``V'(p) = V(M p)`` holds exactly on the grid. Only the first slice (``z = 0``,
    which has no mirror partner in an even box) maps onto itself. The same operation in
    Fourier space mirrors the transform along ``kz`` (the DC term also sits at ``D // 2``).

    Parameters
    ----------
    vol
        ``(..., D, D, D)`` volume indexed ``[z, y, x]`` (torch or numpy).

    Returns
    -------
    torch.Tensor or numpy.ndarray
        ``(..., D, D, D)`` mirrored volume, same type and dtype as ``vol``.
    """
    if vol.ndim < 3:
        raise ValueError(f"flip_hand_volume: expected a (..., D, D, D) volume, got {vol.shape}")
    axes = tuple(range(vol.ndim - 3, vol.ndim)) if invert else (vol.ndim - 3,)
    if isinstance(vol, np.ndarray):
        return np.ascontiguousarray(np.roll(np.flip(vol, axis=axes), 1, axis=axes))
    return torch.roll(torch.flip(vol, dims=axes), (1,) * len(axes), dims=axes)


def flip_hand_poses(
    rotations: torch.Tensor | np.ndarray,
    shifts_px: torch.Tensor | np.ndarray | None = None,
    invert: bool = False,
) -> tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray | None]:
    """Poses that project :func:`flip_hand_volume` ``(V, invert)`` onto the same images as
    ``V``: ``M R M``, or ``Rz(180) R`` for the inverted map.

    Parameters
    ----------
    rotations
        ``(..., 3, 3)`` pose matrices ``R`` (RELION's matrix A, contract convention).
    shifts_px
        ``(..., 2)`` in-plane translations or None; returned unchanged (a copy), since the
        mirrored projections are identical images, centred at the same place.

    Returns
    -------
    rotations_flipped
        ``(..., 3, 3)`` ``M R M`` with ``M = diag(1, 1, -1)`` (see the module docstring).
    shifts_px
        ``(..., 2)`` copy of the input shifts, or None.
    """
    if rotations.shape[-2:] != (3, 3):
        raise ValueError(f"flip_hand_poses: expected (..., 3, 3) rotations, got {rotations.shape}")
    sign = np.array([1.0, 1.0, -1.0])
    # (M R M)_ij = m_i R_ij m_j with m = (1, 1, -1); (Rz(180) R)_ij = -R_ij for i < 2
    outer = -sign[:, None] * np.ones(3)[None, :] if invert else sign[:, None] * sign[None, :]
    if isinstance(rotations, np.ndarray):
        flipped = rotations * outer.astype(rotations.dtype)
        shifts = None if shifts_px is None else np.array(shifts_px, copy=True)
        return flipped, shifts
    flipped = rotations * torch.as_tensor(outer, dtype=rotations.dtype, device=rotations.device)
    if shifts_px is None:
        return flipped, None
    shifts = torch.as_tensor(shifts_px).clone()
    return flipped, shifts
