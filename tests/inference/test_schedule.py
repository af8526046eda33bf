"""Training phases and frequency marching (:mod:`cryofield.inference.schedule`)."""

from __future__ import annotations

import pytest

from cryofield.inference.config import TrainConfig
from cryofield.inference.schedule import Schedule


def test_search_radius_marches_and_level_0_stays_at_the_midpoint():
    cfg = TrainConfig(epochs=6, hps_images=400, radius_start_px=6.0, radius_search_px=16.0)
    s = Schedule(cfg.resolved(64), 100)
    assert s.hps_epochs == 4
    for seen, hi in [(0, 6.0), (200, 11.0), (400, 16.0)]:
        p = s.plan(min(4, 1 + seen // 100), seen)
        assert p.phase == "hps"
        assert p.radius_train_px == pytest.approx(hi) and p.search_hi_px == pytest.approx(hi)
        assert p.search_lo_px == pytest.approx((6.0 + hi) / 2)
    # gradient epochs train on the full radius
    assert s.plan(5, 400).phase == "sgd" and s.plan(5, 400).radius_train_px == 31.0


def test_heterogeneous_runs_search_again_before_the_local_epoch():
    cfg = TrainConfig(epochs=7, hps_images=300, zdim=4).resolved(32)
    assert cfg.research_epochs == 1
    s = Schedule(cfg, 100)
    assert [s.phase_of_epoch(e) for e in range(1, 8)] == (
        ["hps"] * 3 + ["sgd"] * 2 + ["hps", "local"]
    )
    assert s.plan(6, 500).search_hi_px == cfg.radius_search_px  # the full search radius
    # homogeneous and known-pose runs keep their schedule
    assert TrainConfig(epochs=7, hps_images=300).resolved(32).research_epochs == 0
    known = TrainConfig(epochs=7, zdim=4, poses_from_file=True, refine_poses=True)
    assert Schedule(known.resolved(32), 100).phase_of_epoch(6) == "fixed"
