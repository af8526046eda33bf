"""Throughput and memory of the training step, phase by phase, on any device.

Builds the :class:`~cryofield.inference.trainer.Trainer` of ``cryofield train`` with its
defaults for the device (``TrainConfig().resolved``: hidden, batch size, radii, search
grid) on a stack of noise images with random CTFs written to ``OUT`` (the step's cost
does not depend on what the images show), read lazily through the prefetching reader as
in training, and times ``--batches`` batches (after ``--warmup``) of each phase of the
schedule at its largest radius:

* ``search``: the global pose search of the last search epoch (at the full search
  radius; heterogeneous runs: against the ``het_search_groups`` maps of the batch's
  latent groups) followed by its ``steps_per_batch`` gradient steps;
* ``gradient``: a step of the field epochs (homogeneous) or of the SGD epochs
  (heterogeneous: field, poses and latents);
* ``local``: local pose refinement (heterogeneous runs only);
* ``search alone``: the search of ``search`` on the same batches without the gradient
  steps (``Trainer._search``; heterogeneous runs: ``--het-search``, TrainConfig's
  ``het_search``).

Records images/s and the peak device memory of each phase
(``torch.cuda.max_memory_allocated``; on the CPU the process's peak RSS). Writes
``OUT/bench_step.json`` and prints a table::

    .venv/bin/python benchmarks/bench_step.py --device cuda -D 128 --zdim 0 8 -o step_out
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import _ctf, write_stack


def _phase_plans(tr: Any) -> dict[str, Any]:
    """The plan of each phase kind at its largest radius."""
    from cryofield.inference.schedule import Phase

    sch, cfg = tr.schedule, tr.cfg
    plans: dict[str, Any] = {}
    if sch.hps_epochs:
        plans["search"] = sch.plan(sch.hps_epochs, sch.hps_total)  # end of the search ramp
    for epoch in range(1, cfg.epochs + 1):
        phase = sch.phase_of_epoch(epoch)
        if phase in (Phase.FIELD, Phase.SGD, Phase.FIXED) and "gradient" not in plans:
            plans["gradient"] = sch.plan(epoch, sch.hps_total)
        if phase.refines_locally and "local" not in plans:
            plans["local"] = sch.plan(epoch, sch.hps_total)
    return plans


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args: argparse.Namespace, zdim: int, stack: Path) -> list[dict[str, Any]]:
    from cryofield.inference.config import TrainConfig
    from cryofield.inference.trainer import Trainer
    from cryofield.io.metadata import load_particle_table
    from cryofield.io.particles import ParticleSource

    source = ParticleSource(load_particle_table(stack))
    n = len(source)
    het = {"het_search": args.het_search} if args.het_search else {}
    cfg = TrainConfig(outdir=str(Path(args.out) / f"run_z{zdim}"), zdim=zdim, device=args.device,
                      num_threads=args.threads, amp=not args.no_amp, **het)  # fmt: skip
    cfg = cfg.resolved(source.D, n_images=n, apix_A=args.apix)
    tr = Trainer(cfg, source, _ctf(n), cfg.outdir)
    dev = tr.device
    assert cfg.batch_size is not None
    perm = np.random.default_rng(0).permutation(n)
    rows = []
    plans = _phase_plans(tr)
    if "search" in plans:
        plans["search alone"] = plans["search"]
    for name, plan in plans.items():
        if name == "local":
            tr._prepare_local()
        k = args.warmup + args.batches
        order = [np.sort(perm[(i * cfg.batch_size) % n :][: cfg.batch_size]) for i in range(k)]
        stream = tr.batches.iter_batches(order)
        run = tr._train_batch
        if name == "search alone":

            def run(b: Any, plan: Any) -> Any:
                return tr._search(b.idx, b.images_ft, b.ctf, plan)

        for _ in range(args.warmup):
            run(next(stream), plan)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        images = 0
        t0 = time.perf_counter()
        for batch in stream:
            run(batch, plan)
            images += len(batch)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        wall = time.perf_counter() - t0
        rows.append({
            "D": tr.D, "zdim": zdim, "phase": name, "phase_name": plan.phase.value,
            "het_search": cfg.het_search if zdim else None,
            "device": str(dev), "amp": bool(cfg.amp and dev.type == "cuda"),
            "batch_size": cfg.batch_size, "hidden": cfg.hidden, "images": images,
            "radius_px": float(plan.radius_train_px), "search_hi_px": float(plan.search_hi_px),
            "steps": 0 if name == "search alone" else plan.steps, "wall_s": wall,
            "images_s": images / wall,
            "peak_memory_mb": _peak_memory_mb(dev),
            "peak_memory_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "peak RSS",
            "max_step_images": tr.max_step_images,
        })  # fmt: skip
        tr._local = None
        print(f"D={tr.D} zdim={zdim}{' ' + cfg.het_search if zdim else ''} {name}: "
              f"{images / wall:.1f} images/s, peak "
              f"{rows[-1]['peak_memory_mb']:.0f} MB", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    from cryofield.inference.config import HET_SEARCHES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-o", "--out", default="bench_step_out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-D", type=int, default=128)
    p.add_argument("--apix", type=float, default=2.5, help="pixel size (A), default 2.5")
    p.add_argument("--zdim", type=int, nargs="+", default=[0, 8])
    p.add_argument("-n", "--n", type=int, default=4096, help="images in the stack")
    p.add_argument("--batches", type=int, default=10, help="timed batches per phase")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--het-search", choices=HET_SEARCHES, default=None,
                   help="het_search of the zdim > 0 runs (default: TrainConfig's)")  # fmt: skip
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stack = out / f"noise_D{args.D}_N{args.n}.mrcs"
    write_stack(stack, args.n, args.D)
    rows = []
    for zdim in args.zdim:
        rows += measure(args, zdim, stack)
        (out / "bench_step.json").write_text(json.dumps(rows, indent=2))
    print("| D | zdim | phase | batch | images/s | peak memory |\n|---|---|---|---|---|---|")
    for r in rows:
        mem = f"{r['peak_memory_mb']:.0f} MB ({r['peak_memory_kind']})"
        zdim = f"{r['zdim']} ({r['het_search']})" if r["het_search"] else r["zdim"]
        print(f"| {r['D']} | {zdim} | {r['phase']} ({r['phase_name']}) "
              f"| {r['batch_size']} | {r['images_s']:.1f} | {mem} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
