"""Back-projection with known poses, CTF and shifts recovers the volume."""

from __future__ import annotations

import pytest
import torch

from cryofield.physics import fourier as fo
from cryofield.physics import lattice
from cryofield.physics import rotation as rot
from cryofield.physics import shift as sh
from cryofield.physics import slicing as sl
from cryofield.physics.backproject import FourierBackprojector, reconstruct_fourier
from cryofield.physics.ctf import CTFParams, compute_ctf
from cryofield.physics.fsc import fsc

D = 32
APIX_A = 4.0


def _ctf_params(n: int, g: torch.Generator) -> CTFParams:
    dfu = 5000.0 + 10000.0 * torch.rand(n, generator=g, dtype=torch.float64)
    return CTFParams.from_arrays(
        defocus_u_A=dfu.numpy(),
        defocus_v_A=(dfu - 400.0).numpy(),
        astig_angle_deg=(180 * torch.rand(n, generator=g)).numpy(),
        voltage_kV=300.0,
        cs_mm=2.7,
        amp_contrast=0.1,
    )


@pytest.fixture(scope="module")
def dataset(blobs32: torch.Tensor):
    """1000 noiseless real-space projections with CTF and sub-pixel shifts."""
    n = 1000
    g = torch.Generator().manual_seed(7)
    R = rot.random_rotations(n, g)
    proj = sl.project_real_space(blobs32, R, chunk_size=100)
    params = _ctf_params(n, g)
    ctf = compute_ctf(lattice.freq_grid_2d(D), APIX_A, params)
    shifts = 3.0 * torch.randn(n, 2, generator=g)
    f = sh.phase_shift_fourier(fo.fft2_centered(proj) * ctf, shifts)
    return fo.ifft2_centered(f).real.float(), R, shifts, params


def test_backprojection_recovers_volume(dataset, blobs32: torch.Tensor) -> None:
    images, R, shifts, params = dataset
    rec = reconstruct_fourier(images, R, shifts, params, APIX_A)
    curve = fsc(rec, blobs32)
    assert (curve[1 : D // 4 + 1] > 0.9).all(), curve  # up to half Nyquist
    assert curve[1 : D // 2].min() > 0.9, curve
    # The mirror image (z flipped) of a chiral volume scores clearly worse.
    mirror = fsc(rec.flip(0), blobs32)
    assert mirror[2 : D // 4 + 1].mean() < 0.3, mirror
    # Ignoring the shifts or the CTF degrades the map: both are really used.
    no_shift = fsc(reconstruct_fourier(images, R, None, params, APIX_A, pad_factor=1), blobs32)
    no_ctf = fsc(reconstruct_fourier(images, R, shifts, None, APIX_A, pad_factor=1), blobs32)
    assert no_shift[4 : D // 2].mean() < 0.5, no_shift
    assert no_ctf[4 : D // 2].mean() < 0.5, no_ctf
    # Contrast and scale: at low frequency the map has the right sign and amplitude.
    dot = float((rec * blobs32).sum() / (blobs32 * blobs32).sum())
    assert 0.85 < dot < 1.1, dot


def test_amplitudes_exact_for_fourier_projections(make_blobs) -> None:
    # Projections computed as slices of a finely sampled (3x padded) transform are
    # band-limited; the reconstruction then matches the volume voxel by voxel.
    vol = make_blobs(D, 0.5)
    P = 3 * D
    vol_ft = fo.fft3_centered(torch.nn.functional.pad(vol, [(P - D) // 2] * 6))
    R = rot.random_rotations(500, torch.Generator().manual_seed(3))
    freqs = lattice.freq_grid_2d(D).reshape(-1, 2)
    imgs = fo.ifft2_centered(sl.extract_slices(vol_ft, R, freqs).reshape(-1, D, D)).real
    rec = reconstruct_fourier(imgs, R)
    rel = float((rec - vol).norm() / vol.norm())
    assert rel < 0.05, rel
    rec1 = reconstruct_fourier(imgs, R, pad_factor=1)
    rel1 = float((rec1 - vol).norm() / vol.norm())
    assert rel < rel1 < 0.2, (rel, rel1)  # padding (oversampling) is more accurate


def test_chunked_accumulation_matches_single_call(dataset) -> None:
    images, R, shifts, params = dataset
    n = 300
    sub = params.subset(slice(0, n))
    full = reconstruct_fourier(images[:n], R[:n], shifts[:n], sub, APIX_A, pad_factor=1)
    bp = FourierBackprojector(D, pad_factor=1)
    for start in (0, 100, 250):
        stop = {0: 100, 100: 250, 250: n}[start]
        sub = params.subset(slice(start, stop))
        ctf = compute_ctf(bp.ctf_freqs(), APIX_A, sub)
        bp.add(images[start:stop], R[start:stop], shifts[start:stop], ctf)
    assert bp.n_images == n
    assert torch.allclose(bp.volume(), full, atol=1e-4 * float(full.abs().max()))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="even"):
        FourierBackprojector(31)
    bp = FourierBackprojector(16)
    with pytest.raises(ValueError, match="images must be"):
        bp.add(torch.zeros(2, 8, 8), torch.eye(3).expand(2, 3, 3))


def test_without_removes_a_subset_exactly():
    """A back-projection of all images without those of a subset is the back-projection
    of the others (the sums are linear in the images)."""
    g = torch.Generator().manual_seed(0)
    D, n = 16, 12
    imgs = torch.randn(n, D, D, generator=g)
    R = rot.random_rotations(n, generator=g)
    t = torch.randn(n, 2, generator=g)
    every, some, rest = (FourierBackprojector(D) for _ in range(3))
    every.add(imgs, R, t)
    some.add(imgs[:5], R[:5], t[:5])
    rest.add(imgs[5:], R[5:], t[5:])
    out = every.without(some)
    assert out.n_images == n - 5
    assert torch.allclose(out.volume(), rest.volume(), atol=1e-4 * float(rest.volume().abs().max()))
    with pytest.raises(ValueError, match="sizes"):
        every.without(FourierBackprojector(D + 2))
