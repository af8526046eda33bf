"""Drive the peer (cryoDRGN 4.x ``cryodrgn abinit``, the public DRGN-AI code) and read its outputs.

The peer lives in its own virtual environment (never the project's); everything here runs
it through :mod:`subprocess` and reads its files without importing it.

Peer conventions pinned here (read from cryoDRGN 4.3.1's source, ``commands/abinit.py``,
``models_ai.py``, ``pose_search_ai.py``, ``lattice.py``):

* ``pose.N.pkl`` holds ``(rots (N, 3, 3), trans (N, 2))``. ``rots`` multiply the lattice
  as row vectors, ``coords @ rots`` (``models_ai.DrgnAI.forward``), exactly like
  ``cryodrgn train_vae``, so they are RELION's matrix ``A``, our internal ``R``.
* ``trans`` in an ``abinit`` pose file is in **pixels** of the training box, not a
  fraction of the box as in the pose pickles of ``parse_pose_star``: the search grid is
  ``shift_grid.base_shift_grid(..., t_extent (px), ...)`` and the shift is applied by
  ``Lattice.translate_ht`` with frequencies in cycles/px (``Lattice(D + 1, extent=0.5)``,
  ``freqs2d = coords / extent / 2``). ``translate_ht`` computes
  ``H'(k) = cos(2 pi k.t) H(k) + sin(2 pi k.t) H(-k)``, i.e. ``F'(k) = F(k) exp(-2 pi i k.t)``:
  the image is moved by ``+trans`` to match the centred projection. Our ``shift_px`` is
  the particle's displacement, so ``shift_px = -trans``.
* ``reconstruct.N.mrc`` is the map at the end of epoch N (written at pretraining, every
  search epoch, every ``log_heavy_interval`` and the last epoch), ``D x D x D``, indexed
  ``[z, y, x]`` like ours; with ``zdim > 0`` it is rendered at the latent of the particle
  nearest the mean latent.
* ``run.log`` has one line per epoch:
  ``# =====> {Pretrain|HPS|SGD} Epoch: N finished in H:MM:SS.ffffff; total loss = L``.
* Epoch 0 is a pretraining epoch on ``min(N, --n-imgs-pretrain)`` images (default 10000)
  when ``--n-imgs-pretrain > 0``; then ``--epochs-pose-search`` search epochs and
  ``--epochs-sgd`` gradient epochs over all N images.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "PeerEpoch",
    "TimedRun",
    "last_peer_epoch",
    "parse_peer_log",
    "peer_binary",
    "read_peer_poses",
    "run_abinit",
    "run_parse_ctf_star",
    "run_timed",
    "write_peer_pose_pkl",
]

_TIME = "/usr/bin/time"


class BenchmarkError(RuntimeError):
    """A benchmark step failed (message names the step, its log and the return code)."""


@dataclass
class TimedRun:
    """One external command: return code, wall time (s), peak RSS (MB), log file."""

    cmd: list[str]
    returncode: int
    wall_s: float
    peak_rss_mb: float | None
    rss_method: str
    log_path: Path
    extra: dict[str, float] = field(default_factory=dict)

    def tail(self, n: int = 25) -> str:
        """The last ``n`` lines of the log (for error messages)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])


def _parse_time_v(text: str) -> dict[str, float]:
    """Numbers of GNU ``time -v``: peak RSS (kB), wall clock (s), user and system CPU (s)."""
    out: dict[str, float] = {}
    m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", text)
    if m:
        out["maxrss_kb"] = float(m.group(1))
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\):\s*([\d:.]+)", text)
    if m:
        parts = [float(p) for p in m.group(1).split(":")]
        secs = 0.0
        for p in parts:
            secs = secs * 60 + p
        out["elapsed_s"] = secs
    for key, name in (("User time (seconds)", "user_s"), ("System time (seconds)", "sys_s")):
        m = re.search(re.escape(key) + r":\s*([\d.]+)", text)
        if m:
            out[name] = float(m.group(1))
    return out


def run_timed(
    cmd: list[str],
    log_path: str | os.PathLike[str],
    timeout_s: float,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> TimedRun:
    """Run ``cmd`` with stdout+stderr to ``log_path``; measure wall time and peak RSS.

    Peak RSS comes from GNU ``/usr/bin/time -v`` (the largest process of the tree that
    was waited for) when it exists, else from ``getrusage(RUSAGE_CHILDREN).ru_maxrss``
    (largest child so far of this Python process, so only an upper bound when earlier
    children were larger). On timeout the process group is killed and the return code
    is 124.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    time_file = log_path.with_suffix(".time.txt")
    use_time = os.access(_TIME, os.X_OK)
    full = [_TIME, "-v", "-o", str(time_file), *cmd] if use_time else list(cmd)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            full, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = 124
    wall = time.perf_counter() - t0
    extra: dict[str, float] = {}
    if use_time and time_file.is_file():
        extra = _parse_time_v(time_file.read_text(errors="replace"))
    if "maxrss_kb" in extra:
        rss, method = extra["maxrss_kb"] / 1024.0, "/usr/bin/time -v"
    else:
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
        method = "getrusage(RUSAGE_CHILDREN) (upper bound)"
    return TimedRun(list(cmd), rc, wall, rss, method, log_path, extra)


def peer_binary(venv: str | os.PathLike[str]) -> Path:
    """``VENV/bin/cryodrgn``; raises :class:`BenchmarkError` if it is missing."""
    path = Path(venv) / "bin" / "cryodrgn"
    if not os.access(path, os.X_OK):
        raise BenchmarkError(f"peer not found: {path} (see /work/shared/peer/README.md)")
    return path


def peer_env(threads: int) -> dict[str, str]:
    """Environment for the peer: thread caps so both tools get the same CPU budget."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env.pop("PYTHONPATH", None)  # never let the project's modules shadow the peer's
    return env


def run_parse_ctf_star(
    venv: str | os.PathLike[str],
    star: str | os.PathLike[str],
    out_pkl: str | os.PathLike[str],
    D: int,
    apix_A: float,
    log_path: str | os.PathLike[str],
    timeout_s: float = 300,
) -> TimedRun:
    """``cryodrgn parse_ctf_star STAR -o OUT -D D --Apix APIX``.

    The peer reads CTF values from the optics block of a RELION 3.1 star (voltage, Cs,
    amplitude contrast) and the per-particle defocus; ``-D``/``--Apix`` are given anyway so
    that a star file without ``rlnImageSize``/``rlnImagePixelSize`` also works.
    """
    cmd = [str(peer_binary(venv)), "parse_ctf_star", str(star), "-o", str(out_pkl)]
    cmd += ["-D", str(int(D)), "--Apix", repr(float(apix_A))]
    run = run_timed(cmd, log_path, timeout_s, env=peer_env(1))
    if run.returncode != 0 or not Path(out_pkl).is_file():
        raise BenchmarkError(
            f"peer parse_ctf_star failed (rc {run.returncode}, log {run.log_path}):\n{run.tail()}"
        )
    return run


def run_abinit(
    venv: str | os.PathLike[str],
    star: str | os.PathLike[str],
    ctf_pkl: str | os.PathLike[str],
    outdir: str | os.PathLike[str],
    zdim: int,
    epochs_hps: int,
    epochs_sgd: int,
    threads: int,
    seed: int,
    log_path: str | os.PathLike[str],
    timeout_s: float,
    extra_args: list[str] | None = None,
) -> TimedRun:
    """``cryodrgn abinit`` with an explicit budget (search epochs + gradient epochs).

    ``--num-workers 0`` keeps the data loading in the main process (so the peak RSS of
    ``time -v`` covers the whole run) and ``--max-threads`` caps torch's threads.
    ``--no-analysis`` skips the peer's post-training analysis (not part of training).
    The caller checks the return code (124: timed out), so that a partial run can still be
    recorded.
    """
    outdir = Path(outdir)
    if outdir.exists():
        shutil.rmtree(outdir)
    cmd = [str(peer_binary(venv)), "abinit", str(star), "--ctf", str(ctf_pkl)]
    cmd += ["-o", str(outdir), "--zdim", str(int(zdim)), "--seed", str(int(seed))]
    cmd += ["--epochs-pose-search", str(int(epochs_hps)), "--epochs-sgd", str(int(epochs_sgd))]
    cmd += ["--max-threads", str(int(threads)), "--num-workers", "0", "--no-analysis"]
    cmd += list(extra_args or [])
    return run_timed(cmd, log_path, timeout_s, env=peer_env(threads))


@dataclass
class PeerEpoch:
    """One epoch of the peer's run.log."""

    epoch: int
    phase: str  # "pretrain", "hps" or "sgd"
    time_s: float
    loss: float


_EPOCH_RE = re.compile(
    r"=====> (Pretrain|HPS|SGD) Epoch: (\d+) finished in (?:(\d+) days?, )?"
    r"(\d+):(\d+):([\d.]+); total loss = ([-\d.eE+naif]+)"
)


def parse_peer_log(path: str | os.PathLike[str]) -> list[PeerEpoch]:
    """Per-epoch phase, time and loss from the peer's ``run.log``."""
    out = []
    for line in Path(path).read_text(errors="replace").splitlines():
        m = _EPOCH_RE.search(line)
        if not m:
            continue
        days = int(m.group(3) or 0)
        secs = days * 86400 + int(m.group(4)) * 3600 + int(m.group(5)) * 60 + float(m.group(6))
        out.append(PeerEpoch(int(m.group(2)), m.group(1).lower(), secs, float(m.group(7))))
    return out


def last_peer_epoch(outdir: str | os.PathLike[str]) -> int:
    """Largest N with both ``pose.N.pkl`` and ``reconstruct.N.mrc`` in ``outdir``."""
    eps = []
    for p in Path(outdir).glob("pose.*.pkl"):
        m = re.fullmatch(r"pose\.(\d+)\.pkl", p.name)
        if m and (Path(outdir) / f"reconstruct.{m.group(1)}.mrc").is_file():
            eps.append(int(m.group(1)))
    if not eps:
        raise BenchmarkError(f"{outdir}: no pose.N.pkl with a reconstruct.N.mrc")
    return max(eps)


def read_peer_poses(
    outdir: str | os.PathLike[str], epoch: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """The peer's poses of ``epoch`` in our convention: ``R (N, 3, 3)``, ``shift_px (N, 2)``.

    Read through :func:`cryofield.io.legacy.load_pickle` (numpy-only unpickler). See the
    module docstring for why ``shift_px = -trans`` (pixels, not box fractions).
    """
    from cryofield.io.legacy import load_pickle

    path = Path(outdir) / f"pose.{epoch}.pkl"
    obj = load_pickle(path)
    if isinstance(obj, tuple) and len(obj) == 2:
        rot, trans = obj
    else:
        rot, trans = obj, None
    R = np.asarray(rot, np.float64)
    if R.ndim != 3 or R.shape[1:] != (3, 3):
        raise BenchmarkError(f"{path}: rotations have shape {R.shape}, expected (N, 3, 3)")
    shift = None if trans is None else -np.asarray(trans, np.float64).reshape(-1, 2)
    return R, shift


def peer_volume_path(outdir: str | os.PathLike[str], epoch: int) -> Path:
    """``reconstruct.N.mrc`` of the peer (the map it rendered itself at that epoch)."""
    path = Path(outdir) / f"reconstruct.{epoch}.mrc"
    if not path.is_file():
        raise BenchmarkError(f"peer map missing: {path}")
    return path


def write_peer_pose_pkl(path: str | os.PathLike[str], R: np.ndarray, shift_px: np.ndarray) -> Path:
    """Write poses for ``cryodrgn abinit --load-poses`` in the convention pinned above.

    ``(R (N, 3, 3) float32, trans = -shift_px (N, 2) float32)``; a plain pickle of numpy
    arrays that WE produce for the peer (we never unpickle the peer's files this way).
    """
    import pickle

    path = Path(path)
    rot = np.ascontiguousarray(R, dtype=np.float32)
    trans = np.ascontiguousarray(-np.asarray(shift_px), dtype=np.float32)
    with open(path, "wb") as fh:
        pickle.dump((rot, trans), fh)
    return path
