"""Soft masks of focused heterogeneity: reading, resampling to the training box, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryofield.errors import InputFileError
from cryofield.io.mask import MASK_TOLERANCE, mask_fraction, read_mask
from cryofield.io.mrc import write_mrc


def _sphere(D: int, radius: float, soft: float = 3.0, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    c = np.arange(D) - D // 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    r = np.sqrt((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (zz - centre[2]) ** 2)
    t = np.clip((r - radius) / soft, 0, 1)
    return (0.5 * (1 + np.cos(np.pi * t))).astype(np.float32)


def test_a_mask_on_the_particles_box_is_resampled_to_the_training_box(tmp_path):
    m = _sphere(32, 6.0, centre=(4.0, -2.0, 0.0))
    path = write_mrc(tmp_path / "mask.mrc", m, 2.0)
    same = read_mask(path, 32, 32, 2.0)
    np.testing.assert_allclose(same, m)
    small = read_mask(path, 32, 16, 2.0)
    assert small.shape == (16, 16, 16) and small.dtype == np.float32
    assert small.min() >= 0 and small.max() <= 1
    # the same region at half the sampling: the same volume fraction, the same place
    assert abs(mask_fraction(small) - mask_fraction(m)) < 0.1 * mask_fraction(m)
    c = np.arange(16) - 8.0
    com = [float((small * c[None, None, :]).sum()), float((small * c[None, :, None]).sum()),
           float((small * c[:, None, None]).sum())] / small.sum()  # fmt: skip
    np.testing.assert_allclose(com, [2.0, -1.0, 0.0], atol=0.05)
    # a mask already at the training box is taken as it is
    p16 = write_mrc(tmp_path / "m16.mrc", _sphere(16, 3.0), 4.0)
    np.testing.assert_allclose(read_mask(p16, 32, 16), _sphere(16, 3.0))


def test_a_hard_binary_mask_is_clipped_to_0_1_after_cropping(tmp_path):
    m = (_sphere(32, 6.0, soft=0.5) > 0.5).astype(np.float32)
    out = read_mask(write_mrc(tmp_path / "bin.mrc", m, 1.0), 32, 16)
    assert out.min() >= 0 and out.max() <= 1 and out.max() > 0.9
    assert mask_fraction(torch.as_tensor(out)) == pytest.approx(mask_fraction(out))


def test_values_slightly_outside_0_1_are_clipped(tmp_path):
    m = _sphere(16, 4.0) * (1 + MASK_TOLERANCE / 2) - MASK_TOLERANCE / 4
    out = read_mask(write_mrc(tmp_path / "m.mrc", m, 1.0), 16)
    assert out.min() == 0.0 and out.max() == 1.0


@pytest.mark.parametrize(
    "vol, box, msg",
    [
        (np.zeros((16, 16, 8), np.float32), 16, "must be a cube"),
        (np.zeros((1, 16, 16), np.float32), 16, "must be a 3-D map"),
        (_sphere(24, 4.0), 16, "expected 16^3 (their box"),
        (_sphere(16, 4.0) * 5.0, 16, "must lie in [0, 1]"),
        (_sphere(16, 4.0) - 0.5, 16, "must lie in [0, 1]"),
        (np.zeros((16, 16, 16), np.float32), 16, "zero everywhere"),
    ],
)
def test_bad_masks_are_refused_on_one_line_naming_the_file(tmp_path, vol, box, msg):
    path = write_mrc(tmp_path / "bad.mrc", vol, 1.0)
    with pytest.raises(InputFileError) as err:
        read_mask(path, box, 8)
    text = str(err.value)
    assert msg in text and str(path) in text and "\n" not in text


def test_non_finite_values_and_a_missing_file_are_refused(tmp_path):
    m = _sphere(16, 4.0)
    m[0, 0, 0] = np.nan
    with pytest.raises(InputFileError, match="non-finite"):
        read_mask(write_mrc(tmp_path / "nan.mrc", m, 1.0), 16)
    with pytest.raises(InputFileError, match="not found"):
        read_mask(tmp_path / "missing.mrc", 16)


def test_a_mask_that_vanishes_at_the_training_box_is_refused(tmp_path):
    m = np.zeros((32, 32, 32), np.float32)
    m[3, 5, 7] = 1.0  # one voxel: its peak falls to (8 / 32)^3 ~ 0.016 at 8 px
    with pytest.raises(InputFileError, match="vanishes"):
        read_mask(write_mrc(tmp_path / "dot.mrc", m, 1.0), 32, 8)
