"""A ``cryofield train`` output directory: its layout, the writing of its checkpoints
(:func:`write_epoch`, :func:`append_metrics`, :func:`write_config`) and read access to
it (:class:`RunDir`).

Layout (see ``docs/dev/contracts.md``, section "Train output directory")::

    OUTDIR/config.yaml            full resolved TrainConfig
    OUTDIR/run.log
    OUTDIR/metrics.jsonl          one JSON line per epoch
    OUTDIR/particles.npz          the ParticleTable used (after --ind)
    OUTDIR/epoch_NNN/weights.pt   {"state_dict": ..., "hparams": {...}} (weights_only loadable)
    OUTDIR/epoch_NNN/state.pt     optimiser states, RNG state, tables (resume only)
    OUTDIR/epoch_NNN/poses.npz    rotations (N,3,3), shifts_px (N,2), shifts_A (N,2),
                                  particle_index (N,)
    OUTDIR/epoch_NNN/residuals.npz  residual (N,), power (N,) (junk score of analyze)
    OUTDIR/epoch_NNN/latents.npz  z (N, zdim)     (heterogeneous only)
    OUTDIR/epoch_NNN/volume.mrc   rendered map    (homogeneous only)
    OUTDIR/epoch_NNN/DONE         written last; an epoch without it is incomplete
    OUTDIR/.lock                  while a train runs (cryofield.lock)

Epochs are numbered from 1; ``epoch_000`` does not exist. The names above are the
constants below (``CONFIG_FILE``, ``POSES_FILE``, ...): the writers and the reader below
share them.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from cryofield.errors import CryofieldError, InputFileError
from cryofield.io.atomic import atomic_path, write_text_atomic
from cryofield.logs import get_logger

if TYPE_CHECKING:
    from cryofield.inference.config import TrainConfig
    from cryofield.io.metadata import ParticleTable
    from cryofield.model.field import HartleyField

_log = get_logger("run")

_EPOCH_RE = re.compile(r"^epoch_(\d{3,})$")

# ---------------------------------------------------------------- layout (one place)
#: top of the output folder
CONFIG_FILE = "config.yaml"
LOG_FILE = "run.log"
METRICS_FILE = "metrics.jsonl"
TABLE_FILE = "particles.npz"
PARTICLES_STAR = "particles.star"
VERDICT_FILE = "verdict.json"
#: inside ``epoch_NNN/``
WEIGHTS_FILE = "weights.pt"
STATE_FILE = "state.pt"
POSES_FILE = "poses.npz"
RESIDUALS_FILE = "residuals.npz"
LATENTS_FILE = "latents.npz"
VOLUME_FILE = "volume.mrc"
DONE_FILE = "DONE"

#: files ``cryofield train`` writes at the top of its output folder (besides epoch_NNN/):
#: none of them may be an input of the run (see :func:`cryofield.io.atomic.refuse_overwrite`)
RUN_FILES = (
    CONFIG_FILE, LOG_FILE, METRICS_FILE, TABLE_FILE, PARTICLES_STAR, VERDICT_FILE,
    "consensus.mrc", "consensus_half1.mrc", "consensus_half2.mrc", "consensus_fsc.txt",
)  # fmt: skip

#: what a damaged npz / torch file raises when read (truncated, not a zip, wrong content)
_DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError,
            pickle.UnpicklingError, RuntimeError)  # fmt: skip


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (torch's are paragraphs)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _reason(err: BaseException) -> str:
    """Why a run file could not be read, short (torch's messages are paragraphs, and its
    advice to load with ``weights_only=False`` must not be repeated)."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError):
        return (
            "it holds objects other than tensors and plain values; refused, as loading it "
            "could run code"
        )
    if "zip archive" in text or "central directory" in text or isinstance(err, EOFError):
        return "truncated, or not a torch checkpoint"
    line = first_line(err)
    return line if len(line) <= 120 else line[:117] + "..."


def damaged(path: Path, err: BaseException) -> InputFileError:
    """The error for a run file that exists but cannot be read."""
    folder = path.parent
    if _EPOCH_RE.match(folder.name):
        what = (
            f"the checkpoint {folder.name} is damaged (e.g. a crash or a full disk while "
            f"writing it): delete {folder} to use the epoch before, or start a new run"
        )
    else:
        what = "the file is damaged: restore it, or start a new run"
    return InputFileError(path, f"cannot be read ({_reason(err)}); {what}")


def _is_damage(err: BaseException) -> bool:
    # numpy reports unreadable files as OSError without an errno; a real OS error has one
    return isinstance(err, _DAMAGED) or (isinstance(err, OSError) and err.errno is None)


def load_run_npz(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """All arrays of an npz file of a run (:func:`cryofield.io.arrays.load_npz`); a missing
    or damaged file is an :class:`InputFileError` that says what to delete."""
    from cryofield.io.arrays import load_npz

    path = Path(path)
    if _EPOCH_RE.match(path.parent.name):
        remedy = (
            f"the checkpoint {path.parent.name} is damaged (e.g. a crash or a full disk while "
            f"writing it): delete {path.parent} to use the epoch before, or start a new run"
        )
    else:
        remedy = "restore it, or start a new run"
    return load_npz(path, required=required, what=f"run file ({path.name})", remedy=remedy)


def load_run_torch(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a damaged or foreign file (anything but
    tensors and plain values) is an :class:`InputFileError` that says what to delete."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "missing (the run did not write it)")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before failing
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        if _is_damage(err):
            raise damaged(path, err) from err
        raise


def epoch_dirname(epoch: int) -> str:
    """Name of the folder of ``epoch`` (``epoch_NNN``, 1-based)."""
    return f"epoch_{epoch:03d}"


def analyze_dirname(epoch: int) -> str:
    """Name of the folder ``cryofield analyze`` writes for ``epoch`` (``analyze.EPOCH``)."""
    return f"analyze.{epoch}"


def _ranges(values: list[int]) -> str:
    return ", ".join(map(str, values)) if len(values) <= 8 else f"{values[0]}..{values[-1]}"


def _gerund(verb: str) -> str:
    return (verb[:-1] if verb.endswith("e") else verb) + "ing"


# ---------------------------------------------------------------- writing a run
def write_config(outdir: str | Path, cfg: TrainConfig) -> None:
    """Write ``OUTDIR/config.yaml`` (the resolved configuration)."""
    write_text_atomic(Path(outdir) / CONFIG_FILE, cfg.to_yaml())


def write_epoch(
    outdir: str | Path,
    epoch: int,
    *,
    weights: dict[str, Any],
    state: dict[str, Any],
    rotations: np.ndarray,
    shifts_px: np.ndarray,
    apix_A: float,
    particle_index: np.ndarray,
    residual: np.ndarray,
    power: np.ndarray,
    metrics: dict[str, Any],
    latents: np.ndarray | None = None,
    volume: Callable[[], np.ndarray] | None = None,
) -> Path:
    """Write ``OUTDIR/epoch_NNN`` (``DONE`` last) and its line of metrics.jsonl.

    ``weights``: ``{"state_dict", "hparams"}`` of the field; ``state``: everything a
    resume needs (tensors and plain values only); ``rotations (N, 3, 3)``, ``shifts_px
    (N, 2)`` in training px of pixel size ``apix_A``; ``residual``, ``power`` ``(N,)``;
    ``latents (N, zdim)`` (heterogeneous runs) or ``volume`` (homogeneous runs: called
    after the other files are written; what it raises leaves the epoch without ``DONE``).
    """
    d = Path(outdir) / epoch_dirname(epoch)
    d.mkdir(parents=True, exist_ok=True)
    (d / DONE_FILE).unlink(missing_ok=True)
    with atomic_path(d / WEIGHTS_FILE) as tmp:
        torch.save(weights, tmp)
    with atomic_path(d / STATE_FILE) as tmp:
        torch.save(state, tmp)
    with atomic_path(d / POSES_FILE) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh, rotations=rotations.astype(np.float32), shifts_px=shifts_px.astype(np.float32),
            shifts_A=(shifts_px * apix_A).astype(np.float32),
            particle_index=np.asarray(particle_index, dtype=np.int64),
        )  # fmt: skip
    with atomic_path(d / RESIDUALS_FILE) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, residual=residual, power=power)
    if latents is not None:
        with atomic_path(d / LATENTS_FILE) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, z=latents.astype(np.float32))
    elif volume is not None:
        from cryofield.io.mrc import write_mrc

        write_mrc(d / VOLUME_FILE, volume(), apix_A)
    append_metrics(outdir, epoch, metrics)
    (d / DONE_FILE).write_text("ok\n")
    return d


def append_metrics(outdir: str | Path, epoch: int, metrics: dict[str, Any]) -> None:
    """Write ``metrics`` as the line of ``epoch`` in ``OUTDIR/metrics.jsonl``: the lines of
    this and later epochs (from a run that was resumed before them) are dropped."""
    mpath = Path(outdir) / METRICS_FILE
    lines = [ln for ln in (mpath.read_text().splitlines() if mpath.exists() else []) if ln]
    lines = [ln for ln in lines if json.loads(ln)["epoch"] < epoch]
    lines.append(json.dumps(metrics))
    write_text_atomic(mpath, "\n".join(lines) + "\n")


def checkpoint_bytes(
    field: torch.nn.Module,
    poses: torch.nn.Module,
    latents: torch.nn.Module | None,
    n_images: int,
    D: int,
    zdim: int,
) -> int:
    """Bytes one ``epoch_NNN`` folder takes (see :func:`write_epoch`): weights.pt, state.pt
    (field, pose and latent tables with their two Adam moments each), poses.npz,
    residuals.npz, latents.npz or volume.mrc."""

    def nbytes(module: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in module.state_dict().values())

    tables = nbytes(poses) + (nbytes(latents) if latents is not None else 0)
    per_image = (9 + 2 + 2 + 2) * 4 + 8 + (zdim * 4 if latents else 0)
    volume = 0 if latents is not None else D**3 * 4 + 1024
    return 4 * nbytes(field) + 3 * tables + n_images * per_image + volume + 64 * 1024


def check_free_space(outdir: Path, per_epoch: int, n_epochs: int) -> None:
    """Refuse to start when ``outdir``'s disk cannot hold ``n_epochs`` checkpoints of
    ``per_epoch`` bytes (every epoch folder is kept)."""
    if n_epochs <= 0:
        return
    need = per_epoch * n_epochs
    free = shutil.disk_usage(outdir).free
    if free < need:
        raise CryofieldError(
            f"{outdir}: not enough free disk space: {n_epochs} epoch checkpoints of about "
            f"{_size(per_epoch)} need {_size(need)} and {_size(free)} are free; free some space, "
            "choose another -o, or train fewer --epochs"
        )


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ---------------------------------------------------------------- reading a run
class RunDir:
    """A training output directory.

    Parameters
    ----------
    outdir
        The ``-o`` folder of ``cryofield train``.

    Raises
    ------
    CryofieldError
        If the folder does not exist or holds no ``config.yaml``.
    """

    def __init__(self, outdir: str | Path) -> None:
        self.path = Path(outdir)
        if not self.path.is_dir():
            raise CryofieldError(f"{self.path}: not a training output folder (does not exist)")
        if not (self.path / CONFIG_FILE).is_file():
            raise CryofieldError(f"{self.path}: not a training output folder (no config.yaml)")

    # ------------------------------------------------------------------ epochs
    def epoch_dir(self, epoch: int) -> Path:
        """Path of ``OUTDIR/epoch_NNN``."""
        return self.path / epoch_dirname(epoch)

    def analyze_dir(self, epoch: int) -> Path:
        """Path of ``OUTDIR/analyze.EPOCH`` (written by ``cryofield analyze``)."""
        return self.path / analyze_dirname(epoch)

    def epoch_dirs(self) -> dict[int, Path]:
        """Epoch folders (complete or not) by epoch number."""
        out = {}
        for child in self.path.iterdir():
            m = _EPOCH_RE.match(child.name)
            if m and child.is_dir():
                out[int(m.group(1))] = child
        return out

    def epochs(self) -> list[int]:
        """Complete epochs (folders holding ``DONE``), ascending."""
        return sorted(e for e, d in self.epoch_dirs().items() if (d / DONE_FILE).is_file())

    def last_complete_epoch(self) -> int | None:
        """The highest complete epoch, or ``None`` when no epoch has finished."""
        eps = self.epochs()
        return eps[-1] if eps else None

    def choose_epoch(self, epoch: int | None = None, verb: str = "use") -> int:
        """The epoch a command works on: ``epoch`` when it is complete, else the last one.

        The one epoch chooser of ``analyze``, ``export``, ``select``, ``eval-vol`` and
        ``evaluate``. Without ``epoch``, an unfinished run (fewer complete epochs than
        its config plans, or an epoch folder without ``DONE``) gives its last complete
        epoch with a note (logged and printed) that says so; ``verb`` names what the
        command does with it (``export``: "nothing to export", "exporting epoch N").

        Raises
        ------
        CryofieldError
            No complete epoch, or ``epoch`` is missing or incomplete.
        """
        done = self.epochs()
        if not done:
            raise CryofieldError(
                f"{self.path}: no complete epoch yet (no epoch_NNN/DONE): nothing to {verb}"
            )
        if epoch is not None:
            if epoch not in done:
                raise CryofieldError(
                    f"{self.path}: epoch {epoch} is missing or incomplete (complete epochs: "
                    f"{_ranges(done)})"
                )
            return int(epoch)
        last = done[-1]
        planned = self.config().get("epochs")
        partial = sorted(e for e in self.epoch_dirs() if e not in done)
        if (isinstance(planned, int) and last < planned) or partial:
            why = f"{last} of {planned} epochs complete" if isinstance(planned, int) else ""
            if partial:
                why = (why + "; " if why else "") + f"epoch {partial[-1]} incomplete"
            msg = (
                f"the run is unfinished ({why}): {_gerund(verb)} epoch {last}, its last "
                "complete checkpoint"
            )
            _log.warning(msg)
            print(f"note: {msg}")
        return last

    def _resolve(self, epoch: int | None) -> int:
        if epoch is None or epoch < 0:
            eps = self.epochs()
            if not eps:
                raise CryofieldError(f"{self.path}: no complete epoch yet (no epoch_NNN/DONE)")
            return eps[-1 if epoch is None else epoch]
        if not (self.epoch_dir(epoch) / DONE_FILE).is_file():
            raise CryofieldError(
                f"{self.epoch_dir(epoch)}: epoch {epoch} is missing or incomplete "
                f"(complete epochs: {self.epochs()})"
            )
        return epoch

    # ------------------------------------------------------------------ content
    def config(self) -> dict[str, Any]:
        """The resolved training configuration (``config.yaml``) as a dict."""
        path = self.path / CONFIG_FILE
        try:
            with open(path) as fh:
                cfg = yaml.safe_load(fh)
        except yaml.YAMLError as err:
            raise InputFileError(
                path,
                f"not valid YAML ({first_line(err)}); the run's settings are damaged: "
                "restore config.yaml or start a new run",
            ) from None
        if not isinstance(cfg, dict):
            raise InputFileError(path, "not a YAML mapping")
        return cfg

    def train_config(self) -> Any:
        """The configuration as a :class:`cryofield.inference.config.TrainConfig`."""
        from cryofield.inference.config import TrainConfig

        return TrainConfig.from_dict(self.config())

    def table(self) -> ParticleTable:
        """The :class:`cryofield.io.metadata.ParticleTable` used for training."""
        from cryofield.io.metadata import ParticleTable

        path = self.path / TABLE_FILE
        if not path.is_file():
            raise CryofieldError(f"{path}: missing (the run did not finish its set-up)")
        try:
            return ParticleTable.load_npz(path)
        except CryofieldError:
            raise
        except Exception as err:
            if _is_damage(err):
                raise damaged(path, err) from err
            raise

    def input_table(self) -> ParticleTable:
        """The run's input table: ``OUTDIR/particles.npz``, else the config's particle file
        (read with the config's ``datadir`` and ``ind``)."""
        from cryofield.io.metadata import load_particle_table

        if (self.path / TABLE_FILE).is_file():
            return self.table()
        cfg = self.config()
        particles = cfg.get("particles")
        if not particles:
            raise CryofieldError(
                f"{self.path}: no {TABLE_FILE} and no particles path in {CONFIG_FILE}"
            )
        _log.info("no %s; reading %s", self.path / TABLE_FILE, particles)
        return load_particle_table(particles, datadir=cfg.get("datadir"), ind=cfg.get("ind"))

    def metrics(self) -> list[dict[str, Any]]:
        """Per-epoch metrics (``metrics.jsonl``), in file order."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return []
        out = []
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                raise InputFileError(path, "not a JSON line (the file is damaged: delete the "
                                     "line or restore the file)", row=i) from None  # fmt: skip
        return out

    def poses(self, epoch: int | None = None) -> dict[str, np.ndarray]:
        """Poses of ``epoch`` (default: last complete).

        Returns
        -------
        dict
            ``rotations (N, 3, 3)``, ``shifts_px (N, 2)`` in training px, ``shifts_A (N, 2)``,
            ``particle_index (N,)`` (indices into the input table).
        """
        path = self.epoch_dir(self._resolve(epoch)) / POSES_FILE
        return load_run_npz(path, required=("rotations", "particle_index"))

    def latents(self, epoch: int | None = None) -> np.ndarray | None:
        """Latents ``(N, zdim)`` of ``epoch``, or ``None`` for a homogeneous run."""
        path = self.epoch_dir(self._resolve(epoch)) / LATENTS_FILE
        if not path.is_file():
            return None
        return load_run_npz(path, required=("z",))["z"]

    def volume_path(self, epoch: int | None = None) -> Path | None:
        """Path of the rendered map of ``epoch`` (homogeneous runs), else ``None``."""
        path = self.epoch_dir(self._resolve(epoch)) / VOLUME_FILE
        return path if path.is_file() else None

    def weights(self, epoch: int | None = None) -> dict[str, Any]:
        """``{"state_dict", "hparams"}`` of ``epoch``, loaded with ``weights_only=True``."""
        return load_run_torch(self.epoch_dir(self._resolve(epoch)) / WEIGHTS_FILE)

    def load_field(self, epoch: int | None = None, device: str = "cpu") -> HartleyField:
        """The trained neural field of ``epoch`` (default: last complete), in eval mode."""
        from cryofield.model.field import HartleyField

        ckpt = self.weights(epoch)
        field = HartleyField(**ckpt["hparams"])
        field.load_state_dict(ckpt["state_dict"])
        return field.to(device).eval()

    def mask(self) -> np.ndarray | None:
        """The run's ``--mask`` (config.yaml ``mask``) at the training box, ``(D, D, D)`` in
        ``[0, 1]`` (:func:`cryofield.io.mask.read_mask`), or None when it had none; a mask
        file that is gone or no longer fits raises :class:`InputFileError`."""
        path = self.config().get("mask")
        if not path:
            return None
        from cryofield.io.mask import read_mask

        D = self.training_D()
        return read_mask(path, int(self.table().box_px or D), D)

    def training_D(self) -> int:
        """Box size (px) used in training."""
        return int(self.weights()["hparams"]["D"])

    def apix_A(self) -> float:
        """Pixel size (A) at the training box size."""
        return float(self.weights()["hparams"]["apix_A"])
