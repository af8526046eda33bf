"""Read access to a ``cryofield train`` output directory.

Layout (see ``docs/dev/contracts.md``, section "Train output directory")::

    OUTDIR/config.yaml            full resolved TrainConfig
    OUTDIR/run.log
    OUTDIR/metrics.jsonl          one JSON line per epoch
    OUTDIR/particles.npz          the ParticleTable used (after --ind)
    OUTDIR/epoch_NNN/weights.pt   {"state_dict": ..., "hparams": {...}} (weights_only loadable)
    OUTDIR/epoch_NNN/state.pt     optimiser states, RNG state, tables (resume only)
    OUTDIR/epoch_NNN/poses.npz    rotations (N,3,3), shifts_px (N,2), shifts_A (N,2),
                                  particle_index (N,)
    OUTDIR/epoch_NNN/latents.npz  z (N, zdim)     (heterogeneous only)
    OUTDIR/epoch_NNN/volume.mrc   rendered map    (homogeneous only)
    OUTDIR/epoch_NNN/DONE         written last; an epoch without it is incomplete

Epochs are numbered from 1; ``epoch_000`` does not exist.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from cryofield.errors import CryofieldError, InputFileError

if TYPE_CHECKING:
    from cryofield.model.field import HartleyField

_EPOCH_RE = re.compile(r"^epoch_(\d{3,})$")


def epoch_dirname(epoch: int) -> str:
    """Name of the folder of ``epoch`` (``epoch_NNN``, 1-based)."""
    return f"epoch_{epoch:03d}"


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
        if not (self.path / "config.yaml").is_file():
            raise CryofieldError(f"{self.path}: not a training output folder (no config.yaml)")

    # ------------------------------------------------------------------ epochs
    def epoch_dir(self, epoch: int) -> Path:
        """Path of ``OUTDIR/epoch_NNN``."""
        return self.path / epoch_dirname(epoch)

    def epochs(self) -> list[int]:
        """Complete epochs (folders holding ``DONE``), ascending."""
        out = []
        for child in self.path.iterdir():
            m = _EPOCH_RE.match(child.name)
            if m and child.is_dir() and (child / "DONE").is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def last_complete_epoch(self) -> int | None:
        """The highest complete epoch, or ``None`` when no epoch has finished."""
        eps = self.epochs()
        return eps[-1] if eps else None

    def _resolve(self, epoch: int | None) -> int:
        if epoch is None or epoch < 0:
            eps = self.epochs()
            if not eps:
                raise CryofieldError(f"{self.path}: no complete epoch yet (no epoch_NNN/DONE)")
            return eps[-1 if epoch is None else epoch]
        if not (self.epoch_dir(epoch) / "DONE").is_file():
            raise CryofieldError(
                f"{self.epoch_dir(epoch)}: epoch {epoch} is missing or incomplete "
                f"(complete epochs: {self.epochs()})"
            )
        return epoch

    # ------------------------------------------------------------------ content
    def config(self) -> dict[str, Any]:
        """The resolved training configuration (``config.yaml``) as a dict."""
        path = self.path / "config.yaml"
        with open(path) as fh:
            cfg = yaml.safe_load(fh)
        if not isinstance(cfg, dict):
            raise InputFileError(path, "not a YAML mapping")
        return cfg

    def train_config(self) -> Any:
        """The configuration as a :class:`cryofield.inference.config.TrainConfig`."""
        from cryofield.inference.config import TrainConfig

        return TrainConfig.from_dict(self.config())

    def table(self) -> Any:
        """The :class:`cryofield.io.metadata.ParticleTable` used for training."""
        from cryofield.io.metadata import ParticleTable

        path = self.path / "particles.npz"
        if not path.is_file():
            raise CryofieldError(f"{path}: missing (the run did not finish its set-up)")
        return ParticleTable.load_npz(path)

    def metrics(self) -> list[dict[str, Any]]:
        """Per-epoch metrics (``metrics.jsonl``), in file order."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def poses(self, epoch: int | None = None) -> dict[str, np.ndarray]:
        """Poses of ``epoch`` (default: last complete).

        Returns
        -------
        dict
            ``rotations (N, 3, 3)``, ``shifts_px (N, 2)`` in training px, ``shifts_A (N, 2)``,
            ``particle_index (N,)`` (indices into the input table).
        """
        path = self.epoch_dir(self._resolve(epoch)) / "poses.npz"
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    def latents(self, epoch: int | None = None) -> np.ndarray | None:
        """Latents ``(N, zdim)`` of ``epoch``, or ``None`` for a homogeneous run."""
        path = self.epoch_dir(self._resolve(epoch)) / "latents.npz"
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as f:
            return f["z"]

    def volume_path(self, epoch: int | None = None) -> Path | None:
        """Path of the rendered map of ``epoch`` (homogeneous runs), else ``None``."""
        path = self.epoch_dir(self._resolve(epoch)) / "volume.mrc"
        return path if path.is_file() else None

    def weights(self, epoch: int | None = None) -> dict[str, Any]:
        """``{"state_dict", "hparams"}`` of ``epoch``, loaded with ``weights_only=True``."""
        path = self.epoch_dir(self._resolve(epoch)) / "weights.pt"
        return torch.load(path, map_location="cpu", weights_only=True)

    def load_field(self, epoch: int | None = None, device: str = "cpu") -> HartleyField:
        """The trained neural field of ``epoch`` (default: last complete), in eval mode."""
        from cryofield.model.field import HartleyField

        ckpt = self.weights(epoch)
        field = HartleyField(**ckpt["hparams"])
        field.load_state_dict(ckpt["state_dict"])
        return field.to(device).eval()

    def training_D(self) -> int:
        """Box size (px) used in training."""
        return int(self.weights()["hparams"]["D"])

    def apix_A(self) -> float:
        """Pixel size (A) at the training box size."""
        return float(self.weights()["hparams"]["apix_A"])
