"""Figures of the analysis report (matplotlib, Agg backend, PNG files).

Each function draws one figure into ``path`` and returns it. Clusters get the same
colour in every figure (:func:`cluster_colors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from cryofield.io.atomic import atomic_path

__all__ = [
    "cluster_colors",
    "plot_cluster_counts",
    "plot_explained_variance",
    "plot_fsc",
    "plot_junk",
    "plot_kde",
    "plot_masked_change",
    "plot_scatter",
    "plot_training_curves",
    "plot_viewing_directions",
    "plot_volume_gallery",
]

_DPI = 100


def cluster_colors(k: int) -> np.ndarray:
    """(k, 4) RGBA colours, cluster ``i`` always gets row ``i`` (tab20, then hsv)."""
    cmap = plt.get_cmap("tab20" if k <= 20 else "hsv")
    return np.asarray([cmap(i if k <= 20 else i / k) for i in range(k)])


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=_DPI, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def plot_scatter(
    xy: np.ndarray,
    labels: np.ndarray | None,
    path: Path,
    title: str,
    axis_names: tuple[str, str],
    centers_xy: np.ndarray | None = None,
) -> Path:
    """Scatter of ``xy (N, 2)`` coloured by cluster, centres numbered."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    size = float(np.clip(3000.0 / max(len(xy), 1), 1.0, 20.0))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, alpha=0.5, c="0.3", linewidths=0)
    else:
        colors = cluster_colors(int(labels.max()) + 1)
        ax.scatter(xy[:, 0], xy[:, 1], s=size, alpha=0.6, c=colors[labels], linewidths=0)
    if centers_xy is not None:
        for i, (x, y) in enumerate(centers_xy):
            if not (np.isfinite(x) and np.isfinite(y)):
                continue
            ax.annotate(
                str(i),
                (x, y),
                fontsize=8,
                ha="center",
                va="center",
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.7},
            )
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title(title)
    return _save(fig, path)


def plot_kde(
    X: np.ndarray,
    Y: np.ndarray,
    density: np.ndarray,
    path: Path,
    title: str,
    axis_names: tuple[str, str],
) -> Path:
    """Filled contours of a 2-D density."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    cs = ax.contourf(X, Y, density, levels=15, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="density")
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title(title)
    return _save(fig, path)


def plot_explained_variance(ratio: np.ndarray, path: Path) -> Path:
    """Bar chart of the explained variance ratio per PC."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    n = len(ratio)
    ax.bar(np.arange(1, n + 1), ratio * 100, color="tab:blue")
    ax.plot(np.arange(1, n + 1), np.cumsum(ratio) * 100, "k.-", label="cumulative")
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance (%)")
    ax.set_ylim(0, 105)
    ax.legend()
    return _save(fig, path)


def plot_cluster_counts(counts: np.ndarray, path: Path, junk: Sequence[int] = ()) -> Path:
    """Particles per k-means cluster (junk clusters hatched)."""
    k = len(counts)
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * k + 1.5), 3.5))
    bars = ax.bar(np.arange(k), counts, color=cluster_colors(k))
    for j in junk:
        bars[j].set_hatch("//")
    ax.set_xticks(np.arange(k))
    ax.set_xlabel("cluster")
    ax.set_ylabel("particles")
    return _save(fig, path)


def plot_junk(
    score: np.ndarray,
    is_junk: np.ndarray,
    xy: np.ndarray | None,
    threshold: float,
    path: Path,
    xlabel: str = "isolation score (robust z)",
) -> Path:
    """Junk estimate: score histogram with the threshold, and (when ``xy`` is given) the
    latent PCA coloured by the flag."""
    fig, axes = plt.subplots(
        1, 2 if xy is not None else 1, figsize=(10 if xy is not None else 5, 4)
    )
    a1 = axes[0] if xy is not None else axes
    a1.hist(score[np.isfinite(score)], bins=50, color="0.5")
    if np.isfinite(threshold):
        a1.axvline(threshold, color="tab:red", ls="--", label=f"threshold {threshold:.2f}")
        a1.legend()
    a1.set_xlabel(xlabel)
    a1.set_ylabel("particles")
    if xy is not None:
        a2 = axes[1]
        a2.scatter(xy[~is_junk, 0], xy[~is_junk, 1], s=3, c="0.6", linewidths=0, label="kept")
        a2.scatter(
            xy[is_junk, 0],
            xy[is_junk, 1],
            s=5,
            c="tab:red",
            linewidths=0,
            label=f"junk ({int(is_junk.sum())})",
        )
        a2.set_xlabel("PC1")
        a2.set_ylabel("PC2")
        a2.legend()
    return _save(fig, path)


def plot_viewing_directions(directions: np.ndarray, path: Path) -> Path:
    """2-D histogram of viewing directions (azimuth vs elevation, equal-area in sin)."""
    d = np.asarray(directions, np.float64)
    az = np.degrees(np.arctan2(d[:, 1], d[:, 0]))
    el = np.degrees(np.arcsin(np.clip(d[:, 2], -1, 1)))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    h = ax.hist2d(
        az, np.sin(np.radians(el)), bins=(36, 18), range=((-180, 180), (-1, 1)), cmap="magma"
    )
    fig.colorbar(h[3], ax=ax, label="particles")
    ax.set_xlabel("azimuth (deg)")
    ax.set_ylabel("sin(elevation)")
    ax.set_title("viewing directions R^T e_z")
    return _save(fig, path)


def plot_training_curves(rows: list[dict], path: Path) -> Path:
    """Loss and search radius per epoch from ``metrics.jsonl`` rows."""
    ep = [r.get("epoch", i + 1) for i, r in enumerate(rows)]
    fig, a1 = plt.subplots(figsize=(6, 3.5))
    loss = [np.nan if r.get("loss") is None else r["loss"] for r in rows]
    a1.plot(ep, loss, "o-", color="tab:blue", label="loss")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss", color="tab:blue")
    if any("radius_px" in r for r in rows):
        a2 = a1.twinx()
        a2.plot(ep, [r.get("radius_px", np.nan) for r in rows], "s--", color="tab:orange")
        a2.set_ylabel("band limit (Fourier px)", color="tab:orange")
    return _save(fig, path)


def plot_fsc(curves: dict[str, np.ndarray], D: int, apix_A: float, path: Path) -> Path:
    """FSC curves vs resolution with the 0.5 and 0.143 lines."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, f in curves.items():
        k = np.arange(len(f)) / (D * apix_A)
        ax.plot(k, f, label=name)
    ax.axhline(0.143, color="0.5", ls=":", lw=1)
    ax.axhline(0.5, color="0.5", ls="--", lw=1)
    ax.set_xlabel("spatial frequency (1/A)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.legend()
    return _save(fig, path)


def plot_volume_gallery(
    images: list[np.ndarray],
    titles: list[str],
    path: Path,
    colors: np.ndarray | None = None,
    ncols: int = 5,
) -> Path:
    """Grid of 2-D views of maps (e.g. projections along z), one panel per map."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 * ncols, 2.3 * nrows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        ax.imshow(images[i], cmap="gray", origin="lower")
        ax.set_title(titles[i], fontsize=8)
        if colors is not None:
            for spine in ax.spines.values():
                spine.set_color(colors[i])
                spine.set_linewidth(3)
    return _save(fig, path)


def plot_masked_change(change: np.ndarray, mask: np.ndarray, path: Path, title: str) -> Path:
    """Where the maps along a latent direction change (``change``: a 2-D projection of
    ``V_last - V_first``, red gained, blue lost) with the outline of the mask (``mask``: its
    projection, the contour at half its maximum) drawn over it."""
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    lim = max(float(np.abs(change).max()), 1e-30)
    ax.imshow(change, cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower")
    if float(np.ptp(mask)) > 0:
        ax.contour(mask, levels=[0.5 * float(mask.max())], colors="black", linewidths=1.2,
                   origin="lower")  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
