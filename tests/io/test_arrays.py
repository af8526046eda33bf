"""Numpy files (.npy/.npz): damaged files are refused with one line, never a traceback."""

from __future__ import annotations

import logging
import zipfile

import numpy as np
import pytest

from cryofield.errors import InputFileError
from cryofield.io.arrays import load_npy, load_npz
from cryofield.io.metadata import ParticleTable, load_particle_table
from cryofield.io.mrc import write_mrc


def _table(tmp_path) -> ParticleTable:
    stack = write_mrc(tmp_path / "a.mrcs", np.zeros((4, 8, 8), np.float32), 2.0)
    return load_particle_table(stack)


def test_load_npz_reads_every_array_and_checks_keys(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.arange(3), b=np.eye(2))
    d = load_npz(tmp_path / "x.npz", ("a",))
    np.testing.assert_array_equal(d["a"], np.arange(3))
    np.savez_compressed(tmp_path / "c.npz", a=np.arange(3))
    np.testing.assert_array_equal(load_npz(tmp_path / "c.npz")["a"], np.arange(3))
    with pytest.raises(InputFileError, match=r"x\.npz: not a poses file: missing array "
                       r"'rotations' \(it has: a, b\); run it again"):  # fmt: skip
        load_npz(tmp_path / "x.npz", ("rotations",), "poses file", "run it again")


@pytest.mark.parametrize("cut", [1, 100, 400])
def test_truncated_npz(tmp_path, cut):
    np.savez(tmp_path / "x.npz", a=np.arange(100))
    raw = (tmp_path / "x.npz").read_bytes()
    (tmp_path / "x.npz").write_bytes(raw[:-cut])
    # used to raise zipfile.BadZipFile / EOFError / ValueError
    with pytest.raises(InputFileError, match=r"x\.npz: not a readable poses file: truncated "
                       r"or not a valid \.npz file \(.*\); re-create it"):  # fmt: skip
        load_npz(tmp_path / "x.npz", what="poses file", remedy="re-create it")


def test_corrupt_npz_data_and_lying_headers(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.arange(100, dtype=np.float64))
    raw = bytearray((tmp_path / "x.npz").read_bytes())
    raw[400] ^= 0xFF  # inside the data: the CRC no longer matches
    (tmp_path / "x.npz").write_bytes(bytes(raw))
    with pytest.raises(InputFileError, match=r"truncated or not a valid \.npz file "
                       r"\(BadZipFile: Bad CRC-32"):  # fmt: skip
        load_npz(tmp_path / "x.npz")
    # a member whose .npy header claims more data than it holds
    with zipfile.ZipFile(tmp_path / "y.npz", "w") as zf:
        header = np.lib.format.header_data_from_array_1_0(np.zeros(10**9))
        import io

        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, header)
        zf.writestr("a.npy", buf.getvalue() + b"\0" * 80)
    with pytest.raises(InputFileError, match=r"array 'a': its header says a 1000000000 array "
                       r"of <f8"):  # fmt: skip
        load_npz(tmp_path / "y.npz")
    np.savez(tmp_path / "o.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(InputFileError, match=r"o\.npz: .*Python objects \(pickles\)"):
        load_npz(tmp_path / "o.npz")


def test_load_npy(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(5))
    np.testing.assert_array_equal(load_npy(tmp_path / "a.npy"), np.arange(5))
    (tmp_path / "b.npy").write_bytes((tmp_path / "a.npy").read_bytes() + b"junk")
    with pytest.raises(InputFileError, match=r"b\.npy: not a readable \.npy array: truncated "
                       r"or not a valid \.npy file \(.* 4 extra\)"):  # fmt: skip
        load_npy(tmp_path / "b.npy")


def test_truncated_particle_table(tmp_path):
    t = _table(tmp_path)
    path = t.save_npz(tmp_path / "particles.npz")
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(InputFileError, match=r"particles\.npz: not a readable cryofield particle "
                       r"table: truncated or not a valid \.npz file \(.*\); re-create it with "
                       r"'cryofield parse'"):  # fmt: skip
        load_particle_table(path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("apix_A", -np.ones(4), r"row 1: field apix_A must be > 0, got -1"),
        ("image_index", np.arange(4) - 1, r"row 1: field image_index must be >= 0"),
        ("image_index", np.arange(4.0), r"array 'image_index' has dtype float64, expected integer"),
        ("rotations", np.full((4, 3, 3), 2.0), r"row 1: field rotations is not a rotation"),
        ("shifts_px", np.full((4, 2), np.nan), r"row 1: array 'shifts_px' is not a finite number"),
        ("optics_group", np.zeros(3, np.int64), r"array 'optics_group' has shape \(3,\), expected "
                                                r"\(4\)"),
        ("format_version", np.array(99), r"particle table format 99 is not supported"),
        ("source_format", np.array("zip"), r"array 'source_format' is 'zip', expected one of"),
    ],
)  # fmt: skip
def test_tampered_particle_table(tmp_path, key, value, message):
    path = _table(tmp_path).save_npz(tmp_path / "t.npz")
    with np.load(path) as z:
        d = {k: z[k] for k in z.files}
    d[key] = value
    np.savez(path, **d)
    with pytest.raises(InputFileError, match=rf"t\.npz(: |, ){message}"):
        load_particle_table(path)


def test_analysis_readers_refuse_or_skip_corrupt_files(tmp_path, caplog):
    from cryofield.analysis.evaluate import load_truth
    from cryofield.analysis.junk import load_residuals

    np.savez(tmp_path / "truth.npz", rotations=np.eye(3)[None])
    (tmp_path / "truth.npz").write_bytes((tmp_path / "truth.npz").read_bytes()[:-30])
    with pytest.raises(InputFileError, match=r"truth\.npz: not a readable simulation truth "
                       r"file: truncated or not a valid \.npz file"):  # fmt: skip
        load_truth(tmp_path / "truth.npz")
    np.savez(tmp_path / "residuals.npz", residual=np.ones(5))
    (tmp_path / "residuals.npz").write_bytes(b"PK\x03\x04garbage")  # used to raise BadZipFile
    logger = logging.getLogger("cryofield.analysis.junk")
    logger.addHandler(caplog.handler)
    try:
        assert load_residuals(tmp_path, 5) is None
    finally:
        logger.removeHandler(caplog.handler)
    assert "junk without residuals" in caplog.text
