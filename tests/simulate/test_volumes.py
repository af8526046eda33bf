"""Built-in test volumes and atomic-model density (cryofield.simulate.volumes)."""

from __future__ import annotations

import itertools
import math

import gemmi
import numpy as np
import pytest

from cryofield.errors import CryofieldError, InputFileError
from cryofield.simulate import volumes as V


def _com(vol: np.ndarray) -> np.ndarray:
    """Centre of mass ``[z, y, x]`` in voxel indices."""
    return (np.indices(vol.shape).reshape(3, -1) @ vol.ravel().astype(np.float64)) / vol.sum()


def test_render_gaussians_integral_and_centre() -> None:
    D = 32
    vol = V.render_gaussians(np.array([[0.5, -2.0, 3.0]]), np.array([7.0]), 1.5, D)
    assert vol.sum() == pytest.approx(7.0, rel=1e-4)
    # centre [x, y, z] = (0.5, -2, 3) px from the origin voxel D // 2; com is [z, y, x]
    np.testing.assert_allclose(_com(vol), [D // 2 + 3.0, D // 2 - 2.0, D // 2 + 0.5], atol=1e-3)


def test_protein_like_properties() -> None:
    vol = V.protein_like(64)
    assert vol.shape == (64, 64, 64) and vol.dtype == np.float32
    assert vol.min() >= 0 and vol.max() == pytest.approx(1.0)
    np.testing.assert_allclose(_com(vol), [32, 32, 32], atol=0.05)
    idx = np.argwhere(vol > 0.05)
    diameter = 2 * np.linalg.norm(idx - 32, axis=1).max() / 64
    assert 0.45 < diameter < 0.65
    np.testing.assert_array_equal(vol, V.protein_like(64))  # deterministic
    # the same object at every box size: D=64 smoothed by [1/4, 1/2, 1/4] per axis and
    # sampled at even voxels (the D=32 grid points) matches the D=32 rendering
    smooth = vol.astype(np.float64)
    for axis in range(3):
        smooth = 0.5 * smooth + 0.25 * (np.roll(smooth, 1, axis) + np.roll(smooth, -1, axis))
    small = V.protein_like(32)
    assert np.corrcoef(small.ravel(), smooth[::2, ::2, ::2].ravel())[0, 1] > 0.95
    # not mirror-symmetric: a mirror image differs from the object
    assert np.corrcoef(vol.ravel(), vol[:, :, ::-1].ravel())[0, 1] < 0.5


def test_two_domain_motion_is_continuous() -> None:
    D = 48
    frames = [V.two_domain(D, c) for c in (0.0, 0.25, 0.5, 0.75, 1.0)]
    masses = [f.sum() for f in frames]
    np.testing.assert_allclose(masses, masses[0], rtol=5e-3)  # a rigid motion keeps the mass
    corr = [np.corrcoef(frames[0].ravel(), f.ravel())[0, 1] for f in frames]
    assert all(a > b for a, b in itertools.pairwise(corr))  # drifts away steadily
    assert corr[-1] < 0.85
    with pytest.raises(CryofieldError):
        V.two_domain(D, 1.5)


def test_discrete_states() -> None:
    states = V.discrete_states(32, 4)
    mass = [s.sum() for s in states]
    assert mass[1] == pytest.approx(mass[0], rel=5e-3)  # arm moved
    assert mass[2] < 0.85 * mass[0]  # arm absent
    assert mass[3] > 1.05 * mass[0]  # extra domain
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.corrcoef(states[i].ravel(), states[j].ravel())[0, 1] < 0.97
    with pytest.raises(CryofieldError):
        V.discrete_states(32, 5)


def _write_two_model_pdb(path, dx_A: float) -> None:
    st = gemmi.Structure()
    for k in range(2):
        model = gemmi.Model(str(k + 1))
        chain = gemmi.Chain("A")
        res = gemmi.Residue()
        res.name = "GLY"
        res.seqid = gemmi.SeqId(1, " ")
        for name, el, xyz in (("CA", "C", (10.0, 5.0, -3.0)), ("O", "O", (14.0, 5.0, -3.0))):
            atom = gemmi.Atom()
            atom.name, atom.element = name, gemmi.Element(el)
            atom.pos = gemmi.Position(xyz[0] + k * dx_A, xyz[1], xyz[2])
            atom.occ, atom.b_iso = 1.0, 20.0
            res.add_atom(atom)
        chain.add_residue(res)
        model.add_chain(chain)
        st.add_model(model)
    st.setup_entities()
    st.write_pdb(str(path))


def test_atomic_model_density(tmp_path) -> None:
    pdb = tmp_path / "two.pdb"
    _write_two_model_pdb(pdb, dx_A=6.0)
    apix = 1.5
    frames, D = V.atomic_model_density(pdb, apix, D=32, bfactor_A2=30.0)
    assert len(frames) == 2 and D == 32
    # integral = sum of f_e(0) = sum_i a_i (Peng 1996 coefficients) over the atoms
    fe0 = sum(sum(gemmi.Element(e).c4322.a) for e in ("C", "O"))
    assert frames[0].sum() * apix**3 == pytest.approx(fe0, rel=1e-3)
    # origin: the first model's mean atom position sits at voxel D // 2
    np.testing.assert_allclose(_com(frames[0])[:2], [16, 16], atol=0.05)
    # the second model is the first moved by +6 A along x (last array axis)
    shift = _com(frames[1]) - _com(frames[0])
    np.testing.assert_allclose(shift, [0, 0, 6.0 / apix], atol=0.02)
    # the transform of one atom's density follows f_e(q) exp(-(B/4 + 2 pi^2 s_aa^2) q^2)
    single = tmp_path / "c.pdb"
    st = gemmi.read_structure(str(pdb))
    del st[1]
    del st[0]["A"][0][1]
    st.write_pdb(str(single))
    (vol,), _ = V.atomic_model_density(single, apix, D=32, bfactor_A2=30.0, antialias_px=0.5)
    ft = np.abs(np.fft.fftn(np.fft.ifftshift(vol))) * apix**3
    coef = gemmi.Element("C").c4322
    for i in (2, 4, 6):  # q = i / (D apix) along x
        q = i / (32 * apix)
        fe = sum(a * math.exp(-(b + 30.0) * q * q / 4) for a, b in zip(coef.a, coef.b, strict=True))
        expected = fe * math.exp(-2 * math.pi**2 * (0.5 * apix) ** 2 * q * q)
        assert ft[0, 0, i] == pytest.approx(expected, rel=0.02)


def test_atomic_model_errors(tmp_path) -> None:
    with pytest.raises(InputFileError, match="not found"):
        V.read_atomic_models(tmp_path / "missing.cif")
    bad = tmp_path / "bad.pdb"
    bad.write_text("HELLO\n")
    with pytest.raises(InputFileError):
        V.read_atomic_models(bad)
