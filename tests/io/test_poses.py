"""Pose conventions of RELION, cryoSPARC and cryoDRGN files versus the internal (R, shift_px)."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from cryofield.io.legacy import read_pose_pkl
from cryofield.io.metadata import load_particle_table
from cryofield.io.poses import (
    cryodrgn_to_internal,
    cryosparc_to_internal,
    internal_to_cryodrgn,
    internal_to_cryosparc,
    internal_to_relion,
    relion_to_internal,
)


def _random_rotations(n: int, seed: int = 0) -> np.ndarray:
    return Rotation.random(n, random_state=seed).as_matrix()


def test_relion_matrix_is_zyz_passive():
    # RELION's A(rot, tilt, psi) = Rz(psi) Ry(tilt) Rz(rot) with R_axis(a) the *passive*
    # (coordinate) rotation, i.e. the transpose of scipy's active rotation matrices.
    rng = np.random.default_rng(1)
    euler = np.column_stack([rng.uniform(-180, 180, 50), rng.uniform(0, 180, 50),
                             rng.uniform(-180, 180, 50)])  # fmt: skip
    R, _ = relion_to_internal(euler, None)
    for (rot, tilt, psi), A in zip(euler, R, strict=True):
        rz = lambda a: Rotation.from_euler("z", a, degrees=True).as_matrix().T  # noqa: E731
        ry = Rotation.from_euler("y", tilt, degrees=True).as_matrix().T
        np.testing.assert_allclose(A, rz(psi) @ ry @ rz(rot), atol=1e-12)
    # the viewing direction (third row) is (cos rot sin tilt, sin rot sin tilt, cos tilt)
    r, t = np.deg2rad(euler[:, 0]), np.deg2rad(euler[:, 1])
    view = np.column_stack([np.cos(r) * np.sin(t), np.sin(r) * np.sin(t), np.cos(t)])
    np.testing.assert_allclose(R[:, 2], view, atol=1e-12)


def test_relion_roundtrip_and_origin_sign():
    R = _random_rotations(200)
    shift = np.random.default_rng(2).uniform(-20, 20, (200, 2))
    euler, origin = internal_to_relion(R, shift)
    np.testing.assert_allclose(origin, -shift)
    R2, shift2 = relion_to_internal(euler, origin)
    np.testing.assert_allclose(R2, R, atol=1e-6)
    np.testing.assert_allclose(shift2, shift)


def test_cryosparc_pose_is_transposed_rodrigues():
    pose = Rotation.random(100, random_state=3).as_rotvec()
    shift_cs = np.random.default_rng(3).uniform(-5, 5, (100, 2))
    R, shift = cryosparc_to_internal(pose, shift_cs)
    np.testing.assert_allclose(R, Rotation.from_rotvec(pose).as_matrix().transpose(0, 2, 1),
                               atol=1e-12)  # fmt: skip
    np.testing.assert_allclose(shift, -shift_cs)
    pose2, shift_cs2 = internal_to_cryosparc(R, shift)
    np.testing.assert_allclose(Rotation.from_rotvec(pose2).as_matrix(),
                               Rotation.from_rotvec(pose).as_matrix(), atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(shift_cs2, shift_cs)


def test_cryodrgn_pkl_of_pfcrt_matches_star(interop_data):
    """cryoDRGN's parse_pose_star wrote pose.star.pkl from the PfCRT star (D = 300)."""
    star = load_particle_table(interop_data / "FinalRefinement-OriginalParticles-PfCRT.star")
    R, shift = read_pose_pkl(interop_data / "pose.star.pkl", box_px=300)
    np.testing.assert_allclose(R, star.rotations, atol=1e-6)
    np.testing.assert_allclose(shift, star.shifts_px, atol=1e-6)
    rot, trans = internal_to_cryodrgn(R, shift, 300)
    R2, shift2 = cryodrgn_to_internal(rot, trans, 300)
    np.testing.assert_array_equal(R2, R)
    np.testing.assert_allclose(shift2, shift)
