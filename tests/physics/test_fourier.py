"""Centred FFT / Hartley transforms: round trips, the Hartley relation, centring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryofield.physics import fourier as fo


@pytest.mark.parametrize("D", [16, 32, 64])
def test_fft2_round_trip_and_numpy_reference(D: int) -> None:
    x = torch.randn(3, D, D, dtype=torch.float64)
    f = fo.fft2_centered(x)
    ref = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x.numpy(), axes=(-2, -1))), axes=(-2, -1))
    assert np.allclose(f.numpy(), ref, atol=1e-9)
    back = fo.ifft2_centered(f)
    assert torch.allclose(back.real, x, atol=1e-10)
    assert back.imag.abs().max() < 1e-10


def test_fft_round_trip_float32_1e5() -> None:
    x2 = torch.randn(4, 48, 48)
    assert (fo.ifft2_centered(fo.fft2_centered(x2)).real - x2).abs().max() < 1e-5
    x3 = torch.randn(2, 32, 32, 32)
    assert (fo.ifft3_centered(fo.fft3_centered(x3)).real - x3).abs().max() < 1e-5


def test_centring_delta_and_dc() -> None:
    D = 16
    # A delta at the centre transforms to a constant; DC sits at D // 2.
    x = torch.zeros(D, D, D)
    x[D // 2, D // 2, D // 2] = 1.0
    f = fo.fft3_centered(x)
    assert torch.allclose(f, torch.ones_like(f))
    y = torch.rand(D, D)
    assert torch.isclose(fo.fft2_centered(y)[D // 2, D // 2].real, y.sum(), rtol=1e-5)
    # A delta one pixel right of centre (x = +1) gives exp(-2 pi i kx).
    z = torch.zeros(D, D)
    z[D // 2, D // 2 + 1] = 1.0
    kx = (torch.arange(D) - D // 2) / D
    expected = torch.exp(-2j * torch.pi * kx.double())[None, :].expand(D, D)
    assert torch.allclose(fo.fft2_centered(z.double()), expected, atol=1e-12)


def test_hartley_relation_realness_and_inverse() -> None:
    x = torch.randn(2, 32, 32)
    f = fo.fft2_centered(x)
    h = fo.ht2_centered(x)
    assert not torch.is_complex(h)
    assert torch.allclose(h, f.real - f.imag, atol=1e-5)
    assert (fo.iht2_centered(h) - x).abs().max() < 1e-5
    v = torch.randn(24, 24, 24)
    h3 = fo.ht3_centered(v)
    f3 = fo.fft3_centered(v)
    assert not torch.is_complex(h3)
    assert torch.allclose(h3, f3.real - f3.imag, atol=1e-4)
    assert (fo.iht3_centered(h3) - v).abs().max() < 1e-5
    # Parseval for the Hartley transform: sum h^2 = N sum x^2.
    assert torch.isclose((h3.double() ** 2).sum(), 24**3 * (v.double() ** 2).sum(), rtol=1e-5)
