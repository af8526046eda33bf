"""The field phase of homogeneous runs: the field regressed onto a back-projected map."""

from __future__ import annotations

import numpy as np
import torch
from synth import blob_volume, make_dataset

from cryofield.inference.config import TrainConfig
from cryofield.inference.data import ArraySource
from cryofield.inference.field_fit import FitSettings, ball_targets, fit_field_to_map, fit_steps
from cryofield.inference.rundir import RunDir
from cryofield.inference.trainer import Trainer
from cryofield.model.field import HartleyField, ball_coords
from cryofield.physics.fourier import ht3_centered, iht3_centered
from cryofield.physics.fsc import fsc


def _low_pass(vol: torch.Tensor, radius_px: float) -> torch.Tensor:
    D = vol.shape[-1]
    c = torch.arange(D, dtype=torch.float32) - D // 2
    r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    return iht3_centered(ht3_centered(vol) * (r <= radius_px))


def test_ball_targets_are_the_hartley_transform_inside_the_ball():
    """Identity: the targets, put back on the lattice and inverted, are the map low-passed
    to the ball (in the field's units: divided by output_scale)."""
    D, radius = 16, 6.0
    vol = blob_volume(D, 6, width_px=1.0)
    coords, y = ball_targets(vol, radius, output_scale=2.0)
    grid_coords, Dc = ball_coords(D, radius)
    inside = grid_coords.norm(dim=-1) * D <= radius
    assert coords.shape == (int(inside.sum()), 3)
    grid = torch.zeros(Dc, Dc, Dc).masked_scatter(inside, y * 2.0)
    full = torch.zeros(D, D, D)
    o = D // 2 - Dc // 2
    full[o : o + Dc, o : o + Dc, o : o + Dc] = grid
    assert torch.allclose(iht3_centered(full), _low_pass(vol, radius), atol=1e-5)


def test_fit_steps_scale_with_the_ball():
    s = FitSettings()
    assert fit_steps(124_800, s) == (1524, 16384)  # D = 64, radius 31
    assert fit_steps(1_000, s) == (400, 1000)  # at least 400 steps; no more points than voxels
    assert fit_steps(10**7, s) == (4000, 16384)
    assert fit_steps(1_000, s, from_scratch=True) == (800, 1000)
    assert fit_steps(10**7, FitSettings(steps=7, points=10)) == (7, 10)


def test_fit_from_scratch_starts_empty_and_reduces_the_residual():
    torch.manual_seed(0)
    D, radius = 16, 7.0
    vol = blob_volume(D, 6, width_px=1.0)
    field = HartleyField(D, zdim=0, hidden=64, layers=3, n_freqs=32)
    res = fit_field_to_map(field, vol, radius, FitSettings(steps=400), from_scratch=True)
    assert res["rel_residual_start"] == 1.0  # output layer zeroed: an empty map
    assert res["rel_residual_end"] < 0.3
    assert float(fsc(field.render_volume(), _low_pass(vol, radius))[:3].min()) > 0.9


def test_known_poses_field_epoch_fits_the_backprojection(tmp_path, one_thread):
    """Known poses, noise-free images: one field epoch gives a field whose map matches the
    truth to high resolution, with a residual per image and the fit's record."""
    D, N = 16, 300
    data = make_dataset([blob_volume(D, 6, width_px=1.0)], N, snr=None, seed=3)
    cfg = TrainConfig(outdir=str(tmp_path), hidden=64, n_freqs=32, poses_from_file=True,
                      deterministic=True).resolved(D)  # fmt: skip
    tr = Trainer(cfg, ArraySource(data.images, data.apix_A), data.ctf, tmp_path,
                 (data.rotations, data.shifts_px))  # fmt: skip
    assert tr.cfg.epochs == 1 and tr.cfg.field_fit == "backprojection"
    tr.fit()
    run = RunDir(tmp_path)
    (m,) = run.metrics()
    curve = fsc(tr.field.render_volume(), data.volumes[0])
    assert m["phase"] == "fixed" and m["field_fit"]["rel_residual_end"] < 0.3
    assert float(curve[:5].min()) > 0.85
    res = np.load(run.epoch_dir(1) / "residuals.npz")
    assert np.isfinite(res["residual"]).all() and np.isfinite(res["power"]).all()
