"""Acceptance run of issue 4 (slow: ~20 min on 2 busy CPU cores): demo-homo ab initio.

Runs ``benchmarks/bench_train.py``'s homogeneous experiment with its defaults and checks
the issue's thresholds. The resolution target (within 1.2x of the true-pose
reconstruction) is not reached yet (measured 1.49x), hence the xfail.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def homo_result(tmp_path_factory):
    sys.path.insert(0, str(BENCH))
    import bench_train

    args = argparse.Namespace(
        n=5000, D=64, epochs=6, hps_epochs=4, batch_size=32, lr_field=2e-3, hidden=128,
        field_steps=3, radius_start=8.0, radius_search=24.0, levels=4, t_extent=6.0,
        seed=0, threads=1, zdim=8, n_het=6000,
    )  # fmt: skip
    return bench_train.run_homo(args, tmp_path_factory.mktemp("bench"))


@pytest.mark.slow
def test_homogeneous_pose_accuracy(homo_result):
    pe = homo_result["pose_errors"]
    assert pe["out_of_plane_median_deg"] <= 3.0
    assert pe["in_plane_median_deg"] <= 3.0
    assert pe["trans_median_px"] <= 0.5


@pytest.mark.slow
@pytest.mark.xfail(reason="map resolution 1.49x the true-pose reconstruction (target 1.2x)")
def test_homogeneous_map_resolution(homo_result):
    assert homo_result["resolution_ratio"] <= 1.2
