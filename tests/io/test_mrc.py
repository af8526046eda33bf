"""MRC reading/writing: modes, pixel size, chunked writer, truncated and non-MRC files."""

from __future__ import annotations

import io
import struct

import mrcfile
import numpy as np
import pytest

from cryofield.errors import InputFileError
from cryofield.io.metadata import load_particle_table
from cryofield.io.mrc import MRCStackWriter, is_volume, read_mrc, read_mrc_header, write_mrc


@pytest.mark.parametrize(
    "dtype", [np.int8, np.int16, np.float32, np.uint16, np.float16], ids=lambda d: d.__name__
)
def test_read_modes_and_voxel_size(tmp_path, dtype):
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((3, 8, 8)) * 20).astype(dtype)
    path = tmp_path / "x.mrcs"
    with mrcfile.new(path) as m:
        m.set_data(data)
        m.set_image_stack()
        m.voxel_size = 2.5
    arr, info = read_mrc(path)
    assert isinstance(arr, np.memmap)
    assert arr.shape == (3, 8, 8) and info.is_stack
    assert info.apix_A == pytest.approx(2.5)
    np.testing.assert_array_equal(np.asarray(arr), data)
    arr32, _ = read_mrc(path, mmap=False)
    assert arr32.dtype == np.float32
    np.testing.assert_array_equal(arr32, data.astype(np.float32))


def test_write_mrc_roundtrip_is_valid_mrc2014(tmp_path):
    data = np.random.default_rng(1).standard_normal((4, 16, 16)).astype(np.float32)
    path = write_mrc(tmp_path / "s.mrcs", data, apix_A=1.75)
    assert mrcfile.validate(str(path), print_file=io.StringIO())
    with mrcfile.open(path, permissive=False) as m:
        np.testing.assert_array_equal(m.data, data)
        assert float(m.voxel_size.x) == pytest.approx(1.75)
        assert m.is_image_stack()
        assert float(m.header.dmean) == pytest.approx(float(data.mean()), abs=1e-5)
        assert float(m.header.rms) == pytest.approx(float(data.std()), rel=1e-4)
    vol = np.random.default_rng(2).standard_normal((8, 8, 8)).astype(np.float32)
    write_mrc(tmp_path / "v.mrc", vol, 3.0)
    with mrcfile.open(tmp_path / "v.mrc") as m:
        assert m.is_volume() and float(m.voxel_size.z) == pytest.approx(3.0)
        np.testing.assert_array_equal(m.data, vol)


def test_stack_writer_chunks_equal_one_shot(tmp_path):
    data = np.random.default_rng(3).standard_normal((10, 12, 12)).astype(np.float32)
    with MRCStackWriter(tmp_path / "c.mrcs", 12, 4.0) as w:
        for start in range(0, 10, 3):
            w.write(data[start : start + 3])
    arr, info = read_mrc(tmp_path / "c.mrcs")
    assert info.shape == (10, 12, 12) and info.apix_A == pytest.approx(4.0)
    np.testing.assert_array_equal(np.asarray(arr), data)


def test_stack_writer_is_atomic_on_error(tmp_path):
    out = tmp_path / "a.mrcs"
    with pytest.raises(RuntimeError), MRCStackWriter(out, 4, 1.0) as w:
        w.write(np.zeros((2, 4, 4)))
        raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="does not match"), MRCStackWriter(out, 4, 1.0) as w:
        w.write(np.zeros((1, 5, 5)))
    assert not out.exists()


def test_truncated_file_names_file(tmp_path):
    path = write_mrc(tmp_path / "t.mrcs", np.ones((5, 16, 16), np.float32), 1.0)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(InputFileError, match=r"t\.mrcs: .*truncated"):
        read_mrc_header(path)


def test_non_mrc_file_names_file(tmp_path):
    path = tmp_path / "notes.mrcs"
    path.write_text("this is not an MRC file\n" * 100)
    with pytest.raises(InputFileError, match=r"notes\.mrcs: not a readable MRC file"):
        read_mrc(path)
    with pytest.raises(InputFileError, match="file not found"):
        read_mrc(tmp_path / "missing.mrcs")


def test_interop_stack_without_map_id_is_read(interop_data):
    # toy_projections.mrcs was written without the 'MAP ' ID; its header is otherwise fine
    arr, info = read_mrc(interop_data / "toy_projections.mrcs")
    assert info.shape == (1000, 30, 30)
    assert np.isfinite(np.asarray(arr[:10])).all()


# ------------------------------------------------- header versus file size
def _set_int(path, offset: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 4] = struct.pack("<i", value)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(("mode", "name"), [(1, "int16"), (0, "int8"), (12, "float16")])
def test_mode_edited_in_the_header_is_refused(tmp_path, mode, name):
    # a float32 stack whose header says another mode used to be read as other numbers
    path = write_mrc(tmp_path / "s.mrcs", np.ones((4, 8, 8), np.float32), 1.0)
    _set_int(path, 12, mode)  # MODE
    size = 1024 + 4 * 8 * 8 * np.dtype(name).itemsize
    with pytest.raises(
        InputFileError,
        match=rf"s\.mrcs: wrong MRC header: its header says mode {mode} \({name}\), "
        rf"4 x 8 x 8 \(nz x ny x nx\) after 1024 \+ 0 header bytes = {size} bytes, but "
        r"the file has 2048 bytes \(\d+ more, [\d.]+ more sections\): the header's mode or "
        r"shape does not describe the data",
    ):
        read_mrc(path)


def test_header_hiding_images_or_truncated_file_is_refused(tmp_path):
    path = write_mrc(tmp_path / "s.mrcs", np.ones((4, 8, 8), np.float32), 1.0)
    _set_int(path, 8, 2)  # NZ: 2 of the 4 images
    with pytest.raises(InputFileError, match=r"wrong MRC header: .*\(512 more, 2 more sections\)"):
        read_mrc_header(path)
    _set_int(path, 8, 5)
    with pytest.raises(
        InputFileError, match=r"truncated MRC file or wrong header: .* = 2304 bytes, but the "
        r"file has 2048 bytes \(256 missing\)",
    ):  # fmt: skip
        read_mrc_header(path)


def test_a_few_trailing_bytes_are_tolerated(tmp_path):
    data = np.random.default_rng(0).standard_normal((3, 8, 8)).astype(np.float32)
    path = write_mrc(tmp_path / "s.mrcs", data, 1.0)
    path.write_bytes(path.read_bytes() + b"\0" * 10)  # less than one 256-byte section
    np.testing.assert_array_equal(read_mrc(path, mmap=False)[0], data)


def test_unusable_header_pixel_size_is_unset(tmp_path):
    path = write_mrc(tmp_path / "s.mrcs", np.ones((2, 8, 8), np.float32), 1.0)
    for cell in (np.nan, np.inf, -3.0, 1e30):
        raw = bytearray(path.read_bytes())
        raw[40:44] = struct.pack("<f", cell)  # cella.x
        path.write_bytes(bytes(raw))
        assert read_mrc_header(path).apix_A == 0.0


# -------------------------------------------------------- stack or volume
def test_volume_or_stack(tmp_path):
    cube = np.zeros((8, 8, 8), np.float32)
    vol = write_mrc(tmp_path / "v.mrc", cube, 2.0)  # ISPG 1
    stack = write_mrc(tmp_path / "s.mrcs", cube, 2.0)  # ISPG 0
    as_mrc = write_mrc(tmp_path / "s.mrc", cube, 2.0, is_stack=True)  # ISPG 0, .mrc
    named_mrcs = write_mrc(tmp_path / "v.mrcs", cube, 2.0, is_stack=False)  # ISPG 1, .mrcs
    flat = write_mrc(tmp_path / "f.mrc", np.zeros((3, 8, 8), np.float32), 2.0, is_stack=False)
    for path, expected in [(vol, True), (stack, False), (as_mrc, False), (named_mrcs, False),
                           (flat, False)]:  # fmt: skip
        assert is_volume(path, read_mrc_header(path)) is expected, path.name


def test_volume_or_stack_interop(interop_data):
    # real files: a 64^3 map, and a stack of 7 images written with ISPG 1 and .mrc
    hand = interop_data / "hand-vol.mrc"
    assert is_volume(hand, read_mrc_header(hand))
    empiar = interop_data / "empiar_10076_7.mrc"
    assert read_mrc_header(empiar).space_group == 1
    assert not is_volume(empiar, read_mrc_header(empiar))


def test_volume_is_not_read_as_particles(tmp_path):
    vol = write_mrc(tmp_path / "v.mrc", np.zeros((8, 8, 8), np.float32), 2.0)
    with pytest.raises(
        InputFileError, match=r"v\.mrc: a 8 x 8 x 8 volume \(MRC space group 1\), not a "
        r"particle stack; if its sections really are particle images, name it \.mrcs",
    ):  # fmt: skip
        load_particle_table(vol)
