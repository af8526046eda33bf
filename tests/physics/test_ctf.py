"""CTF against an independent numpy evaluation of the formula in the ``physics.ctf`` docstring."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cryofield.physics.ctf import CTFParams, compute_ctf, electron_wavelength_A
from cryofield.physics.lattice import freq_grid_2d


def test_wavelength_300kV_literature() -> None:
    # 300 kV: lambda = 1.9687 pm (e.g. Williams & Carter, Transmission Electron
    # Microscopy, table 1.1: 0.00197 nm; NIST relativistic de Broglie wavelength).
    assert float(electron_wavelength_A(300.0)) == pytest.approx(0.019687, abs=1e-6)
    assert float(electron_wavelength_A(200.0)) == pytest.approx(0.025079, abs=1e-6)
    assert float(electron_wavelength_A(100.0)) == pytest.approx(0.037014, abs=1e-6)
    # Independent physics: lambda = h / sqrt(2 m e V (1 + e V / (2 m c^2))).
    h, m, e, c = 6.62607015e-34, 9.1093837015e-31, 1.602176634e-19, 299792458.0
    for kv in (80.0, 120.0, 300.0):
        V = kv * 1e3
        lam = h / math.sqrt(2 * m * e * V * (1 + e * V / (2 * m * c * c))) * 1e10
        assert float(electron_wavelength_A(kv)) == pytest.approx(lam, rel=2e-5)


def _numpy_ctf(kx, ky, apix, dfu, dfv, ang_deg, kv, cs, w, ps_deg, b):
    """The ``cryofield.physics.ctf`` formula, evaluated point by point in float64 numpy."""
    s2 = (kx**2 + ky**2) / apix**2
    alpha = np.arctan2(ky, kx)
    df = 0.5 * (dfu + dfv + (dfu - dfv) * np.cos(2 * (alpha - np.deg2rad(ang_deg))))
    V = kv * 1000.0
    lam = 12.2643247 / np.sqrt(V + 0.978466e-6 * V**2)
    gamma = 2 * np.pi * (-0.5 * df * lam * s2 + 0.25 * cs * 1e7 * lam**3 * s2**2)
    gamma -= np.deg2rad(ps_deg)
    return (np.sqrt(1 - w**2) * np.sin(gamma) - w * np.cos(gamma)) * np.exp(-b / 4 * s2)


def test_ctf_matches_formula_per_particle() -> None:
    rows = [  # apix, dfU, dfV, angle, kV, Cs, w, phase shift, B
        (1.0, 15000.0, 14000.0, 30.0, 300.0, 2.7, 0.1, 0.0, 0.0),
        (1.35, 22000.0, 21500.0, -70.0, 200.0, 2.0, 0.07, 0.0, 50.0),
        (2.1, 8000.0, 9000.0, 120.0, 300.0, 0.01, 0.1, 90.0, 0.0),
        (0.83, 11000.0, 11000.0, 0.0, 120.0, 1.4, 0.15, 35.0, 10.0),
    ]
    arr = np.array(rows)
    params = CTFParams.from_arrays(
        defocus_u_A=arr[:, 1],
        defocus_v_A=arr[:, 2],
        astig_angle_deg=arr[:, 3],
        voltage_kV=arr[:, 4],
        cs_mm=arr[:, 5],
        amp_contrast=arr[:, 6],
        phase_shift_deg=arr[:, 7],
        bfactor_A2=arr[:, 8],
        dtype=torch.float64,
    )
    D = 48
    freqs = freq_grid_2d(D, dtype=torch.float64)
    got = compute_ctf(freqs, torch.tensor(arr[:, 0]), params).numpy()
    assert got.shape == (4, D, D)
    kx, ky = freqs[..., 0].numpy(), freqs[..., 1].numpy()
    for i, r in enumerate(rows):
        assert np.allclose(got[i], _numpy_ctf(kx, ky, *r), atol=1e-9)
    # float32 path agrees to single precision; arbitrary (M, 2) points also work.
    p32 = params.to(dtype=torch.float32)
    got32 = compute_ctf(freqs.float(), torch.tensor(arr[:, 0]).float(), p32).numpy()
    assert np.abs(got32 - got).max() < 2e-3
    pts = torch.tensor([[0.1, 0.0], [0.0, 0.1], [-0.3, 0.2]], dtype=torch.float64)
    got_pts = compute_ctf(pts, 1.5, params).numpy()
    want = _numpy_ctf(pts[:, 0].numpy(), pts[:, 1].numpy(), 1.5, *rows[0][1:])
    assert np.allclose(got_pts[0], want, atol=1e-9)


def test_ctf_physics_identities() -> None:
    p = CTFParams.from_arrays(
        defocus_u_A=20000.0, defocus_v_A=20000.0, astig_angle_deg=0.0, voltage_kV=300.0,
        cs_mm=2.7, amp_contrast=0.1, dtype=torch.float64,
    )  # fmt: skip
    # At DC, CTF = -w (no phase shift); rotationally symmetric without astigmatism.
    D = 64
    c = compute_ctf(freq_grid_2d(D, dtype=torch.float64), 1.0, p)[0]
    assert float(c[D // 2, D // 2]) == pytest.approx(-0.1)
    assert torch.allclose(c, c.transpose(0, 1), atol=1e-12)
    # First zero of an aberration-free CTF is where sqrt(1-w^2) sin(g) = w cos(g).
    p0 = CTFParams.from_arrays(
        defocus_u_A=20000.0, defocus_v_A=20000.0, astig_angle_deg=0.0, voltage_kV=300.0,
        cs_mm=0.0, amp_contrast=0.1, dtype=torch.float64,
    )  # fmt: skip
    lam = float(electron_wavelength_A(300.0))
    g0 = math.atan2(0.1, math.sqrt(1 - 0.01)) - math.pi  # gamma < 0 for underfocus
    s0 = math.sqrt(-g0 / (math.pi * 20000.0 * lam))
    vals = compute_ctf(torch.tensor([[s0, 0.0]], dtype=torch.float64), 1.0, p0)
    assert abs(float(vals[0, 0])) < 1e-9
    # Astigmatism: along the U axis the defocus is dfU, along V it is dfV.
    pa = CTFParams.from_arrays(
        defocus_u_A=25000.0, defocus_v_A=15000.0, astig_angle_deg=30.0, voltage_kV=300.0,
        cs_mm=0.0, amp_contrast=0.0, dtype=torch.float64,
    )  # fmt: skip
    a = math.radians(30.0)
    s = 0.05
    u = torch.tensor([[s * math.cos(a), s * math.sin(a)]], dtype=torch.float64)
    v = torch.tensor([[-s * math.sin(a), s * math.cos(a)]], dtype=torch.float64)
    assert float(compute_ctf(u, 1.0, pa)[0, 0]) == pytest.approx(
        math.sin(-math.pi * 25000.0 * lam * s * s)
    )
    assert float(compute_ctf(v, 1.0, pa)[0, 0]) == pytest.approx(
        math.sin(-math.pi * 15000.0 * lam * s * s)
    )


def test_from_table_uses_degrees_and_indices() -> None:
    table = SimpleNamespace(
        source_path="x.star",
        ctf={
            "defocus_u_A": np.array([10000.0, 20000.0, 30000.0]),
            "defocus_v_A": np.array([9000.0, 19000.0, 29000.0]),
            "astig_angle_deg": np.array([0.0, 90.0, 180.0]),
            "voltage_kV": np.array([300.0, 300.0, 200.0]),
            "cs_mm": np.array([2.7, 2.7, 2.0]),
            "amp_contrast": np.array([0.1, 0.1, 0.07]),
            "phase_shift_deg": np.array([0.0, 0.0, 90.0]),
        },
    )
    p = CTFParams.from_table(table, np.array([2, 1]))
    assert len(p) == 2
    assert torch.allclose(p.astig_angle_rad, torch.tensor([math.pi, math.pi / 2]))
    assert torch.allclose(p.phase_shift_rad, torch.tensor([math.pi / 2, 0.0]))
    assert torch.equal(p.bfactor_A2, torch.zeros(2))
    assert torch.equal(p.voltage_kV, torch.tensor([200.0, 300.0]))


def test_sign_is_minus_relion_getctf() -> None:
    """RELION's CTF::getCTF (ctf.h/ctf.cpp), written out here, equals -compute_ctf.

    RELION: defocus_average = -(dU + dV)/2, defocus_deviation = -(dU - dV)/2,
    K1 = pi lambda, K2 = pi/2 Cs lambda^3, K3 = sqrt(1 - Q0^2), K5 = phase shift,
    argument = K1 deltaf u^2 + K2 u^4 - K5, retval = -(K3 sin(argument) - Q0 cos(argument)).
    So our CTF (as cryoDRGN; docs/dev/contracts.md) models dark-on-light images; RELION's the
    light-on-dark ones (docs/backproject.md, "Contrast").
    """
    dU, dV, ang, kv, cs, q0, ps = 18000.0, 16500.0, 25.0, 300.0, 2.7, 0.07, 20.0
    lam = 12.2643247 / math.sqrt(kv * 1e3 * (1 + kv * 1e3 * 0.978466e-6))
    D, apix = 40, 1.2
    freqs = freq_grid_2d(D, dtype=torch.float64)
    X, Y = freqs[..., 0].numpy() / apix, freqs[..., 1].numpy() / apix
    u2 = X**2 + Y**2
    deltaf = -(dU + dV) / 2 - (dU - dV) / 2 * np.cos(2 * (np.arctan2(Y, X) - np.deg2rad(ang)))
    arg = np.pi * lam * deltaf * u2 + np.pi / 2 * cs * 1e7 * lam**3 * u2**2 - np.deg2rad(ps)
    relion = -(math.sqrt(1 - q0**2) * np.sin(arg) - q0 * np.cos(arg))
    p = CTFParams.from_arrays(
        defocus_u_A=dU, defocus_v_A=dV, astig_angle_deg=ang, voltage_kV=kv, cs_mm=cs,
        amp_contrast=q0, phase_shift_deg=ps, dtype=torch.float64,
    )  # fmt: skip
    ours = compute_ctf(freqs, apix, p)[0].numpy()
    assert np.allclose(ours, -relion, atol=1e-9)
