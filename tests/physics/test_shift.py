"""Phase-ramp translations equal integer rolls; Fourier and Hartley agree."""

from __future__ import annotations

import torch

from cryofield.physics import fourier as fo
from cryofield.physics import shift as sh


def test_integer_shift_equals_roll_fourier_and_hartley() -> None:
    D = 32
    x = torch.randn(4, D, D, dtype=torch.float64)
    t = torch.tensor([[3.0, 0.0], [0.0, -5.0], [7.0, 2.0], [-1.0, -9.0]], dtype=torch.float64)
    want = torch.stack(
        [torch.roll(x[i], shifts=(int(t[i, 1]), int(t[i, 0])), dims=(0, 1)) for i in range(4)]
    )
    got_f = fo.ifft2_centered(sh.phase_shift_fourier(fo.fft2_centered(x), t)).real
    assert (got_f - want).abs().max() < 1e-10
    got_h = fo.iht2_centered(sh.phase_shift_hartley(fo.ht2_centered(x), t))
    assert (got_h - want).abs().max() < 1e-10
    # float32 as well.
    got32 = fo.iht2_centered(sh.phase_shift_hartley(fo.ht2_centered(x.float()), t.float()))
    assert (got32 - want.float()).abs().max() < 1e-4


def test_fractional_shift_moves_centroid_and_matches_between_spaces() -> None:
    D = 64
    c = torch.arange(D, dtype=torch.float64) - D // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    blob = torch.exp(-((xx - 1.0) ** 2 + (yy + 2.0) ** 2) / (2 * 3.0**2))[None]
    t = torch.tensor([[2.3, -1.7]], dtype=torch.float64)
    moved = fo.ifft2_centered(sh.phase_shift_fourier(fo.fft2_centered(blob), t)).real
    cx = float((moved * xx).sum() / moved.sum())
    cy = float((moved * yy).sum() / moved.sum())
    assert abs(cx - (1.0 + 2.3)) < 1e-6 and abs(cy - (-2.0 - 1.7)) < 1e-6
    h = sh.phase_shift_hartley(fo.ht2_centered(blob), t)
    assert (fo.iht2_centered(h) - moved).abs().max() < 1e-9
    # shift_phase on arbitrary points equals the grid version.
    pts = torch.tensor([[0.1, -0.2], [0.25, 0.0]], dtype=torch.float64)
    ph = sh.shift_phase(pts, t)
    assert torch.allclose(ph, torch.exp(-2j * torch.pi * (pts @ t[0]))[None])


def test_negate_frequency() -> None:
    from cryofield.physics.fourier import negate_frequency

    D = 8
    h = torch.arange(D * D, dtype=torch.float64).reshape(D, D)
    neg = negate_frequency(h, 2)
    for i, j in [(4, 4), (3, 5), (0, 0), (0, 6), (7, 1)]:
        assert neg[i, j] == h[(D - i) % D, (D - j) % D]
    v = torch.arange(D**3, dtype=torch.float64).reshape(2, D // 2, D, D)  # batch, ndim=2
    assert torch.equal(negate_frequency(v, 2)[1, 3, 3, 5], v[1, 3, 5, 3])
    v3 = torch.arange(D**3, dtype=torch.float64).reshape(D, D, D)
    for i, j, k in [(4, 4, 4), (0, 3, 7), (1, 0, 6)]:
        assert negate_frequency(v3, 3)[i, j, k] == v3[(D - i) % D, (D - j) % D, (D - k) % D]
