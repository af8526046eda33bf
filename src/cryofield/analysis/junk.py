"""Estimate which particles are junk from their latents.

The run directory holds no per-particle reconstruction error, so the estimate uses the
latent space only (documented in ``docs/analyze.md``). Junk is flagged by signal 1;
signal 2 is reported (score and ``is_outlier``) but does not flag by itself, because
the tails of a genuine population are isolated too (for a 2-D Gaussian of 5000 points,
the score of the most isolated point exceeds 7).

1. **Isolated small groups of clusters.** The k-means centres are linked (single
   linkage) when closer than ``cluster_factor`` times the median distance of a centre
   to its nearest other centre; each connected group holding less than
   ``max_cluster_fraction`` of the particles is junk. Junk images (ice, aggregates,
   empty boxes) explain the data badly and are pushed to their own corner of latent
   space, separated from the particles by a gap (k-means may split them into several
   clusters, hence the grouping).
2. **Isolated particles.** The distance of each particle to its ``k``-th nearest neighbour,
   as a robust z-score of ``log d``, ``(log d - median) / (1.4826 MAD)`` (the modified
   z-score of Iglewicz & Hoaglin, 1993); particles above ``particle_z`` are outliers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cryofield.analysis.latent import subsample_index

__all__ = ["JunkEstimate", "estimate_junk"]


@dataclasses.dataclass
class JunkEstimate:
    """Result of :func:`estimate_junk`.

    Attributes
    ----------
    is_junk : (N,) bool, the particles to drop.
    score : (N,) robust z-score of the log k-th neighbour distance (NaN outside the
        scored subset).
    is_outlier : (N,) bool, ``score > particle_z``.
    junk_clusters : the k-means clusters judged junk.
    cluster_separation : (K,) nearest-other-centre distance over its median.
    cluster_group : (K,) connected group of each cluster (see the module docstring).
    """

    is_junk: np.ndarray
    score: np.ndarray
    is_outlier: np.ndarray
    junk_clusters: list[int]
    cluster_separation: np.ndarray
    cluster_group: np.ndarray


def estimate_junk(
    z: np.ndarray,
    labels: np.ndarray,
    centers: np.ndarray,
    cluster_factor: float = 3.0,
    max_cluster_fraction: float = 0.2,
    particle_z: float = 6.0,
    k_neighbors: int = 10,
    max_score_points: int = 20000,
) -> JunkEstimate:
    """Flag junk particles (see the module docstring).

    Parameters
    ----------
    z : (N, zdim) latents.
    labels : (N,) k-means labels.
    centers : (K, zdim) k-means centres.
    max_score_points : the isolation score is computed within a seeded random subset of
        at most this many particles (NaN for the others).
    """
    from sklearn.neighbors import NearestNeighbors

    z = np.asarray(z, np.float64).reshape(len(z), -1)
    labels = np.asarray(labels)
    centers = np.asarray(centers, np.float64).reshape(len(centers), -1)
    n, K = len(z), len(centers)
    from scipy.sparse.csgraph import connected_components

    sep = np.ones(K)
    group = np.zeros(K, dtype=np.int64)
    junk_clusters: list[int] = []
    if K >= 3:
        dc = np.linalg.norm(centers[:, None] - centers[None], axis=-1)
        np.fill_diagonal(dc, np.inf)
        d = dc.min(axis=1)
        scale = max(float(np.median(d)), 1e-12)
        sep = d / scale
        _, group = connected_components(dc < cluster_factor * scale, directed=False)
        counts = np.bincount(labels, minlength=K)
        group_counts = np.bincount(group, weights=counts)
        for k in range(K):
            if group_counts[group[k]] < max_cluster_fraction * n:
                junk_clusters.append(k)
    score = np.full(n, np.nan)
    sub = subsample_index(n, max_score_points)
    if len(sub) > k_neighbors + 1:
        zs = z[sub]
        dist, _ = NearestNeighbors(n_neighbors=k_neighbors + 1).fit(zs).kneighbors(zs)
        dk = np.log(np.maximum(dist[:, -1], 1e-12))
        med = np.median(dk)
        mad = 1.4826 * np.median(np.abs(dk - med))
        score[sub] = (dk - med) / max(mad, 1e-12)
    is_junk = np.isin(labels, junk_clusters)
    return JunkEstimate(
        is_junk=is_junk,
        score=score,
        is_outlier=np.nan_to_num(score, nan=-np.inf) > particle_z,
        junk_clusters=junk_clusters,
        cluster_separation=sep,
        cluster_group=np.asarray(group, np.int64),
    )
