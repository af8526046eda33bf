"""Soft masks of focused heterogeneity (``cryofield train --mask MASK.mrc``).

A mask is a map of values in ``[0, 1]`` (1: the region whose variability the latents
describe, 0: the rest, a soft edge in between) on the particles' box at their pixel size:
the usual RELION (``relion_mask_create``) and cryoSPARC (Volume Tools) mask files. A mask
already at the training box ``D`` is taken as it is; one on the particles' box is
Fourier-cropped to ``D`` (:func:`~cryofield.physics.filters.fourier_crop_3d`, the
band-limited resampling of the images' own cropping) and clipped to ``[0, 1]`` again (the
ringing of a hard edge).

Refused, each with one line naming the file (:class:`~cryofield.errors.InputFileError`):
a file that is not a 3-D map, a map that is not a cube, a cube of another size, values
that are not finite or lie outside ``[0, 1]`` by more than :data:`MASK_TOLERANCE` (a
map, not a mask, was given), and a mask that is zero everywhere (before or after
resampling). A header pixel size that differs from the particles' by more than 1% is
logged as a warning (many tools write none or a wrong one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cryofield.errors import InputFileError
from cryofield.logs import get_logger

__all__ = ["MASK_TOLERANCE", "mask_fraction", "read_mask"]

_log = get_logger("io")

#: how far outside ``[0, 1]`` a mask value may lie (interpolation and ringing of resampled
#: masks) before the file is refused as not a mask
MASK_TOLERANCE = 0.05


def read_mask(
    path: str | Path, box_px: int, D: int | None = None, apix_A: float | None = None
) -> np.ndarray:
    """The mask in ``path`` at the training box: ``(D, D, D)`` float32 in ``[0, 1]``.

    Parameters
    ----------
    path
        MRC file of the mask.
    box_px
        The particles' box (px): the size the mask must have (or ``D``).
    D
        Training box (None: ``box_px``).
    apix_A
        The particles' pixel size (A) at ``box_px``, for the header check (None: none).

    Raises
    ------
    InputFileError
        Not a cubic 3-D map of ``box_px`` (or ``D``) voxels, values outside ``[0, 1]``
        (module docstring) or all zero.
    """
    from cryofield.io.mrc import read_mrc

    D = int(box_px if D is None else D)
    arr, info = read_mrc(path, mmap=False)
    vol = np.asarray(arr, dtype=np.float32)
    if vol.ndim != 3 or vol.shape[0] == 1:
        raise InputFileError(path, f"a mask must be a 3-D map, got shape {vol.shape}")
    if len(set(vol.shape)) != 1:
        raise InputFileError(path, f"a mask must be a cube, got shape {vol.shape} (z, y, x)")
    side = vol.shape[0]
    if side not in (int(box_px), D):
        other = f" or {D}^3 (the training box)" if D != int(box_px) else ""
        raise InputFileError(
            path, f"a {side}^3 mask does not fit the particles: expected {box_px}^3 (their box, "
            f"at their pixel size){other}"
        )  # fmt: skip
    if not np.isfinite(vol).all():
        raise InputFileError(path, "the mask holds non-finite values (NaN or inf)")
    lo, hi = float(vol.min()), float(vol.max())
    if lo < -MASK_TOLERANCE or hi > 1 + MASK_TOLERANCE:
        raise InputFileError(
            path, f"mask values must lie in [0, 1] (a soft mask, not a map); found "
            f"{lo:.4g} to {hi:.4g}"
        )  # fmt: skip
    if hi <= 0:
        raise InputFileError(path, "the mask is zero everywhere")
    if apix_A and side == int(box_px) and info.apix_A > 0:
        if abs(info.apix_A - apix_A) > 0.01 * apix_A:
            _log.warning(
                "%s: the mask's header says %.4g A/px, the particles %.4g A/px; the mask is "
                "used on the particles' grid", path, info.apix_A, apix_A,
            )  # fmt: skip
    vol = np.clip(vol, 0.0, 1.0)
    if side != D:
        from cryofield.physics.filters import fourier_crop_3d

        if side % 2 or D % 2 or D > side:
            raise InputFileError(path, f"cannot resample a {side}^3 mask to the training box {D}")
        vol = fourier_crop_3d(torch.as_tensor(vol, dtype=torch.float64), D).numpy()
        vol = np.clip(vol, 0.0, 1.0).astype(np.float32)
        if float(vol.max()) < MASK_TOLERANCE:  # all of it below one voxel of the box
            raise InputFileError(path, f"the mask vanishes at the training box {D} (too small)")
    return np.ascontiguousarray(vol, dtype=np.float32)


def mask_fraction(mask: np.ndarray | torch.Tensor) -> float:
    """Volume fraction of a soft mask: the mean of its values (1: the whole box)."""
    return float(torch.as_tensor(mask).double().mean())
