"""RELION star files (3.0 single block; 3.1 and 5 with ``data_optics``).

Parsing and writing use the ``starfile`` package. Reading joins each particle row to its
optics group (``rlnOpticsGroup``), so per-particle pixel size (``rlnImagePixelSize``),
box (``rlnImageSize``), voltage, Cs and amplitude contrast come from the optics block
when the particle block does not have them. RELION 3.0 files give the pixel size as
``rlnDetectorPixelSize * 1e4 / rlnMagnification``. Image names ``idx@path`` (idx from 1)
are resolved relative to ``datadir`` or the star file's folder
(:func:`cryofield.io.metadata.resolve_image_path`).

Checks (a bad file fails with one line naming the line or row and the column): every
loop row has one value per column and no column or block name repeats
(:func:`read_star`); numbers are finite, pixel sizes and voltages > 0, amplitude
contrast in [0, 1], optics groups and image sizes whole numbers. A file without a pixel
size takes it from the MRC header of its first stack (logged), a file and header that
differ by more than 1 % are warned about (the file wins), neither is an error
(:func:`cryofield.io.metadata.pixel_size_from_stacks`). A CTF needs ``rlnDefocusU/V/
Angle``, ``rlnVoltage`` and ``rlnSphericalAberration``: some but not all is an error
naming the missing ones, none a warning (the images are used without CTF correction).

Writing keeps every original column, the block name and the optics block; floats are
written with the shortest representation that reads back to the same float64, so
read -> write -> read is lossless. Poses are converted as documented in
:mod:`cryofield.io.poses`.

Link to the original particles (written by ``cryofield downsample``): every particle row
of a downsampled star file holds

- ``rlnImageOriginalName``: ``idx@path`` of the image it was cropped from (RELION's own
  column for this); the path is relative to the star file's folder when the stack is
  below it, else absolute;
- ``rlnCryofieldOriginalImageSize`` (px) and ``rlnCryofieldOriginalPixelSize`` (A): the
  box and pixel size of that image.

The link is followed (:func:`original_table`) only when all three columns are present:
RELION itself writes ``rlnImageOriginalName`` for other purposes (``relion_stack_create``,
particle subtraction), and those files are written back as they are. A
``rlnImageOriginalName`` that the input of ``downsample`` already had is kept in
``rlnCryofieldPriorOriginalName`` and put back when the link is followed.
"""

from __future__ import annotations

import linecache
import os
import re
import shlex
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryofield.errors import InputFileError
from cryofield.io.atomic import atomic_path
from cryofield.io.metadata import (
    ParticleTable,
    check_ctf,
    pixel_size_from_stacks,
    resolve_image_paths,
)
from cryofield.io.poses import internal_to_relion, relion_to_internal
from cryofield.logs import get_logger

__all__ = [
    "LINK_COLUMNS",
    "ORIGINAL_APIX",
    "ORIGINAL_BOX",
    "ORIGINAL_NAME",
    "has_original_link",
    "original_link_columns",
    "original_table",
    "read_star",
    "read_star_table",
    "write_star",
]

_log = get_logger("io")

#: Columns of the link from a downsampled particle to its original image (module docstring).
ORIGINAL_NAME = "rlnImageOriginalName"
ORIGINAL_BOX = "rlnCryofieldOriginalImageSize"
ORIGINAL_APIX = "rlnCryofieldOriginalPixelSize"
PRIOR_ORIGINAL_NAME = "rlnCryofieldPriorOriginalName"
LINK_COLUMNS = (ORIGINAL_NAME, ORIGINAL_BOX, ORIGINAL_APIX)

#: CTF key -> (RELION column, required when a CTF is present, default). A missing
#: amplitude contrast defaults to 0.1 with a warning, as in cryoDRGN's parse_ctf_star
#: (the interop PfCRT refinement has no such column).
_CTF_COLUMNS = {
    "defocus_u_A": ("rlnDefocusU", True, None),
    "defocus_v_A": ("rlnDefocusV", True, None),
    "astig_angle_deg": ("rlnDefocusAngle", True, None),
    "voltage_kV": ("rlnVoltage", True, None),
    "cs_mm": ("rlnSphericalAberration", True, None),
    "amp_contrast": ("rlnAmplitudeContrast", False, 0.1),
    "phase_shift_deg": ("rlnPhaseShift", False, 0.0),
    "bfactor_A2": ("rlnCtfBfactor", False, 0.0),
}


def read_star(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    """Read the particle block, the optics block (or None) and the particle block's name.

    Before ``starfile`` parses the file, every loop is checked row by row
    (:func:`_loop_layout`): a row with more or fewer values than the loop has columns, a
    repeated column or block name is an error naming the line, so a damaged file is never
    read with values under the wrong columns. What ``starfile`` returns must then have the
    same blocks, columns and row counts.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        bad = err.object[err.start]
        raise InputFileError(
            path, f"not a readable STAR file (not UTF-8 text: byte {err.start} is {bad:#04x})"
        ) from None
    layout = _loop_layout(path, text)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = starfile.read(path, always_dict=True)
    except Exception as err:  # starfile raises assorted parser errors
        raise InputFileError(path, f"not a readable STAR file ({err})") from None
    finally:
        linecache.clearcache()  # starfile reads through linecache; never reuse stale lines
    if "optics" in blocks and not isinstance(blocks["optics"], pd.DataFrame):
        raise InputFileError(path, "the data_optics block is not a table (no loop_)")
    frames = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    for name, frame in frames.items():
        if name not in layout:
            raise InputFileError(
                path, f"not a readable STAR file: block data_{name} has no loop_ of its own"
            )
        columns, n_rows = layout[name]
        if list(frame.columns) != columns or len(frame) != n_rows:
            raise InputFileError(
                path,
                f"not a readable STAR file: block data_{name} has {n_rows} rows of "
                f"{len(columns)} columns but was parsed as {len(frame)} rows of "
                f"{len(frame.columns)} columns (stray quotes or '#'?)",
            )
    optics = frames.pop("optics", None)
    if "particles" in frames:
        name = "particles"
    elif len(frames) == 1:
        name = next(iter(frames))
    elif not blocks:
        raise InputFileError(path, "not a STAR file: no data_ block (empty or truncated?)")
    else:
        raise InputFileError(
            path, f"no particle block found (blocks: {', '.join(map(repr, blocks)) or 'none'})"
        )
    df = frames[name].reset_index(drop=True)
    if len(df) == 0:
        raise InputFileError(path, f"the data_{name} block has no rows")
    return df, optics, name


_FIELD = re.compile(r'"[^"]*"|[^ \t]+')


def _fields(line: str) -> list[str]:
    """Values of a loop row as ``starfile`` (pandas, quotes ``'``/``"``, ``#`` comments)
    splits it."""
    line = line.replace("'", '"')
    if '"' not in line:
        return line.split("#", 1)[0].split()
    out = []
    for token in _FIELD.findall(line):
        if token.startswith("#"):
            break
        if not token.startswith('"') and "#" in token:
            out.append(token.split("#", 1)[0])
            break
        out.append(token)
    return out


def _check_pairs(path: Path, lines: list[str], i: int) -> None:
    """Each ``_key value`` line of the key-value block starting at line ``i`` has one value
    (as ``starfile`` splits it, with :func:`shlex.split`)."""
    while i < len(lines) and not lines[i].strip().startswith("data"):
        line = lines[i].strip()
        if line.startswith("_"):
            try:
                parts = shlex.split(line)
            except ValueError:
                parts = []
            if len(parts) != 2:
                raise InputFileError(
                    path,
                    f"line {i + 1}: '{line[:60]}' is not '_key value' (a column label "
                    "outside a loop_?)",
                )
        i += 1


def _loop_layout(path: Path, text: str) -> dict[str, tuple[list[str], int]]:
    """``{block: (columns, n_rows)}`` of the loops of a STAR file, read as ``starfile``
    reads them (a block's first ``loop_``; its rows run to the next ``data_`` line).

    Raises
    ------
    InputFileError
        A row whose number of values differs from the number of columns (naming the
        line), a loop without columns, a column or block name given twice.
    """
    lines = re.split(r"\r\n|\r|\n", text)
    layout: dict[str, tuple[list[str], int]] = {}
    seen: set[str] = set()
    i, n = 0, len(lines)
    while i < n:
        line = lines[i].strip()
        if not line.startswith("data_"):
            i += 1
            continue
        block = line[5:]
        if block in seen:
            raise InputFileError(path, f"line {i + 1}: block data_{block} appears twice")
        seen.add(block)
        i += 1
        while i < n and not lines[i].strip().startswith(("loop_", "_", "data_")):
            i += 1
        if i >= n or not lines[i].strip().startswith("loop_"):
            _check_pairs(path, lines, i)  # a key-value block (or none): not a table
            continue
        i += 1
        columns: list[str] = []
        while i < n and lines[i].strip().startswith("_"):
            name = lines[i].split()[0][1:]
            if name in columns:
                raise InputFileError(
                    path, f"line {i + 1}: column _{name} appears twice in data_{block}"
                )
            columns.append(name)
            i += 1
        if not columns:
            raise InputFileError(path, f"line {i}: the loop of data_{block} has no columns")
        rows = 0
        while i < n and not lines[i].strip().startswith("data_"):
            values = _fields(lines[i])
            if values:
                rows += 1
                if len(values) != len(columns):
                    raise InputFileError(
                        path,
                        f"line {i + 1} has {len(values)} values but data_{block} has "
                        f"{len(columns)} columns (_{columns[0]} .. _{columns[-1]}): a value "
                        "or a column label is missing or extra",
                        row=rows,
                    )
            i += 1
        layout[block] = (columns, rows)
    return layout


def _optics_rows(
    path: Path, df: pd.DataFrame, optics: pd.DataFrame | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Optics group per particle and, per particle, the row of ``optics`` it refers to."""
    if "rlnOpticsGroup" not in df.columns:
        if optics is not None and len(optics) > 1:
            raise InputFileError(path, "missing column rlnOpticsGroup with several optics groups")
        rows = None if optics is None else np.zeros(len(df), dtype=np.int64)
        group = np.ones(len(df), np.int64) if optics is not None else np.zeros(len(df), np.int64)
        return group, rows
    values = _numeric(path, df["rlnOpticsGroup"], "rlnOpticsGroup")
    group = _integers(path, values, "rlnOpticsGroup")
    if optics is None:
        return group, None
    if "rlnOpticsGroup" not in optics.columns:
        raise InputFileError(path, "data_optics block has no rlnOpticsGroup column")
    ids = _integers(
        path,
        _numeric(path, optics["rlnOpticsGroup"], "rlnOpticsGroup (data_optics)"),
        "rlnOpticsGroup (data_optics)",
    )
    if len(np.unique(ids)) < len(ids):
        raise InputFileError(
            path, f"data_optics block lists optics group {_first_repeat(ids)} twice"
        )
    lookup = {int(g): i for i, g in enumerate(ids)}
    rows = np.array([lookup.get(int(g), -1) for g in group], dtype=np.int64)
    bad = np.flatnonzero(rows < 0)
    if bad.size:
        raise InputFileError(
            path,
            f"field rlnOpticsGroup: group {int(group[bad[0]])} is not in the data_optics block",
            row=int(bad[0]) + 1,
        )
    return group, rows


def _first_repeat(values: np.ndarray) -> int:
    uniq, counts = np.unique(values, return_counts=True)
    return int(uniq[counts > 1][0])


def _integers(
    path: Path, values: np.ndarray, column: str, minimum: int | None = None
) -> np.ndarray:
    """Finite ``values`` as int64; raise (naming the row) when one is not a whole number
    (or is below ``minimum``)."""
    bad = (values != np.round(values)) | (np.abs(values) >= 2**62)
    if minimum is not None:
        bad |= values < minimum
    if np.any(bad):
        row = int(np.flatnonzero(bad)[0])
        want = "a whole number" if minimum is None else f"a whole number >= {minimum}"
        raise InputFileError(
            path, f"field {column} must be {want}, got {values[row]:g}", row=row + 1
        )
    return values.astype(np.int64)


def _numeric(path: Path, values: pd.Series | np.ndarray, column: str) -> np.ndarray:
    out = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        raise InputFileError(path, f"field {column} is not a finite number", row=int(bad[0]) + 1)
    return out


class _Columns:
    """Per-particle column lookup: the particle block first, then the joined optics row."""

    def __init__(
        self, path: Path, df: pd.DataFrame, optics: pd.DataFrame | None, rows: np.ndarray | None
    ):
        self.path, self.df, self.optics, self.rows = path, df, optics, rows

    def __contains__(self, column: str) -> bool:
        return column in self.df.columns or (
            self.optics is not None and column in self.optics.columns
        )

    def get(self, column: str) -> np.ndarray:
        if column in self.df.columns:
            return _numeric(self.path, self.df[column], column)
        assert self.optics is not None and self.rows is not None
        per_group = _numeric(self.path, self.optics[column], f"{column} (data_optics)")
        return per_group[self.rows]


#: What the pixel size is called in messages when a file has none.
_APIX_NAMES = "rlnImagePixelSize (or rlnDetectorPixelSize and rlnMagnification)"


def _apix(cols: _Columns) -> tuple[np.ndarray | None, str]:
    """Pixel size per particle (A) and the column(s) it came from; None when absent."""
    if "rlnImagePixelSize" in cols:
        name, apix = "rlnImagePixelSize", cols.get("rlnImagePixelSize")
    elif "rlnDetectorPixelSize" in cols and "rlnMagnification" in cols:
        name = "rlnDetectorPixelSize/rlnMagnification"
        detector, mag = cols.get("rlnDetectorPixelSize"), cols.get("rlnMagnification")
        _positive(cols.path, mag, "rlnMagnification")
        with np.errstate(over="ignore"):
            apix = detector * 1e4 / mag
        bad = np.flatnonzero(~np.isfinite(apix))
        if bad.size:
            raise InputFileError(
                cols.path, f"field {name}: pixel size out of range", row=int(bad[0]) + 1
            )
    elif "rlnPixelSize" in cols:
        name, apix = "rlnPixelSize", cols.get("rlnPixelSize")
    else:
        return None, _APIX_NAMES
    _positive(cols.path, apix, name)
    return apix, name


def _positive(path: Path, values: np.ndarray, column: str) -> None:
    bad = np.flatnonzero(values <= 0)
    if bad.size:
        raise InputFileError(
            path, f"field {column} must be > 0, got {values[bad[0]]:g}", row=int(bad[0]) + 1
        )


#: Columns whose presence means the file has a CTF (the optics block of a RELION 3.1 file
#: has voltage, Cs and amplitude contrast even before CTF estimation).
_DEFOCUS_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")


def _ctf(cols: _Columns) -> dict[str, np.ndarray] | None:
    """CTF of every particle; None (with a warning) when the file has no defocus columns.

    Some but not all of the required columns is an error naming every missing one.
    """
    if not any(c in cols for c in _DEFOCUS_COLUMNS):
        _log.warning(
            "%s: no CTF columns (%s): the images will be used without CTF correction",
            cols.path, ", ".join(_DEFOCUS_COLUMNS),
        )  # fmt: skip
        return None
    present = [c for c, req, _ in _CTF_COLUMNS.values() if req and c in cols]
    missing = [c for c, req, _ in _CTF_COLUMNS.values() if req and c not in cols]
    if missing:
        raise InputFileError(
            cols.path,
            f"missing CTF column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(the file has {', '.join(present)})",
        )
    n = len(cols.df)
    ctf = {}
    for key, (column, _, default) in _CTF_COLUMNS.items():
        if column in cols:
            ctf[key] = cols.get(column)
        else:
            if key == "amp_contrast":
                _log.warning(
                    "%s: no rlnAmplitudeContrast column; using %.2f (as cryoDRGN does)",
                    cols.path,
                    default,
                )
            ctf[key] = np.full(n, default)
    check_ctf(cols.path, ctf, {k: v[0] for k, v in _CTF_COLUMNS.items()})
    return ctf


def _split_names(
    path: Path, names: pd.Series, column: str = "rlnImageName"
) -> tuple[np.ndarray, np.ndarray]:
    """``idx@stack`` -> (0-based index, stack name); a name without ``@`` is frame 0."""
    idx = np.zeros(len(names), dtype=np.int64)
    stacks = np.empty(len(names), dtype=object)
    values = pd.Series(names).to_numpy(dtype=object)
    missing = np.flatnonzero(pd.isna(values))
    if missing.size:
        raise InputFileError(path, f"field {column} is missing (NaN)", row=int(missing[0]) + 1)
    for i, name in enumerate(str(v) for v in values):
        head, sep, tail = name.partition("@")
        if not sep:
            stacks[i] = name
            continue
        try:
            k = int(head)
        except ValueError:
            raise InputFileError(
                path, f"field {column}: bad image number in '{name}'", row=i + 1
            ) from None
        if k < 1:
            raise InputFileError(
                path, f"field {column}: image numbers start at 1, got '{name}'", row=i + 1
            )
        idx[i] = k - 1
        stacks[i] = tail
    return idx, stacks.astype(str)


def _per_group(group: np.ndarray, values: np.ndarray, unit: str) -> str:
    """``'group 1: 64 px, group 2: 128 px'``: the distinct values of each optics group."""
    parts = []
    for g in np.unique(group):
        vals = "/".join(f"{v:.6g}" for v in np.unique(values[group == g]))
        parts.append(f"group {int(g)}: {vals} {unit}")
    return ", ".join(parts)


def read_star_table(
    path: str | os.PathLike[str], datadir: str | os.PathLike[str] | None = None
) -> ParticleTable:
    """Read a RELION star file into a :class:`~cryofield.io.metadata.ParticleTable`."""
    path = Path(path)
    df, optics, block = read_star(path)
    if "rlnImageName" not in df.columns:
        raise InputFileError(path, f"missing column rlnImageName in data_{block}")
    group, rows = _optics_rows(path, df, optics)
    cols = _Columns(path, df, optics, rows)
    index, names = _split_names(path, df["rlnImageName"])
    paths, n_missing = resolve_image_paths(names, path.parent, datadir)
    if n_missing:
        _log.debug("%s: %d image stack(s) not found", path, n_missing)

    box = 0
    if "rlnImageSize" in cols:
        sizes = _integers(path, cols.get("rlnImageSize"), "rlnImageSize", minimum=1)
        if len(np.unique(sizes)) > 1:
            raise InputFileError(
                path,
                f"optics groups have different image sizes ({_per_group(group, sizes, 'px')}); "
                "cryofield needs one box: process each optics group separately (select its "
                "particles with --ind) or re-extract them at one box size",
            )
        box = int(sizes[0])
    ctf = _ctf(cols)
    apix, apix_name = _apix(cols)
    apix, box_hdr = pixel_size_from_stacks(path, apix, paths, apix_name)
    box = box or box_hdr

    rotations = shifts = None
    angle_cols = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    if all(c in df.columns for c in angle_cols):
        euler = np.stack([_numeric(path, df[c], c) for c in angle_cols], axis=1)
        origin = None
        if "rlnOriginXAngst" in df.columns and "rlnOriginYAngst" in df.columns:
            origin = np.stack(
                [_numeric(path, df[c], c) for c in ("rlnOriginXAngst", "rlnOriginYAngst")], 1
            )
            origin = origin / apix[:, None]
        elif "rlnOriginX" in df.columns and "rlnOriginY" in df.columns:
            origin = np.stack([_numeric(path, df[c], c) for c in ("rlnOriginX", "rlnOriginY")], 1)
        rotations, shifts = relion_to_internal(euler, origin)

    return ParticleTable(
        image_paths=paths,
        image_index=index,
        apix_A=apix,
        box_px=box,
        ctf=ctf,
        rotations=rotations,
        shifts_px=shifts,
        optics_group=group,
        source_path=os.path.abspath(path),
        source_format="star",
        raw=df,
        raw_optics=optics,
        raw_block=block,
    )


# ------------------------------------------------------------- original particles
def has_original_link(table: ParticleTable) -> bool:
    """Whether ``table`` was read from a star file written by ``cryofield downsample``."""
    raw = table.raw
    return (
        table.source_format == "star"
        and isinstance(raw, pd.DataFrame)
        and all(c in raw.columns for c in LINK_COLUMNS)
    )


def original_link_columns(table: ParticleTable, star_dir: Path) -> dict[str, list[object]]:
    """Link columns for a star file, in ``star_dir``, of images cropped from ``table``'s.

    A table that is itself downsampled links to *its* originals (so a chain of
    downsamplings still points at the first stack). A foreign ``rlnImageOriginalName``
    (not written by cryofield) is kept in ``rlnCryofieldPriorOriginalName``.
    """
    origin = original_table(table, check_files=False) or table
    if not origin.box_px:
        raise InputFileError(table.source_path, "the image size is unknown; cannot link")
    cols: dict[str, list[object]] = {
        ORIGINAL_NAME: _image_names(origin, star_dir),
        ORIGINAL_BOX: [int(origin.box_px)] * len(origin),
        ORIGINAL_APIX: origin.apix_A.tolist(),
    }
    raw = table.raw
    if isinstance(raw, pd.DataFrame) and not has_original_link(table):
        if ORIGINAL_NAME in raw.columns:
            cols[PRIOR_ORIGINAL_NAME] = raw[ORIGINAL_NAME].astype(str).tolist()
    return cols


def original_table(table: ParticleTable, check_files: bool = True) -> ParticleTable | None:
    """The original particles of a downsampled table, or None when it has no link.

    The rows are those of ``table`` (same order, same columns) with ``rlnImageName`` set
    back to ``rlnImageOriginalName``, the pixel size and box of the originals (optics
    block, ``rlnMagnification`` of a RELION 3.0 file), origins in px rescaled, shifts in
    the originals' pixels; the link columns are dropped. Relative names are looked up
    from the folder of ``table.source_path`` (the downsampled star file).

    Parameters
    ----------
    table
        A table read from a star file written by ``cryofield downsample`` (or a subset, or
        its saved .npz).
    check_files
        Check that every original stack exists, has the recorded box and holds the frames.

    Raises
    ------
    InputFileError
        A missing or mismatching original stack (named), or bad link columns.
    """
    if not has_original_link(table):
        return None
    path = Path(table.source_path)
    df = table.raw.copy()
    names = df[ORIGINAL_NAME].astype(str)
    index, stacks = _split_names(path, names, ORIGINAL_NAME)
    paths, _ = resolve_image_paths(stacks, path.parent, None)
    boxes = _numeric(path, df[ORIGINAL_BOX], ORIGINAL_BOX).astype(np.int64)
    if len(np.unique(boxes)) > 1:
        raise InputFileError(path, f"several original box sizes {sorted(set(boxes.tolist()))}")
    box = int(boxes[0])
    apix = _numeric(path, df[ORIGINAL_APIX], ORIGINAL_APIX)
    if check_files:
        _check_original_stacks(path, paths, index, box)
    df["rlnImageName"] = names.to_numpy()
    if PRIOR_ORIGINAL_NAME in df.columns:  # back in its own column and place
        df[ORIGINAL_NAME] = df.pop(PRIOR_ORIGINAL_NAME)
        df.drop(columns=[ORIGINAL_BOX, ORIGINAL_APIX], inplace=True)
    else:
        df.drop(columns=list(LINK_COLUMNS), inplace=True)
    optics = None if table.raw_optics is None else table.raw_optics.copy()
    _rescale(df, optics, table, box, apix)
    shifts = None
    if table.shifts_px is not None:
        shifts = table.shifts_px * (table.apix_A / apix)[:, None]
    return replace(
        table, image_paths=paths, image_index=index, apix_A=apix, box_px=box, shifts_px=shifts,
        raw=df, raw_optics=optics,
    )  # fmt: skip


def _check_original_stacks(path: Path, paths: np.ndarray, index: np.ndarray, box: int) -> None:
    """Every original stack exists, has images of ``box`` px and holds the named frames."""
    from cryofield.io.mrc import read_mrc_header

    stacks, first, inverse = np.unique(paths, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    last_frame = np.full(len(stacks), -1, dtype=np.int64)
    np.maximum.at(last_frame, inverse, index)
    for k, stack in enumerate(stacks):
        if not Path(stack).is_file():
            raise InputFileError(
                path,
                f"the original particles {stack} (from {ORIGINAL_NAME}, row {int(first[k]) + 1}) "
                "are not found: put them back, or write the downsampled particles instead "
                "(--write-downsampled)",
            )
        info = read_mrc_header(stack)
        if info.shape[2] != box:
            raise InputFileError(
                path,
                f"the original stack {stack} has {info.shape[2]} px images but "
                f"{ORIGINAL_BOX} says {box} px",
            )
        if last_frame[k] >= info.shape[0]:
            row = int(np.flatnonzero((inverse == k) & (index >= info.shape[0]))[0])
            raise InputFileError(
                path,
                f"{ORIGINAL_NAME} of row {row + 1} names image {int(index[row]) + 1} "
                f"of {stack}, which has {info.shape[0]} images",
            )


# ---------------------------------------------------------------------------- writing
def _format_floats(df: pd.DataFrame) -> pd.DataFrame:
    """Float columns as shortest round-trip strings (``repr``), so nothing is rounded."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype.kind == "f":
            out[col] = [repr(float(v)) for v in out[col].to_numpy()]
    return out


def _frames_from_fields(table: ParticleTable, star_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Particle and optics blocks (RELION 3.1) built from a table's own fields."""
    n = len(table)
    groups = table.optics_group
    uniq, first = np.unique(groups, return_index=True)
    new_ids = np.searchsorted(uniq, groups) + 1
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": np.arange(1, len(uniq) + 1),
            "rlnOpticsGroupName": [f"opticsGroup{i}" for i in range(1, len(uniq) + 1)],
            "rlnImagePixelSize": table.apix_A[first],
            "rlnImageSize": np.full(len(uniq), table.box_px),
            "rlnImageDimensionality": np.full(len(uniq), 2),
        }
    )
    df = pd.DataFrame({"rlnImageName": _image_names(table, star_dir)})
    if table.ctf is not None:
        optics["rlnVoltage"] = table.ctf["voltage_kV"][first]
        optics["rlnSphericalAberration"] = table.ctf["cs_mm"][first]
        optics["rlnAmplitudeContrast"] = table.ctf["amp_contrast"][first]
        df["rlnDefocusU"] = table.ctf["defocus_u_A"]
        df["rlnDefocusV"] = table.ctf["defocus_v_A"]
        df["rlnDefocusAngle"] = table.ctf["astig_angle_deg"]
        df["rlnPhaseShift"] = table.ctf["phase_shift_deg"]
        df["rlnCtfBfactor"] = table.ctf["bfactor_A2"]
    df["rlnOpticsGroup"] = new_ids if n else np.zeros(0, np.int64)
    return df, optics


def _image_names(table: ParticleTable, star_dir: Path) -> list[str]:
    """``idx@path`` names, paths relative to ``star_dir`` when below it."""
    rel: dict[str, str] = {}
    for p in np.unique(table.image_paths):
        try:
            rel[p] = os.path.relpath(p, star_dir)
        except ValueError:
            rel[p] = p
        if rel[p].startswith(".."):
            rel[p] = p
    return [
        f"{i + 1:06d}@{rel[p]}" for p, i in zip(table.image_paths, table.image_index, strict=True)
    ]


def write_star(
    path: str | os.PathLike[str],
    table: ParticleTable,
    rotations: np.ndarray | None = None,
    shifts_px: np.ndarray | None = None,
    extra_columns: dict[str, Sequence[object]] | None = None,
    image_names: Sequence[str] | None = None,
    box_px: int | None = None,
) -> Path:
    """Write ``table`` as a RELION star file, atomically.

    A table read from a star file keeps all its columns, its block name and its optics
    block; other tables get a RELION 3.1 file (optics block per optics group).

    Parameters
    ----------
    path
        Output ``.star``.
    table
        Particles to write (use :meth:`ParticleTable.subset` for a subset).
    rotations, shifts_px
        ``(N, 3, 3)`` and ``(N, 2)`` poses in the internal convention, written as
        ``rlnAngleRot/Tilt/Psi`` and origins (``rlnOriginX/Y`` in px when the file already
        uses them, else ``rlnOriginX/YAngst``). Default: the table's own poses are kept
        as they are in ``raw`` (or written from the table when it has no raw rows).
    extra_columns
        More columns, e.g. ``{"rlnClassNumber": classes}`` (N values each).
    image_names
        Replacement ``rlnImageName`` values (N strings), e.g. after downsampling.
    box_px
        New box of the images after Fourier cropping from ``table.box_px``: the pixel size
        grows by ``table.box_px / box_px`` in the optics block (``rlnImagePixelSize``,
        ``rlnImageSize``) or, for RELION 3.0 files, in ``rlnMagnification`` (else a
        ``rlnImagePixelSize`` column); origins in px are rescaled, origins in A are not.
    """
    path = Path(path)
    n = len(table)
    if isinstance(table.raw, pd.DataFrame) and table.source_format == "star":
        df = table.raw.copy()
        optics = None if table.raw_optics is None else table.raw_optics.copy()
        block = table.raw_block
        if rotations is None and table.rotations is not None and "rlnAngleRot" not in df:
            rotations, shifts_px = table.rotations, table.shifts_px  # poses attached later
    else:
        df, optics = _frames_from_fields(table, path.parent)
        block = "particles"
        if rotations is None and table.rotations is not None:
            rotations, shifts_px = table.rotations, table.shifts_px
    if image_names is not None:
        if len(image_names) != n:
            raise ValueError(f"image_names has {len(image_names)} entries for {n} particles")
        df["rlnImageName"] = list(image_names)
    if box_px is not None and box_px != table.box_px:
        if not table.box_px:
            raise ValueError("the table's box size is unknown; cannot rescale")
        _rescale(df, optics, table, box_px, table.apix_A * (table.box_px / box_px))
    if rotations is not None or shifts_px is not None:
        _set_poses(df, optics, table, rotations, shifts_px)
    for name, values in (extra_columns or {}).items():
        values = list(values)
        if len(values) != n:
            raise ValueError(f"extra column {name} has {len(values)} values for {n} particles")
        df[name.lstrip("_")] = values
    blocks = (
        {block: _format_floats(df)}
        if optics is None
        else {"optics": _format_floats(optics), block or "particles": _format_floats(df)}
    )
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, sep=" ")
    return path


def _set_poses(
    df: pd.DataFrame,
    optics: pd.DataFrame | None,
    table: ParticleTable,
    rotations: np.ndarray | None,
    shifts_px: np.ndarray | None,
) -> None:
    n = len(table)
    if rotations is not None:
        rotations = np.asarray(rotations).reshape(-1, 3, 3)
        if len(rotations) != n:
            raise ValueError(f"{len(rotations)} rotations for {n} particles")
        euler, _ = internal_to_relion(rotations, None)
        df["rlnAngleRot"], df["rlnAngleTilt"], df["rlnAnglePsi"] = euler.T
    if shifts_px is not None:
        shifts_px = np.asarray(shifts_px, dtype=np.float64).reshape(-1, 2)
        if len(shifts_px) != n:
            raise ValueError(f"{len(shifts_px)} shifts for {n} particles")
        origin = -shifts_px
        if "rlnOriginX" in df.columns and optics is None:
            df["rlnOriginX"], df["rlnOriginY"] = origin.T
        else:
            origin_A = origin * table.apix_A[:, None]
            df["rlnOriginXAngst"], df["rlnOriginYAngst"] = origin_A.T
            df.drop(columns=["rlnOriginX", "rlnOriginY"], errors="ignore", inplace=True)


def _rescale(
    df: pd.DataFrame,
    optics: pd.DataFrame | None,
    table: ParticleTable,
    box_px: int,
    apix_new: np.ndarray,
) -> None:
    """Update pixel size, box and px origins in place for images resampled to ``box_px``.

    ``apix_new`` is the new pixel size of each particle; origins in px are multiplied by
    ``table.apix_A / apix_new``, origins in A are kept. Used in both directions: by
    ``downsample`` (Fourier crop) and to restore the original particles of a downsampled
    file (:func:`original_table`).
    """
    apix_new = np.asarray(apix_new, dtype=np.float64)
    px_scale = table.apix_A / apix_new  # new px per old px
    if "rlnOriginX" in df.columns and "rlnOriginY" in df.columns:
        df["rlnOriginX"] = pd.to_numeric(df["rlnOriginX"]).to_numpy() * px_scale
        df["rlnOriginY"] = pd.to_numeric(df["rlnOriginY"]).to_numpy() * px_scale
    if optics is not None:
        first = {int(g): i for i, g in reversed(list(enumerate(table.optics_group)))}
        ratio = table.box_px / box_px if table.box_px else 1.0
        old = (
            pd.to_numeric(optics["rlnImagePixelSize"]).to_numpy()
            if "rlnImagePixelSize" in optics.columns
            else None
        )
        values = []
        for k, g in enumerate(pd.to_numeric(optics["rlnOpticsGroup"]).to_numpy()):
            i = first.get(int(g))
            if i is not None:
                values.append(float(apix_new[i]))
            else:  # a group without particles in this table: same box ratio
                values.append(float(old[k] * ratio) if old is not None else float(apix_new[0]))
        optics["rlnImagePixelSize"] = values
        optics["rlnImageSize"] = int(box_px)
        df.drop(columns=["rlnImagePixelSize", "rlnImageSize"], errors="ignore", inplace=True)
        return
    if (
        "rlnMagnification" in df.columns
        and "rlnDetectorPixelSize" in df.columns
        and ("rlnImagePixelSize" not in df.columns)
    ):
        df["rlnMagnification"] = pd.to_numeric(df["rlnMagnification"]).to_numpy() * px_scale
    else:
        df["rlnImagePixelSize"] = apix_new
    if "rlnImageSize" in df.columns:
        df["rlnImageSize"] = int(box_px)
