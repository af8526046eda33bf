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
