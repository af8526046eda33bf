"""ParticleTable: npz round trip with lossless write-back, index filters, stack lists."""

from __future__ import annotations

import logging
import pickle
import shutil

import numpy as np
import pandas as pd
import pytest

from cryofield.errors import InputFileError
from cryofield.io.cryosparc import read_cs, write_cs
from cryofield.io.metadata import (
    ParticleTable,
    common_pixel_size,
    ignored_optics,
    load_particle_table,
)
from cryofield.io.mrc import write_mrc
from cryofield.io.star import read_star, write_star


def _assert_tables_equal(a: ParticleTable, b: ParticleTable) -> None:
    np.testing.assert_array_equal(a.image_paths, b.image_paths)
    np.testing.assert_array_equal(a.image_index, b.image_index)
    np.testing.assert_array_equal(a.apix_A, b.apix_A)
    np.testing.assert_array_equal(a.optics_group, b.optics_group)
    assert a.box_px == b.box_px and a.source_format == b.source_format
    assert (a.ctf is None) == (b.ctf is None)
    for k in a.ctf or {}:
        np.testing.assert_array_equal(a.ctf[k], b.ctf[k])
    for name in ("rotations", "shifts_px"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "name", ["relion31.6opticsgroups.star", "empiar_10076_7.star", "relion5.star"]
)
def test_npz_roundtrip_keeps_star_columns(interop_data, tmp_path, name):
    t = load_particle_table(interop_data / name)
    t.save_npz(tmp_path / "t.npz")
    z = np.load(tmp_path / "t.npz", allow_pickle=False)  # no object arrays anywhere
    z.close()
    back = load_particle_table(tmp_path / "t.npz")
    _assert_tables_equal(t, back)
    write_star(tmp_path / "a.star", t)
    write_star(tmp_path / "b.star", back)
    assert (tmp_path / "a.star").read_text().split("\n")[1:] == (
        tmp_path / "b.star"
    ).read_text().split("\n")[1:]
    df0, opt0, _ = read_star(interop_data / name)
    df1, opt1, _ = read_star(tmp_path / "b.star")
    pd.testing.assert_frame_equal(df0, df1, check_dtype=False)
    assert (opt0 is None and opt1 is None) or opt0.equals(opt1)


def test_npz_roundtrip_keeps_cs_array(interop_data, tmp_path):
    t = load_particle_table(interop_data / "cryosparc_P12_J24_001_particles.cs", ind=[3, 1, 4])
    t.save_npz(tmp_path / "t.npz")
    back = load_particle_table(tmp_path / "t.npz")
    _assert_tables_equal(t, back)
    np.testing.assert_array_equal(back.source_index, [3, 1, 4])
    write_cs(tmp_path / "b.cs", back)
    raw = read_cs(interop_data / "cryosparc_P12_J24_001_particles.cs")
    np.testing.assert_array_equal(read_cs(tmp_path / "b.cs"), raw[[3, 1, 4]])


def test_index_filters(interop_data, tmp_path):
    path = interop_data / "toy_projections.star"
    ind = np.array([10, 3, 999])
    np.save(tmp_path / "i.npy", ind)
    (tmp_path / "i.txt").write_text("10\n3\n999\n")
    (tmp_path / "i.pkl").write_bytes(pickle.dumps(ind))
    full = load_particle_table(path)
    for f in ("i.npy", "i.txt", "i.pkl"):
        t = load_particle_table(path, ind=tmp_path / f)
        np.testing.assert_array_equal(t.image_index, full.image_index[ind])
        np.testing.assert_array_equal(t.source_index, ind)
    np.save(tmp_path / "bad.npy", np.array([0, 1000]))
    with pytest.raises(InputFileError, match=r"bad\.npy: index 1000 \(entry 1\) out of range "
                       r"for the 1000 particles of .*toy_projections\.star"):  # fmt: skip
        load_particle_table(path, ind=tmp_path / "bad.npy")
    (tmp_path / "bad.txt").write_text("1\nfoo\n")
    with pytest.raises(InputFileError, match=r"bad\.txt: not a list of particle indices"):
        load_particle_table(path, ind=tmp_path / "bad.txt")


def test_mismatched_counts_in_table():
    with pytest.raises(InputFileError, match=r"x\.star: mismatched particle counts: ctf"):
        ParticleTable(
            image_paths=np.array(["a", "b"]), image_index=np.arange(2), apix_A=np.ones(2),
            box_px=8, ctf={k: np.ones(3) for k in
                           ("defocus_u_A", "defocus_v_A", "astig_angle_deg", "voltage_kV",
                            "cs_mm", "amp_contrast", "phase_shift_deg", "bfactor_A2")},
            rotations=None, shifts_px=None, optics_group=np.zeros(2), source_path="x.star",
            source_format="star",
        )  # fmt: skip


def test_txt_list_of_stacks(tmp_path):
    write_mrc(tmp_path / "a.mrcs", np.zeros((3, 8, 8), np.float32), 1.5)
    write_mrc(tmp_path / "b.mrcs", np.ones((2, 8, 8), np.float32), 1.5)
    (tmp_path / "l.txt").write_text("a.mrcs\nb.mrcs\n")
    t = load_particle_table(tmp_path / "l.txt")
    assert len(t) == 5 and t.box_px == 8 and np.all(t.apix_A == 1.5)
    np.testing.assert_array_equal(t.image_index, [0, 1, 2, 0, 1])
    (tmp_path / "m.txt").write_text("a.mrcs\nmissing.mrcs\n")
    with pytest.raises(InputFileError, match=r"m\.txt, row 2: stack 'missing\.mrcs' not found"):
        load_particle_table(tmp_path / "m.txt")
    with pytest.raises(InputFileError, match=r"unknown particle file type '\.xyz'"):
        (tmp_path / "p.xyz").write_text("")
        load_particle_table(tmp_path / "p.xyz")


# ------------------------------------------------------------- optics checks
@pytest.fixture
def io_log(caplog):
    """Records of the ``cryofield.io`` logger (which does not propagate after set-up)."""
    logger = logging.getLogger("cryofield.io")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.WARNING)
    yield caplog
    logger.removeHandler(caplog.handler)


def _ignored_warnings(caplog) -> list[str]:
    records = {id(r): r for r in caplog.records}.values()  # a record may reach caplog twice
    return [r.getMessage() for r in records if "which cryofield ignores" in r.getMessage()]


def test_ignored_optics_are_named_once(interop_data, tmp_path, io_log):
    path = tmp_path / "six.star"
    shutil.copy(interop_data / "relion31.6opticsgroups.star", path)
    load_particle_table(path)
    load_particle_table(path, ind=np.arange(3))  # the same file again: no second warning
    (msg,) = _ignored_warnings(io_log)
    for col in ("rlnBeamTiltX", "rlnBeamTiltY", "rlnMagMat00", "rlnMagMat01", "rlnOddZernike",
                "rlnEvenZernike"):  # fmt: skip
        assert col in msg, msg
    assert "beam tilt" in msg and "anisotropic magnification" in msg
    assert "rlnCtfDataAreCtfPremultiplied" not in msg  # present but 0
    # the table saved by 'parse' (same rows, read from .npz) gives the same list
    assert ignored_optics(ParticleTable.load_npz(load_particle_table(path).save_npz(
        tmp_path / "six.npz"))) == ignored_optics(load_particle_table(path))  # fmt: skip


def test_ignored_optics_flags_and_cryosparc_fields(interop_data, tmp_path, io_log):
    # files without such optics (all-zero cryoSPARC fields) do not warn
    for name in ("empiar_10076_7.cs", "empiar_10076_7.star", "relion31.star"):
        shutil.copy(interop_data / name, tmp_path / name)
        load_particle_table(tmp_path / name)
    assert _ignored_warnings(io_log) == []
    arr = read_cs(interop_data / "empiar_10076_7.cs")
    arr["ctf/tilt_A"][:, 0] = 0.3
    arr["ctf/anisomag"][:, 0] = 0.01
    with open(tmp_path / "tilted.cs", "wb") as fh:
        np.save(fh, arr)
    load_particle_table(tmp_path / "tilted.cs")
    (msg,) = _ignored_warnings(io_log)
    assert "beam tilt (ctf/tilt_A)" in msg and "anisotropic magnification (ctf/anisomag)" in msg
    text = (interop_data / "relion31.star").read_text()
    text = text.replace(
        "_rlnImageDimensionality #9 ",
        "_rlnImageDimensionality #9 \n"
        "_rlnCtfDataAreCtfPremultiplied #10 \n_rlnCtfDataArePhaseFlipped #11 ",
    )
    text = text.replace("          256            2 ", "          256            2 1 1")
    (tmp_path / "premultiplied.star").write_text(text)
    t = load_particle_table(tmp_path / "premultiplied.star")
    assert t.raw_optics["rlnCtfDataAreCtfPremultiplied"].tolist() == [1]
    msg = _ignored_warnings(io_log)[-1]
    assert "CTF-premultiplied images (rlnCtfDataAreCtfPremultiplied)" in msg, msg
    assert "phase-flipped images (rlnCtfDataArePhaseFlipped)" in msg, msg


def test_several_pixel_sizes_are_refused_naming_the_groups(interop_data):
    t = load_particle_table(interop_data / "relion31.6opticsgroups.star")
    with pytest.raises(InputFileError) as err:
        common_pixel_size(t.apix_A, t.optics_group, t.source_path)
    msg = str(err.value)
    assert "group 1: 1.25 A" in msg and "group 2: 1.24 A" in msg, msg
    assert "relion31.6opticsgroups.star" in msg and "--ind" in msg
    one = t.subset(np.flatnonzero(t.optics_group == 2))
    assert common_pixel_size(one.apix_A, one.optics_group, one.source_path) == 1.24
    assert common_pixel_size(np.array([2.0, 2.0 * (1 + 1e-6)]), None, "x") == 2.0
