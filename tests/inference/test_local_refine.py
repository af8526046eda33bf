"""Local pose refinement: perturbed poses return to the truth; the schedule's local phase."""

from __future__ import annotations

import math

import torch
from synth import field_images

from cryofield.inference.config import TrainConfig
from cryofield.inference.pose_search import (
    FrequencyPoints,
    local_perturbations,
    local_refine_poses,
)
from cryofield.inference.schedule import Schedule
from cryofield.model.field import HartleyField, fourier_grid
from cryofield.physics.rotation import (
    axis_angle_to_matrix,
    geodesic_distance_rad,
    random_rotations,
)


def test_local_perturbations_hold_identity_and_step():
    dR = local_perturbations(math.radians(2.0))
    assert dR.shape == (27, 3, 3)
    ang = torch.rad2deg(geodesic_distance_rad(dR, torch.eye(3).expand(27, 3, 3)))
    assert float(ang[13]) < 1e-3
    assert float(ang.max()) < 2.0 * math.sqrt(3) + 1e-3 and float(ang.min(0).values) >= 0


def test_local_refinement_returns_perturbed_poses_to_truth(one_thread):
    torch.manual_seed(0)
    D, n = 32, 24
    field = HartleyField(D, hidden=64, layers=2, n_freqs=16, sigma=0.4)
    field.set_envelope(torch.exp(-torch.arange(D // 2 + 2.0) / 8))
    g = torch.Generator().manual_seed(5)
    R = random_rotations(n, generator=g)
    t = (torch.rand(n, 2, generator=g) - 0.5) * 2
    pts = FrequencyPoints.build(D)
    X = field_images(field, R, t, pts.freqs)
    ctf = torch.ones_like(X.real)
    # perturb by 3 deg about random axes and ~0.4 px
    w = torch.randn(n, 3, generator=g)
    w = w / w.norm(dim=-1, keepdim=True) * math.radians(3.0)
    R0 = axis_angle_to_matrix(w) @ R
    t0 = t + torch.randn(n, 2, generator=g) * 0.3
    radius = D / 2 - 1
    grid, Dg = fourier_grid(field, radius, None, oversample=2)
    assert Dg == 2 * D
    Rf, tf, err = local_refine_poses(grid, Dg, X, ctf, pts, R0, t0, radius, step_deg=2.0,
                                     t_step_px=0.5, levels=4, iters_per_level=2)  # fmt: skip
    before = torch.rad2deg(geodesic_distance_rad(R0, R))
    after = torch.rad2deg(geodesic_distance_rad(Rf, R))
    assert float(before.median()) > 2.9
    assert float(after.median()) < 0.4 and float(after.max()) < 1.0
    assert float((tf - t).norm(dim=-1).median()) < 0.1
    assert float((t0 - t).norm(dim=-1).median()) > 0.25
    # the error at the refined poses is below the error at the start (never rises)
    _, _, err0 = local_refine_poses(grid, Dg, X, ctf, pts, R0, t0, radius, levels=1,
                                    step_deg=1e-6, t_step_px=0.0)  # fmt: skip
    assert bool((err <= err0 + 1e-4 * err0.abs()).all())


def test_heterogeneous_schedule_ends_with_local_epochs():
    cfg = TrainConfig(epochs=6, hps_images=200, local_refine_epochs=2, zdim=2,
                      research_epochs=0).resolved(32)  # fmt: skip
    s = Schedule(cfg, 100)
    assert [s.phase_of_epoch(e) for e in range(1, 7)] == ["hps", "hps", "sgd", "sgd"] + [
        "local"
    ] * 2
    assert s.plan(6, 600).phase == "local" and s.plan(6, 600).radius_train_px == 15.0
    # never replaces the search phase; none with fixed, unrefined known poses
    cfg = TrainConfig(epochs=2, hps_images=200, local_refine_epochs=2, zdim=2).resolved(32)
    assert [Schedule(cfg, 100).phase_of_epoch(e) for e in (1, 2)] == ["hps", "hps"]
    cfg = TrainConfig(epochs=3, zdim=2, poses_from_file=True, refine_poses=False).resolved(32)
    assert Schedule(cfg, 100).phase_of_epoch(3) == "fixed"
    cfg = TrainConfig(epochs=3, zdim=2, poses_from_file=True, refine_poses=True).resolved(32)
    assert Schedule(cfg, 100).phase_of_epoch(3) == "local"


def test_homogeneous_schedule_refines_against_half_maps_then_trains_the_field():
    cfg = TrainConfig(epochs=6, hps_images=200).resolved(32)
    s = Schedule(cfg, 100)
    assert [s.phase_of_epoch(e) for e in range(1, 7)] == ["hps", "hps", "refine"] + ["field"] * 3
    assert s.plan(4, 300).radius_train_px == 15.0
    known = TrainConfig(epochs=3, poses_from_file=True, refine_poses=True).resolved(32)
    assert [Schedule(known, 100).phase_of_epoch(e) for e in (1, 2, 3)] == [
        "refine", "fixed", "fixed"
    ]  # fmt: skip
    fixed = TrainConfig(epochs=2, poses_from_file=True).resolved(32)
    assert [Schedule(fixed, 100).phase_of_epoch(e) for e in (1, 2)] == ["fixed", "fixed"]
