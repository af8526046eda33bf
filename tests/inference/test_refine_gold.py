"""Gold-standard refinement against back-projected half maps (:mod:`cryofield.inference.refine`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from synth import blob_volume, make_dataset

from cryofield.inference.data import ArraySource, BatchMaker
from cryofield.inference.pose_search import FrequencyPoints
from cryofield.inference.refine import (
    RefineSettings,
    halfmap_weights,
    reference_grid,
    refine_poses_gold_standard,
)
from cryofield.physics.fourier import fft3_centered
from cryofield.physics.rotation import axis_angle_to_matrix, geodesic_distance_rad


def _batches(data) -> BatchMaker:
    """Training images and CTFs of a synthetic set (no window, normalised)."""
    pts = FrequencyPoints.build(data.images.shape[-1])
    batches = BatchMaker(ArraySource(data.images, data.apix_A), data.ctf, pts, window=False)
    batches.estimate_scale(200, torch.Generator().manual_seed(0))
    return batches


def test_halfmap_weights_follow_the_fsc_and_stop_at_0143():
    curve = torch.tensor([1.0, 0.99, 0.8, 0.5, 0.2, 0.1, 0.3, 0.0])
    w = halfmap_weights(curve)
    assert float(w[0]) == 1.0
    assert float(w[3]) == float(torch.sqrt(torch.tensor(2 * 0.5 / 1.5)))
    assert torch.all(w[5:] == 0)  # first shell below 0.143 and everything after
    assert torch.all(w[1:5][:-1] >= w[1:5][1:])


def test_reference_grid_matches_the_oversampled_transform():
    D = 16
    vol = blob_volume(D, n_blobs=3, seed=2)
    grid, Dg = reference_grid(vol, torch.ones(D // 2), radius_px=5.0)
    assert Dg == 2 * D
    full = fft3_centered(torch.nn.functional.pad(vol, [D // 2] * 6))
    Dc = grid.shape[-1]
    lo = D - Dc // 2
    crop = full[lo : lo + Dc, lo : lo + Dc, lo : lo + Dc]
    c = Dc // 2
    # inside the ball the grid is the transform; 5.5 px of box D out it is zero
    assert torch.allclose(grid[c, c, c + 4], crop[c, c, c + 4].to(grid.dtype), rtol=1e-4)
    assert grid[c, c, c + 11].abs() == 0 and crop[c, c, c + 11].abs() > 0


@pytest.mark.parametrize("folds", [0, 4])
def test_refinement_brings_perturbed_poses_back(one_thread, folds):
    D, n = 32, 400
    vol = blob_volume(D, n_blobs=10, seed=1, width_px=1.0)
    data = make_dataset([vol], n, snr=20.0, shift_px=1.0, apix_A=4.0, seed=3)
    batches = _batches(data)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(n, 3, generator=g)
    w = w / w.norm(dim=-1, keepdim=True) * math.radians(3.0)  # every pose 3 deg off
    R0 = data.rotations @ axis_angle_to_matrix(w)
    t0 = data.shifts_px + 0.4 * torch.randn(n, 2, generator=g)
    settings = RefineSettings(max_iters=3, chunk=128, folds=folds)
    res = refine_poses_gold_standard(batches, R0, t0, settings)
    err0 = torch.rad2deg(geodesic_distance_rad(R0, data.rotations))
    err = torch.rad2deg(geodesic_distance_rad(res.rotations, data.rotations))
    assert float(err0.median()) > 2.9
    assert float(err.median()) < 1.0, float(err.median())
    assert float((res.shifts_px - data.shifts_px).norm(dim=-1).median()) < 0.25
    # the half maps sharpen as the poses improve and the history says so
    assert len(res.history) >= 2
    assert res.history[-1]["fsc0143_px"] >= res.history[0]["fsc0143_px"]
    assert res.history[0]["moved_fraction"] > 0.5


def test_refinement_keeps_true_poses(one_thread):
    """Started at the truth on noisy data, the soft (posterior-mean) update with the
    Gaussian prior drifts far less than picking the best grid point."""
    D, n = 32, 400
    vol = blob_volume(D, n_blobs=10, seed=1, width_px=1.5)
    data = make_dataset([vol], n, snr=0.3, shift_px=1.0, apix_A=4.0, seed=4)
    batches = _batches(data)
    drift = {}
    for soft in (False, True):
        res = refine_poses_gold_standard(
            batches, data.rotations, data.shifts_px,
            RefineSettings(max_iters=2, chunk=128, soft=soft),
        )  # fmt: skip
        err = torch.rad2deg(geodesic_distance_rad(res.rotations, data.rotations))
        drift[soft] = float(err.median())
        assert np.isfinite(res.history[0]["fsc0143_A"])
    assert drift[True] < 1.5 and drift[True] < 0.6 * drift[False], drift


def test_global_check_rescues_images_in_a_wrong_basin(one_thread):
    from cryofield.inference.pose_search import SearchSettings

    D, n = 32, 300
    vol = blob_volume(D, n_blobs=10, seed=1, width_px=1.0)
    data = make_dataset([vol], n, snr=5.0, shift_px=1.0, apix_A=4.0, seed=5)
    batches = _batches(data)
    g = torch.Generator().manual_seed(8)
    w = torch.randn(n, 3, generator=g)
    size = torch.full((n, 1), math.radians(1.0))
    size[: n // 10] = math.radians(90.0)  # 10% of the images far off: a local search cannot
    R0 = data.rotations @ axis_angle_to_matrix(w / w.norm(dim=-1, keepdim=True) * size)
    search = SearchSettings(base_nside=2, base_psi=12, levels=3, n_keep=4, t_extent_px=2.0,
                            t_ngrid=5, radius_lo_px=6.0, radius_hi_px=10.0)  # fmt: skip
    errs = {}
    for name, gs in (("local", None), ("global", search)):
        res = refine_poses_gold_standard(
            batches, R0, data.shifts_px, RefineSettings(max_iters=2, chunk=100, global_search=gs)
        )
        e = torch.rad2deg(geodesic_distance_rad(res.rotations, data.rotations))
        errs[name] = float((e[: n // 10] > 10).float().mean())
        if gs is not None:
            assert 0 < res.history[0]["rescued_fraction"] <= 1
    assert errs["local"] > 0.8  # the far-off images stay far off without the global check
    assert errs["global"] < 0.2, errs


def test_pose_floor_leaves_each_image_out_of_its_reference(one_thread):
    """The floor aligns every image, from its true pose, to its half map without its
    fold. Left in, the image's own noise on its true slice pulls it back to the truth: the
    self-included alignment (same search, the whole half map) looks better than the data
    allow. A subset of the images gets the same poses as in the full run."""
    from cryofield.inference.pose_search import local_refine_poses
    from cryofield.inference.refine import backproject_halves_batched, pose_floor
    from cryofield.physics.fsc import fsc, resolution_at

    D, n = 32, 400
    vol = blob_volume(D, n_blobs=10, seed=1, width_px=1.0)
    data = make_dataset([vol], n, snr=0.3, shift_px=1.0, apix_A=4.0, seed=3)
    batches = _batches(data)
    R, t = data.rotations, data.shifts_px
    pf = pose_floor(batches, R, t, folds=4)
    assert np.array_equal(pf.rows, np.arange(n)) and pf.folds == 4
    err = torch.rad2deg(geodesic_distance_rad(pf.rotations, R))
    # self-included: the same search against the whole half map each image is in
    h1, h2 = backproject_halves_batched(batches, R, t)
    curve = fsc(h1, h2)
    assert abs(resolution_at(curve, 0.143, batches.apix_A)[1] - pf.fsc0143_A) < 1e-6
    radius = min(D / 2 - 1, resolution_at(curve, 0.143, batches.apix_A)[0] + 3.0)
    R_in = R.clone()
    for h, ref in ((0, h1), (1, h2)):
        grid, Dg = reference_grid(ref, halfmap_weights(curve), radius)
        rows = torch.arange(h, n, 2)
        R_in[rows] = local_refine_poses(
            grid, Dg, batches.images_ft(rows.numpy()), batches.ctf(rows.numpy()),
            batches.points, R[rows], t[rows], radius, levels=4, iters_per_level=1, soft=True,
        )[0]  # fmt: skip
    err_in = torch.rad2deg(geodesic_distance_rad(R_in, R))
    assert float(err.median()) > 1.5 * float(err_in.median()), (err.median(), err_in.median())
    # the true poses are a fixed point on average: no image is lost
    assert float(err.median()) < 5.0 and float(err.max()) < 15.0
    sub = np.array([3, 10, 11, 200, 399])
    part = pose_floor(batches, R, t, refine_rows=sub[::-1], folds=4)
    assert np.array_equal(part.rows, sub)
    assert torch.allclose(part.rotations, pf.rotations[sub], atol=1e-5)
    assert torch.allclose(part.shifts_px, pf.shifts_px[sub], atol=1e-5)
