"""The training loop: one :class:`Trainer` runs the epochs of a
:class:`~cryofield.inference.schedule.Schedule` (global pose search, gold-standard
refinement, gradient, local epochs), rolls an epoch back when the loss diverges, and
writes every epoch's checkpoint (:mod:`cryofield.inference.rundir`).

The loss is :func:`cryofield.inference.loss.slice_loss`; the entry points
(``cryofield train``, ``--resume``) are in :mod:`cryofield.inference.runner`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cryofield.errors import CryofieldError
from cryofield.inference import distributed as dist
from cryofield.inference import rundir as layout
from cryofield.inference.balance import DirectionBalance, balance_strength
from cryofield.inference.config import TrainConfig
from cryofield.inference.data import Batch, BatchMaker, ImageSource
from cryofield.inference.epoch_metrics import epoch_checks
from cryofield.inference.loss import check_loss, grid_loss, image_power, slice_loss
from cryofield.inference.pose_search import (
    BEYOND_GRID_LIMIT,
    FrequencyPoints,
    beyond_grid,
    centre_references,
    level0_points,
    local_refine_poses,
    search_poses,
    uncentre_shifts,
    widened_translation_grid,
)
from cryofield.inference.references import ReferenceMaps, kmeans_groups, search_settings
from cryofield.inference.schedule import Phase, Schedule, StepPlan
from cryofield.logs import get_logger
from cryofield.model.field import HartleyField, fourier_grid, hartley_grid_to_fourier
from cryofield.model.tables import LatentTable, PoseTable
from cryofield.physics.ctf import CTFParams
from cryofield.physics.symmetry import symmetry_operators

log = get_logger("train")

#: batches between two reads of the batch losses from the device (the divergence check,
#: :func:`~cryofield.inference.loss.check_loss`); the steps in between never wait for it
LOSS_CHECK_EVERY = 8

#: what a step that ran out of memory raises (``torch.cuda.OutOfMemoryError`` is one)
OUT_OF_MEMORY: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)}
    - {None}
)


class Trainer:
    """One training run (new or resumed).

    Parameters
    ----------
    cfg
        Resolved configuration.
    source
        Images at box ``cfg.D``.
    ctf_params
        CTF of all images or ``None``.
    outdir
        Output folder.
    init_poses
        ``(rotations (N, 3, 3), shifts_px (N, 2))`` in training px (known-pose mode).
    particle_index
        ``(N,)`` indices into the input table (written to poses.npz).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        source: ImageSource,
        ctf_params: CTFParams | None,
        outdir: str | Path,
        init_poses: tuple[torch.Tensor, torch.Tensor] | None = None,
        particle_index: np.ndarray | None = None,
    ) -> None:
        assert cfg.D is not None
        if cfg.epochs is None or cfg.hps_images is None or cfg.field_images is None:
            cfg = dataclasses.replace(cfg)  # the plan for this N (the caller's stays as it is)
            cfg.resolve_schedule(len(source))
        if cfg.planned_search is None and cfg.epochs is not None and cfg.hps_images is not None:
            cfg.planned_search = [int(cfg.epochs), int(cfg.hps_images)]
        self.cfg = cfg
        self.outdir = Path(outdir)
        self.device = torch.device(cfg.device)
        self.N = len(source)
        self.D = int(cfg.D)
        self.particle_index = np.arange(self.N) if particle_index is None else particle_index
        self.points = FrequencyPoints.build(self.D, self.device)
        # the same points on the host: a step's point count without reading from the device
        self._points_host = (
            self.points if self.device.type == "cpu" else FrequencyPoints.build(self.D)
        )
        self.batches = BatchMaker(
            source, ctf_params, self.points, cfg.invert, cfg.window, device=self.device
        )
        #: focused heterogeneity: ``cfg.mask`` at the training box (``(D, D, D)``), or None
        self.mask = self._read_mask(source) if cfg.mask else None
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.field = HartleyField(
            self.D, self.batches.apix_A, cfg.zdim, cfg.hidden, cfg.layers, cfg.n_freqs,
            cfg.sigma, cfg.seed,
        ).to(self.device)  # fmt: skip
        R0, t0 = init_poses if init_poses is not None else (None, None)
        self.poses = PoseTable(self.N, R0, t0).to(self.device)
        self.latents = (
            LatentTable(self.N, cfg.zdim, cfg.latent_init_std, gen).to(self.device)
            if cfg.zdim > 0
            else None
        )
        self.opt_field = torch.optim.Adam(self.field.parameters(), lr=cfg.lr_field)
        self.opt_pose = torch.optim.SparseAdam(list(self.poses.parameters()), lr=cfg.lr_pose)
        self.opt_latent = (
            torch.optim.SparseAdam(list(self.latents.parameters()), lr=cfg.lr_latent)
            if self.latents is not None
            else None
        )
        self.schedule = Schedule(cfg, self.N)
        #: this process's place in a data-parallel run (:mod:`cryofield.inference.distributed`)
        self.dist = dist.current()
        #: the field as the training step calls it: wrapped in DistributedDataParallel when
        #: several ranks train (gradients summed over the ranks; :meth:`_step` scales)
        self._step_field: Any = self.field
        if self.dist.enabled:
            self._step_field = dist.data_parallel(self.field, self.device)
        #: ``n_rank / n_global`` of the batch being trained (1 in a single process)
        self._share = 1.0
        #: the global batch being trained (all ranks' images; None outside an epoch)
        self._batch_rows: np.ndarray | None = None
        self.epoch = 0
        self.images_seen = 0
        self.rollbacks = 0
        self.latent_init_epoch = 0  # last epoch whose start set the latents by PCA
        self.search_extended = 0  # search epochs added by the stopping rule so far
        self.search_settled = 0  # consecutive search epochs, up to the last, that settled
        #: the poses were moved with the map's centre of mass before the refinement
        #: (:meth:`_recentre`): the next field fit starts from an empty field
        self.refit_field = False
        #: the search failed (:meth:`_failed_search`) and a restart is due (:meth:`fit`
        #: returned early; the runner starts the next attempt)
        self.search_failed = False
        #: loss of the run's very first step (before any update): the divergence reference
        self.loss_start: float | None = None
        self._local: tuple[torch.Tensor, int, torch.Tensor | None] | None = None
        #: the balanced search of this epoch (:mod:`cryofield.inference.balance`), or None
        self._balance: DirectionBalance | None = None
        self._point_cells: dict[tuple[int, int, str], np.ndarray] = {}
        #: this epoch's images found beyond the translation grid and images searched
        #: (:meth:`_widen_translations`), on the device
        self._t_beyond = torch.zeros(2, device=self.device)
        self._loss_first: torch.Tensor | None = None  # loss_start, still on the device
        #: per-image loss at its last step (epoch_NNN/residuals.npz, for the junk score),
        #: kept on the device
        self._residual = torch.full((self.N,), float("nan"), device=self.device)
        self._power = torch.full((self.N,), float("nan"), device=self.device)  # mean |X|^2
        #: read lazy stacks with the prefetching reader (:meth:`BatchMaker.iter_batches`;
        #: ``None``: when the source is lazy)
        self.prefetch: bool | None = None
        #: images per step at most, set when a step ran out of memory (``None``: a batch)
        self.max_step_images: int | None = None
        self.loss_check_every = LOSS_CHECK_EVERY
        scale = self.batches.estimate_scale(cfg.norm_images, gen)
        self.field.output_scale.fill_(scale)
        self.field.set_envelope(self.batches.estimate_envelope(cfg.norm_images, gen))

    # ---------------------------------------------------------------- state
    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts: dict[str, torch.optim.Optimizer] = {"field": self.opt_field, "pose": self.opt_pose}
        if self.opt_latent is not None:
            opts["latent"] = self.opt_latent
        return opts

    def state(self) -> dict[str, Any]:
        """Everything needed to continue exactly (tensors and plain values only)."""
        st: dict[str, Any] = {
            "epoch": self.epoch,
            "images_seen": self.images_seen,
            "rollbacks": self.rollbacks,
            "latent_init_epoch": self.latent_init_epoch,
            "search_extended": self.search_extended,
            "search_settled": self.search_settled,
            "refit_field": self.refit_field,
            "max_step_images": self.max_step_images,
            "symmetry_aligned": getattr(self, "_symmetry_aligned", False),
            "loss_start": self.loss_start,
            "scale": self.batches.scale,
            "field": self.field.state_dict(),
            "poses": self.poses.state_dict(),
            "opt": {k: o.state_dict() for k, o in self._optimizers().items()},
            "torch_rng": torch.get_rng_state(),
        }
        if self.latents is not None:
            st["latents"] = self.latents.state_dict()
        return st

    def load_state(self, st: dict[str, Any]) -> None:
        """Restore :meth:`state`."""
        self.epoch = int(st["epoch"])
        self.images_seen = int(st["images_seen"])
        self.rollbacks = int(st.get("rollbacks", 0))
        self.latent_init_epoch = int(st.get("latent_init_epoch", 0))
        self.search_extended = int(st.get("search_extended", 0))
        self.search_settled = int(st.get("search_settled", 0))
        self.refit_field = bool(st.get("refit_field", False))
        saved = st.get("max_step_images")  # the step size an out-of-memory step left
        if saved is not None:  # resumed: kept; rolled back: the smaller limit is kept
            first = self.max_step_images is None
            self.max_step_images = int(saved) if first else min(self.max_step_images, int(saved))
            if first:
                log.info("steps of at most %d images (an earlier step ran out of memory; a "
                         "new run starts from full batches)", self.max_step_images)  # fmt: skip
        self._symmetry_aligned = bool(st.get("symmetry_aligned", False))
        start = st.get("loss_start")  # absent in older checkpoints: set by the next step
        self.loss_start = None if start is None else float(start)
        self.batches.scale = float(st["scale"])
        self.field.load_state_dict(st["field"])
        self.poses.load_state_dict(st["poses"])
        if self.latents is not None:
            self.latents.load_state_dict(st["latents"])
        for k, o in self._optimizers().items():
            o.load_state_dict(st["opt"][k])
        torch.set_rng_state(st["torch_rng"])

    # ---------------------------------------------------------------- steps
    def _autocast(self) -> Any:
        on = self.cfg.amp and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    def _z_frozen(self, plan: StepPlan) -> bool:
        """Heterogeneous warm-up: during the first search epochs z is held at 0 (a consensus
        search, ``latent_warmup`` of the search phase)."""
        return plan.z_frozen

    def _z_held(self, plan: StepPlan) -> bool:
        """The latent table takes no steps: warm-up, the epoch that starts from the
        variability analysis (the field first learns to use the new codes), or any epoch
        after a masked latent start (``mask_hold_latents``)."""
        return (
            plan.z_frozen
            or (self.latent_init_epoch > 0 and self.latent_init_epoch == self.epoch + 1)
            or (bool(self.cfg.mask) and self.cfg.mask_hold_latents
                and self._masked_init(self.latent_init_epoch))
        )  # fmt: skip

    def _masked_init(self, epoch: int) -> bool:
        """Whether a latent start at ``epoch`` uses ``cfg.mask``: once the poses have
        settled (not in a search epoch, whose latents make the search's references and
        must describe all the variability)."""
        return (
            self.mask is not None
            and epoch > 0
            and not self.schedule.phase_of_epoch(epoch).searches_poses
        )

    def _wants_latent_init(self, epoch: int) -> bool:
        """Set the latents by PCA at the start of ``epoch``
        (:meth:`~cryofield.inference.schedule.Schedule.latent_init_due`)."""
        return self.schedule.latent_init_due(epoch, self.latent_init_epoch)

    @torch.no_grad()
    def _init_latents(self, epoch: int) -> None:
        """Start the latent table at the current poses, by linear variability analysis
        (:mod:`cryofield.inference.variability`) or 3-D classification with the classes
        embedded (:mod:`cryofield.inference.classify`), as
        :meth:`~cryofield.inference.schedule.Schedule.latent_init_method` says."""
        from cryofield.inference.classify import (
            ClassifySettings,
            classification_latents,
            default_n_classes,
        )
        from cryofield.inference.variability import variability_latents

        c = self.cfg
        assert self.latents is not None and c.latent_init_radius_px is not None
        R, t = self.poses.all()
        method = self.schedule.latent_init_method(epoch)
        mask = self.mask if self._masked_init(epoch) else None
        if method == "classes":
            k = c.latent_init_classes or default_n_classes(c.zdim)
            settings = ClassifySettings(n_classes=k, init_radius_px=c.latent_init_radius_px,
                                        init_zdim=c.zdim, seed=c.seed)  # fmt: skip
            z = classification_latents(self.batches, R, t, c.zdim, settings, mask=mask)
        else:
            z = variability_latents(self.batches, R, t, c.zdim, c.latent_init_radius_px,
                                    iters=c.latent_init_iters, seed=c.seed,
                                    mask=mask)  # fmt: skip
        self.latents.set(torch.arange(self.N, device=self.device), z)
        self.latent_init_epoch = self.epoch + 1

    def _read_mask(self, source: ImageSource) -> torch.Tensor:
        """``cfg.mask`` read on the particles' box and resampled to ``D``
        (:func:`cryofield.io.mask.read_mask`; a bad file raises before any work)."""
        from cryofield.io.mask import mask_fraction, read_mask

        assert self.cfg.mask
        box = int(getattr(source, "box_px", None) or self.D)
        m = read_mask(self.cfg.mask, box, self.D, self.batches.apix_A * self.D / box)
        log.info("mask %s: %.1f%% of the box; the latent start describes the variability "
                 "inside it", self.cfg.mask, 100 * mask_fraction(m))  # fmt: skip
        return torch.as_tensor(m, device=self.device)

    @property
    def active_symmetry(self) -> str:
        """The point group in force: ``cfg.symmetry`` once the map's axes are where the
        group has them (known poses or ``symmetry_in_search``: from the start; ab initio:
        from :meth:`align_symmetry`, after the global search), else C1."""
        c = self.cfg
        if getattr(self, "_symmetry_aligned", False) or c.poses_from_file or c.symmetry_in_search:
            return c.symmetry
        return "C1"

    @torch.no_grad()
    def align_symmetry(self) -> None:
        """Put the map's symmetry axes where ``cfg.symmetry`` has them (RELION's axes),
        through the box centre, and impose the symmetry from now on. The images (at most
        ``DIAG_MAX_IMAGES``) are back-projected at their poses without symmetry;
        :func:`~cryofield.physics.symmetry.symmetry_frame` finds ``A`` and the symmetry
        centre ``c`` with ``V(A x + c)`` symmetric (a C1 search centres the particle only up
        to the mean shift, so ``c`` is often a pixel or two off the box centre); every pose
        becomes ``(R A, t + (R c)_xy)`` (:func:`~cryofield.physics.symmetry.
        apply_symmetry_frame`) and the field ``V(A x)`` (:meth:`HartleyField.set_frame`; it
        cannot be translated: the field is off the new centre by ``A^T c`` until it is
        fitted again, at once in homogeneous runs, whose next epochs rebuild the map from
        the images) (RELION 4 runs its initial model in C1 and aligns the symmetry axes
        afterwards the same way, the centre of mass moved to the box centre first)."""
        from cryofield.inference.epoch_metrics import DIAG_MAX_IMAGES
        from cryofield.inference.refine import backproject_halves_batched
        from cryofield.physics.symmetry import apply_symmetry_frame, symmetry_frame

        c = self.cfg
        self._symmetry_aligned = True
        ops = symmetry_operators(c.symmetry)
        if ops.shape[0] <= 1:
            return
        R, t = self.poses.all()
        rows = np.unique(np.linspace(0, self.N - 1, min(self.N, DIAG_MAX_IMAGES)).round())
        rows = rows.astype(np.int64)
        h1, h2 = backproject_halves_batched(self.batches, R[rows], t[rows], rows=rows)
        # the map to the search's last radius (box 2 r; at most 32 px: the axes need no more)
        box = min(self.D, 32, max(16, 2 * round(float(c.radius_search_px or self.D / 4))))
        frame = symmetry_frame((h1 + h2).cpu(), ops, max_D=box)
        R_new, t_new = apply_symmetry_frame(R, t, frame)
        self.poses.set(torch.arange(self.N, device=self.device), R_new, t_new)
        self.field.set_frame(frame.rotation.to(self.device, torch.float32))
        self._sym_ops = None
        log.info("symmetry %s imposed from here: the map's axes aligned to RELION's (mean "
                 "correlation with its symmetry mates %.3f), its symmetry centre (%.2f, %.2f, "
                 "%.2f) px moved to the box centre; poses, shifts and field rotated",
                 c.symmetry, frame.score, *frame.centre_px.tolist())  # fmt: skip

    def _equivalent_pose(self, R: torch.Tensor) -> torch.Tensor:
        """``R g`` with ``g`` drawn per image from the point group in force
        (:attr:`active_symmetry`; C1: ``R``). A symmetric map gives the same image at every
        ``R g``, so the expected loss over ``g`` is the loss of the data set with every
        image at its ``|G|`` equivalent poses (RELION's symmetry expansion): the field
        learns the symmetric map, at the cost of one pose per image and step
        (docs/train.md, "Symmetry")."""
        ops = getattr(self, "_sym_ops", None)
        if ops is None:
            ops = symmetry_operators(self.active_symmetry, device=R.device)
            self._sym_ops = ops
        if ops.shape[0] <= 1:
            return R
        k = torch.randint(ops.shape[0], (R.shape[0],)).to(R.device)  # the saved CPU RNG
        return R @ ops[k].to(R.dtype)

    def _batch_z(self, ti: torch.Tensor, plan: StepPlan) -> torch.Tensor | None:
        if self.latents is None:
            return None
        if plan.z_frozen:
            return torch.zeros(len(ti), self.cfg.zdim, device=self.device)
        return self.latents(ti)

    @torch.no_grad()
    def _search(self, idx: np.ndarray, xft: torch.Tensor, ctf: torch.Tensor, plan: StepPlan):
        """Poses of a batch by hierarchical search. Heterogeneous runs search against the
        field at ``het_search_groups`` k-means centres of the latents; each image takes
        the reference that explains it best. ``het_search: assigned``: the centres of the
        whole table, the maps kept between batches (:class:`~cryofield.inference.
        references.ReferenceMaps`, ``het_search_refresh`` rebuilt per batch), level 0
        against the map of the image's nearest centre, the others checked at its kept
        poses; ``exhaustive``: the centres of the batch's latents, every image against
        every map on the whole level-0 grid."""
        c = self.cfg
        # the translation grid about the maps' centre of mass once an epoch has placed
        # the map (about the box centre before: it anchors the map, pose_search docstring)
        settings = dataclasses.replace(search_settings(c, plan), symmetry=self.active_symmetry,
                                       centre=c.search_centre and self.epoch >= 1)  # fmt: skip
        pen = None
        if self._balance is not None:
            pen = self._balance.penalty(self._cells_of_points(settings)).to(self.device)
        if self.latents is not None and not plan.z_frozen and c.het_search == "assigned":

            def grid_fn(z: torch.Tensor, radius_px: float) -> torch.Tensor:
                with self._autocast():
                    grids, _ = self.field.grid_ht(radius_px, z.to(self.device))
                return hartley_grid_to_fourier(grids.float())

            key = (self.epoch, self.rollbacks, self.latent_init_epoch)
            maps = getattr(self, "_het_maps", None)
            if maps is None or not maps.covers(key, settings):
                # the centres of the table as the epoch began (the same on every rank);
                # within the epoch (the radius outgrew the maps) the same centres again
                kept = maps.centres if maps is not None and maps.key == key else None
                maps = ReferenceMaps.build(key, grid_fn, self.latents.all(), c.het_search_groups,
                                           self.D, self.points, settings, centres=kept)  # fmt: skip
                self._het_maps = maps
            else:
                maps.refresh(grid_fn, self.D, self.points, settings, c.het_search_refresh)
            hint = maps.assign(self.latents(torch.as_tensor(idx, device=self.device)))
            res = search_poses(maps.grids, self.D, xft, ctf, self.points, settings, hint=hint,
                               slices0=maps.slices0, penalty0=pen,
                               centres_px=maps.centres_px)  # fmt: skip
            return self._count_beyond(res, settings)
        with self._autocast():
            if self.latents is None or plan.z_frozen:
                z0 = None if self.latents is None else self._batch_z(torch.zeros(1), plan)
                grid, Dc = self.field.grid_ht(plan.search_hi_px, z0)
                fgrid = hartley_grid_to_fourier(grid.float().reshape(Dc, Dc, Dc))
            else:
                # the centres of the whole (global) batch: the same on every rank
                rows = idx if self._batch_rows is None else self._batch_rows
                z = self.latents(torch.as_tensor(rows, device=self.device))
                centres = kmeans_groups(z.cpu(), self.cfg.het_search_groups)[1]
                grids, _ = self.field.grid_ht(plan.search_hi_px, centres.to(self.device))
                fgrid = hartley_grid_to_fourier(grids.float())
        res = search_poses(fgrid, self.D, xft, ctf, self.points, settings, penalty0=pen)
        return self._count_beyond(res, settings)

    def _count_beyond(self, res: Any, settings: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotations and shifts of a search result; counts its images found beyond the
        translation grid (:func:`~cryofield.inference.pose_search.beyond_grid`) once an
        epoch has placed the map (the first epoch's grid anchors it about the box centre)."""
        if self.epoch >= 1 and res.grid_offsets_px is not None:
            out = beyond_grid(res.grid_offsets_px, settings.t_extent_px, settings.t_ngrid)
            self._t_beyond[0] += out.sum()
            self._t_beyond[1] += out.numel()
        return res.rotations, res.shifts_px

    def _cells_of_points(self, settings: Any) -> np.ndarray:
        """``(Q,)`` viewing-direction cell of every level-0 rotation of the search."""
        key = (settings.base_nside, settings.base_psi, settings.symmetry)
        if key not in self._point_cells:
            rots0 = level0_points(settings)[0]
            self._point_cells[key] = DirectionBalance.cells_of(rots0)
        return self._point_cells[key]

    def _start_balance(self, epoch: int, phase: Phase) -> DirectionBalance | None:
        """The balanced search of a search epoch (None: not balanced): the strength of
        :func:`~cryofield.inference.balance.balance_strength`; the first epoch counts
        the images as the search places them, later ones start from the pose table."""
        c = self.cfg
        if not phase.searches_poses:
            return None
        strength = balance_strength(c.search_balance, c.search_balance_fraction,
                                    self.schedule.hps_epochs, epoch)  # fmt: skip
        if strength <= 0:
            return None
        if self.dist.is_main:
            log.info("epoch %d: balanced search, strength %.2f", epoch, strength)
        R = None if epoch == 1 else self.poses.all()[0].detach()
        return DirectionBalance(self.N, strength, R)

    @torch.no_grad()
    def _prepare_local(self) -> None:
        """Voxel grid(s) of the current field for a local-refinement epoch.

        Homogeneous: one grid. Heterogeneous: one grid per k-means centre of the latent
        table (``het_search_groups``); each image uses its group's grid.
        """
        c = self.cfg
        assert c.radius_max_px is not None
        if self.latents is None:
            grid, Dg = fourier_grid(self.field, c.radius_max_px, None, c.local_oversample)
            self._local = (grid, Dg, None)
            return
        labels, centres = kmeans_groups(self.latents.all().float().cpu(), c.het_search_groups)
        grids, Dg = fourier_grid(self.field, c.radius_max_px, centres.to(self.device),
                                 c.local_oversample)  # fmt: skip
        self._local = (grids, Dg, labels.to(self.device))

    @torch.no_grad()
    def _local_refine(
        self, ti: torch.Tensor, xft: torch.Tensor, ctf: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        assert c.radius_max_px is not None and self._local is not None
        grid, Dg, labels = self._local
        R0, t0 = self.poses(ti)
        kw = dict(step_deg=c.local_step_deg, t_step_px=c.local_t_step_px,
                  levels=c.local_levels, iters_per_level=c.local_iters)  # fmt: skip
        if labels is None:
            return local_refine_poses(grid, Dg, xft, ctf, self.points, R0, t0, c.radius_max_px,
                                      **kw)[:2]  # fmt: skip
        R, t = R0.clone(), t0.clone()
        lab = labels[ti]
        for g in torch.unique(lab).tolist():
            m = lab == g
            R[m], t[m] = local_refine_poses(grid[g], Dg, xft[m], ctf[m], self.points, R0[m],
                                            t0[m], c.radius_max_px, **kw)[:2]  # fmt: skip
        return R, t

    def _step(self, idx: np.ndarray, plan: StepPlan, batch: Batch | None = None) -> torch.Tensor:
        """One batch: its poses (search or local refinement, by phase), then
        ``plan.steps`` gradient steps. Returns the batch loss as a 0-d tensor left on the
        device (reading it would wait for the device; :meth:`_check_losses` reads them in
        groups). ``batch``: the images of ``idx`` already prepared."""
        b = self.batches.batch(idx) if batch is None else batch
        ti, xft, ctf = b.index, b.images_ft, b.ctf
        if plan.phase.searches_poses:
            R, t = self._search(idx, xft, ctf, plan)
            self.poses.set(ti, R, t)
            if self._balance is not None:
                self._balance.update(idx, R, dist.all_reduce_sum)
        elif plan.phase.refines_locally:
            R, t = self._local_refine(ti, xft, ctf)
            self.poses.set(ti, R, t)
        refine = plan.refines_pose_table
        n = self._points_host.count(plan.radius_train_px)
        held = self._z_held(plan)
        for _ in range(max(1, plan.steps)):
            R, t = self.poses(ti)
            if not refine:
                R, t = R.detach(), t.detach()
            R = self._equivalent_pose(R)
            z = self._batch_z(ti, plan)
            if held and z is not None:
                z = z.detach()
            with self._autocast():
                per_img = slice_loss(
                    self._step_field, R, t, z, xft[:, :n], ctf[:, :n], self.points.freqs[:n]
                )
            # this rank's share of the global batch's mean loss (the ranks' gradients are
            # summed): the update of one process with the whole global batch
            loss = per_img.mean() * self._share
            if self.loss_start is None and self._loss_first is None:
                self._loss_first = loss.detach()
            self._residual[ti] = per_img.detach().float()
            self._power[ti] = image_power(xft[:, :n])
            total = loss
            if z is not None and self.cfg.latent_l2 > 0:
                total = total + self.cfg.latent_l2 * (z**2).sum(-1).mean() * self._share
            # no finiteness test here (it would wait for the device): a non-finite loss
            # is found by _check_losses within loss_check_every batches and the epoch is
            # rolled back, undoing these steps
            for o in self._optimizers().values():
                o.zero_grad(set_to_none=True)
            total.backward()
            self.opt_field.step()
            if refine:
                self.opt_pose.step()
            if self.opt_latent is not None and not held:
                self.opt_latent.step()
        return loss.detach()

    def _train_batch(self, batch: Batch, plan: StepPlan) -> torch.Tensor:
        """:meth:`_step` on ``batch``, in steps of at most :attr:`max_step_images` images.

        Out of memory (``torch.OutOfMemoryError``, CUDA's included) during a step: the
        allocator's cache is freed, the limit becomes half the failed step's images (for
        the rest of the run; logged) and the batch is run again as separate steps of the
        halves (each its own search and optimiser step; no gradient accumulation). A
        single image that does not fit raises. Returns the batch's mean loss (device).
        """
        limit = self.max_step_images
        if limit is None or len(batch) <= limit:
            try:
                return self._step(batch.idx, plan, batch)
            except OUT_OF_MEMORY as err:
                if self.dist.enabled:  # the ranks step together: one cannot take more steps
                    raise CryofieldError(
                        f"out of {self.device.type.upper()} memory in a step of {len(batch)} "
                        f"images on rank {self.dist.rank}: start again with a smaller "
                        "--batch-size (data-parallel runs do not split batches)"
                    ) from err
                if len(batch) <= 1:
                    raise
            # out of the except block: the failed step's tensors are released
            self._reduce_step_images(len(batch))
            return self._train_batch(batch, plan)
        losses = []
        for s in range(0, len(batch), limit):
            rows = np.arange(s, min(s + limit, len(batch)))
            losses.append(self._train_batch(batch.part(rows), plan) * len(rows))
        return torch.stack(losses).sum() / len(batch)

    def _reduce_step_images(self, failed: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        new = max(1, failed // 2)
        first = self.max_step_images is None
        self.max_step_images = new if first else min(self.max_step_images or new, new)
        msg = (
            "out of %s memory in a step of %d images: from now on batches are run as "
            "separate steps of at most %d images (a smaller --batch-size avoids the retries)"
        )
        (log.warning if first else log.info)(msg, self.device.type.upper(), failed, new)

    def _check_losses(
        self, pending: list[torch.Tensor | float], losses: list[float], epoch: int, first: int
    ) -> None:
        """Read the losses of the batches ``first, first + 1, ...`` (0-based) from the
        device at once, set :attr:`loss_start` from the run's first step, and run the
        divergence check (:func:`~cryofield.inference.loss.check_loss`) on each in order;
        appends them to ``losses`` and empties ``pending``."""
        vals = [torch.as_tensor(v, dtype=torch.float32, device=self.device).reshape(())
                for v in pending]  # fmt: skip
        probe = self.loss_start is None and self._loss_first is not None
        if probe:
            vals.append(self._loss_first.float())  # type: ignore[union-attr]
        if vals:  # each rank holds its share of every global batch's mean loss
            stacked = dist.all_reduce_sum(torch.stack(vals))
        read = stacked.tolist() if vals else []
        if probe:
            start = read.pop()
            self._loss_first = None
            if math.isfinite(start):
                self.loss_start = start
        pending.clear()
        for j, v in enumerate(read):
            check_loss(v, losses, self.loss_start, epoch, first + j)
            losses.append(v)

    # ---------------------------------------------------------------- epochs
    def _run_epoch(self, epoch: int) -> dict[str, Any]:
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.N, generator=gen).numpy()
        phase = self.schedule.phase_of_epoch(epoch)
        if not phase.searches_poses and self.active_symmetry != cfg.symmetry:
            self.align_symmetry()  # the search (without symmetry) is over
        t0 = time.perf_counter()
        losses: list[float] = []
        plan = self.schedule.plan(epoch, self.images_seen)
        R_before, t_before = (x.detach().clone() for x in self.poses.all())
        if phase.refines_half_maps:
            return self._refine_epoch(epoch, t0, R_before, t_before)
        if self._fits_field_to_map(phase):
            return self._field_fit_epoch(epoch, t0, R_before, t_before)
        if self._wants_latent_init(epoch):
            self._init_latents(epoch)
            if self.latents is not None:  # every rank computed it; rank 0's is kept
                dist.broadcast_(self.latents.z.weight.data)
        if phase.refines_locally:
            self._prepare_local()
        self._balance = self._start_balance(epoch, phase)
        self._t_beyond.zero_()
        bar = tqdm(
            total=self.N, desc=f"epoch {epoch}/{cfg.epochs} [{phase}]", unit="img",
            disable=None if self.dist.is_main else True, leave=False, dynamic_ncols=True,
        )  # fmt: skip
        order = dist.global_batches(perm, cfg.batch_size, self.dist.world)
        full = order
        # data-parallel: this rank's part of every global batch (every image once per epoch)
        order = [b[dist.batch_share(len(b), self.dist.rank, self.dist.world)] for b in order]
        pending: list[torch.Tensor | float] = []  # batch losses not yet read from the device
        stream = self.batches.iter_batches(order, self.prefetch)
        try:
            with contextlib.closing(stream):
                for k, batch in enumerate(stream):
                    plan = self.schedule.plan(epoch, self.images_seen)
                    self._share, self._batch_rows = len(batch) / len(full[k]), full[k]
                    pending.append(self._train_batch(batch, plan))
                    self.images_seen += len(full[k])
                    bar.update(len(full[k]))
                    if len(pending) >= self.loss_check_every or k == len(order) - 1:
                        self._check_losses(pending, losses, epoch, k + 1 - len(pending))
                        rate = bar.n / max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix(loss=f"{losses[-1]:.4g}", img_s=f"{rate:.0f}",
                                        r_px=f"{plan.radius_train_px:.1f}")  # fmt: skip
        finally:
            bar.close()
            self._local = None
            self._balance = None
            self._share, self._batch_rows = 1.0, None
        if self.dist.enabled:
            self._merge_rows(np.concatenate(order) if order else np.zeros(0, np.int64))
        dt = time.perf_counter() - t0
        extra = {}
        if phase.searches_poses and self.epoch >= 1 and cfg.t_extent_px:
            n_out, n_all = dist.all_reduce_sum(self._t_beyond.clone()).tolist()
            extra["translation_grid"] = dict(
                extent_px=float(cfg.t_extent_px or 0.0), ngrid=cfg.t_ngrid,
                frac_beyond=n_out / max(n_all, 1.0),
            )  # fmt: skip
        return dict(
            epoch=epoch, phase=phase.value, loss=float(np.mean(losses)),
            radius_px=float(plan.radius_train_px), images_s=self.N / dt, time_s=dt, **extra,
            **epoch_checks(dataclasses.replace(cfg, symmetry=self.active_symmetry),
                           self.batches, self.poses, self.latents, R_before, t_before,
                           map_symmetry=cfg.symmetry),
        )  # fmt: skip

    @torch.no_grad()
    def _merge_rows(self, mine: np.ndarray) -> None:
        """Data-parallel: every rank takes the rows of the per-image tables (poses,
        latents, their sparse-Adam moments, residuals) from the rank that trained that
        image this epoch (:func:`~cryofield.inference.distributed.merge_rows`)."""
        owned = torch.zeros(self.N, dtype=torch.bool, device=self.device)
        owned[torch.as_tensor(mine, dtype=torch.long, device=self.device)] = True
        tables = [self.poses, *([self.latents] if self.latents is not None else [])]
        opts = [self.opt_pose, *([self.opt_latent] if self.opt_latent is not None else [])]
        for table, opt in zip(tables, opts, strict=True):
            for p in table.parameters():
                p.data.copy_(dist.merge_rows(p.data, owned))
                for v in opt.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == self.N:
                        v.copy_(dist.merge_rows(v, owned))
            for b in table.buffers():  # e.g. the poses' reference rotations R0
                if b.dim() > 0 and b.shape[0] == self.N:
                    b.copy_(dist.merge_rows(b, owned))
        for buf in (self._residual, self._power):
            buf.copy_(dist.merge_rows(buf, owned))

    def _refine_epoch(
        self, epoch: int, t0: float, R0: torch.Tensor, tr0: torch.Tensor
    ) -> dict[str, Any]:
        """Gold-standard refinement of every pose against back-projected half maps
        (:mod:`cryofield.inference.refine`); the field takes no steps."""
        from cryofield.inference.refine import RefineSettings, refine_poses_gold_standard

        c = self.cfg
        tr0 = self._recentre(R0, tr0)
        search = search_settings(c, self.schedule.final_search_plan()) if c.refine_global else None
        settings = RefineSettings(
            max_iters=c.refine_iters, step_deg=c.local_step_deg, t_step_px=c.local_t_step_px,
            levels=c.local_levels, prior_deg=c.refine_prior_deg, radius_max_px=c.radius_max_px,
            global_search=search, symmetry=self.active_symmetry, folds=c.refine_folds,
        )  # fmt: skip
        res = refine_poses_gold_standard(self.batches, R0, tr0, settings)
        self.poses.set(torch.arange(self.N, device=self.device), res.rotations, res.shifts_px)
        for x in (*self.poses.parameters(), *self.poses.buffers()):  # every rank refined
            dist.broadcast_(x.data)  # all of them; rank 0's are kept
        dt = time.perf_counter() - t0
        last = res.history[-1] if res.history else {}
        return dict(
            epoch=epoch, phase=Phase.REFINE.value, loss=None,
            radius_px=float(last.get("radius_px", 0.0)), images_s=self.N / dt, time_s=dt,
            refine=res.history,
            **epoch_checks(c, self.batches, self.poses, self.latents, R0, tr0),
        )  # fmt: skip

    @torch.no_grad()
    def _recentre(self, R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The translations ``t (N, 2)`` of the poses ``R (N, 3, 3)`` against the map moved
        so that its centre of mass is at the box centre (ab initio homogeneous runs whose
        field is next fitted to the back-projection, ``search_centre`` on): ``t + (R c)_xy``
        for a map whose centre of mass is ``c`` (the field's map at the last search radius,
        :func:`~cryofield.inference.pose_search.centre_references`, at most ``D / 8``;
        under 0.5 px: ``t`` as it is). An ab initio map settles 3-5 px off the box centre
        in its first epoch; from here on the half maps, the consensus map and the exported
        poses are centred on the particle (a re-extraction that re-centres particles on
        the poses' origins then centres them), and the field, fitted from an empty field
        next epoch (:attr:`refit_field`), follows."""
        c = self.cfg
        if not (c.search_centre and not c.poses_from_file and c.field_fit == "backprojection"
                and self.latents is None):  # fmt: skip
            return t
        r = self.schedule.final_search_plan().search_hi_px
        grid, Dc = self.field.grid_ht(r, None)
        fgrid = hartley_grid_to_fourier(grid.float().reshape(Dc, Dc, Dc))
        cen = centre_references(fgrid, self.D, self.active_symmetry)[1][0].to(t.device)
        dist.broadcast_(cen)  # rank 0's centre on every rank
        if float(cen.norm()) < 0.5:
            return t
        log.info("map re-centred: its centre of mass was (%.2f, %.2f, %.2f) px from the box "
                 "centre; the poses move with it and the field is fitted anew",
                 *cen.tolist())  # fmt: skip
        self.refit_field = True
        return uncentre_shifts(R, t, -cen.expand(R.shape[0], 3))

    def _fits_field_to_map(self, phase: Phase) -> bool:
        """Whether an epoch of ``phase`` regresses the field onto the back-projected map
        (homogeneous field epochs with ``field_fit: backprojection``) instead of training
        it image by image."""
        return (
            self.cfg.zdim == 0
            and self.cfg.field_fit == "backprojection"
            and phase in (Phase.FIELD, Phase.FIXED)
        )

    def _field_fit_epoch(
        self, epoch: int, t0: float, R0: torch.Tensor, tr0: torch.Tensor
    ) -> dict[str, Any]:
        """The field regressed onto the back-projection of all training images at the
        current poses (:mod:`cryofield.inference.field_fit`), then one pass over the images
        for their residuals against the fitted field (the junk score's input). Every rank
        computes the same (rank 0's field is kept)."""
        from cryofield.inference.consensus import backproject_sets
        from cryofield.inference.field_fit import FitSettings, fit_field_to_map
        from cryofield.inference.refine import TrainingImages

        c, b = self.cfg, self.batches
        R, t = (x.detach() for x in self.poses.all())
        ops = symmetry_operators(self.active_symmetry, device=self.device)
        (bp,) = backproject_sets(
            TrainingImages(b), R, t, b.ctf_params, b.apix_A, n_sets=1,
            progress="back-projection", symmetry=ops if ops.shape[0] > 1 else None,
        )  # fmt: skip
        t_bp = time.perf_counter() - t0
        settings = FitSettings(c.field_fit_steps, c.field_fit_points, c.lr_field_fit,
                               c.seed * 1_000_003 + epoch)  # fmt: skip
        label = f"epoch {epoch}/{c.epochs} [field fit]"
        fit = fit_field_to_map(
            self.field, bp.volume().to(self.device), c.radius_max_px, settings, progress=label,
            from_scratch=self.images_seen == 0 or self.refit_field,
        )  # fmt: skip
        self.refit_field = False
        self.images_seen += self.N  # every step saw the whole data set
        for p in self.field.parameters():
            dist.broadcast_(p.data)
        log.info(
            "field fitted to the back-projected map of the %d images at their poses: %d steps "
            "of %d voxels, relative residual %.3g -> %.3g",
            self.N, fit["steps"], fit["points"], fit["rel_residual_start"],
            fit["rel_residual_end"],
        )  # fmt: skip
        loss = self._score_images(epoch)
        dt = time.perf_counter() - t0
        return dict(
            epoch=epoch, phase=self.schedule.phase_of_epoch(epoch).value, loss=loss,
            radius_px=float(c.radius_max_px), images_s=self.N / dt, time_s=dt,
            field_fit=dict(fit, backprojection_s=t_bp),
            **epoch_checks(dataclasses.replace(c, symmetry=self.active_symmetry),
                           self.batches, self.poses, self.latents, R0, tr0),
        )  # fmt: skip

    @torch.no_grad()
    def _score_images(self, epoch: int) -> float:
        """Per-image loss of every image against the field at its pose (``residuals.npz``,
        the junk score's input), without steps, the slices read from one voxel grid of the
        field (:func:`~cryofield.inference.loss.grid_loss`); returns the mean."""
        r = self.cfg.radius_max_px
        n = self._points_host.count(r)
        grid, _ = self.field.grid_ht(r, None, oversample=2)
        order = [np.arange(s, min(s + 256, self.N)) for s in range(0, self.N, 256)]
        total = 0.0
        for batch in self.batches.iter_batches(order, self.prefetch):
            ti, xft, ctf = batch.index, batch.images_ft, batch.ctf
            R, t = self.poses(ti)
            per_img = grid_loss(grid, 2 * self.D, R, t, xft[:, :n], ctf[:, :n],
                                self.points.freqs[:n])  # fmt: skip
            self._residual[ti] = per_img.float()
            self._power[ti] = image_power(xft[:, :n])
            total += float(per_img.float().sum())
        if not math.isfinite(total):
            raise FloatingPointError(f"non-finite residuals after the field fit (epoch {epoch})")
        return total / self.N

    def fit(self) -> Path:
        """Train from the current state up to ``cfg.epochs``; returns the output folder."""
        cfg = self.cfg
        self.outdir.mkdir(parents=True, exist_ok=True)
        per_epoch = layout.checkpoint_bytes(
            self.field, self.poses, self.latents, self.N, self.D, cfg.zdim
        )
        if self.dist.is_main:
            layout.check_free_space(self.outdir, per_epoch, cfg.epochs - self.epoch)
            layout.write_config(self.outdir, cfg)
        if self.epoch == 0 and self.images_seen == 0:
            self._isotropic_start()
        while self.epoch < cfg.epochs:
            epoch = self.epoch + 1
            snapshot = copy.deepcopy(self.state())
            try:
                metrics = self._run_epoch(epoch)
            except FloatingPointError as err:
                self.rollbacks += 1
                if self.rollbacks > cfg.max_rollbacks:
                    lr = self.opt_field.param_groups[0]["lr"]
                    raise CryofieldError(
                        f"training diverged: {err}, still after {cfg.max_rollbacks} roll-backs "
                        f"that halved the learning rates (field {lr:.3g}); nothing was saved "
                        f"for epoch {epoch}: start a new run with a lower --lr-field (it was "
                        f"{cfg.lr_field:g}; default {TrainConfig.lr_field:g})"
                    ) from err
                rb = self.rollbacks
                self.load_state(snapshot)
                self.rollbacks = rb
                for o in self._optimizers().values():
                    for g in o.param_groups:
                        g["lr"] *= 0.5
                log.warning(
                    "epoch %d diverged (%s): rolled back, learning rates halved", epoch, err
                )
                continue
            self.epoch = epoch
            self._shorten_search(epoch, metrics)
            self._extend_search(epoch, metrics)
            self._widen_translations(epoch, metrics)
            self.save_epoch(metrics)
            pc = metrics["pose_change"]
            mod = (f" modulo {pc['modulo']} in the map's frame (without it "
                   f"{100 * pc['frac_moved_c1']:.1f}%)") if "modulo" in pc else ""  # fmt: skip
            log.info(
                "epoch %d [%s] loss %.5g radius %.1f px, %.1f img/s, %.1f s; %.1f%% of poses "
                "changed basin%s (median move %.2f deg)",
                epoch, metrics["phase"], float("nan") if metrics["loss"] is None
                else metrics["loss"], metrics["radius_px"],
                metrics["images_s"], metrics["time_s"],
                100 * pc["frac_moved"], mod, pc["median_deg"],
            )  # fmt: skip
            if self._failed_search(epoch, metrics):
                self.search_failed = True
                break
        return self.outdir

    def _failed_search(self, epoch: int, metrics: dict[str, Any]) -> bool:
        """Whether the search failed and a restart is left (``search_restart <
        search_restarts``; ab initio runs only). Logged. Failed:

        - at the end of the search (``epoch == hps_epochs``), the viewing directions are
          collapsed (``view_coverage.collapsed``: two antipodal blobs or a few
          directions);
        - after the half-map refinement (``phase == "refine"``), its global search
          against the half maps moved more than ``REFINE_MOVED_MAX_FRACTION`` of the
          images to another basin (the verdict's gold-standard check: a wrong map that is
          consistent with itself; from ``REFINE_CHECK_MIN_IMAGES`` images on).

        Why at the end of the search and not before: a search can leave a collapse (the
        preferred-orientation cell of bench_robust was two antipodal blobs for 4 of its 7
        search epochs, then converged), and one that ends collapsed does not recover in
        the refinement. Which start fails is a matter of the seed: the same data
        collapsed or converged with different starts (docs/train.md)."""
        from cryofield.inference.diagnostics import gold_standard_ok

        c = self.cfg
        if c.poses_from_file:
            return False
        vc = metrics.get("view_coverage") or {}
        moved = float((metrics.get("pose_change") or {}).get("frac_moved", 0.0))
        refined = metrics.get("phase") == Phase.REFINE.value
        if epoch == self.schedule.hps_epochs and vc.get("collapsed"):
            what = (
                f"the viewing directions collapsed at the end of the search (occupancy "
                f"{vc.get('occupancy_ratio', float('nan')):.2f} of uniform, antipodal pair "
                f"{vc.get('antipodal_pair_fraction', float('nan')):.2f})"
            )
        elif refined and gold_standard_ok(moved, self.N) is False:
            what = (
                f"the refinement's global search against the half maps moved {100 * moved:.1f}% "
                "of the images to another basin (a wrong map consistent with itself)"
            )
        else:
            return False
        if c.search_restart >= c.search_restarts:
            if c.search_restarts:
                log.warning("%s, after %d restart(s) with other seeds: going on", what,
                            c.search_restart)  # fmt: skip
            return False
        log.warning("%s: starting again with seed %d (restart %d of at most %d)", what,
                    c.seed + 1, c.search_restart + 1, c.search_restarts)  # fmt: skip
        return True

    def restart_config(self) -> TrainConfig:
        """The configuration of the next attempt after a collapsed search: the next seed,
        the search plan the run started with (:attr:`TrainConfig.planned_search`)."""
        c = dataclasses.replace(self.cfg)
        c.seed += 1
        c.search_restart += 1
        if c.planned_search is not None:
            c.epochs, c.hps_images = (int(v) for v in c.planned_search)
        c.search_ramp_images = None
        return c

    @torch.no_grad()
    def _isotropic_map(self, rows: np.ndarray) -> torch.Tensor:
        """``(D, D, D)`` spherical average (about the box centre, 1-px shells, linear
        interpolation between them) of the back-projection of the training images ``rows``
        at uniformly random rotations (no shifts), in the field's normalised units."""
        from cryofield.inference.consensus import backproject_sets
        from cryofield.inference.refine import TrainingImages
        from cryofield.physics.lattice import radial_index_3d
        from cryofield.physics.rotation import random_rotations

        b = self.batches
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + 17)
        R = random_rotations(len(rows), gen).to(self.device, torch.float32)
        t = torch.zeros(len(rows), 2, device=self.device)
        ctf = None if b.ctf_params is None else b.ctf_params.subset(torch.as_tensor(rows))
        (bp,) = backproject_sets(TrainingImages(b), R, t, ctf, b.apix_A, rows=rows, n_sets=1)
        vol = bp.volume().to(self.device).float()
        r = radial_index_3d(self.D, device=self.device).reshape(-1)
        lo = r.floor().long()
        w = r - lo
        n_sh = int(lo.max()) + 2
        num = torch.zeros(n_sh, device=self.device, dtype=torch.float64)
        den = torch.zeros_like(num)
        v = vol.reshape(-1).double()
        for k, wk in ((lo, 1 - w), (lo + 1, w)):
            num.index_add_(0, k, v * wk.double())
            den.index_add_(0, k, wk.double())
        prof = (num / den.clamp_min(1e-12)).float()
        return (prof[lo] * (1 - w) + prof[lo + 1] * w).reshape(vol.shape)

    def _isotropic_start(self) -> None:
        """The start of the odd restarts of a search (homogeneous ab initio runs whose
        first search collapsed, :meth:`_failed_search`; ``isotropic_start_images > 0``;
        the even ones start from an untrained field with another seed): the field is
        regressed (:func:`~cryofield.inference.field_fit.fit_field_to_map`,
        from an emptied output layer) onto :meth:`_isotropic_map` of up to
        ``isotropic_start_images`` images, on the first search radius. Every direction
        then renders the same slice, so the first search ranks poses by the data, not by
        the random anisotropy of an untrained field. A different kind of start, not only
        another seed: on bench_robust's n1k and pref_view the untrained field's search
        collapsed (two antipodal blobs) and this one converged (seed 0; n1k with seed 1
        collapsed too); on demo-homo the other way round (seeds 0 and 1), so the first
        attempt keeps the untrained field and the restarts alternate (docs/train.md)."""
        from cryofield.inference.field_fit import FitSettings, fit_field_to_map

        c = self.cfg
        odd = c.search_restart % 2 == 1  # restarts alternate the kind of start
        if c.zdim or c.poses_from_file or c.isotropic_start_images <= 0 or not odd:
            return
        t0 = time.perf_counter()
        gen = np.random.default_rng(c.seed)
        n = min(self.N, int(c.isotropic_start_images))
        rows = np.sort(gen.permutation(self.N)[:n])
        target = self._isotropic_map(rows)
        assert c.radius_start_px is not None
        fit = fit_field_to_map(self.field, target, c.radius_start_px,
                               FitSettings(None, c.field_fit_points, c.lr_field_fit, c.seed),
                               from_scratch=True)  # fmt: skip
        for p in self.field.parameters():
            dist.broadcast_(p.data)
        log.info(
            "start: the field fitted to the spherical average of %d images back-projected at "
            "random poses (radius %.1f px; %d steps, relative residual %.3g; %.1f s)",
            n, c.radius_start_px, fit["steps"], fit["rel_residual_end"],
            time.perf_counter() - t0,
        )  # fmt: skip

    def _shorten_search(self, epoch: int, metrics: dict[str, Any]) -> None:
        """The search's early stop (homogeneous ab initio runs whose search length adapts,
        ``search_extend > 0``): once two search epochs in a row had at most
        :func:`~cryofield.inference.diagnostics.pose_settle_limit` of the images change
        basin, at or after half the planned search, the next epoch is the search's last and
        its radius grows to the planned final search radius within it; the shorter plan is
        written to config.yaml. The half-map refinement that follows searches globally at
        that radius again and refines to the half maps' resolution.

        Measured with `cryofield demo --quick` (1,000 images, D=32: a 30-epoch search because
        every search sees at least 30,000 images): the poses had settled by epoch 21 (5.0%
        changed basin, median move 1.9 deg) and epochs 22-30 moved them by a median
        1.1-1.6 deg each (docs/train.md)."""
        from cryofield.inference.diagnostics import pose_settle_limit

        c, sch = self.cfg, self.schedule
        if c.zdim or c.poses_from_file or not c.search_extend or epoch > sch.hps_epochs:
            return
        frac = float(metrics["pose_change"]["frac_moved"])
        self.search_settled = self.search_settled + 1 if frac <= pose_settle_limit(self.N) else 0
        last = epoch + 1
        if (self.search_settled < 2 or last >= sch.hps_epochs or self.search_extended
                or epoch < math.ceil(sch.hps_epochs / 2)):  # fmt: skip
            return
        n, saved = self.N, sch.hps_epochs - last
        assert c.epochs is not None and c.radius_search_px is not None
        c.search_ramp_images = self.images_seen + n
        c.hps_images = last * n
        c.epochs -= saved
        self.schedule = Schedule(c, n)
        if self.dist.is_main:
            layout.write_config(self.outdir, c)
        log.info(
            "poses have settled (at most %.0f%% of the images changed basin in each of the "
            "last 2 search epochs; %.1f%% in this one): epoch %d ends the search (%d planned "
            "search epochs left out), its radius growing to %.1f px (%.1f A)",
            100 * pose_settle_limit(n), 100 * frac, last, saved, c.radius_search_px,
            self.D * self.batches.apix_A / c.radius_search_px,
        )  # fmt: skip

    def _widen_translations(self, epoch: int, metrics: dict[str, Any]) -> None:
        """After a search epoch in which more than :data:`~cryofield.inference.pose_search.
        BEYOND_GRID_LIMIT` of the images were found beyond the translation grid, the grid
        grows by one step on each side for the epochs that follow (and the refinement's
        global search), up to a fifth of the box
        (:func:`~cryofield.inference.pose_search.widened_translation_grid`); written to
        config.yaml (a resumed run follows it). The first epoch is not counted: its grid is
        about the box centre while the map forms."""
        c = self.cfg
        tg = metrics.get("translation_grid")
        if tg is None or not c.t_extent_px:
            return
        wider = widened_translation_grid(c.t_extent_px, c.t_ngrid, tg["frac_beyond"], self.D)
        if wider is None:
            if tg["frac_beyond"] > BEYOND_GRID_LIMIT:
                log.warning(
                    "epoch %d: %.1f%% of the images were found beyond the translation grid "
                    "(+-%.2f px), which is at its largest (a fifth of the box): particles "
                    "this far off centre cannot be aligned; re-extract them centred",
                    epoch, 100 * tg["frac_beyond"], c.t_extent_px,
                )  # fmt: skip
            return
        old = c.t_extent_px
        c.t_extent_px, c.t_ngrid = wider
        if self.dist.is_main:
            layout.write_config(self.outdir, c)
        log.info(
            "epoch %d: %.1f%% of the images were found beyond the translation grid (+-%.2f "
            "px): it grows to +-%.2f px (%d x %d points, the same %.2f px step)",
            epoch, 100 * tg["frac_beyond"], old, c.t_extent_px, c.t_ngrid, c.t_ngrid,
            2 * c.t_extent_px / (c.t_ngrid - 1),
        )  # fmt: skip

    def _extend_search(self, epoch: int, metrics: dict[str, Any]) -> None:
        """The search's stopping rule (homogeneous ab initio runs): after the last planned
        search epoch, while more than :func:`~cryofield.inference.diagnostics.
        pose_settle_limit` of the images changed basin in it, add one search epoch; the
        radius keeps growing at the planned rate up to ``search_cap_res_A`` (and 3/4 of
        Nyquist), at most ``search_extend`` times the planned search epochs. The longer
        plan is written to config.yaml (a resumed run follows it).

        Measured on an elongated particle (D=64, N=5000, SNR 0.1, semi-axes 90 x 24 x 24 A):
        the rotation about the long axis carries ~20x less information at 20 A than any
        rotation of the built-in protein, the planned six search epochs end with 19% of
        the images still changing basin and 41 deg median error; searching on to 13 A
        breaks the symmetry (docs/train.md).
        """
        from cryofield.inference.diagnostics import pose_settle_limit

        c, sch = self.cfg, self.schedule
        if c.zdim or c.poses_from_file or not c.search_extend or epoch != sch.hps_epochs:
            return
        frac = float(metrics["pose_change"]["frac_moved"])
        limit = pose_settle_limit(self.N)
        if frac <= limit:
            return
        planned = sch.hps_epochs - self.search_extended
        if self.search_extended >= math.floor(c.search_extend * planned + 1e-9):
            log.warning(
                "poses have not settled after %d search epochs (%.1f%% changed basin, limit "
                "%.0f%%); the search stops here (search_extend %g)",
                sch.hps_epochs, 100 * frac, 100 * limit, c.search_extend,
            )  # fmt: skip
            return
        assert c.radius_start_px is not None and c.radius_search_px is not None
        assert c.epochs is not None
        n = self.N
        ramp = c.search_ramp_images or sch.hps_total
        slope = (c.radius_search_px - c.radius_start_px) / max(ramp, 1)  # px per image
        box_A = self.D * self.batches.apix_A
        cap = min(box_A / c.search_cap_res_A, 0.75 * (self.D / 2), self.D / 2 - 1)
        radius = max(c.radius_search_px, min(cap, c.radius_search_px + slope * n))
        if slope > 0:
            c.search_ramp_images = ramp + round((radius - c.radius_search_px) / slope)
        c.radius_search_px = float(radius)
        c.hps_images = sch.hps_total + n
        c.epochs += 1
        self.search_extended += 1
        self.schedule = Schedule(c, n)
        if self.dist.is_main:
            layout.write_config(self.outdir, c)
        log.info(
            "poses have not settled (%.1f%% of the images changed basin, limit %.0f%%): "
            "searching one more epoch (%d of at most %d more), radius up to %.1f px (%.1f A)",
            100 * frac, 100 * limit, self.search_extended,
            math.floor(c.search_extend * planned + 1e-9), radius, box_A / radius,
        )  # fmt: skip

    # ---------------------------------------------------------------- outputs
    def save_epoch(self, metrics: dict[str, Any]) -> Path:
        """Write ``OUTDIR/epoch_NNN`` (:func:`~cryofield.inference.rundir.write_epoch`)
        and its line of metrics.jsonl; in a data-parallel run rank 0 writes it while the
        others wait."""
        if not self.dist.is_main:
            dist.barrier()
            return self.outdir / layout.epoch_dirname(self.epoch)
        try:
            return self._write_epoch(metrics)
        finally:
            dist.barrier()

    def _write_epoch(self, metrics: dict[str, Any]) -> Path:
        R, t = self.poses.all()
        return layout.write_epoch(
            self.outdir, self.epoch,
            weights={"state_dict": self.field.state_dict(), "hparams": self.field.hparams},
            state=self.state(), rotations=R.cpu().numpy(), shifts_px=t.cpu().numpy(),
            apix_A=self.batches.apix_A, particle_index=self.particle_index,
            residual=self._residual.cpu().numpy(), power=self._power.cpu().numpy(),
            metrics=metrics,
            latents=None if self.latents is None else self.latents.all().cpu().numpy(),
            volume=self._epoch_map if self.latents is None else None,
        )  # fmt: skip

    def _epoch_map(self) -> np.ndarray:
        """The rendered map of a homogeneous run (``epoch_NNN/volume.mrc``)."""
        vol = self.field.render_volume()
        if not torch.isfinite(vol).all():
            raise CryofieldError(
                f"training diverged: the map of epoch {self.epoch} is not finite; nothing "
                "was saved for it: start a new run with a lower --lr-field (it was "
                f"{self.cfg.lr_field:g})"
            )
        return vol.numpy()
