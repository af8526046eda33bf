"""RELION star files: 3.0/3.1/5, optics groups, poses, lossless write-back, bad rows."""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from cryofield.errors import InputFileError
from cryofield.io.metadata import load_particle_table
from cryofield.io.mrc import write_mrc
from cryofield.io.star import (
    has_original_link,
    original_link_columns,
    original_table,
    read_star,
    write_star,
)


def _is_rotation(R: np.ndarray, tol: float = 1e-5) -> bool:
    R = np.asarray(R, dtype=np.float64)
    eye = np.broadcast_to(np.eye(3), R.shape)
    return bool(
        np.abs(R @ np.swapaxes(R, -1, -2) - eye).max() < tol
        and np.abs(np.linalg.det(R) - 1).max() < tol
    )


def test_optics_groups_resolve_per_particle(interop_data):
    path = interop_data / "relion31.6opticsgroups.star"
    t = load_particle_table(path)
    df, optics, _ = read_star(path)
    assert len(t) == 139 and t.n_optics_groups == 6 and t.box_px == 196
    # independent join through rlnOpticsGroup
    by_group = optics.set_index("rlnOpticsGroup")
    g = df["rlnOpticsGroup"].to_numpy()
    np.testing.assert_array_equal(t.apix_A, by_group.loc[g, "rlnImagePixelSize"].to_numpy())
    np.testing.assert_array_equal(t.ctf["cs_mm"], by_group.loc[g, "rlnSphericalAberration"])
    np.testing.assert_array_equal(t.ctf["voltage_kV"], by_group.loc[g, "rlnVoltage"].to_numpy())
    assert set(np.unique(t.apix_A)) == {1.24, 1.25}
    assert set(np.unique(t.ctf["cs_mm"])) == {2.6, 2.7}
    # group 4 (opticsGroup1) is the one with Cs 2.6
    assert np.all(t.ctf["cs_mm"][t.optics_group == 4] == 2.6)
    assert np.all(t.ctf["cs_mm"][t.optics_group != 4] == 2.7)
    np.testing.assert_array_equal(t.ctf["defocus_u_A"], df["rlnDefocusU"].to_numpy())
    assert _is_rotation(t.rotations)
    # origins in A -> px with each particle's own pixel size, sign flipped
    np.testing.assert_allclose(
        t.shifts_px[:, 0], -df["rlnOriginXAngst"].to_numpy() / t.apix_A, rtol=1e-6, atol=1e-6
    )


def test_relion31_and_v2_agree_and_images_load(interop_data):
    a = load_particle_table(interop_data / "relion31.star")
    b = load_particle_table(interop_data / "relion31.v2.star")
    assert len(a) == len(b) == 5 and a.box_px == b.box_px == 256
    np.testing.assert_array_equal(a.apix_A, b.apix_A)
    assert a.apix_A[0] == 2.806
    for k in a.ctf:
        np.testing.assert_array_equal(a.ctf[k], b.ctf[k])
    np.testing.assert_array_equal(a.rotations, b.rotations)
    np.testing.assert_array_equal(a.shifts_px, b.shifts_px)
    np.testing.assert_array_equal(a.image_paths, b.image_paths)
    assert a.image_paths[0].endswith("relion31.mrcs")
    np.testing.assert_array_equal(a.image_index, np.arange(5))


def test_relion5_tolerated(interop_data):
    t = load_particle_table(interop_data / "relion5.star")
    assert len(t) == 17 and t.box_px == 448 and np.all(t.apix_A == 0.89)
    assert np.all(t.ctf["voltage_kV"] == 100.0) and np.all(t.ctf["cs_mm"] == 1.6)
    assert _is_rotation(t.rotations)
    assert {p.rsplit("/", 1)[1] for p in t.image_paths} == {
        "toy_images_a.mrcs",
        "toy_images_b.mrcs",
    }


def test_relion30_pixel_size_from_magnification(interop_data):
    t = load_particle_table(interop_data / "empiar_10076_7.star")
    assert t.source_format == "star" and t.raw_optics is None
    np.testing.assert_allclose(t.apix_A, 5 * 1e4 / 38168)
    assert t.rotations is None and t.shifts_px is None


def test_pfcrt_poses_are_rotations(interop_data):
    t = load_particle_table(interop_data / "FinalRefinement-OriginalParticles-PfCRT.star")
    df, _, _ = read_star(interop_data / "FinalRefinement-OriginalParticles-PfCRT.star")
    assert t.rotations.shape == (5, 3, 3) and _is_rotation(t.rotations)
    # RELION 3.0 origins are in px: shift = -origin
    np.testing.assert_allclose(t.shifts_px[:, 0], -df["rlnOriginX"], atol=1e-6)
    np.testing.assert_allclose(t.shifts_px[:, 1], -df["rlnOriginY"], atol=1e-6)
    # no rlnAmplitudeContrast column: cryoDRGN's default 0.1
    assert np.all(t.ctf["amp_contrast"] == 0.1)


@pytest.mark.parametrize(
    "name",
    [
        "relion31.star",
        "relion31.v2.star",
        "relion5.star",
        "relion31.6opticsgroups.star",
        "empiar_10076_7.star",
        "FinalRefinement-OriginalParticles-PfCRT.star",
    ],
)
def test_write_read_is_lossless(interop_data, tmp_path, name):
    src = load_particle_table(interop_data / name)
    shutil.copy(interop_data / name, tmp_path / name)  # same folder -> same image paths
    out = tmp_path / f"copy_{name}"
    write_star(out, src)
    back = load_particle_table(out)
    df0, opt0, block0 = read_star(interop_data / name)
    df1, opt1, block1 = read_star(out)
    assert block0 == block1
    pd.testing.assert_frame_equal(df0, df1, check_dtype=False)
    if opt0 is None:
        assert opt1 is None
    else:
        pd.testing.assert_frame_equal(opt0, opt1, check_dtype=False)
    np.testing.assert_array_equal(back.apix_A, src.apix_A)
    np.testing.assert_array_equal(back.image_index, src.image_index)
    for k in src.ctf:
        np.testing.assert_array_equal(back.ctf[k], src.ctf[k])
    if src.rotations is not None:
        np.testing.assert_array_equal(back.rotations, src.rotations)
        np.testing.assert_array_equal(back.shifts_px, src.shifts_px)


def test_write_new_poses_roundtrip(interop_data, tmp_path):
    src = load_particle_table(interop_data / "relion31.6opticsgroups.star")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((len(src), 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    from scipy.spatial.transform import Rotation

    R = Rotation.from_quat(q).as_matrix()
    t = rng.uniform(-10, 10, (len(src), 2))
    write_star(
        tmp_path / "p.star",
        src,
        rotations=R,
        shifts_px=t,
        extra_columns={"rlnClassNumber": np.arange(len(src)) % 3 + 1},
    )
    back = load_particle_table(tmp_path / "p.star")
    np.testing.assert_allclose(back.rotations, R, atol=1e-6)
    np.testing.assert_allclose(back.shifts_px, t, atol=1e-5)
    df, _, _ = read_star(tmp_path / "p.star")
    np.testing.assert_array_equal(df["rlnClassNumber"], np.arange(len(src)) % 3 + 1)


def test_subset_write_keeps_optics(interop_data, tmp_path):
    src = load_particle_table(interop_data / "relion31.6opticsgroups.star")
    idx = np.array([138, 0, 50])
    write_star(tmp_path / "s.star", src.subset(idx))
    back = load_particle_table(tmp_path / "s.star")
    np.testing.assert_array_equal(back.apix_A, src.apix_A[idx])
    np.testing.assert_array_equal(back.ctf["cs_mm"], src.ctf["cs_mm"][idx])
    np.testing.assert_allclose(back.rotations, src.rotations[idx])


# ----------------------------------------------------------------------------- bad input
def _write(path, text):
    path.write_text(text)
    return path


def test_missing_ctf_column_names_field(tmp_path):
    p = _write(
        tmp_path / "m.star",
        "data_\nloop_\n_rlnImageName\n_rlnDefocusU\n_rlnDefocusV\n_rlnDefocusAngle\n"
        "_rlnSphericalAberration\n_rlnAmplitudeContrast\n"
        "1@a.mrcs 10000 10000 0 2.7 0.1\n",
    )
    with pytest.raises(InputFileError, match=r"m\.star: missing CTF column rlnVoltage"):
        load_particle_table(p)


def test_bad_value_names_row_and_field(tmp_path):
    p = _write(
        tmp_path / "b.star",
        "data_\nloop_\n_rlnImageName\n_rlnDefocusU\n_rlnDefocusV\n_rlnDefocusAngle\n"
        "_rlnVoltage\n_rlnSphericalAberration\n_rlnAmplitudeContrast\n"
        "1@a.mrcs 10000 10000 0 300 2.7 0.1\n2@a.mrcs nan 10000 0 300 2.7 0.1\n",
    )
    with pytest.raises(InputFileError, match=r"b\.star, row 2: field rlnDefocusU"):
        load_particle_table(p)


def test_unknown_optics_group_and_missing_image_name(tmp_path):
    p = _write(
        tmp_path / "o.star",
        "data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n_rlnImageSize\n1 1.0 64\n\n"
        "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n1@a.mrcs 1\n2@a.mrcs 3\n",
    )
    with pytest.raises(InputFileError, match=r"o\.star, row 2: field rlnOpticsGroup: group 3"):
        load_particle_table(p)
    q = _write(tmp_path / "n.star", "data_\nloop_\n_rlnDefocusU\n1000\n")
    with pytest.raises(InputFileError, match=r"n\.star: missing column rlnImageName"):
        load_particle_table(q)


# ------------------------------------------------------- link to the original particles
def _downsampled_star(table, folder, D: int, name: str = "small"):
    """The star file ``cryofield downsample`` writes (the small stack is not needed here)."""
    folder.mkdir(parents=True, exist_ok=True)
    star = folder / f"{name}.star"
    names = [f"{i + 1:06d}@{name}.mrcs" for i in range(len(table))]
    link = original_link_columns(table, folder)
    write_star(star, table, image_names=names, box_px=D, extra_columns=link)
    return star


@pytest.mark.parametrize(
    ("name", "D"),
    [("relion31.star", 64), ("empiar_10076_7.star", 32), ("relion31.6opticsgroups.star", 98)],
)
def test_original_link_restores_the_original_rows(interop_data, tmp_path, name, D):
    orig = load_particle_table(interop_data / name)
    small = load_particle_table(_downsampled_star(orig, tmp_path, D))
    assert has_original_link(small)
    assert small.box_px in (D, 0)  # 0: a RELION 3.0 file without its (small) stack
    np.testing.assert_allclose(small.apix_A, orig.apix_A * orig.box_px / D, rtol=1e-12)
    assert not has_original_link(orig)  # RELION's own rlnImageOriginalName is not a link
    back = original_table(small, check_files=name != "relion31.6opticsgroups.star")
    assert back.box_px == orig.box_px
    np.testing.assert_array_equal(back.image_paths, orig.image_paths)
    np.testing.assert_array_equal(back.image_index, orig.image_index)
    np.testing.assert_array_equal(back.apix_A, orig.apix_A)  # recorded, not recomputed
    for k in orig.ctf:
        np.testing.assert_array_equal(back.ctf[k], orig.ctf[k])
    if orig.rotations is not None:
        np.testing.assert_allclose(back.shifts_px, orig.shifts_px, rtol=1e-9, atol=1e-9)
    # every original column back, in place, with its value (rlnImageName: now a path)
    assert list(back.raw.columns) == list(orig.raw.columns)
    for col in orig.raw.columns:
        if col == "rlnImageName":
            continue
        a, b = orig.raw[col].to_numpy(), back.raw[col].to_numpy()
        if col == "rlnMagnification":  # RELION 3.0: recomputed from the pixel size
            np.testing.assert_allclose(b.astype(float), a.astype(float), rtol=1e-12)
        else:
            np.testing.assert_array_equal(a.astype(str), b.astype(str), err_msg=col)
    if orig.raw_optics is not None:
        pd.testing.assert_frame_equal(back.raw_optics, orig.raw_optics, check_dtype=False)


def test_original_link_rescales_px_origins_and_follows_chains(interop_data, tmp_path):
    pf = "FinalRefinement-OriginalParticles-PfCRT.star"  # RELION 3.0, origins in px
    orig = load_particle_table(interop_data / pf)
    orig = replace(orig, box_px=200)  # its stacks are not in the fixtures
    small = load_particle_table(_downsampled_star(orig, tmp_path / "a", 100))
    small = replace(small, box_px=100)  # (from the small stack, not written here)
    df_small = small.raw
    np.testing.assert_allclose(df_small["rlnOriginX"], orig.raw["rlnOriginX"] / 2)
    back = original_table(small, check_files=False)
    np.testing.assert_allclose(back.raw["rlnOriginX"], orig.raw["rlnOriginX"], rtol=1e-12)
    np.testing.assert_allclose(back.shifts_px, orig.shifts_px, rtol=1e-9, atol=1e-9)
    # downsampling the downsampled file again still links to the first originals
    rows = np.array([4, 1])
    smaller = load_particle_table(_downsampled_star(small.subset(rows), tmp_path / "b", 50))
    first = original_table(smaller, check_files=False)
    assert first.box_px == 200
    np.testing.assert_array_equal(first.image_paths, orig.image_paths[rows])
    np.testing.assert_array_equal(first.image_index, orig.image_index[rows])
    np.testing.assert_allclose(first.apix_A, orig.apix_A[rows], rtol=1e-12)
    np.testing.assert_allclose(first.shifts_px, orig.shifts_px[rows], rtol=1e-9, atol=1e-9)
    # RELION's own rlnImageOriginalName (particle subtraction) comes back unchanged
    np.testing.assert_array_equal(
        first.raw["rlnImageOriginalName"], orig.raw["rlnImageOriginalName"].to_numpy()[rows]
    )


def test_original_link_errors_name_the_file(interop_data, tmp_path):
    orig = load_particle_table(interop_data / "relion31.star")
    star = _downsampled_star(orig, tmp_path, 64)
    small = load_particle_table(star)
    stack = str(interop_data / "relion31.mrcs")
    cases = {
        "gone.mrcs": ("not found", "--write-downsampled"),
        "box": ("has 256 px images", "says 128 px"),
        "frame": ("names image 9", "has 5 images"),
    }
    for case, expected in cases.items():
        raw = small.raw.copy()
        if case == "gone.mrcs":
            raw["rlnImageOriginalName"] = [f"1@{tmp_path / 'gone.mrcs'}"] * len(raw)
        elif case == "box":
            raw["rlnCryofieldOriginalImageSize"] = 128
        else:
            raw.loc[3, "rlnImageOriginalName"] = f"9@{stack}"
        with pytest.raises(InputFileError) as err:
            original_table(replace(small, raw=raw))
        assert all(e in str(err.value) for e in expected), str(err.value)
        assert str(star) in str(err.value)


def test_different_boxes_across_optics_groups_name_the_groups(interop_data, tmp_path):
    text = (interop_data / "relion31.6opticsgroups.star").read_text()
    lines = text.splitlines()
    # optics group 2: box 128 instead of 196 (the 7th field of its data_optics row)
    row = next(i for i, ln in enumerate(lines) if ln.startswith("2 opticsGroup3"))
    fields = lines[row].split()
    fields[6] = "128"
    lines[row] = " ".join(fields)
    path = tmp_path / "boxes.star"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputFileError) as err:
        load_particle_table(path)
    msg = str(err.value)
    assert "group 1: 196 px" in msg and "group 2: 128 px" in msg, msg


# ------------------------------------------- structure, pixel size and CTF checks
_HEAD = ("data_particles\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n_rlnDefocusV #3\n"
         "_rlnDefocusAngle #4\n_rlnVoltage #5\n_rlnSphericalAberration #6\n"
         "_rlnAmplitudeContrast #7\n")  # fmt: skip
_ROWS = "1@a.mrcs 10000 9000 10 300 2.7 0.1\n2@a.mrcs 11000 9500 20 300 2.7 0.1\n"


def _messages(caplog, level=logging.INFO) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= level)


def test_missing_column_label_is_not_read_under_wrong_columns(tmp_path):
    # one label deleted: the values of each row no longer match the columns
    text = (_HEAD + _ROWS).replace("_rlnDefocusV #3\n", "")
    p = _write(tmp_path / "d.star", text)
    with pytest.raises(
        InputFileError,
        match=r"d\.star, row 1: line 9 has 7 values but "
        r"data_particles has 6 columns \(_rlnImageName \.\. _rlnAmplitudeContrast\)",
    ):
        load_particle_table(p)
    p = _write(tmp_path / "e.star", _HEAD + _ROWS + "3@a.mrcs 12000 9000 10 300 2.7 0.1 5\n")
    with pytest.raises(InputFileError, match=r"e\.star, row 3: line 12 has 8 values"):
        load_particle_table(p)


def test_repeated_block_or_column_is_refused(tmp_path):
    p = _write(tmp_path / "b.star", _HEAD + _ROWS + "\n" + _HEAD + _ROWS)
    with pytest.raises(InputFileError, match=r"b\.star: line 13: block data_particles appears "
                       "twice"):  # fmt: skip
        load_particle_table(p)
    text = (_HEAD + _ROWS).replace("_rlnVoltage #5\n", "_rlnDefocusU #5\n")
    with pytest.raises(InputFileError, match=r"c\.star: line 7: column _rlnDefocusU appears "
                       "twice in data_particles"):  # fmt: skip
        load_particle_table(_write(tmp_path / "c.star", text))


def test_pixel_size_from_the_stack_header(tmp_path, io_records):
    write_mrc(tmp_path / "a.mrcs", np.ones((2, 8, 8), np.float32), apix_A=3.0)
    t = load_particle_table(_write(tmp_path / "p.star", _HEAD + _ROWS))
    np.testing.assert_array_equal(t.apix_A, 3.0)
    assert t.box_px == 8
    assert "p.star: no rlnImagePixelSize (or rlnDetectorPixelSize and rlnMagnification); " \
        "using the pixel size of the MRC header of" in _messages(io_records)  # fmt: skip
    text = _HEAD + "_rlnImagePixelSize #8\n" + _ROWS.replace("0.1\n", "0.1 2.0\n")
    t = load_particle_table(_write(tmp_path / "q.star", text))
    np.testing.assert_array_equal(t.apix_A, 2.0)
    assert re.search(
        r"q\.star: rlnImagePixelSize says 2 A but the MRC header of .*a\.mrcs says "
        r"3 A \(50\.0% apart\); using 2 A",
        _messages(io_records, logging.WARNING),
    )


def test_no_pixel_size_anywhere_is_an_error(tmp_path):
    # used to assume 1 A/px with a warning
    p = _write(tmp_path / "p.star", _HEAD + _ROWS)
    with pytest.raises(
        InputFileError,
        match=r"p\.star: no pixel size: the file has no "
        r"rlnImagePixelSize \(or rlnDetectorPixelSize and rlnMagnification\) and "
        r"its image stacks \(e\.g\. .*a\.mrcs\) are not found \(use --datadir\)",
    ):
        load_particle_table(p)


def test_ctf_block_partial_or_missing(tmp_path, io_records):
    write_mrc(tmp_path / "a.mrcs", np.ones((2, 8, 8), np.float32), apix_A=3.0)
    text = "data_\nloop_\n_rlnImageName\n_rlnDefocusAngle\n1@a.mrcs 10\n2@a.mrcs 20\n"
    with pytest.raises(InputFileError, match=r"a1\.star: missing CTF columns rlnDefocusU, "
                       r"rlnDefocusV, rlnVoltage, rlnSphericalAberration \(the file has "
                       r"rlnDefocusAngle\)"):  # fmt: skip
        load_particle_table(_write(tmp_path / "a1.star", text))
    t = load_particle_table(_write(tmp_path / "a2.star", "data_\nloop_\n_rlnImageName\n1@a.mrcs\n"))
    assert t.ctf is None
    assert "a2.star: no CTF columns (rlnDefocusU, rlnDefocusV, rlnDefocusAngle): the images " \
        "will be used without CTF correction" in _messages(io_records, logging.WARNING)  # fmt: skip


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("_rlnVoltage", "0", r"row 2: field rlnVoltage must be > 0, got 0"),
        ("_rlnAmplitudeContrast", "10", r"row 2: field rlnAmplitudeContrast must be between 0 "),
        ("_rlnImagePixelSize", "-1", r"row 2: field rlnImagePixelSize must be > 0, got -1"),
        ("_rlnOpticsGroup", "1.5", r"row 2: field rlnOpticsGroup must be a whole number"),
        ("_rlnImageSize", "0", r"row 2: field rlnImageSize must be a whole number >= 1"),
    ],
)
def test_impossible_values_name_row_and_field(tmp_path, column, value, message):
    labels = _HEAD + "_rlnImagePixelSize #8\n_rlnOpticsGroup #9\n_rlnImageSize #10\n"
    rows = [[*r.split(), "2.0", "1", "8"] for r in _ROWS.splitlines()]
    k = [ln.split()[0] for ln in labels.splitlines() if ln.startswith("_")].index(column)
    rows[1][k] = value
    p = _write(tmp_path / "v.star", labels + "".join(" ".join(r) + "\n" for r in rows))
    with pytest.raises(InputFileError, match=rf"v\.star, {message}"):
        load_particle_table(p)


def test_stale_lines_are_never_reused(tmp_path):
    # starfile reads through linecache; a failed read must not leave old lines behind
    p = _write(tmp_path / "s.star", _HEAD + "1@a.mrcs 1 2 3\n")
    with pytest.raises(InputFileError):
        load_particle_table(p)
    p.write_text(_HEAD.replace("_rlnDefocusU #2\n", "") + "1@a.mrcs 9000 10 300 2.7 0.1 \n")
    with pytest.raises(InputFileError, match="missing CTF column rlnDefocusU"):
        load_particle_table(p)
