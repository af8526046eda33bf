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

#: --quick: a small dataset and a short run (a few minutes on a laptop CPU)
QUICK = dict(n_particles=1000, D=32, apix_A=8.0)
#: training settings of the demo, sized for 2 CPU cores: a narrower MLP, several field
#: steps per search batch at a higher field learning rate, translations searched within
#: +-6 px; the search radius marches over the DRGN-AI values scaled to the box (12 -> 32 px
#: at D=128, i.e. 6 -> 16 px at D=64), pose search for the first 6 epochs, then 2 epochs
#: of gradient refinement and 1 of local refinement (the settings of
#: benchmarks/bench_train.py)
DEMO_TRAIN = dict(hidden=128, batch_size=32, steps_per_batch=3, lr_field=2e-3, t_extent_px=6.0)
#: epochs of pose search / total epochs (full demo, --quick); the heterogeneous presets
#: search twice as long (images of different states converge at different times)
DEMO_EPOCHS = {False: (6, 9), True: (3, 4)}
HET_DEMO_EPOCHS = (12, 15)
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
        "--epochs", type=int, help="training epochs (default 9, heterogeneous presets 15, quick 4)"
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
    import numpy as np
    import torch

    from cryofield.inference.config import TrainConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    hps_epochs, epochs = DEMO_EPOCHS[bool(args.quick)]
    if ZDIM[args.preset] > 0 and not args.quick:
        hps_epochs, epochs = HET_DEMO_EPOCHS
    with np.load(data / "truth.npz", allow_pickle=False) as truth:
        n_images = int(truth["rotations"].shape[0])
    return TrainConfig(
        particles=str(data / "particles.star"),
        outdir=str(train_dir),
        zdim=ZDIM[args.preset],
        epochs=args.epochs or epochs,
        hps_images=hps_epochs * n_images,
        **DEMO_TRAIN,
        contrast="auto",  # the simulator writes light-on-dark stacks; auto must see it
        device=device,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    """Simulate, train, analyse, evaluate; print where the report is."""
    from cryofield.analysis.evaluate import evaluate_run, format_table
    from cryofield.analysis.report import analyze_run
    from cryofield.inference.rundir import RunDir
    from cryofield.inference.trainer import resume, train
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
    if last is None:
        print(f"[2/4] training ({cfg.epochs} epochs, zdim {cfg.zdim}, {cfg.device}) in {train_dir}")
        train(cfg)
    elif last < cfg.epochs:
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
