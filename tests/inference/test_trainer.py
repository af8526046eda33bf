"""End-to-end training on tiny synthetic data: convergence, known poses, resume, outputs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from synth import blob_volume, make_dataset

from cryofield.analysis.metrics import pose_errors
from cryofield.errors import CryofieldError
from cryofield.inference.config import TrainConfig
from cryofield.inference.consensus import backproject_halves
from cryofield.inference.data import ArraySource
from cryofield.inference.pose_search import widened_translation_grid
from cryofield.inference.rundir import RunDir
from cryofield.inference.trainer import Trainer
from cryofield.physics.fsc import fsc


def _trainer(data, outdir, **kw) -> Trainer:
    D = data.images.shape[-1]
    base = dict(outdir=str(outdir), hidden=64, n_freqs=32, batch_size=16, lr_field=3e-3,
                steps_per_batch=4, search_levels=3, deterministic=True)  # fmt: skip
    base.update(kw)
    cfg = TrainConfig(**base).resolved(D)
    init = (data.rotations, data.shifts_px) if cfg.poses_from_file else None
    return Trainer(cfg, ArraySource(data.images, data.apix_A), data.ctf, outdir, init)


def test_ab_initio_on_tiny_box_finds_poses(tmp_path, one_thread):
    D, N = 32, 320
    data = make_dataset([blob_volume(D, 10)], N, snr=None, shift_px=1.5, seed=1)
    tr = _trainer(data, tmp_path, epochs=7, hps_images=5 * N, radius_start_px=5.0,
                  radius_search_px=10.0, hidden=128, n_freqs=64)  # fmt: skip
    tr.fit()
    run = RunDir(tmp_path)
    metrics = run.metrics()
    assert [m["phase"] for m in metrics] == ["hps"] * 5 + ["refine", "field"]
    losses = [m["loss"] for m in metrics if m["phase"] == "hps"]
    assert losses[-1] < 0.3 * losses[0]
    e5 = pose_errors(run.poses(5)["rotations"], data.rotations.numpy())
    e = pose_errors(run.poses()["rotations"], data.rotations.numpy())
    assert e5["rot_median_deg"] < 10.0, e5
    # the half-map refinement improves on the search (noiseless images)
    assert e["rot_median_deg"] < e5["rot_median_deg"], (e5, e)
    refine = metrics[5]["refine"]
    assert refine and refine[0]["fsc0143_A"] > 0 and "moved_fraction" in refine[-1]
    assert metrics[-1]["pose_change"]["frac_moved"] == 0.0  # field epochs keep the poses
    # the translation grid: counted from the second search epoch, grown by the rule
    # (pose_search.widened_translation_grid) with the step kept, and config.yaml follows
    grids = [m.get("translation_grid") for m in metrics]
    assert grids[0] is None and all(g is not None for g in grids[1:5]), grids
    for a, b in itertools.pairwise(grids[1:5]):
        wider = widened_translation_grid(a["extent_px"], a["ngrid"], a["frac_beyond"], D)
        assert (b["extent_px"], b["ngrid"]) == pytest.approx(wider or (a["extent_px"], a["ngrid"]))
        assert 2 * b["extent_px"] / (b["ngrid"] - 1) == pytest.approx(2 * (D / 10) / 6)
    last = widened_translation_grid(grids[4]["extent_px"], grids[4]["ngrid"],
                                    grids[4]["frac_beyond"], D) or (grids[4]["extent_px"],
                                                                    grids[4]["ngrid"])  # fmt: skip
    assert (tr.cfg.t_extent_px, tr.cfg.t_ngrid) == pytest.approx(last)
    assert run.config()["t_ngrid"] == tr.cfg.t_ngrid
    # per-epoch half-map FSC (noiseless images: the halves agree whatever the poses, so
    # only its presence is checked here; tests/inference/test_refine_gold.py has numbers)
    res = [m["halfmap_fsc0143_A"] for m in metrics]
    assert np.all(np.isfinite(res)) and all(m["halfmap_images"] == N for m in metrics)
    with np.load(tmp_path / "epoch_007" / "residuals.npz") as f:
        assert np.all(f["power"] > 0) and np.all(np.isfinite(f["residual"]))
    # the map was re-centred before the refinement: the field fitted to the centred
    # back-projection has its centre of mass at the box centre, and the poses moved with
    # it (their back-projection is the field's map)
    centres = {e: float(_field_centre(run, e, D).norm()) for e in (5, 7)}
    assert centres[7] < 0.5 < centres[5], centres
    p = run.poses()
    bp = backproject_halves(ArraySource(data.images, data.apix_A),
                            torch.as_tensor(p["rotations"]), torch.as_tensor(p["shifts_px"]),
                            data.ctf, data.apix_A)[0]  # fmt: skip
    field = run.load_field()
    with torch.no_grad():
        vol = field.render_volume(None, D) * field.output_scale
    assert float(fsc(vol, bp)[1:7].min()) > 0.95  # 1 px apart: < 0.6 at shell 5


def _field_centre(run: RunDir, epoch: int, D: int) -> torch.Tensor:
    """``(3,)`` centre of mass (px) of the field's map of ``epoch`` (to 10 px)."""
    from cryofield.inference.pose_search import reference_centres_px
    from cryofield.model.field import hartley_grid_to_fourier

    grid, _ = run.load_field(epoch).grid_ht(10.0)
    return reference_centres_px(hartley_grid_to_fourier(grid.detach().float()), D)[0]


def test_known_pose_reconstruction_matches_truth(tmp_path, one_thread):
    D, N = 32, 256
    vol = blob_volume(D, 10)
    data = make_dataset([vol], N, snr=None, shift_px=1.0, seed=2)
    tr = _trainer(data, tmp_path, epochs=6, poses_from_file=True, refine_poses=False,
                  batch_size=8)  # fmt: skip
    tr.fit()
    run = RunDir(tmp_path)
    assert run.epochs() == [1, 2, 3, 4, 5, 6]
    from cryofield.io.mrc import read_mrc

    rec, info = read_mrc(run.volume_path(), mmap=False)
    assert rec.shape == (D, D, D) and abs(info.apix_A - data.apix_A) < 1e-3
    curve = fsc(torch.as_tensor(np.asarray(rec)), vol)
    assert float(curve[1:4].min()) > 0.8, curve
    # the poses are kept exactly when not refined
    assert np.allclose(run.poses()["rotations"], data.rotations.numpy(), atol=1e-5)
    field = run.load_field()
    assert torch.allclose(field.render_volume(), torch.as_tensor(np.asarray(rec)), atol=1e-4)


def test_resume_gives_the_same_tables_as_an_uninterrupted_run(tmp_path, one_thread):
    D, N = 16, 48
    data = make_dataset([blob_volume(D, 5, width_px=1.5)], N, snr=2.0, shift_px=1.0, seed=3)
    kw = dict(epochs=3, hps_images=N, hidden=32, n_freqs=8, batch_size=12, base_nside=1,
              base_psi=6, search_levels=2, zdim=2, research_epochs=0)  # fmt: skip
    full = _trainer(data, tmp_path / "a", **kw)
    full.fit()
    # the epoch-2 state of the full run (there epoch 2 is not yet the final, local one)
    part = _trainer(data, tmp_path / "b", **{**kw, "epochs": 2, "local_refine_epochs": 0})
    part.fit()
    # "interrupted" after epoch 2: a fresh trainer restores epoch 2's state and continues
    resumed = _trainer(data, tmp_path / "b", **kw)
    st = torch.load(tmp_path / "b" / "epoch_002" / "state.pt", weights_only=True)
    resumed.load_state(st)
    resumed.fit()
    a, b = RunDir(tmp_path / "a"), RunDir(tmp_path / "b")
    assert b.epochs() == [1, 2, 3]
    pa, pb = a.poses(3), b.poses(3)
    assert np.array_equal(pa["rotations"], pb["rotations"])
    assert np.array_equal(pa["shifts_px"], pb["shifts_px"])
    assert np.array_equal(a.latents(3), b.latents(3))
    wa, wb = a.weights(3)["state_dict"], b.weights(3)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # metrics.jsonl holds one line per epoch
    assert [m["epoch"] for m in b.metrics()] == [1, 2, 3]
    assert [m["phase"] for m in a.metrics()] == ["hps", "sgd", "local"]


def test_divergence_rolls_back_and_halves_learning_rates(tmp_path, one_thread, caplog):
    D, N = 16, 32
    data = make_dataset([blob_volume(D, 4)], N, snr=None, seed=4)
    tr = _trainer(
        data, tmp_path, epochs=1, poses_from_file=True, hidden=16, n_freqs=4, field_fit="images"
    )  # the image-by-image steps roll back
    calls = {"n": 0}
    orig = tr._step

    def flaky(idx, plan, *batch):
        calls["n"] += 1
        return float("nan") if calls["n"] == 1 else orig(idx, plan, *batch)

    tr._step = flaky  # type: ignore[method-assign]
    tr.fit()
    assert tr.rollbacks == 1
    assert tr.opt_field.param_groups[0]["lr"] == pytest.approx(tr.cfg.lr_field / 2)
    assert RunDir(tmp_path).epochs() == [1]


def test_heterogeneous_search_by_latent_groups_updates_tables(tmp_path, one_thread):
    D, N = 16, 40
    data = make_dataset([blob_volume(D, 4), blob_volume(D, 4, seed=7)], N, snr=None, seed=5)
    tr = _trainer(data, tmp_path, epochs=1, hps_images=N, zdim=3, latent_warmup=0.0,
                  het_search_groups=3, hidden=16, n_freqs=4, base_nside=1, base_psi=6,
                  search_levels=1)  # fmt: skip
    z0 = tr.latents.all()
    tr.fit()
    run = RunDir(tmp_path)
    z = run.latents()
    assert z.shape == (N, 3) and not np.allclose(z, z0.numpy())
    R = run.poses()["rotations"]
    eye = np.broadcast_to(np.eye(3), R.shape)
    assert np.allclose(R @ R.transpose(0, 2, 1), eye, atol=1e-4)
    assert run.volume_path() is None  # heterogeneous runs write no single map


def test_latent_warmup_splits_the_search_into_consensus_then_per_state(tmp_path, one_thread):
    D, N = 16, 20
    data = make_dataset([blob_volume(D, 4)], N, snr=None, seed=5)
    tr = _trainer(data, tmp_path, epochs=7, hps_images=5 * N, zdim=2, latent_warmup=0.6,
                  hidden=8, n_freqs=2, research_epochs=0)  # fmt: skip
    assert tr.schedule.consensus_epochs == 3
    frozen = []
    for epoch in range(1, 8):
        tr.epoch = epoch - 1
        frozen.append(tr._z_frozen(tr.schedule.plan(epoch, (epoch - 1) * N)))
    assert frozen == [True] * 3 + [False] * 4
    assert [tr._wants_latent_init(e) for e in (3, 4)] == [False, True]
    tr.latent_init_epoch = 4  # set again in every later search epoch and after the search
    assert [tr._wants_latent_init(e) for e in (4, 5, 6)] == [False, True, True]
    tr.cfg.latent_refresh = False  # or only after the search, from the poses it found
    assert [tr._wants_latent_init(e) for e in (5, 6, 7)] == [False, True, False]
    # a whole-search warm-up (runs before 0.x stored a switch), or none
    assert TrainConfig.from_dict({"latent_warmup": True}).latent_warmup == 1.0
    tr = _trainer(data, tmp_path / "b", epochs=7, hps_images=5 * N, zdim=2, latent_warmup=0.0,
                  hidden=8, n_freqs=2)  # fmt: skip
    assert tr.schedule.consensus_epochs == 0
    assert [tr._wants_latent_init(e) for e in (1, 2)] == [False, True]
    tr.latent_init_epoch = 6  # the search ended at epoch 5 and epoch 6 set them again
    assert not tr._wants_latent_init(6)
    # the search again before the local epoch (default for heterogeneous runs): z is set at
    # its start and after it, even without the per-epoch refresh
    tr = _trainer(data, tmp_path / "c", epochs=8, hps_images=5 * N, zdim=2, hidden=8,
                  n_freqs=2, latent_refresh=False)  # fmt: skip
    assert [tr.schedule.phase_of_epoch(e) for e in (6, 7, 8)] == ["sgd", "hps", "local"]
    tr.latent_init_epoch = 6
    assert [tr._wants_latent_init(e) for e in (7, 8)] == [True, True]
    # refreshes during a search are linear; a start at settled poses classifies
    assert [tr.schedule.latent_init_method(e) for e in (5, 6, 7, 8)] == [
        "pca", "classes", "pca", "classes"]  # fmt: skip
    tr.cfg.latent_init = "pca"
    assert tr.schedule.latent_init_method(8) == "pca"
    with pytest.raises(CryofieldError, match="latent_warmup"):
        TrainConfig(latent_warmup=1.5).validate()


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(refine_folds=1), "refine_folds"),
        (dict(search_balance=-1.0), "search_balance"),
        (dict(search_balance_fraction=1.5), "search_balance_fraction"),
    ],
)
def test_refinement_and_balance_settings_are_range_checked(bad, match):
    with pytest.raises(CryofieldError, match=match):
        TrainConfig(**bad).validate()
    TrainConfig(refine_folds=4, search_balance=0.0).validate()


def test_search_goes_on_while_poses_have_not_settled(tmp_path, one_thread):
    """The search's stopping rule: pure-noise images never settle, so the search gets
    search_extend x its planned epochs more, the radius still growing at the planned rate
    up to the cap, and the longer plan is in config.yaml (a resumed run follows it)."""
    D, N = 16, 48
    data = make_dataset([blob_volume(D, 5, width_px=1.5)], N, snr=0.01, seed=6)
    kw = dict(hps_images=2 * N, field_images=N, hidden=16, n_freqs=4, batch_size=12,
              base_nside=1, base_psi=6, search_levels=1, radius_start_px=2.0,
              radius_search_px=4.0, refine_iters=1, search_cap_res_A=1.0)  # fmt: skip
    tr = _trainer(data, tmp_path / "a", **kw)
    assert tr.cfg.epochs == 2 + 1 + 1
    tr.fit()
    run = RunDir(tmp_path / "a")
    phases = [m["phase"] for m in run.metrics()]
    assert phases == ["hps"] * 4 + ["refine", "field"], phases
    radii = np.array([m["radius_px"] for m in run.metrics()[:4]])  # at each last batch
    assert np.diff(radii) == pytest.approx([1.0, 1.0, 1.0]), radii  # 1 px / epoch as planned
    saved = TrainConfig.load(tmp_path / "a" / "config.yaml")
    # the cap: 3/4 of Nyquist (search_cap_res_A is below it here)
    assert (saved.epochs, saved.hps_images, saved.radius_search_px) == (6, 4 * N, 6.0)
    st = torch.load(tmp_path / "a" / "epoch_004" / "state.pt", weights_only=True)
    assert st["search_extended"] == 2
    # search_extend 0: the plan as it was
    tr = _trainer(data, tmp_path / "b", **kw, search_extend=0.0)
    tr.fit()
    assert [m["phase"] for m in RunDir(tmp_path / "b").metrics()] == [
        "hps", "hps", "refine", "field"
    ]  # fmt: skip


def test_search_stops_early_once_poses_have_settled(tmp_path, one_thread):
    """The search's early stop: after two settled search epochs in a row (at most
    pose_settle_limit of the images changed basin), from half the planned search on, the
    next epoch is the search's last, its radius reaching the planned final radius by its
    end, and the shorter plan is in config.yaml. Not before half the plan, not after an
    unsettled epoch, not with ``search_extend 0`` (the plan as given)."""
    D, N = 16, 48
    data = make_dataset([blob_volume(D, 5, width_px=1.5)], N, snr=100.0, seed=6)
    kw = dict(hps_images=8 * N, field_images=N, hidden=16, n_freqs=4, batch_size=12,
              base_nside=1, base_psi=6, search_levels=1, radius_start_px=3.0,
              radius_search_px=5.0, refine_iters=1)  # fmt: skip
    tr = _trainer(data, tmp_path / "a", **kw)
    assert tr.cfg.epochs == 8 + 1 + 1 and tr.schedule.hps_epochs == 8

    def epoch(e: int, frac: float) -> None:
        tr.images_seen = e * N
        tr._shorten_search(e, {"pose_change": {"frac_moved": frac}})

    for e, frac in [(1, 1.0), (2, 0.05), (3, 0.05)]:  # settled, but before half the plan
        epoch(e, frac)
    assert tr.schedule.hps_epochs == 8
    epoch(4, 0.5)  # not settled: the count starts again
    epoch(5, 0.05)
    assert tr.schedule.hps_epochs == 8 and tr.search_settled == 1
    epoch(6, 0.05)  # two in a row: epoch 7 is the last
    assert tr.schedule.hps_epochs == 7 and tr.cfg.epochs == 9
    assert [tr.schedule.phase_of_epoch(e) for e in (7, 8, 9)] == ["hps", "refine", "field"]
    assert tr.schedule.plan(7, 7 * N).radius_train_px == pytest.approx(5.0)
    assert tr.schedule.plan(7, 6 * N).radius_train_px < 5.0
    saved = TrainConfig.load(tmp_path / "a" / "config.yaml")
    assert (saved.epochs, saved.hps_images, saved.search_ramp_images) == (9, 7 * N, 7 * N)
    epoch(7, 0.0)  # the last search epoch: nothing more to cut
    assert tr.schedule.hps_epochs == 7
    tr = _trainer(data, tmp_path / "b", **kw, search_extend=0.0)
    for e in range(1, 8):
        epoch(e, 0.0)
    assert tr.schedule.hps_epochs == 8


def test_isotropic_start_fits_the_field_to_a_spherical_average(tmp_path, one_thread):
    """The start of a restarted search: the field, fitted to the spherical average of the
    images back-projected at random poses, renders (within the first search radius) a map
    whose values depend on the radius only, with the radial profile of that average; it
    is skipped in the first attempt and the even restarts, with known poses and with
    ``isotropic_start_images 0``."""
    from cryofield.model.field import ball_coords
    from cryofield.physics.lattice import radial_index_3d

    D, N = 24, 96
    vol = blob_volume(D, 6, width_px=1.5)  # six blobs: far from isotropic
    data = make_dataset([vol], N, snr=10.0, seed=3)
    tr = _trainer(data, tmp_path / "a", epochs=3, hps_images=2 * N, radius_start_px=4.0,
                  radius_search_px=6.0, search_restart=1)  # fmt: skip
    target = tr._isotropic_map(np.arange(N))
    r = radial_index_3d(D)
    for shell in (0.0, 1.0, 2.0, 3.0):  # the same value on a whole shell
        vals = target[(r - shell).abs() < 1e-4]
        assert vals.numel() >= 1 and float(vals.std(unbiased=False)) < 1e-4 * float(
            target.abs().max()
        ), shell
    assert float(target[D // 2, D // 2, D // 2]) > 0  # a blob (images inverted to positive)
    tr._isotropic_start()
    coords, _ = ball_coords(D, 4.0, 1)
    k2 = (coords * D).pow(2).sum(-1).round()
    coords, k2 = coords[k2 <= 16], k2[k2 <= 16]

    def anisotropy(field) -> float:
        """Largest spread of the field's values over voxels at the same |k| (the voxels
        the search's slices are interpolated from), over the spread of the shell means."""
        with torch.no_grad():
            out = field(coords).float()
        groups = [out[k2 == v] for v in k2.unique() if int((k2 == v).sum()) > 1]
        within = max(float(g.std()) for g in groups)
        return within / float(torch.stack([g.mean() for g in groups]).std())

    assert anisotropy(tr.field) < 0.02
    assert anisotropy(_trainer(data, tmp_path / "c", epochs=3, hps_images=2 * N).field) > 0.2
    # not in the first attempt or an even restart, nor with known poses, nor with
    # isotropic_start_images 0
    for kw in (dict(), dict(search_restart=2), dict(poses_from_file="x", search_restart=1),
               dict(isotropic_start_images=0, search_restart=1)):  # fmt: skip
        t2 = _trainer(data, tmp_path / "b", epochs=3, hps_images=2 * N, **kw)
        before = [p.detach().clone() for p in t2.field.parameters()]
        t2._isotropic_start()
        assert all(torch.equal(a, b) for a, b in zip(before, t2.field.parameters(), strict=True))
