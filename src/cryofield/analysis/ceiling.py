"""Information-limit ceiling of state assignment on simulated discrete heterogeneity.

Every (non-junk) image ``I_i`` is assigned to the true state ``s`` whose TRUE map,
projected at the image's TRUE pose and shift with its CTF (the simulator's forward
model, :class:`~cryofield.simulate.projection.OversampledProjector`), explains it best:

``s_i = argmin_s  sum_{|k| <= r} | I_hat_i(k) - CTF_i(k) shift_{t_i}(P_{R_i} V_s)^(k) |^2``

(squared residual of the centred 2-D transforms inside a radius of ``r`` Fourier px,
by default Nyquist). Stacks the simulator wrote light-on-dark (``truth['invert']``) are
negated first (docs/dev/contracts.md, "Contrast and CTF sign"). With white Gaussian
noise of one variance and equal state populations this is the maximum-likelihood
assignment given everything but the state, so the adjusted Rand index of ``s_i``
against the true labels (``ari``) is what the data hold: a learned clustering can
reach it, not beat it (up to sampling noise).

Continuous truth (a finite ``coord``: the labels are frames of a motion, each with its
map and coordinate, ``frame_coords``): each image is assigned to the frame map that
explains it best, the same way, and ``spearman_abs`` is ``|Spearman|`` of the assigned
frames' coordinates against the true coordinates: the ceiling of the latent-vs-coordinate
score (``latent_vs_coord_spearman``) at this SNR (also ``coord_error_median``, the median
``|assigned - true|`` coordinate).

The images are read in chunks (:class:`~cryofield.io.particles.ParticleSource`), one
true map at a time, and at most ``max_images`` of them (a seeded random subset) are
used, so the cost is bounded whatever the dataset size (continuous truth: the images of
4 maps' worth of projections, ``4 max_images / frames``, at least 200).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from cryofield.analysis import metrics

__all__ = ["skip_reason", "state_ceiling"]

log = logging.getLogger("cryofield.analysis.ceiling")


def skip_reason(truth: dict[str, np.ndarray], truth_rows: np.ndarray | None = None) -> str | None:
    """Why no ceiling applies to ``truth`` (restricted to ``truth_rows``), or None.

    No ``labels`` (states, or frames of a continuous motion), or fewer than two of them
    among the non-junk particles.
    """
    if "labels" not in truth:
        return "the truth has no state labels"
    n = len(truth["labels"])
    rows = np.arange(n) if truth_rows is None else np.asarray(truth_rows, np.int64)
    labels = np.asarray(truth["labels"], np.int64)[rows]
    junk = np.asarray(truth.get("is_junk", labels < 0), bool)[rows] | (labels < 0)
    if len(np.unique(labels[~junk])) < 2:
        return "homogeneous data (one state): nothing to assign"
    return None


def state_ceiling(
    truth_path: str | Path,
    truth: dict[str, np.ndarray] | None = None,
    table: Any = None,
    truth_rows: np.ndarray | None = None,
    volumes: list[str | Path] | None = None,
    max_images: int | None = 5000,
    radius_px: float | None = None,
    seed: int = 0,
    chunk_size: int = 256,
) -> dict[str, Any]:
    """ARI of the true-map assignment against the true labels (the module docstring).

    Parameters
    ----------
    truth_path
        ``truth.npz`` of ``simulate_dataset``.
    truth
        Its content when already read (:func:`cryofield.analysis.evaluate.load_truth`).
    table
        The particles (:class:`~cryofield.io.metadata.ParticleTable`), e.g. a run's
        ``particles.npz``; default: ``particles.star`` beside ``truth_path``.
    truth_rows
        ``(len(table),)`` row of the truth of each table row (a run's ``particle_index``);
        default ``arange(len(table))``.
    volumes
        True maps, one per state in label order; default the truth's ``volume_paths``.
    max_images
        Use at most this many eligible images (a random subset drawn with ``seed``);
        None: all.
    radius_px
        Fourier radius (px at the image box) of the residual; default Nyquist (``D/2``).
    chunk_size
        Images read and projected at once.

    Returns
    -------
    dict
        JSON-ready: ``ari``, ``accuracy`` (fraction assigned to their true state),
        ``n_images`` used of ``n_eligible``, ``subsampled``, ``seed``, ``n_states``,
        ``D``, ``radius_px``, ``resolution_A`` (of that radius), ``invert``, ``particles``
        (the metadata read), ``method``; or ``{"skipped": reason}`` when no ceiling
        applies (:func:`skip_reason`).
    """
    import torch

    from cryofield.analysis.evaluate import _read_map, _true_volumes, load_truth
    from cryofield.io.metadata import load_particle_table
    from cryofield.io.particles import ParticleSource
    from cryofield.physics.ctf import CTFParams
    from cryofield.physics.fourier import fft2_centered
    from cryofield.physics.lattice import radial_index_2d
    from cryofield.simulate.projection import OversampledProjector

    truth_path = Path(truth_path)
    if truth is None:
        truth = load_truth(truth_path)
    if truth_rows is not None:
        rows = np.asarray(truth_rows, np.int64)
    elif table is not None:
        rows = np.arange(len(table), dtype=np.int64)
    else:
        rows = np.arange(len(truth["rotations"]), dtype=np.int64)
    reason = skip_reason(truth, rows)
    if reason is not None:
        return {"skipped": reason}
    if table is None:
        table = load_particle_table(truth_path.parent / "particles.star")
    if len(rows) != len(table):
        raise ValueError(f"truth_rows has {len(rows)} entries for {len(table)} particles")
    labels = np.asarray(truth["labels"], np.int64)[rows]
    junk = np.asarray(truth.get("is_junk", labels < 0), bool)[rows] | (labels < 0)
    states = np.unique(labels[~junk])
    vol_paths = _true_volumes(truth_path, truth, None if volumes is None else list(volumes))
    if len(vol_paths) <= states.max():
        return {"skipped": f"{len(vol_paths)} true map(s) for states up to {states.max()}"}

    eligible = np.flatnonzero(~junk)
    coord = np.asarray(truth.get("coord", np.full(len(truth["labels"]), np.nan)), np.float64)
    continuous = bool(np.isfinite(coord[rows]).any())
    if continuous and max_images is not None and len(states) > 4:
        # one projection per image and frame: the images of 4 maps' worth (500 of 40
        # frames at the default 5,000), at least 200
        max_images = max(200, int(max_images) * 4 // len(states))
    subsampled = max_images is not None and len(eligible) > max_images
    if subsampled:
        rng = np.random.default_rng(seed)
        use = np.sort(rng.choice(eligible, size=int(max_images), replace=False))
    else:
        use = eligible

    D_truth = int(truth["D"]) if "D" in truth else int(table.box_px)
    source = ParticleSource(table, D=min(int(table.box_px), D_truth))
    D = source.D
    apix = np.asarray(source.apix_A, np.float64)[use]
    apix_truth = float(truth["apix_A"]) if "apix_A" in truth else float(apix[0]) * D / D_truth
    if "invert" in truth:
        invert = bool(truth["invert"])
    else:
        invert = source.contrast() == "light-on-dark"
        log.warning("truth has no 'invert'; guessed %s images", source.contrast())
    radius = D / 2 if radius_px is None else float(radius_px)
    mask = radial_index_2d(D) <= radius  # (D, D) bool
    R = torch.as_tensor(np.asarray(truth["rotations"])[rows[use]], dtype=torch.float32)
    if "shifts_px" in truth:
        t = np.asarray(truth["shifts_px"], np.float64)[rows[use]]
    else:
        t = np.zeros((len(use), 2))
    # truth shifts are in truth px; the images' px are apix / apix_truth times larger
    t = torch.as_tensor(t * apix_truth / apix[:, None], dtype=torch.float32)
    ctf = None if table.ctf is None else CTFParams.from_table(table, use)
    apix_t = torch.as_tensor(apix, dtype=torch.float32)
    oversample = 2 if D <= 128 else 1  # the simulator's projector; bounded memory above

    residual = np.zeros((len(use), int(states.max()) + 1))
    residual[:] = np.inf
    for s in states:
        vol = np.array(_read_map(vol_paths[int(s)], D, float(apix[0])))  # writable copy
        proj = OversampledProjector(vol, oversample=oversample)
        for a in range(0, len(use), chunk_size):
            b = min(a + chunk_size, len(use))
            img = source[use[a:b]]
            if invert:
                img = -img
            model = proj.project(
                R[a:b], t[a:b], None if ctf is None else ctf.subset(slice(a, b)), apix_t[a:b]
            )
            diff = (fft2_centered(img) - fft2_centered(model))[:, mask]
            residual[a:b, int(s)] = (diff.abs() ** 2).sum(-1).double().numpy()
    assign = np.argmin(residual, axis=1)
    truth_labels = labels[use]
    if continuous:
        return _continuous_scores(
            truth, coord[rows[use]], truth_labels, assign, len(eligible), bool(subsampled),
            seed, D, radius, apix, invert, table,
        )  # fmt: skip
    res = {
        "ari": metrics.adjusted_rand_index(truth_labels, assign),
        "accuracy": float(np.mean(assign == truth_labels)),
        "n_images": len(use),
        "n_eligible": len(eligible),
        "subsampled": bool(subsampled),
        "seed": int(seed),
        "n_states": len(states),
        "D": int(D),
        "radius_px": float(radius),
        "resolution_A": float(np.median(apix)) * D / radius if radius > 0 else math.inf,
        "invert": invert,
        "particles": str(table.source_path),
        "method": "true maps at true poses, shifts and CTF; least squared Fourier residual",
    }
    log.info(
        "state ceiling: ARI %.3f on %d of %d images (radius %.1f px)",
        res["ari"], len(use), len(eligible), radius,
    )  # fmt: skip
    return res


def _continuous_scores(
    truth: dict[str, np.ndarray],
    coord: np.ndarray,
    labels: np.ndarray,
    assign: np.ndarray,
    n_eligible: int,
    subsampled: bool,
    seed: int,
    D: int,
    radius: float,
    apix: np.ndarray,
    invert: bool,
    table: Any,
) -> dict[str, Any]:
    """The continuous ceiling (module docstring) from the frame assignment ``assign``."""
    from scipy.stats import spearmanr

    frame_coord = np.asarray(truth.get("frame_coords", np.zeros(0)), np.float64)
    if len(frame_coord) <= max(labels.max(), assign.max()):  # the particles' coordinates
        frame_coord = np.full(int(max(labels.max(), assign.max())) + 1, np.nan)
        for f in np.unique(labels):
            frame_coord[f] = np.nanmean(coord[labels == f])
    est = frame_coord[assign]
    rho = float(spearmanr(est, coord).statistic)
    res = {
        "spearman_abs": abs(rho),
        "coord_error_median": float(np.median(np.abs(est - coord))),
        "frame_accuracy": float(np.mean(assign == labels)),
        "n_images": len(assign),
        "n_eligible": int(n_eligible),
        "subsampled": subsampled,
        "seed": int(seed),
        "n_frames": len(np.unique(labels)),
        "D": int(D),
        "radius_px": float(radius),
        "resolution_A": float(np.median(apix)) * D / radius if radius > 0 else math.inf,
        "invert": invert,
        "particles": str(table.source_path),
        "method": "each image assigned to the frame map that explains it best (true pose, "
        "shift and CTF; least squared Fourier residual); |Spearman| of the assigned frames' "
        "coordinates against the true ones",
    }
    log.info(
        "continuous ceiling: |Spearman| %.3f on %d of %d images (%d frames, radius %.1f px)",
        res["spearman_abs"], len(assign), n_eligible, res["n_frames"], radius,
    )  # fmt: skip
    return res
