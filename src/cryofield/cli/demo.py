"""Simulate the demo dataset and run the whole pipeline.

Four steps, each in its own sub-folder of OUTDIR: (1) simulate a built-in dataset with
exact truth (data/), (2) train on it ab initio, with no poses given (train/), (3) analyse
the run and write the HTML report (train/analyze.EPOCH/report.html), (4) score the run
against the truth: pose errors, FSC to the true map, clustering or latent-coordinate
agreement (train/evaluate.EPOCH.json). A step whose output is already there is reused,
so an interrupted demo continues where it stopped. See docs/demo.md.

examples:
  cryofield demo -o demo_out
  cryofield demo -o demo_het --preset demo-hetero --device cuda
  cryofield demo -o demo_quick --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

#: --quick: 1000 images at D=32 and SNR 0.4, which carries about the per-image signal of
#: the full demo (D=64, SNR 0.1: the image energy grows with D^2); trained with the same
#: defaults. At SNR 0.1 a 32-px box holds too little signal per image to find poses from
#: 1000 images (measured: median error 54 deg, and the run says it did not converge).
QUICK = dict(n_particles=1000, D=32, apix_A=8.0, snr=0.4)
#: latent dimension used for the heterogeneous presets
ZDIM = {"demo-homo": 0, "demo-hetero": 8, "demo-continuous": 8}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cryofield demo``."""
    parser.add_argument("-o", "--outdir", required=True, help="output folder")
    parser.add_argument(
        "--preset",
        default="demo-homo",
        choices=list(ZDIM),
        help="dataset: homogeneous, 3 discrete states or continuous motion (default demo-homo)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1000 images at D=32 and a short run (smoke test)"
    )
    parser.add_argument(
        "--epochs", type=int, help="training epochs (default: chosen by cryofield train from N)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of simulation and training")


def _simulation_config(args: argparse.Namespace):
    from cryofield.simulate.dataset import preset_config

    overrides = dict(QUICK) if args.quick else {}
    return preset_config(args.preset, seed=args.seed, **overrides)


def _simulate(args: argparse.Namespace, data: Path) -> None:
    from cryofield.simulate.dataset import SimulationConfig, simulate_dataset

    cfg = _simulation_config(args)
    done = data / "truth.npz"
    if done.is_file() and (data / "simulation.yaml").is_file():
        old = SimulationConfig.from_yaml(data / "simulation.yaml")
        if dataclasses.asdict(old) == dataclasses.asdict(cfg):
            print(f"[1/4] simulation: reusing {data}")
            return
    print(f"[1/4] simulating {cfg.n_particles} particles ({args.preset}) into {data}")
    simulate_dataset(cfg, data)


def _train_config(args: argparse.Namespace, data: Path, train_dir: Path):
    """The training settings: :class:`TrainConfig`'s defaults (what ``cryofield train``
    gives every user; nothing is tuned for the demo), the preset's latent dimension, and
    the device, seed and epoch count given to ``demo``."""
    import torch

    from cryofield.inference.config import TrainConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return TrainConfig(
        particles=str(data / "particles.star"),
        outdir=str(train_dir),
        zdim=ZDIM[args.preset],
        epochs=args.epochs,
        device=device,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    """Simulate, train, analyse, evaluate; print where the report is."""
    from cryofield.analysis.evaluate import evaluate_run, format_table
    from cryofield.analysis.report import analyze_run
    from cryofield.inference.rundir import RunDir
    from cryofield.inference.runner import resume, train
    from cryofield.io.atomic import write_text_atomic
    from cryofield.logs import setup_logging

    outdir = Path(args.outdir)
    data, train_dir = outdir / "data", outdir / "train"
    setup_logging(outdir)
    _simulate(args, data)

    cfg = _train_config(args, data, train_dir)
    last = (
        RunDir(train_dir).last_complete_epoch() if (train_dir / "config.yaml").is_file() else None
    )
    target = cfg.epochs
    if last is not None and target is None:
        target = RunDir(train_dir).train_config().epochs  # the resolved schedule
    if last is None:
        epochs = cfg.epochs or "default"
        print(f"[2/4] training ({epochs} epochs, zdim {cfg.zdim}, {cfg.device}) in {train_dir}")
        train(cfg)
    elif target is not None and last < target:
        print(f"[2/4] resuming training in {train_dir} after epoch {last}")
        resume(train_dir, epochs=cfg.epochs)
    else:
        print(f"[2/4] training: reusing {train_dir}")

    print("[3/4] analysing")
    report = analyze_run(train_dir)

    print("[4/4] evaluating against the truth")
    res = evaluate_run(train_dir, data / "truth.npz")
    metrics = train_dir / f"evaluate.{res['epoch']}.json"
    write_text_atomic(metrics, json.dumps(res, indent=2) + "\n")
    print(format_table(res))
    print(f"\nreport:  {report}\nmetrics: {metrics}\ndata:    {data}")
    return 0
