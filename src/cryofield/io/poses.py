"""Poses in files versus poses inside cryofield.

Internal convention (docs/dev/contracts.md): ``R`` is RELION's matrix ``A`` built from
``(rot, tilt, psi)`` by ``Euler_angles2matrix`` (:func:`cryofield.physics.rotation.
euler_relion_to_matrix`); ``shift_px = (tx, ty)`` is the particle's displacement from the
box centre, so the image is the centred projection moved by ``+t``.

RELION (``rlnAngleRot/Tilt/Psi`` in degrees; ``rlnOriginX/Y`` in px for 3.0,
``rlnOriginX/YAngst`` in A for 3.1+)
    ``R = A(rot, tilt, psi)`` and ``shift_px = -origin_px`` (``-origin_A / apix_A``).
    Why the minus sign: RELION re-extracts a particle centred at ``coord - origin``
    (``rlnCoordinateX - rlnOriginX``), i.e. the particle sits at ``-origin`` from the box
    centre, and RELION centres an image by shifting it by ``+origin``. cryoDRGN's
    ``parse_pose_star`` stores ``trans = +origin_px / D`` and its training translates the
    image by ``+trans`` to centre it, which is the same statement: our ``shift_px`` is
    ``-trans * D``. Its ``utils.R_from_relion`` equals RELION's ``A`` exactly (checked
    numerically in tests/io/test_poses.py against the interop ``pose.star.pkl``, which
    cryoDRGN wrote from ``FinalRefinement-OriginalParticles-PfCRT.star``).

cryoSPARC (``alignments3D/pose``: axis-angle vector in rad; ``alignments3D/shift``: px)
    ``R = Rodrigues(pose)^T`` and ``shift_px = -shift``. Evidence: cryoDRGN's
    ``parse_pose_csparc`` computes ``lie_tools.expmap(pose)`` (standard Rodrigues, ``K`` =
    cross-product matrix) and then transposes it to get the matrix it uses like
    ``R_from_relion``; pyem's ``csparc2star`` converts with ``rot2euler(expmap(pose))``
    where pyem's ``expmap`` builds ``Rodrigues(pose)^T`` (its ``K`` is minus the usual
    cross-product matrix) and ``rot2euler`` inverts RELION's ``A`` -- both give
    ``A = Rodrigues(pose)^T``. Both tools copy ``alignments3D/shift`` into RELION's
    origin (pyem: ``rlnOriginX/Y`` directly; cryoDRGN: ``trans = shift / D`` like
    ``origin / D``), so cryoSPARC's shift has the sign of RELION's origin.

cryoDRGN pose pickles ``(rot (N,3,3), trans (N,2))``
    ``rot`` is RELION's ``A``; ``trans`` is ``+origin_px / D`` (fraction of the box), so
    ``shift_px = -trans * D``.
"""

from __future__ import annotations

import numpy as np
import torch

from cryofield.physics.rotation import (
    axis_angle_to_matrix,
    euler_relion_to_matrix,
    matrix_to_axis_angle,
    matrix_to_euler_relion,
)

__all__ = [
    "cryodrgn_to_internal",
    "cryosparc_to_internal",
    "internal_to_cryodrgn",
    "internal_to_cryosparc",
    "internal_to_relion",
    "relion_to_internal",
]


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _negated(v: np.ndarray | None) -> np.ndarray | None:
    """``-v`` as ``(N, 2)`` float64 (None stays None): file origin/shift <-> ``shift_px``.

    RELION's origin, cryoSPARC's shift and cryoDRGN's ``trans`` all have the sign opposite
    to ``shift_px`` (see the module docstring).
    """
    return None if v is None else -np.asarray(v, dtype=np.float64).reshape(-1, 2)


def relion_to_internal(
    euler_deg: np.ndarray, origin_px: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """RELION angles and origins to ``(R, shift_px)``.

    Parameters
    ----------
    euler_deg
        ``(N, 3)`` ``(rlnAngleRot, rlnAngleTilt, rlnAnglePsi)`` in degrees.
    origin_px
        ``(N, 2)`` ``(rlnOriginX, rlnOriginY)`` in px (divide ``...Angst`` by the pixel
        size first), or None (zeros).

    Returns
    -------
    R : numpy.ndarray
        ``(N, 3, 3)`` float64.
    shift_px : numpy.ndarray
        ``(N, 2)`` float64, ``-origin_px``.
    """
    euler = np.asarray(euler_deg, dtype=np.float64).reshape(-1, 3)
    R = euler_relion_to_matrix(_t(np.deg2rad(euler))).numpy()
    shift = np.zeros((len(euler), 2)) if origin_px is None else _negated(origin_px)
    return R, shift


def internal_to_relion(
    R: np.ndarray, shift_px: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(R, shift_px)`` to RELION ``(rot, tilt, psi)`` degrees and origins in px."""
    euler = np.rad2deg(matrix_to_euler_relion(_t(np.asarray(R).reshape(-1, 3, 3))).numpy())
    return euler, _negated(shift_px)


def cryosparc_to_internal(
    pose_rad: np.ndarray, shift_px: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """cryoSPARC ``alignments3D/pose`` and ``/shift`` to ``(R, shift_px)``.

    ``R = Rodrigues(pose)^T``, ``shift_px = -shift`` (see the module docstring).
    """
    pose = np.asarray(pose_rad, dtype=np.float64).reshape(-1, 3)
    R = axis_angle_to_matrix(_t(pose)).transpose(-1, -2).numpy()
    shift = np.zeros((len(pose), 2)) if shift_px is None else _negated(shift_px)
    return R, shift


def internal_to_cryosparc(
    R: np.ndarray, shift_px: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(R, shift_px)`` to cryoSPARC ``(pose (N, 3) rad, shift (N, 2) px)``."""
    Rt = _t(np.asarray(R).reshape(-1, 3, 3)).transpose(-1, -2)
    return matrix_to_axis_angle(Rt).numpy(), _negated(shift_px)


def cryodrgn_to_internal(
    rot: np.ndarray, trans: np.ndarray | None, box_px: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """cryoDRGN pose pickle ``(rot, trans)`` to ``(R, shift_px)``; ``trans`` is in box units."""
    R = np.asarray(rot, dtype=np.float64).reshape(-1, 3, 3)
    shift = None if trans is None else -np.asarray(trans, dtype=np.float64).reshape(-1, 2) * box_px
    return R, shift


def internal_to_cryodrgn(
    R: np.ndarray, shift_px: np.ndarray, box_px: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(R, shift_px)`` to a cryoDRGN pose tuple ``(rot, trans = -shift_px / D)``."""
    return np.asarray(R, dtype=np.float64), -np.asarray(shift_px, dtype=np.float64) / box_px
