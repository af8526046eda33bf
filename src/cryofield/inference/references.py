"""What the pose search of a training epoch compares the images against: its settings
for a step plan, the latent groups whose maps are the references of heterogeneous
runs (the search and local-refinement epochs use one map per k-means centre), and those
maps kept between the batches of the assigned search (:class:`ReferenceMaps`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cryofield.inference.config import TrainConfig
from cryofield.inference.pose_search import (
    FrequencyPoints,
    SearchSettings,
    centre_references,
    level0_slices,
    shift_grid,
)
from cryofield.inference.schedule import StepPlan

#: ``grid_fn(z (G, zdim), radius_px) -> (G, Dc, Dc, Dc)`` complex Fourier grids of the
#: field at ``z`` on the ball of ``radius_px`` (the same ``Dc`` for the same radius)
GridFn = Callable[[torch.Tensor, float], torch.Tensor]

#: latents k-means looks at, at most (an even subsample of a larger table)
KMEANS_MAX_ROWS = 20000


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
        centre=cfg.search_centre,
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


def latent_centres(z: torch.Tensor, k: int, max_rows: int = KMEANS_MAX_ROWS) -> torch.Tensor:
    """``(k, zdim)`` k-means centres (:func:`kmeans_groups`) of the latents ``z (N, zdim)``
    (at most ``max_rows`` of them, evenly spaced), on the CPU."""
    z = z.detach().float().cpu()
    if z.shape[0] > max_rows:
        z = z[torch.linspace(0, z.shape[0] - 1, max_rows).long()]
    return kmeans_groups(z, k)[1]


@dataclass
class ReferenceMaps:
    """The references of the assigned heterogeneous search (``het_search: assigned``),
    kept between batches: the field at the k-means centres of the whole latent table, as
    Fourier grids and their level-0 slices (:func:`~cryofield.inference.pose_search.
    level0_slices`), built at radii a little above the search's so that the growing
    search radius is covered for a while. Every batch rebuilds a few of them from the
    field as it is (:meth:`refresh`, round robin); :meth:`covers` says when all must be
    built again (:meth:`build`).

    Attributes
    ----------
    key
        What the maps were built for (the trainer's epoch, roll-backs, latent start).
    centres
        ``(G, zdim)`` on the grids' device.
    grids
        ``(G, Dc, Dc, Dc)`` complex.
    slices0
        ``(G, Q, M)`` level-0 slices at ``radius_lo_px``.
    radius_hi_px, radius_lo_px
        Radii of the grids and of the slices.
    grid_key
        The level-0 grid and symmetry of ``slices0``.
    centres_px
        ``(G, 3)`` the centres of mass the maps were moved from
        (:func:`~cryofield.inference.pose_search.centre_references` at :meth:`build`, the
        same for every map and kept by :meth:`refresh`; zero where the search does not
        centre): pass to ``search_poses(centres_px=...)``.
    next_ref
        The map :meth:`refresh` rebuilds next.
    """

    key: tuple
    centres: torch.Tensor
    grids: torch.Tensor
    slices0: torch.Tensor
    radius_hi_px: float
    radius_lo_px: float
    grid_key: tuple
    centres_px: torch.Tensor
    next_ref: int = 0

    @staticmethod
    def _grid_key(settings: SearchSettings) -> tuple:
        return (settings.base_nside, settings.base_psi, settings.symmetry)

    @classmethod
    def build(
        cls,
        key: tuple,
        grid_fn: GridFn,
        z: torch.Tensor | None,
        groups: int,
        D: int,
        points: FrequencyPoints,
        settings: SearchSettings,
        margin_px: float = 0.5,
        centres: torch.Tensor | None = None,
    ) -> ReferenceMaps:
        """The maps at the ``groups`` k-means centres of ``z (N, zdim)`` (all latents), or
        at ``centres`` (the same maps again at a larger radius): grids on the ball of the
        next whole radius above ``settings.radius_hi_px`` (the cube the search's radius
        needs anyway), slices at ``radius_lo_px + margin_px`` (at most ``D / 2 - 1``)."""
        hi = min(D / 2 - 1, math.floor(settings.radius_hi_px) + 1.0)
        lo = min(hi, settings.radius_lo_px + margin_px)
        if centres is None:
            assert z is not None
            centres = latent_centres(z, groups)
        grids, offsets = cls._centred(grid_fn(centres, hi), D, settings)
        slices0 = level0_slices(grids, D, points, settings, lo)
        return cls(key, centres.to(grids.device), grids, slices0, hi, lo,
                   cls._grid_key(settings), offsets)  # fmt: skip

    @staticmethod
    def _centred(
        grids: torch.Tensor, D: int, settings: SearchSettings, c: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The grids centred (``c (3,)``: moved by ``-c``, the maps' frame kept) and their
        centres ``(G, 3)``; unchanged with zeros where the search does not centre."""
        if not settings.centres_grid:
            return grids, torch.zeros(grids.shape[0], 3, device=grids.device)
        if c is None:
            return centre_references(grids, D, settings.symmetry)
        cc = c.to(grids.device).expand(grids.shape[0], 3)
        return shift_grid(grids, D, -cc), cc.clone()

    def covers(self, key: tuple, settings: SearchSettings) -> bool:
        """Whether these maps serve a search with ``settings`` under ``key``."""
        return (
            key == self.key
            and self._grid_key(settings) == self.grid_key
            and settings.radius_hi_px <= self.radius_hi_px
            and settings.radius_lo_px <= self.radius_lo_px
        )

    @torch.no_grad()
    def refresh(
        self, grid_fn: GridFn, D: int, points: FrequencyPoints, settings: SearchSettings, n: int
    ) -> None:
        """Rebuild ``n`` maps (the next ones in turn) from the field as it is now."""
        G = self.centres.shape[0]
        j = (self.next_ref + torch.arange(min(n, G))) % G
        self.next_ref = int(j[-1] + 1) % G
        j = j.to(self.grids.device)
        # moved by the centre of the maps as built: one frame for all of them
        grids, offsets = self._centred(grid_fn(self.centres[j], self.radius_hi_px), D, settings,
                                       self.centres_px[0])  # fmt: skip
        self.grids[j] = grids
        self.centres_px[j] = offsets
        self.slices0[j] = level0_slices(grids, D, points, settings, self.radius_lo_px)

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """``(B,)`` the nearest centre of every latent ``z (B, zdim)``: the map each image
        searches level 0 against."""
        return torch.cdist(z.detach().float(), self.centres.float()).argmin(dim=1)
