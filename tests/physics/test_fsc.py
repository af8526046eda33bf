"""FSC: identical -> 1, independent noise -> ~0, known shell-wise correlation, resolution."""

from __future__ import annotations

import pytest
import torch

from cryofield.physics.fourier import fft3_centered, ifft3_centered
from cryofield.physics.fsc import fsc, resolution_at
from cryofield.physics.lattice import radial_index_3d


def test_identical_and_scaled_volumes_give_one(blobs32: torch.Tensor) -> None:
    curve = fsc(blobs32, blobs32)
    assert curve.shape == (16,)
    assert torch.allclose(curve, torch.ones(16, dtype=torch.float64))
    assert torch.allclose(fsc(blobs32, 3.0 * blobs32), torch.ones(16, dtype=torch.float64))
    assert torch.allclose(fsc(blobs32, -blobs32), -torch.ones(16, dtype=torch.float64))


def test_independent_noise_is_near_zero() -> None:
    a, b = torch.randn(48, 48, 48), torch.randn(48, 48, 48)
    curve = fsc(a, b)
    assert abs(float(curve.mean())) < 0.1
    # Shell r holds ~4 pi r^2 voxels, so |FSC| ~ 1 / sqrt(2 pi r^2) beyond the first few.
    assert curve[5:].abs().max() < 0.15


def test_known_correlation_from_signal_plus_noise() -> None:
    # vol2 = signal + noise with shell-independent SNR 1: expected FSC = SNR / (1 + SNR)
    # for vol1 = signal + independent noise, i.e. 0.5, at every shell.
    D = 48
    sig = torch.randn(D, D, D, dtype=torch.float64)
    v1 = sig + torch.randn_like(sig)
    v2 = sig + torch.randn_like(sig)
    curve = fsc(v1, v2)
    assert (curve[6:] - 0.5).abs().max() < 0.06


def test_shell_assignment_with_band_limited_volume() -> None:
    # Replace all frequencies with radius > 9.5 px of one copy by independent noise: FSC
    # is exactly 1 in shells 0..9 (radius rounds to <= 9) and ~0 beyond.
    D = 32
    v = torch.randn(D, D, D, dtype=torch.float64)
    w = torch.randn(D, D, D, dtype=torch.float64)
    keep = radial_index_3d(D, dtype=torch.float64) <= 9.5
    mixed = ifft3_centered(fft3_centered(v) * keep + fft3_centered(w) * ~keep).real
    curve = fsc(v, mixed)
    assert torch.allclose(curve[:10], torch.ones(10, dtype=torch.float64), atol=1e-9)
    assert curve[10:].abs().max() < 0.1


def test_resolution_at_synthetic_curve() -> None:
    # Curve falls linearly from 1 at shell 0 to 0 at shell 20 (D = 64): 0.5 at shell 10,
    # 0.143 at shell 17.14 (interpolated), resolution D * apix / shell.
    curve = torch.clamp(1 - torch.arange(32, dtype=torch.float64) / 20, min=0)
    shell, res = resolution_at(curve, 0.5, apix_A=1.5)
    assert shell == pytest.approx(10.0)
    assert res == pytest.approx(64 * 1.5 / 10.0)
    shell, res = resolution_at(curve, 0.143, apix_A=1.0)
    assert shell == pytest.approx(20 * (1 - 0.143))
    assert res == pytest.approx(64 / shell)
    # A dip below the threshold followed by recovery: the first crossing counts.
    bumpy = torch.tensor([1.0, 0.9, 0.4, 0.8, 0.7, 0.1, 0.0, 0.0])
    shell, _ = resolution_at(bumpy, 0.5)
    assert shell == pytest.approx(1 + (0.9 - 0.5) / (0.9 - 0.4))
    # Never below: the last shell.
    shell, res = resolution_at(torch.ones(16), 0.143, apix_A=2.0)
    assert shell == 15 and res == pytest.approx(32 * 2.0 / 15)
    # Crossing inside the first interval: shell 0.5 of D = 8 is 16 px.
    assert resolution_at(torch.tensor([1.0, 0.0, 0.0, 0.0]), 0.5) == (0.5, 16.0)


def test_fsc_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="two"):
        fsc(torch.zeros(8, 8, 8), torch.zeros(16, 16, 16))
