"""Rigid map alignment recovers a known rotation, translation and hand."""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from cryofield.analysis import align, metrics


def _blobs(D: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = np.arange(D) - D // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    p = np.stack([x, y, z], -1).astype(np.float64)
    centres = rng.normal(size=(6, 3)) * D / 7
    vol = sum(np.exp(-((p - cc) ** 2).sum(-1) / (2 * (D / 16) ** 2)) for cc in centres)
    return vol.astype(np.float32)


def _angle_deg(A: np.ndarray, B: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(A.T @ B) - 1) / 2, -1, 1))))


def test_rotate_volume_convention() -> None:
    """``rotate_volume(V, R)(p) = V(R^T p)``: a blob at c moves to R c."""
    D = 32
    c = np.arange(D) - D // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    centre = np.array([6.0, -3.0, 2.0])
    vol = np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / 8.0)
    R = Rotation.from_euler("zyx", [40, 20, -30], degrees=True).as_matrix()
    out = align.rotate_volume(torch.tensor(vol, dtype=torch.float32), torch.tensor(R)[None])[0]
    w = out.numpy().astype(np.float64)
    com = np.array([(w * x).sum(), (w * y).sum(), (w * z).sum()]) / w.sum()
    np.testing.assert_allclose(com, R @ centre, atol=0.05)


def test_mirror_volume_is_z_flip() -> None:
    vol = _blobs(16, 0)
    m = align.mirror_volume(vol)
    D = 16
    for z in range(1, D):
        np.testing.assert_array_equal(m[z], vol[(D - z) % D])
    np.testing.assert_array_equal(align.mirror_volume(m), vol)


def test_align_recovers_rotation_shift_and_hand() -> None:
    D = 24
    V = _blobs(D, 1)
    G = Rotation.random(random_state=2).as_matrix()
    W = align.rotate_volume(torch.tensor(V), torch.tensor(G.T)[None])[0].numpy()  # W(p)=V(Gp)
    W = np.roll(W, (2, -1, 1), axis=(0, 1, 2))
    res = metrics.align_volume(W, V)
    assert not res.mirrored
    assert _angle_deg(res.rotation, G) < 1.5
    assert res.correlation > 0.99
    np.testing.assert_allclose(res.shift_px, -G @ np.array([1.0, -1.0, 2.0]), atol=0.5)
    fsc = metrics.fsc_curve(res.aligned, V)
    assert fsc[: D // 4].min() > 0.95
    res_m = metrics.align_volume(align.mirror_volume(W), V)
    assert res_m.mirrored
    assert _angle_deg(res_m.rotation, G) < 1.5
    assert res_m.correlation > 0.99


def test_spline_rotation_agrees_with_trilinear_and_keeps_high_frequencies() -> None:
    """Same geometry as the trilinear rotation, with less high-frequency loss."""
    from cryofield.analysis.align import rotate_volume, rotate_volume_spline
    from cryofield.physics.fsc import fsc
    from cryofield.physics.rotation import random_rotations

    D = 32
    g = torch.Generator().manual_seed(1)
    vol = torch.randn(D, D, D, generator=g)
    R = random_rotations(1, generator=g)[0].double().numpy()
    spline = rotate_volume_spline(vol, R)
    tri = rotate_volume(vol, torch.as_tensor(R)[None])[0]
    inside = torch.stack(torch.meshgrid(*[torch.arange(D) - D // 2] * 3, indexing="ij")) ** 2
    inside = inside.sum(0) < (D // 2 - 2) ** 2
    assert np.corrcoef(spline[inside].numpy(), tri[inside].numpy())[0, 1] > 0.8
    # rotating back: the spline round trip keeps the white-noise map's high shells
    back_s = rotate_volume_spline(spline, R.T)
    back_t = rotate_volume(tri, torch.as_tensor(R.T)[None])[0]
    hi = slice(D // 4, D // 2 - 2)
    assert (
        fsc(back_s * inside, vol * inside)[hi].mean()
        > fsc(back_t * inside, vol * inside)[hi].mean() + 0.01
    )


def test_align_a_noisy_off_centre_map() -> None:
    """A map with noise over the whole box and its object off the box centre (as a
    back-projection from few images): the positive noise pulls the centre of mass
    towards the box centre, and a rotation refined about that wrong centre at zero shift
    lands in a wrong optimum. Refined at each rotation's best shift, it is found."""
    D = 32
    V = _blobs(D, 3)
    G = Rotation.random(random_state=4).as_matrix()
    W = align.rotate_volume(torch.tensor(V), torch.tensor(G.T)[None])[0].numpy()
    W = np.roll(W, (4, -3, 3), axis=(0, 1, 2))
    W = W + np.random.default_rng(0).normal(scale=0.5 * W.std(), size=W.shape).astype(np.float32)
    res = metrics.align_volume(W, V)
    assert not res.mirrored
    assert _angle_deg(res.rotation, G) < 3.0
    assert metrics.fsc_curve(res.aligned, V)[: D // 8].min() > 0.9  # beyond: the noise
