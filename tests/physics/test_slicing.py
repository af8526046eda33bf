"""Fourier slice theorem: real-space projections vs central slices of the 3-D transform."""

from __future__ import annotations

import math

import torch

from cryofield.physics import fourier as fo
from cryofield.physics import lattice
from cryofield.physics import rotation as rot
from cryofield.physics import slicing as sl


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalised complex correlation per row, ``(N, M) x (N, M) -> (N,)``."""
    num = (a * b.conj()).sum(-1).real
    return num / torch.sqrt((a.abs() ** 2).sum(-1) * (b.abs() ** 2).sum(-1))


def test_fourier_slice_theorem(blobs64: torch.Tensor) -> None:
    D = 64
    R = rot.random_rotations(5, torch.Generator().manual_seed(11))
    proj = sl.project_real_space(blobs64, R)  # independent: grid_sample + sum over z
    f_proj = fo.fft2_centered(proj)
    low = lattice.radial_index_2d(D) < 16  # |k| < 1/4 cycles/px
    # Slices of the 2x zero-padded transform, sampled at the image's frequencies.
    padded = torch.nn.functional.pad(blobs64, [D // 2] * 6)
    vol_ft = fo.fft3_centered(padded)
    freqs = lattice.freq_grid_2d(D).reshape(-1, 2)
    slices = sl.extract_slices(vol_ft, R, freqs).reshape(5, D, D)
    c = _corr(f_proj[:, low], slices[:, low])
    assert (c > 0.999).all(), c
    power_ratio = (f_proj[:, low].abs() ** 2).sum(-1) / (slices[:, low].abs() ** 2).sum(-1)
    assert ((power_ratio - 1).abs() < 0.05).all(), power_ratio
    # Unpadded transform: still > 0.99 (trilinear interpolation error only).
    direct = sl.extract_slices(fo.fft3_centered(blobs64), R)
    assert (_corr(f_proj[:, low], direct[:, low]) > 0.99).all()
    # The transposed convention (slice at R [k, 0]) is wrong for asymmetric volumes.
    wrong = sl.extract_slices(vol_ft, R.transpose(-1, -2), freqs).reshape(5, D, D)
    assert _corr(f_proj[:, low], wrong[:, low]).mean() < 0.8


def test_projection_geometry_known_pose() -> None:
    # A single off-centre Gaussian at (x, y, z) = (6, 0, 0): with rot = 90 deg the
    # projection must put it at R [6, 0, 0] = (0, -6) in the image (x, y).
    D = 32
    c = lattice.coords_1d(D, dtype=torch.float64)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.exp(-((x - 6) ** 2 + y**2 + z**2) / 4.0)
    R = rot.euler_relion_to_matrix(torch.tensor([[math.pi / 2, 0.0, 0.0]], dtype=torch.float64))
    img = sl.project_real_space(vol, R)[0]
    iy, ix = divmod(int(img.argmax()), D)
    assert (ix - D // 2, iy - D // 2) == (0, -6)
    img_f = fo.ifft2_centered(sl.extract_slices(fo.fft3_centered(vol), R)[0]).real
    iy, ix = divmod(int(img_f.argmax()), D)
    assert (ix - D // 2, iy - D // 2) == (0, -6)


def test_extract_slices_identity_and_exact_lattice() -> None:
    D = 16
    v = torch.randn(D, D, D, dtype=torch.complex64)
    eye = torch.eye(3)[None]
    s = sl.extract_slices(v, eye)
    assert torch.allclose(s[0], v[D // 2])  # kz = 0 plane
    # 90 deg about z permutes lattice points exactly.
    Rz = rot.inplane_rotation(torch.tensor([math.pi / 2]))
    s90 = sl.extract_slices(v.real.contiguous(), Rz)[0]
    # [kx, ky, 0] @ Rz = [-ky, kx, 0]: out[y, x] = v[D/2, x_idx = D - y, y_idx = x].
    for iy, ix in [(3, 5), (8, 8), (12, 1)]:
        assert torch.isclose(s90[iy, ix], v.real[D // 2, ix, (D - iy) % D])
    # Outside the grid is zero: frequencies beyond the corner.
    far = sl.extract_slices(v.real.contiguous(), eye, torch.tensor([[0.7, 0.0]]))
    assert far.abs().max() == 0


def test_extract_slices_trilinear_midpoints_and_batched_volumes() -> None:
    D = 8
    # A linear function of the indices is reproduced exactly by trilinear interpolation.
    i = torch.arange(D, dtype=torch.float64)
    vz, vy, vx = torch.meshgrid(i, i, i, indexing="ij")
    lin = 2 * vx - 3 * vy + 0.5 * vz
    R = rot.random_rotations(6, torch.Generator().manual_seed(1), dtype=torch.float64)
    freqs = torch.rand(40, 2, dtype=torch.float64) * 0.5 - 0.25
    got = sl.extract_slices(lin, R, freqs)
    pts = sl.slice_coordinates(R, freqs) * D + D // 2
    want = 2 * pts[..., 0] - 3 * pts[..., 1] + 0.5 * pts[..., 2]
    assert torch.allclose(got, want, atol=1e-10)
    # One volume per pose gives the same as separate calls.
    vols = torch.randn(6, D, D, D, dtype=torch.float64)
    batched = sl.extract_slices(vols, R, freqs)
    single = torch.cat([sl.extract_slices(vols[k], R[k : k + 1], freqs) for k in range(6)])
    assert torch.allclose(batched, single)


def test_extract_slices_gradients(make_blobs) -> None:
    D = 8
    vol = torch.randn(D, D, D, dtype=torch.float64, requires_grad=True)
    R = rot.random_rotations(2, torch.Generator().manual_seed(2), dtype=torch.float64)
    freqs = torch.rand(6, 2, dtype=torch.float64) * 0.6 - 0.3
    assert torch.autograd.gradcheck(lambda v: sl.extract_slices(v, R, freqs), (vol,))
    # Gradient with respect to the pose (6-D representation), away from voxel faces.
    d6 = rot.matrix_to_rotation_6d(R).clone().requires_grad_(True)
    smooth = make_blobs(D, 0.125, dtype=torch.float64)
    out = sl.extract_slices(smooth, rot.rotation_6d_to_matrix(d6), freqs).sum()
    (g,) = torch.autograd.grad(out, d6)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
