"""Balanced early search: a prior against piling the images onto a few viewing directions.

In the first epochs of an ab initio search the map is a blur, and the hard assignment of
the search sends most images to the few directions where that map's projection is
strongest; the field then learns those views and the next images follow them (the
"two antipodal blobs" of :func:`cryofield.inference.diagnostics.view_coverage`, measured
on the robustness benchmark: every view within ~35 deg of one axis after the first epoch).
The balance keeps, per viewing-direction cell of the level-0 search grid (HEALPix, 192
cells of ~15 deg by default), how many images have their current pose there, and ranks
every level-0 rotation with a penalty ``strength * max(0, log(r))`` nats, ``r`` the cell's
share of the images over an even share (with a pseudo-count of ``PSEUDO_COUNT`` images per
cell): an image whose likelihood barely prefers a crowded direction goes elsewhere, an
image whose likelihood clearly prefers it stays. It is the equipartition constraint of
self-labelling clustering (Asano et al. 2020, ICLR, "Self-labelling via simultaneous
clustering and representation learning"; Caron et al. 2020, NeurIPS, SwAV) applied as a
soft, decaying prior, so that a real preferred orientation survives once the map is
formed (the strength falls to 0 over the first part of the search:
``TrainConfig.search_balance``, ``search_balance_fraction``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from cryofield.physics.so3_grid import direction_pixels, grid_size

#: images added to every cell's count (keeps the first batches' shares from swinging)
PSEUDO_COUNT = 5.0


def balance_strength(strength: float, fraction: float, search_epochs: int, epoch: int) -> float:
    """Strength of the balance in search epoch ``epoch`` (1-based): ``strength`` in the
    first epoch, falling linearly to 0 at epoch ``1 + n``, ``n = max(2, ceil(fraction *
    search_epochs))``; 0 when ``strength <= 0``."""
    if strength <= 0 or fraction <= 0:
        return 0.0
    n = max(2, math.ceil(fraction * search_epochs))
    return float(strength * max(0.0, 1.0 - (epoch - 1) / n))


class DirectionBalance:
    """Occupancy of the viewing-direction cells by the images' current poses.

    Parameters
    ----------
    n_images
        Rows of the pose table.
    strength
        Penalty (nats) per unit of ``log`` occupancy ratio.
    rotations
        ``(N, 3, 3)`` poses to count from the start, or ``None``: no image counted yet
        (the first search epoch, whose starting poses are not search results).
    """

    def __init__(self, n_images: int, strength: float, rotations: torch.Tensor | None = None):
        self.strength = float(strength)
        self.cells = grid_size(0)[0]
        self.cell = np.full(n_images, -1, np.int64)
        self.counts = np.zeros(self.cells, np.float64)
        if rotations is not None:
            self.update(np.arange(n_images), rotations)

    @staticmethod
    def cells_of(rotations: torch.Tensor) -> np.ndarray:
        """``(B,)`` cell of each pose ``(B, 3, 3)``: the HEALPix cell (level 0) of its
        viewing direction ``R^T e_z`` (the third row, docs/dev/contracts.md)."""
        return direction_pixels(rotations[:, 2, :], 0)

    def update(
        self,
        rows: np.ndarray,
        rotations: torch.Tensor,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """The images ``rows`` (distinct) now have poses ``rotations (B, 3, 3)``.

        ``reduce``: sums the change of the counts over the ranks of a data-parallel run
        (:func:`cryofield.inference.distributed.all_reduce_sum`; each rank places its
        share of the global batch), so that every rank keeps the counts of one process.
        """
        rows = np.asarray(rows, np.int64)
        new = self.cells_of(rotations)
        old = self.cell[rows]
        delta = np.zeros_like(self.counts)
        np.subtract.at(delta, old[old >= 0], 1.0)
        np.add.at(delta, new, 1.0)
        if reduce is not None:
            delta = reduce(torch.as_tensor(delta)).numpy()
        self.counts += delta
        self.cell[rows] = new

    def penalty(self, cell_of_point: np.ndarray) -> torch.Tensor:
        """``(Q,)`` float32 penalty (nats, >= 0) of every search point, from its cell
        ``cell_of_point (Q,)``; the even share is over the cells the points cover (one
        asymmetric unit of a symmetric search)."""
        used = np.unique(cell_of_point)
        c = len(used)
        share = (self.counts + PSEUDO_COUNT) / (self.counts[used].sum() + PSEUDO_COUNT * c)
        pen = self.strength * np.maximum(np.log(share * c), 0.0)
        return torch.as_tensor(pen[cell_of_point], dtype=torch.float32)
