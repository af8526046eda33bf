"""Hierarchical SO(3) grid: sizes, children partition, coverage halving per level."""

from __future__ import annotations

import itertools
import math

import healpy
import numpy as np
import pytest
import torch

from cryofield.physics import so3_grid as G
from cryofield.physics.rotation import quaternion_to_matrix, random_quaternions


def _nearest_angle_deg(q: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Geodesic distance (deg) from each quaternion in q to its nearest grid point."""
    best = torch.zeros(q.shape[0], dtype=q.dtype)
    for s in range(0, grid.shape[0], 8192):
        best = torch.maximum(best, (q @ grid[s : s + 8192].T).abs().max(dim=1).values)
    return torch.rad2deg(2 * torch.acos(best.clamp(max=1.0)))


def _nearest_angle_deg_local(q: torch.Tensor, level: int, radius_deg: float) -> torch.Tensor:
    """Exact nearest-grid-point distance using only directions within ``radius_deg``.

    The angle between two rotations' viewing directions ``R^T e_z`` is at most their
    geodesic distance, so points outside the disc are farther than ``radius_deg``; a
    result below ``radius_deg`` is therefore the exact nearest distance.
    """
    grid = G.grid_quats(level, dtype=torch.float64)
    n_psi = G.grid_size(level)[1]
    views = quaternion_to_matrix(q.double())[:, 2, :].numpy()
    best = torch.empty(q.shape[0], dtype=torch.float64)
    for i, v in enumerate(views):
        pix = healpy.query_disc(G.BASE_NSIDE * 2**level, v, math.radians(radius_deg), nest=True)
        ids = (torch.as_tensor(pix)[:, None] * n_psi + torch.arange(n_psi)).reshape(-1)
        best[i] = (grid[ids] @ q[i]).abs().max()
    return torch.rad2deg(2 * torch.acos(best.clamp(max=1.0)))


def test_sizes_match_cryodrgn_base_grid() -> None:
    assert G.grid_size(0) == (192, 24)  # 4,608 points, ~15 deg
    assert G.grid_size(1) == (768, 48)
    assert math.degrees(G.grid_spacing_rad(0)) == pytest.approx(15.0)
    quats, ids = G.base_grid()
    assert quats.shape == (4608, 4) and torch.equal(ids, torch.arange(4608))
    with pytest.raises(ValueError, match="out of range"):
        G.ids_to_rotations(0, torch.tensor([4608]))


def test_rotation_convention_viewing_direction_and_psi() -> None:
    ids = torch.tensor([0, 25, 1000, 4607])
    R = G.ids_to_rotations(0, ids, dtype=torch.float64)
    # Viewing direction R^T e_z is the HEALPix pixel centre.
    pix = (ids // 24).numpy()
    vec = np.stack(healpy.pix2vec(4, pix, nest=True), axis=-1)
    assert np.allclose(R[:, 2, :].numpy(), vec, atol=1e-12)
    # Quaternions describe the same rotations; consecutive psi differ by 15 deg about z.
    assert torch.allclose(quaternion_to_matrix(G.ids_to_quats(0, ids).double()), R, atol=1e-6)
    R0, R1 = G.ids_to_rotations(0, torch.tensor([48, 49]), dtype=torch.float64)
    rel = R1 @ R0.T
    assert rel[2, 2] == pytest.approx(1.0)
    assert math.degrees(math.atan2(rel[0, 1], rel[0, 0])) == pytest.approx(15.0)


def test_children_partition_the_next_level() -> None:
    _, ids0 = G.base_grid(0)
    cq, cid = G.children(0, ids0)
    assert cq.shape == (4608 * 8, 4)
    assert torch.equal(torch.sort(cid).values, torch.arange(G.grid_size(1)[0] * 48))
    assert torch.allclose(cq, G.grid_quats(1)[cid])
    # Every child lies within one level-0 spacing (15 deg) of its parent, typically 6 deg,
    # also at the poles where rot and psi are degenerate.
    parent = G.grid_quats(0).repeat_interleave(8, dim=0)
    ang = torch.rad2deg(2 * torch.acos((cq * parent).sum(-1).abs().clamp(max=1)))
    assert ang.max() < 14.0 and ang.mean() < 8.0
    # Children of level-1 points are level-2 points.
    sub = torch.tensor([5, 777, 36863])
    q2, id2 = G.children(1, sub)
    assert torch.allclose(q2, G.ids_to_quats(2, id2))
    assert id2.reshape(3, 8)[:, 0].tolist() == [(5 // 48) * 4 * 96 + 2 * (5 % 48)] + [
        (i // 48) * 4 * 96 + 2 * (i % 48) for i in sub[1:].tolist()
    ]


def test_coverage_halves_per_level() -> None:
    q = random_quaternions(2000, torch.Generator().manual_seed(0), dtype=torch.float64)
    bounds = {0: (13.0, 8.0), 1: (7.0, 4.2), 2: (3.5, 2.1)}  # (max, median) deg
    medians = []
    for level, (max_deg, med_deg) in bounds.items():
        if level < 2:
            ang = _nearest_angle_deg(q, G.grid_quats(level, dtype=torch.float64))
        else:  # 295k points: search only near each viewing direction (still exact)
            ang = _nearest_angle_deg_local(q, level, radius_deg=max_deg)
            exact = _nearest_angle_deg(q[:50], G.grid_quats(level, dtype=torch.float64))
            assert torch.allclose(ang[:50], exact, atol=1e-6)
        assert float(ang.max()) < max_deg, (level, float(ang.max()))
        assert float(ang.median()) < med_deg, (level, float(ang.median()))
        medians.append(float(ang.median()))
    for a, b in itertools.pairwise(medians):
        assert 1.7 < a / b < 2.3


def test_hierarchical_refinement_finds_close_points() -> None:
    # Searching the children of the 8 nearest level-0 points is as good as level-1 coverage.
    q = random_quaternions(500, torch.Generator().manual_seed(1))
    g0 = G.grid_quats(0)
    top = (q @ g0.T).abs().topk(8, dim=1).indices
    cq, _ = G.children(0, top.reshape(-1))
    d = (cq.reshape(500, 64, 4) * q[:, None]).sum(-1).abs().max(dim=1).values
    assert torch.rad2deg(2 * torch.acos(d.clamp(max=1))).max() < 8.0


@pytest.mark.parametrize("level", [0, 1])
def test_direction_pixels_of_grid_views(level: int) -> None:
    """The viewing direction ``R^T e_z`` of every grid point lies in its own pixel."""
    n_dirs, n_psi = G.grid_size(level)
    R = G.grid_rotations(level, dtype=torch.float64)
    pix = G.direction_pixels(R[:, 2, :] * 3.0, level)  # not normalised on purpose
    np.testing.assert_array_equal(pix, np.repeat(np.arange(n_dirs), n_psi))
    assert G.direction_pixels(np.array([0.0, 0.0, 1.0]), level).shape == ()
    with pytest.raises(ValueError):
        G.direction_pixels(np.ones((2, 3)), -1)
