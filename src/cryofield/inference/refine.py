"""Gold-standard pose refinement against back-projected half maps (homogeneous runs).

After the global search the neural field is a smooth, band-limited model of the map: its
own render reaches a lower resolution than a direct back-projection with the same poses
(measured on demo-homo: 19.3 A against 13.1 A at FSC=0.5 to the truth), and poses refined
against it inherit its errors. This phase refines the poses against what the data hold at
every frequency instead, as RELION's 3D auto-refine does (Scheres 2012, JMB 415:406;
Scheres & Chen 2012, Nat. Methods 9:853):

1. the images are split into two halves (even / odd particle index, as the consensus map
   of :mod:`cryofield.inference.consensus`) and each half is back-projected with its
   current poses and CTFs (:class:`~cryofield.physics.backproject.FourierBackprojector`);
2. the half maps' FSC gives, per shell, the weight ``sqrt(2 FSC / (1 + FSC))`` (the
   ``C_ref`` of Rosenthal & Henderson 2003, JMB 333:721: the expected correlation of a
   half map with the true map), set to 0 past the first shell where FSC < 0.143; each half
   map times these weights is the reference of its own half (no image is aligned to a
   map it contributed to, so noise cannot build up in both halves alike);
3. every image gets a local pose search around its current pose
   (:func:`~cryofield.inference.pose_search.local_refine_poses`, a 2x oversampled grid of
   its half's reference) out to the 0.143 shell plus a margin;
4. repeat until the half-map resolution stops improving (less than ``min_gain`` relative
   improvement) and fewer than ``settle_fraction`` of the images moved by more than the
   final angular step, or ``max_iters`` iterations.

The images and CTFs are the training ones (:class:`~cryofield.inference.data.BatchMaker`:
contrast, soft window and normalisation applied), so the reference and the images are in
the same units.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cryofield.inference.consensus import backproject_sets
from cryofield.inference.data import BatchMaker
from cryofield.inference.pose_search import SearchSettings, local_refine_poses, search_poses
from cryofield.logs import get_logger
from cryofield.physics.backproject import FourierBackprojector
from cryofield.physics.fourier import fft3_centered, ifft2_centered
from cryofield.physics.fsc import fsc, resolution_at
from cryofield.physics.lattice import radial_index_3d
from cryofield.physics.rotation import geodesic_distance_rad
from cryofield.physics.symmetry import symmetry_operators

log = get_logger("train")


@dataclass
class RefineSettings:
    """Settings of :func:`refine_poses_gold_standard` (angles in degrees, shifts in px)."""

    max_iters: int = 4
    step_deg: float = 2.0
    t_step_px: float = 0.5
    levels: int = 3
    min_gain: float = 0.01
    settle_fraction: float = 0.05
    margin_px: float = 3.0
    radius_max_px: float | None = None
    chunk: int = 256
    soft: bool = True
    #: the first iteration also searches every image globally against its half map and
    #: keeps the global pose where it explains the image better (images the search left
    #: in a wrong basin, which a local search cannot leave); None: no global search
    global_search: SearchSettings | None = None
    prior_deg: float | None = 1.0
    #: point group of the map (:mod:`cryofield.physics.symmetry`): the half maps insert
    #: every image at its equivalent poses
    symmetry: str = "C1"
    #: >= 2: each image's local search runs against its half map without its fold (of
    #: ``folds`` per half), so its own noise does not hold it where it is (see
    #: :func:`pose_floor`); 0: against the whole half map
    folds: int = 0


@dataclass
class RefineResult:
    """Poses after refinement and what every iteration did."""

    rotations: torch.Tensor
    shifts_px: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)


def halfmap_weights(curve: torch.Tensor, threshold: float = 0.143) -> torch.Tensor:
    """Per-shell reference weights from a half-map FSC.

    Parameters
    ----------
    curve
        ``(S,)`` FSC of the two half maps per shell (:func:`cryofield.physics.fsc.fsc`).
    threshold
        Shells from the first one below ``threshold`` on get weight 0.

    Returns
    -------
    torch.Tensor
        ``(S,)`` float32 ``sqrt(2 FSC / (1 + FSC))`` (Rosenthal & Henderson 2003), clipped
        at 0; shell 0 gets 1.
    """
    c = curve.double().clamp(min=0.0, max=1.0)
    w = torch.sqrt(2 * c / (1 + c))
    below = torch.nonzero(curve[1:] < threshold)
    if below.numel():
        w[int(below[0]) + 1 :] = 0.0
    w[0] = 1.0
    return w.float()


def reference_grid(
    vol: torch.Tensor, weights: torch.Tensor, radius_px: float, oversample: int = 2
) -> tuple[torch.Tensor, int]:
    """Complex centred Fourier grid of ``vol`` on an ``oversample``-times finer lattice,
    weighted per shell and cropped to the ball of ``radius_px``.

    Parameters
    ----------
    vol
        ``(D, D, D)`` real map, origin at ``D // 2``.
    weights
        ``(S,)`` per-shell weights (shell ``r`` = ``r / D`` cycles/px; beyond ``S``: 0).
    radius_px
        Ball radius in Fourier px of the box ``D``.
    oversample
        Lattice refinement (voxel spacing ``1 / (oversample D)`` cycles/px).

    Returns
    -------
    grid : torch.Tensor
        ``(Dc, Dc, Dc)`` complex64, DC at ``Dc // 2``, zero outside the ball (the layout of
        :func:`cryofield.model.field.fourier_grid`).
    D_grid : int
        ``oversample * D`` (for :func:`~cryofield.inference.pose_search.slice_grid`).
    """
    D = vol.shape[-1]
    Dg = int(oversample) * D
    pad = (Dg - D) // 2
    big = torch.nn.functional.pad(vol.float(), [pad] * 6)
    r = min(float(radius_px), D / 2 - 1)
    Dc = 2 * (math.ceil(r * oversample) + 2)
    lo = Dg // 2 - Dc // 2
    ft = fft3_centered(big)[lo : lo + Dc, lo : lo + Dc, lo : lo + Dc]
    rad = radial_index_3d(Dc, device=vol.device) / oversample  # Fourier px of box D
    wpad = torch.cat([weights.float(), torch.zeros(1)]).to(vol.device)  # 0 past the curve
    shell = rad.round().long().clamp(max=weights.shape[0])
    w = torch.where(rad <= r, wpad[shell], torch.zeros((), device=vol.device))
    return (ft * w).to(torch.complex64), Dg


class TrainingImages:
    """The training images of a :class:`BatchMaker` in real space (contrast, window and
    ``1 / batches.scale`` applied), indexable like an image source: the inverse of
    :meth:`BatchMaker.images_ft`'s crop, on ``batches.device``."""

    def __init__(self, batches: BatchMaker) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches.source)

    def __getitem__(self, idx: np.ndarray) -> torch.Tensor:
        b = self.batches
        D = b.points.D
        f = torch.zeros(len(idx), D * D, dtype=torch.complex64, device=b.device)
        f[:, b.points.flat_index] = b.images_ft(np.asarray(idx))
        return ifft2_centered(f.reshape(-1, D, D)).real


def backproject_halves_batched(
    batches: BatchMaker,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    chunk: int = 256,
    rows: np.ndarray | None = None,
    symmetry: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half maps (even / odd image index) of the training images at the given poses.

    The images are the training ones (:class:`TrainingImages`), so the maps are in the
    units of the field's normalised images. ``rows`` (``(n,)`` image indices; default
    all) back-projects a subset: ``rotations`` and ``shifts_px`` then hold the poses of
    those rows, in that order. ``symmetry`` (``(G, 3, 3)`` point-group operators) inserts
    every image at its ``G`` equivalent poses. See
    :func:`cryofield.inference.consensus.backproject_sets`.

    Returns
    -------
    half1, half2 : torch.Tensor
        ``(D, D, D)`` maps of the even and the odd images.
    """
    n = rotations.shape[0]
    rows = np.arange(n) if rows is None else np.asarray(rows)
    ctf = batches.ctf_params
    h1, h2 = backproject_sets(
        TrainingImages(batches), rotations, shifts_px,
        None if ctf is None else ctf.subset(torch.as_tensor(rows)), batches.apix_A,
        rows=rows, chunk=chunk, symmetry=symmetry,
    )  # fmt: skip
    return h1.volume(), h2.volume()


def refine_poses_gold_standard(
    batches: BatchMaker,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    settings: RefineSettings | None = None,
) -> RefineResult:
    """Refine all poses against FSC-weighted half maps (see the module docstring).

    Parameters
    ----------
    batches
        Training images and CTFs of the ``N`` particles.
    rotations, shifts_px
        ``(N, 3, 3)`` and ``(N, 2)`` px starting poses.
    settings
        :class:`RefineSettings`.

    Returns
    -------
    RefineResult
        The refined poses and, per iteration, ``fsc0143_px`` / ``fsc0143_A`` (half maps at
        the poses it started from), ``radius_px`` (scoring radius), ``moved_fraction``
        (images whose rotation moved by more than the last angular step or shift by more
        than the last translation step) and ``median_moved_deg``.
    """
    s = settings or RefineSettings()
    D = batches.points.D
    nyq = D / 2 - 1
    rmax = min(s.radius_max_px if s.radius_max_px is not None else nyq, nyq)
    R = rotations.float().to(batches.device).clone()
    t = shifts_px.float().to(batches.device).clone()
    n = R.shape[0]
    last_step = s.step_deg / 2 ** (s.levels - 1)
    last_t = s.t_step_px / 2 ** (s.levels - 1)
    history: list[dict[str, float]] = []
    best_px = 0.0
    ops = symmetry_operators(s.symmetry)
    rows = np.arange(n)
    half, fold = _split_folds(n, rows, max(s.folds, 1))
    for it in range(1, s.max_iters + 1):
        if s.folds >= 2:
            halves = _backproject_halves(batches, R, t, rows, half, s.chunk, ops)
            h1, h2 = halves[0].volume(), halves[1].volume()
        else:
            h1, h2 = backproject_halves_batched(batches, R, t, s.chunk, symmetry=ops)
        curve = fsc(h1, h2)
        res_px, res_A = resolution_at(curve, 0.143, batches.apix_A)
        weights = halfmap_weights(curve)
        radius = float(min(rmax, res_px + s.margin_px))
        # whole-half references: the local search's (folds off) and the global check's
        rescue = it == 1 and s.global_search is not None
        grids = (
            [reference_grid(h, weights, radius) for h in (h1, h2)]
            if (s.folds < 2 or rescue)
            else []
        )
        rescued = None
        if rescue:
            R, t, rescued = _global_rescue(batches, R, t, grids, s.global_search, s.chunk)
        local = dict(
            step_deg=s.step_deg, t_step_px=s.t_step_px, levels=s.levels, iters_per_level=1,
            soft=s.soft, prior_deg=s.prior_deg,
        )  # fmt: skip
        if s.folds >= 2:
            R_new, t_new = _fold_out_refine(
                batches, halves, R, t, rows, rows, half, fold, weights, radius, s.chunk,
                f"refine {it}", ops, **local,
            )  # fmt: skip
        else:
            R_new, t_new = R.clone(), t.clone()
            for h, sel, xft, ctf in _half_batches(batches, n, s.chunk, f"refine {it}"):
                grid, Dg = grids[h]
                R_new[sel], t_new[sel] = local_refine_poses(
                    grid, Dg, xft, ctf, batches.points, R[sel], t[sel], radius, **local
                )[:2]
        ang = torch.rad2deg(geodesic_distance_rad(R, R_new))
        dt = (t_new - t).norm(dim=-1)
        moved = float(((ang > last_step * 1.01) | (dt > last_t * 1.01)).float().mean())
        rec = dict(
            iteration=float(it), fsc0143_px=float(res_px), fsc0143_A=float(res_A),
            radius_px=radius, moved_fraction=moved, median_moved_deg=float(ang.median()),
        )  # fmt: skip
        if rescued is not None:
            rec["rescued_fraction"] = rescued
        history.append(rec)
        log.info(
            "refine %d: half maps FSC 0.143 at %.1f A (shell %.1f), scored to %.1f px; "
            "%.1f%% of images moved (median %.2f deg)",
            it, res_A, res_px, radius, 100 * moved, rec["median_moved_deg"],
        )  # fmt: skip
        R, t = R_new, t_new
        gain = (res_px - best_px) / max(best_px, 1e-9)
        best_px = max(best_px, float(res_px))
        if it > 1 and gain < s.min_gain and moved < s.settle_fraction:
            break
    return RefineResult(R, t, history)


def _global_rescue(
    batches: BatchMaker,
    R: torch.Tensor,
    t: torch.Tensor,
    grids: list[tuple[torch.Tensor, int]],
    settings: SearchSettings,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Global search of every image against its half's reference; an image takes the
    found pose where its error at the search's last radius is lower than at its current
    pose. Returns the poses and the fraction of images that took the found pose."""
    n = R.shape[0]
    R, t = R.clone(), t.clone()
    rescued = 0
    for h, rows, xft, ctf in _half_batches(batches, n, chunk, "refine: global check"):
        grid, Dg = grids[h]
        found = search_poses(grid, Dg, xft, ctf, batches.points, settings)
        # the current pose's error at the same radius (a local search that cannot move)
        cur = local_refine_poses(grid, Dg, xft, ctf, batches.points, R[rows], t[rows],
                                 settings.radius_hi_px, step_deg=1e-6, t_step_px=0.0,
                                 levels=1)[2]  # fmt: skip
        better = found.error < cur
        R[rows[better]] = found.rotations[better]
        t[rows[better]] = found.shifts_px[better]
        rescued += int(better.sum())
    log.info("refine: the global search found a better pose for %d of %d images", rescued, n)
    return R, t, rescued / max(n, 1)


def _half_batches(
    batches: BatchMaker, n: int, chunk: int, desc: str
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Chunks of the ``n`` images split by half set (even / odd index), with progress:
    ``(half, rows (b,), images_ft (b, M), ctf (b, M))``."""
    bar = tqdm(total=n, desc=desc, unit="img", leave=False, disable=None)
    try:
        for b0 in range(0, n, chunk):
            idx = np.arange(b0, min(n, b0 + chunk))
            xft, ctf = batches.images_ft(idx), batches.ctf(idx)
            for h in (0, 1):
                sel = np.flatnonzero(idx % 2 == h)
                if sel.size:
                    rows = torch.as_tensor(idx[sel], device=batches.device)
                    yield h, rows, xft[sel], ctf[sel]
            bar.update(len(idx))
    finally:
        bar.close()


@dataclass
class PoseFloor:
    """What :func:`pose_floor` found: the refined poses of ``rows`` and how."""

    rows: np.ndarray
    rotations: torch.Tensor
    shifts_px: torch.Tensor
    fsc0143_A: float
    radius_px: float
    folds: int


def pose_floor(
    batches: BatchMaker,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    rows: np.ndarray | None = None,
    refine_rows: np.ndarray | None = None,
    folds: int = 8,
    step_deg: float = 2.0,
    t_step_px: float = 0.5,
    levels: int = 4,
    margin_px: float = 3.0,
    chunk: int = 256,
) -> PoseFloor:
    """The precision the images allow: every image aligned, from its true pose, to the
    half map of the true poses that does not contain it (an oracle for simulated data).

    The images of ``rows`` are split into halves (even / odd position) and each half into
    ``folds`` folds; each half is back-projected at the given (true) poses, and every
    image of ``refine_rows`` gets the local maximum-likelihood search of
    :func:`~cryofield.inference.pose_search.local_refine_poses` (posterior mean over the
    local grid, no prior, ``levels`` levels from ``step_deg`` / ``t_step_px``) against its
    half map *without its fold* (:meth:`FourierBackprojector.without`), FSC-weighted as in
    :func:`refine_poses_gold_standard` and scored to the half maps' FSC=0.143 shell plus
    ``margin_px``. The distance of the result from the true poses is the error of an
    ideal refinement: a map made with every other image at its true pose, and no
    self-attraction. Left in (each image in its own reference), the image's own noise sits
    on its slice at its true pose with a weight of ~1 / (images per voxel), a few percent
    at high frequency, and pulls it back there: on the demo set that halves the apparent
    error (median out-of-plane 0.8-1.0 deg instead of 1.4).

    Parameters
    ----------
    batches
        Training images and CTFs of the ``N`` particles.
    rotations, shifts_px
        ``(N, 3, 3)`` and ``(N, 2)`` px (training box) true poses of all particles.
    rows
        ``(n,)`` the images back-projected (default all; e.g. leave out junk).
    refine_rows
        The images aligned (a subset of ``rows``; default ``rows``).
    folds
        Folds per half (>= 2): the reference of an image lacks ``1 / folds`` of its half.

    Returns
    -------
    PoseFloor
        ``rotations`` ``(m, 3, 3)`` and ``shifts_px`` ``(m, 2)`` of ``rows = refine_rows``
        (sorted), the half maps' FSC=0.143 (A) and the scoring radius (Fourier px).
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    D = batches.points.D
    R = rotations.float().to(batches.device)
    t = shifts_px.float().to(batches.device)
    rows = np.arange(R.shape[0]) if rows is None else np.sort(np.asarray(rows, np.int64))
    todo = rows if refine_rows is None else np.sort(np.asarray(refine_rows, np.int64))
    if not np.isin(todo, rows).all():
        raise ValueError("refine_rows must be among rows")
    half, fold = _split_folds(R.shape[0], rows, folds)
    halves = _backproject_halves(batches, R, t, rows, half, chunk)
    curve = fsc(halves[0].volume(), halves[1].volume())
    res_px, res_A = resolution_at(curve, 0.143, batches.apix_A)
    radius = float(min(D / 2 - 1, res_px + margin_px))
    R_out, t_out = _fold_out_refine(
        batches, halves, R, t, rows, todo, half, fold, halfmap_weights(curve), radius, chunk,
        "pose floor", None, step_deg=step_deg, t_step_px=t_step_px, levels=levels,
        iters_per_level=1, soft=True, prior_deg=None,
    )  # fmt: skip
    return PoseFloor(todo, R_out.cpu(), t_out.cpu(), float(res_A), radius, folds)


def _split_folds(n: int, rows: np.ndarray, folds: int) -> tuple[np.ndarray, np.ndarray]:
    """``(n,)`` half (even / odd position in ``rows``) and fold (``0 .. folds - 1``) of
    every row of ``rows`` (other entries 0)."""
    half = np.zeros(n, np.int64)
    fold = np.zeros(n, np.int64)
    half[rows] = np.arange(rows.size) % 2
    fold[rows] = (np.arange(rows.size) // 2) % folds
    return half, fold


def _backproject_rows(
    batches: BatchMaker,
    R: torch.Tensor,
    t: torch.Tensor,
    sel: np.ndarray,
    sets: np.ndarray,
    n_sets: int,
    chunk: int,
    symmetry: torch.Tensor | None = None,
) -> list[FourierBackprojector]:
    """Accumulators of the training images ``sel`` at their poses ``R[sel]``, ``t[sel]``
    (``R``, ``t`` of all ``N`` particles), split by ``sets``; ``symmetry``: ``(G, 3, 3)``
    operators (each image inserted at its equivalent poses)."""
    at = torch.as_tensor(sel, device=R.device)
    ctf = batches.ctf_params
    return backproject_sets(
        TrainingImages(batches), R[at], t[at],
        None if ctf is None else ctf.subset(torch.as_tensor(sel)), batches.apix_A,
        rows=sel, sets=sets, n_sets=n_sets, chunk=chunk, symmetry=symmetry,
    )  # fmt: skip


def _backproject_halves(
    batches: BatchMaker,
    R: torch.Tensor,
    t: torch.Tensor,
    rows: np.ndarray,
    half: np.ndarray,
    chunk: int,
    symmetry: torch.Tensor | None = None,
) -> list[FourierBackprojector]:
    """The two half-set accumulators of ``rows`` (``half`` from :func:`_split_folds`)."""
    return _backproject_rows(batches, R, t, rows, half[rows], 2, chunk, symmetry)


def _fold_out_refine(
    batches: BatchMaker,
    halves: list[FourierBackprojector],
    R: torch.Tensor,
    t: torch.Tensor,
    rows: np.ndarray,
    todo: np.ndarray,
    half: np.ndarray,
    fold: np.ndarray,
    weights: torch.Tensor,
    radius: float,
    chunk: int,
    desc: str,
    symmetry: torch.Tensor | None = None,
    **local: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local refinement of the images ``todo`` (sorted, among ``rows``), each against its
    half map without its fold (the fold re-back-projected and subtracted,
    :meth:`FourierBackprojector.without`), weighted per shell by ``weights`` and cropped
    to ``radius``; ``local``: the settings of
    :func:`~cryofield.inference.pose_search.local_refine_poses`. Returns the ``(m, 3, 3)``
    rotations and ``(m, 2)`` shifts of ``todo``, in its order."""
    folds = int(fold[rows].max()) + 1 if rows.size else 1
    R_out, t_out = R[torch.as_tensor(todo)].clone(), t[torch.as_tensor(todo)].clone()
    bar = tqdm(total=todo.size, desc=desc, unit="img", leave=False, disable=None)
    try:
        for h in (0, 1):
            for f in range(folds):
                mine = rows[(half[rows] == h) & (fold[rows] == f)]
                sel = todo[(half[todo] == h) & (fold[todo] == f)]
                if sel.size == 0:
                    continue
                zeros = np.zeros(mine.size, np.int64)
                own = _backproject_rows(batches, R, t, mine, zeros, 1, chunk, symmetry)[0]
                out = halves[h].without(own)
                grid, Dg = reference_grid(out.volume(), weights, radius)
                for c0 in range(0, sel.size, chunk):
                    part = sel[c0 : c0 + chunk]
                    at = torch.as_tensor(part, device=R.device)
                    dst = torch.as_tensor(np.searchsorted(todo, part), device=R.device)
                    R_out[dst], t_out[dst] = local_refine_poses(
                        grid, Dg, batches.images_ft(part), batches.ctf(part), batches.points,
                        R[at], t[at], radius, **local,
                    )[:2]  # fmt: skip
                    bar.update(part.size)
    finally:
        bar.close()
    return R_out, t_out
