"""MRC/MRCS files: memory-mapped reading, atomic writing, chunked stack writing.

Headers are parsed and validated by ``mrcfile`` (MRC2014; Cheng et al. 2015, J. Struct.
Biol. 192:146). Data are then memory-mapped directly with :class:`numpy.memmap`, so opening
a stack costs one header read and no file handle stays open per stack.

Supported data modes: 0 (int8), 1 (int16), 2 (float32), 6 (uint16), 12 (float16).
Arrays are always returned as ``(nz, ny, nx)``: an image stack is ``(N, D, D)``, a volume
``(D, D, D)``, a single image ``(1, D, D)``.

File size: the header fixes the data size, ``nx * ny * nz * bytes(mode)`` after the 1024
header bytes and ``nsymbt`` extended-header bytes. A shorter file is truncated (or its
header is wrong); a file longer by one section (``nx * ny * bytes(mode)``) or more has a
wrong header (a mode edited from 2 to 1 halves the implied size, an ``nz`` too small
hides images): both are refused rather than read as other numbers. Fewer extra bytes than
one section are tolerated (logged): they cannot hold an image.

Stack or volume (:func:`is_volume`): MRC2014 says space group (ISPG) 0 is an image or
image stack and 1 a volume, but older tools write ISPG 1 on stacks (the interop
``empiar_10076_7.mrc``: 7 images of 320 px, ISPG 1). A file is read as a volume when
its name does not end in ``.mrcs`` (RELION's and cryoSPARC's stack extension), its
header has a volume space group (1..230, or 401..630 for a volume stack) or it ends in
``.map``, and it is a cube (``nx == ny == nz > 1``). Everything else is a stack.

Pixel size: ``cella.x / mx``; a header whose cell or ``mx`` gives no positive, finite
size below 10,000 A has none (``apix_A`` 0.0, callers decide).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mrcfile
import numpy as np
from mrcfile.dtypes import HEADER_DTYPE

from cryofield.errors import InputFileError
from cryofield.io.atomic import atomic_path
from cryofield.logs import get_logger

__all__ = ["MRCInfo", "MRCStackWriter", "is_volume", "read_mrc", "read_mrc_header", "write_mrc"]

_log = get_logger("io")

_SUPPORTED_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
_HEADER_BYTES = 1024
_MAX_APIX_A = 1e4  # a header pixel size this large is garbage, not a pixel size


@dataclass(frozen=True)
class MRCInfo:
    """What the header of an MRC file says.

    Attributes
    ----------
    shape : tuple of int
        ``(nz, ny, nx)``; for a stack ``nz`` is the number of images.
    dtype : numpy.dtype
        Data type on disk (with its byte order).
    apix_A : float
        Pixel size in A along x (``cella.x / mx``); 0.0 when the header leaves it unset.
    data_offset : int
        Byte offset of the first voxel (1024 + extended header size).
    is_stack : bool
        True when the header marks the file as an image stack (space group 0 with nz > 1).
    space_group : int
        The header's ISPG (0: image stack, 1..230: volume, 401..630: volume stack).
    """

    shape: tuple[int, int, int]
    dtype: np.dtype
    apix_A: float
    data_offset: int
    is_stack: bool
    space_group: int = 0


def is_volume(path: str | os.PathLike[str], info: MRCInfo) -> bool:
    """Whether the MRC file ``path`` with header ``info`` holds a volume, not images.

    True for a cube (``nx == ny == nz > 1``) with a volume space group (ISPG 1..230, or
    401..630: a volume stack holding one volume) or a ``.map`` name, unless the name ends
    in ``.mrcs`` (see the module docstring for why ISPG alone is not enough).
    """
    nz, ny, nx = info.shape
    suffix = Path(path).suffix.lower()
    if suffix == ".mrcs" or not (nx == ny == nz > 1):
        return False
    g = info.space_group
    return 1 <= g <= 230 or 401 <= g <= 630 or suffix == ".map"


def read_mrc_header(path: str | os.PathLike[str]) -> MRCInfo:
    """Read and validate the header of ``path`` without reading the data.

    Raises
    ------
    InputFileError
        The file is missing, is not an MRC file, uses an unsupported mode, or its size
        does not match its header (truncated, or a wrong mode or shape; module docstring).
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "file not found")
    strict_error = None
    try:
        header, ext_bytes = _parse_header(path, permissive=False)
    except Exception as err:  # mrcfile raises ValueError, EOFError, ... on bad headers
        # Files from older tools often lack the 'MAP ' ID (e.g. the interop
        # toy_projections.mrcs); accept them when the header is otherwise consistent.
        strict_error = err
        try:
            header, ext_bytes = _parse_header(path, permissive=True)
        except Exception:
            raise InputFileError(path, f"not a readable MRC file ({err})") from None
    mode = int(header.mode)
    if mode not in _SUPPORTED_MODES:
        if strict_error is not None:
            raise InputFileError(path, f"not a readable MRC file ({strict_error})")
        raise InputFileError(
            path, f"unsupported MRC data mode {mode} (supported: {sorted(_SUPPORTED_MODES)})"
        )
    dtype = mrcfile.utils.data_dtype_from_header(header)
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if min(nx, ny, nz) <= 0 or ext_bytes < 0:
        if strict_error is not None:
            raise InputFileError(path, f"not a readable MRC file ({strict_error})")
        raise InputFileError(path, f"MRC header has an empty shape (nx={nx}, ny={ny}, nz={nz})")
    offset = _HEADER_BYTES + ext_bytes
    section = nx * ny * dtype.itemsize
    expected = offset + nz * section
    size = path.stat().st_size
    what = (
        f"its header says mode {mode} ({dtype.name}), {nz} x {ny} x {nx} (nz x ny x nx) "
        f"after 1024 + {ext_bytes} header bytes = {expected} bytes"
    )
    problem = None
    if size < expected:
        problem = (
            f"truncated MRC file or wrong header: {what}, but the file has {size} bytes "
            f"({expected - size} missing)"
        )
    elif size - expected >= section:
        problem = (
            f"wrong MRC header: {what}, but the file has {size} bytes ({size - expected} "
            f"more, {(size - expected) / section:.4g} more sections): the header's mode or "
            "shape does not describe the data"
        )
    if problem is not None and strict_error is not None:
        raise InputFileError(path, f"not a readable MRC file ({strict_error}); {problem}")
    if problem is not None:
        raise InputFileError(path, problem)
    if size > expected:
        _log.warning("%s: ignoring %d bytes after the data", path, size - expected)
    mx = int(header.mx)
    cell_x = float(header.cella.x)
    apix = cell_x / mx if mx > 0 and np.isfinite(cell_x) and cell_x > 0 else 0.0
    if apix >= _MAX_APIX_A:
        _log.warning("%s: ignoring the implausible pixel size %.4g A in the header", path, apix)
        apix = 0.0
    space_group = int(header.ispg)
    is_stack = space_group == 0 and nz > 1
    return MRCInfo((nz, ny, nx), dtype, apix, offset, is_stack, space_group)


def _parse_header(path: Path, permissive: bool) -> tuple[np.recarray, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, header_only=True, permissive=permissive) as mrc:
            if mrc.header is None:
                raise ValueError("no MRC header")
            return mrc.header.copy(), int(mrc.header.nsymbt)


def read_mrc(path: str | os.PathLike[str], mmap: bool = True) -> tuple[np.ndarray, MRCInfo]:
    """Read an MRC file as a ``(nz, ny, nx)`` array.

    Parameters
    ----------
    path
        ``.mrc`` / ``.mrcs`` file.
    mmap
        True: a read-only :class:`numpy.memmap` in the file's dtype (nothing is loaded
        until indexed). False: an in-memory float32 copy.

    Returns
    -------
    array : numpy.ndarray
        ``(nz, ny, nx)``.
    info : MRCInfo
        Header information (pixel size etc.).
    """
    info = read_mrc_header(path)
    data = np.memmap(path, dtype=info.dtype, mode="r", offset=info.data_offset, shape=info.shape)
    if not mmap:
        data = np.array(data, dtype=np.float32)
    return data, info


def _fill_header(
    shape: tuple[int, int, int], apix_A: float, is_stack: bool, stats: tuple[float, ...]
) -> np.ndarray:
    """MRC2014 header for float32 data of ``shape`` ``(nz, ny, nx)``."""
    nz, ny, nx = shape
    header = np.zeros((), dtype=HEADER_DTYPE).view(np.recarray)
    header.nx, header.ny, header.nz = nx, ny, nz
    header.mode = 2
    header.mx, header.my = nx, ny
    header.mz = 1 if is_stack else nz
    header.cella = (nx * apix_A, ny * apix_A, int(header.mz) * apix_A)
    header.cellb = (90.0, 90.0, 90.0)
    header.mapc, header.mapr, header.maps = 1, 2, 3
    header.dmin, header.dmax, header.dmean, header.rms = stats
    header.ispg = 0 if is_stack else 1
    header.nversion = 20141
    header.map = b"MAP "
    header.machst = (0x44, 0x44, 0x00, 0x00)  # little endian
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    header.label[0] = f"{'Created by cryofield':40s}{stamp:>39s} ".encode()
    header.nlabl = 1
    return header


def write_mrc(
    path: str | os.PathLike[str],
    array: np.ndarray,
    apix_A: float,
    is_stack: bool | None = None,
) -> Path:
    """Write ``array`` as a float32 MRC file with pixel size ``apix_A``, atomically.

    Parameters
    ----------
    path
        Output path. Written to a temporary file in the same folder, then renamed.
    array
        ``(D, D)`` image, ``(N, D, D)`` stack or ``(D, D, D)`` volume.
    apix_A
        Pixel (voxel) size in A, stored in the header's cell dimensions.
    is_stack
        Mark the file as an image stack (space group 0). Default: True for ``.mrcs``.
    """
    path = Path(path)
    data = np.asarray(array, dtype=np.float32)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"write_mrc expects a 2-D or 3-D array, got shape {data.shape}")
    if is_stack is None:
        is_stack = path.suffix.lower() == ".mrcs"
    writer = MRCStackWriter(path, data.shape[1], apix_A, nx=data.shape[2], is_stack=is_stack)
    with writer:
        writer.write(data)
    return path


class MRCStackWriter:
    """Write an ``(N, D, D)`` float32 stack chunk by chunk; the header is fixed at close.

    Chunks are appended to a temporary file next to ``path``; :meth:`close` writes the
    final header (count, pixel size, min/max/mean/rms) and renames the file onto ``path``.
    If an exception escapes the ``with`` block, the temporary file is removed and ``path``
    is left untouched.

    Parameters
    ----------
    path
        Output ``.mrcs`` path.
    D
        Image size ``ny`` in pixels (and ``nx`` unless given).
    apix_A
        Pixel size in A written to the header.
    nx
        Image width, when it differs from ``D`` (volumes written slice by slice).
    is_stack
        Mark as image stack (space group 0); False writes a volume header.

    Examples
    --------
    >>> with MRCStackWriter("out.mrcs", 64, 2.5) as w:  # doctest: +SKIP
    ...     for chunk in chunks:
    ...         w.write(chunk)  # (B, 64, 64)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        D: int,
        apix_A: float,
        nx: int | None = None,
        is_stack: bool = True,
    ) -> None:
        self.path = Path(path)
        self.ny = int(D)
        self.nx = int(D if nx is None else nx)
        self.apix_A = float(apix_A)
        self.is_stack = is_stack
        self.n_written = 0
        self._sum = 0.0
        self._sumsq = 0.0
        self._min = np.inf
        self._max = -np.inf
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._fh = open(self._tmp, "wb")  # closed in close() or abort()
        self._fh.write(b"\0" * _HEADER_BYTES)
        self._closed = False

    def write(self, chunk: np.ndarray) -> None:
        """Append ``chunk`` ``(B, D, D)`` (or one ``(D, D)`` image)."""
        data = np.asarray(chunk, dtype=np.float32)
        if data.ndim == 2:
            data = data[None]
        if data.shape[1:] != (self.ny, self.nx):
            raise ValueError(
                f"chunk of shape {data.shape} does not match the stack's "
                f"{self.ny} x {self.nx} images"
            )
        if data.shape[0] == 0:
            return
        d64 = data.astype(np.float64)
        self._sum += float(d64.sum())
        self._sumsq += float((d64 * d64).sum())
        self._min = min(self._min, float(data.min()))
        self._max = max(self._max, float(data.max()))
        self._fh.write(np.ascontiguousarray(data, dtype="<f4").tobytes())
        self.n_written += data.shape[0]

    def close(self) -> Path:
        """Write the header and move the file into place."""
        if self._closed:
            return self.path
        if self.n_written == 0:
            self.abort()
            raise ValueError(f"{self.path}: no images were written")
        count = self.n_written * self.ny * self.nx
        mean = self._sum / count
        rms = float(np.sqrt(max(self._sumsq / count - mean * mean, 0.0)))
        shape = (self.n_written, self.ny, self.nx)
        header = _fill_header(shape, self.apix_A, self.is_stack, (self._min, self._max, mean, rms))
        self._fh.seek(0)
        self._fh.write(header.tobytes())
        self._fh.close()
        self._closed = True
        self._ctx.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        """Discard what was written; ``path`` is left untouched."""
        if self._closed:
            return
        self._fh.close()
        self._closed = True
        err = RuntimeError("aborted")
        try:
            self._ctx.__exit__(RuntimeError, err, None)
        except RuntimeError:
            pass
        Path(self._tmp).unlink(missing_ok=True)

    def __enter__(self) -> MRCStackWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
