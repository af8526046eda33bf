"""Junk estimate on latents with a known junk cluster."""

from __future__ import annotations

import numpy as np

from cryofield.analysis import latent
from cryofield.analysis.junk import estimate_junk


def test_far_small_cluster_is_junk() -> None:
    rng = np.random.default_rng(0)
    n_good, n_junk = 950, 50
    centres = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.5]])
    good = centres[rng.integers(0, 3, n_good)] + rng.normal(size=(n_good, 2)) * 0.4
    junk = np.array([15.0, 15.0]) + rng.normal(size=(n_junk, 2)) * 0.4
    z = np.concatenate([good, junk])
    is_junk_true = np.r_[np.zeros(n_good, bool), np.ones(n_junk, bool)]
    km = latent.kmeans(z, 20)
    est = estimate_junk(z, km.labels, km.centers)
    tp = (est.is_junk & is_junk_true).sum()
    assert tp / n_junk >= 0.95  # recall
    assert tp / max(est.is_junk.sum(), 1) >= 0.9  # precision
    assert len(est.junk_clusters) >= 1


def test_no_junk_in_clean_data() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=(800, 3))
    km = latent.kmeans(z, 20)
    est = estimate_junk(z, km.labels, km.centers)
    assert est.junk_clusters == []
    assert est.is_junk.mean() < 0.01
