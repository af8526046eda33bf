"""Neural field: encoding, band-limited grid, Hartley -> Fourier, rendering."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cryofield.model.encoding import GaussianFourierFeatures
from cryofield.model.field import HartleyField, ball_coords, hartley_grid_to_fourier
from cryofield.physics.fourier import fft3_centered, ht3_centered

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))
from synth import blob_volume


def test_encoding_shape_range_and_seed():
    enc = GaussianFourierFeatures(32, n_freqs=16, sigma=0.5, seed=3)
    x = torch.rand(5, 7, 3) - 0.5
    y = enc(x)
    assert y.shape == (5, 7, enc.out_dim) and enc.out_dim == 35
    assert y[..., :32].abs().max() <= 1.0
    assert torch.equal(GaussianFourierFeatures(32, 16, 0.5, seed=3).freqs, enc.freqs)
    assert not torch.equal(GaussianFourierFeatures(32, 16, 0.5, seed=4).freqs, enc.freqs)
    # sigma is the std of the random frequencies
    big = GaussianFourierFeatures(32, 4000, 0.5, seed=0)
    assert abs(float(big.freqs.std()) - 0.5) < 0.02


def test_hartley_to_fourier_matches_fft_on_cropped_ball():
    D = 32
    vol = blob_volume(D, 6)
    F, H = fft3_centered(vol), ht3_centered(vol)
    coords, Dc = ball_coords(D, 9.0)
    o = D // 2 - Dc // 2
    inside = coords.norm(dim=-1) * D <= 9.0
    Hc = H[o : o + Dc, o : o + Dc, o : o + Dc] * inside
    Fc = F[o : o + Dc, o : o + Dc, o : o + Dc]
    err = (hartley_grid_to_fourier(Hc) - Fc)[inside].abs().max()
    assert err < 1e-4 * F.abs().max()


@pytest.mark.parametrize("zdim", [0, 3])
def test_grid_equals_direct_evaluation(zdim):
    torch.manual_seed(0)
    f = HartleyField(24, zdim=zdim, hidden=32, layers=2, n_freqs=8)
    f.set_envelope(torch.linspace(3.0, 0.1, 14))
    z = torch.randn(2, zdim) if zdim else None
    grid, Dc = f.grid_ht(6.5, z, chunk=100)
    coords, _ = ball_coords(24, 6.5)
    inside = coords.norm(dim=-1) * 24 <= 6.5
    direct = f(coords.reshape(-1, 3), z).reshape(grid.shape)
    assert torch.allclose(grid, direct * inside, atol=1e-5)
    assert grid.shape[-1] == Dc == 2 * (7 + 2)


def test_render_volume_is_inverse_hartley_of_the_field():
    torch.manual_seed(0)
    D = 16
    f = HartleyField(D, apix_A=2.0, hidden=32, layers=1, n_freqs=8)
    f.output_scale.fill_(5.0)
    vol = f.render_volume()
    assert vol.shape == (D, D, D) and vol.dtype == torch.float32
    grid, Dc = f.grid_ht(D / 2 - 1)
    assert Dc == D
    assert torch.allclose(ht3_centered(vol), grid.detach() * 5.0, atol=1e-3)
    with pytest.raises(ValueError):
        f.render_volume(D=32)
