"""Import of cryoDRGN pickles (index files, ``ctf.pkl``, pose pickles) without executing code.

cryoDRGN stores its metadata with :mod:`pickle`, which can run arbitrary code on load.
:func:`load_pickle` uses an unpickler whose ``find_class`` only admits what plain numpy
arrays need (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``
and their ``numpy._core`` equivalents, plus ``scalar`` for numpy scalars and
``numeric._frombuffer`` for protocol-5 pickles, ``_codecs.encode`` for protocol-2 bytes) and the
builtins ``tuple``, ``list`` and ``dict``; anything else raises
:class:`~cryofield.errors.InputFileError` ("refusing to unpickle ...").

Formats (cryoDRGN 3/4):

- index pickle: a 1-D integer array of particle indices;
- ``ctf.pkl``: ``(N, 9)`` float32 array with columns ``D, apix, dfu, dfv, dfang (deg),
  volt (kV), cs (mm), w, phase_shift (deg)`` (``cryodrgn parse_ctf_star``);
- pose pickle: ``(rot (N, 3, 3), trans (N, 2))`` with ``rot`` RELION's matrix and
  ``trans = +origin_px / D``, or just ``rot`` (see :mod:`cryofield.io.poses`).

:func:`attach_poses` also reads cryofield's own poses ``.npz`` (``backproject --poses``).
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cryofield.errors import InputFileError
from cryofield.io.metadata import ParticleTable, check_ctf, check_rotations
from cryofield.io.poses import cryodrgn_to_internal

__all__ = ["attach_legacy", "load_pickle", "read_ctf_pkl", "read_pose_pkl"]

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol-5 pickles of contiguous arrays
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # protocol <= 2 pickles store bytes as latin-1 text; pure function
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "tuple"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("__builtin__", "tuple"),
    ("__builtin__", "list"),
    ("__builtin__", "dict"),
}


#: Where each CTF value is in a ctf.pkl row (for messages).
_CTF_PKL_COLUMNS = {
    "defocus_u_A": "dfu (column 2)",
    "defocus_v_A": "dfv (column 3)",
    "astig_angle_deg": "dfang (column 4)",
    "voltage_kV": "volt (column 5)",
    "cs_mm": "cs (column 6)",
    "amp_contrast": "w (column 7)",
    "phase_shift_deg": "phase_shift (column 8)",
    "bfactor_A2": "bfactor",
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays and plain containers."""

    def __init__(self, fh: io.BufferedIOBase, path: object) -> None:
        super().__init__(fh)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise InputFileError(
                self._path,
                f"refusing to unpickle {module}.{name} (only numpy arrays are accepted)",
            )
        return super().find_class(module, name)


def load_pickle(path: str | os.PathLike[str]) -> Any:
    """Load a cryoDRGN pickle holding numpy arrays (and tuples/lists/dicts of them)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "file not found")
    try:
        with open(path, "rb") as fh:
            return _ArrayUnpickler(fh, path).load()
    except InputFileError:
        raise
    except Exception as err:  # corrupt pickles raise many different errors
        raise InputFileError(path, f"not a readable pickle ({type(err).__name__}: {err})") from None


def read_ctf_pkl(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Read a cryoDRGN ``ctf.pkl``.

    Returns
    -------
    ctf : dict
        ``(N,)`` float64 arrays under :data:`cryofield.io.metadata.CTF_KEYS`.
    apix_A : numpy.ndarray
        ``(N,)`` pixel sizes.
    box_px : int
        Image size D.
    """
    arr = np.asarray(load_pickle(path))
    if arr.ndim != 2 or arr.shape[1] != 9 or arr.dtype.kind != "f" or not len(arr):
        raise InputFileError(path, f"expected an (N, 9) float CTF array, got {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if bad.size:
        raise InputFileError(path, "CTF row has a non-finite value", row=int(bad[0]) + 1)
    a = arr.astype(np.float64)
    boxes, apix = a[:, 0], a[:, 1]
    bad = np.flatnonzero((boxes != boxes[0]) | (boxes < 1) | (boxes != np.round(boxes)))
    if bad.size:
        raise InputFileError(
            path, f"column 0 (box) must be one whole number of px, got {boxes[bad[0]]:g}",
            row=int(bad[0]) + 1,
        )  # fmt: skip
    bad = np.flatnonzero(apix <= 0)
    if bad.size:
        raise InputFileError(
            path, f"column 1 (pixel size) must be > 0, got {apix[bad[0]]:g}", row=int(bad[0]) + 1
        )
    ctf = {
        "defocus_u_A": a[:, 2],
        "defocus_v_A": a[:, 3],
        "astig_angle_deg": a[:, 4],
        "voltage_kV": a[:, 5],
        "cs_mm": a[:, 6],
        "amp_contrast": a[:, 7],
        "phase_shift_deg": a[:, 8],
        "bfactor_A2": np.zeros(len(a)),
    }
    check_ctf(path, ctf, _CTF_PKL_COLUMNS)
    return ctf, apix, int(boxes[0])


def read_pose_pkl(
    path: str | os.PathLike[str], box_px: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a cryoDRGN pose pickle; returns ``(R (N,3,3), shift_px (N,2) or None)``."""
    obj = load_pickle(path)
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        rot, trans = np.asarray(obj[0]), np.asarray(obj[1])
    else:
        rot, trans = np.asarray(obj), None
    if rot.ndim != 3 or rot.shape[1:] != (3, 3) or rot.dtype.kind != "f":
        raise InputFileError(
            path, f"expected (N, 3, 3) float rotations, got {rot.dtype} {rot.shape}"
        )
    if trans is not None and (trans.shape != (len(rot), 2) or trans.dtype.kind not in "iuf"):
        raise InputFileError(
            path, f"mismatched particle counts: {len(rot)} rotations, translations {trans.shape}"
        )
    for name, values in (("rotations", rot), ("translations", trans)):
        if values is not None:
            bad = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))
            if bad.size:
                raise InputFileError(path, f"{name} are not finite", row=int(bad[0]) + 1)
    check_rotations(path, rot, "rotations")
    return cryodrgn_to_internal(rot, trans, box_px)


def attach_legacy(
    table: ParticleTable,
    ctf_pkl: str | os.PathLike[str] | None = None,
    pose_pkl: str | os.PathLike[str] | None = None,
) -> ParticleTable:
    """Table with CTF and/or poses taken from cryoDRGN pickles (counts must match)."""
    n = len(table)
    out = table
    if ctf_pkl is not None:
        ctf, apix, box = read_ctf_pkl(ctf_pkl)
        if len(apix) != n:
            raise InputFileError(
                ctf_pkl, f"mismatched particle counts: {len(apix)} CTF rows for {n} particles"
            )
        if table.box_px and box != table.box_px:
            raise InputFileError(
                ctf_pkl, f"CTF box {box} px differs from the images' {table.box_px} px"
            )
        out = replace(out, ctf=ctf, apix_A=apix, box_px=table.box_px or box)
    if pose_pkl is not None:
        if not out.box_px:
            raise InputFileError(pose_pkl, "the image box size is unknown; cannot scale shifts")
        R, shift = read_pose_pkl(pose_pkl, out.box_px)
        if len(R) != n:
            raise InputFileError(
                pose_pkl, f"mismatched particle counts: {len(R)} poses for {n} particles"
            )
        out = replace(out, rotations=R, shifts_px=shift if shift is not None else np.zeros((n, 2)))
    return out


def attach_poses(table: ParticleTable, path: str | os.PathLike[str]) -> ParticleTable:
    """Table with rotations/shifts from a cryoDRGN pose .pkl or a poses .npz.

    The .npz holds ``rotations (N, 3, 3)`` and ``shifts_A`` or ``shifts_px`` (default
    zero), e.g. a training run's ``epoch_NNN/poses.npz``: when its ``N`` differs from the
    table's and it has ``particle_index``, the table is cut to those rows.
    """
    from cryofield.io.arrays import load_npz

    p = Path(path)
    if p.suffix.lower() == ".pkl":
        return attach_legacy(table, pose_pkl=p)
    if p.suffix.lower() != ".npz":
        raise InputFileError(p, "poses must be a cryoDRGN .pkl or an .npz with 'rotations'")
    data = load_npz(p, ("rotations",), "poses file")
    R = np.asarray(data["rotations"], dtype=np.float64)
    n = len(table)
    if len(R) != n and "particle_index" in data and len(data["particle_index"]) == len(R):
        table = table.subset(np.asarray(data["particle_index"], dtype=np.int64))
        n = len(table)
    if R.shape != (n, 3, 3):
        raise InputFileError(
            p, f"mismatched particle counts: rotations {R.shape} for {n} particles"
        )
    if "shifts_A" in data:
        shifts = np.asarray(data["shifts_A"], dtype=np.float64) / table.apix_A[:, None]
    elif "shifts_px" in data:
        shifts = np.asarray(data["shifts_px"], dtype=np.float64)
    else:
        shifts = np.zeros((n, 2))
    if shifts.shape != (n, 2):
        raise InputFileError(p, f"field 'shifts' has shape {shifts.shape}, expected ({n}, 2)")
    return replace(table, rotations=R, shifts_px=shifts)
