"""Streaming a lazy stack through the prefetching reader (BatchMaker.iter_batches), the
batch-loss check without a read per step, and the out-of-memory recovery of a step."""

from __future__ import annotations

import contextlib
import logging
import threading

import numpy as np
import pytest
import torch
from synth import blob_volume, make_dataset

from cryofield.errors import InputFileError
from cryofield.inference import trainer as trainer_module
from cryofield.inference.config import TrainConfig
from cryofield.inference.data import BatchMaker
from cryofield.inference.pose_search import FrequencyPoints
from cryofield.inference.rundir import RunDir
from cryofield.inference.trainer import Trainer
from cryofield.io.metadata import load_particle_table
from cryofield.io.mrc import write_mrc
from cryofield.io.particles import ParticleSource


@pytest.fixture
def stack(tmp_path):
    """A 60-image stack at box 24 on disk and its synthetic truth (CTF, poses)."""
    data = make_dataset([blob_volume(24, 5)], 60, snr=1.0, shift_px=1.0, seed=11)
    path = tmp_path / "p.mrcs"
    write_mrc(path, data.images.numpy(), data.apix_A)
    return path, data


def _maker(path, data, D=24):
    source = ParticleSource(load_particle_table(path), D=D)
    return BatchMaker(source, data.ctf, FrequencyPoints.build(D), invert=True, scale=3.0)


def _epoch_order(n, batch, seed=0):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return [np.sort(perm[b : b + batch]) for b in range(0, n, batch)]


def _batch_threads():
    return [t for t in threading.enumerate() if t.name == "cryofield-batches"]


@pytest.mark.parametrize("D", [24, 16])  # 16: Fourier-cropped on the fly
def test_prefetched_batches_equal_the_synchronous_ones_and_cover_the_epoch(stack, D):
    path, data = stack
    maker = _maker(path, data, D)
    assert maker.source.lazy
    order = _epoch_order(len(maker.source), 7)
    sync = list(maker.iter_batches(order, prefetch=False))
    streamed = list(maker.iter_batches(order, chunk_images=20))  # default: lazy -> prefetch
    assert len(streamed) == len(order)
    seen = np.concatenate([b.idx for b in streamed])
    assert np.array_equal(np.sort(seen), np.arange(60))  # every image exactly once
    for a, b, idx in zip(sync, streamed, order, strict=True):
        assert np.array_equal(b.idx, idx) and np.array_equal(b.index.numpy(), idx)
        torch.testing.assert_close(b.images_ft, a.images_ft, rtol=0, atol=1e-6)
        assert torch.equal(b.ctf, a.ctf)
    assert not _batch_threads()


def test_a_bad_image_read_by_the_worker_is_raised_in_the_training_thread(stack):
    path, data = stack
    images = data.images.numpy().copy()
    images[45, 3, 4] = np.nan
    write_mrc(path, images, data.apix_A)
    maker = _maker(path, data)
    order = [np.arange(b, b + 10) for b in range(0, 60, 10)]
    got = []
    with pytest.raises(InputFileError, match="image 46 has NaN"):
        for batch in maker.iter_batches(order, prefetch=True, chunk_images=10):
            got.append(batch.idx[0])
    assert got == [0, 10, 20, 30]
    assert not _batch_threads()


def test_stopping_early_stops_the_reader_thread(stack):
    path, data = stack
    maker = _maker(path, data)
    stream = maker.iter_batches(_epoch_order(60, 4), prefetch=True, chunk_images=4, depth=1)
    with contextlib.closing(stream):
        next(stream)
        assert _batch_threads()  # reading ahead, blocked on the full queue
    assert not _batch_threads()


def _cfg(tmp_path, **kw):
    # image-by-image field epochs (field_fit: images): the steps these tests exercise
    base = dict(outdir=str(tmp_path), hidden=16, n_freqs=4, batch_size=16, epochs=1,
                poses_from_file=True, refine_poses=False, deterministic=True,
                norm_images=60, field_fit="images")  # fmt: skip
    base.update(kw)
    return TrainConfig(**base).resolved(24)


def test_training_from_disk_is_the_same_with_and_without_the_prefetching_reader(
    stack, tmp_path, one_thread
):
    path, data = stack
    runs = {}
    for prefetch in (True, False):
        torch.manual_seed(0)
        out = tmp_path / f"run_{prefetch}"
        source = ParticleSource(load_particle_table(path))
        tr = Trainer(_cfg(out, epochs=2), source, data.ctf, out, (data.rotations, data.shifts_px))
        tr.prefetch = prefetch
        tr.fit()
        runs[prefetch] = RunDir(out)
    a, b = runs[True].weights(2)["state_dict"], runs[False].weights(2)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (np.load(r.epoch_dir(2) / "residuals.npz") for r in runs.values())
    assert np.array_equal(ra["residual"], rb["residual"]) and np.isfinite(ra["residual"]).all()


def test_a_step_out_of_memory_is_run_again_in_halves(stack, tmp_path, one_thread, caplog):
    path, data = stack
    tr = Trainer(_cfg(tmp_path), ParticleSource(load_particle_table(path)), data.ctf, tmp_path,
                 (data.rotations, data.shifts_px))  # fmt: skip
    real = trainer_module.slice_loss
    sizes = []

    def small_memory(field, R, *rest):
        sizes.append(len(R))
        if len(R) > 8 and tr.max_step_images is None:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(field, R, *rest)

    trainer_module.slice_loss = small_memory
    try:
        with caplog.at_level(logging.INFO, logger="cryofield"):
            tr.fit()
    finally:
        trainer_module.slice_loss = real
    assert tr.max_step_images == 8
    # the failed 16-image step, then every batch in steps of at most 8 (60 = 3 x 16 + 12)
    assert sizes[0] == 16 and max(sizes[1:]) == 8 and sum(sizes[1:]) == 60
    warnings = [r for r in caplog.records if "out of CPU memory" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    res = np.load(RunDir(tmp_path).epoch_dir(1) / "residuals.npz")["residual"]
    assert np.isfinite(res).all()
    # the smaller steps are in the checkpoint: a resumed run does not run out again
    st = torch.load(RunDir(tmp_path).epoch_dir(1) / "state.pt", weights_only=True)
    assert st["max_step_images"] == 8
    again = Trainer(_cfg(tmp_path), ParticleSource(load_particle_table(path)), data.ctf,
                    tmp_path, (data.rotations, data.shifts_px))  # fmt: skip
    again.load_state(st)
    assert again.max_step_images == 8
    again.max_step_images = 4  # a roll-back keeps the smaller of the two
    again.load_state(st)
    assert again.max_step_images == 4


def test_one_image_that_does_not_fit_raises(stack, tmp_path, one_thread):
    path, data = stack
    tr = Trainer(_cfg(tmp_path, batch_size=2), ParticleSource(load_particle_table(path)),
                 data.ctf, tmp_path, (data.rotations, data.shifts_px))  # fmt: skip

    def no_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    real, trainer_module.slice_loss = trainer_module.slice_loss, no_memory
    try:
        with pytest.raises(torch.OutOfMemoryError):
            tr.fit()
    finally:
        trainer_module.slice_loss = real
    assert tr.max_step_images == 1
    assert not _batch_threads()


def test_a_diverging_batch_is_found_when_the_losses_are_read(stack, tmp_path, one_thread, caplog):
    path, data = stack
    tr = Trainer(_cfg(tmp_path, batch_size=4), ParticleSource(load_particle_table(path)),
                 data.ctf, tmp_path, (data.rotations, data.shifts_px))  # fmt: skip
    tr.loss_check_every = 5
    calls = {"n": 0}
    orig = tr._step

    def flaky(idx, plan, *batch):
        calls["n"] += 1
        loss = orig(idx, plan, *batch)
        return loss * float("nan") if calls["n"] == 7 else loss

    tr._step = flaky  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="cryofield"):
        tr.fit()
    assert tr.rollbacks == 1 and RunDir(tmp_path).epochs() == [1]
    # batch 7 is found when batches 6-10 are read, and named
    assert any("epoch 1, batch 7" in r.getMessage() for r in caplog.records)
    assert tr.loss_start is not None and np.isfinite(tr.loss_start)
