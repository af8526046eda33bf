"""Training on a CUDA device: agrees with the CPU, bf16 autocast and the search run, the
prefetching reader feeds the GPU, a gradient step never waits for the device, and the
out-of-memory recovery. Skipped without a GPU (``pytest -m cuda`` runs only these;
``benchmarks/gpu_check.sh`` runs them on a GPU machine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synth import blob_volume, make_dataset

from cryofield.inference import trainer as trainer_module
from cryofield.inference.config import TrainConfig
from cryofield.inference.data import ArraySource, BatchMaker
from cryofield.inference.loss import slice_loss
from cryofield.inference.pose_search import FrequencyPoints
from cryofield.inference.rundir import RunDir
from cryofield.inference.trainer import Trainer
from cryofield.io.metadata import load_particle_table
from cryofield.io.mrc import write_mrc
from cryofield.io.particles import ParticleSource

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

D, N = 24, 64


@pytest.fixture(scope="module")
def data():
    return make_dataset([blob_volume(D, 5)], N, snr=1.0, shift_px=1.0, seed=11)


@pytest.fixture
def stack(tmp_path, data):
    path = tmp_path / "p.mrcs"
    write_mrc(path, data.images.numpy(), data.apix_A)
    return ParticleSource(load_particle_table(path))


def _trainer(data, outdir, source=None, **kw) -> Trainer:
    # image-by-image field epochs (field_fit: images): the steps these tests exercise
    base = dict(outdir=str(outdir), hidden=32, n_freqs=8, batch_size=16, epochs=1,
                poses_from_file=True, refine_poses=False, norm_images=N, device="cuda",
                field_fit="images")  # fmt: skip
    base.update(kw)
    cfg = TrainConfig(**base).resolved(D)
    src = ArraySource(data.images, data.apix_A) if source is None else source
    init = (data.rotations, data.shifts_px) if cfg.poses_from_file else None
    return Trainer(cfg, src, data.ctf, outdir, init)


def test_a_training_step_on_cuda_matches_the_cpu(data, tmp_path):
    cpu = _trainer(data, tmp_path / "cpu", device="cpu", amp=False)
    gpu = _trainer(data, tmp_path / "gpu", amp=False)
    idx = np.arange(16)
    n = cpu.points.count(cpu.cfg.radius_max_px)
    grads = []
    for tr in (cpu, gpu):
        b = tr.batches.batch(idx)
        R, t = tr.poses(b.index)
        tr.field.zero_grad()
        per_img = slice_loss(tr.field, R, t, None, b.images_ft[:, :n], b.ctf[:, :n],
                             tr.points.freqs[:n])  # fmt: skip
        per_img.mean().backward()
        grads.append([p.grad.detach().cpu() for p in tr.field.parameters()])
        tr.field.zero_grad()
    for gc, gg in zip(*grads, strict=True):
        torch.testing.assert_close(gg, gc, rtol=1e-3, atol=1e-3 * float(gc.abs().max()) + 1e-12)
    # a whole (short) epoch: the same losses within float tolerance
    cpu.fit()
    gpu.fit()
    lc, lg = (
        RunDir(tmp_path / "cpu").metrics()[0]["loss"],
        RunDir(tmp_path / "gpu").metrics()[0]["loss"],
    )
    assert lg == pytest.approx(lc, rel=1e-2)


def test_bf16_autocast_and_the_search_run_on_cuda(data, tmp_path):
    tr = _trainer(data, tmp_path, epochs=2, hps_images=N, poses_from_file=False, amp=True,
                  base_nside=1, base_psi=6, search_levels=2)  # fmt: skip
    dtypes = set()
    tr.field.output.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    tr.fit()
    assert torch.bfloat16 in dtypes
    run = RunDir(tmp_path)
    assert [m["phase"] for m in run.metrics()] == ["hps", "refine"]
    assert all(np.isfinite(m["loss"]) for m in run.metrics() if m["loss"] is not None)
    assert np.isfinite(run.poses()["rotations"]).all()


def test_prefetched_batches_on_cuda_equal_the_cpu_ones(data, stack):
    order = [np.sort(p) for p in np.array_split(np.random.default_rng(0).permutation(N), 5)]
    makers = [BatchMaker(stack, data.ctf, FrequencyPoints.build(D, dev), invert=True, device=dev)
              for dev in ("cpu", "cuda")]  # fmt: skip
    cpu = list(makers[0].iter_batches(order, prefetch=True))
    gpu = list(makers[1].iter_batches(order, prefetch=True, chunk_images=20))
    for a, b in zip(cpu, gpu, strict=True):
        assert b.images_ft.is_cuda and b.ctf.is_cuda and b.index.is_cuda
        assert np.array_equal(a.idx, b.idx) and np.array_equal(b.index.cpu().numpy(), a.idx)
        scale = float(a.images_ft.abs().max())
        torch.testing.assert_close(b.images_ft.cpu(), a.images_ft, rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(b.ctf.cpu(), a.ctf, rtol=0, atol=1e-5)


def test_a_gradient_step_does_not_wait_for_the_device(data, stack, tmp_path):
    tr = _trainer(data, tmp_path, source=stack)
    plan = tr.schedule.plan(1, 0)
    batches = tr.batches.iter_batches([np.arange(16), np.arange(16, 32)], prefetch=True)
    first, second = list(batches)
    tr._train_batch(first, plan)  # first step: optimiser state, kernels, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [tr._train_batch(second, plan) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(bool(torch.isfinite(v)) for v in losses)


def test_out_of_memory_on_cuda_halves_the_step(data, tmp_path):
    tr = _trainer(data, tmp_path)
    real = trainer_module.slice_loss

    def small_memory(field, R, *rest):
        if len(R) > 8 and tr.max_step_images is None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(field, R, *rest)

    trainer_module.slice_loss = small_memory
    try:
        tr.fit()
    finally:
        trainer_module.slice_loss = real
    assert tr.max_step_images == 8 and RunDir(tmp_path).epochs() == [1]
