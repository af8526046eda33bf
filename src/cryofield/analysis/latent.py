"""Latent-space analysis: PCA, UMAP, k-means, kernel density, the main path.

All functions take the per-particle latents ``z (N, zdim)`` of a run and return plain
numpy arrays, so the report, ``select`` and ``eval-vol`` compute the same things (same
seed, same K) whether or not ``analyze`` has been run before.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import numpy as np

__all__ = [
    "DEFAULT_SEED",
    "KMeansResult",
    "PCAResult",
    "default_n_clusters",
    "kde_2d",
    "kmeans",
    "path_coordinate",
    "path_trajectory",
    "pc_trajectory",
    "pca",
    "umap_embedding",
]

log = logging.getLogger("cryofield.analysis.latent")

#: Seed of k-means and UMAP everywhere (``analyze`` and ``select`` agree on labels).
DEFAULT_SEED = 0


@dataclasses.dataclass
class PCAResult:
    """Principal components of the latents.

    Attributes
    ----------
    mean : (zdim,) latent mean.
    components : (n_pc, zdim) unit principal axes (rows), sign fixed so that the largest
        entry of each is positive.
    explained_variance_ratio : (n_pc,) fraction of the total variance per PC.
    projected : (N, n_pc) PC coordinates of each particle.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance_ratio: np.ndarray
    projected: np.ndarray


def pca(z: np.ndarray) -> PCAResult:
    """PCA of ``z (N, zdim)`` by the SVD of the centred latents (all ``zdim`` components)."""
    z = np.asarray(z, np.float64).reshape(len(z), -1)
    mean = z.mean(axis=0)
    zc = z - mean
    _, s, Vt = np.linalg.svd(zc, full_matrices=False)
    sign = np.sign(Vt[np.arange(len(Vt)), np.abs(Vt).argmax(axis=1)])
    sign[sign == 0] = 1.0
    Vt = Vt * sign[:, None]
    var = s**2
    total = var.sum()
    ratio = var / total if total > 0 else np.zeros_like(var)
    return PCAResult(mean=mean, components=Vt, explained_variance_ratio=ratio, projected=zc @ Vt.T)


def pc_trajectory(
    z: np.ndarray, result: PCAResult, pc: int, percentiles: tuple[float, ...]
) -> np.ndarray:
    """Latent points along PC ``pc`` (0-based) at percentiles of the particles' PC values.

    The other PC coordinates are zero (the points lie on the line through the mean).

    Returns
    -------
    (len(percentiles), zdim)
    """
    vals = np.percentile(result.projected[:, pc], percentiles)
    return result.mean[None, :] + vals[:, None] * result.components[pc][None, :]


#: The main path is fitted on at most this many particles (Isomap's geodesic distances
#: are a dense (n, n) matrix: 4000 points, 128 MB).
PATH_MAX_POINTS = 4000


def path_coordinate(
    z: np.ndarray, n_neighbors: int = 15, max_points: int = PATH_MAX_POINTS,
    seed: int = DEFAULT_SEED,
) -> np.ndarray | None:  # fmt: skip
    """``(N,)`` position of every particle along the main path of the latent space.

    A continuous motion traces a curve in ``z`` that a linear axis cannot follow: the
    first principal component folds back at its ends (the "horseshoe": PC2 is then about
    quadratic in PC1) and orders the particles there no better than chance. The path
    coordinate is the 1-D Isomap embedding (Tenenbaum, de Silva & Langford 2000, Science
    290:2319): geodesic distances along the ``n_neighbors`` nearest-neighbour graph of a
    seeded subset of ``max_points`` particles, scaled to 1-D by classical MDS; the other
    particles are placed by their neighbours in the subset. Disconnected clusters
    (discrete states) are joined by their closest pair of points, so the coordinate then
    orders the clusters. Sign: increasing with PC1 (a convention). Units: those of ``z``
    (geodesic length).

    Returns None (and logs why) for fewer than 20 particles or a single distinct latent.
    """
    from sklearn.manifold import Isomap

    z = np.asarray(z, np.float64).reshape(len(z), -1)
    if len(z) < 20 or len(np.unique(z[: min(len(z), 1000)].round(12), axis=0)) < 2:
        log.info("main path skipped: %d particles", len(z))
        return None
    idx = subsample_index(len(z), max_points, seed)
    k = min(n_neighbors, len(idx) - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning of a disconnected graph
        iso = Isomap(n_neighbors=k, n_components=1).fit(z[idx])
        # in blocks: transform holds an (n, max_points) matrix of geodesic distances
        coord = np.concatenate(
            [iso.transform(z[a : a + 10000])[:, 0] for a in range(0, len(z), 10000)]
        )
    pc1 = pca(z).projected[:, 0]
    if np.corrcoef(coord, pc1)[0, 1] < 0:
        coord = -coord
    return coord


def path_trajectory(
    z: np.ndarray, coord: np.ndarray, percentiles: tuple[float, ...], width: float = 5.0
) -> np.ndarray:
    """``(len(percentiles), zdim)`` latent points along the main path: at each percentile
    ``p`` of ``coord`` (:func:`path_coordinate`), the mean ``z`` of the particles between
    percentiles ``p - width / 2`` and ``p + width / 2`` (on the data, unlike a point on a
    straight PC axis)."""
    z = np.asarray(z, np.float64).reshape(len(z), -1)
    lo = np.percentile(coord, np.clip(np.asarray(percentiles) - width / 2, 0, 100))
    hi = np.percentile(coord, np.clip(np.asarray(percentiles) + width / 2, 0, 100))
    out = []
    for a, b, p in zip(lo, hi, percentiles, strict=True):
        sel = (coord >= a) & (coord <= b)
        if not sel.any():  # (a few particles): the one nearest the percentile
            sel = np.abs(coord - np.percentile(coord, p)).argmin()[None]
        out.append(z[sel].mean(0))
    return np.stack(out)


def default_n_clusters(n: int, requested: int | None = None) -> int:
    """K for k-means: the user's value or 20, capped at ``N`` (and at least 1)."""
    k = 20 if requested is None else int(requested)
    if k < 1:
        raise ValueError(f"number of clusters must be >= 1, got {k}")
    return max(1, min(k, n))


@dataclasses.dataclass
class KMeansResult:
    """k-means of the latents.

    Attributes
    ----------
    labels : (N,) cluster of each particle, 0-based.
    centers : (K, zdim) cluster centres (means).
    nearest : (K,) index of the particle nearest to each centre; volumes are rendered
        at these *on-data* latents (the centres themselves may fall between modes).
    counts : (K,) particles per cluster.
    """

    labels: np.ndarray
    centers: np.ndarray
    nearest: np.ndarray
    counts: np.ndarray


def kmeans(z: np.ndarray, n_clusters: int | None = None, seed: int = DEFAULT_SEED) -> KMeansResult:
    """k-means (scikit-learn, k-means++ init, 10 restarts; 3 above 50,000 points) of ``z``.

    Deterministic for a given ``seed``. With fewer distinct points than K, K is reduced.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import pairwise_distances_argmin

    z = np.asarray(z, np.float64).reshape(len(z), -1)
    k = default_n_clusters(len(z), n_clusters)
    n_distinct = len(np.unique(z.round(12), axis=0))
    if n_distinct < k:
        log.warning(
            "only %d distinct latents: %d clusters instead of %d", n_distinct, n_distinct, k
        )
        k = n_distinct
    n_init = 10 if len(z) <= 50000 else 3  # restarts are costly for large N
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(z)
    centers = km.cluster_centers_
    nearest = pairwise_distances_argmin(centers, z)  # (K,), chunked over N
    counts = np.bincount(km.labels_, minlength=k)
    return KMeansResult(
        labels=km.labels_.astype(np.int64), centers=centers, nearest=nearest, counts=counts
    )


def subsample_index(n: int, max_points: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Sorted random subset of ``range(n)`` of size ``min(n, max_points)`` (seeded)."""
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_points, replace=False))


def umap_embedding(z: np.ndarray, seed: int = DEFAULT_SEED) -> np.ndarray | None:
    """2-D UMAP embedding (McInnes et al. 2018) of ``z (N, zdim)``, or None.

    Returns None (and logs why) for zdim 1, for fewer than 20 particles, or when
    umap-learn fails; the rest of the analysis goes on without it. For large N, pass a
    subset (:func:`subsample_index`).
    """
    z = np.asarray(z, np.float32).reshape(len(z), -1)
    if z.shape[1] < 2:
        log.info("UMAP skipped: zdim is 1")
        return None
    if len(z) < 20:
        log.info("UMAP skipped: only %d particles", len(z))
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import umap

            reducer = umap.UMAP(
                n_components=2,
                n_neighbors=min(15, len(z) - 1),
                random_state=seed,
                n_jobs=1,
            )
            return np.asarray(reducer.fit_transform(z), np.float64)
    except Exception as err:  # optional step: log and continue
        log.warning("UMAP failed (%s: %s); continuing without it", type(err).__name__, err)
        return None


def kde_2d(
    xy: np.ndarray, n_grid: int = 100, pad: float = 0.1, max_points: int = 20000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian kernel density (Scott's bandwidth) of points ``xy (N, 2)`` on a grid.

    At most ``max_points`` (a seeded random subset) enter the kernel sum.

    Returns
    -------
    X, Y : (n_grid, n_grid) grid coordinates.
    density : (n_grid, n_grid) density, integrating to ~1 over the grid.
    """
    from scipy.stats import gaussian_kde

    xy = np.asarray(xy, np.float64)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    lo, hi = lo - pad * span, hi + pad * span
    X, Y = np.meshgrid(np.linspace(lo[0], hi[0], n_grid), np.linspace(lo[1], hi[1], n_grid))
    kde = gaussian_kde(xy[subsample_index(len(xy), max_points)].T)
    dens = kde(np.stack([X.ravel(), Y.ravel()])).reshape(X.shape)
    return X, Y, dens
