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
) -> dict[str, Any]:
    """How far the poses moved from ``R0, t0`` this epoch (:func:`~cryofield.inference.
    diagnostics.pose_change` with the search's coarse steps: an image that moved farther
    landed in another basin), their view coverage, and :func:`map_check`. With a point
    group (``cfg.symmetry``) a pose is compared with the nearest equivalent of the old one
    and the coverage is that of the equivalent views (:func:`symmetric_views`)."""
    from cryofield.inference.diagnostics import pose_change, view_coverage
    from cryofield.physics.symmetry import nearest_equivalent, symmetry_operators

    c = cfg
    R, t = poses.all()
    R_cmp = R.detach().cpu()
    ops = symmetry_operators(c.symmetry)
    if ops.shape[0] > 1:
        R_cmp = nearest_equivalent(R_cmp, R0.cpu(), ops)[0]
    t_step = 2 * float(c.t_extent_px or 0.0) / max(c.t_ngrid - 1, 1) or 1.0
    pc = pose_change(R0.cpu(), t0.cpu(), R_cmp, t.cpu(), step_deg=360.0 / c.base_psi,
                     t_step_px=t_step)  # fmt: skip
    vc = view_coverage(symmetric_views(R.detach().cpu(), c.symmetry), seed=c.seed)
    keep = ("occupancy_ratio", "entropy_ratio", "antipodal_pair_fraction", "collapsed")
    out = {"pose_change": pc, "view_coverage": {k: vc[k] for k in keep if k in vc}}
    out.update(map_check(cfg, batches, latents, R, t))
    return out


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
) -> dict[str, Any]:
    """Per-epoch convergence numbers beyond the poses. Homogeneous: the half-map FSC
    of a back-projection at the current poses (at most ``DIAG_MAX_IMAGES`` images, a
    fixed random subset, so the cost stays bounded at any N). Heterogeneous: the
    structure of the latent space (:func:`~cryofield.inference.diagnostics.
    latent_structure`)."""
    from cryofield.inference.diagnostics import latent_structure

    if latents is not None:
        ls = latent_structure(latents.all().cpu(), seed=cfg.seed)
        return {"latent_structure": {k: v for k, v in ls.items() if np.ndim(v) == 0}}
    from cryofield.inference.refine import backproject_halves_batched
    from cryofield.physics.fsc import fsc, resolution_at
    from cryofield.physics.symmetry import symmetry_operators

    n = len(batches.source)
    rows = np.arange(n)
    if n > DIAG_MAX_IMAGES:
        gen = np.random.default_rng(cfg.seed)
        rows = np.sort(gen.choice(n, DIAG_MAX_IMAGES, replace=False))
    h1, h2 = backproject_halves_batched(batches, R[rows], t[rows], rows=rows,
                                        symmetry=symmetry_operators(cfg.symmetry))  # fmt: skip
    res = resolution_at(fsc(h1, h2), 0.143, batches.apix_A)[1]
    return {"halfmap_fsc0143_A": float(res), "halfmap_images": len(rows)}
