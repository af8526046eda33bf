"""The per-epoch convergence numbers of ``metrics.jsonl`` besides the loss: how far the
poses moved, the view coverage, and the half-map FSC (homogeneous runs) or the latent
structure (heterogeneous runs), from :mod:`cryofield.inference.diagnostics`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cryofield.inference.config import TrainConfig
from cryofield.inference.data import BatchMaker
from cryofield.model.tables import LatentTable, PoseTable

#: images back-projected for the per-epoch half-map FSC of homogeneous runs
DIAG_MAX_IMAGES = 20_000


@torch.no_grad()
def epoch_checks(
    cfg: TrainConfig,
    batches: BatchMaker,
    poses: PoseTable,
    latents: LatentTable | None,
    R0: torch.Tensor,
    t0: torch.Tensor,
    *,
    map_symmetry: str = "C1",
) -> dict[str, Any]:
    """How far the poses moved from ``R0, t0`` this epoch (:func:`~cryofield.inference.
    diagnostics.pose_change` with the search's coarse steps: an image that moved farther
    landed in another basin), their view coverage, and :func:`map_check`. With a point
    group (``cfg.symmetry``) a pose is compared with the nearest equivalent of the old one
    and the coverage is that of the equivalent views (:func:`symmetric_views`).

    ``map_symmetry``: the run's point group while its search still runs without it
    (``cfg.symmetry`` C1, before ``Trainer.align_symmetry``). The map then has that symmetry
    about axes of its own, and an image of a symmetric particle may jump between equivalent
    poses from one search epoch to the next without any change of its image. The poses are
    then compared modulo the group in the map's frame: :func:`~cryofield.physics.symmetry.
    symmetry_frame` on this epoch's back-projection (cropped to 16 px) gives ``A`` and the
    symmetry centre ``c``, both epochs' poses are moved into that frame
    (:func:`~cryofield.physics.symmetry.apply_symmetry_frame`, where equivalent poses
    ``R g`` share one shift) and compared as above; ``pose_change`` then also has
    ``modulo``, ``frame_score`` (the map's correlation with its symmetry mates in that
    frame) and ``frac_moved_c1`` (the plain count)."""
    from cryofield.inference.diagnostics import pose_change, view_coverage
    from cryofield.physics.symmetry import symmetry_frame, symmetry_operators

    c = cfg
    R, t = poses.all()
    R_cmp, t_cmp = R.detach().cpu(), t.detach().cpu()
    ops = symmetry_operators(c.symmetry)
    map_ops = symmetry_operators(map_symmetry)
    t_step = 2 * float(c.t_extent_px or 0.0) / max(c.t_ngrid - 1, 1) or 1.0
    steps = dict(step_deg=360.0 / c.base_psi, t_step_px=t_step)
    halves = None
    if map_ops.shape[0] > 1 and ops.shape[0] <= 1:
        halves = backprojected_halves(c, batches, R, t)
        vol = (halves[0] + halves[1]).cpu()
        # a 16-px box: axes within ~1.5 deg (tests/physics/test_symmetry_alignment.py), far
        # below the 15 deg step, at 1/5-1/7 the cost of the alignment's box (O: 4 s vs 22 s)
        frame = symmetry_frame(vol, map_ops, max_D=16)
        pc = pose_change(R0.cpu(), t0.cpu(), R_cmp, t_cmp, **steps, operators=map_ops,
                         frame=frame)  # fmt: skip
        pc.update(modulo=map_symmetry, frame_score=float(frame.score),
                  frac_moved_c1=pose_change(R0.cpu(), t0.cpu(), R_cmp, t_cmp,
                                            **steps)["frac_moved"])  # fmt: skip
    else:
        pc = pose_change(R0.cpu(), t0.cpu(), R_cmp, t_cmp, **steps, operators=ops)
    vc = view_coverage(symmetric_views(R.detach().cpu(), c.symmetry), seed=c.seed)
    keep = ("occupancy_ratio", "entropy_ratio", "antipodal_pair_fraction", "collapsed")
    out = {"pose_change": pc, "view_coverage": {k: vc[k] for k in keep if k in vc}}
    out.update(map_check(cfg, batches, latents, R, t, halves=halves))
    return out


def diagnostic_rows(cfg: TrainConfig, n: int) -> np.ndarray:
    """The images back-projected for the per-epoch checks: all, or a fixed random subset
    of ``DIAG_MAX_IMAGES`` (sorted), so the cost stays bounded at any ``n``."""
    rows = np.arange(n)
    if n > DIAG_MAX_IMAGES:
        gen = np.random.default_rng(cfg.seed)
        rows = np.sort(gen.choice(n, DIAG_MAX_IMAGES, replace=False))
    return rows


def backprojected_halves(
    cfg: TrainConfig, batches: BatchMaker, R: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Half maps ``(D, D, D)`` of the :func:`diagnostic_rows` images at poses ``R (N, 3, 3)``,
    shifts ``t (N, 2)`` (training px), with ``cfg.symmetry`` imposed, and their count."""
    from cryofield.inference.refine import backproject_halves_batched
    from cryofield.physics.symmetry import symmetry_operators

    rows = diagnostic_rows(cfg, len(batches.source))
    h1, h2 = backproject_halves_batched(batches, R[rows], t[rows], rows=rows,
                                        symmetry=symmetry_operators(cfg.symmetry))  # fmt: skip
    return h1, h2, len(rows)


def symmetric_views(R: torch.Tensor, symmetry: str, max_views: int = 200_000) -> torch.Tensor:
    """The poses whose view coverage a run with point group ``symmetry`` has: every pose's
    ``|G|`` equivalents ``R g`` (a search in one asymmetric unit finds views of one
    ``1 / |G|`` of the sphere, whose equivalents cover all of it); at most ``max_views``
    of them (evenly spaced images). ``(N, 3, 3) -> (N' |G|, 3, 3)``; C1: ``R``."""
    from cryofield.physics.symmetry import equivalent_poses, symmetry_operators

    ops = symmetry_operators(symmetry)
    if ops.shape[0] <= 1:
        return R
    n_img = max(1, min(R.shape[0], max_views // ops.shape[0]))
    rows = torch.linspace(0, R.shape[0] - 1, n_img).round().long()
    return equivalent_poses(R[rows].float(), ops).reshape(-1, 3, 3)


@torch.no_grad()
def map_check(
    cfg: TrainConfig,
    batches: BatchMaker,
    latents: LatentTable | None,
    R: torch.Tensor,
    t: torch.Tensor,
    halves: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> dict[str, Any]:
    """Per-epoch convergence numbers beyond the poses. Homogeneous: the half-map FSC
    of a back-projection at the current poses (:func:`backprojected_halves`, at most
    ``DIAG_MAX_IMAGES`` images, a fixed random subset, so the cost stays bounded at any N;
    ``halves``: already computed). Heterogeneous: the structure of the latent space
    (:func:`~cryofield.inference.diagnostics.latent_structure`)."""
    from cryofield.inference.diagnostics import latent_structure

    if latents is not None:
        ls = latent_structure(latents.all().cpu(), seed=cfg.seed)
        return {"latent_structure": {k: v for k, v in ls.items() if np.ndim(v) == 0}}
    from cryofield.physics.fsc import fsc, resolution_at

    h1, h2, n_rows = halves if halves is not None else backprojected_halves(cfg, batches, R, t)
    res = resolution_at(fsc(h1, h2), 0.143, batches.apix_A)[1]
    return {"halfmap_fsc0143_A": float(res), "halfmap_images": n_rows}
