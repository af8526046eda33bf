"""Training phases and frequency marching.

Phase ``"hps"``: every batch gets fresh poses from the hierarchical search; the field
(and latents) take gradient steps with those poses. Homogeneous runs then have one
``"refine"`` epoch (gold-standard local refinement of every pose against back-projected,
FSC-weighted half maps, :mod:`cryofield.inference.refine`; the field takes no steps) and
``"field"`` epochs (poses fixed at the refined values, the field trains on the full
radius); with known poses the refine epoch comes first (``--refine-poses``) and the field
epochs are ``"fixed"``. The phases below (gradient, search-again, local) are those of
heterogeneous runs. Phase ``"sgd"``: the pose table (if
refined), the latent table and the field take gradient steps together. Phase ``"fixed"``:
known poses from the input file (``--poses-from-file``), optionally refined. Phase
``"local"`` (the last ``local_refine_epochs`` epochs, after the search phase; with known
poses only if they are refined): every batch first gets a local pose search around its
current poses at the full radius (:func:`cryofield.inference.pose_search.local_refine_poses`
on a voxel grid of the field built at the start of the epoch), then the field (and
latents) take a gradient step with the refined poses. The ``research_epochs`` epochs just
before the local ones (after the gradient epochs; heterogeneous ab initio runs: 1 by
default) are search epochs again, at the full search radius: by then every state has a
map, and an image aligned to the wrong state's map during the search can move to its own.
Measured on a saved demo-hetero run (after its local epoch): one more multi-reference
search raised the images within 10 deg from 89.6% to 95.1% (arm-open state 80% -> 91%),
and k-means ARI on the latents re-estimated at those poses from 0.85 to 0.95.

Frequency marching: during the search phase the radius (Fourier px) grows linearly with the
number of images seen, from ``radius_start_px`` to ``radius_search_px`` (over
``search_ramp_images`` when set: an extended search keeps the planned rate); the search's level
0 uses the midpoint between ``radius_start_px`` and the current radius (the coarse grid
gains little from the highest frequencies, but the start radius alone ranks candidates
poorly once the map has detail) and the last level the current radius. Gradient phases
train on ``radius_max_px``.

Level-0 radius measured on 384 images of saved runs (D=64, SNR 0.1), fraction of images
within 10 deg after the search: demo-homo epoch 6 0.964 at the start radius, 0.992 at the
midpoint; demo-hetero epoch 9 0.37 and 0.53 (the arm-absent state: median 32.5 -> 7.1 deg).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import Enum

from cryofield.inference.config import TrainConfig


class Phase(str, Enum):
    """What an epoch does; the value is the ``phase`` written to metrics.jsonl.

    The per-phase behaviour is asked of the phase (:attr:`searches_poses`, ...) and of the
    :class:`StepPlan` (what also depends on the configuration), never by comparing names.
    """

    #: global hierarchical pose search for every batch, then gradient steps
    HPS = "hps"
    #: gold-standard refinement of every pose against half maps (homogeneous runs)
    REFINE = "refine"
    #: field epochs at the refined poses (homogeneous ab initio runs)
    FIELD = "field"
    #: field epochs at the poses of the input file (``--poses-from-file``)
    FIXED = "fixed"
    #: gradient steps on the field, the latent table and the pose table (if refined)
    SGD = "sgd"
    #: local pose search around the current poses for every batch, then gradient steps
    LOCAL = "local"

    def __str__(self) -> str:
        return self.value

    @property
    def searches_poses(self) -> bool:
        """Every batch gets fresh poses from the global hierarchical search."""
        return self is Phase.HPS

    @property
    def refines_locally(self) -> bool:
        """Every batch gets a local search around its poses on a voxel grid of the field."""
        return self is Phase.LOCAL

    @property
    def refines_half_maps(self) -> bool:
        """The whole epoch is one gold-standard refinement of every pose against
        back-projected half maps (:mod:`cryofield.inference.refine`): no batches, the
        field takes no steps (every other phase trains it batch by batch)."""
        return self is Phase.REFINE

    @property
    def pose_gradient(self) -> bool:
        """The pose table may take gradient steps (heterogeneous runs that refine poses:
        :attr:`StepPlan.refines_pose_table`)."""
        return self in (Phase.SGD, Phase.FIXED)


@dataclass(frozen=True)
class StepPlan:
    """What one batch does: phase, training radius, search radii (px) and the
    per-batch behaviour that depends on the configuration as well as on the phase."""

    phase: Phase
    radius_train_px: float
    search_lo_px: float
    search_hi_px: float
    #: the pose table takes gradient steps
    refines_pose_table: bool = False
    #: heterogeneous warm-up: z is held at 0 (a consensus search, ``latent_warmup``)
    z_frozen: bool = False
    #: gradient steps per batch
    steps: int = 1


class Schedule:
    """Phase and radii as a function of the number of images seen.

    Parameters
    ----------
    cfg
        Resolved configuration (:meth:`TrainConfig.resolved`).
    n_images
        Images per epoch.
    """

    def __init__(self, cfg: TrainConfig, n_images: int) -> None:
        self.n = int(n_images)
        if cfg.epochs is None or cfg.hps_images is None or cfg.field_images is None:
            cfg = dataclasses.replace(cfg)
            cfg.resolve_schedule(self.n)
        assert cfg.epochs is not None and cfg.hps_images is not None
        self.cfg = cfg
        if cfg.poses_from_file:
            self.hps_epochs = 0
        else:
            self.hps_epochs = min(cfg.epochs, max(1, math.ceil(cfg.hps_images / self.n)))
        #: homogeneous runs whose poses are refined: one epoch of gold-standard refinement
        #: against back-projected half maps right after the search (with known poses: the
        #: first epoch), then field epochs at the refined poses; 0 when there is none
        self.refine_epoch = 0
        if cfg.zdim == 0 and cfg.refine_poses and cfg.refine_iters > 0:
            self.refine_epoch = min(self.hps_epochs + 1, cfg.epochs)
            if self.refine_epoch <= self.hps_epochs:
                self.refine_epoch = 0  # the whole run is search
        self.hps_total = self.hps_epochs * self.n
        #: search epochs with z held at 0 (heterogeneous runs: a consensus search first)
        self.consensus_epochs = (
            math.ceil(cfg.latent_warmup * self.hps_epochs - 1e-9) if cfg.zdim > 0 else 0
        )
        n_local = cfg.local_refine_epochs
        if (cfg.poses_from_file and not cfg.refine_poses) or cfg.zdim == 0:
            n_local = 0  # homogeneous runs refine against half maps instead
        self.local_from = max(self.hps_epochs, cfg.epochs - n_local) + 1
        #: first epoch of the search again after the gradient epochs (never with known
        #: poses: :meth:`phase_of_epoch` returns "fixed" there)
        self.research_from = max(self.hps_epochs + 1, self.local_from - (cfg.research_epochs or 0))

    def phase_of_epoch(self, epoch: int) -> Phase:
        """Phase of 1-based ``epoch``."""
        if self.cfg.zdim == 0:
            if epoch <= self.hps_epochs:
                return Phase.HPS
            if epoch == self.refine_epoch:
                return Phase.REFINE
            return Phase.FIXED if self.cfg.poses_from_file else Phase.FIELD
        if epoch >= self.local_from:
            return Phase.LOCAL
        if self.cfg.poses_from_file:
            return Phase.FIXED
        if epoch <= self.hps_epochs or epoch >= self.research_from:
            return Phase.HPS
        return Phase.SGD

    def plan(self, epoch: int, images_seen: int) -> StepPlan:
        """Plan for the next batch of 1-based ``epoch`` after ``images_seen`` images in all."""
        c = self.cfg
        phase = self.phase_of_epoch(epoch)
        assert c.radius_start_px is not None and c.radius_search_px is not None
        assert c.radius_max_px is not None
        if not phase.searches_poses:
            refine = bool(c.refine_poses) and phase.pose_gradient and c.zdim > 0
            return StepPlan(phase, c.radius_max_px, c.radius_search_px, c.radius_search_px,
                            refines_pose_table=refine)  # fmt: skip
        ramp = c.search_ramp_images if c.search_ramp_images else self.hps_total
        f = min(1.0, images_seen / max(ramp, 1))
        hi = c.radius_start_px + (c.radius_search_px - c.radius_start_px) * f
        frozen = epoch <= self.consensus_epochs
        return StepPlan(phase, hi, (c.radius_start_px + hi) / 2, hi, z_frozen=frozen,
                        steps=c.steps_per_batch)  # fmt: skip

    def final_search_plan(self) -> StepPlan:
        """The plan of the search's last batch (at the full search radius): the global
        search that the half-map refinement may start from (``refine_global``)."""
        c = self.cfg
        assert c.radius_start_px is not None and c.radius_search_px is not None
        return StepPlan(Phase.HPS, c.radius_search_px, (c.radius_start_px + c.radius_search_px) / 2,
                        c.radius_search_px)  # fmt: skip

    def latent_init_method(self, epoch: int) -> str:
        """How a latent start due at ``epoch`` is made: ``"pca"`` (variability analysis)
        while the poses are still searched (the refreshes that keep the heterogeneous
        search's references apart, where speed matters more than the last bit of
        separation), ``cfg.latent_init`` once they have settled (known poses, or the
        first epoch after a search epoch)."""
        if self.phase_of_epoch(epoch).searches_poses:
            return "pca"
        return self.cfg.latent_init

    def latent_init_due(self, epoch: int, last_init: int) -> bool:
        """Whether the latents are set by a latent start (:meth:`latent_init_method`) at
        the start of ``epoch``; ``last_init`` is the last epoch whose start set them (0:
        none yet).

        Due in the first epoch after the consensus search (with known poses: the first
        epoch), every later search epoch (``latent_refresh``; the search-again epochs
        always) and the first epoch after a search epoch, from the current poses.
        """
        c = self.cfg
        if c.zdim == 0 or c.latent_init == "random":
            return False
        if last_init == 0:
            return epoch > self.consensus_epochs and (epoch > 1 or c.poses_from_file)
        if last_init >= epoch:
            return False
        if self.phase_of_epoch(epoch).searches_poses:
            return c.latent_refresh or epoch >= self.research_from
        return epoch > 1 and self.phase_of_epoch(epoch - 1).searches_poses
