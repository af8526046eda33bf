"""Pose and latent tables."""

from __future__ import annotations

import torch

from cryofield.model.tables import LatentTable, PoseTable
from cryofield.physics.rotation import random_rotations


def test_pose_table_has_finite_gradient_at_the_search_result():
    """After ``set`` the residual rotation is exactly zero; its gradient must be finite."""
    table = PoseTable(4, random_rotations(4, generator=torch.Generator().manual_seed(1)))
    R, _ = table(torch.arange(4))
    (R * torch.randn(4, 3, 3)).sum().backward()
    grad = table.w.weight.grad.to_dense()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_pose_table_set_and_sparse_update_touches_batch_only():
    g = torch.Generator().manual_seed(0)
    R = random_rotations(10, generator=g)
    t = torch.randn(10, 2, generator=g)
    table = PoseTable(10, R, t)
    R_all, t_all = table.all()
    assert torch.allclose(R_all, R, atol=1e-6) and torch.allclose(t_all, t)
    opt = torch.optim.SparseAdam(list(table.parameters()), lr=0.1)
    idx = torch.tensor([2, 5])
    Rb, tb = table(idx)
    (Rb.sum() + tb.sum()).backward()
    opt.step()
    R2, t2 = table.all()
    changed = ((R2 - R).abs().amax(dim=(1, 2)) > 1e-4) | ((t2 - t).abs().amax(1) > 1e-4)
    assert changed.nonzero().flatten().tolist() == [2, 5]
    # still rotations
    eye = torch.eye(3).expand(10, 3, 3)
    assert torch.allclose(R2 @ R2.transpose(1, 2), eye, atol=1e-5)
    table.set(idx, R[:2], t[:2])
    R3, t3 = table(idx)
    assert torch.allclose(R3, R[:2], atol=1e-6) and torch.allclose(t3, t[:2])


def test_latent_table_deterministic_init():
    a = LatentTable(7, 3, 0.1, torch.Generator().manual_seed(1))
    b = LatentTable(7, 3, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(a.all(), b.all()) and a(torch.tensor([0, 6])).shape == (2, 3)
    assert 0.02 < float(a.all().std()) < 0.3
