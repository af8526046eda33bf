"""``cryofield train`` as a library call: a new run (:func:`train`) or a resumed one
(:func:`resume`) around :class:`~cryofield.inference.trainer.Trainer`: refusing to write
over inputs, the folder lock and run.log, the runtime (device, threads, deterministic
mode), the inputs and the resolved configuration (:func:`build_trainer`, the contrast),
and the run's final outputs (consensus map, verdict, particles.star)."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryofield.errors import CryofieldError
from cryofield.inference import distributed as dist
from cryofield.inference import rundir as layout
from cryofield.inference.config import TrainConfig
from cryofield.inference.data import BatchMaker, ImageSource
from cryofield.inference.pose_search import FrequencyPoints
from cryofield.inference.rundir import RUN_FILES, RunDir, damaged, load_run_torch
from cryofield.inference.trainer import Trainer
from cryofield.io.atomic import refuse_overwrite
from cryofield.lock import folder_lock
from cryofield.logs import get_logger, setup_logging
from cryofield.physics.ctf import CTFParams

log = get_logger("train")


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

    c = trainer.cfg
    R, _ = trainer.poses.all()
    final.update(apix_A=trainer.batches.apix_A, radius_start_px=c.radius_start_px)
    if not c.poses_from_file:
        from cryofield.inference.epoch_metrics import symmetric_views

        views = symmetric_views(R.detach().cpu(), trainer.active_symmetry)
        final["view_coverage"] = dg.view_coverage(views)
    if trainer.latents is not None:
        final["latent_structure"] = dg.latent_structure(trainer.latents.all().cpu(), seed=c.seed)
    history = RunDir(trainer.outdir).metrics()
    v = dg.verdict(history, final, n_images=trainer.N, D=trainer.D)
    if c.search_restart:  # an earlier search failed: a restart can settle on a wrong map
        msg = (f"the search failed with {c.search_restart} other seed(s) before this "
               f"attempt (seed {c.seed}; their epochs are in failed_search_*/, the reason in "
               "run.log): a restarted search can also settle on a wrong map that these "
               "checks pass; compare the map's projections with 2-D class averages")  # fmt: skip
        v.checks.append({"name": "search restarts", "ok": None, "message": msg})
        log.warning(msg)
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


def training_batches(cfg: TrainConfig, table: Any = None, device: str = "cpu") -> BatchMaker:
    """The training images of a finished run's resolved configuration (its
    ``config.yaml``: box, contrast, window) and particle table (default: read from
    ``cfg.particles``; a run's own ``particles.npz`` table, :meth:`RunDir.table`, has its
    rows), for oracles that need the images as the run saw them (e.g.
    :func:`cryofield.inference.refine.pose_floor`)."""
    from cryofield.io.particles import ParticleSource

    if table is None:
        table, source = _load_inputs(cfg)
    else:
        source = ParticleSource(table, D=cfg.D, lazy=True)
    D = int(source[np.array([0])].shape[-1])
    ctf = CTFParams.from_table(table) if table.ctf is not None else None
    points = FrequencyPoints.build(D, device)
    return BatchMaker(source, ctf, points, bool(cfg.invert), cfg.window, device=device)


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
    with _one_voice(cfg, out, "cryofield train"), _runtime(cfg):
        return _train_new(cfg, out)


@contextlib.contextmanager
def _one_voice(cfg: TrainConfig, out: Path, command: str) -> Iterator[None]:
    """Join a ``torchrun`` launch (:func:`~cryofield.inference.distributed.init_from_env`;
    nothing for a single process), then: rank 0 holds the run's lock and logs to the
    console and ``run.log``; the other ranks only report warnings and errors. The
    process group is left at the end."""
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    env = dist.init_from_env(device)
    try:
        if env.is_main:
            with folder_lock(out, command):
                setup_logging(out)
                if env.enabled:
                    log.info("data-parallel: %d ranks (%s backend)", env.world, env.backend)
                yield
        else:
            setup_logging(None).setLevel(logging.WARNING)
            yield
    finally:
        dist.shutdown()


def _train_new(cfg: TrainConfig, out: Path) -> Path:
    table, source = _load_inputs(cfg)
    refuse_overwrite(run_outputs(out), np.unique(table.image_paths).tolist())
    trainer = build_trainer(cfg, table, source)
    if trainer.dist.is_main:
        table.save_npz(out / layout.TABLE_FILE)
    _log_environment(trainer.cfg, trainer.N, trainer.D, trainer.batches.apix_A)
    trainer = _fit(trainer, table, source)
    _finish(trainer, table)
    return out


def _fit(trainer: Trainer, table: Any, source: ImageSource) -> Trainer:
    """:meth:`Trainer.fit`, started again while its search ends with collapsed views and
    restarts are left (:meth:`Trainer.restart_config`: the next seed). The failed
    attempt's epoch folders, metrics.jsonl and a copy of its config.yaml move to
    ``OUTDIR/failed_search_<k>/`` (config.yaml already names the next attempt, so a
    resume continues it). Returns the trainer of the last attempt."""
    import shutil

    trainer.fit()
    while trainer.search_failed:
        cfg = trainer.restart_config()
        out = trainer.outdir
        if trainer.dist.is_main:
            dest = out / f"failed_search_{cfg.search_restart}"
            dest.mkdir(exist_ok=True)
            layout.write_config(dest, trainer.cfg)  # the failed attempt's own settings
            layout.write_config(out, cfg)
            moved = list(RunDir(out).epoch_dirs().values())
            moved += [out / layout.METRICS_FILE] if (out / layout.METRICS_FILE).exists() else []
            for p in moved:
                shutil.move(str(p), str(dest / p.name))
        dist.barrier()
        trainer = build_trainer(cfg, table, source)
        trainer.fit()
    return trainer


def resume(outdir: str | Path, epochs: int | None = None) -> Path:
    """Continue the run in ``outdir`` from its last complete epoch (optionally to ``epochs``)."""
    run = RunDir(outdir)
    cfg = run.train_config()
    cfg.outdir = str(run.path)  # a moved or copied run continues where it is
    if epochs is not None:  # --epochs N: exactly N epochs, no search extension
        cfg.epochs, cfg.search_extend = int(epochs), 0.0
    with _one_voice(cfg, run.path, "cryofield train --resume"), _runtime(cfg):
        return _resume(run, cfg)


def _resume(run: RunDir, cfg: TrainConfig) -> Path:
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
    trainer = _fit(trainer, table, source)
    _finish(trainer, table)
    return run.path


def _finish(trainer: Trainer, table: Any) -> None:
    if not trainer.dist.is_main:
        return
    log.info("peak memory %.0f MB", _peak_memory_mb())
    final: dict[str, Any] = {}
    if trainer.active_symmetry != trainer.cfg.symmetry:
        log.warning("the run ended in the global search, before symmetry %s was imposed: "
                    "its outputs have none", trainer.cfg.symmetry)  # fmt: skip
    if trainer.latents is None:
        from cryofield.inference.consensus import write_consensus_map
        from cryofield.physics.symmetry import symmetry_operators

        R, t = trainer.poses.all()
        b = trainer.batches
        final.update(write_consensus_map(
            trainer.outdir, b.source, R.detach().cpu(), t.detach().cpu(), b.ctf_params,
            b.apix_A, sign=-1.0 if b.invert else 1.0,
            symmetry=symmetry_operators(trainer.active_symmetry),
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
        write_particles(
            trainer.outdir / layout.PARTICLES_STAR, table, **kwargs,
            symmetry=trainer.active_symmetry, mask=trainer.cfg.mask,
        )  # fmt: skip
    except CryofieldError as err:
        log.warning("particles.star not written: %s", err)
