"""Junk estimate: latents with a known junk cluster; combined residual + isolation score."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cryofield.analysis import latent
from cryofield.analysis.junk import (
    estimate_junk,
    estimate_junk_combined,
    load_residuals,
    robust_z,
    score_junk,
)


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


# ------------------------------------------------------------------ combined score
def _junk_data(n: int, frac: float, mode: str, seed: int):
    """Latents in 3 clusters (zdim 8) and log-normal residuals (5 % spread); junk has a
    30 % higher residual ('res'), a latent scattered far from the clusters ('iso'), or
    both. Returns ``z, residual, is_junk``, shuffled."""
    rng = np.random.default_rng(seed)
    nj = round(frac * n)
    ng = n - nj
    centres = rng.normal(size=(3, 8)) * 2.0

    def clustered(m: int) -> np.ndarray:
        return centres[rng.integers(0, 3, m)] + rng.normal(size=(m, 8)) * 0.5

    zg = clustered(ng)
    zj = rng.normal(size=(nj, 8)) * 4.0 if mode in ("iso", "both") else clustered(nj)
    rg = np.exp(rng.normal(0.0, 0.05, ng))
    rj = (1.3 if mode in ("res", "both") else 1.0) * np.exp(rng.normal(0.0, 0.05, nj))
    perm = rng.permutation(n)
    truth = np.r_[np.zeros(ng, bool), np.ones(nj, bool)]
    return np.r_[zg, zj][perm], np.r_[rg, rj][perm], truth[perm]


def _precision_recall(flag: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    tp = int((flag & truth).sum())
    return tp / max(int(flag.sum()), 1), tp / max(int(truth.sum()), 1)


@pytest.mark.parametrize("frac", [0.05, 0.3])
@pytest.mark.parametrize("mode", ["res", "iso", "both"])
def test_combined_junk_precision_recall(frac: float, mode: str) -> None:
    z, r, truth = _junk_data(1000, frac, mode, seed=int(frac * 100) + len(mode))
    km = latent.kmeans(z, 20)
    est = estimate_junk_combined(z, r, km.labels, km.centers)
    assert est.signals == ["residual", "isolation"]
    p, rec = _precision_recall(est.is_junk, truth)
    assert p >= 0.9 and rec >= 0.9, (p, rec, est.summary())
    assert est.method == "mixture" and np.isfinite(est.threshold)
    np.testing.assert_array_equal(est.by_score, est.score > est.threshold)
    if mode == "res":  # homogeneous runs: the residual alone
        alone = score_junk(residual=r)
        assert alone.signals == ["residual"]
        assert min(_precision_recall(alone.is_junk, truth)) >= 0.9
    if mode == "iso":  # older runs without residuals.npz: the latents alone
        alone = estimate_junk_combined(z, None, km.labels, km.centers)
        assert alone.signals == ["isolation"]
        assert min(_precision_recall(alone.is_junk, truth)) >= 0.9


def test_combined_junk_clean_data() -> None:
    z, r, _ = _junk_data(2000, 0.0, "both", seed=5)
    km = latent.kmeans(z, 20)
    est = estimate_junk_combined(z, r, km.labels, km.centers)
    assert est.is_junk.mean() < 0.005
    assert est.method == "median + 6 MAD"
    # the score is the max of the robust z-scores
    np.testing.assert_allclose(est.score, np.maximum(est.residual_z, est.isolation_z))


def test_combined_junk_residual_only_one_signal_matters() -> None:
    """A junk image that stands out in one signal only is still caught (max, not sum)."""
    z, r, truth = _junk_data(1000, 0.05, "res", seed=6)
    km = latent.kmeans(z, 20)
    est = estimate_junk_combined(z, r, km.labels, km.centers)
    assert np.nanmedian(est.isolation_z[truth]) < 1.5  # not isolated
    assert est.is_junk[truth].mean() >= 0.9


def test_junk_cluster_is_kept_and_missing_signals(caplog) -> None:
    rng = np.random.default_rng(7)
    z = np.r_[rng.normal(size=(950, 2)) * 0.4, np.array([15.0, 15.0]) + rng.normal(size=(50, 2))]
    km = latent.kmeans(z, 20)
    with caplog.at_level(logging.INFO, logger="cryofield.analysis.junk"):
        est = estimate_junk_combined(z, None, km.labels, km.centers)
    assert "without residuals" in caplog.text
    assert est.by_cluster[950:].all() and est.is_junk[950:].all()
    assert est.junk_clusters
    none = score_junk()
    assert none.method == "none" and len(none.is_junk) == 0
    with pytest.raises(ValueError, match="different lengths"):
        score_junk(np.ones(3), np.ones(4))


def test_robust_z_and_load_residuals(tmp_path) -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0, 100.0, np.nan])
    rz = robust_z(x)
    assert rz[2] == 0.0 and np.isnan(rz[5])
    assert rz[3] == pytest.approx(1 / 1.4826)
    ref = np.array([True, True, True, True, False, False])
    assert robust_z(x, ref)[4] == pytest.approx((100 - 2.5) / (1.4826 * 1.0))
    assert load_residuals(tmp_path, 4) is None
    np.savez(tmp_path / "residuals.npz", residual=np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(load_residuals(tmp_path, 4), np.arange(4))
    assert load_residuals(tmp_path, 5) is None  # wrong length: ignored


def test_residuals_are_relative_to_the_image_power(tmp_path):
    """With ``power`` saved, the junk residual is the unexplained share of each image: a
    particle with strong signal and a large absolute residual is not junk, a pure-noise
    image that the model cannot explain at all is."""
    from cryofield.analysis.junk import load_residuals

    residual = np.array([2.0, 1.0, 0.5], dtype=np.float32)
    power = np.array([4.0, 1.0, 0.0], dtype=np.float32)
    np.savez(tmp_path / "residuals.npz", residual=residual, power=power)
    r = load_residuals(tmp_path, 3)
    assert r[0] == pytest.approx(0.5) and r[1] == pytest.approx(1.0) and np.isnan(r[2])
    np.savez(tmp_path / "residuals.npz", residual=residual)  # older runs: the raw residual
    assert np.allclose(load_residuals(tmp_path, 3), residual)
