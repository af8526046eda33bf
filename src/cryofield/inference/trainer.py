"""The training loop: pose search, gradient refinement, checkpoints, resume.

Loss (both phases): the squared error between the centred image and the CTF-weighted
central slice of the field, in Hartley space, on the frequencies inside the current radius:

``L = mean_k (H[X_i exp(2 pi i k.t_i)](k) - C_i(k) V_theta([kx, ky, 0] R_i, z_i))^2``

which equals the Fourier-space L2 error by Parseval; the field is queried directly at the
slice points (exact and differentiable in ``R_i``). The search phase instead slices a voxel
grid of the field (:mod:`cryofield.inference.pose_search`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cryofield.errors import CryofieldError
from cryofield.inference import rundir as layout
from cryofield.inference.config import TrainConfig
from cryofield.inference.data import BatchMaker, ImageSource
from cryofield.inference.pose_search import (
    FrequencyPoints,
    SearchSettings,
    centre_images,
    local_refine_poses,
    search_poses,
)
from cryofield.inference.rundir import RUN_FILES, RunDir, epoch_dirname, load_run_torch
from cryofield.inference.schedule import Schedule, StepPlan
from cryofield.io.atomic import atomic_path, refuse_overwrite, write_text_atomic
from cryofield.lock import folder_lock
from cryofield.logs import get_logger, setup_logging
from cryofield.model.field import HartleyField, fourier_grid, hartley_grid_to_fourier
from cryofield.model.tables import LatentTable, PoseTable
from cryofield.physics.ctf import CTFParams

log = get_logger("train")

#: images back-projected for the per-epoch half-map FSC of homogeneous runs
DIAG_MAX_IMAGES = 20_000

#: training has diverged when the loss (median of the last few batches) exceeds this
#: multiple of the loss at its first step. The loss is a data-fidelity term that starts
#: near the image power and decreases; a healthy run stays within a few times its start.
DIVERGENCE_FACTOR = 100.0


def slice_loss(
    field: HartleyField,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    z: torch.Tensor | None,
    images_ft: torch.Tensor,
    ctf: torch.Tensor,
    freqs: torch.Tensor,
) -> torch.Tensor:
    """Per-image Hartley-space L2 loss.

    Parameters
    ----------
    field
        The neural field.
    rotations
        ``(B, 3, 3)``.
    shifts_px
        ``(B, 2)``.
    z
        ``(B, zdim)`` or ``None``.
    images_ft
        ``(B, M)`` complex normalised image transforms at ``freqs``.
    ctf
        ``(B, M)``.
    freqs
        ``(M, 2)`` cycles/px.

    Returns
    -------
    torch.Tensor
        ``(B,)`` mean squared error per image.
    """
    coords = torch.einsum("mi,bij->bmj", freqs, rotations[:, :2, :])  # (B, M, 3)
    pred = field(coords, z).float() * ctf
    xc = centre_images(images_ft, freqs, shifts_px[:, None, :])[:, 0]
    obs = xc.real - xc.imag
    return ((obs - pred) ** 2).mean(-1)


def _search_settings(cfg: TrainConfig, plan: StepPlan) -> SearchSettings:
    return SearchSettings(
        base_nside=cfg.base_nside,
        base_psi=cfg.base_psi,
        levels=cfg.search_levels,
        n_keep=cfg.n_keep,
        t_extent_px=float(cfg.t_extent_px or 0.0),
        t_ngrid=cfg.t_ngrid if cfg.t_extent_px else 1,
        radius_lo_px=plan.search_lo_px,
        radius_hi_px=plan.search_hi_px,
    )


def _kmeans_groups(z: torch.Tensor, k: int, iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic small k-means: labels ``(B,)`` and centres ``(k, zdim)``."""
    k = min(k, z.shape[0])
    order = torch.argsort(z[:, 0])
    centres = z[order[torch.linspace(0, z.shape[0] - 1, k).long()]].clone()
    labels = torch.zeros(z.shape[0], dtype=torch.long)
    for _ in range(iters):
        labels = torch.cdist(z, centres).argmin(1)
        for j in range(k):
            m = labels == j
            if m.any():
                centres[j] = z[m].mean(0)
    return labels, centres


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
        self.cfg = cfg
        self.outdir = Path(outdir)
        self.device = torch.device(cfg.device)
        self.N = len(source)
        self.D = int(cfg.D)
        self.particle_index = np.arange(self.N) if particle_index is None else particle_index
        self.points = FrequencyPoints.build(self.D, self.device)
        self.batches = BatchMaker(
            source, ctf_params, self.points, cfg.invert, cfg.window, device=self.device
        )
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
        self.epoch = 0
        self.images_seen = 0
        self.rollbacks = 0
        self.latent_init_epoch = 0  # last epoch whose start set the latents by PCA
        self.search_extended = 0  # search epochs added by the stopping rule so far
        #: loss of the run's very first step (before any update): the divergence reference
        self.loss_start: float | None = None
        self._local: tuple[torch.Tensor, int, torch.Tensor | None] | None = None
        #: per-image loss at its last step (epoch_NNN/residuals.npz, for the junk score)
        self._residual = np.full(self.N, np.nan, dtype=np.float32)
        self._power = np.full(self.N, np.nan, dtype=np.float32)  # mean |X|^2 on those points
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
        return (
            self.latents is not None
            and plan.phase == "hps"
            and self.epoch + 1 <= self.schedule.consensus_epochs
        )

    def _z_held(self, plan: StepPlan) -> bool:
        """The latent table takes no steps: warm-up, or the epoch that starts from the
        variability analysis (the field first learns to use the new codes)."""
        return self._z_frozen(plan) or (
            self.latent_init_epoch > 0 and self.latent_init_epoch == self.epoch + 1
        )

    def _wants_latent_init(self, epoch: int) -> bool:
        """Set the latents by PCA at the start of ``epoch``: the first epoch after the
        consensus search (with known poses: the first epoch), every later search epoch
        (``latent_refresh``; the search-again epochs always) and the first epoch after a
        search epoch, from the current poses."""
        if self.latents is None or self.cfg.latent_init != "pca":
            return False
        if self.latent_init_epoch == 0:
            return epoch > self.schedule.consensus_epochs and (
                epoch > 1 or self.cfg.poses_from_file
            )
        if self.latent_init_epoch >= epoch:
            return False
        if self.schedule.phase_of_epoch(epoch) == "hps":
            return self.cfg.latent_refresh or epoch >= self.schedule.research_from
        return epoch > 1 and self.schedule.phase_of_epoch(epoch - 1) == "hps"

    @torch.no_grad()
    def _init_latents(self) -> None:
        """Start the latent table from linear variability analysis at the current poses
        (:mod:`cryofield.inference.variability`)."""
        from cryofield.inference.variability import variability_latents

        assert self.latents is not None and self.cfg.latent_init_radius_px is not None
        R, t = self.poses.all()
        z = variability_latents(
            self.batches, R, t, self.cfg.zdim, self.cfg.latent_init_radius_px,
            iters=self.cfg.latent_init_iters, seed=self.cfg.seed,
        )  # fmt: skip
        self.latents.set(torch.arange(self.N, device=self.device), z)
        self.latent_init_epoch = self.epoch + 1

    def _batch_z(self, ti: torch.Tensor, plan: StepPlan) -> torch.Tensor | None:
        if self.latents is None:
            return None
        if self._z_frozen(plan):
            return torch.zeros(len(ti), self.cfg.zdim, device=self.device)
        return self.latents(ti)

    @torch.no_grad()
    def _search(self, idx: np.ndarray, xft: torch.Tensor, ctf: torch.Tensor, plan: StepPlan):
        """Poses of a batch by hierarchical search. Heterogeneous runs search against the
        field at the k-means centres of the batch's latents (``het_search_groups``
        references); each image takes the reference that explains it best."""
        settings = _search_settings(self.cfg, plan)
        with self._autocast():
            if self.latents is None or self._z_frozen(plan):
                z0 = None if self.latents is None else self._batch_z(torch.zeros(1), plan)
                grid, Dc = self.field.grid_ht(plan.search_hi_px, z0)
                fgrid = hartley_grid_to_fourier(grid.float().reshape(Dc, Dc, Dc))
            else:
                z = self.latents(torch.as_tensor(idx, device=self.device))
                centres = _kmeans_groups(z.cpu(), self.cfg.het_search_groups)[1]
                grids, _ = self.field.grid_ht(plan.search_hi_px, centres.to(self.device))
                fgrid = hartley_grid_to_fourier(grids.float())
        return search_poses(fgrid, self.D, xft, ctf, self.points, settings)[:2]

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
        labels, centres = _kmeans_groups(self.latents.all().float().cpu(), c.het_search_groups)
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

    def _step(self, idx: np.ndarray, plan: StepPlan) -> float:
        ti = torch.as_tensor(idx, device=self.device)
        xft = self.batches.images_ft(idx)
        ctf = self.batches.ctf(idx)
        if plan.phase == "hps":
            R, t = self._search(idx, xft, ctf, plan)
            self.poses.set(ti, R, t)
        elif plan.phase == "local":
            R, t = self._local_refine(ti, xft, ctf)
            self.poses.set(ti, R, t)
        refine = bool(self.cfg.refine_poses) and (
            plan.phase == "sgd" or (plan.phase == "fixed" and self.cfg.zdim > 0)
        )
        n = self.points.count(plan.radius_train_px)
        held = self._z_held(plan)
        steps = self.cfg.steps_per_batch if plan.phase == "hps" else 1
        for _ in range(max(1, steps)):
            R, t = self.poses(ti)
            if not refine:
                R, t = R.detach(), t.detach()
            z = self._batch_z(ti, plan)
            if held and z is not None:
                z = z.detach()
            with self._autocast():
                per_img = slice_loss(
                    self.field, R, t, z, xft[:, :n], ctf[:, :n], self.points.freqs[:n]
                )
            loss = per_img.mean()
            if self.loss_start is None and torch.isfinite(loss):
                self.loss_start = float(loss.detach())
            self._residual[idx] = per_img.detach().float().cpu().numpy()
            xa = xft[:, :n]
            self._power[idx] = (xa.real**2 + xa.imag**2).mean(-1).float().cpu().numpy()
            total = loss
            if z is not None and self.cfg.latent_l2 > 0:
                total = total + self.cfg.latent_l2 * (z**2).sum(-1).mean()
            if not torch.isfinite(total):
                return float("nan")
            for o in self._optimizers().values():
                o.zero_grad(set_to_none=True)
            total.backward()
            self.opt_field.step()
            if refine:
                self.opt_pose.step()
            if self.opt_latent is not None and not held:
                self.opt_latent.step()
        return float(loss.detach())

    # ---------------------------------------------------------------- epochs
    def _run_epoch(self, epoch: int) -> dict[str, Any]:
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.N, generator=gen).numpy()
        phase = self.schedule.phase_of_epoch(epoch)
        t0 = time.perf_counter()
        losses: list[float] = []
        plan = self.schedule.plan(epoch, self.images_seen)
        R_before, t_before = (x.detach().clone() for x in self.poses.all())
        if phase == "refine":
            return self._refine_epoch(epoch, t0, R_before, t_before)
        if self._wants_latent_init(epoch):
            self._init_latents()
        if phase == "local":
            self._prepare_local()
        bar = tqdm(
            total=self.N, desc=f"epoch {epoch}/{cfg.epochs} [{phase}]", unit="img",
            disable=None, leave=False, dynamic_ncols=True,
        )  # fmt: skip
        try:
            for b0 in range(0, self.N, cfg.batch_size):
                idx = np.sort(perm[b0 : b0 + cfg.batch_size])
                plan = self.schedule.plan(epoch, self.images_seen)
                loss = self._step(idx, plan)
                self._check_loss(loss, losses, epoch, b0 // cfg.batch_size)
                losses.append(loss)
                self.images_seen += len(idx)
                bar.update(len(idx))
                rate = bar.n / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{loss:.4g}", r_px=f"{plan.radius_train_px:.1f}",
                                img_s=f"{rate:.0f}")  # fmt: skip
        finally:
            bar.close()
            self._local = None
        dt = time.perf_counter() - t0
        return dict(
            epoch=epoch, phase=phase, loss=float(np.mean(losses)),
            radius_px=float(plan.radius_train_px), images_s=self.N / dt, time_s=dt,
            **self._pose_change(R_before, t_before),
        )  # fmt: skip

    def _check_loss(self, loss: float, losses: list[float], epoch: int, batch: int) -> None:
        """Raise :class:`FloatingPointError` (the epoch is rolled back) when the loss is not
        finite, has grown :data:`DIVERGENCE_FACTOR` times its value at the start of training
        (median of this and the 4 batches before, so one odd batch does not count), or
        jumps 1000-fold above this epoch's median."""
        where = f"epoch {epoch}, batch {batch + 1}"
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss {loss} at {where}")
        start = self.loss_start
        recent = float(np.median([*losses[-4:], loss]))
        if start is not None and start > 0 and recent > DIVERGENCE_FACTOR * start:
            raise FloatingPointError(
                f"loss {recent:.3g} at {where} is {recent / start:.3g} times the loss at the "
                f"start of training ({start:.3g})"
            )
        if len(losses) > 10 and loss > 1e3 * float(np.median(losses)):
            raise FloatingPointError(
                f"loss {loss:.3g} at {where} is 1000 times this epoch's median"
            )

    @torch.no_grad()
    def _pose_change(self, R0: torch.Tensor, t0: torch.Tensor) -> dict[str, Any]:
        """How far the poses moved this epoch (:func:`~cryofield.inference.diagnostics.
        pose_change` with the search's coarse steps: an image that moved farther landed
        in another basin)."""
        from cryofield.inference.diagnostics import pose_change, view_coverage

        c = self.cfg
        R, t = self.poses.all()
        t_step = 2 * float(c.t_extent_px or 0.0) / max(c.t_ngrid - 1, 1) or 1.0
        pc = pose_change(R0.cpu(), t0.cpu(), R.cpu(), t.cpu(), step_deg=360.0 / c.base_psi,
                         t_step_px=t_step)  # fmt: skip
        vc = view_coverage(R.cpu(), seed=c.seed)
        keep = ("occupancy_ratio", "entropy_ratio", "antipodal_pair_fraction", "collapsed")
        out = {"pose_change": pc, "view_coverage": {k: vc[k] for k in keep if k in vc}}
        out.update(self._epoch_map_check(R, t))
        return out

    @torch.no_grad()
    def _epoch_map_check(self, R: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        """Per-epoch convergence numbers beyond the poses. Homogeneous: the half-map FSC
        of a back-projection at the current poses (at most ``DIAG_MAX_IMAGES`` images, a
        fixed random subset, so the cost stays bounded at any N). Heterogeneous: the
        structure of the latent space (:func:`~cryofield.inference.diagnostics.
        latent_structure`)."""
        from cryofield.inference.diagnostics import latent_structure

        if self.latents is not None:
            ls = latent_structure(self.latents.all().cpu(), seed=self.cfg.seed)
            return {"latent_structure": {k: v for k, v in ls.items() if np.ndim(v) == 0}}
        from cryofield.inference.refine import backproject_halves_batched
        from cryofield.physics.fsc import fsc, resolution_at

        rows = np.arange(self.N)
        if self.N > DIAG_MAX_IMAGES:
            gen = np.random.default_rng(self.cfg.seed)
            rows = np.sort(gen.choice(self.N, DIAG_MAX_IMAGES, replace=False))
        h1, h2 = backproject_halves_batched(self.batches, R[rows], t[rows], rows=rows)
        res = resolution_at(fsc(h1, h2), 0.143, self.batches.apix_A)[1]
        return {"halfmap_fsc0143_A": float(res), "halfmap_images": len(rows)}

    def _refine_epoch(
        self, epoch: int, t0: float, R0: torch.Tensor, tr0: torch.Tensor
    ) -> dict[str, Any]:
        """Gold-standard refinement of every pose against back-projected half maps
        (:mod:`cryofield.inference.refine`); the field takes no steps."""
        from cryofield.inference.refine import RefineSettings, refine_poses_gold_standard

        c = self.cfg
        assert c.radius_start_px is not None and c.radius_search_px is not None
        last = StepPlan("hps", c.radius_search_px, (c.radius_start_px + c.radius_search_px) / 2,
                        c.radius_search_px)  # fmt: skip
        settings = RefineSettings(
            max_iters=c.refine_iters, step_deg=c.local_step_deg, t_step_px=c.local_t_step_px,
            levels=c.local_levels, prior_deg=c.refine_prior_deg, radius_max_px=c.radius_max_px,
            global_search=_search_settings(c, last) if c.refine_global else None,
        )  # fmt: skip
        res = refine_poses_gold_standard(self.batches, R0, tr0, settings)
        self.poses.set(torch.arange(self.N, device=self.device), res.rotations, res.shifts_px)
        dt = time.perf_counter() - t0
        last = res.history[-1] if res.history else {}
        return dict(
            epoch=epoch, phase="refine", loss=None,
            radius_px=float(last.get("radius_px", 0.0)), images_s=self.N / dt, time_s=dt,
            refine=res.history, **self._pose_change(R0, tr0),
        )  # fmt: skip

    def fit(self) -> Path:
        """Train from the current state up to ``cfg.epochs``; returns the output folder."""
        cfg = self.cfg
        self.outdir.mkdir(parents=True, exist_ok=True)
        check_free_space(self.outdir, self.checkpoint_bytes(), cfg.epochs - self.epoch)
        write_text_atomic(self.outdir / layout.CONFIG_FILE, cfg.to_yaml())
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
            self._extend_search(epoch, metrics)
            self.save_epoch(metrics)
            log.info(
                "epoch %d [%s] loss %.5g radius %.1f px, %.1f img/s, %.1f s; %.1f%% of poses "
                "changed basin (median move %.2f deg)",
                epoch, metrics["phase"], float("nan") if metrics["loss"] is None
                else metrics["loss"], metrics["radius_px"],
                metrics["images_s"], metrics["time_s"],
                100 * metrics["pose_change"]["frac_moved"], metrics["pose_change"]["median_deg"],
            )  # fmt: skip
        return self.outdir

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
        write_text_atomic(self.outdir / layout.CONFIG_FILE, c.to_yaml())
        log.info(
            "poses have not settled (%.1f%% of the images changed basin, limit %.0f%%): "
            "searching one more epoch (%d of at most %d more), radius up to %.1f px (%.1f A)",
            100 * frac, 100 * limit, self.search_extended,
            math.floor(c.search_extend * planned + 1e-9), radius, box_A / radius,
        )  # fmt: skip

    # ---------------------------------------------------------------- outputs
    def checkpoint_bytes(self) -> int:
        """Bytes one ``epoch_NNN`` folder takes (see :meth:`save_epoch`): weights.pt, state.pt
        (field, pose and latent tables with their two Adam moments each), poses.npz,
        residuals.npz, latents.npz or volume.mrc."""

        def nbytes(module: torch.nn.Module) -> int:
            return sum(t.numel() * t.element_size() for t in module.state_dict().values())

        field = nbytes(self.field)
        tables = nbytes(self.poses) + (nbytes(self.latents) if self.latents is not None else 0)
        per_image = (9 + 2 + 2 + 2) * 4 + 8 + (self.cfg.zdim * 4 if self.latents else 0)
        volume = 0 if self.latents is not None else self.D**3 * 4 + 1024
        return 4 * field + 3 * tables + self.N * per_image + volume + 64 * 1024

    def save_epoch(self, metrics: dict[str, Any]) -> Path:
        """Write ``OUTDIR/epoch_NNN`` (DONE last) and append to metrics.jsonl."""
        from cryofield.io.mrc import write_mrc

        d = self.outdir / epoch_dirname(self.epoch)
        d.mkdir(parents=True, exist_ok=True)
        (d / layout.DONE_FILE).unlink(missing_ok=True)
        with atomic_path(d / layout.WEIGHTS_FILE) as tmp:
            torch.save({"state_dict": self.field.state_dict(), "hparams": self.field.hparams}, tmp)
        with atomic_path(d / layout.STATE_FILE) as tmp:
            torch.save(self.state(), tmp)
        R, t = self.poses.all()
        with atomic_path(d / layout.POSES_FILE) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh, rotations=R.cpu().numpy().astype(np.float32),
                shifts_px=t.cpu().numpy().astype(np.float32),
                shifts_A=(t.cpu().numpy() * self.batches.apix_A).astype(np.float32),
                particle_index=np.asarray(self.particle_index, dtype=np.int64),
            )  # fmt: skip
        with atomic_path(d / layout.RESIDUALS_FILE) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, residual=self._residual, power=self._power)
        if self.latents is not None:
            with atomic_path(d / layout.LATENTS_FILE) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, z=self.latents.all().cpu().numpy().astype(np.float32))
        else:
            vol = self.field.render_volume()
            if not torch.isfinite(vol).all():
                raise CryofieldError(
                    f"training diverged: the map of epoch {self.epoch} is not finite; nothing "
                    "was saved for it: start a new run with a lower --lr-field (it was "
                    f"{self.cfg.lr_field:g})"
                )
            write_mrc(d / layout.VOLUME_FILE, vol.numpy(), self.batches.apix_A)
        mpath = self.outdir / layout.METRICS_FILE
        lines = [ln for ln in (mpath.read_text().splitlines() if mpath.exists() else []) if ln]
        lines = [ln for ln in lines if json.loads(ln)["epoch"] < self.epoch]
        lines.append(json.dumps(metrics))
        write_text_atomic(mpath, "\n".join(lines) + "\n")
        (d / layout.DONE_FILE).write_text("ok\n")
        return d


# -------------------------------------------------------------------- entry points
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


def _log_environment(cfg: TrainConfig, n: int, D: int, apix: float) -> None:
    log.info("cryofield train: %d images, D=%d, apix %.3f A, zdim %d", n, D, apix, cfg.zdim)
    log.info("device %s, torch %s, threads %d, host %s", cfg.device, torch.__version__,
             torch.get_num_threads(), platform.node())  # fmt: skip
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        log.info("GPU %s", torch.cuda.get_device_name(torch.device(cfg.device)))
    log.info(
        "settings (chosen for this data and device unless given; all in config.yaml): "
        "hidden %s, batch %s, %s epochs (%s images of search), search radius %.1f -> %.1f px "
        "(%.0f -> %.0f A), translations +-%.1f px",
        cfg.hidden, cfg.batch_size, cfg.epochs, cfg.hps_images, cfg.radius_start_px,
        cfg.radius_search_px, D * apix / max(cfg.radius_start_px or 1, 1e-9),
        D * apix / max(cfg.radius_search_px or 1, 1e-9), cfg.t_extent_px,
    )  # fmt: skip


def resolve_contrast(cfg: TrainConfig, source: Any, use_ctf: bool = True) -> bool:
    """Whether to multiply the images by -1 (``cfg.contrast``), decided and logged by
    :func:`cryofield.inference.data.decide_inversion`, the rule ``backproject`` uses too.

    With a CTF, light-on-dark particles (the usual RELION/cryoSPARC stacks) are inverted
    so that they match the CTF model of :mod:`cryofield.physics.ctf`; without one,
    dark-on-light ones are. ``auto`` guesses the contrast; when the guess is unclear it
    assumes light-on-dark and warns.
    """
    from cryofield.inference.data import decide_inversion

    decision = decide_inversion(cfg.contrast, use_ctf, source)
    if decision.contrast == "unclear":
        log.warning("%s; give --contrast if the map comes out negative", decision.message)
    else:
        log.info(decision.message)
    return decision.invert


def _judge(trainer: Trainer, final: dict[str, Any]) -> None:
    """Write ``verdict.json`` (did the run converge, why not, what to try) and log it;
    a run that did not converge says so as a warning in run.log and on stderr."""
    import sys

    from cryofield.inference import diagnostics as dg
    from cryofield.inference.rundir import RunDir

    c = trainer.cfg
    R, _ = trainer.poses.all()
    final.update(apix_A=trainer.batches.apix_A, radius_start_px=c.radius_start_px)
    if not c.poses_from_file:
        final["view_coverage"] = dg.view_coverage(R.detach().cpu())
    if trainer.latents is not None:
        final["latent_structure"] = dg.latent_structure(trainer.latents.all().cpu(), seed=c.seed)
    history = RunDir(trainer.outdir).metrics()
    v = dg.verdict(history, final, n_images=trainer.N, D=trainer.D)
    dg.write_verdict(trainer.outdir, v)
    text = dg.format_verdict(v)
    if v.converged:
        log.info(text)
    else:
        log.warning(text)
        print(f"cryofield train: {text}", file=sys.stderr)


def _peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextlib.contextmanager
def _runtime(cfg: TrainConfig) -> Iterator[None]:
    """Device checks, threads and deterministic mode for one run; restores the global
    deterministic-algorithms flag afterwards."""
    det = torch.are_deterministic_algorithms_enabled()
    try:
        _prepare_runtime(cfg)
        yield
    finally:
        torch.use_deterministic_algorithms(det)


def _prepare_runtime(cfg: TrainConfig) -> None:
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise CryofieldError(f"--device {cfg.device}: CUDA is not available on this machine")
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _load_inputs(cfg: TrainConfig) -> tuple[Any, ImageSource]:
    from cryofield.io.metadata import load_particle_table
    from cryofield.io.particles import ParticleSource

    table = load_particle_table(cfg.particles, datadir=cfg.datadir, ind=cfg.ind)
    source = ParticleSource(table, D=cfg.D, lazy=True)
    return table, source


def build_trainer(cfg: TrainConfig, table: Any, source: ImageSource) -> Trainer:
    """A :class:`Trainer` for a particle table and its image source (resolves ``cfg``)."""
    D = int(source[np.array([0])].shape[-1])
    apix = float(np.mean(np.asarray(source.apix_A, dtype=np.float64)))
    cfg = cfg.resolved(D, n_images=len(source), apix_A=apix)
    ctf = CTFParams.from_table(table) if table.ctf is not None else None
    cfg.invert = resolve_contrast(cfg, source, use_ctf=ctf is not None)
    init = None
    if cfg.poses_from_file:
        if table.rotations is None:
            raise CryofieldError(f"{cfg.particles}: --poses-from-file but the file has no poses")
        t_px = table.shifts_px if table.shifts_px is not None else np.zeros((len(table), 2))
        init = (
            torch.as_tensor(table.rotations, dtype=torch.float32),
            torch.as_tensor(np.asarray(t_px) * (D / table.box_px), dtype=torch.float32),
        )
    index = getattr(table, "_extra", {}).get("source_index")
    return Trainer(cfg, source, ctf, cfg.outdir, init, index)


def run_outputs(outdir: str | Path) -> list[Path]:
    """The files ``cryofield train`` writes at the top of ``outdir``."""
    return [Path(outdir) / name for name in RUN_FILES]


def train(cfg: TrainConfig, inputs: list[str | Path | None] | None = None) -> Path:
    """Run ``cryofield train`` with ``cfg``; returns the output folder.

    ``inputs``: further files the command read (``--config``) that must not be written
    over; the particle file, ``--ind`` and the image stacks are checked too.
    """
    if not cfg.outdir:
        raise CryofieldError("no output folder (-o)")
    out = Path(cfg.outdir)
    refuse_overwrite(run_outputs(out), [cfg.particles, cfg.ind, *(inputs or [])])
    if out.exists() and any(out.glob("epoch_*/DONE")):
        raise CryofieldError(f"{out}: already holds a run; use --resume {out} or a new -o")
    with folder_lock(out, "cryofield train"):
        setup_logging(out)
        with _runtime(cfg):
            return _train_new(cfg, out)


def _train_new(cfg: TrainConfig, out: Path) -> Path:
    table, source = _load_inputs(cfg)
    refuse_overwrite(run_outputs(out), np.unique(table.image_paths).tolist())
    trainer = build_trainer(cfg, table, source)
    table.save_npz(out / layout.TABLE_FILE)
    _log_environment(trainer.cfg, trainer.N, trainer.D, trainer.batches.apix_A)
    trainer.fit()
    _finish(trainer, table)
    return out


def resume(outdir: str | Path, epochs: int | None = None) -> Path:
    """Continue the run in ``outdir`` from its last complete epoch (optionally to ``epochs``)."""
    run = RunDir(outdir)
    with folder_lock(run.path, "cryofield train --resume"):
        cfg = run.train_config()
        cfg.outdir = str(run.path)  # a moved or copied run continues where it is
        if epochs is not None:  # --epochs N: exactly N epochs, no search extension
            cfg.epochs, cfg.search_extend = int(epochs), 0.0
        setup_logging(run.path)
        with _runtime(cfg):
            return _resume(run, cfg)


def _resume(run: RunDir, cfg: TrainConfig) -> Path:
    from cryofield.inference.rundir import damaged
    from cryofield.io.particles import ParticleSource

    table = run.table()
    refuse_overwrite(run_outputs(run.path), np.unique(table.image_paths).tolist())
    source = ParticleSource(table, D=cfg.D, lazy=True)
    trainer = build_trainer(cfg, table, source)
    last = run.last_complete_epoch()
    if last is not None:
        path = run.epoch_dir(last) / layout.STATE_FILE
        st = load_run_torch(path, map_location=trainer.device)
        try:
            trainer.load_state(st)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise damaged(path, err) from err
        log.info("resumed %s at epoch %d", run.path, last)
    trainer.fit()
    _finish(trainer, table)
    return run.path


def _finish(trainer: Trainer, table: Any) -> None:
    log.info("peak memory %.0f MB", _peak_memory_mb())
    final: dict[str, Any] = {}
    if trainer.latents is None:
        from cryofield.inference.consensus import write_consensus_map

        R, t = trainer.poses.all()
        b = trainer.batches
        final.update(write_consensus_map(
            trainer.outdir, b.source, R.detach().cpu(), t.detach().cpu(), b.ctf_params,
            b.apix_A, sign=-1.0 if b.invert else 1.0,
        ))  # fmt: skip
    _judge(trainer, final)
    from cryofield.io.export import write_particles

    R, t = trainer.poses.all()
    box = table.box_px or trainer.D
    kwargs: dict[str, Any] = dict(
        rotations=R.cpu().numpy(), shifts_px=t.cpu().numpy() * (box / trainer.D)
    )
    if trainer.latents is not None:
        kwargs["latents"] = trainer.latents.all().cpu().numpy()
    try:
        write_particles(trainer.outdir / layout.PARTICLES_STAR, table, **kwargs)
    except CryofieldError as err:
        log.warning("particles.star not written: %s", err)
