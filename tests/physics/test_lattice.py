"""Frequency and radius lattices match the index convention k = (i - D//2) / D."""

from __future__ import annotations

import numpy as np
import torch

from cryofield.physics import fourier, lattice


def test_freq_grid_2d_values() -> None:
    D = 8
    g = lattice.freq_grid_2d(D)
    assert g.shape == (D, D, 2)
    assert g[D // 2, D // 2].abs().sum() == 0
    assert torch.allclose(g[3, 6], torch.tensor([(6 - 4) / 8, (3 - 4) / 8]))
    assert g.min() == -0.5 and g.max() == 0.375


def test_freq_grid_3d_values_and_plane_wave() -> None:
    D = 8
    g = lattice.freq_grid_3d(D)
    assert torch.allclose(g[1, 2, 7], torch.tensor([3 / 8, -2 / 8, -3 / 8]))
    # A plane wave exp(2 pi i k0 . r) transforms to a delta at the voxel whose grid value
    # is k0, which proves the (x, y, z) <-> (last, middle, first axis) order.
    k0 = torch.tensor([2 / 8, -1 / 8, 3 / 8], dtype=torch.float64)
    c = lattice.coords_1d(D, dtype=torch.float64)
    rz, ry, rx = torch.meshgrid(c, c, c, indexing="ij")
    wave = torch.exp(2j * torch.pi * (k0[0] * rx + k0[1] * ry + k0[2] * rz))
    f = fourier.fft3_centered(wave)
    peak = np.unravel_index(int(f.abs().argmax()), f.shape)
    assert torch.allclose(g.double()[peak], k0)


def test_radial_and_masks() -> None:
    D = 10
    r = lattice.radial_index_2d(D)
    assert r[5, 5] == 0 and torch.isclose(r[2, 9], torch.tensor(5.0))
    m = lattice.circle_mask_2d(D, 3.0)
    assert m.sum() == int((r <= 3.0).sum()) == 29
    r3 = lattice.radial_index_3d(D)
    assert torch.isclose(r3[5 + 1, 5 + 2, 5 + 2], torch.tensor(3.0))
    assert lattice.sphere_mask_3d(D, 1.0).sum() == 7
