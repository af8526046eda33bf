"""The balanced early search: occupancy counts, the penalty and its schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryofield.inference.balance import PSEUDO_COUNT, DirectionBalance, balance_strength
from cryofield.physics.rotation import random_rotations
from cryofield.physics.so3_grid import grid_size


def test_strength_falls_linearly_to_zero_over_a_fraction_of_the_search():
    # 30 search epochs, a third of them: n = 11
    assert balance_strength(1.0, 0.34, 30, 1) == 1.0
    assert balance_strength(1.0, 0.34, 30, 6) == pytest.approx(1 - 5 / 11)
    assert balance_strength(1.0, 0.34, 30, 12) == 0.0
    # short searches still get two balanced epochs
    assert balance_strength(2.0, 0.34, 3, 2) == pytest.approx(1.0)
    assert balance_strength(2.0, 0.34, 3, 3) == 0.0
    assert balance_strength(0.0, 0.34, 30, 1) == 0.0


def test_counts_follow_the_images_and_only_crowded_cells_pay():
    n = 300
    R = torch.eye(3).expand(n, 3, 3).clone()
    bal = DirectionBalance(n, strength=1.5)
    assert bal.counts.sum() == 0  # nothing counted before the search places an image
    bal.update(np.arange(200), R[:200])
    cell = int(DirectionBalance.cells_of(torch.eye(3)[None])[0])
    M = grid_size(0)[0]
    assert bal.counts[cell] == 200 and bal.counts.sum() == 200
    every = np.arange(M)
    pen = bal.penalty(every)
    share = (200 + PSEUDO_COUNT) / (200 + PSEUDO_COUNT * M)
    assert float(pen[cell]) == pytest.approx(1.5 * math.log(share * M), rel=1e-5)
    assert float(pen.sum() - pen[cell]) == 0.0  # under an even share: no penalty
    # images that move leave their old cell (no double count)
    R2 = random_rotations(100, generator=torch.Generator().manual_seed(0))
    bal.update(np.arange(100), R2)
    assert bal.counts.sum() == 200 and bal.counts[cell] >= 100
    assert bal.counts.min() >= 0
    # an even share over the cells the points cover (one asymmetric unit): a quarter of
    # the cells holding every image evenly pays nothing
    quarter = every[: M // 4]
    even = DirectionBalance(M // 4, 1.0)
    even.cell[:] = quarter
    even.counts[quarter] = 1.0
    assert float(even.penalty(quarter).max()) == 0.0


def test_starting_from_a_pose_table_counts_every_image():
    R = random_rotations(500, generator=torch.Generator().manual_seed(1))
    bal = DirectionBalance(500, 1.0, R)
    assert bal.counts.sum() == 500
    assert np.array_equal(bal.cell, DirectionBalance.cells_of(R))


def test_data_parallel_ranks_sum_their_changes():
    """Each rank places its share of a global batch; the change of the counts is summed
    over the ranks (here two ranks placing the same 10 images elsewhere: twice the
    change), so every rank keeps the counts one process would have."""
    calls = []

    def two_ranks(delta: torch.Tensor) -> torch.Tensor:
        calls.append(float(delta.sum()))
        return delta * 2

    R = random_rotations(10, generator=torch.Generator().manual_seed(2))
    bal = DirectionBalance(20, 1.0)
    bal.update(np.arange(10), R, two_ranks)
    assert calls == [10.0] and bal.counts.sum() == 20
    assert np.array_equal(
        bal.counts, 2 * np.bincount(DirectionBalance.cells_of(R), minlength=bal.cells)
    )
