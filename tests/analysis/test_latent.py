"""PCA, k-means, UMAP and KDE of latents."""

from __future__ import annotations

import numpy as np
import pytest

from cryofield.analysis import latent


def test_pca_explained_variance_and_trajectory() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 3)) * np.array([3.0, 1.0, 0.5]) + np.array([1.0, -2.0, 0.0])
    res = latent.pca(z)
    expected = np.array([9.0, 1.0, 0.25]) / 10.25
    np.testing.assert_allclose(res.explained_variance_ratio, expected, atol=0.02)
    assert abs(res.components[0, 0]) == pytest.approx(1.0, abs=1e-2)
    np.testing.assert_allclose(res.projected @ res.components + res.mean, z, atol=1e-9)
    pts = latent.pc_trajectory(z, res, 0, (5.0, 50.0, 95.0))
    # along PC1 (x axis), at the 5/50/95 % quantiles of N(1, 3): 1 -+ 1.645 * 3
    np.testing.assert_allclose(pts[:, 0], [1 - 4.93, 1.0, 1 + 4.93], atol=0.3)
    np.testing.assert_allclose(pts[:, 1:], np.tile([-2.0, 0.0], (3, 1)), atol=0.1)


def test_kmeans_recovers_blobs_deterministically() -> None:
    rng = np.random.default_rng(1)
    centres = np.array([[5.0, 0.0], [-5.0, 0.0], [0.0, 6.0]])
    truth = rng.integers(0, 3, size=600)
    z = centres[truth] + rng.normal(size=(600, 2)) * 0.5
    a = latent.kmeans(z, 3)
    b = latent.kmeans(z, 3)
    np.testing.assert_array_equal(a.labels, b.labels)
    from cryofield.analysis.metrics import adjusted_rand_index

    assert adjusted_rand_index(truth, a.labels) == pytest.approx(1.0)
    assert a.counts.sum() == 600
    for k in range(3):
        d = np.linalg.norm(z - a.centers[k], axis=1)
        assert a.nearest[k] == np.argmin(d)
    assert latent.default_n_clusters(600) == 20
    assert latent.default_n_clusters(7) == 7
    assert latent.default_n_clusters(600, 5) == 5
    with pytest.raises(ValueError):
        latent.default_n_clusters(10, 0)
    # fewer distinct points than K: K shrinks
    few = latent.kmeans(np.repeat(centres, 4, axis=0), 10)
    assert len(few.centers) == 3


def test_umap_skips_and_runs() -> None:
    rng = np.random.default_rng(2)
    assert latent.umap_embedding(rng.normal(size=(100, 1))) is None
    assert latent.umap_embedding(rng.normal(size=(10, 4))) is None
    centres = np.array([[8.0, 0, 0, 0], [-8.0, 0, 0, 0]])
    truth = np.arange(200) % 2
    emb = latent.umap_embedding(centres[truth] + rng.normal(size=(200, 4)) * 0.3)
    assert emb is not None and emb.shape == (200, 2)
    # the two blobs stay separated: every point is nearer its own blob's mean
    m0, m1 = emb[truth == 0].mean(0), emb[truth == 1].mean(0)
    nearer0 = np.linalg.norm(emb - m0, axis=1) < np.linalg.norm(emb - m1, axis=1)
    np.testing.assert_array_equal(nearer0, truth == 0)


def test_kde_normalised() -> None:
    rng = np.random.default_rng(3)
    X, Y, dens = latent.kde_2d(rng.normal(size=(500, 2)), n_grid=120, pad=0.5)
    area = (X[0, 1] - X[0, 0]) * (Y[1, 0] - Y[0, 0])
    assert dens.sum() * area == pytest.approx(1.0, abs=0.03)
    iy, ix = np.unravel_index(np.argmax(dens), dens.shape)
    assert abs(X[iy, ix]) < 0.5 and abs(Y[iy, ix]) < 0.5


def test_path_coordinate_follows_a_curve_that_pc1_folds_back_on() -> None:
    """Latents on 7/8 of a circle (a motion whose maps bend back): PC1 orders its ends no
    better than chance, the main path orders all of it; its maps lie on the curve."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    t = rng.uniform(0, 1.75 * np.pi, 3000)
    z = np.stack([np.cos(t), np.sin(t), np.zeros_like(t), np.zeros_like(t)], 1)
    z += 0.03 * rng.standard_normal(z.shape)
    pc1 = abs(spearmanr(latent.pca(z).projected[:, 0], t).statistic)
    path = latent.path_coordinate(z, max_points=1500)
    assert path is not None and path.shape == (3000,)
    rho = abs(spearmanr(path, t).statistic)
    assert pc1 < 0.9 and rho > 0.99, (pc1, rho)
    # geodesic units: the arc is 1.75 pi long (the graph's steps zigzag through the noise)
    assert 0.95 < (path.max() - path.min()) / (1.75 * np.pi) < 1.2
    pts = latent.path_trajectory(z, path, (5.0, 50.0, 95.0))
    assert pts.shape == (3, 4)
    assert np.all(np.abs(np.linalg.norm(pts[:, :2], axis=1) - 1) < 0.05)  # on the curve
    assert latent.path_coordinate(z[:10]) is None
