"""``cryofield demo``: the demo trains with the defaults every user gets."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from cryofield.cli import demo
from cryofield.inference.config import TrainConfig


@pytest.mark.parametrize("preset", ["demo-homo", "demo-hetero"])
@pytest.mark.parametrize("quick", [False, True])
def test_demo_trains_with_the_train_defaults(tmp_path, preset, quick):
    """One source of truth: the demo's settings are TrainConfig's defaults; only the
    data, the latent dimension of the preset, the device and the seed differ."""
    args = argparse.Namespace(preset=preset, quick=quick, epochs=None, device="cpu", seed=0)
    cfg = demo._train_config(args, tmp_path / "data", tmp_path / "train")
    ref = TrainConfig()
    differ = {
        f.name
        for f in dataclasses.fields(TrainConfig)
        if getattr(cfg, f.name) != getattr(ref, f.name)
    }
    assert differ <= {"particles", "outdir", "zdim", "device", "seed"}
    assert cfg.zdim == demo.ZDIM[preset]


def test_benchmark_trains_with_the_train_defaults(tmp_path):
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(bench_dir))
    try:
        import bench_train
    finally:
        sys.path.remove(str(bench_dir))
    args = bench_train.parse_args(["--threads", "1"])
    cfg = bench_train._train_cfg(args, tmp_path / "p.star", tmp_path / "out", 0)
    ref = TrainConfig()
    differ = {
        f.name
        for f in dataclasses.fields(TrainConfig)
        if getattr(cfg, f.name) != getattr(ref, f.name)
    }
    assert differ <= {"particles", "outdir", "num_threads"}
