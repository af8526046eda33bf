"""Particle index files (``--ind``): the one reader every command uses.

An index file selects particles of a table of N particles, either as 0-based integer
indices or as a boolean mask of length N. Accepted files:

- ``.npy``: a 1-D integer (or integer-valued float) array, or a boolean mask;
- ``.npz``: the same, as its only array or under the key ``indices``;
- ``.pkl``: a cryoDRGN index pickle (read without executing code,
  :func:`cryofield.io.legacy.load_pickle`);
- anything else: text, integers separated by whitespace or commas (``#`` comments).

Indices are returned in the file's order (not sorted); out-of-range, negative,
non-integer or repeated indices, an empty list and a mask of the wrong length are errors
that name the file and the entry.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cryofield.errors import InputFileError

__all__ = ["load_index", "load_index_array"]


def _read_text(path: Path) -> np.ndarray:
    values = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        for token in line.split("#", 1)[0].replace(",", " ").split():
            try:
                values.append(float(token))
            except ValueError:
                raise InputFileError(
                    path, f"not a list of particle indices: '{token}' on line {line_no}"
                ) from None
    return np.array(values, dtype=np.float64)


def load_index_array(ind: str | os.PathLike[str] | np.ndarray) -> np.ndarray:
    """The array of an index file (or ``ind`` itself) as stored, unchecked: e.g. to tell
    a boolean mask (``dtype == bool``) from integer indices before :func:`load_index`.

    Raises
    ------
    InputFileError
        Missing or unreadable file.
    """
    if isinstance(ind, (str, os.PathLike)):
        return _read_file(Path(ind))
    return np.asarray(ind)


def _read_file(path: Path) -> np.ndarray:
    """The raw array of an index file (dtype as stored)."""
    if not path.is_file():
        raise InputFileError(path, "index file not found")
    suffix = path.suffix.lower()
    remedy = "re-create it (e.g. with 'cryofield select' or np.save)"
    if suffix == ".npy":
        from cryofield.io.arrays import load_npy

        return load_npy(path, "index file", remedy)
    if suffix == ".npz":
        from cryofield.io.arrays import load_npz

        data = load_npz(path, what="index file", remedy=remedy)
        if len(data) == 1:
            return next(iter(data.values()))
        if "indices" in data:
            return data["indices"]
        raise InputFileError(
            path,
            f"not an index file: expected one array or one named 'indices', found "
            f"{', '.join(sorted(data)) or 'none'}",
        )
    if suffix == ".pkl":
        from cryofield.io.legacy import load_pickle

        obj = load_pickle(path)
        if not isinstance(obj, (np.ndarray, list, tuple)):
            raise InputFileError(path, f"not a list of particle indices ({type(obj).__name__})")
        try:
            return np.asarray(obj)
        except ValueError as err:
            raise InputFileError(path, f"not a list of particle indices ({err})") from None
    try:
        return _read_text(path)
    except UnicodeDecodeError:
        raise InputFileError(
            path, "not a list of particle indices (binary file; use .npy, .npz, .pkl or text)"
        ) from None


def load_index(ind: str | os.PathLike[str] | np.ndarray, n: int, source: object) -> np.ndarray:
    """Read and check an index filter against a table of ``n`` particles.

    Parameters
    ----------
    ind
        Array (or list) of 0-based indices or a boolean mask, or a file (module docstring).
    n
        Number of particles in the table the indices refer to.
    source
        The particle file, named in errors.

    Returns
    -------
    numpy.ndarray
        ``(M,)`` int64 indices in the given order (a mask gives its True positions).

    Raises
    ------
    InputFileError
        Unreadable file; a mask whose length is not ``n``; indices that are not integers,
        out of range, repeated, or none at all; an array of more than one dimension.
    """
    where: object = ind if isinstance(ind, (str, os.PathLike)) else source
    arr = load_index_array(ind)
    if sum(s > 1 for s in arr.shape) > 1:
        raise InputFileError(
            where, f"particle indices must be a 1-D list, got an array of shape {arr.shape}"
        )
    arr = arr.reshape(-1)
    if arr.dtype.kind == "b":
        if arr.size != n:
            raise InputFileError(
                where, f"mismatched particle counts: boolean mask of {arr.size} for {n} particles"
            )
        arr = np.flatnonzero(arr)
    elif arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        bad = np.flatnonzero(~finite | (arr != np.round(np.where(finite, arr, 0))))
        if bad.size:
            raise InputFileError(
                where,
                f"particle indices must be integers, entry {int(bad[0])} is {float(arr[bad[0]]):g}",
            )
        if arr.size and np.abs(arr).max() >= 2.0**62:
            raise InputFileError(where, f"index {arr[np.abs(arr).argmax()]:.6g} out of range")
    elif arr.dtype.kind not in "iu":
        raise InputFileError(where, f"particle indices must be integers, got {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise InputFileError(where, f"index {int(arr.max())} out of range for {n} particles")
    arr = arr.astype(np.int64)
    if arr.size == 0:
        raise InputFileError(where, "no particle indices (the selection is empty)")
    bad = np.flatnonzero((arr < 0) | (arr >= n))
    if bad.size:
        raise InputFileError(
            where,
            f"index {int(arr[bad[0]])} (entry {int(bad[0])}) out of range for the "
            f"{n} particles of {source}",
        )
    uniq, first, counts = np.unique(arr, return_index=True, return_counts=True)
    if np.any(counts > 1):
        k = int(np.flatnonzero(counts > 1)[0])
        again = int(np.flatnonzero(arr == uniq[k])[1])
        raise InputFileError(
            where,
            f"index {int(uniq[k])} is repeated (entries {int(first[k])} and {again}): "
            "each particle may be selected once",
        )
    return arr
