"""Index files (--ind): one reader for every command, masks, and bad lists refused."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from cryofield.errors import InputFileError
from cryofield.io import indices, metadata
from cryofield.io.indices import load_index


def test_one_reader():
    # every command imports load_index from io.metadata or io.indices: the same function
    assert metadata.load_index is indices.load_index


def test_formats_give_the_same_indices_in_file_order(tmp_path):
    want = np.array([7, 0, 3])
    np.save(tmp_path / "i.npy", want)
    np.save(tmp_path / "f.npy", want.astype(np.float64))
    np.save(tmp_path / "col.npy", want[:, None])  # (N, 1)
    np.savez(tmp_path / "one.npz", whatever=want)
    np.savez(tmp_path / "named.npz", indices=want, other=np.arange(3))
    (tmp_path / "i.txt").write_text("7\n0, 3  # comment\n")
    (tmp_path / "i.pkl").write_bytes(pickle.dumps(want))
    np.save(tmp_path / "mask.npy", np.isin(np.arange(10), want))
    for name in ("i.npy", "f.npy", "col.npy", "one.npz", "named.npz", "i.txt", "i.pkl"):
        got = load_index(tmp_path / name, 10, "p.star")
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want, err_msg=name)
    np.testing.assert_array_equal(load_index(tmp_path / "mask.npy", 10, "p.star"), [0, 3, 7])
    np.testing.assert_array_equal(load_index([2, 1], 10, "p.star"), [2, 1])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (np.array([1, 4, 1]), r"index 1 is repeated \(entries 0 and 2\)"),
        (np.array([], dtype=np.int64), r"no particle indices \(the selection is empty\)"),
        (np.ones(9, dtype=bool), r"boolean mask of 9 for 10 particles"),
        (np.zeros((3, 2), dtype=np.int64), r"must be a 1-D list, got an array of shape \(3, 2\)"),
        (np.array([1.0, 2.5]), r"must be integers, entry 1 is 2\.5"),
        (np.array([3, 10]), r"index 10 \(entry 1\) out of range for the 10 particles of p\.star"),
        (np.array([-1]), r"index -1 \(entry 0\) out of range"),
        (np.array(["a"]), r"must be integers, got <U1"),
    ],
)
def test_bad_index_arrays(tmp_path, content, message):
    np.save(tmp_path / "bad.npy", content)
    with pytest.raises(InputFileError, match=rf"bad\.npy: .*{message}"):
        load_index(tmp_path / "bad.npy", 10, "p.star")


def test_bad_index_files(tmp_path):
    (tmp_path / "f.txt").write_text("1\n2.5\n")  # used to be read as 2
    with pytest.raises(InputFileError, match=r"f\.txt: particle indices must be integers"):
        load_index(tmp_path / "f.txt", 10, "p.star")
    (tmp_path / "w.txt").write_text("1\ntwo\n")
    with pytest.raises(InputFileError, match=r"w\.txt: not a list of particle indices: 'two' "
                       "on line 2"):  # fmt: skip
        load_index(tmp_path / "w.txt", 10, "p.star")
    np.save(tmp_path / "t.npy", np.arange(5))
    (tmp_path / "t.npy").write_bytes((tmp_path / "t.npy").read_bytes()[:-3])
    with pytest.raises(InputFileError, match=r"t\.npy: not a readable index file: truncated or "
                       r"not a valid \.npy file"):  # fmt: skip
        load_index(tmp_path / "t.npy", 10, "p.star")
    np.savez(tmp_path / "two.npz", a=np.arange(2), b=np.arange(2))
    with pytest.raises(InputFileError, match=r"two\.npz: not an index file: expected one "
                       r"array or one named 'indices', found a, b"):  # fmt: skip
        load_index(tmp_path / "two.npz", 10, "p.star")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputFileError, match=r"bin\.txt: not a list of particle indices "
                       r"\(binary file"):  # fmt: skip
        load_index(tmp_path / "bin.txt", 10, "p.star")
    with pytest.raises(InputFileError, match=r"missing\.npy: index file not found"):
        load_index(tmp_path / "missing.npy", 10, "p.star")


def test_load_index_array_tells_a_mask(tmp_path):
    np.save(tmp_path / "m.npy", np.ones(4, dtype=bool))
    np.savez(tmp_path / "i.npz", indices=np.arange(3))
    assert indices.load_index_array(tmp_path / "m.npy").dtype == np.bool_
    assert indices.load_index_array(tmp_path / "i.npz").dtype.kind == "i"
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(InputFileError, match=r"bad\.npy: not a readable index file"):
        indices.load_index_array(tmp_path / "bad.npy")
