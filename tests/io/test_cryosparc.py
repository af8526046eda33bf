"""cryoSPARC .cs files: CTF equal to the RELION export, poses, paths, lossless write-back."""

from __future__ import annotations

import numpy as np
import pytest

from cryofield.errors import InputFileError
from cryofield.io.cryosparc import read_cs, write_cs
from cryofield.io.metadata import load_particle_table


def test_empiar_star_and_cs_give_same_ctf(interop_data):
    s = load_particle_table(interop_data / "empiar_10076_7.star")
    c = load_particle_table(interop_data / "empiar_10076_7.cs")
    assert len(s) == len(c) == 7 and s.box_px == c.box_px == 320
    for key in s.ctf:  # .cs stores float32; star has the decimal values
        np.testing.assert_allclose(c.ctf[key], s.ctf[key], rtol=1e-6, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(c.apix_A, s.apix_A, rtol=1e-6)
    np.testing.assert_array_equal(c.image_paths, s.image_paths)
    np.testing.assert_array_equal(c.image_index, s.image_index)


def test_cs_poses_are_rotations_and_paths(interop_data):
    t = load_particle_table(interop_data / "cryosparc_P12_J24_001_particles.cs")
    raw = read_cs(interop_data / "cryosparc_P12_J24_001_particles.cs")
    R = t.rotations.astype(np.float64)
    assert R.shape == (2019, 3, 3)
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape),
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(np.linalg.det(R), 1, atol=1e-5)
    np.testing.assert_allclose(t.shifts_px, -raw["alignments3D/shift"], atol=1e-6)
    assert t.box_px == 180 and np.allclose(t.apix_A, 2.95)
    assert t.image_paths[0].endswith(
        "J19/extract/20150917_05196_DNA-TET-25k-DE20_raw.region_000.sum-all_003-072_particles.mrc"
    )
    e = load_particle_table(interop_data / "cryosparc_J2_particles_exported.cs")
    # '>' import marker stripped; only 2-D alignments -> no 3-D poses
    assert e.image_paths[0].endswith("/J1/imported/000090334788266266069_18jam15b_0345_ali_DW.mrcs")
    assert ">" not in e.image_paths[0] and e.rotations is None


def test_datadir_resolves_relative_paths(interop_data, tmp_path):
    t = load_particle_table(interop_data / "cryosparc_J2_particles_exported.cs", datadir=tmp_path)
    assert t.image_paths[0] == str(
        tmp_path / "J1/imported/000090334788266266069_18jam15b_0345_ali_DW.mrcs"
    )
    # found by file name in datadir
    (tmp_path / "000090334788266266069_18jam15b_0345_ali_DW.mrcs").write_bytes(b"")
    t = load_particle_table(interop_data / "cryosparc_J2_particles_exported.cs", datadir=tmp_path)
    assert t.image_paths[0] == str(tmp_path / "000090334788266266069_18jam15b_0345_ali_DW.mrcs")


def test_write_cs_keeps_every_field(interop_data, tmp_path):
    src = load_particle_table(interop_data / "cryosparc_P12_J24_001_particles.cs")
    raw = read_cs(interop_data / "cryosparc_P12_J24_001_particles.cs")
    out = write_cs(tmp_path / "out.cs", src)
    assert out.exists() and not (tmp_path / "out.cs.npy").exists()
    back = np.load(out, allow_pickle=False)
    assert back.dtype == raw.dtype
    np.testing.assert_array_equal(back, raw)
    idx = np.array([5, 3, 2000])
    sub = src.subset(idx)
    R, t = sub.rotations[::-1].copy(), np.array([[1.5, -2.0], [0.0, 3.0], [-4.0, 0.25]])
    write_cs(tmp_path / "sub.cs", sub, rotations=R, shifts_px=t)
    back = load_particle_table(tmp_path / "sub.cs")
    np.testing.assert_allclose(back.rotations, R, atol=1e-6)
    np.testing.assert_allclose(back.shifts_px, t, atol=1e-6)
    np.testing.assert_array_equal(read_cs(tmp_path / "sub.cs")["uid"], raw["uid"][idx])


def test_write_cs_from_star_table(interop_data, tmp_path):
    s = load_particle_table(interop_data / "relion31.6opticsgroups.star")
    write_cs(tmp_path / "from_star.cs", s)
    c = load_particle_table(tmp_path / "from_star.cs")
    np.testing.assert_allclose(c.ctf["defocus_u_A"], s.ctf["defocus_u_A"], rtol=1e-6)
    np.testing.assert_allclose(c.ctf["astig_angle_deg"], s.ctf["astig_angle_deg"], atol=1e-4)
    np.testing.assert_allclose(c.apix_A, s.apix_A, rtol=1e-6)
    np.testing.assert_allclose(c.rotations, s.rotations, atol=1e-5)
    np.testing.assert_allclose(c.shifts_px, s.shifts_px, atol=1e-4)


def test_bad_cs_files(tmp_path):
    p = tmp_path / "x.cs"
    p.write_text("not numpy")
    with pytest.raises(InputFileError, match=r"x\.cs: not a readable cryoSPARC"):
        load_particle_table(p)
    arr = np.zeros(3, dtype=[("blob/path", "S8"), ("blob/idx", "<u4"), ("ctf/df1_A", "<f4")])
    with open(tmp_path / "y.cs", "wb") as fh:
        np.save(fh, arr)
    with pytest.raises(InputFileError, match=r"y\.cs: missing CTF field ctf/df2_A"):
        load_particle_table(tmp_path / "y.cs")
