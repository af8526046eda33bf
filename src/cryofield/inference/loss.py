"""The training loss and its per-image numbers.

Loss (all gradient phases): the squared error between the centred image and the
CTF-weighted central slice of the field, in Hartley space, on the frequencies inside the
current radius:

``L = mean_k (H[X_i exp(2 pi i k.t_i)](k) - C_i(k) V_theta([kx, ky, 0] R_i, z_i))^2``

which equals the Fourier-space L2 error by Parseval; the field is queried directly at the
slice points (exact and differentiable in ``R_i``). The search phase instead slices a voxel
grid of the field (:mod:`cryofield.inference.pose_search`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cryofield.inference.pose_search import centre_images, slice_grid
from cryofield.model.field import HartleyField

#: training has diverged when the loss (median of the last few batches) exceeds this
#: multiple of the loss at its first step. The loss is a data-fidelity term that starts
#: near the image power and decreases; a healthy run stays within a few times its start.
DIVERGENCE_FACTOR = 100.0


def slice_loss(
    field: HartleyField,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    z: torch.Tensor | None,
    images_ft: torch.Tensor,
    ctf: torch.Tensor,
    freqs: torch.Tensor,
) -> torch.Tensor:
    """Per-image Hartley-space L2 loss.

    Parameters
    ----------
    field
        The neural field.
    rotations
        ``(B, 3, 3)``.
    shifts_px
        ``(B, 2)``.
    z
        ``(B, zdim)`` or ``None``.
    images_ft
        ``(B, M)`` complex normalised image transforms at ``freqs``.
    ctf
        ``(B, M)``.
    freqs
        ``(M, 2)`` cycles/px.

    Returns
    -------
    torch.Tensor
        ``(B,)`` mean squared error per image.
    """
    coords = torch.einsum("mi,bij->bmj", freqs, rotations[:, :2, :])  # (B, M, 3)
    return _image_loss(field(coords, z).float(), images_ft, ctf, freqs, shifts_px)


def grid_loss(
    grid: torch.Tensor,
    D_grid: int,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    images_ft: torch.Tensor,
    ctf: torch.Tensor,
    freqs: torch.Tensor,
) -> torch.Tensor:
    """Per-image loss of :func:`slice_loss` with the field's slices read from a voxel grid.

    ``grid``: ``(Dc, Dc, Dc)`` centred Hartley grid of a homogeneous field
    (:meth:`HartleyField.grid_ht`, e.g. ``oversample=2``), voxel spacing ``1 / D_grid``
    cycles/px; slices are trilinear (:func:`~cryofield.inference.pose_search.slice_grid`),
    one grid evaluation for any number of images. Other arguments and the result as
    :func:`slice_loss`.
    """
    pred = slice_grid(grid, D_grid, rotations[:, None], freqs)[:, 0]
    return _image_loss(pred.float(), images_ft, ctf, freqs, shifts_px)


def _image_loss(
    pred: torch.Tensor,
    images_ft: torch.Tensor,
    ctf: torch.Tensor,
    freqs: torch.Tensor,
    shifts_px: torch.Tensor,
) -> torch.Tensor:
    """``(B,)`` mean of ``(H(X centred) - C pred)^2``: ``pred`` ``(B, M)`` Hartley values."""
    xc = centre_images(images_ft, freqs, shifts_px[:, None, :])[:, 0]
    obs = xc.real - xc.imag
    return ((obs - pred * ctf) ** 2).mean(-1)


def image_power(images_ft: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float32 mean ``|X|^2`` of each image on its points, on the images' device:
    the scale of its loss (with the loss, ``epoch_NNN/residuals.npz`` for the junk
    score)."""
    return (images_ft.real**2 + images_ft.imag**2).mean(-1).float()


def check_loss(
    loss: float, losses: list[float], start: float | None, epoch: int, batch: int
) -> None:
    """Raise :class:`FloatingPointError` (the epoch is rolled back) when the loss is not
    finite, has grown :data:`DIVERGENCE_FACTOR` times ``start``, its value at the start
    of training (median of this and the 4 batches before, so one odd batch does not
    count), or jumps 1000-fold above the median of this epoch's ``losses`` so far.
    ``batch`` is 0-based."""
    where = f"epoch {epoch}, batch {batch + 1}"
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss {loss} at {where}")
    recent = float(np.median([*losses[-4:], loss]))
    if start is not None and start > 0 and recent > DIVERGENCE_FACTOR * start:
        raise FloatingPointError(
            f"loss {recent:.3g} at {where} is {recent / start:.3g} times the loss at the "
            f"start of training ({start:.3g})"
        )
    if len(losses) > 10 and loss > 1e3 * float(np.median(losses)):
        raise FloatingPointError(f"loss {loss:.3g} at {where} is 1000 times this epoch's median")
