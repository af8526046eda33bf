"""The references of the heterogeneous search: k-means groups and the maps kept between
the batches of the assigned search (``het_search: assigned``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from synth import blob_volume, make_dataset

from cryofield.inference.config import TrainConfig
from cryofield.inference.data import ArraySource
from cryofield.inference.pose_search import (
    FrequencyPoints,
    SearchSettings,
    centre_references,
    level0_slices,
    shift_grid,
)
from cryofield.inference.references import ReferenceMaps, latent_centres
from cryofield.inference.trainer import Trainer
from cryofield.model.field import HartleyField, hartley_grid_to_fourier


def _grid_fn(field: HartleyField):
    def grid_fn(z: torch.Tensor, radius_px: float) -> torch.Tensor:
        grids, _ = field.grid_ht(radius_px, z)
        return hartley_grid_to_fourier(grids.float())

    return grid_fn


@torch.no_grad()
def test_reference_maps_build_refresh_and_assign():
    D = 16
    field = HartleyField(D, zdim=2, hidden=16, layers=1, n_freqs=4)
    z = torch.cat([torch.randn(30, 2) * 0.1 + 2, torch.randn(30, 2) * 0.1 - 2])
    pts = FrequencyPoints.build(D)
    st = SearchSettings(base_nside=1, base_psi=6, levels=1, radius_lo_px=3.0, radius_hi_px=5.0)
    maps = ReferenceMaps.build(("e1",), _grid_fn(field), z, 3, D, pts, st)
    assert maps.centres.shape == (3, 2) and maps.radius_hi_px == 6.0 and maps.radius_lo_px == 3.5
    assert torch.equal(maps.centres, latent_centres(z, 3))
    # the maps moved to their common centre of mass (the search's translation frame)
    moved, cen = centre_references(_grid_fn(field)(maps.centres, 6.0), D)
    assert torch.allclose(maps.grids, moved) and torch.allclose(maps.centres_px, cen)
    assert float(cen[0].norm()) > 0 and torch.equal(cen[0], cen[2])
    assert torch.allclose(maps.slices0, level0_slices(maps.grids, D, pts, st, 3.5))
    # every latent goes to its nearest centre
    d = torch.cdist(z, maps.centres)
    assert torch.equal(maps.assign(z), d.argmin(1))
    # still good for a little more radius; not for another key, grid or symmetry
    assert maps.covers(("e1",), dataclasses.replace(st, radius_hi_px=5.9, radius_lo_px=3.4))
    assert not maps.covers(("e1",), dataclasses.replace(st, radius_hi_px=6.5))
    assert not maps.covers(("e2",), st)
    assert not maps.covers(("e1",), dataclasses.replace(st, symmetry="C2"))
    # refresh: the next maps in turn from the field as it is now, the others kept
    old = maps.grids.clone()
    for p in field.parameters():
        p.add_(0.1)
    maps.refresh(_grid_fn(field), D, pts, st, 2)
    assert maps.next_ref == 2
    # the refreshed maps keep the frame of the maps as built
    cen = maps.centres_px.clone()
    new = shift_grid(_grid_fn(field)(maps.centres, 6.0), D, -cen)
    assert torch.allclose(maps.grids[:2], new[:2]) and torch.equal(maps.grids[2], old[2])
    assert torch.allclose(maps.slices0, level0_slices(maps.grids, D, pts, st, 3.5))
    maps.refresh(_grid_fn(field), D, pts, st, 2)  # round robin
    assert maps.next_ref == 1 and torch.allclose(maps.grids, new)


def test_latent_centres_subsample_a_large_table():
    z = torch.randn(50, 3)
    assert latent_centres(z, 4, max_rows=10).shape == (4, 3)
    assert torch.equal(latent_centres(z, 4), latent_centres(z, 4, max_rows=50))


def test_trainer_search_assigned_keeps_the_maps_and_exhaustive_does_not(tmp_path, one_thread):
    D, N = 16, 24
    data = make_dataset([blob_volume(D, 4), blob_volume(D, 4, seed=7)], N, snr=None, seed=5)
    cfg = TrainConfig(outdir=str(tmp_path), zdim=2, hidden=16, n_freqs=4, batch_size=8,
                      base_nside=1, base_psi=6, search_levels=1, het_search_groups=3,
                      het_search_refresh=1, epochs=2, hps_images=N).resolved(D)  # fmt: skip
    tr = Trainer(cfg, ArraySource(data.images, data.apix_A), data.ctf, tmp_path)
    plan = tr.schedule.plan(1, 0)
    b = tr.batches.batch(np.arange(8))
    R, t = tr._search(b.idx, b.images_ft, b.ctf, plan)
    assert R.shape == (8, 3, 3) and t.shape == (8, 2)
    maps = tr._het_maps
    assert maps.key == (0, 0, 0) and maps.next_ref == 0
    tr._search(b.idx, b.images_ft, b.ctf, plan)
    assert tr._het_maps is maps and maps.next_ref == 1  # one map rebuilt
    # the radius outgrows the maps within the epoch: all built again at the same centres
    wider = dataclasses.replace(plan, search_hi_px=plan.search_hi_px + 1.5,
                                search_lo_px=plan.search_lo_px + 1.5)  # fmt: skip
    tr.latents.set(torch.arange(N), torch.randn(N, 2))
    tr._search(b.idx, b.images_ft, b.ctf, wider)
    assert tr._het_maps is not maps and torch.equal(tr._het_maps.centres, maps.centres)
    assert tr._het_maps.radius_hi_px > maps.radius_hi_px
    maps = tr._het_maps
    tr.epoch = 1  # a new epoch: the centres of the table now
    tr._search(b.idx, b.images_ft, b.ctf, plan)
    assert tr._het_maps is not maps and tr._het_maps.next_ref == 0
    assert not torch.equal(tr._het_maps.centres, maps.centres)
    tr.cfg.het_search = "exhaustive"
    del tr._het_maps
    R2, _ = tr._search(b.idx, b.images_ft, b.ctf, plan)
    assert R2.shape == (8, 3, 3) and not hasattr(tr, "_het_maps")
