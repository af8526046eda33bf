"""cryoSPARC ``.cs`` particle files (numpy structured arrays).

A ``.cs`` file is an ``.npy`` array with one record per particle, read with
``np.load(allow_pickle=False)``. Fields used:

- ``blob/path`` (bytes, relative to the cryoSPARC project folder; a leading ``>`` marks
  an imported file and is removed), ``blob/idx`` (0-based frame), ``blob/shape`` (box),
  ``blob/psize_A``;
- ``ctf/df1_A``, ``ctf/df2_A``, ``ctf/df_angle_rad``, ``ctf/accel_kv``, ``ctf/cs_mm``,
  ``ctf/amp_contrast``, ``ctf/phase_shift_rad``, ``ctf/bfactor`` (optional);
- ``alignments3D/pose`` (axis-angle, rad) and ``alignments3D/shift`` (px), converted as
  documented in :mod:`cryofield.io.poses`; ``alignments3D/psize_A`` when the shifts are
  in another pixel size than the blob.

Image paths are looked up in ``datadir`` (the cryoSPARC project folder) and then next to
the .cs file (also by file name only), as cryoDRGN does.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cryofield.errors import InputFileError
from cryofield.io.arrays import load_npy
from cryofield.io.atomic import atomic_path
from cryofield.io.metadata import (
    ParticleTable,
    check_ctf,
    pixel_size_from_stacks,
    resolve_image_paths,
)
from cryofield.io.poses import cryosparc_to_internal, internal_to_cryosparc
from cryofield.logs import get_logger

__all__ = ["read_cs", "read_cs_table", "write_cs"]

_CTF_FIELDS = {
    "defocus_u_A": "ctf/df1_A",
    "defocus_v_A": "ctf/df2_A",
    "astig_angle_deg": "ctf/df_angle_rad",
    "voltage_kV": "ctf/accel_kv",
    "cs_mm": "ctf/cs_mm",
    "amp_contrast": "ctf/amp_contrast",
}
_CTF_NAMES = {**_CTF_FIELDS, "phase_shift_deg": "ctf/phase_shift_rad", "bfactor_A2": "ctf/bfactor"}
_log = get_logger("io")


def read_cs(path: str | os.PathLike[str]) -> np.ndarray:
    """Load the structured array of a ``.cs`` file (no pickles; size checked first)."""
    path = Path(path)
    arr = load_npy(path, "cryoSPARC .cs file")
    if arr.dtype.names is None or arr.ndim != 1:
        got = "an array without fields" if arr.dtype.names is None else "a structured array"
        raise InputFileError(
            path,
            f"not a cryoSPARC .cs file (expected a 1-D structured array, one record per "
            f"particle; got {got} of shape {arr.shape})",
        )
    if len(arr) == 0:
        raise InputFileError(path, "the .cs file has no particles")
    return arr


def _field(path: Path, arr: np.ndarray, name: str, shape: tuple[int, ...] = ()) -> np.ndarray:
    """Field ``name`` as float64, checked: numeric, ``(N, *shape)`` and finite."""
    values = np.asarray(arr[name])
    if values.dtype.kind not in "iuf":
        raise InputFileError(path, f"field {name} has dtype {values.dtype}, expected numbers")
    if values.shape[1:] != shape:
        want = f"({', '.join(['N', *map(str, shape)])})"
        raise InputFileError(path, f"field {name} has shape {values.shape}, expected {want}")
    values = values.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))
    if bad.size:
        raise InputFileError(path, f"field {name} is not a finite number", row=int(bad[0]) + 1)
    return values


def _int_field(path: Path, arr: np.ndarray, name: str, minimum: int = 0) -> np.ndarray:
    """Field ``name`` as int64, checked: integer-valued and >= ``minimum``."""
    values = _field(path, arr, name)
    bad = np.flatnonzero((values != np.round(values)) | (values < minimum) | (values >= 2**62))
    if bad.size:
        row = int(bad[0])
        raise InputFileError(
            path,
            f"field {name} must be an integer >= {minimum}, got {values[row]:g}",
            row=row + 1,
        )
    return values.astype(np.int64)


def _blob_names(path: Path, arr: np.ndarray) -> np.ndarray:
    values = np.asarray(arr["blob/path"])
    if values.dtype.kind not in "SU" or values.ndim != 1:
        raise InputFileError(
            path, f"field blob/path has dtype {values.dtype}, expected text (file paths)"
        )
    if values.dtype.kind == "S":
        try:
            values = np.char.decode(values, "utf-8")
        except UnicodeDecodeError:
            rows = [i for i, v in enumerate(values.tolist()) if not _is_utf8(v)]
            raise InputFileError(
                path, "field blob/path is not UTF-8 text", row=rows[0] + 1
            ) from None
    names = np.char.lstrip(values.astype(str), ">")
    empty = np.flatnonzero(np.char.str_len(np.char.strip(names)) == 0)
    if empty.size:
        raise InputFileError(path, "field blob/path is empty", row=int(empty[0]) + 1)
    return names


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_cs_table(
    path: str | os.PathLike[str], datadir: str | os.PathLike[str] | None = None
) -> ParticleTable:
    """Read a cryoSPARC ``.cs`` file into a :class:`~cryofield.io.metadata.ParticleTable`.

    Pixel size: ``blob/psize_A``, else the MRC header of the particles' stack
    (:func:`~cryofield.io.metadata.pixel_size_from_stacks`: a warning when both exist and
    differ by more than 1 %, an error when neither does). CTF: all of ``ctf/df1_A``,
    ``ctf/df2_A``, ``ctf/df_angle_rad``, ``ctf/accel_kv``, ``ctf/cs_mm`` and
    ``ctf/amp_contrast``, or none (then a warning: no CTF correction); some but not all
    is an error naming the missing fields.

    Raises
    ------
    InputFileError
        Unreadable file; missing ``blob/path``/``blob/idx``; a field of the wrong type or
        shape, non-finite, or out of range (named with its row); an incomplete CTF.
    """
    path = Path(path)
    arr = read_cs(path)
    names = set(arr.dtype.names)
    for required in ("blob/path", "blob/idx"):
        if required not in names:
            raise InputFileError(path, f"missing field {required}")
    paths, _ = resolve_image_paths(_blob_names(path, arr), path.parent, datadir)
    index = _int_field(path, arr, "blob/idx")
    n = len(arr)

    box = 0
    if "blob/shape" in names:
        raw_shape = np.asarray(arr["blob/shape"])
        shapes = _field(path, arr, "blob/shape", raw_shape.shape[1:]).reshape(n, -1)
        if shapes.shape[1] not in (1, 2):
            raise InputFileError(
                path, f"field blob/shape has shape {raw_shape.shape}, expected (N, 2)"
            )
        # all zeros: size unknown (cryofield writes that for tables without a box)
        bad = np.flatnonzero(np.any((shapes <= 0) | (shapes != np.round(shapes)), axis=1))
        if bad.size and not np.all(shapes == 0):
            raise InputFileError(
                path,
                f"field blob/shape must hold image sizes in px > 0, got {shapes[bad[0]].tolist()}",
                row=int(bad[0]) + 1,
            )
        if np.any(shapes[:, 0] != shapes[:, -1]):
            row = int(np.flatnonzero(shapes[:, 0] != shapes[:, -1])[0]) + 1
            raise InputFileError(path, f"field blob/shape: images are not square {shapes[row - 1]}",
                                 row=row)  # fmt: skip
        if len(np.unique(shapes[:, 0])) > 1:
            raise InputFileError(path, f"several box sizes {np.unique(shapes[:, 0]).tolist()}")
        box = int(shapes[0, 0])
    apix = None
    if "blob/psize_A" in names:
        apix = _field(path, arr, "blob/psize_A")
        _check_positive(path, apix, "blob/psize_A")

    ctf = _ctf(path, arr, names, n)

    apix, box_hdr = pixel_size_from_stacks(path, apix, paths, "blob/psize_A")

    rotations = shifts = None
    if "alignments3D/pose" in names:
        pose = _field(path, arr, "alignments3D/pose", (3,))
        shift_cs = None
        if "alignments3D/shift" in names:
            shift_cs = _field(path, arr, "alignments3D/shift", (2,))
            if "alignments3D/psize_A" in names:
                # shifts are in pixels of alignments3D/psize_A; express them in blob pixels
                align_apix = _field(path, arr, "alignments3D/psize_A")
                _check_positive(path, align_apix, "alignments3D/psize_A")
                shift_cs = shift_cs * (align_apix / apix)[:, None]
        rotations, shifts = cryosparc_to_internal(pose, shift_cs)

    group = (
        _int_field(path, arr, "ctf/exp_group_id")
        if "ctf/exp_group_id" in names
        else np.zeros(n, dtype=np.int64)
    )
    return ParticleTable(
        image_paths=paths,
        image_index=index,
        apix_A=apix,
        box_px=box or box_hdr,
        ctf=ctf,
        rotations=rotations,
        shifts_px=shifts,
        optics_group=group,
        source_path=str(path),
        source_format="cs",
        raw=arr,
    )


def _check_positive(path: Path, values: np.ndarray, name: str) -> None:
    bad = np.flatnonzero(values <= 0)
    if bad.size:
        raise InputFileError(
            path, f"field {name} must be > 0, got {values[bad[0]]:g}", row=int(bad[0]) + 1
        )


def _ctf(path: Path, arr: np.ndarray, names: set[str], n: int) -> dict[str, np.ndarray] | None:
    """CTF of every particle; None (with a warning) when the file has no CTF fields."""
    present = [f for f in _CTF_FIELDS.values() if f in names]
    if not present:
        _log.warning(
            "%s: no CTF fields (%s): the images will be used without CTF correction",
            path, ", ".join(_CTF_FIELDS.values()),
        )  # fmt: skip
        return None
    missing = [f for f in _CTF_FIELDS.values() if f not in names]
    if missing:
        raise InputFileError(
            path,
            f"missing CTF field{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(the file has {', '.join(present)})",
        )
    ctf = {key: _field(path, arr, field) for key, field in _CTF_FIELDS.items()}
    ctf["astig_angle_deg"] = np.rad2deg(ctf["astig_angle_deg"])
    ctf["phase_shift_deg"] = (
        np.rad2deg(_field(path, arr, "ctf/phase_shift_rad"))
        if "ctf/phase_shift_rad" in names
        else np.zeros(n)
    )
    ctf["bfactor_A2"] = _field(path, arr, "ctf/bfactor") if "ctf/bfactor" in names else np.zeros(n)
    check_ctf(path, ctf, _CTF_NAMES)
    return ctf


def _array_from_fields(table: ParticleTable, cs_dir: Path) -> np.ndarray:
    """A minimal cryoSPARC particle array built from a table's own fields."""
    n = len(table)
    rel = []
    for p in table.image_paths:
        r = os.path.relpath(p, cs_dir)
        rel.append(p if r.startswith("..") else r)
    width = max(len(r.encode()) for r in rel) if rel else 1
    fields: list[tuple] = [
        ("uid", "<u8"),
        ("blob/path", f"S{width}"),
        ("blob/idx", "<u4"),
        ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"),
    ]
    if table.ctf is not None:
        fields += [(f, "<f4") for f in _CTF_FIELDS.values()]
        fields += [("ctf/phase_shift_rad", "<f4"), ("ctf/bfactor", "<f4"),
                   ("ctf/exp_group_id", "<u4")]  # fmt: skip
    arr = np.zeros(n, dtype=fields)
    arr["uid"] = np.random.default_rng().integers(0, 2**63, size=n, dtype=np.uint64)
    arr["blob/path"] = [r.encode() for r in rel]
    arr["blob/idx"] = table.image_index
    arr["blob/shape"] = table.box_px
    arr["blob/psize_A"] = table.apix_A
    if table.ctf is not None:
        for key, field in _CTF_FIELDS.items():
            arr[field] = table.ctf[key]
        arr["ctf/df_angle_rad"] = np.deg2rad(table.ctf["astig_angle_deg"])
        arr["ctf/phase_shift_rad"] = np.deg2rad(table.ctf["phase_shift_deg"])
        arr["ctf/bfactor"] = table.ctf["bfactor_A2"]
        arr["ctf/exp_group_id"] = table.optics_group
    return arr


def _with_fields(arr: np.ndarray, new: list[tuple]) -> np.ndarray:
    """Copy of ``arr`` with the fields of ``new`` added where missing."""
    missing = [f for f in new if f[0] not in arr.dtype.names]
    if not missing:
        return arr.copy()
    out = np.zeros(len(arr), dtype=arr.dtype.descr + missing)
    for name in arr.dtype.names:
        out[name] = arr[name]
    return out


def write_cs(
    path: str | os.PathLike[str],
    table: ParticleTable,
    rotations: np.ndarray | None = None,
    shifts_px: np.ndarray | None = None,
) -> Path:
    """Write ``table`` as a cryoSPARC ``.cs`` file, atomically.

    A table read from a .cs file keeps every original field (the structured array is
    written back as is, with poses replaced when given); other tables get the fields
    listed in the module docstring.

    Parameters
    ----------
    path
        Output ``.cs`` (written through a file object, so no ``.npy`` is appended).
    table
        Particles to write.
    rotations, shifts_px
        ``(N, 3, 3)`` / ``(N, 2)`` poses in the internal convention, written as
        ``alignments3D/pose`` and ``alignments3D/shift`` (in blob pixels).
    """
    path = Path(path)
    n = len(table)
    if table.source_format == "cs" and isinstance(table.raw, np.ndarray):
        arr = table.raw.copy()
    else:
        arr = _array_from_fields(table, path.parent)
        if rotations is None and table.rotations is not None:
            rotations, shifts_px = table.rotations, table.shifts_px
    if rotations is not None:
        rotations = np.asarray(rotations).reshape(-1, 3, 3)
        if len(rotations) != n:
            raise ValueError(f"{len(rotations)} rotations for {n} particles")
        arr = _with_fields(arr, [("alignments3D/pose", "<f4", (3,)),
                                 ("alignments3D/shift", "<f4", (2,)),
                                 ("alignments3D/psize_A", "<f4")])  # fmt: skip
        pose, _ = internal_to_cryosparc(rotations, None)
        arr["alignments3D/pose"] = pose
        if not np.any(arr["alignments3D/psize_A"]):
            arr["alignments3D/psize_A"] = table.apix_A
    if shifts_px is not None:
        shifts_px = np.asarray(shifts_px).reshape(-1, 2)
        if len(shifts_px) != n:
            raise ValueError(f"{len(shifts_px)} shifts for {n} particles")
        arr = _with_fields(arr, [("alignments3D/shift", "<f4", (2,)),
                                 ("alignments3D/psize_A", "<f4")])  # fmt: skip
        _, shift = internal_to_cryosparc(np.eye(3)[None].repeat(n, 0), shifts_px)
        arr["alignments3D/shift"] = shift
        arr["alignments3D/psize_A"] = table.apix_A
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
    return path
