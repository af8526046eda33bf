"""Fixtures for physics tests: a smooth, asymmetric (chiral) test volume."""

from __future__ import annotations

import pytest
import torch

from cryofield.physics.lattice import coords_1d

# (amplitude, centre (x, y, z) px, sigma (x, y, z) px): asymmetric positions and shapes,
# so that no rotation or mirror maps the volume onto itself.
BLOBS = [
    (1.0, (5.0, -3.0, 2.0), (3.0, 2.0, 1.6)),
    (0.8, (-8.0, 6.0, -4.0), (1.8, 3.2, 2.2)),
    (0.6, (2.0, 9.0, 7.0), (2.4, 1.5, 2.8)),
    (0.9, (-4.0, -9.0, 8.0), (1.5, 2.5, 1.8)),
    (0.5, (10.0, 4.0, -7.0), (2.0, 2.0, 3.0)),
]


def blob_volume(D: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sum of anisotropic Gaussians, ``(D, D, D)`` indexed ``[z, y, x]``.

    ``scale`` multiplies all positions and widths (use ``D / 64`` to keep the shape).
    """
    c = coords_1d(D, dtype=torch.float64)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(D, D, D, dtype=torch.float64)
    for amp, (cx, cy, cz), (sx, sy, sz) in BLOBS:
        q = ((x - scale * cx) / (scale * sx)) ** 2
        q = q + ((y - scale * cy) / (scale * sy)) ** 2 + ((z - scale * cz) / (scale * sz)) ** 2
        vol += amp * torch.exp(-0.5 * q)
    return vol.to(dtype)


@pytest.fixture(scope="session")
def blobs64() -> torch.Tensor:
    """The blob volume at D = 64."""
    return blob_volume(64)


@pytest.fixture(scope="session")
def blobs32() -> torch.Tensor:
    """The blob volume at D = 32 (half-size positions and widths)."""
    return blob_volume(32, scale=0.5)


@pytest.fixture(scope="session")
def make_blobs():
    """The :func:`blob_volume` factory, for tests that need other sizes or dtypes."""
    return blob_volume
