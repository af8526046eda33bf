"""cryoSPARC .cs files: CTF equal to the RELION export, poses, paths, lossless write-back."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from cryofield.errors import InputFileError
from cryofield.io.cryosparc import read_cs, write_cs
from cryofield.io.metadata import load_particle_table
from cryofield.io.mrc import write_mrc


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
    arr["blob/path"] = b"a.mrcs"
    with open(tmp_path / "y.cs", "wb") as fh:
        np.save(fh, arr)
    with pytest.raises(
        InputFileError,
        match=r"y\.cs: missing CTF fields ctf/df2_A, ctf/df_angle_rad, ctf/accel_kv, "
        r"ctf/cs_mm, ctf/amp_contrast \(the file has ctf/df1_A\)",
    ):
        load_particle_table(tmp_path / "y.cs")


# --------------------------------------------- pixel size, CTF block, bad fields


_CTF = {"ctf/df1_A": 15000.0, "ctf/df2_A": 14000.0, "ctf/df_angle_rad": 0.5,
        "ctf/accel_kv": 300.0, "ctf/cs_mm": 2.7, "ctf/amp_contrast": 0.1}  # fmt: skip


def _cs(path, n=3, stack="a.mrcs", **fields):
    """A .cs file of ``n`` particles of ``stack`` with the given scalar fields."""
    dtype = [("blob/path", "S16"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,))]
    dtype += [(k, "<f4") for k in fields]
    arr = np.zeros(n, dtype=dtype)
    arr["blob/path"] = stack.encode()
    arr["blob/idx"] = np.arange(n)
    arr["blob/shape"] = 8
    for k, v in fields.items():
        arr[k] = v
    with open(path, "wb") as fh:
        np.save(fh, arr)
    return path


def _messages(caplog, level=logging.INFO) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= level)


def test_pixel_size_from_the_stack_header(tmp_path, io_records):
    write_mrc(tmp_path / "a.mrcs", np.ones((3, 8, 8), np.float32), apix_A=2.5)
    cs = _cs(tmp_path / "no_psize.cs", **_CTF)  # no blob/psize_A: used to be 1 A/px
    t = load_particle_table(cs)
    np.testing.assert_array_equal(t.apix_A, 2.5)
    assert "no blob/psize_A; using the pixel size of the MRC header of" in _messages(io_records)
    assert "2.5 A" in _messages(io_records)


def test_pixel_size_disagreeing_with_the_header_is_warned(tmp_path, io_records):
    write_mrc(tmp_path / "a.mrcs", np.ones((3, 8, 8), np.float32), apix_A=2.5)
    t = load_particle_table(_cs(tmp_path / "close.cs", **{**_CTF, "blob/psize_A": 2.51}))
    assert _messages(io_records, logging.WARNING) == ""  # within 1 %
    np.testing.assert_allclose(t.apix_A, 2.51, rtol=1e-6)
    t = load_particle_table(_cs(tmp_path / "far.cs", **{**_CTF, "blob/psize_A": 2.0}))
    np.testing.assert_array_equal(t.apix_A, 2.0)  # the metadata wins
    assert re.search(r"far\.cs: blob/psize_A says 2 A but the MRC header of .*a\.mrcs says "
                     r"2\.5 A \(25\.0% apart\); using 2 A from blob/psize_A",
                     _messages(io_records, logging.WARNING))  # fmt: skip


def test_no_pixel_size_anywhere_is_an_error(tmp_path):
    cs = _cs(tmp_path / "x.cs", **_CTF)
    with pytest.raises(
        InputFileError,
        match=r"x\.cs: no pixel size: the file has no "
        r"blob/psize_A and its image stacks \(e\.g\. .*a\.mrcs\) are not found",
    ):
        load_particle_table(cs)
    write_mrc(tmp_path / "a.mrcs", np.ones((3, 8, 8), np.float32), apix_A=0.0)
    with pytest.raises(InputFileError, match=r"x\.cs: no pixel size: .* the MRC header of "
                       r".*a\.mrcs has none"):  # fmt: skip
        load_particle_table(cs)


def test_partial_ctf_block_is_an_error(interop_data, tmp_path):
    arr = read_cs(interop_data / "empiar_10076_7.cs")
    keep = [f for f in arr.dtype.names if f not in ("ctf/df1_A", "ctf/accel_kv")]
    with open(tmp_path / "partial.cs", "wb") as fh:
        np.save(fh, arr[keep])
    # used to train without CTF, silently
    with pytest.raises(InputFileError, match=r"partial\.cs: missing CTF fields ctf/df1_A, "
                       r"ctf/accel_kv \(the file has ctf/df2_A, ctf/df_angle_rad, ctf/cs_mm, "
                       r"ctf/amp_contrast\)"):  # fmt: skip
        load_particle_table(tmp_path / "partial.cs")


def test_missing_ctf_block_is_warned(tmp_path, io_records):
    write_mrc(tmp_path / "a.mrcs", np.ones((3, 8, 8), np.float32), apix_A=2.5)
    t = load_particle_table(_cs(tmp_path / "noctf.cs", **{"blob/psize_A": 2.5}))
    assert t.ctf is None
    assert "noctf.cs: no CTF fields (ctf/df1_A, " in _messages(io_records, logging.WARNING)
    assert "used without CTF correction" in _messages(io_records, logging.WARNING)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ctf/accel_kv", 0.0, r"row 2: field ctf/accel_kv must be > 0, got 0"),
        ("ctf/amp_contrast", 7.0, r"row 2: field ctf/amp_contrast must be between 0 and 1"),
        ("blob/psize_A", -1.0, r"row 2: field blob/psize_A must be > 0, got -1"),
        ("ctf/df1_A", np.nan, r"row 2: field ctf/df1_A is not a finite number"),
    ],
)
def test_impossible_values_name_row_and_field(tmp_path, field, value, message):
    fields = {**_CTF, "blob/psize_A": 2.5}
    path = _cs(tmp_path / "v.cs", **fields)
    arr = read_cs(path)
    arr[field][1] = value
    with open(path, "wb") as fh:
        np.save(fh, arr)
    with pytest.raises(InputFileError, match=rf"v\.cs, {message}"):
        load_particle_table(path)


def test_bad_blob_fields_are_refused(tmp_path):
    path = _cs(tmp_path / "b.cs", **{**_CTF, "blob/psize_A": 2.5})
    arr = read_cs(path)
    bad = np.zeros(len(arr), dtype=[(n, "<i8" if n == "blob/idx" else arr.dtype.fields[n][0])
                                    for n in arr.dtype.names])  # fmt: skip
    for n in arr.dtype.names:
        bad[n] = arr[n]
    bad["blob/idx"][2] = -1  # used to read the last image of the stack
    with open(path, "wb") as fh:
        np.save(fh, bad)
    with pytest.raises(InputFileError, match=r"b\.cs, row 3: field blob/idx must be an "
                       r"integer >= 0, got -1"):  # fmt: skip
        load_particle_table(path)
    path.write_bytes(path.read_bytes()[:-7])  # truncated
    with pytest.raises(InputFileError, match=r"b\.cs: not a readable cryoSPARC \.cs file: "
                       r"truncated or not a valid \.npy file \(its header says"):  # fmt: skip
        load_particle_table(path)
