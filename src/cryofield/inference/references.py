"""What the pose search of a training epoch compares the images against: its settings
for a step plan, and the latent groups whose maps are the references of heterogeneous
runs (the search and local-refinement epochs use one map per k-means centre)."""

from __future__ import annotations

import torch

from cryofield.inference.config import TrainConfig
from cryofield.inference.pose_search import SearchSettings
from cryofield.inference.schedule import StepPlan


def search_settings(cfg: TrainConfig, plan: StepPlan) -> SearchSettings:
    """The hierarchical search of ``cfg`` at the radii of ``plan``."""
    return SearchSettings(
        base_nside=cfg.base_nside,
        base_psi=cfg.base_psi,
        levels=cfg.search_levels,
        n_keep=cfg.n_keep,
        t_extent_px=float(cfg.t_extent_px or 0.0),
        t_ngrid=cfg.t_ngrid if cfg.t_extent_px else 1,
        radius_lo_px=plan.search_lo_px,
        radius_hi_px=plan.search_hi_px,
        symmetry=cfg.symmetry,
    )


def kmeans_groups(z: torch.Tensor, k: int, iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic small k-means: labels ``(B,)`` and centres ``(k, zdim)``."""
    k = min(k, z.shape[0])
    order = torch.argsort(z[:, 0])
    centres = z[order[torch.linspace(0, z.shape[0] - 1, k).long()]].clone()
    labels = torch.zeros(z.shape[0], dtype=torch.long)
    for _ in range(iters):
        labels = torch.cdist(z, centres).argmin(1)
        for j in range(k):
            m = labels == j
            if m.any():
                centres[j] = z[m].mean(0)
    return labels, centres
