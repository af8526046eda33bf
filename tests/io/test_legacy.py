"""cryoDRGN pickles through the restricted unpickler; malicious pickles are refused."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from cryofield.errors import InputFileError
from cryofield.io.legacy import (
    attach_legacy,
    attach_poses,
    load_pickle,
    read_ctf_pkl,
    read_pose_pkl,
)
from cryofield.io.metadata import load_particle_table
from cryofield.io.mrc import write_mrc


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(InputFileError, match=r"evil\.pkl: refusing to unpickle (posix|nt)\.system"):
        load_pickle(path)
    assert not (tmp_path / "pwned.txt").exists()
    # a class hidden inside an allowed container is refused too
    path.write_bytes(pickle.dumps((np.zeros(3), {"x": _Evil()})))
    with pytest.raises(InputFileError, match="refusing to unpickle"):
        load_pickle(path)
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(InputFileError, match=r"evil\.pkl: not a readable pickle"):
        load_pickle(path)


def test_plain_arrays_load(tmp_path):
    obj = (np.arange(5), [np.eye(3)], {"a": np.float32(2.5)})
    for proto in (2, 4, 5):
        (tmp_path / "ok.pkl").write_bytes(pickle.dumps(obj, protocol=proto))
        back = load_pickle(tmp_path / "ok.pkl")
        np.testing.assert_array_equal(back[0], obj[0])
        np.testing.assert_array_equal(back[1][0], np.eye(3))
        assert back[2]["a"] == np.float32(2.5)


def test_ctf_pkl_matches_pfcrt_star(interop_data):
    star = load_particle_table(interop_data / "FinalRefinement-OriginalParticles-PfCRT.star")
    ctf, apix, box = read_ctf_pkl(interop_data / "ctf1.pkl")
    assert box == 300
    np.testing.assert_allclose(apix, 1.035, rtol=1e-6)
    for key in star.ctf:  # ctf1.pkl is float32
        np.testing.assert_allclose(ctf[key], star.ctf[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_toy_angles_and_attach(interop_data):
    R, shift = read_pose_pkl(interop_data / "toy_angles.pkl", box_px=30)
    assert R.shape == (1000, 3, 3) and shift is None
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape),
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(np.linalg.det(R), 1, atol=1e-5)
    t = attach_legacy(load_particle_table(interop_data / "toy_projections.mrcs"),
                      pose_pkl=interop_data / "toy_angles.pkl")  # fmt: skip
    np.testing.assert_allclose(t.rotations, R, atol=1e-7)
    np.testing.assert_array_equal(t.shifts_px, 0)


def test_mismatched_counts(interop_data):
    toy = load_particle_table(interop_data / "toy_projections.mrcs")
    with pytest.raises(InputFileError, match=r"ctf1\.pkl: mismatched particle counts: 5 CTF rows "
                       "for 1000 particles"):  # fmt: skip
        attach_legacy(toy, ctf_pkl=interop_data / "ctf1.pkl")
    with pytest.raises(InputFileError, match=r"pose\.star\.pkl: mismatched particle counts: 5 "
                       "poses for 1000"):  # fmt: skip
        attach_legacy(toy, pose_pkl=interop_data / "pose.star.pkl")


def test_attach_poses_from_a_poses_npz(tmp_path):
    """``backproject --poses run/epoch_NNN/poses.npz``: shifts in A, rows by particle_index."""
    stack = tmp_path / "p.mrcs"
    write_mrc(stack, np.zeros((6, 8, 8), np.float32), 2.0)
    table = load_particle_table(stack)
    R = np.broadcast_to(np.eye(3), (3, 3, 3)).copy()
    poses = tmp_path / "poses.npz"
    np.savez(poses, rotations=R, shifts_A=np.array([[2.0, -4.0]] * 3),
             particle_index=np.array([5, 0, 2]))  # fmt: skip
    t = attach_poses(table, poses)
    np.testing.assert_array_equal(t.image_index, [5, 0, 2])  # cut to the run's particles
    np.testing.assert_allclose(t.shifts_px, [[1.0, -2.0]] * 3)  # A / 2 A/px
    np.savez(poses, rotations=R)  # 3 poses for 6 particles, no index
    with pytest.raises(InputFileError, match=r"mismatched particle counts: rotations \(3, 3, 3\) "
                       "for 6 particles"):  # fmt: skip
        attach_poses(table, poses)
    with pytest.raises(InputFileError, match=r"poses must be a cryoDRGN \.pkl or an \.npz"):
        attach_poses(table, tmp_path / "poses.txt")
