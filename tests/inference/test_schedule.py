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
    # the refinement and field epochs train on the full radius
    assert s.plan(5, 400).phase == "refine" and s.plan(6, 400).radius_train_px == 31.0


def test_heterogeneous_runs_search_again_before_the_local_epoch():
    cfg = TrainConfig(epochs=7, hps_images=300, zdim=4, sgd_epochs=2).resolved(32)
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


@pytest.mark.parametrize("n", [500, 5_000, 50_000, 1_000_000])
@pytest.mark.parametrize("zdim", [0, 8])
def test_default_phase_plan_has_every_phase_at_any_n(n, zdim):
    """The defaults (no flag) give every run its search, refinement and final phases."""
    cfg = TrainConfig(zdim=zdim).resolved(64, n_images=n, apix_A=5.0)
    s = Schedule(cfg, n)
    phases = [s.phase_of_epoch(e) for e in range(1, cfg.epochs + 1)]
    assert phases[0] == "hps" and s.hps_epochs * n >= max(30_000, 2 * n)
    assert s.hps_epochs >= 2  # every image is searched at least twice
    if zdim == 0:
        assert phases.count("refine") == 1 and phases[-1] == "field"
        # one field epoch: the field is regressed onto the back-projection of all images
        assert phases.count("field") == 1 and cfg.field_fit == "backprojection"
        images = TrainConfig(zdim=0, field_fit="images").resolved(64, n_images=n, apix_A=5.0)
        assert Schedule(images, n).phase_of_epoch(images.epochs) == "field"
        assert (images.epochs - cfg.epochs + 1) * n >= 10_000
    else:
        assert "sgd" in phases and phases[-1] == "local" and phases[-2] == "hps"
    # images seen stay bounded: at most ~2N + the fixed minimum of search per run
    assert cfg.epochs * n <= max(4 * n + 110_000, 12 * n)


def test_defaults_scale_with_the_box_and_the_pixel_size():
    small = TrainConfig().resolved(64, n_images=5000, apix_A=5.0)
    assert small.radius_start_px == pytest.approx(64 * 5.0 / 53.0)  # 53 A at 5 A/px
    assert small.radius_search_px == pytest.approx(16.0)  # 20 A
    assert small.t_extent_px == pytest.approx(6.4)
    # a coarse pixel: the same resolution in A is more px of the box
    coarse = TrainConfig().resolved(64, n_images=5000, apix_A=9.0)
    assert coarse.radius_search_px == pytest.approx(64 * 9.0 / 20.0)
    # a fine pixel (small object): never below the box fractions
    fine = TrainConfig().resolved(64, n_images=5000, apix_A=2.0)
    assert fine.radius_start_px == pytest.approx(6.0) and fine.radius_search_px == 16.0
    cpu = TrainConfig().resolved(64, n_images=5000)
    assert (cpu.hidden, cpu.batch_size) == (128, 32) and cpu.num_threads >= 1
    gpu = TrainConfig(device="cuda").resolved(64, n_images=5000)
    assert (gpu.hidden, gpu.batch_size) == (256, 64)
