"""Numpy array files (``.npy``, ``.npz``) read without pickles and checked before use.

Every ``.npy``/``.npz`` the project reads (cryoSPARC ``.cs`` files, index files, particle
tables, ``poses.npz``, ``truth.npz`` ...) goes through :func:`load_npy` or
:func:`load_npz`, so a truncated, corrupt or foreign file fails with one
:class:`~cryofield.errors.InputFileError` line that names the file, says what is wrong
and how to re-create it -- never with a ``zipfile.BadZipFile``, ``EOFError`` or
``ValueError`` traceback.

Before any data is read, the ``.npy`` header of the file (or of each ``.npz`` member) is
parsed and the byte count it implies (``prod(shape) * itemsize`` plus the header) is
compared with the bytes actually there, so a damaged header cannot make numpy allocate a
huge array or read a short one. Object arrays (pickles) are refused.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import numpy as np
from numpy.lib import format as npy_format

from cryofield.errors import CryofieldError, InputFileError

__all__ = ["load_npy", "load_npz"]


def _read_npy_header(fh: IO[bytes]) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, header bytes)`` of the ``.npy`` stream at ``fh`` (at its start)."""
    version = npy_format.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = npy_format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, _, dtype = npy_format.read_array_header_2_0(fh)
    else:  # (3, 0): utf-8 field names; only numpy's private reader handles it
        try:
            from numpy.lib._format_impl import _read_array_header  # numpy >= 2
        except ImportError:  # pragma: no cover - numpy 1.x
            _read_array_header = npy_format._read_array_header
        shape, _, dtype = _read_array_header(fh, version)
    if dtype.hasobject:
        raise ValueError("it holds Python objects (pickles), which cryofield never loads")
    return tuple(int(s) for s in shape), dtype, fh.tell()


def _check_npy_size(shape: tuple[int, ...], dtype: np.dtype, header: int, size: int) -> None:
    """Raise ValueError when ``size`` bytes differ from what the ``.npy`` header implies."""
    expected = header + math.prod(shape) * dtype.itemsize
    if size != expected:
        how = "missing" if size < expected else "extra"
        raise ValueError(
            f"its header says a {'x'.join(map(str, shape)) or 'scalar'} array of "
            f"{dtype.str} ({expected} bytes with the header) but there are {size} bytes, "
            f"{abs(expected - size)} {how}"
        )


def _message(what: str, kind: str, err: BaseException, remedy: str | None) -> str:
    reason = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
    reason = "".join(c if c.isprintable() else "?" for c in reason)
    if len(reason) > 200:  # a damaged header is quoted in full by numpy
        reason = reason[:197] + "..."
    tail = f"; {remedy}" if remedy else ""
    return f"not a readable {what}: truncated or not a valid {kind} file ({reason}){tail}"


def load_npy(
    path: str | os.PathLike[str], what: str = ".npy array", remedy: str | None = None
) -> np.ndarray:
    """Read one ``.npy`` array (``allow_pickle=False``) after checking its size.

    Parameters
    ----------
    path
        The file (any extension: cryoSPARC ``.cs`` files are ``.npy`` arrays).
    what
        What the file should be, for the message (``'cryoSPARC .cs file'``).
    remedy
        How to re-create the file, appended to the message.

    Raises
    ------
    InputFileError
        Missing, truncated, longer than its header says, holding objects, or not ``.npy``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "file not found")
    try:
        with open(path, "rb") as fh:
            shape, dtype, header = _read_npy_header(fh)
        _check_npy_size(shape, dtype, header, path.stat().st_size)
        arr = np.load(path, allow_pickle=False)
    except CryofieldError:
        raise
    except Exception as err:  # corrupt files raise assorted errors
        raise InputFileError(path, _message(what, ".npy", err, remedy)) from None
    if not isinstance(arr, np.ndarray):
        raise InputFileError(path, f"not a readable {what}: an .npz archive, not one .npy array")
    return arr


def load_npz(
    path: str | os.PathLike[str],
    required: Iterable[str] = (),
    what: str = ".npz file",
    remedy: str | None = None,
) -> dict[str, np.ndarray]:
    """Read every array of an ``.npz`` file (``allow_pickle=False``) into a dict.

    Parameters
    ----------
    path
        The ``.npz`` file.
    required
        Keys that must be present.
    what
        What the file should be, for the message (``'particle table'``).
    remedy
        How to re-create the file (``"re-create it with 'cryofield parse'"``).

    Returns
    -------
    dict of str to numpy.ndarray
        All arrays, read into memory (the file is closed on return).

    Raises
    ------
    InputFileError
        ``<path>: not a readable <what>: truncated or not a valid .npz file (<reason>);
        <remedy>``, or ``missing array 'key'`` naming the keys the file has.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "file not found")
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    raise ValueError(f"member '{info.filename}' is not a .npy array")
                with zf.open(info) as member:
                    shape, dtype, header = _read_npy_header(member)
                try:
                    _check_npy_size(shape, dtype, header, info.file_size)
                except ValueError as err:
                    raise ValueError(f"array '{info.filename[:-4]}': {err}") from None
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            data = {k: np.asarray(z[k]) for k in z.files}
    except CryofieldError:
        raise
    except Exception as err:  # BadZipFile, EOFError, zlib.error, ValueError ...
        raise InputFileError(path, _message(what, ".npz", err, remedy)) from None
    missing = [k for k in required if k not in data]
    if missing:
        have = ", ".join(sorted(data)) or "none"
        tail = f"; {remedy}" if remedy else ""
        raise InputFileError(
            path, f"not a {what}: missing array '{missing[0]}' (it has: {have}){tail}"
        )
    return data
