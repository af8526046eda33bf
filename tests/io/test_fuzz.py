"""Fuzzing the input readers: a damaged file is read correctly or refused, never misread.

A seeded mutation loop over small copies of the interop files (when present) and over
files cryofield writes itself (``write_mrc``, ``write_star``, ``write_cs``,
``ParticleTable.save_npz``, index files). Each case applies one mutation to one file and
calls its reader:

- byte level (every format): truncate, flip bytes, empty file, insert, zero or repeat a
  range;
- STAR: delete, repeat or add lines, drop, repeat or swap columns, replace values (NaN,
  inf, text, quotes, ``#``), add a value to a row;
- ``.cs``: drop a field, change its dtype or shape, NaN/inf/negative values, no records,
  not structured, bad ``blob/path`` bytes;
- ``.npz``: drop a key, change a dtype or length, NaN/inf/negative values, compressed
  archive;
- MRC: header field edits (shape, mode, extended header size, cell, space group, map ID,
  byte order) and extra bytes.

A case passes when the reader returns a result that satisfies the table invariants
(:func:`_check_table`) or raises :class:`~cryofield.errors.CryofieldError`. Mutations
that leave the meaning unchanged (identical bytes, swapped STAR columns, reordered
``.cs`` fields, a compressed ``.npz``, blank and comment lines) must give the unmutated
result. Anything else -- another exception, a hang past ``CASE_SECONDS`` -- fails with
the case number, the file and the mutation, and the damaged file is kept for replay.

The default run has a few hundred cases (seconds on one core); ``-m slow`` runs
thousands.
"""

from __future__ import annotations

import io
import pickle
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from cryofield.errors import CryofieldError
from cryofield.io.cryosparc import write_cs
from cryofield.io.indices import load_index
from cryofield.io.legacy import load_pickle, read_ctf_pkl, read_pose_pkl
from cryofield.io.metadata import CTF_KEYS, ParticleTable, load_particle_table
from cryofield.io.mrc import read_mrc, write_mrc
from cryofield.io.particles import ParticleSource
from cryofield.io.star import write_star
from cryofield.physics.rotation import random_rotations

CASE_SECONDS = 10.0
N_INDEX = 10  # particles the index files refer to


class _Hang(BaseException):
    """Raised by the alarm: not an Exception, so no reader can swallow it."""


@dataclass
class Seed:
    """One unmutated input: its file name, bytes, kind and the files it refers to."""

    name: str
    data: bytes
    kind: str  # 'star', 'cs', 'npz', 'mrc', 'ind'
    companions: dict[str, bytes] = field(default_factory=dict)


# ------------------------------------------------------------------ seed files
def _own_table(folder: Path) -> tuple[ParticleTable, bytes]:
    """A 6-particle table with CTF and poses on a 16 px stack written by cryofield."""
    rng = np.random.default_rng(0)
    stack = write_mrc(folder / "own.mrcs", rng.standard_normal((6, 16, 16)), apix_A=2.5)
    n = 6
    ctf = {k: np.zeros(n) for k in CTF_KEYS}
    ctf.update(defocus_u_A=rng.uniform(1e4, 2e4, n), defocus_v_A=rng.uniform(1e4, 2e4, n),
               astig_angle_deg=rng.uniform(0, 180, n), voltage_kV=np.full(n, 300.0),
               cs_mm=np.full(n, 2.7), amp_contrast=np.full(n, 0.1))  # fmt: skip
    table = ParticleTable(
        image_paths=np.full(n, str(stack)), image_index=np.arange(n)[::-1].copy(),
        apix_A=np.full(n, 2.5), box_px=16, ctf=ctf,
        rotations=random_rotations(n, torch.Generator().manual_seed(1)).numpy(),
        shifts_px=rng.normal(size=(n, 2)), optics_group=np.ones(n, np.int64),
        source_path=str(folder / "own.star"), source_format="star",
    )  # fmt: skip
    return table, stack.read_bytes()


def _head_star(text: str, n_rows: int) -> str:
    """The first ``n_rows`` rows of the particle loop of a star file (everything else kept)."""
    lines = text.splitlines(keepends=True)
    start = max(i for i, ln in enumerate(lines) if ln.strip().startswith("data_"))
    out, rows = lines[:start], 0
    for ln in lines[start:]:
        is_row = ln.strip() and not ln.strip().startswith(("_", "loop_", "data_", "#"))
        if is_row:
            rows += 1
            if rows > n_rows:
                continue
        out.append(ln)
    return "".join(out)


def _small_stack(src: Path, nz: int) -> bytes:
    """``src`` with only its first ``nz`` images (header ``nz`` edited, rest kept)."""
    raw = src.read_bytes()
    nx, ny = struct.unpack("<2i", raw[:8])
    ext = struct.unpack("<i", raw[92:96])[0]
    header = bytearray(raw[: 1024 + ext])
    header[8:12] = struct.pack("<i", nz)
    return bytes(header) + raw[1024 + ext : 1024 + ext + nz * nx * ny * 4]


def _seeds(folder: Path, interop: Path | None) -> list[Seed]:
    """The unmutated inputs (written into ``folder`` to build them)."""
    seeds: list[Seed] = []
    table, stack = _own_table(folder)
    own = {"own.mrcs": stack}
    write_star(folder / "own.star", table)
    write_cs(folder / "own.cs", table)
    table.save_npz(folder / "own.npz")
    seeds += [Seed("own.star", (folder / "own.star").read_bytes(), "star", own),
              Seed("own.cs", (folder / "own.cs").read_bytes(), "cs", own),
              Seed("own.npz", (folder / "own.npz").read_bytes(), "npz", own),
              Seed("own_copy.mrcs", stack, "mrc")]  # fmt: skip
    vol = np.random.default_rng(2).standard_normal((8, 8, 8))
    seeds.append(Seed("vol.mrc", write_mrc(folder / "vol.mrc", vol, 3.0).read_bytes(), "mrc"))
    ind = io.BytesIO()
    np.save(ind, np.array([3, 1, 4]))
    npz = io.BytesIO()
    np.savez(npz, indices=np.array([7, 0, 2]))
    mask = io.BytesIO()
    np.save(mask, np.arange(N_INDEX) % 3 == 0)
    seeds += [
        Seed("i.npy", ind.getvalue(), "ind"),
        Seed("i.txt", b"3\n1, 4\n# end\n", "ind"),
        Seed("i.npz", npz.getvalue(), "ind"),
        Seed("mask.npy", mask.getvalue(), "ind"),
    ]
    ctf_rows = np.tile([[16, 2.5, 15000, 14000, 10, 300, 2.7, 0.1, 0]], (4, 1))
    pose = (random_rotations(4, torch.Generator().manual_seed(2)).numpy(), np.zeros((4, 2)))
    seeds += [Seed("ctf.pkl", pickle.dumps(ctf_rows.astype(np.float32)), "ctfpkl"),
              Seed("pose.pkl", pickle.dumps(pose), "posepkl")]  # fmt: skip
    if interop is None:
        return seeds
    ctf = load_pickle(interop / "ctf1.pkl")[:6]
    rot, trans = load_pickle(interop / "pose.star.pkl")
    seeds += [Seed("ctf1.pkl", pickle.dumps(ctf, protocol=2), "ctfpkl"),
              Seed("pose.star.pkl", pickle.dumps((rot[:6], trans[:6])), "posepkl")]  # fmt: skip
    toy = {"toy_projections.mrcs": _small_stack(interop / "toy_projections.mrcs", 10)}
    relion = {"relion31.mrcs": (interop / "relion31.mrcs").read_bytes()}
    empiar = {"empiar_10076_7.mrc": (interop / "empiar_10076_7.mrc").read_bytes()}
    for name, rows, comp in [
        ("relion31.star", 5, relion),
        ("relion31.6opticsgroups.star", 12, {}),
        ("relion5.star", 17, {}),
        ("FinalRefinement-OriginalParticles-PfCRT.star", 8, {}),
        ("toy_projections.star", 10, toy),
        ("empiar_10076_7.star", 7, empiar),
    ]:
        text = _head_star((interop / name).read_text(), rows)
        seeds.append(Seed(name, text.encode(), "star", comp))
    for name, rows, comp in [
        ("cryosparc_P12_J24_001_particles.cs", 15, {}),
        ("cryosparc_J2_particles_exported.cs", 22, {}),
        ("empiar_10076_7.cs", 7, empiar),
    ]:
        arr = np.load(interop / name, allow_pickle=False)[:rows]
        buf = io.BytesIO()
        np.save(buf, arr)
        seeds.append(Seed(name, buf.getvalue(), "cs", comp))
    six = load_particle_table(interop / "relion31.6opticsgroups.star", ind=np.arange(0, 139, 9))
    seeds.append(Seed("six.npz", six.save_npz(folder / "six.npz").read_bytes(), "npz"))
    p12 = load_particle_table(interop / "cryosparc_P12_J24_001_particles.cs", ind=np.arange(8))
    seeds.append(Seed("p12.npz", p12.save_npz(folder / "p12.npz").read_bytes(), "npz"))
    # (mutated seeds never share a name with a companion file, which stays intact)
    seeds.append(Seed("toy_copy.mrcs", toy["toy_projections.mrcs"], "mrc"))
    seeds.append(Seed("hand-vol.mrc", (interop / "hand-vol.mrc").read_bytes(), "mrc"))
    return seeds


# ------------------------------------------------------------------- readers
def _check_table(t: ParticleTable) -> None:
    """What every table a reader returns must satisfy (else it was misread)."""
    n = len(t)
    assert n >= 1
    assert t.image_index.dtype == np.int64 and t.image_index.shape == (n,)
    assert np.all(t.image_index >= 0)
    assert t.apix_A.shape == (n,) and np.all(np.isfinite(t.apix_A)) and np.all(t.apix_A > 0)
    assert t.box_px >= 0
    if t.ctf is not None:
        for k in CTF_KEYS:
            assert t.ctf[k].shape == (n,) and np.all(np.isfinite(t.ctf[k])), k
        assert np.all(t.ctf["voltage_kV"] > 0)
        assert np.all((t.ctf["amp_contrast"] >= 0) & (t.ctf["amp_contrast"] <= 1))
    if t.rotations is not None:
        R = t.rotations.astype(np.float64)
        assert R.shape == (n, 3, 3) and np.all(np.isfinite(R))
        np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape),
                                   atol=1e-3)  # fmt: skip
    if t.shifts_px is not None:
        assert t.shifts_px.shape == (n, 2) and np.all(np.isfinite(t.shifts_px))


def _fingerprint_table(t: ParticleTable) -> list:
    ctf = None if t.ctf is None else [t.ctf[k] for k in CTF_KEYS]
    return [t.image_paths, t.image_index, t.apix_A, t.box_px, ctf, t.rotations, t.shifts_px,
            t.optics_group]  # fmt: skip


def _read_table(path: Path) -> list:
    t = load_particle_table(path)
    _check_table(t)
    out = _fingerprint_table(t)
    if len(t) <= 32 and all(Path(p).is_file() for p in np.unique(t.image_paths)):
        images = ParticleSource(t)[np.arange(len(t))].numpy()
        assert images.shape[0] == len(t) and np.all(np.isfinite(images))
        out.append(images)
    return out


def _read_mrc(path: Path) -> list:
    arr, info = read_mrc(path, mmap=False)
    assert arr.shape == info.shape and arr.dtype == np.float32
    assert np.isfinite(info.apix_A) and info.apix_A >= 0
    try:
        table = _read_table(path)
    except CryofieldError as err:  # a volume is refused as particles
        if "volume" not in str(err):
            raise
        table = None
    return [arr, info.apix_A, table]


def _read_index(path: Path) -> list:
    idx = load_index(path, N_INDEX, "particles.star")
    assert idx.dtype == np.int64 and idx.ndim == 1 and idx.size >= 1
    assert np.all((idx >= 0) & (idx < N_INDEX)) and len(np.unique(idx)) == idx.size
    return [idx]


def _read_ctf_pkl(path: Path) -> list:
    ctf, apix, box = read_ctf_pkl(path)
    n = len(apix)
    _check_table(
        ParticleTable(
            image_paths=np.full(n, "x.mrcs"), image_index=np.zeros(n), apix_A=apix, box_px=box,
            ctf=ctf, rotations=None, shifts_px=None, optics_group=np.zeros(n),
            source_path=str(path), source_format="mrcs",
        )
    )  # fmt: skip
    return [[ctf[k] for k in CTF_KEYS], apix, box]


def _read_pose_pkl(path: Path) -> list:
    R, shift = read_pose_pkl(path, 16)
    n = len(R)
    _check_table(
        ParticleTable(
            image_paths=np.full(n, "x.mrcs"), image_index=np.zeros(n), apix_A=np.ones(n),
            box_px=16, ctf=None, rotations=R, shifts_px=shift, optics_group=np.zeros(n),
            source_path=str(path), source_format="mrcs",
        )
    )  # fmt: skip
    return [R, shift]


READERS: dict[str, Callable[[Path], list]] = {
    "star": _read_table, "cs": _read_table, "npz": _read_table, "mrc": _read_mrc,
    "ind": _read_index, "ctfpkl": _read_ctf_pkl, "posepkl": _read_pose_pkl,
}  # fmt: skip


def _same(a: object, b: object) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.kind in "fc" and b.dtype.kind in "fc":
            return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))
        return a.shape == b.shape and bool(np.array_equal(a, b))
    return a == b


# ----------------------------------------------------------------- mutations
# Each takes (bytes, rng) and returns (new bytes, description, same_meaning).
Mutation = Callable[[bytes, np.random.Generator], tuple[bytes, str, bool]]
_VALUES = ["nan", "NaN", "inf", "-inf", "", "abc", "1e999", "-1", "0", "1.5", '"', "'", "#",
           "1@", "@x.mrcs", "-5@a.mrcs", "0@a.mrcs", "3", "1e308", "-0"]  # fmt: skip


def _pos(data: bytes, rng: np.random.Generator) -> int:
    return int(rng.integers(0, max(len(data), 1)))


def m_truncate(d: bytes, rng: np.random.Generator) -> tuple[bytes, str, bool]:
    k = _pos(d, rng)
    return d[:k], f"truncate at {k}", k == len(d)


def m_flip(d: bytes, rng: np.random.Generator) -> tuple[bytes, str, bool]:
    b = bytearray(d)
    where = []
    for _ in range(int(rng.integers(1, 9))):
        if b:
            k = _pos(d, rng)
            b[k] ^= int(rng.integers(1, 256))
            where.append(k)
    return bytes(b), f"flip bytes {where}", bytes(b) == d


def m_empty(d: bytes, rng: np.random.Generator) -> tuple[bytes, str, bool]:
    return b"", "empty file", d == b""


def m_insert(d: bytes, rng: np.random.Generator) -> tuple[bytes, str, bool]:
    k, extra = _pos(d, rng), rng.bytes(int(rng.integers(1, 64)))
    return d[:k] + extra + d[k:], f"insert {len(extra)} bytes at {k}", False


def m_zero(d: bytes, rng: np.random.Generator) -> tuple[bytes, str, bool]:
    k = _pos(d, rng)
    m = int(rng.integers(1, 2048))
    out = d[:k] + bytes(min(m, len(d) - k)) + d[k + m :]
    return out, f"zero {m} bytes at {k}", out == d


def m_repeat(d: bytes, rng: np.random.Generator) -> tuple[bytes, str, bool]:
    k = _pos(d, rng)
    m = int(rng.integers(1, 512))
    return d[: k + m] + d[k : k + m] + d[k + m :], f"repeat {m} bytes at {k}", m == 0


BYTE_MUTATIONS: list[Mutation] = [m_truncate, m_flip, m_empty, m_insert, m_zero, m_repeat]


def _loops(lines: list[str]) -> list[tuple[list[int], list[int]]]:
    """(label line numbers, row line numbers) of each loop of a star file."""
    loops, i = [], 0
    while i < len(lines):
        if lines[i].strip().startswith("loop_"):
            i += 1
            labels, rows = [], []
            while i < len(lines) and lines[i].strip().startswith("_"):
                labels.append(i)
                i += 1
            while i < len(lines) and not lines[i].strip().startswith(("data_", "loop_")):
                if lines[i].strip() and not lines[i].strip().startswith("#"):
                    rows.append(i)
                i += 1
            loops.append((labels, rows))
        else:
            i += 1
    return loops


def _star_edit(
    d: bytes, rng: np.random.Generator, edit: Callable[[list[str], np.random.Generator], str]
) -> tuple[bytes, str, bool]:
    lines = d.decode().split("\n")
    what = edit(lines, rng)
    return "\n".join(lines).encode(), what, what.startswith("=")


def _pick_loop(lines: list[str], rng: np.random.Generator) -> tuple[list[int], list[int]]:
    loops = [lp for lp in _loops(lines) if lp[0] and lp[1]]
    return loops[int(rng.integers(len(loops)))]


def e_delete_line(lines: list[str], rng: np.random.Generator) -> str:
    k = int(rng.integers(len(lines)))
    return f"delete line {k + 1}: {lines.pop(k)!r}"


def e_repeat_line(lines: list[str], rng: np.random.Generator) -> str:
    k = int(rng.integers(len(lines)))
    lines.insert(k, lines[k])
    return f"repeat line {k + 1}: {lines[k]!r}"


def e_blank_or_comment(lines: list[str], rng: np.random.Generator) -> str:
    _, rows = _pick_loop(lines, rng)
    k = rows[int(rng.integers(len(rows)))]
    extra = ["", "   ", "# a comment", "#"][int(rng.integers(4))]
    lines.insert(k, extra)
    return f"= insert {extra!r} before line {k + 1}"


def _split(line: str) -> list[str]:
    return line.split()


def e_drop_column(lines: list[str], rng: np.random.Generator) -> str:
    labels, rows = _pick_loop(lines, rng)
    c = int(rng.integers(len(labels)))
    name = lines[labels[c]].split()[0]
    for r in rows:
        vals = _split(lines[r])
        if c < len(vals):
            del vals[c]
        lines[r] = " ".join(vals)
    del lines[labels[c]]
    return f"drop column {name}"


def e_repeat_column(lines: list[str], rng: np.random.Generator) -> str:
    labels, rows = _pick_loop(lines, rng)
    c = int(rng.integers(len(labels)))
    for r in rows:
        vals = _split(lines[r])
        if c < len(vals):
            vals.append(vals[c])
        lines[r] = " ".join(vals)
    lines.insert(labels[-1] + 1, lines[labels[c]].split()[0])
    return f"repeat column {lines[labels[c]].split()[0]}"


def e_swap_columns(lines: list[str], rng: np.random.Generator) -> str:
    labels, rows = _pick_loop(lines, rng)
    if len(labels) < 2:
        return "= nothing to swap"
    a, b = sorted(rng.choice(len(labels), 2, replace=False).tolist())
    for r in rows:
        vals = _split(lines[r])
        vals[a], vals[b] = vals[b], vals[a]
        lines[r] = " ".join(vals)
    la, lb = lines[labels[a]].split()[0], lines[labels[b]].split()[0]
    lines[labels[a]], lines[labels[b]] = lb, la
    return f"= swap columns {la} and {lb}"


def e_replace_value(lines: list[str], rng: np.random.Generator) -> str:
    labels, rows = _pick_loop(lines, rng)
    r = rows[int(rng.integers(len(rows)))]
    vals = _split(lines[r])
    c = int(rng.integers(len(vals)))
    new = _VALUES[int(rng.integers(len(_VALUES)))]
    name = lines[labels[c]].split()[0] if c < len(labels) else "?"
    old, vals[c] = vals[c], new
    lines[r] = " ".join(vals)
    return f"line {r + 1}, {name}: {old!r} -> {new!r}"


def e_extra_value(lines: list[str], rng: np.random.Generator) -> str:
    _, rows = _pick_loop(lines, rng)
    r = rows[int(rng.integers(len(rows)))]
    lines[r] += " 7"
    return f"extra value on line {r + 1}"


def e_drop_keyword(lines: list[str], rng: np.random.Generator) -> str:
    keys = [i for i, ln in enumerate(lines) if ln.strip().startswith(("data_", "loop_"))]
    k = keys[int(rng.integers(len(keys)))]
    return f"delete {lines.pop(k)!r} (line {k + 1})"


STAR_EDITS = [
    e_delete_line, e_repeat_line, e_blank_or_comment, e_drop_column, e_repeat_column,
    e_swap_columns, e_replace_value, e_replace_value, e_extra_value, e_drop_keyword,
]  # fmt: skip


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


_DTYPES = ["<f4", "<f8", "<i4", "<i8", "u1", "S8", "U8", "?", ("<f4", (2,)), ("<f4", (3,))]
_BAD_NUMBERS = [np.nan, np.inf, -np.inf, -1.0, 0.0, 1e30, 0.5]


def _retyped(arr: np.ndarray, name: str, dtype: object) -> np.ndarray:
    """``arr`` with field ``name`` converted to ``dtype`` (zeros where it cannot be)."""
    descr = [(n, dtype) if n == name else (n, arr.dtype.fields[n][0]) for n in arr.dtype.names]
    out = np.zeros(len(arr), dtype=descr)
    for n in arr.dtype.names:
        try:
            with np.errstate(all="ignore"):
                src = arr[n]
                dst = out[n]
                out[n] = src if src.shape == dst.shape else src.reshape(len(src), -1)[:, :1]
        except (ValueError, TypeError):
            pass
    return out


def m_cs(d: bytes, rng: np.random.Generator) -> tuple[bytes, str, bool]:
    arr = np.load(io.BytesIO(d), allow_pickle=False)
    names = list(arr.dtype.names)
    name = names[int(rng.integers(len(names)))]
    op = int(rng.integers(9))
    if op == 0:
        keep = [n for n in names if n != name]
        return _npy_bytes(arr[keep].copy() if keep else arr[:0]), f"drop field {name}", False
    if op == 1:
        dt = _DTYPES[int(rng.integers(len(_DTYPES)))]
        return _npy_bytes(_retyped(arr, name, dt)), f"field {name} as {dt}", False
    if op == 2 and arr[name].dtype.kind == "f":
        out = arr.copy()
        v = _BAD_NUMBERS[int(rng.integers(len(_BAD_NUMBERS)))]
        row = int(rng.integers(len(arr)))
        out[name][row] = v
        return _npy_bytes(out), f"{name}[{row}] = {v}", False
    if op == 3:
        order = [names[i] for i in rng.permutation(len(names))]
        out = np.zeros(len(arr), dtype=[(n, arr.dtype.fields[n][0]) for n in order])
        for n in order:
            out[n] = arr[n]
        return _npy_bytes(out), "= reorder fields", True
    if op == 4:
        return _npy_bytes(arr[:0]), "no records", False
    if op == 5:
        return _npy_bytes(np.zeros((len(arr), 3))), "a plain float array", False
    if op == 6 and "blob/path" in names:
        out = _retyped(arr, "blob/path", "S8")
        row = int(rng.integers(len(arr)))
        out["blob/path"][row] = [b"", b"\xff\xfe", b">", b" "][int(rng.integers(4))]
        return _npy_bytes(out), f"blob/path[{row}] = {out['blob/path'][row]!r}", False
    if op == 7 and arr[name].dtype.kind in "iu":
        out = _retyped(arr, name, "<i8")
        row = int(rng.integers(len(arr)))
        out[name][row] = [-1, 2**40, 0][int(rng.integers(3))]
        return _npy_bytes(out), f"{name}[{row}] = {out[name][row]}", False
    if op == 8:
        return _npy_bytes(arr.reshape(1, -1)), "2-D array", False
    return d, "= no change", True


def _npz_bytes(data: dict[str, np.ndarray], compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **data)
    return buf.getvalue()


def m_npz(d: bytes, rng: np.random.Generator) -> tuple[bytes, str, bool]:
    with np.load(io.BytesIO(d), allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    keys = list(data)
    key = keys[int(rng.integers(len(keys)))]
    a = data[key]
    op = int(rng.integers(7))
    if op == 0:
        del data[key]
        return _npz_bytes(data), f"drop {key}", False
    if op == 1:
        dt = ["<f8", "<i8", "<U8", "?", "<f4", "<u1"][int(rng.integers(6))]
        try:
            with np.errstate(all="ignore"):
                data[key] = a.astype(dt)
        except (ValueError, TypeError):
            data[key] = np.zeros(a.shape, dt)
        return _npz_bytes(data), f"{key} as {dt}", False
    if op == 2 and a.dtype.kind in "fiu" and a.size:
        out = a.astype(np.float64).copy()
        v = _BAD_NUMBERS[int(rng.integers(len(_BAD_NUMBERS)))]
        out.reshape(-1)[int(rng.integers(out.size))] = v
        data[key] = out.astype(a.dtype) if a.dtype.kind == "f" else out
        return _npz_bytes(data), f"{key}: one value = {v}", False
    if op == 3 and a.ndim:
        data[key] = a[:-1]
        return _npz_bytes(data), f"{key} one shorter", False
    if op == 4:
        return _npz_bytes(data, compressed=True), "= compressed", True
    if op == 5:
        data["unknown_extra"] = np.arange(3)
        return _npz_bytes(dict(reversed(list(data.items())))), "= extra key, reversed", True
    if op == 6:
        data[key] = a.reshape(1, *a.shape) if a.ndim else a.reshape(1)
        return _npz_bytes(data), f"{key} reshaped to {data[key].shape}", False
    return d, "= no change", True


# offset, struct format, values: the MRC header fields edited
_HEADER_EDITS = [
    (0, "<i", [0, -1, 1, 7, 2**31 - 1]),  # nx
    (4, "<i", [0, -1, 1, 7, 2**31 - 1]),  # ny
    (8, "<i", [0, -1, 1, 2, 3, 2**20]),  # nz
    (12, "<i", [0, 1, 3, 4, 6, 12, 101, -1]),  # mode
    (28, "<i", [0, -1, 1]),  # mx
    (40, "<f", [np.nan, np.inf, -1.0, 0.0, 1e30]),  # cella.x
    (88, "<i", [0, 1, 401, -1]),  # ispg
    (92, "<i", [-1, 4, 80, 2**30]),  # nsymbt
    (208, "4s", [b"\0\0\0\0", b"MAP\0"]),  # map ID
    (212, "4s", [b"\x11\x11\0\0", b"\0\0\0\0"]),  # machine stamp
]


def m_header(d: bytes, rng: np.random.Generator) -> tuple[bytes, str, bool]:
    if len(d) < 1024:
        return d, "= no change", True
    off, fmt, values = _HEADER_EDITS[int(rng.integers(len(_HEADER_EDITS)))]
    v = values[int(rng.integers(len(values)))]
    b = bytearray(d)
    b[off : off + struct.calcsize(fmt)] = struct.pack(fmt, v)
    return bytes(b), f"header byte {off} = {v!r}", bytes(b) == d


def m_append(d: bytes, rng: np.random.Generator) -> tuple[bytes, str, bool]:
    k = int(rng.choice([1, 3, 64, 1024, 4096]))
    return d + bytes(k), f"append {k} bytes", False


def m_text_ind(d: bytes, rng: np.random.Generator) -> tuple[bytes, str, bool]:
    new = ["1.5", "-1", "10", "3", "nan", "x", "", "1e3", "0x2"][int(rng.integers(9))]
    return d.replace(b"1", new.encode(), 1), f"'1' -> {new!r}", False


MUTATIONS: dict[str, list[Mutation]] = {
    "star": BYTE_MUTATIONS + [(lambda d, r, e=e: _star_edit(d, r, e)) for e in STAR_EDITS] * 2,
    "cs": BYTE_MUTATIONS + [m_cs] * 8,
    "npz": BYTE_MUTATIONS + [m_npz] * 8,
    "mrc": BYTE_MUTATIONS + [m_header] * 6 + [m_append],
    "ind": BYTE_MUTATIONS + [m_text_ind] * 2,
    "ctfpkl": BYTE_MUTATIONS,
    "posepkl": BYTE_MUTATIONS,
}


# ------------------------------------------------------------------- the loop
@pytest.fixture(scope="module")
def fuzz_seeds(request, tmp_path_factory) -> list[Seed]:
    """The seeds: files cryofield writes, plus interop copies when the folder is present."""
    try:
        interop = request.getfixturevalue("interop_data")
    except pytest.skip.Exception:
        interop = None
    return _seeds(tmp_path_factory.mktemp("fuzz_seeds"), interop)


def _alarm(signum: int, frame: object) -> None:
    raise _Hang()


def _fuzz(seeds: list[Seed], work: Path, n_cases: int, base: int) -> dict[str, int]:
    """Run ``n_cases`` mutations in ``work``; returns counts of outcomes."""
    counts = {"read": 0, "refused": 0, "same": 0}
    reference = {}
    for seed in seeds:  # unmutated results, read in the same folder (same absolute paths)
        for name, data in seed.companions.items():
            (work / name).write_bytes(data)
        (work / seed.name).write_bytes(seed.data)
        reference[seed.name] = READERS[seed.kind](work / seed.name)
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for case in range(n_cases):
            rng = np.random.default_rng([base, case])
            seed = seeds[case % len(seeds)]
            mutations = MUTATIONS[seed.kind]
            mutate = mutations[int(rng.integers(len(mutations)))]
            data, what, same_meaning = mutate(seed.data, rng)
            same_meaning = same_meaning or data == seed.data
            path = work / seed.name
            path.write_bytes(data)
            where = f"case {case} (base {base}): {seed.name}, {what}"
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                result = READERS[seed.kind](path)
            except CryofieldError as err:
                if same_meaning:
                    pytest.fail(f"{where}: unchanged meaning but refused: {err}")
                assert str(err).strip() and "\n" not in str(err), f"{where}: message {err!r}"
                counts["refused"] += 1
                continue
            except _Hang:
                (work / f"hang_{case}_{seed.name}").write_bytes(data)
                pytest.fail(f"{where}: no answer within {CASE_SECONDS} s")
            except Exception as err:  # any other exception is a bug
                (work / f"bug_{case}_{seed.name}").write_bytes(data)
                raise AssertionError(f"{where}: {type(err).__name__}: {err}") from err
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            counts["read"] += 1
            if same_meaning:
                assert _same(result, reference[seed.name]), f"{where}: result changed"
                counts["same"] += 1
    finally:
        signal.signal(signal.SIGALRM, old)
    return counts


def test_fuzz_readers(fuzz_seeds, tmp_path):
    counts = _fuzz(fuzz_seeds, tmp_path, n_cases=20 * len(fuzz_seeds), base=2024)
    # the loop must exercise both outcomes and the meaning-preserving mutations
    assert counts["read"] > 0 and counts["refused"] > 0 and counts["same"] > 0, counts


@pytest.mark.slow
@pytest.mark.parametrize("base", [1, 2, 3])
def test_fuzz_readers_long(fuzz_seeds, tmp_path, base):
    _fuzz(fuzz_seeds, tmp_path, n_cases=1000, base=base)
