"""The particle table: one row per particle, whatever the input format.

:class:`ParticleTable` holds, for N particles, where each image is (absolute stack path
and 0-based frame), its pixel size, its CTF, its pose when the file has one, its optics
group, and the original rows of the input file (``raw``) so that writing back to the
same format keeps every column. :func:`load_particle_table` reads any supported input
(.star, .cs, .mrcs/.mrc, .txt list of stacks, or a saved table .npz) and applies an
optional index filter (``--ind``, read by :func:`cryofield.io.indices.load_index`, the
one index reader of every command). A saved table is read through
:func:`cryofield.io.arrays.load_npz` and every array is checked before use.

Conventions (docs/dev/contracts.md): ``rotations`` are RELION's matrix ``A`` (float32);
``shifts_px`` is the particle's displacement from the box centre in pixels of the input
images (float32; see :mod:`cryofield.io.poses` for the file conventions). CTF values are
float64 in the units of their names; angles in degrees as in RELION files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryofield.errors import InputFileError
from cryofield.io.atomic import atomic_path
from cryofield.io.indices import load_index
from cryofield.logs import get_logger

__all__ = [
    "CTF_KEYS",
    "ParticleTable",
    "check_ctf",
    "check_rotations",
    "common_pixel_size",
    "ignored_optics",
    "load_index",
    "load_particle_table",
    "pixel_size_from_stacks",
]

#: Keys of :attr:`ParticleTable.ctf`, each an ``(N,)`` float64 array.
CTF_KEYS = (
    "defocus_u_A",
    "defocus_v_A",
    "astig_angle_deg",
    "voltage_kV",
    "cs_mm",
    "amp_contrast",
    "phase_shift_deg",
    "bfactor_A2",
)

_NPZ_VERSION = 1
_log = get_logger("io")


@dataclass
class ParticleTable:
    """Per-particle metadata (all arrays of length N).

    Attributes
    ----------
    image_paths : numpy.ndarray
        ``(N,)`` str, absolute path of the stack holding each image.
    image_index : numpy.ndarray
        ``(N,)`` int64, 0-based frame of the image in its stack.
    apix_A : numpy.ndarray
        ``(N,)`` float64, pixel size of the images in A.
    box_px : int
        Image size D in pixels (0 when unknown: no size column and no readable stack).
    ctf : dict of str to numpy.ndarray or None
        ``(N,)`` float64 arrays keyed by :data:`CTF_KEYS`; None when the input has no CTF.
    rotations : numpy.ndarray or None
        ``(N, 3, 3)`` float32 pose matrices (RELION's ``A``), None without poses.
    shifts_px : numpy.ndarray or None
        ``(N, 2)`` float32 ``(tx, ty)`` displacement of the particle from the box centre.
    optics_group : numpy.ndarray
        ``(N,)`` int64 optics group as numbered in the file (RELION: from 1; cryoSPARC
        ``ctf/exp_group_id``; 0 when the file has none).
    source_path : str
        The file the table was read from.
    source_format : str
        ``'star'``, ``'cs'``, ``'mrcs'`` or ``'txt'``.
    raw : pandas.DataFrame or numpy.ndarray or None
        Original rows: the particle block of a star file (DataFrame, column names without
        the leading underscore) or the structured array of a .cs file.
    raw_optics : pandas.DataFrame or None
        The ``data_optics`` block of a RELION 3.1+ star file.
    raw_block : str
        Name of the star particle block (``'particles'``, ``'images'``, ``''``).
    _extra : dict
        ``source_index``: ``(N,)`` int64 row of each particle in the file it was read
        from, set by :meth:`subset` (composed over repeated subsets) and saved in .npz.
    """

    image_paths: np.ndarray
    image_index: np.ndarray
    apix_A: np.ndarray
    box_px: int
    ctf: dict[str, np.ndarray] | None
    rotations: np.ndarray | None
    shifts_px: np.ndarray | None
    optics_group: np.ndarray
    source_path: str
    source_format: str
    raw: Any = None
    raw_optics: pd.DataFrame | None = None
    raw_block: str = "particles"
    _extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        n = len(self.image_paths)
        self.image_paths = np.asarray(self.image_paths, dtype=str)
        self.image_index = np.asarray(self.image_index, dtype=np.int64)
        self.apix_A = np.asarray(self.apix_A, dtype=np.float64)
        self.optics_group = np.asarray(self.optics_group, dtype=np.int64)
        self.box_px = int(self.box_px)
        arrays = {
            "image_index": self.image_index,
            "apix_A": self.apix_A,
            "optics_group": self.optics_group,
        }
        if self.ctf is not None:
            self.ctf = {k: np.asarray(self.ctf[k], dtype=np.float64) for k in CTF_KEYS}
            arrays.update({f"ctf[{k}]": v for k, v in self.ctf.items()})
        if self.rotations is not None:
            self.rotations = self._float32("rotations", self.rotations).reshape(-1, 3, 3)
            arrays["rotations"] = self.rotations
        if self.shifts_px is not None:
            self.shifts_px = self._float32("shifts_px", self.shifts_px).reshape(-1, 2)
            arrays["shifts_px"] = self.shifts_px
        if self.raw is not None:
            arrays["raw"] = self.raw
        for name, arr in arrays.items():
            if len(arr) != n:
                raise InputFileError(
                    self.source_path,
                    f"mismatched particle counts: {name} has {len(arr)} rows, image paths have {n}",
                )

    def _float32(self, name: str, values: Any) -> np.ndarray:
        """``values`` as float32; raise (naming the row) when one is not finite there."""
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.asarray(values, dtype=np.float32)
        finite = np.isfinite(out)
        bad = finite.all(axis=tuple(range(1, out.ndim))) if out.ndim > 1 else finite
        bad = ~np.atleast_1d(bad)
        if np.any(bad):
            row = int(np.flatnonzero(bad)[0])
            raise InputFileError(
                self.source_path,
                f"{name} out of range (not a finite float32): {np.asarray(values)[row]}",
                row=row + 1,
            )
        return out

    def __len__(self) -> int:
        return len(self.image_paths)

    @property
    def n_optics_groups(self) -> int:
        """Number of distinct optics groups."""
        return len(np.unique(self.optics_group))

    def subset(self, indices: np.ndarray | list[int]) -> ParticleTable:
        """Table of the particles ``indices`` (0-based, in the given order)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = int(idx[(idx < -n) | (idx >= n)][0])
            raise InputFileError(self.source_path, f"index {bad} out of range for {n} particles")
        raw = self.raw
        if isinstance(raw, pd.DataFrame):
            raw = raw.iloc[idx].reset_index(drop=True)
        elif raw is not None:
            raw = raw[idx]
        return replace(
            self,
            image_paths=self.image_paths[idx],
            image_index=self.image_index[idx],
            apix_A=self.apix_A[idx],
            ctf=None if self.ctf is None else {k: v[idx] for k, v in self.ctf.items()},
            rotations=None if self.rotations is None else self.rotations[idx],
            shifts_px=None if self.shifts_px is None else self.shifts_px[idx],
            optics_group=self.optics_group[idx],
            raw=raw,
            _extra={**self._extra, "source_index": self.source_index[idx]},
        )

    @property
    def source_index(self) -> np.ndarray:
        """``(N,)`` int64 row of each particle in the original file (after subsets)."""
        idx = self._extra.get("source_index")
        return np.arange(len(self), dtype=np.int64) if idx is None else np.asarray(idx)

    # ------------------------------------------------------------------ npz I/O
    def save_npz(self, path: str | os.PathLike[str]) -> Path:
        """Save the table (incl. the raw rows) to ``path`` (.npz), atomically.

        Everything is stored as plain arrays (no pickles): fields under their own names,
        CTF under ``ctf__<key>``, a star file's columns under ``raw__<i>`` with names in
        ``raw_columns`` (optics: ``optics__<i>`` / ``optics_columns``), a .cs structured
        array as ``raw_cs``.
        """
        out: dict[str, np.ndarray] = {
            "format_version": np.array(_NPZ_VERSION),
            "image_paths": self.image_paths,
            "image_index": self.image_index,
            "apix_A": self.apix_A,
            "box_px": np.array(self.box_px),
            "optics_group": self.optics_group,
            "source_path": np.array(str(self.source_path)),
            "source_format": np.array(self.source_format),
            "raw_block": np.array(self.raw_block),
        }
        if self.ctf is not None:
            out.update({f"ctf__{k}": v for k, v in self.ctf.items()})
        if "source_index" in self._extra:
            out["source_index"] = np.asarray(self._extra["source_index"], dtype=np.int64)
        if self.rotations is not None:
            out["rotations"] = self.rotations
        if self.shifts_px is not None:
            out["shifts_px"] = self.shifts_px
        if isinstance(self.raw, pd.DataFrame):
            out.update(_frame_to_arrays(self.raw, "raw"))
        elif self.raw is not None:
            out["raw_cs"] = np.asarray(self.raw)
        if self.raw_optics is not None:
            out.update(_frame_to_arrays(self.raw_optics, "optics"))
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **out)
        return path

    @classmethod
    def load_npz(cls, path: str | os.PathLike[str]) -> ParticleTable:
        """Load a table written by :meth:`save_npz` (``allow_pickle=False``).

        Every array is checked before use (kind, shape, particle count, finite values,
        pixel sizes > 0, frames >= 0, rotation matrices), so a damaged or hand-edited file
        fails with one line naming the array instead of giving wrong particles.

        Raises
        ------
        InputFileError
            Truncated or corrupt file (:func:`cryofield.io.arrays.load_npz`), a missing or
            malformed array, or a file written by a newer cryofield.
        """
        from cryofield.io.arrays import load_npz

        d = load_npz(path, _NPZ_REQUIRED, "cryofield particle table", _NPZ_REMEDY)
        version = _npz_array(path, d, "format_version", "iu", ())
        if int(version) > _NPZ_VERSION or int(version) < 1:
            raise InputFileError(
                path,
                f"particle table format {int(version)} is not supported (this cryofield "
                f"reads format {_NPZ_VERSION}); {_NPZ_REMEDY}",
            )
        paths = _npz_array(path, d, "image_paths", "U", (None,))
        n = len(paths)
        if n == 0:
            raise InputFileError(path, f"the particle table has no particles; {_NPZ_REMEDY}")
        index = _npz_array(path, d, "image_index", "iu", (n,))
        _positive(path, index, "image_index", minimum=0)
        apix = _npz_array(path, d, "apix_A", "iuf", (n,))
        _positive(path, apix, "apix_A")
        box = _npz_array(path, d, "box_px", "iu", ())
        _positive(path, box.reshape(1), "box_px", minimum=0)
        group = _npz_array(path, d, "optics_group", "iu", (n,))
        texts = {k: str(_npz_array(path, d, k, "U", ())) for k in _NPZ_TEXT}
        if texts["source_format"] not in _FORMATS:
            raise InputFileError(
                path,
                f"array 'source_format' is '{texts['source_format']}', expected one of "
                f"{', '.join(_FORMATS)}",
            )
        ctf = None
        ctf_keys = [f"ctf__{k}" for k in CTF_KEYS]
        if any(k in d for k in ctf_keys):
            missing = [k for k in ctf_keys if k not in d]
            if missing:
                raise InputFileError(path, f"incomplete CTF: missing array '{missing[0]}'")
            ctf = {k: _npz_array(path, d, f"ctf__{k}", "iuf", (n,)) for k in CTF_KEYS}
            check_ctf(path, ctf, {k: f"ctf__{k}" for k in CTF_KEYS})
        rotations = shifts = None
        if "rotations" in d:
            rotations = _npz_array(path, d, "rotations", "f", (n, 3, 3))
            check_rotations(path, rotations, "rotations")
        if "shifts_px" in d:
            shifts = _npz_array(path, d, "shifts_px", "iuf", (n, 2))
        extra = {}
        if "source_index" in d:
            extra["source_index"] = _npz_array(path, d, "source_index", "iu", (n,))
            _positive(path, extra["source_index"], "source_index", minimum=0)
        raw: Any = None
        if "raw_columns" in d:
            raw = _arrays_to_frame(path, d, "raw", n)
        elif "raw_cs" in d:
            raw = d["raw_cs"]
            if raw.dtype.names is None or raw.shape != (n,):
                raise InputFileError(
                    path,
                    f"array 'raw_cs' must be a structured array of {n} records, "
                    f"got {raw.dtype} {raw.shape}",
                )
        raw_optics = _arrays_to_frame(path, d, "optics", None) if "optics_columns" in d else None
        return cls(
            image_paths=paths,
            image_index=index,
            apix_A=apix,
            box_px=int(box),
            ctf=ctf,
            rotations=rotations,
            shifts_px=shifts,
            optics_group=group,
            source_path=texts["source_path"],
            source_format=texts["source_format"],
            raw=raw,
            raw_optics=raw_optics,
            raw_block=texts["raw_block"],
            _extra=extra,
        )


_NPZ_REQUIRED = ("format_version", "image_paths", "image_index", "apix_A", "box_px",
                 "optics_group", "source_path", "source_format", "raw_block")  # fmt: skip
_NPZ_TEXT = ("source_path", "source_format", "raw_block")
_NPZ_REMEDY = "re-create it with 'cryofield parse' (a run's particles.npz: run 'train' again)"
_FORMATS = ("star", "cs", "mrcs", "txt")
_KINDS = {"i": "integer", "u": "integer", "f": "float", "U": "text", "b": "boolean"}


def _npz_array(
    path: object,
    d: dict[str, np.ndarray],
    key: str,
    kinds: str,
    shape: tuple | None,
    finite: bool = True,
) -> np.ndarray:
    """``d[key]`` checked for dtype kind, shape (``None`` entries: any size) and, when
    ``finite``, finite values."""
    if key not in d:
        raise InputFileError(path, f"missing array '{key}'")
    a = d[key]
    if a.dtype.kind not in kinds:
        want = " or ".join(dict.fromkeys(_KINDS.get(k, k) for k in kinds))
        raise InputFileError(path, f"array '{key}' has dtype {a.dtype}, expected {want}")
    if shape is not None and (
        a.ndim != len(shape)
        or any(w is not None and w != h for w, h in zip(shape, a.shape, strict=True))
    ):
        want = "(" + ", ".join("N" if w is None else str(w) for w in shape) + ")"
        raise InputFileError(path, f"array '{key}' has shape {a.shape}, expected {want}")
    if finite and a.dtype.kind == "f" and a.size:
        bad = ~np.isfinite(a.reshape(len(a), -1) if a.ndim else a.reshape(1, 1)).all(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0]) + 1
            raise InputFileError(path, f"array '{key}' is not a finite number", row=row)
    return a


def _positive(path: object, values: np.ndarray, name: str, minimum: float | None = None) -> None:
    """Raise when ``values`` are not > 0 (or not >= ``minimum``), naming the first row."""
    bad = values <= 0 if minimum is None else values < minimum
    if np.any(bad):
        row = int(np.flatnonzero(bad)[0])
        want = "> 0" if minimum is None else f">= {minimum}"
        raise InputFileError(
            path, f"field {name} must be {want}, got {float(values[row]):g}", row=row + 1
        )


def check_rotations(path: object, R: np.ndarray, name: str, tol: float = 1e-3) -> None:
    """Raise when the ``(N, 3, 3)`` ``R`` are not rotation matrices (to ``tol``)."""
    R64 = np.asarray(R, dtype=np.float64)
    if not len(R64):
        return
    err = np.abs(R64 @ np.swapaxes(R64, -1, -2) - np.eye(3)).reshape(len(R64), -1).max(axis=1)
    bad = (err > tol) | (np.abs(np.linalg.det(R64) - 1) > tol)
    if np.any(bad):
        row = int(np.flatnonzero(bad)[0]) + 1
        raise InputFileError(path, f"field {name} is not a rotation matrix", row=row)


def check_ctf(source: object, ctf: dict[str, np.ndarray], names: dict[str, str]) -> None:
    """Refuse CTF values that cannot be right: voltage <= 0, amplitude contrast outside
    [0, 1], or any non-finite value. ``names`` maps :data:`CTF_KEYS` to the file's field
    names, used in the message (which names the first bad row)."""
    for key in CTF_KEYS:
        values = np.asarray(ctf[key], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise InputFileError(
                source, f"field {names[key]} is not a finite number", row=int(bad[0]) + 1
            )
    _positive(source, np.asarray(ctf["voltage_kV"]), names["voltage_kV"])
    w = np.asarray(ctf["amp_contrast"])
    bad = np.flatnonzero((w < 0) | (w > 1))
    if bad.size:
        raise InputFileError(
            source,
            f"field {names['amp_contrast']} must be between 0 and 1 (a fraction), got "
            f"{float(w[bad[0]]):g}",
            row=int(bad[0]) + 1,
        )


def _frame_to_arrays(df: pd.DataFrame, prefix: str) -> dict[str, np.ndarray]:
    out = {f"{prefix}_columns": np.array(list(df.columns), dtype=str)}
    for i, col in enumerate(df.columns):
        values = df[col].to_numpy()
        if values.dtype.kind not in "iufb":
            values = values.astype(str)
        out[f"{prefix}__{i}"] = values
    return out


def _arrays_to_frame(
    path: object, d: dict[str, np.ndarray], prefix: str, n: int | None
) -> pd.DataFrame:
    """The DataFrame saved by :func:`_frame_to_arrays` (``n`` rows when given)."""
    cols = [str(c) for c in _npz_array(path, d, f"{prefix}_columns", "U", (None,))]
    if len(set(cols)) != len(cols):
        dup = next(c for c in cols if cols.count(c) > 1)
        raise InputFileError(path, f"array '{prefix}_columns' names column {dup} twice")
    arrays = {}
    for i, c in enumerate(cols):
        arrays[c] = _npz_array(path, d, f"{prefix}__{i}", "iufbU", (n,), finite=False)
        n = len(arrays[c]) if n is None else n
    return pd.DataFrame(arrays)


# ---------------------------------------------------------------------- loading
def resolve_image_path(
    name: str, base_dir: Path, datadir: str | os.PathLike[str] | None
) -> tuple[str, bool]:
    """Absolute path of a stack named in a metadata file, and whether it exists.

    Tried in order: ``datadir/name``, ``datadir/basename(name)`` (when ``datadir`` is
    given), ``name`` if absolute, ``base_dir/name``, ``base_dir/basename(name)``, then
    ``name`` relative to the two folders above ``base_dir`` (RELION and cryoSPARC write
    paths relative to the project folder, and their metadata files sit in job folders one
    or two levels below it). When none exists, the first candidate is returned (so errors
    name where the file was expected).
    """
    name = name.strip()
    p = Path(name)
    base_dir = Path(os.path.abspath(base_dir))
    candidates: list[Path] = []
    if datadir is not None:
        candidates += [Path(datadir) / p, Path(datadir) / p.name]
    if p.is_absolute():
        candidates.append(p)
    candidates += [base_dir / p, base_dir / p.name]
    if not p.is_absolute():
        candidates += [base_dir.parent / p, base_dir.parent.parent / p]
    for cand in candidates:
        if cand.is_file():
            return os.path.abspath(cand), True
    return os.path.abspath(candidates[0]), False


def resolve_image_paths(
    names: np.ndarray, base_dir: Path, datadir: str | os.PathLike[str] | None
) -> tuple[np.ndarray, int]:
    """Vectorised :func:`resolve_image_path` over unique names; returns (paths, n_missing)."""
    uniq, inverse = np.unique(np.asarray(names, dtype=str), return_inverse=True)
    resolved = [resolve_image_path(u, base_dir, datadir) for u in uniq]
    paths = np.array([r[0] for r in resolved], dtype=str)[inverse.reshape(-1)]
    missing = sum(1 for r in resolved if not r[1])
    return paths, missing


def pixel_size_from_stacks(
    source: object,
    apix_A: np.ndarray | None,
    paths: np.ndarray,
    field: str,
    rtol: float = 0.01,
) -> tuple[np.ndarray, int]:
    """Per-particle pixel size, reconciled with the MRC header of the particles' stack.

    The header of the first stack of ``paths`` that exists is read (header only).

    - The metadata has a pixel size (``apix_A``): it is used; when the header's differs by
      more than ``rtol`` (relative) for that stack's particles, a warning names both.
    - The metadata has none (``apix_A`` None): the header's pixel size is used (logged).
    - Neither: :class:`InputFileError`.

    Parameters
    ----------
    source
        The metadata file (named in messages).
    apix_A
        ``(N,)`` pixel sizes in A from the metadata, or None when it has none.
    paths
        ``(N,)`` absolute stack paths of the particles.
    field
        The metadata's name for the pixel size (``'blob/psize_A'``), for messages.

    Returns
    -------
    apix_A : numpy.ndarray
        ``(N,)`` float64 pixel sizes in A.
    box_px : int
        Image size of the stack read, 0 when no stack was found.
    """
    from cryofield.io.mrc import read_mrc_header

    paths = np.asarray(paths, dtype=str)
    stack = next((p for p in dict.fromkeys(paths.tolist()) if Path(p).is_file()), None)
    info = None
    if stack is not None:
        try:
            info = read_mrc_header(stack)
        except InputFileError:
            if apix_A is None:
                raise
            # a bad stack is reported, with its particle, when its images are read
    box = info.shape[2] if info is not None else 0
    header_apix = info.apix_A if info is not None else 0.0
    if apix_A is None:
        if header_apix > 0:
            _log.info(
                "%s: no %s; using the pixel size of the MRC header of %s: %.6g A",
                source, field, stack, header_apix,
            )  # fmt: skip
            return np.full(len(paths), header_apix), box
        if stack is None:
            where = f"its image stacks (e.g. {paths[0]}) are not found (use --datadir)"
        else:
            where = f"the MRC header of {stack} has none (cell size 0)"
        raise InputFileError(
            source,
            f"no pixel size: the file has no {field} and {where}; add {field} to the file "
            "or set the pixel size in the stack's header",
        )
    apix = np.asarray(apix_A, dtype=np.float64)
    if header_apix > 0:
        mine = apix[paths == stack]
        off = np.abs(mine - header_apix) > rtol * np.abs(mine)
        if np.any(off):
            value = float(mine[off][0])
            _log.warning(
                "%s: %s says %.6g A but the MRC header of %s says %.6g A (%.1f%% apart); "
                "using %.6g A from %s",
                source, field, value, stack, header_apix,
                100 * abs(value - header_apix) / value, value, field,
            )  # fmt: skip
    return apix, box


def _stack_table(path: Path) -> ParticleTable:
    from cryofield.io.mrc import is_volume, read_mrc_header

    info = read_mrc_header(path)
    nz, ny, nx = info.shape
    if is_volume(path, info):
        raise InputFileError(
            path,
            f"a {nz} x {ny} x {nx} volume (MRC space group {info.space_group}), not a "
            "particle stack; if its sections really are particle images, name it .mrcs",
        )
    if ny != nx:
        raise InputFileError(path, f"images are not square ({ny} x {nx} pixels)")
    apix = info.apix_A
    if not apix > 0:
        _log.warning("%s: no pixel size in the MRC header; assuming 1.0 A", path)
        apix = 1.0
    return ParticleTable(
        image_paths=np.full(nz, os.path.abspath(path)),
        image_index=np.arange(nz),
        apix_A=np.full(nz, apix),
        box_px=nx,
        ctf=None,
        rotations=None,
        shifts_px=None,
        optics_group=np.zeros(nz, dtype=np.int64),
        source_path=str(path),
        source_format="mrcs",
    )


def _txt_table(path: Path, datadir: str | os.PathLike[str] | None) -> ParticleTable:
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    names = [ln for ln in lines if ln and not ln.startswith("#")]
    if not names:
        raise InputFileError(path, "empty list of stacks")
    parts = []
    for row, name in enumerate(names, start=1):
        stack, found = resolve_image_path(name, path.parent, datadir)
        if not found:
            raise InputFileError(path, f"stack '{name}' not found (looked for {stack})", row=row)
        parts.append(_stack_table(Path(stack)))
    boxes = {p.box_px for p in parts}
    if len(boxes) > 1:
        raise InputFileError(path, f"stacks have different box sizes {sorted(boxes)}")
    return ParticleTable(
        image_paths=np.concatenate([p.image_paths for p in parts]),
        image_index=np.concatenate([p.image_index for p in parts]),
        apix_A=np.concatenate([p.apix_A for p in parts]),
        box_px=parts[0].box_px,
        ctf=None,
        rotations=None,
        shifts_px=None,
        optics_group=np.zeros(sum(len(p) for p in parts), dtype=np.int64),
        source_path=str(path),
        source_format="txt",
    )


# ------------------------------------------------------------ optics checks
#: Optics that training does not model: (what, RELION columns, cryoSPARC fields, trivial).
#: ``trivial`` tells the value that means "absent" ("zero", "identity" for a
#: magnification matrix element ``rlnMagMatIJ``, or "false" for a flag).
_IGNORED_OPTICS = (
    ("beam tilt", ("rlnBeamTiltX", "rlnBeamTiltY"), ("ctf/tilt_A",), "zero"),
    ("anisotropic magnification",
     ("rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11"), ("ctf/anisomag",),
     "identity"),
    ("odd Zernike aberrations", ("rlnOddZernike",), ("ctf/trefoil_A", "ctf/shift_A"), "zero"),
    ("even Zernike aberrations", ("rlnEvenZernike",), ("ctf/tetra_A",), "zero"),
    ("phase-flipped images", ("rlnCtfDataArePhaseFlipped",), (), "false"),
    ("CTF-premultiplied images", ("rlnCtfDataAreCtfPremultiplied",), (), "false"),
)  # fmt: skip
_warned_optics: set[str] = set()


def _numbers(values: Any) -> np.ndarray:
    """All numbers in a column (numeric, or strings such as ``'[0.1,0,-2]'``)."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iufb":
        return arr.astype(np.float64).reshape(-1)
    import re

    text = " ".join(str(v) for v in arr.reshape(-1).tolist())
    found = re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", text)
    return np.array([float(t) for t in found], dtype=np.float64)


def _nontrivial(name: str, values: Any, trivial: str) -> bool:
    x = _numbers(values)
    x = x[np.isfinite(x)]
    if not x.size:
        return False
    if trivial == "identity":
        # RELION's matrix elements; cryoSPARC's ctf/anisomag holds the deviation from I
        target = 1.0 if name in ("rlnMagMat00", "rlnMagMat11") else 0.0
        return bool(np.any(np.abs(x - target) > 1e-6))
    return bool(np.any(x != 0))


def ignored_optics(table: ParticleTable) -> list[str]:
    """Optics in ``table``'s file that training ignores, e.g. ``'beam tilt (rlnBeamTiltX)'``.

    Looks at the star particle and optics blocks or the .cs fields (also of a saved
    .npz); a column counts only when its values are not trivial (non-zero tilt or
    aberrations, a magnification matrix other than identity, a flag set to 1).
    """
    raw = table.raw
    found = []
    for what, star_cols, cs_fields, trivial in _IGNORED_OPTICS:
        cols: list[str] = []
        if isinstance(raw, pd.DataFrame):
            frames = [raw] + ([table.raw_optics] if table.raw_optics is not None else [])
            for c in star_cols:
                if any(c in f.columns and _nontrivial(c, f[c].to_numpy(), trivial) for f in frames):
                    cols.append(c)
        elif isinstance(raw, np.ndarray) and raw.dtype.names:
            cols = [
                f for f in cs_fields if f in raw.dtype.names and _nontrivial(f, raw[f], trivial)
            ]
        if cols:
            found.append(f"{what} ({', '.join(cols)})")
    return found


def _warn_ignored_optics(table: ParticleTable) -> None:
    """Warn once per file about optics that training ignores."""
    key = str(table.source_path)
    if key in _warned_optics:
        return
    found = ignored_optics(table)
    if found:
        _warned_optics.add(key)
        _log.warning(
            "%s holds %s, which cryofield ignores: its CTF uses defocus, astigmatism, voltage, "
            "Cs, amplitude contrast, phase shift and B-factor only, and expects images that "
            "are neither phase-flipped nor CTF-premultiplied",
            key,
            "; ".join(found),
        )


def common_pixel_size(
    apix_A: np.ndarray, optics_group: np.ndarray | None, source: object, rtol: float = 1e-4
) -> float:
    """The one pixel size of a set of images; refuses several (naming the optics groups).

    Training and reconstruction use one pixel size for all images. Particles whose pixel
    sizes differ by more than ``rtol`` are refused rather than averaged.

    Raises
    ------
    InputFileError
        Pixel sizes differ, e.g. ``group 1: 1.25 A, group 3: 1.035 A``.
    """
    apix = np.asarray(apix_A, dtype=np.float64).reshape(-1)
    if not apix.size:
        raise InputFileError(source, "no particles")
    lo, hi = float(apix.min()), float(apix.max())
    if hi - lo <= rtol * hi:
        return float(apix[0])
    groups = np.zeros(len(apix), np.int64) if optics_group is None else np.asarray(optics_group)
    parts = []
    for g in np.unique(groups):
        vals = "/".join(f"{v:.6g}" for v in np.unique(apix[groups == g]))
        parts.append(f"group {int(g)}: {vals} A")
    raise InputFileError(
        source,
        f"particles have different pixel sizes ({', '.join(parts)}); cryofield uses one pixel "
        "size for all images and will not average them: train on one optics group at a time "
        "(select its particles with --ind) or resample the images to one pixel size",
    )


def load_particle_table(
    path: str | os.PathLike[str],
    datadir: str | os.PathLike[str] | None = None,
    ind: str | os.PathLike[str] | np.ndarray | None = None,
) -> ParticleTable:
    """Read particle metadata from any supported file.

    Parameters
    ----------
    path
        ``.star`` (RELION 3.0/3.1/5), ``.cs`` (cryoSPARC), ``.mrcs``/``.mrc`` (a stack),
        ``.txt`` (one stack path per line) or ``.npz`` (a table saved by
        :meth:`ParticleTable.save_npz`).
    datadir
        Folder where relative image paths are looked up first (default: the folder of
        ``path``).
    ind
        Optional index filter (array or .npy/.txt/.pkl file) applied after reading.

    Optics that training ignores (beam tilt, anisotropic magnification, Zernike terms,
    phase-flipped or CTF-premultiplied images; :func:`ignored_optics`) are named in one
    logged warning per file.

    Raises
    ------
    InputFileError
        Unknown extension, unreadable file, missing columns, bad rows or indices.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "file not found")
    suffix = path.suffix.lower()
    if suffix == ".star":
        from cryofield.io.star import read_star_table

        table = read_star_table(path, datadir=datadir)
    elif suffix == ".cs":
        from cryofield.io.cryosparc import read_cs_table

        table = read_cs_table(path, datadir=datadir)
    elif suffix in (".mrcs", ".mrc", ".st", ".map"):
        table = _stack_table(path)
    elif suffix == ".txt":
        table = _txt_table(path, datadir)
    elif suffix == ".npz":
        table = ParticleTable.load_npz(path)
    else:
        raise InputFileError(
            path, f"unknown particle file type '{suffix}' (use .star, .cs, .mrcs, .txt or .npz)"
        )
    _warn_ignored_optics(table)
    if ind is not None:
        table = table.subset(load_index(ind, len(table), path))
    return table
