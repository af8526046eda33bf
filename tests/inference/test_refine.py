"""Gradient refinement of a perturbed pose table returns to the true poses."""

from __future__ import annotations

import math

import torch
from synth import field_images

from cryofield.inference.loss import slice_loss
from cryofield.inference.pose_search import FrequencyPoints
from cryofield.model.field import HartleyField
from cryofield.model.tables import PoseTable
from cryofield.physics.rotation import (
    axis_angle_to_matrix,
    geodesic_distance_rad,
    random_rotations,
)


def test_refinement_of_perturbed_poses_returns_to_truth(one_thread):
    torch.manual_seed(0)
    D, n = 20, 8
    field = HartleyField(D, hidden=64, layers=2, n_freqs=16, sigma=0.3)
    field.set_envelope(torch.exp(-torch.arange(12.0) / 5))
    for p in field.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    R = random_rotations(n, generator=g)
    t = (torch.rand(n, 2, generator=g) - 0.5) * 2
    pts = FrequencyPoints.build(D)
    fr = pts.freqs[: pts.count(8.0)]
    X = field_images(field, R, t, fr)
    ctf = torch.ones_like(X.real)
    # perturb by ~4 deg and ~0.6 px
    w = torch.randn(n, 3, generator=g)
    w = w / w.norm(dim=-1, keepdim=True) * math.radians(4.0)
    R0 = R @ axis_angle_to_matrix(w)
    t0 = t + torch.randn(n, 2, generator=g) * 0.4
    table = PoseTable(n, R0, t0)
    opt = torch.optim.SparseAdam(list(table.parameters()), lr=1e-2)
    idx = torch.arange(n)
    first = None
    for _ in range(80):
        Rb, tb = table(idx)
        loss = slice_loss(field, Rb, tb, None, X, ctf, fr).mean()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    Rf, tf = table.all()
    before = torch.rad2deg(geodesic_distance_rad(R0, R))
    after = torch.rad2deg(geodesic_distance_rad(Rf, R))
    assert float(before.median()) > 3.5
    assert float(after.median()) < 0.5 and float(after.max()) < 1.0
    assert float((tf - t).norm(dim=-1).max()) < 0.15
    assert float(loss.detach()) < 1e-2 * first
