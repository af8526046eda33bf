"""Training configuration (:class:`TrainConfig`), saved as ``OUTDIR/config.yaml``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cryofield.errors import CryofieldError

#: accepted values of ``TrainConfig.contrast``
CONTRASTS = ("auto", "light-on-dark", "dark-on-light")
#: accepted values of ``TrainConfig.latent_init``: linear variability analysis at the
#: consensus poses (:mod:`cryofield.inference.variability`) or the random start alone
LATENT_INITS = ("pca", "random")


@dataclass
class TrainConfig:
    """All settings of a training run (the resolved values are written to config.yaml).

    Radii and translations given as ``None`` are resolved from the box size ``D`` with the
    DRGN-AI reference values at D=128 scaled by ``D / 128`` (search radius 12 -> 32 px,
    translation extent 20 px); see :meth:`resolved`.
    """

    particles: str = ""
    outdir: str = ""
    datadir: str | None = None
    ind: str | None = None
    D: int | None = None
    zdim: int = 0
    # field
    hidden: int = 256
    layers: int = 3
    n_freqs: int = 64
    sigma: float = 0.5
    # schedule
    epochs: int = 20
    hps_images: int = 500_000
    batch_size: int = 64
    lr_field: float = 1e-4
    steps_per_batch: int = 1
    lr_pose: float = 1e-3
    lr_latent: float = 1e-2
    latent_l2: float = 0.0
    latent_init_std: float = 0.1
    latent_warmup: float = 0.0
    latent_init: str = "pca"
    latent_init_radius_px: float | None = None
    latent_init_iters: int = 20
    latent_refresh: bool = True
    # pose search
    base_nside: int = 4
    base_psi: int = 24
    search_levels: int = 4
    n_keep: int = 8
    t_extent_px: float | None = None
    t_ngrid: int = 7
    radius_start_px: float | None = None
    radius_search_px: float | None = None
    radius_max_px: float | None = None
    het_search_groups: int = 8
    # global search epochs again after the gradient epochs, before local refinement (None:
    # 1 for heterogeneous ab initio runs, 0 otherwise)
    research_epochs: int | None = None
    # local pose refinement (final epochs)
    local_refine_epochs: int = 1
    local_step_deg: float = 2.0
    local_t_step_px: float = 0.5
    local_levels: int = 3
    local_iters: int = 1
    local_oversample: int = 2
    # poses
    poses_from_file: bool = False
    # None: refine after an ab initio search, keep known poses (--poses-from-file) fixed
    refine_poses: bool | None = None
    # data: contrast 'auto' (guess from the images), 'light-on-dark' (RELION/cryoSPARC
    # stacks; multiplied by -1 before meeting the CTF) or 'dark-on-light'; ``invert`` is
    # the resolved decision (see docs/dev/contracts.md, "Contrast and CTF sign")
    contrast: str = "auto"
    invert: bool = False
    window: bool = True
    norm_images: int = 1000
    # runtime
    device: str = "cpu"
    amp: bool = True
    deterministic: bool = False
    seed: int = 0
    num_threads: int | None = None
    max_rollbacks: int = 3
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a mapping (e.g. a loaded config.yaml); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CryofieldError(f"unknown training setting(s): {', '.join(unknown)}")
        if isinstance(d.get("latent_warmup"), bool):  # older config.yaml files stored a switch
            d = {**d, "latent_warmup": 1.0 if d["latent_warmup"] else 0.0}
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a config.yaml."""
        with open(path) as fh:
            d = yaml.safe_load(fh)
        if not isinstance(d, dict):
            raise CryofieldError(f"{path}: not a YAML mapping")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (yaml-safe)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """YAML text of the configuration."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def resolved(self, D: int) -> TrainConfig:
        """A copy with ``D`` and the radius / translation defaults filled in for box ``D``."""
        c = dataclasses.replace(self, D=int(D))
        scale = D / 128.0
        nyq = D / 2 - 1
        if c.radius_start_px is None:
            c.radius_start_px = min(12.0 * scale, nyq)
        if c.radius_search_px is None:
            c.radius_search_px = min(32.0 * scale, nyq)
        if c.radius_max_px is None:
            c.radius_max_px = nyq
        if c.refine_poses is None:
            c.refine_poses = not c.poses_from_file
        if c.research_epochs is None:
            c.research_epochs = 1 if c.zdim > 0 and not c.poses_from_file else 0
        if c.latent_init_radius_px is None:
            c.latent_init_radius_px = min(D / 4.0, c.radius_search_px)
        if c.t_extent_px is None:
            c.t_extent_px = 20.0 * scale
        c.radius_start_px = float(min(c.radius_start_px, nyq))
        c.radius_search_px = float(min(max(c.radius_search_px, c.radius_start_px), nyq))
        c.radius_max_px = float(min(c.radius_max_px, nyq))
        c.latent_init_radius_px = float(min(c.latent_init_radius_px, nyq))
        c.t_extent_px = float(c.t_extent_px)
        c.validate()
        return c

    def validate(self) -> None:
        """Raise :class:`CryofieldError` for impossible settings."""
        checks = [
            (self.zdim >= 0, f"zdim must be >= 0 (got {self.zdim})"),
            (self.epochs >= 1, f"epochs must be >= 1 (got {self.epochs})"),
            (self.batch_size >= 1, f"batch size must be >= 1 (got {self.batch_size})"),
            (self.hidden >= 1 and self.layers >= 0, "hidden must be >= 1 and layers >= 0"),
            (self.D is None or (self.D >= 8 and self.D % 2 == 0), f"D must be even >= 8: {self.D}"),
            (self.device.split(":")[0] in ("cpu", "cuda"), f"bad device: {self.device}"),
            (self.hps_images >= 0, "hps_images must be >= 0"),
            (self.contrast in CONTRASTS, f"contrast must be one of {CONTRASTS}: {self.contrast}"),
            (self.search_levels >= 0 and self.n_keep >= 1, "search levels >= 0, n_keep >= 1"),
            (self.latent_init in LATENT_INITS, f"latent_init must be one of {LATENT_INITS}"),
            (self.latent_init_iters >= 1, "latent_init_iters must be >= 1"),
            (0.0 <= self.latent_warmup <= 1.0, "latent_warmup must be in [0, 1]"),
            (self.local_refine_epochs >= 0, "local_refine_epochs must be >= 0"),
            (self.research_epochs is None or self.research_epochs >= 0,
             "research_epochs must be >= 0"),
            (self.local_step_deg > 0 and self.local_t_step_px >= 0, "local steps must be > 0"),
            (self.local_levels >= 1 and self.local_iters >= 1, "local levels/iters must be >= 1"),
            (self.local_oversample in (1, 2, 3, 4), "local_oversample must be 1..4"),
        ]  # fmt: skip
        for ok, msg in checks:
            if not ok:
                raise CryofieldError(msg)
