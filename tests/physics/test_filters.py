"""Fourier cropping is exact for band-limited signals; low-pass and masks."""

from __future__ import annotations

import math

import pytest
import torch

from cryofield.physics import filters as fl
from cryofield.physics.fsc import fsc
from cryofield.physics.lattice import coords_1d

# (cycles per box in x, y, z, amplitude, phase): all below the Nyquist of the small box.
WAVES = [(0, 0, 0, 0.7, 0.0), (3, -2, 1, 1.0, 0.3), (-5, 7, 2, 0.5, 1.1), (9, 4, -6, 0.3, 2.0)]


def _sample(D: int, ndim: int) -> torch.Tensor:
    """The same continuous periodic function sampled with D px per box."""
    c = coords_1d(D, dtype=torch.float64) / D  # position in boxes
    grids = torch.meshgrid(*([c] * ndim), indexing="ij")  # (z,) y, x
    out = torch.zeros((D,) * ndim, dtype=torch.float64)
    for nx, ny, nz, amp, ph in WAVES:
        arg = nx * grids[-1] + ny * grids[-2] + (nz * grids[0] if ndim == 3 else 0)
        out += amp * torch.cos(2 * math.pi * arg + ph)
    return out


def test_fourier_crop_2d_exact_for_band_limited_images() -> None:
    big, small = _sample(64, 2), _sample(24, 2)
    got = fl.fourier_crop(big[None].expand(3, 64, 64), 24)
    assert got.shape == (3, 24, 24)
    assert (got - small).abs().max() < 1e-10
    assert (fl.fourier_crop(big.float(), 24) - small.float()).abs().max() < 1e-5
    # Mean intensity is preserved for any image.
    x = torch.rand(2, 48, 48)
    assert torch.allclose(fl.fourier_crop(x, 16).mean((-2, -1)), x.mean((-2, -1)), atol=1e-6)
    assert torch.equal(fl.fourier_crop(x, 48), x)


def test_fourier_crop_3d_exact_for_band_limited_volumes() -> None:
    big, small = _sample(48, 3), _sample(20, 3)
    assert (fl.fourier_crop_3d(big, 20) - small).abs().max() < 1e-10


def test_fourier_crop_bad_sizes() -> None:
    with pytest.raises(ValueError, match="even"):
        fl.fourier_crop(torch.zeros(1, 32, 32), 15)
    with pytest.raises(ValueError, match="D_new <= D"):
        fl.fourier_crop(torch.zeros(1, 32, 32), 64)


def test_lowpass_removes_only_high_frequencies() -> None:
    D, apix = 64, 2.0
    c = coords_1d(D, dtype=torch.float64)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    low = torch.cos(2 * math.pi * 4 * xx / D)  # 4 cycles/box: 32 A at 2 A/px
    high = torch.cos(2 * math.pi * 20 * yy / D)  # 20 cycles/box: 6.4 A
    out = fl.lowpass(low + high, cutoff_A=12.0, apix_A=apix)  # cut-off radius 10.7 px
    assert (out - low).abs().max() < 1e-10
    # 3-D: FSC with the unfiltered map stays 1 below the cut-off, 0 far above.
    v = torch.randn(32, 32, 32, dtype=torch.float64)
    vf = fl.lowpass(v, cutoff_A=8.0, apix_A=2.0, ndim=3, edge_px=0)  # 8 px radius
    curve = fsc(v, vf)
    assert torch.allclose(curve[:8], torch.ones(8, dtype=torch.float64), atol=1e-9)
    assert float((vf.double() ** 2).sum()) < 0.1 * float((v**2).sum())


def test_soft_masks_profile() -> None:
    m = fl.soft_circular_mask(64, radius_px=20.0, width_px=4.0)
    assert m.shape == (64, 64)
    assert m[32, 32 + 20] == 1.0 and m[32, 32 + 24] == 0.0 and m[32, 0] == 0.0
    assert float(m[32, 32 + 22]) == pytest.approx(0.5)
    s = fl.soft_spherical_mask(32, radius_px=10.0, width_px=2.0)
    assert s.shape == (32, 32, 32) and s[16, 16, 16] == 1.0
    assert float(s[16 + 11, 16, 16]) == pytest.approx(0.5)
    assert s[16 + 12, 16, 16] == 0.0
    # Volume of the ball: between the hard radii.
    n = float(s.sum())
    assert 4 / 3 * math.pi * 10**3 < n < 4 / 3 * math.pi * 12**3
