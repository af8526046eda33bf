"""Write particles back to RELION (.star) or cryoSPARC (.cs) with poses, latents, classes.

:func:`write_particles` is the one writer used by ``cryofield export``, ``select`` and
the end of ``train``. It writes a subset of the *original* input table:

- every original column is kept (RELION: the particle block and the ``data_optics``
  block; cryoSPARC: every field of the structured array). Across formats the original
  columns are carried under their own names: a .cs field ``ctf/df1_A`` becomes the star
  column ``_ctf/df1_A`` (vector fields one column per component, ``_ctf/shift_A.0``,
  ``_ctf/shift_A.1``; bytes decoded as UTF-8), a star column ``rlnMicrographName`` becomes
  the .cs field ``rlnMicrographName`` (optics columns are joined to each particle). The
  standard fields (image location, pixel size, box, CTF, optics group, poses) are always
  also written in the target's own columns by :mod:`cryofield.io.star` /
  :mod:`cryofield.io.cryosparc`.
- image paths point at the original stacks: relative to the output file's folder when
  the stack is inside it, absolute otherwise; a stack that cannot be found keeps the
  name the input file gave it.
- a table read from a star file written by ``cryofield downsample`` (it links each
  particle to the image it was cropped from: ``rlnImageOriginalName``, see
  :mod:`cryofield.io.star`) is written as its ORIGINAL particles: original image names,
  box, pixel size (optics block) and origins, shifts converted at the original pixel
  size (:func:`cryofield.io.star.original_table`). A missing original stack is an error
  that names it; ``downsampled=True`` writes the downsampled particles instead.
- poses are written in the target format's convention (:mod:`cryofield.io.poses`):
  RELION ``rlnAngleRot/Tilt/Psi`` (deg) and ``rlnOriginX/YAngst`` (``rlnOriginX/Y`` in
  px for a RELION 3.0 file that already has them); cryoSPARC ``alignments3D/pose``
  (axis-angle) and ``alignments3D/shift`` (px of ``blob/psize_A``).
- latents ``z`` (N, K) as numbered columns: star ``rlnCryofieldZ01 .. rlnCryofieldZK``,
  cs fields ``cryofield/z01 .. cryofield/zK`` (float32); cluster labels (0-based) as
  ``rlnClassNumber = label + 1`` (RELION classes start at 1) and
  ``alignments3D/class = label`` (cryoSPARC classes start at 0).

Shifts: ``shifts_px`` are in pixels of the *input table's* images (``table.apix_A``), not
of a downsampled training box. A training run stores ``shifts_A`` (A) in
``epoch_NNN/poses.npz``; pass those as ``shifts_A=`` and they are divided by the pixel
size of each written particle (the original's, when the link is followed).

Symmetry and mask (``symmetry=``, ``mask=``: the run's ``--symmetry`` and ``--mask``,
config.yaml ``symmetry`` / ``mask``). With a point group other than C1, or a mask, the
export says so; with neither, nothing is added (the files are those of before):

- .star: comment lines at the top, before the first ``data_`` block, which RELION (and
  :mod:`cryofield.io.star`, ``starfile``) skip::

      # cryofield: symmetry D7 (RELION axes)
      # cryofield: mask /abs/path/mask.mrc

  The poses are in RELION's axes (:mod:`cryofield.physics.symmetry`), each one of the
  image's ``|G|`` equivalent poses: refine them with the same ``--sym``.
- .cs (no room for comments): a sidecar ``<name>.cs.cryofield.yaml``
  (:func:`sidecar_path`, written atomically after the .cs) with ``particles``,
  ``symmetry``, ``axes``, ``note`` and ``mask``. cryoSPARC puts the 2-fold of ``Dn`` on y,
  RELION on x: the ``Dn`` poses are written in cryoSPARC's axes, ``R_cs = R Q^T`` with
  ``Q`` = 90 deg about z (:func:`cryofield.physics.symmetry.relion_to_cryosparc_dihedral`;
  the images are unchanged, the map they imply is ``V_cs(x) = V(Q^T x)``, whose group
  ``Q G Q^T`` has its 2-folds where cryoSPARC's ``Dn`` has them). ``Cn``, ``O``, ``I1``,
  ``I2`` have the same axes in both programs (``axes: cryoSPARC``, unchanged poses);
  ``T``, ``I3``, ``I4`` keep RELION's axes (``axes: RELION``) with a warning in ``note``
  (:func:`cryosparc_axes`). A .cs written without symmetry and mask removes a sidecar
  left from an earlier export to the same name.

  Carried columns follow their program: the RELION columns carried into a .cs
  (``rlnAngleRot`` ...) stay in RELION's axes, the cryoSPARC fields carried into a .star
  (``_alignments3D/pose.0`` ...) are in cryoSPARC's axes.

:func:`read_export_info` reads both back.

Outputs are written atomically (temporary file + rename) by the io writers.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from cryofield.errors import CryofieldError, InputFileError
from cryofield.io.atomic import atomic_path, write_text_atomic
from cryofield.io.cryosparc import read_cs, write_cs
from cryofield.io.metadata import ParticleTable
from cryofield.io.poses import internal_to_cryosparc, internal_to_relion
from cryofield.io.star import original_table, write_star

__all__ = [
    "ExportInfo",
    "cryosparc_axes",
    "latent_column_names",
    "latent_field_names",
    "read_export_info",
    "sidecar_path",
    "write_particles",
]

FORMATS = {".star": "star", ".cs": "cs"}

#: start of the comment lines of a .star export that name its symmetry and mask
HEADER_PREFIX = "# cryofield: "
#: the sidecar of a .cs export is ``<name>.cs`` + this
SIDECAR_SUFFIX = ".cryofield.yaml"


@dataclass(frozen=True)
class ExportInfo:
    """What an export records about its poses (:func:`read_export_info`).

    ``symmetry``: canonical point group (``C1``: none); ``axes``: ``"RELION"`` or
    ``"cryoSPARC"``, the orientation of the group's axes the poses are written in (None
    for C1); ``mask``: the ``--mask`` of the run (None: none); ``note``: the sidecar's
    explanation (None for .star files).
    """

    symmetry: str
    axes: str | None
    mask: str | None
    note: str | None = None


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The sidecar of a .cs export: ``<name>.cs.cryofield.yaml`` next to it."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def cryosparc_axes(symmetry: str) -> tuple[np.ndarray | None, str, str]:
    """How the poses of a run with point group ``symmetry`` go into a .cs file.

    Returns ``(Q, axes, note)``: ``Q`` the rotation applied (``R_cs = R Q^T``; None: the
    poses are written as they are), ``axes`` the orientation they are then in
    (``"cryoSPARC"`` or ``"RELION"``) and a one-line note for the sidecar.

    cryoSPARC's axes (module docstring of :mod:`cryofield.physics.symmetry`; Scipion's
    conventions, ``pwem.constants``: cryoSPARC's ``Dn`` is "Dyn", 2-fold on y; its ``T``
    is "T222", 2-folds on x, y, z, where RELION's ``T`` has a 3-fold on z; its ``I1`` /
    ``I2`` are RELION's ``I1`` / ``I2``, cryoSPARC's generators in cryoem-uoft/
    cryosparc-issues #127, checked in tests/io/test_export_symmetry.py): ``Dn`` is rotated
    by ``Q`` = 90 deg about z; ``Cn``, ``O``, ``I1``, ``I2`` need nothing; ``T``, ``I3`` and
    ``I4`` are left in RELION's axes with a warning.
    """
    from cryofield.physics.symmetry import canonical_symmetry, relion_to_cryosparc_dihedral

    sym = canonical_symmetry(symmetry)
    if sym[0] == "D":
        Q = relion_to_cryosparc_dihedral().numpy()
        return Q, "cryoSPARC", (
            f"poses rotated from the RELION {sym} axes (2-fold on x) into the cryoSPARC "
            f"ones (2-fold on y): R_cs = R Q^T, Q = 90 deg about z; refine with symmetry {sym}"
        )  # fmt: skip
    if sym[0] == "C" or sym in ("O", "I1", "I2"):
        return None, "cryoSPARC", (
            f"{sym} has the same axes in RELION and cryoSPARC: poses as found; refine with "
            f"symmetry {sym}"
        )  # fmt: skip
    if sym == "T":
        why = ("T of RELION has a 3-fold on z, T of cryoSPARC is taken to have its 2-folds "
               "on x, y, z (Scipion: T222)")  # fmt: skip
    else:
        why = f"cryoSPARC has no {sym} (only I1 and I2)"
    return None, "RELION", (
        f"WARNING: poses left in the RELION {sym} axes: {why}; symmetry imposed by cryoSPARC "
        f"would not match them: refine in RELION with --sym {sym}, or in cryoSPARC in C1"
    )  # fmt: skip


def latent_column_names(zdim: int) -> list[str]:
    """Star columns of a ``zdim``-dimensional latent: ``rlnCryofieldZ01`` ..."""
    width = max(2, len(str(zdim)))
    return [f"rlnCryofieldZ{k:0{width}d}" for k in range(1, zdim + 1)]


def latent_field_names(zdim: int) -> list[str]:
    """cryoSPARC fields of a ``zdim``-dimensional latent: ``cryofield/z01`` ..."""
    width = max(2, len(str(zdim)))
    return [f"cryofield/z{k:0{width}d}" for k in range(1, zdim + 1)]


def write_particles(
    path: str | os.PathLike[str],
    table: ParticleTable,
    indices: np.ndarray | None = None,
    rotations: np.ndarray | None = None,
    shifts_px: np.ndarray | None = None,
    latents: np.ndarray | None = None,
    classes: np.ndarray | None = None,
    *,
    shifts_A: np.ndarray | None = None,
    downsampled: bool = False,
    symmetry: str | None = None,
    mask: str | os.PathLike[str] | None = None,
) -> Path:
    """Write rows of ``table`` to ``path`` (.star or .cs) with optional poses/latents/classes.

    Parameters
    ----------
    path
        Output file; the format follows the extension (``.star`` or ``.cs``).
    table
        The original input table (as read by :func:`cryofield.io.load_particle_table`).
    indices
        ``(M,)`` 0-based rows of ``table`` to write, in this order (default: all N rows).
    rotations
        ``(M, 3, 3)`` poses (contract convention), one per written row, or None to keep
        the table's own poses.
    shifts_px
        ``(M, 2)`` translations in pixels of the *input* images (``table.apix_A``).
        When ``rotations`` are given without shifts, the shifts are written as zero (the
        input's origins belong to another alignment).
    latents
        ``(M, K)`` (or ``(M,)``) latent coordinates.
    classes
        ``(M,)`` 0-based non-negative integer class / cluster labels.
    shifts_A
        ``(M, 2)`` translations in A, an alternative to ``shifts_px``.
    downsampled
        For a table made by ``cryofield downsample``: write the downsampled particles
        themselves instead of the original ones they link to.
    symmetry
        Point group the ``rotations`` assume, in RELION's axes (the run's ``--symmetry``;
        None: C1). Recorded in the export; a ``Dn`` .cs gets its poses in cryoSPARC's axes
        (module docstring, :func:`cryosparc_axes`).
    mask
        The run's ``--mask`` (a path), recorded in the export.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    CryofieldError
        Unknown output extension, an empty selection, or (downsampled tables) a missing
        original stack.
    ValueError
        Arrays whose lengths do not match the selection, negative / non-integer classes,
        an unknown symmetry, or a ``Dn`` symmetry for a .cs without ``rotations``.
    """
    from cryofield.physics.symmetry import canonical_symmetry

    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise CryofieldError(f"{path}: output must end in .star or .cs, not '{path.suffix}'")
    sym = canonical_symmetry(symmetry or "C1")  # SymmetryError is a ValueError
    mask = None if mask is None or str(mask) == "" else str(mask)
    if fmt == "cs" and sym[0] == "D" and rotations is None:
        raise ValueError(f"symmetry {sym}: a .cs needs the poses (rotations=) to write them "
                         "in cryoSPARC's axes")  # fmt: skip
    idx = np.arange(len(table)) if indices is None else np.asarray(indices, dtype=np.int64)
    sub = table.subset(idx.reshape(-1))
    n = len(sub)
    if n == 0:
        raise CryofieldError(f"{path}: no particles selected, nothing to write")

    if shifts_A is not None and shifts_px is not None:
        raise ValueError("give shifts_px or shifts_A, not both")
    orig = None if downsampled else original_table(sub)
    if orig is not None:
        if shifts_px is not None:  # px of the downsampled images -> A
            shifts_A = _rows(shifts_px, n, (2,), "shifts_px") * sub.apix_A[:, None]
            shifts_px = None
        sub = orig
    if shifts_A is not None:
        shifts_px = _rows(shifts_A, n, (2,), "shifts_A") / sub.apix_A[:, None]
    if rotations is not None:
        rotations = _rows(rotations, n, (3, 3), "rotations")
        shifts_px = np.zeros((n, 2)) if shifts_px is None else shifts_px
    if shifts_px is not None:
        shifts_px = _rows(shifts_px, n, (2,), "shifts_px")
    if latents is not None:
        latents = np.asarray(latents, dtype=np.float32)
        latents = _rows(latents.reshape(len(latents), -1), n, None, "latents")
    if classes is not None:
        classes = _classes(classes, n)

    cs_rotations = None if rotations is None else _cryosparc_rotations(rotations, sym)
    if fmt == "star":
        header = _header_lines(sym, mask)
        carries_cs = sub.source_format == "cs" and isinstance(sub.raw, np.ndarray)
        if sym[0] == "D" and rotations is not None and carries_cs:
            header.append(f"{HEADER_PREFIX}carried cryoSPARC fields (_alignments3D/*) in "
                          f"cryoSPARC's {sym} axes (2-fold on y)")  # fmt: skip
        return _write_star(path, sub, rotations, shifts_px, latents, classes, header,
                           cs_rotations)  # fmt: skip
    _write_cs(path, sub, cs_rotations, shifts_px, latents, classes, rotations)
    _write_sidecar(path, sym, mask)
    return path


# ----------------------------------------------------------------------------- symmetry
def _cryosparc_rotations(rotations: np.ndarray, sym: str) -> np.ndarray:
    """Poses in the axes a .cs gets for point group ``sym`` (``R Q^T`` for ``Dn``)."""
    Q, _, _ = cryosparc_axes(sym)
    return rotations if Q is None else rotations @ Q.T


def _quote(text: str) -> str:
    """A path on one comment line: as it is, or JSON-quoted when it would not survive."""
    if text != text.strip() or any(c in text for c in '\r\n"') or not text:
        return json.dumps(text)
    return text


def _unquote(text: str) -> str:
    return json.loads(text) if text.startswith('"') else text


def _header_lines(sym: str, mask: str | None) -> list[str]:
    """The ``# cryofield:`` lines of a .star (none for C1 without a mask)."""
    if sym == "C1" and mask is None:
        return []
    lines = [f"symmetry {sym}" + (" (RELION axes)" if sym != "C1" else "")]
    if mask is not None:
        lines.append(f"mask {_quote(mask)}")
    return [HEADER_PREFIX + line for line in lines]


def _write_sidecar(path: Path, sym: str, mask: str | None) -> None:
    """``<name>.cs.cryofield.yaml`` (removed when there is nothing to record)."""
    side = sidecar_path(path)
    if sym == "C1" and mask is None:
        side.unlink(missing_ok=True)  # an earlier export's: it would describe this file
        return
    info: dict[str, object] = {"particles": path.name, "symmetry": sym}
    if sym != "C1":
        _, axes, note = cryosparc_axes(sym)
        info.update(axes=axes, note=note)
    info["mask"] = mask
    text = (
        f"# cryofield: the point group and mask of the poses in {path.name} (a .cs file has "
        "no room for them)\n" + yaml.safe_dump(info, sort_keys=False, width=1000)
    )
    write_text_atomic(side, text)


def read_export_info(path: str | os.PathLike[str]) -> ExportInfo | None:
    """Symmetry and mask recorded by :func:`write_particles` in a .star (its ``#
    cryofield:`` lines) or next to a .cs (its sidecar); None when the export has none (C1,
    no mask, or a file not written by cryofield).

    Raises
    ------
    InputFileError
        A sidecar that is not the YAML mapping :func:`write_particles` writes.
    """
    path = Path(path)
    if path.suffix.lower() == ".cs":
        side = sidecar_path(path)
        if not side.is_file():
            return None
        try:
            info = yaml.safe_load(side.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise InputFileError(side, f"not valid YAML ({err})") from None
        if not isinstance(info, dict) or "symmetry" not in info:
            raise InputFileError(side, "not a cryofield export sidecar (no 'symmetry')")
        mask = info.get("mask")
        return ExportInfo(str(info["symmetry"]), info.get("axes"),
                          None if mask is None else str(mask), info.get("note"))  # fmt: skip
    sym, axes, mask = None, None, None
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.startswith("#"):
                if line.strip():
                    break  # the header ends at the first data_ (or other) line
                continue
            if not line.startswith(HEADER_PREFIX):
                continue
            key, _, value = line[len(HEADER_PREFIX) :].rstrip("\r\n").partition(" ")
            if key == "symmetry":
                sym, _, rest = value.partition(" ")
                axes = rest.strip("()").removesuffix(" axes") or None
            elif key == "mask":
                mask = _unquote(value)
    if sym is None and mask is None:
        return None
    return ExportInfo(sym or "C1", axes, mask)


# ----------------------------------------------------------------------------- checks
def _rows(values: np.ndarray, n: int, shape: tuple[int, ...] | None, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0 or len(arr) != n:
        got = "a scalar" if arr.ndim == 0 else f"{len(arr)} rows"
        raise ValueError(f"{name} has {got} for {n} selected particles")
    if shape is not None and arr.shape[1:] != shape:
        raise ValueError(f"{name} must have shape ({n}, {', '.join(map(str, shape))}), "
                         f"got {arr.shape}")  # fmt: skip
    if not np.all(np.isfinite(arr)):
        row = int(np.flatnonzero(~np.isfinite(arr.reshape(n, -1)).all(axis=1))[0])
        raise ValueError(f"{name} row {row} is not finite")
    return arr


def _classes(classes: np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(classes).reshape(-1)
    if len(arr) != n:
        raise ValueError(f"classes has {len(arr)} rows for {n} selected particles")
    if arr.dtype.kind == "f" and np.any(arr != np.round(arr)):
        raise ValueError("classes must be integers")
    arr = arr.astype(np.int64)
    if n and arr.min() < 0:
        raise ValueError(f"classes must be 0-based non-negative labels, got {arr.min()}")
    return arr


# ----------------------------------------------------------------------------- paths
def _stack_names(table: ParticleTable, out_dir: Path, original: np.ndarray | None) -> list[str]:
    """Per-particle stack path: relative below ``out_dir``, else absolute.

    A stack that does not exist keeps its ``original`` name (when given).
    """
    out_dir = Path(os.path.abspath(out_dir))
    names: dict[str, str] = {}
    for p in np.unique(table.image_paths):
        if not Path(p).is_file():
            continue
        try:
            rel = os.path.relpath(p, out_dir)
        except ValueError:  # another drive (Windows)
            rel = p
        names[p] = p if rel.startswith("..") else rel
    out = []
    for i, p in enumerate(table.image_paths):
        if p in names:
            out.append(names[p])
        else:
            out.append(str(original[i]) if original is not None else str(p))
    return out


def _original_stack_names(raw: pd.DataFrame | np.ndarray | None) -> np.ndarray | None:
    """Per-particle stack names as the input file wrote them, or None when it has none.

    RELION: the part of ``rlnImageName`` after ``@``; cryoSPARC: ``blob/path`` without the
    ``>`` prefix.
    """
    if isinstance(raw, pd.DataFrame) and "rlnImageName" in raw.columns:
        return np.array([s.partition("@")[2] or s for s in raw["rlnImageName"].astype(str)])
    if isinstance(raw, np.ndarray) and "blob/path" in (raw.dtype.names or ()):
        return np.char.lstrip(np.char.decode(raw["blob/path"].astype(bytes), "utf-8"), ">")
    return None


# ----------------------------------------------------------------------------- star
def _write_star(
    path: Path,
    sub: ParticleTable,
    rotations: np.ndarray | None,
    shifts_px: np.ndarray | None,
    latents: np.ndarray | None,
    classes: np.ndarray | None,
    header: list[str],
    cs_rotations: np.ndarray | None,
) -> Path:
    """``cs_rotations``: the poses in cryoSPARC's axes, for carried cryoSPARC fields."""
    extra: dict[str, list[object] | np.ndarray] = {}
    stacks = _stack_names(sub, path.parent, _original_stack_names(sub.raw))
    image_names = [f"{i + 1:06d}@{s}" for i, s in zip(sub.image_index, stacks, strict=True)]
    if sub.source_format == "cs" and isinstance(sub.raw, np.ndarray):
        carried = _cs_fields_as_columns(sub.raw)
        _update_carried_cs(carried, sub, cs_rotations, shifts_px, classes)
        extra.update(carried)
    if latents is not None:
        extra.update(dict(zip(latent_column_names(latents.shape[1]), latents.T, strict=True)))
    if classes is not None:
        extra["rlnClassNumber"] = classes + 1
    kwargs = dict(rotations=rotations, shifts_px=shifts_px, extra_columns=extra,
                  image_names=image_names)  # fmt: skip
    if not header:
        return write_star(path, sub, **kwargs)
    with atomic_path(path) as tmp:  # the header lines go first, in the same atomic write
        write_star(tmp, sub, **kwargs)
        head = "".join(line + "\n" for line in header).encode("utf-8", "surrogateescape")
        tmp.write_bytes(head + tmp.read_bytes())  # starfile's bytes as they are
    return path


def _cs_fields_as_columns(arr: np.ndarray) -> dict[str, list[object] | np.ndarray]:
    """Every field of a .cs array as star columns (vector fields split, bytes decoded)."""
    out: dict[str, list[object] | np.ndarray] = {}
    for name in arr.dtype.names or ():
        values = np.asarray(arr[name])
        flat = values.reshape(len(values), -1)
        names = [name] if values.ndim == 1 else [f"{name}.{k}" for k in range(flat.shape[1])]
        for col, column in zip(names, flat.T, strict=True):
            if column.dtype.kind == "S":
                column = np.char.decode(column, "utf-8")
            if column.dtype.kind == "U":
                out[col] = column.tolist()  # starfile quotes empty / spaced strings
            elif column.dtype.kind == "u":
                # uint64 uids do not fit int64; write them as exact decimal strings
                out[col] = [str(v) for v in column.tolist()]
            else:
                out[col] = column
    return out


def _update_carried_cs(
    carried: dict[str, list[object] | np.ndarray],
    sub: ParticleTable,
    rotations: np.ndarray | None,
    shifts_px: np.ndarray | None,
    classes: np.ndarray | None,
) -> None:
    """Carried cryoSPARC alignment columns get the new poses/classes, not stale ones."""
    if rotations is not None:
        pose, shift = internal_to_cryosparc(rotations, shifts_px)
        for k in range(3):
            if f"alignments3D/pose.{k}" in carried:
                carried[f"alignments3D/pose.{k}"] = pose[:, k]
        for k in range(2):
            if f"alignments3D/shift.{k}" in carried and shift is not None:
                carried[f"alignments3D/shift.{k}"] = shift[:, k]
        if "alignments3D/psize_A" in carried:
            carried["alignments3D/psize_A"] = sub.apix_A  # shifts are in blob pixels
    if classes is not None and "alignments3D/class" in carried:
        carried["alignments3D/class"] = [str(c) for c in classes.tolist()]


# ----------------------------------------------------------------------------- cs
def _write_cs(
    path: Path,
    sub: ParticleTable,
    rotations: np.ndarray | None,
    shifts_px: np.ndarray | None,
    latents: np.ndarray | None,
    classes: np.ndarray | None,
    relion_rotations: np.ndarray | None,
) -> Path:
    """``rotations`` in the .cs's axes; ``relion_rotations`` in RELION's, for carried
    RELION columns (the same poses unless the symmetry is ``Dn``)."""
    if sub.source_format == "cs" and isinstance(sub.raw, np.ndarray):
        arr = sub.raw
    else:
        arr = _base_cs_array(path, sub)
        if rotations is None and sub.rotations is not None:
            rotations = relion_rotations = sub.rotations
            shifts_px = sub.shifts_px if sub.shifts_px is not None else np.zeros((len(sub), 2))
    new: dict[str, np.ndarray] = {}
    stacks = _stack_names(sub, path.parent, _original_stack_names(sub.raw))
    new["blob/path"] = np.array([s.encode("utf-8") for s in stacks])
    if isinstance(sub.raw, pd.DataFrame):
        carried = _star_columns_as_fields(sub)
        _update_carried_star(carried, sub, relion_rotations, shifts_px, classes)
        new.update(carried)
    if latents is not None:
        new.update(
            dict(
                zip(latent_field_names(latents.shape[1]), latents.astype(np.float32).T, strict=True)
            )
        )
    if classes is not None:
        new["alignments3D/class"] = classes.astype(np.uint32)
    arr = _set_fields(arr, new)
    return write_cs(path, replace(sub, raw=arr, source_format="cs"), rotations, shifts_px)


def _base_cs_array(path: Path, sub: ParticleTable) -> np.ndarray:
    """The standard .cs fields of a non-cryoSPARC table, as :func:`write_cs` builds them."""
    plain = replace(sub, rotations=None, shifts_px=None)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.base.", suffix=".cs", dir=path.parent)
    os.close(fd)
    try:
        write_cs(tmp_name, plain)
        return read_cs(tmp_name)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def _star_columns_as_fields(sub: ParticleTable) -> dict[str, np.ndarray]:
    """The star particle columns and the joined optics columns, as .cs fields."""
    df = sub.raw
    assert isinstance(df, pd.DataFrame)
    cols = {c: df[c].to_numpy() for c in df.columns}
    optics = sub.raw_optics
    if optics is not None and "rlnOpticsGroup" in optics.columns:
        groups = pd.to_numeric(optics["rlnOpticsGroup"]).to_numpy().astype(np.int64)
        lookup = {int(g): i for i, g in enumerate(groups)}
        rows = np.array([lookup.get(int(g), 0) for g in sub.optics_group], dtype=np.int64)
        for c in optics.columns:
            if c not in cols:
                cols[c] = optics[c].to_numpy()[rows]
    out = {}
    for name, values in cols.items():
        if values.dtype.kind in "iub":
            out[name] = values.astype(np.int64)
        elif values.dtype.kind == "f":
            out[name] = values.astype(np.float64)
        else:
            out[name] = np.array([str(v).encode("utf-8") for v in values])
    return out


def _update_carried_star(
    carried: dict[str, np.ndarray],
    sub: ParticleTable,
    rotations: np.ndarray | None,
    shifts_px: np.ndarray | None,
    classes: np.ndarray | None,
) -> None:
    """Carried RELION pose/class columns get the new poses/classes, not stale ones."""
    if rotations is not None:
        euler, origin_px = internal_to_relion(rotations, shifts_px)
        for k, name in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
            if name in carried:
                carried[name] = euler[:, k]
        if origin_px is not None:
            for k, axis in enumerate("XY"):
                if f"rlnOrigin{axis}" in carried:
                    carried[f"rlnOrigin{axis}"] = origin_px[:, k]
                if f"rlnOrigin{axis}Angst" in carried:
                    carried[f"rlnOrigin{axis}Angst"] = origin_px[:, k] * sub.apix_A
    if classes is not None and "rlnClassNumber" in carried:
        carried["rlnClassNumber"] = classes + 1


def _set_fields(arr: np.ndarray, new: dict[str, np.ndarray]) -> np.ndarray:
    """Copy of ``arr`` with fields set from ``new`` (added, or retyped when they don't fit)."""
    descr: list[tuple] = []
    existing = arr.dtype.names or ()
    for name in existing:
        dt, shape = arr.dtype.fields[name][0], arr[name].shape[1:]
        if name in new:
            dt = _field_dtype(new[name], dt)
        descr.append((name, dt.base if dt.shape else dt, shape) if shape else (name, dt))
    for name, values in new.items():
        if name not in existing:
            descr.append((name, _field_dtype(values, None)))
    out = np.zeros(len(arr), dtype=descr)
    for name in existing:
        out[name] = arr[name]
    for name, values in new.items():
        out[name] = values
    return out


def _field_dtype(values: np.ndarray, current: np.dtype | None) -> np.dtype:
    if values.dtype.kind == "S":
        width = max(1, values.dtype.itemsize)
        if current is not None and current.kind == "S":
            width = max(width, current.itemsize)
        return np.dtype(f"S{width}")
    if current is not None and current.kind == values.dtype.kind:
        return current
    return values.dtype
