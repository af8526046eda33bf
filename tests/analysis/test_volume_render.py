"""Rendering and writing maps from a field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryofield.analysis import volumes
from cryofield.analysis.metrics import fsc_curve
from cryofield.io.mrc import read_mrc
from cryofield.model.field import HartleyField
from cryofield.physics.handedness import flip_hand_volume


@pytest.fixture(scope="module")
def field() -> HartleyField:
    torch.manual_seed(0)
    return HartleyField(D=16, apix_A=2.5, zdim=2, hidden=32, layers=1, n_freqs=8).eval()


def test_render_matches_field_and_options(field: HartleyField) -> None:
    zs = np.array([[0.0, 0.0], [1.0, -1.0]], np.float32)
    vols = volumes.render_volumes(field, zs, apix_A=2.5, progress=False)
    assert len(vols) == 2
    ref = field.render_volume(torch.tensor(zs[1])).numpy()
    np.testing.assert_allclose(vols[1], ref, atol=1e-6)
    assert np.abs(vols[0] - vols[1]).max() > 0  # z changes the map
    flipped = volumes.render_volumes(field, zs[1:], 2.5, flip_hand=True, progress=False)[0]
    np.testing.assert_allclose(flipped, flip_hand_volume(ref), atol=1e-6)
    with pytest.raises(ValueError, match="dimension"):
        volumes.render_volumes(field, np.zeros((1, 3)), 2.5)
    with pytest.raises(ValueError, match="heterogeneous"):
        volumes.render_volumes(field, None, 2.5)


def test_lowpass_removes_high_frequencies() -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(size=(32, 32, 32)).astype(np.float32)
    lp = volumes.lowpass_volume(v, cutoff_A=8.0, apix_A=1.0)  # 32 / 8 = shell 4
    f = fsc_curve(lp, v)
    assert f[:3].min() > 0.999
    F = np.abs(np.fft.fftshift(np.fft.fftn(lp)))
    c = np.arange(32) - 16
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    assert F[r > 5.5].max() < 1e-4 * F.max()


def test_write_series_pixel_size(field: HartleyField, tmp_path) -> None:
    zs = np.array([[0.5, 0.5], [0.0, 1.0], [1.0, 2.0]])
    paths = volumes.write_volume_series(field, zs, tmp_path, "vol_", apix_A=2.5)
    assert [p.name for p in paths] == ["vol_000.mrc", "vol_001.mrc", "vol_002.mrc"]
    vol, info = read_mrc(paths[2])
    assert info.apix_A == pytest.approx(2.5, rel=1e-5)
    assert vol.shape == (16, 16, 16)
    np.testing.assert_allclose(
        vol, field.render_volume(torch.tensor([1.0, 2.0])).numpy(), atol=1e-5
    )
    np.testing.assert_allclose(np.loadtxt(tmp_path / "vol_z.txt"), zs, atol=1e-5)
