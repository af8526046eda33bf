"""Convergence diagnostics of a training run and a verdict: did it work, and if not, why.

Pure functions on poses, latents and a few numbers of the run (no file access except
:func:`write_verdict`). A run that "worked" has

* **stable poses**: a search epoch finds (nearly) the poses of the epoch before it. A search
  on a map that does not explain the images returns different poses every epoch;
* **viewing directions that cover the sphere**: a failed search often sends every image to
  one or two directions (a featureless map scores about the same in all of them);
* **half maps that agree** beyond the band limit the search started at (homogeneous runs);
* **structured latents** (heterogeneous runs): a flat PCA spectrum (every direction of
  latent space holds the same variance, like isotropic noise) means the latents hold no
  information.

Usage by the trainer (see :func:`verdict` for the dict keys)::

    # after each epoch (from the second on), against the previous epoch's poses; steps:
    # the coarse search grid, 360 / base_psi deg and 2 t_extent_px / (t_ngrid - 1) px
    pc = pose_change(R_prev, t_prev, R, t, step_deg=15.0, t_step_px=3.3)
    history.append({"epoch": e, "phase": "hps", "pose_change": pc})
    final = {"apix_A": apix, "radius_start_px": r0, "view_coverage": view_coverage(R),
             "fsc0143_A": res["fsc0143_A"], "latent_structure": latent_structure(z)}
    v = verdict(history, final, n_images=N, D=D)
    write_verdict(outdir, v)  # OUTDIR/verdict.json, atomically

Every returned dict holds plain Python numbers, lists and bools (JSON-serialisable).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryofield.io.atomic import write_text_atomic
from cryofield.physics.rotation import geodesic_distance_rad
from cryofield.physics.so3_grid import direction_pixels, grid_size, ids_to_rotations

__all__ = [
    "AXIAL_COLLAPSE",
    "MIN_OCCUPANCY_RATIO",
    "POSE_MOVED_MAX_FRACTION",
    "Verdict",
    "format_verdict",
    "latent_structure",
    "pose_change",
    "pose_settle_limit",
    "verdict",
    "view_coverage",
    "write_verdict",
]

#: a search epoch that moves more than this fraction of images by more than the step
#: (the coarse grid spacing) has not converged
POSE_MOVED_MAX_FRACTION = 0.15
#: below SMALL_SET images the search sees the same few images every epoch and the field
#: overfits them, so a wrong solution settles too: the limit is POSE_MOVED_MAX_SMALL_SET.
#: Measured with the defaults at D=32: 300 images at SNR 0.1 (median error 20 deg, half
#: maps agreeing to 24 A) 12-14% over its last search epochs; 1000 images at SNR 0.4
#: (median error 2.2 deg) 2.8%; the same with 15% junk images (which keep moving) 7.7%.
SMALL_SET = 2000
POSE_MOVED_MAX_SMALL_SET = 0.08
#: below this fraction of images moved, poses count as settled (between: a note)
POSE_MOVED_OK_FRACTION = 0.1
#: the half-map refinement's global check (the epoch after the search) may move at most
#: this fraction of the images to another basin. Measured with the defaults (D=64, SNR
#: 0.1): converged runs 0.0-1.5% (demo-homo 0.1%, pref_view 0.0%, n1k 0.6-1.0%, snr0.05
#: 0.5%, `--quick` 1.5%); wrong maps 4.6-8.4% (pref_view after a restart, 10.5 deg
#: median and a map 3.06x the true-pose one, 6.5%, which no other check caught; collapsed
#: searches 4.6-8.4%); a C4 particle searched without its symmetry with 8.5% of its
#: poses off by more than 10 deg, 4.5% (modulo the group)
REFINE_MOVED_MAX_FRACTION = 0.05
#: above this (and up to the limit) the check passes with a note
REFINE_MOVED_OK_FRACTION = 0.02
#: fewer images than this: the gold-standard check is reported, not judged (the smallest
#: set it was measured on; tiny test sets of 48-320 images moved 14-74% whether their
#: poses were right or not: few images per direction, near-symmetric blobs)
REFINE_CHECK_MIN_IMAGES = 1000
#: occupied direction cells over the number ``N`` uniform draws would occupy: below this
#: the views collapsed onto a few directions
MIN_OCCUPANCY_RATIO = 0.15
#: largest eigenvalue of the orientation tensor ``mean(v v^T)`` (1/3 for uniform views,
#: 1/2 at most for a girdle, 1 for all views on one axis): above this the views lie
#: around one axis
AXIAL_COLLAPSE = 0.65
#: both ends of the axis hold at least this share of the views near the axis: "two
#: antipodal blobs" (a real preferred orientation is more often one blob; a flat particle
#: lying on either face gives two, which the verdict's message says)
ANTIPODAL_BALANCE = 0.2
#: half-angle of the cone around the axis counted as "near" (deg)
AXIS_CONE_DEG = 35.0
#: fewer images than this: coverage is not judged
MIN_IMAGES_COVERAGE = 30
#: fewer latents than this: structure is not judged
MIN_IMAGES_LATENT = 20
#: latent spectrum: smallest relative excess of the top eigenvalue fraction over the
#: isotropic control, ``(top - iso) / (1 - iso)``
SPECTRUM_MIN_EXCESS = 0.15
#: latent clusterability: smallest gap ``log(W_k / W_1)`` below a Gaussian's of the same
#: covariance (Tibshirani et al. 2001)
GAP_MIN = 0.15
#: fraction of the Nyquist frequency the half-map FSC must reach at least (resolution
#: ``Nyquist / fraction``), or the search start band if that is coarser
FSC_MIN_NYQUIST_FRACTION = 0.25


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, np.float64)


# --------------------------------------------------------------------- poses
def gold_standard_ok(frac_moved: float, n_images: int) -> bool | None:
    """The gold-standard check on the share of images the half-map refinement's global
    search moved to another basin: ``frac_moved <= REFINE_MOVED_MAX_FRACTION``, or None
    (not judged) under ``REFINE_CHECK_MIN_IMAGES`` images (the verdict's rule and the
    restart's)."""
    if n_images < REFINE_CHECK_MIN_IMAGES:
        return None
    return frac_moved <= REFINE_MOVED_MAX_FRACTION


def pose_settle_limit(n_images: int) -> float:
    """Largest fraction of images that may change basin in a search epoch for the poses
    to count as settled: ``POSE_MOVED_MAX_FRACTION``, or ``POSE_MOVED_MAX_SMALL_SET`` for
    sets under ``SMALL_SET`` images (the verdict's rule and the search's stopping rule)."""
    return POSE_MOVED_MAX_FRACTION if n_images >= SMALL_SET else POSE_MOVED_MAX_SMALL_SET


def pose_change(
    R_prev: Any,
    t_prev: Any | None,
    R: Any,
    t: Any | None,
    step_deg: float,
    t_step_px: float,
    operators: Any | None = None,
    frame: Any | None = None,
) -> dict[str, Any]:
    """How far poses moved between two epochs, modulo a point group if one is given.

    Parameters
    ----------
    R_prev, R
        ``(N, 3, 3)`` rotations (torch or numpy) before and after, same particle order.
    t_prev, t
        ``(N, 2)`` shifts in training px, or ``None`` (shifts not compared).
    step_deg
        Rotation step (deg): a move larger than this counts as a change of pose. Use the
        coarse (level-0) grid spacing of the search, ``360 / base_psi`` (15 deg by
        default): an image that moves farther landed in another basin.
    t_step_px
        Shift step (training px), e.g. the coarse translation grid step
        ``2 t_extent_px / (t_ngrid - 1)``.
    operators
        ``(G, 3, 3)`` point group (torch): each new pose is compared with the nearest
        equivalent ``R g`` of the old one (equivalent poses give the same image). ``None``
        or one operator: C1.
    frame
        :class:`~cryofield.physics.symmetry.SymmetryFrame` of a map whose symmetry axes are
        not the group's (a search without symmetry): both epochs' poses are first moved to
        where the map is symmetric about the box centre in the group's axes
        (:func:`~cryofield.physics.symmetry.apply_symmetry_frame`; there ``R g`` share one
        shift), then compared modulo ``operators``.

    Returns
    -------
    dict
        ``n``; ``step_deg``, ``t_step_px``; ``frac_moved`` (rotation moved more than
        ``step_deg`` or shift more than ``t_step_px``), ``frac_rot_moved``,
        ``frac_shift_moved``; ``median_deg``, ``p90_deg`` (geodesic angle moved, deg);
        ``median_shift_px``.
    """
    Ra = torch.as_tensor(_np(R_prev), dtype=torch.float64)
    Rb = torch.as_tensor(_np(R), dtype=torch.float64)
    if Ra.shape != Rb.shape or Ra.ndim != 3 or Ra.shape[1:] != (3, 3):
        raise ValueError(
            f"rotations must both be (N, 3, 3), got {tuple(Ra.shape)}, {tuple(Rb.shape)}"
        )
    if frame is not None:
        from cryofield.physics.symmetry import apply_symmetry_frame

        zero = torch.zeros(Ra.shape[0], 2, dtype=torch.float64)
        ta = zero if t_prev is None else torch.as_tensor(_np(t_prev), dtype=torch.float64)
        tb = zero if t is None else torch.as_tensor(_np(t), dtype=torch.float64)
        Ra, ta = apply_symmetry_frame(Ra, ta, frame)
        Rb, tb = apply_symmetry_frame(Rb, tb, frame)
        if t_prev is not None and t is not None:
            t_prev, t = ta, tb
    if operators is not None and len(operators) > 1:
        from cryofield.physics.symmetry import nearest_equivalent

        ops = torch.as_tensor(_np(operators), dtype=torch.float64)
        Rb = nearest_equivalent(Rb, Ra, ops)[0]
    n = int(Ra.shape[0])
    ang = np.degrees(geodesic_distance_rad(Ra, Rb).numpy()) if n else np.zeros(0)
    rot_moved = ang > step_deg
    if t_prev is not None and t is not None:
        d = np.linalg.norm(_np(t) - _np(t_prev), axis=-1)
        shift_moved = d > t_step_px
        med_shift = float(np.median(d)) if n else float("nan")
    else:
        shift_moved = np.zeros(n, bool)
        med_shift = float("nan")
    moved = rot_moved | shift_moved

    def frac(m: np.ndarray) -> float:
        return float(m.mean()) if n else float("nan")

    return {
        "n": n,
        "step_deg": float(step_deg),
        "t_step_px": float(t_step_px),
        "frac_moved": frac(moved),
        "frac_rot_moved": frac(rot_moved),
        "frac_shift_moved": frac(shift_moved),
        "median_deg": float(np.median(ang)) if n else float("nan"),
        "p90_deg": float(np.percentile(ang, 90)) if n else float("nan"),
        "median_shift_px": med_shift,
    }


def view_coverage(R: Any, level: int = 0, seed: int = 0) -> dict[str, Any]:
    """How the viewing directions cover the sphere.

    The viewing direction of pose ``R`` in the volume frame is ``R^T e_z``, the third row
    of ``R`` (RELION's matrix A, docs/dev/contracts.md). Directions are binned on the
    equal-area HEALPix cells of the pose-search grid (:func:`cryofield.physics.so3_grid.
    direction_pixels`; level 0: 192 cells, ~15 deg).

    Parameters
    ----------
    R
        ``(N, 3, 3)`` rotations.
    level
        Grid level of the cells.
    seed
        Seed of the uniform reference draws (entropy reference).

    Returns
    -------
    dict
        ``n``, ``n_cells``;
        ``occupied``: cells holding a view; ``occupied_uniform``: expected for ``N``
        uniform views, ``M (1 - (1 - 1/M)^N)``; ``occupancy_ratio`` their ratio (~1 for
        uniform views);
        ``entropy``: Shannon entropy of the cell counts over ``log M`` (1: every cell equal);
        ``entropy_uniform``: the same for ``N`` uniform views (mean of 16 draws),
        ``entropy_ratio``;
        ``top2_fraction``: share of the two fullest cells; ``antipodal_pair_fraction``:
        largest share of a cell plus its opposite cell;
        ``axial_concentration``: largest eigenvalue of ``mean(v v^T)`` (1/3 uniform, 1 all
        on one axis), ``axis`` its eigenvector; ``axis_fraction``: share of views within
        ``AXIS_CONE_DEG`` of ``+-axis``; ``antipodal_balance``: the smaller end's share of
        those;
        ``collapsed`` (bool) and ``collapse_kind`` (``"two antipodal blobs"``, ``"few
        directions"`` or ``""``): collapsed when (a) ``axial_concentration >=
        AXIAL_COLLAPSE``, ``axis_fraction >= 0.5`` and ``antipodal_balance >=
        ANTIPODAL_BALANCE`` (two opposite blobs), or (b) ``occupancy_ratio <
        MIN_OCCUPANCY_RATIO`` (the views occupy a small part of the sphere); never for
        fewer than ``MIN_IMAGES_COVERAGE`` views.
    """
    Rn = _np(R)
    if Rn.ndim != 3 or Rn.shape[1:] != (3, 3):
        raise ValueError(f"rotations must be (N, 3, 3), got {Rn.shape}")
    n = int(Rn.shape[0])
    M = grid_size(level)[0]
    out: dict[str, Any] = {"n": n, "n_cells": M}
    if n == 0:
        return {**out, "collapsed": False, "collapse_kind": ""}
    v = Rn[:, 2, :]
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    counts = np.bincount(direction_pixels(v, level), minlength=M).astype(np.float64)
    occupied = int((counts > 0).sum())
    occ_uniform = M * (1.0 - (1.0 - 1.0 / M) ** n)

    def entropy(c: np.ndarray) -> float:
        p = c[c > 0] / c.sum()
        return float(-(p * np.log(p)).sum() / math.log(M))

    rng = np.random.default_rng(seed)
    ent_u = float(np.mean([entropy(rng.multinomial(n, np.full(M, 1.0 / M))) for _ in range(16)]))
    ent = entropy(counts)
    top2 = float(np.sort(counts)[-2:].sum() / n)
    # the cell opposite each cell: the cell of minus its centre (the centre of a cell is
    # the viewing direction of its grid points)
    anti = direction_pixels(-_cell_centres(level), level)
    pair = float((counts + counts[anti]).max() / n)
    T = v.T @ v / n
    w, U = np.linalg.eigh(T)
    axis = U[:, -1]
    cosang = v @ axis
    near = np.abs(cosang) >= math.cos(math.radians(AXIS_CONE_DEG))
    n_near = int(near.sum())
    pos = int((near & (cosang > 0)).sum())
    balance = min(pos, n_near - pos) / n_near if n_near else 0.0
    out.update(
        occupied=occupied,
        occupied_uniform=float(occ_uniform),
        occupancy_ratio=float(occupied / occ_uniform),
        entropy=ent,
        entropy_uniform=ent_u,
        entropy_ratio=float(ent / ent_u) if ent_u > 0 else float("nan"),
        top2_fraction=top2,
        antipodal_pair_fraction=pair,
        axial_concentration=float(w[-1]),
        axis=[float(a) for a in axis],
        axis_fraction=float(n_near / n),
        antipodal_balance=float(balance),
    )
    kind = ""
    if n >= MIN_IMAGES_COVERAGE:
        if w[-1] >= AXIAL_COLLAPSE and n_near / n >= 0.5 and balance >= ANTIPODAL_BALANCE:
            kind = "two antipodal blobs"
        elif out["occupancy_ratio"] < MIN_OCCUPANCY_RATIO:
            kind = "few directions"
    out["collapsed"] = bool(kind)
    out["collapse_kind"] = kind
    return out


def _cell_centres(level: int) -> np.ndarray:
    """``(M, 3)`` centres of the level's direction cells: the viewing directions of the
    grid points with in-plane index 0."""
    M, n_psi = grid_size(level)
    R = ids_to_rotations(level, torch.arange(M) * n_psi, dtype=torch.float64)
    return R[:, 2, :].numpy()


# --------------------------------------------------------------------- latents
def _kmeans_inertia(x: np.ndarray, k: int, rng: np.random.Generator, n_init: int = 3) -> float:
    """Smallest within-cluster sum of squares of k-means (k-means++ start, Lloyd)."""
    n = len(x)
    if k <= 1:
        return float(((x - x.mean(0)) ** 2).sum())
    best = math.inf
    for _ in range(n_init):
        centres = [x[rng.integers(n)]]
        d2 = ((x - centres[0]) ** 2).sum(1)
        for _ in range(1, k):
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
            centres.append(x[rng.choice(n, p=p)])
            d2 = np.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
        c = np.array(centres)
        for _ in range(50):
            dist = ((x[:, None, :] - c[None]) ** 2).sum(-1)
            lab = dist.argmin(1)
            new = np.array([x[lab == j].mean(0) if (lab == j).any() else c[j] for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        inertia = float(((x[:, None, :] - c[None]) ** 2).sum(-1).min(1).sum())
        best = min(best, inertia)
    return best


def _top_fraction(x: np.ndarray) -> float:
    ev = np.linalg.eigvalsh(np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]))
    tot = ev.sum()
    return float(ev[-1] / tot) if tot > 0 else float("nan")


def latent_structure(
    z: Any,
    seed: int = 0,
    n_controls: int = 8,
    max_points: int = 5000,
    max_points_kmeans: int = 2000,
    k_max: int = 5,
) -> dict[str, Any]:
    """Whether the latents hold structure, against controls without structure.

    Three comparisons, each on the same number of points and dimensions (a seeded subset
    of at most ``max_points``; ``n_controls`` control draws each):

    1. **Spectrum vs isotropic** (the "flat PCA spectrum" of a failed run): the fraction of
       the variance on the first principal component, ``top``, against ``iso`` for an
       isotropic Gaussian of the same total variance (its sample spectrum is not exactly
       flat: Marchenko-Pastur spread). Effect: ``(top - iso) / (1 - iso)``; significant
       from ``max(SPECTRUM_MIN_EXCESS, 4 sd)``.
    2. **Spectrum vs shuffled** (each column permuted independently: keeps each column's
       distribution, destroys the correlations between columns): ``top`` against the
       shuffled ``top``. The trainer's latents start from variability analysis rotated
       to principal axes, i.e. uncorrelated columns, so this comparison is ~0 for good runs
       too; it only adds evidence (structure along non-axis directions). Same effect form
       and threshold as 1.
    3. **Clusterability vs Gaussian of the same covariance** (the gap statistic,
       Tibshirani, Walther & Hastie 2001, J. R. Stat. Soc. B 63:411): for ``k = 2 ..
       k_max``, ``gap_k = mean_ref log(W_k / W_1) - log(W_k / W_1)`` with ``W_k`` the
       k-means within-cluster sum of squares (on at most ``max_points_kmeans`` points).
       Catches clusters whatever their orientation, and ``zdim = 1``, where the spectrum
       says nothing. Significant from ``max(GAP_MIN, 4 sd)``.

    Parameters
    ----------
    z
        ``(N, zdim)`` latents.
    seed
        Seed of the subset and the controls.

    Returns
    -------
    dict
        ``n``, ``zdim``, ``explained_variance_ratio`` (list, descending), ``top_fraction``,
        ``top_fraction_isotropic``, ``top_fraction_shuffled``, ``spectrum_excess``,
        ``correlation_excess``, ``gap``, ``gap_k``; ``score`` (the largest of the three
        effects over its threshold, ``>= 1``: structured; NaN when not judged) and
        ``structured`` (bool).
    """
    x = _np(z)
    x = x.reshape(len(x), -1)
    n, zdim = x.shape
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"n": int(n), "zdim": int(zdim)}
    if n > max_points:
        x = x[np.sort(rng.choice(n, max_points, replace=False))]
    m = len(x)
    x = x - x.mean(0)
    total = float((x**2).sum() / max(m - 1, 1))
    if m < MIN_IMAGES_LATENT or zdim == 0 or not np.isfinite(total) or total <= 0:
        return {**out, "score": float("nan"), "structured": False}
    ev = np.linalg.eigvalsh(np.cov(x, rowvar=False).reshape(zdim, zdim))[::-1]
    ev = np.clip(ev, 0, None)
    top = float(ev[0] / ev.sum())
    sd_tot = math.sqrt(total / zdim)
    iso = [_top_fraction(rng.normal(size=(m, zdim)) * sd_tot) for _ in range(n_controls)]
    shuf = [
        _top_fraction(np.stack([rng.permutation(c) for c in x.T], axis=1))
        for _ in range(n_controls)
    ]

    def effect(ctrl: list[float]) -> tuple[float, float]:
        c = float(np.mean(ctrl))
        if zdim == 1 or c >= 1.0:
            return 0.0, math.inf
        eff = (top - c) / (1.0 - c)
        sd = float(np.std(ctrl, ddof=1)) / (1.0 - c) if len(ctrl) > 1 else 0.0
        return eff, max(SPECTRUM_MIN_EXCESS, 4.0 * sd)

    spec_eff, spec_thr = effect(iso)
    corr_eff, corr_thr = effect(shuf)
    # gap statistic against a Gaussian with the same covariance
    xs = x[np.sort(rng.choice(m, min(m, max_points_kmeans), replace=False))]
    cov = np.cov(xs, rowvar=False).reshape(zdim, zdim)
    w, U = np.linalg.eigh(cov)
    L = U * np.sqrt(np.clip(w, 0, None))
    ks = list(range(2, max(2, min(k_max, len(xs) - 1)) + 1))

    def log_ratios(data: np.ndarray) -> np.ndarray:
        w1 = _kmeans_inertia(data, 1, rng)
        return np.array([math.log(max(_kmeans_inertia(data, k, rng), 1e-300) / w1) for k in ks])

    obs = log_ratios(xs)
    n_ref = max(2, n_controls // 2)
    ref = np.array([log_ratios(rng.normal(size=xs.shape) @ L.T) for _ in range(n_ref)])
    gaps = ref.mean(0) - obs
    j = int(np.argmax(gaps))
    gap = float(gaps[j])
    gap_thr = max(GAP_MIN, 4.0 * float(ref[:, j].std(ddof=1)))
    score = max(spec_eff / spec_thr, corr_eff / corr_thr, gap / gap_thr)
    out.update(
        explained_variance_ratio=[float(e) for e in ev / ev.sum()],
        top_fraction=top,
        top_fraction_isotropic=float(np.mean(iso)),
        top_fraction_shuffled=float(np.mean(shuf)),
        spectrum_excess=float(spec_eff),
        correlation_excess=float(corr_eff),
        gap=gap,
        gap_k=int(ks[j]),
        score=float(score),
        structured=bool(score >= 1.0),
    )
    return out


# --------------------------------------------------------------------- verdict
@dataclasses.dataclass
class Verdict:
    """Whether a run converged.

    Attributes
    ----------
    converged : every check that could be made passed.
    headline : one line: what went wrong first, or a summary of a good run (without the
        words "converged" / "did not converge": show it as ``"did not converge: " +
        headline``).
    reasons : the failed checks, one sentence each (empty when converged).
    advice : what to try (empty when converged).
    checks : every check made: ``{"name", "ok", "message"}`` (``ok`` None: not judged).
    """

    converged: bool
    headline: str
    reasons: list[str]
    advice: str
    checks: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (the content of ``verdict.json``)."""
        return dataclasses.asdict(self)


def _f(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v


def verdict(
    history: Sequence[dict[str, Any]], final: dict[str, Any], n_images: int, D: int
) -> Verdict:
    """Judge a run from its per-epoch diagnostics and its final state.

    Parameters
    ----------
    history
        One dict per finished epoch, in order, with at least ``phase`` (``"hps"``: a
        search epoch; any other phase, e.g. ``"sgd"``, ``"local"``, ``"fixed"``, is not)
        and, from the second epoch on,
        ``pose_change`` (:func:`pose_change` between the previous epoch's poses and this
        one's; omit it or give None when not measured). Other keys (``epoch``, ``loss``,
        ...) are ignored.
    final
        Final state, every key optional: ``apix_A`` (training pixel size, A),
        ``radius_start_px`` (search start radius, training px), ``view_coverage``
        (:func:`view_coverage` of the final poses), ``fsc0143_A`` (half-map FSC = 0.143
        resolution, A; homogeneous runs), ``latent_structure`` (:func:`latent_structure`
        of the final latents; heterogeneous runs).
    n_images
        Number of particles.
    D
        Training box size (px).

    Rules (each check is skipped when its input is missing)
    -------------------------------------------------------
    1. **Pose stability**: the last search epoch (``phase == "hps"``) with a
       ``pose_change`` moved at most ``POSE_MOVED_MAX_FRACTION`` (15 %) of the images by
       more than the step. A search that finds the same poses again (within the coarse
       grid spacing) is converged; one that keeps moving many images is not. (Symmetric
       particles can jump between equivalent poses: see the advice.) Measured on a tiny
       run (D=32, 320 images, 15 deg step): noise-free projections, 66 / 31 / 13 / 6 %
       moved in search epochs 2-5 (median 2 deg in the last); pure-noise images 80 / 56
       / 62 / 69 % (median 59 deg). With the defaults at SNR 0.1: demo-homo (5000
       images, D=64; poses found, median error 1.9 deg) 9.3 % in its last search epoch;
       1000 images at D=32 (poses not found, median error 54 deg, yet a self-consistent
       map) 20-25 % over its last ten search epochs. Sets under ``SMALL_SET`` (2000)
       images must settle below ``POSE_MOVED_MAX_SMALL_SET`` (8 %): 300 images at SNR 0.1
       (median error 20 deg) settled at 12-14 %, 1000 good images at 2.8 % and 1000 with
       15 % junk at 7.7 % (junk keeps moving: much junk in a small set can fail this).
    2. **View coverage** (only when poses were searched, i.e. some phase is ``"hps"`` or
       there is no history): not collapsed (:func:`view_coverage`: two antipodal blobs,
       or far fewer occupied directions than uniform views would occupy).
    3. **Half-map resolution**: the FSC = 0.143 resolution is finer than the band the
       search started at, ``D apix / radius_start_px`` (default radii: ~10.7 px), and
       than ``Nyquist / FSC_MIN_NYQUIST_FRACTION`` (8 px), whichever is coarser. Half
       maps that do not even agree at the search's starting band limit come from poses
       that do not fit the data. This check only catches gross failures: the two halves
       share the poses' reference (one model), so images aligned to it agree even when
       they hold no signal ("Einstein from noise"). Measured on a tiny run (D=32, 320
       images, 3 A/px, limit 24 A): pure-noise images with the poses their search
       found, 11.1 A (the true images: 9.1 A); the true images at random poses, 34.5 A.
    1b. **Gold-standard check** (homogeneous ab initio runs): the half-map refinement
       (``phase == "refine"``) searches every image again, globally, against the half
       map it did not contribute to; its ``pose_change`` moved at most
       ``REFINE_MOVED_MAX_FRACTION`` (5 %) of the images by more than the step (judged
       from ``REFINE_CHECK_MIN_IMAGES`` images on). A right
       map explains its own images at the poses the search gave them; a wrong,
       self-consistent one (which passes checks 1-3) sends many elsewhere (numbers at
       the constant).
    4. **Latent structure** (heterogeneous runs): :func:`latent_structure` finds
       structure. Latents indistinguishable from isotropic noise hold no information
       (failed poses, or no heterogeneity resolvable with these images).

    Returns
    -------
    Verdict
    """
    checks: list[dict[str, Any]] = []
    reasons: list[str] = []
    actions: set[str] = set()
    first_fail = ""

    def add(
        name: str, ok: bool | None, message: str, short: str = "", tips: tuple[str, ...] = ()
    ) -> None:
        nonlocal first_fail
        checks.append({"name": name, "ok": ok, "message": message})
        if ok is False:
            reasons.append(message)
            actions.update(tips)
            if not first_fail:
                first_fail = short or message

    phases = [h.get("phase") for h in history]
    searched = not history or "hps" in phases
    # 1. pose stability
    last = None
    for h in history:
        if h.get("phase") == "hps" and h.get("pose_change"):
            last = h
    if last is None:
        add("pose stability", None, "pose stability not measured (fewer than two search epochs)")
    else:
        pc = last["pose_change"]
        frac, step = float(pc["frac_moved"]), float(pc["step_deg"])
        ep = last.get("epoch")
        where = f"in search epoch {ep}" if ep is not None else "in the last search epoch"
        if pc.get("modulo"):
            where += f" (modulo {pc['modulo']}, in the map's frame)"
        msg = (
            f"{100 * frac:.0f}% of the images moved by more than {step:.3g} deg or "
            f"{float(pc['t_step_px']):.3g} px {where} (median {float(pc['median_deg']):.1f} deg)"
        )
        limit = pose_settle_limit(n_images)
        ok = frac <= limit
        if not ok and n_images < SMALL_SET:
            msg += f" (a set of {n_images} images must settle below {100 * limit:.0f}%)"
        add(
            "pose stability",
            ok,
            msg if ok else f"poses did not settle: {msg}",
            "poses still change from one search epoch to the next",
            ("contrast", "images", "longer", "symmetry"),
        )
        if ok and frac > POSE_MOVED_OK_FRACTION:
            checks[-1]["message"] += " (many images still move: more search epochs may help)"
    # 1b. the half-map refinement's global check
    refined = [h for h in history if h.get("phase") == "refine" and h.get("pose_change")]
    if refined:
        pc = refined[-1]["pose_change"]
        frac = float(pc["frac_moved"])
        msg = (
            f"{100 * frac:.1f}% of the images found a better pose more than "
            f"{float(pc['step_deg']):.3g} deg away when searched again against the "
            "gold-standard half maps"
        )
        ok = gold_standard_ok(frac, n_images)
        if ok is None:
            msg += f" (not judged under {REFINE_CHECK_MIN_IMAGES} images)"
        elif not ok:
            msg = (
                f"the map does not explain its own images: {msg} (a converged run: under "
                f"{100 * REFINE_MOVED_OK_FRACTION:.0f}%); a wrong map that is consistent "
                "with itself"
            )
        elif frac > REFINE_MOVED_OK_FRACTION:
            msg += " (more than a converged run: check the map)"
        add(
            "gold-standard check",
            ok,
            msg,
            "the images do not fit the map at their poses",
            ("images", "longer"),
        )
    # 2. view coverage
    cov = final.get("view_coverage")
    if cov is None or "occupancy_ratio" not in cov:
        add("view coverage", None, "view coverage not measured")
    elif not searched:
        add("view coverage", None, "view coverage not judged (poses from the input file)")
    else:
        desc = (
            f"{cov['occupied']} of {cov['n_cells']} direction cells occupied "
            f"({100 * float(cov['occupancy_ratio']):.0f}% of what uniform views would fill), "
            f"axial concentration {float(cov['axial_concentration']):.2f}"
        )
        if cov.get("collapsed"):
            kind = cov.get("collapse_kind") or "collapsed"
            add(
                "view coverage",
                False,
                f"viewing directions collapsed ({kind}): {desc}; a failed search typically "
                "puts every image at one or two directions (a strong preferred orientation "
                "can look similar: check 2-D class averages)",
                f"viewing directions collapsed into {kind}",
                ("contrast", "images", "lowres"),
            )
        else:
            add("view coverage", True, f"viewing directions spread: {desc}")
    # 3. resolution
    res = _f(final.get("fsc0143_A"))
    apix = _f(final.get("apix_A"))
    if res is None or apix is None or apix <= 0:
        add("half-map resolution", None, "half-map FSC not measured")
    else:
        nyq_A = 2.0 * apix
        limit = nyq_A / FSC_MIN_NYQUIST_FRACTION
        r0 = _f(final.get("radius_start_px"))
        if r0 is not None and r0 > 0:
            limit = max(limit, D * apix / r0)
        ok = math.isfinite(res) and res <= limit
        msg = (
            f"half-map FSC=0.143 at {res:.1f} A (Nyquist {nyq_A:.1f} A; a converged run "
            f"reaches at least {limit:.1f} A)"
        )
        add(
            "half-map resolution",
            ok,
            msg if ok else f"half maps disagree: {msg}",
            f"half maps agree only to {res:.1f} A",
            ("contrast", "images", "longer"),
        )
    # 4. latents
    ls = final.get("latent_structure")
    if ls is None:
        pass
    elif not math.isfinite(float(ls.get("score", float("nan")))):
        add("latent structure", None, "latent structure not judged (too few particles)")
    else:
        desc = (
            f"PC1 holds {100 * float(ls['top_fraction']):.0f}% of the variance (isotropic "
            f"noise: {100 * float(ls['top_fraction_isotropic']):.0f}%, shuffled columns: "
            f"{100 * float(ls['top_fraction_shuffled']):.0f}%), cluster gap "
            f"{float(ls['gap']):.2f}, score {float(ls['score']):.2f} (>= 1: structured)"
        )
        ok = bool(ls.get("structured"))
        add(
            "latent structure",
            ok,
            f"latent space structured: {desc}" if ok else f"latent space looks like noise: {desc}",
            "the latent space has no structure (flat PCA spectrum)",
            ("latent", "images"),
        )
    converged = not reasons
    if D > 128 and actions & {"contrast", "latent"}:
        actions.add("lowres")
    advice = [
        text
        for key, text in (
            ("contrast", "Check the particle contrast (--contrast) and the CTF parameters."),
            (
                "images",
                f"Use more particles (only {n_images}: ab initio usually needs thousands)."
                if n_images < 1000
                else "More particles help.",
            ),
            ("longer", "Search longer (raise --hps-images and --epochs)."),
            (
                "lowres",
                f"Start at lower resolution: a lower --radius-start, or a smaller box "
                f"(cryofield downsample to D=64-128; now D={D})."
                if D > 128
                else "Start at lower resolution (a lower --radius-start).",
            ),
            (
                "symmetry",
                "A symmetric particle's poses may jump between equivalent orientations.",
            ),
            (
                "latent",
                "For the latents, check the poses first (a homogeneous run on the same "
                "particles); the sample may also hold no heterogeneity these images resolve.",
            ),
        )
        if key in actions
    ]
    if converged:
        parts = []
        for c in checks:
            if c["ok"] and c["name"] == "pose stability":
                parts.append("poses stable")
            elif c["ok"] and c["name"] == "view coverage":
                parts.append("views spread")
            elif c["ok"] and c["name"] == "half-map resolution" and res is not None:
                parts.append(f"half-map FSC=0.143 at {res:.1f} A")
            elif c["ok"] and c["name"] == "latent structure":
                parts.append("latent space structured")
        judged = [c for c in checks if c["ok"] is not None]
        headline = ", ".join(parts) if judged else "no check could be made (nothing measured)"
    else:
        headline = first_fail
    return Verdict(
        converged=converged,
        headline=headline,
        reasons=reasons,
        advice=" ".join(advice),
        checks=checks,
    )


def format_verdict(v: Verdict) -> str:
    """Multi-line text of a verdict (for run.log)."""
    lines = [("converged: " if v.converged else "did not converge: ") + v.headline]
    lines += [f"  - {r}" for r in v.reasons]
    if v.advice:
        lines.append(f"  try: {v.advice}")
    return "\n".join(lines)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_verdict(outdir: str | Path, v: Verdict) -> Path:
    """Write ``OUTDIR/verdict.json`` atomically (keys ``converged, headline, reasons,
    advice, checks``); returns its path."""
    from cryofield.inference.rundir import VERDICT_FILE

    path = Path(outdir) / VERDICT_FILE
    write_text_atomic(path, json.dumps(_json_safe(v.to_dict()), indent=2) + "\n")
    return path
