"""Render maps from a trained field at chosen latent points and write them as .mrc.

Maps are rendered at the training box with ``HartleyField.render_volume`` and written
with the training pixel size (``io.mrc.write_mrc``). Optional post-processing: a Fourier
low-pass with a soft (raised-cosine) edge and the hand flip of
:func:`cryofield.physics.handedness.flip_hand_volume`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cryofield.io.mrc import write_mrc
from cryofield.physics.filters import soft_spherical_mask
from cryofield.physics.fourier import fft3_centered, ifft3_centered
from cryofield.physics.handedness import flip_hand_volume

__all__ = ["lowpass_volume", "render_volumes", "write_volume_series"]

log = logging.getLogger("cryofield.analysis.volumes")


def lowpass_volume(
    vol: np.ndarray, cutoff_A: float, apix_A: float, width_px: float = 2.0
) -> np.ndarray:
    """Low-pass a ``(D, D, D)`` map at resolution ``cutoff_A`` (raised-cosine edge).

    The filter is 1 below ``D apix / cutoff - width/2`` Fourier px, 0 above
    ``+ width/2``, with a cosine ramp between.
    """
    D = vol.shape[0]
    if cutoff_A <= 0:
        raise ValueError(f"low-pass cutoff must be > 0 A, got {cutoff_A}")
    r0 = D * apix_A / cutoff_A
    filt = soft_spherical_mask(D, r0 - width_px / 2, width_px, dtype=torch.float64)
    F = fft3_centered(torch.as_tensor(np.asarray(vol, np.float64)))
    return ifft3_centered(F * filt).real.numpy().astype(np.float32)


def render_volumes(
    field: torch.nn.Module,
    z_points: np.ndarray | None,
    apix_A: float,
    lowpass_A: float | None = None,
    flip_hand: bool = False,
    progress: bool = True,
    invert: bool = False,
) -> list[np.ndarray]:
    """Maps of ``field`` at latent points.

    Parameters
    ----------
    field : a ``HartleyField`` (eval mode).
    z_points : (K, zdim) latents, or None for one map of a homogeneous field.
    apix_A : pixel size of the training box (for the low-pass).
    lowpass_A : optional low-pass resolution (A).
    flip_hand : mirror the maps (z -> -z; ``invert``: p -> -p, which keeps the axes of
        every point group, :func:`~cryofield.physics.symmetry.mirror_keeps_axes`).

    Returns
    -------
    list of (D, D, D) float32 maps.
    """
    zdim = int(getattr(field, "zdim", 0))
    if z_points is None:
        if zdim > 0:
            raise ValueError(f"this field is heterogeneous (zdim={zdim}): give latent points")
        points: list[torch.Tensor | None] = [None]
    else:
        zp = np.atleast_2d(np.asarray(z_points, np.float32))
        if zdim == 0:
            raise ValueError("this field is homogeneous (zdim=0): latent points make no sense")
        if zp.shape[1] != zdim:
            raise ValueError(f"latent points have dimension {zp.shape[1]}, the field has {zdim}")
        points = [torch.as_tensor(p) for p in zp]
    out = []
    for z in tqdm(points, desc="volumes", disable=not progress or len(points) < 2, leave=False):
        vol = field.render_volume(z).numpy().astype(np.float32)
        if lowpass_A is not None:
            vol = lowpass_volume(vol, lowpass_A, apix_A)
        if flip_hand:
            vol = np.asarray(flip_hand_volume(vol, invert=invert))
        out.append(vol)
    return out


def write_volume_series(
    field: torch.nn.Module,
    z_points: np.ndarray | None,
    outdir: str | Path,
    prefix: str,
    apix_A: float,
    lowpass_A: float | None = None,
    flip_hand: bool = False,
    invert: bool = False,
) -> list[Path]:
    """Render maps at ``z_points`` and write ``OUTDIR/<prefix>NNN.mrc`` (atomically).

    Also writes ``OUTDIR/<prefix>z.txt`` with the latent points, one per line.

    Returns
    -------
    list of the written .mrc paths, in order.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    vols = render_volumes(
        field, z_points, apix_A, lowpass_A=lowpass_A, flip_hand=flip_hand, invert=invert
    )
    paths = []
    for i, vol in enumerate(vols):
        paths.append(write_mrc(outdir / f"{prefix}{i:03d}.mrc", vol, apix_A))
    if z_points is not None:
        from cryofield.io.atomic import write_text_atomic

        zp = np.asarray(z_points, np.float64).reshape(len(vols), -1)
        write_text_atomic(
            outdir / f"{prefix}z.txt",
            "".join(" ".join(f"{v:.6g}" for v in row) + "\n" for row in zp),
        )
    log.info("wrote %d map(s) to %s", len(paths), outdir)
    return paths
