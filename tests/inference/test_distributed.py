"""Data-parallel training (torch.distributed, gloo on CPU, launched by torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cryofield.cli.main import main
from cryofield.inference import distributed as dist
from cryofield.inference.rundir import RunDir

_FAST = ["--hps-images", "96", "-b", "16", "--hidden", "32", "--n-freqs", "8",
         "--base-nside", "1", "--base-psi", "6", "--search-levels", "2", "--threads", "1",
         "--deterministic"]  # fmt: skip


def test_shares_of_global_batches_cover_every_image_once():
    rng = np.random.default_rng(0)
    for n, b, world in [(96, 16, 2), (101, 16, 3), (33, 16, 4), (5, 32, 2), (50, 7, 1)]:
        perm = rng.permutation(n)
        batches = dist.global_batches(perm, b, world)
        assert all(len(g) >= min(world, n) for g in batches)
        parts = [g[dist.batch_share(len(g), r, world)] for g in batches for r in range(world)]
        seen = np.concatenate(parts)
        assert np.array_equal(np.sort(seen), np.arange(n))  # each image exactly once
        for g in batches:  # near-equal shares
            sizes = [len(g[dist.batch_share(len(g), r, world)]) for r in range(world)]
            assert max(sizes) - min(sizes) <= 1
    # one process: the batches of the single-process loop
    perm = rng.permutation(40)
    assert [len(g) for g in dist.global_batches(perm, 16, 1)] == [16, 16, 8]
    assert [len(g) for g in dist.global_batches(np.arange(33), 16, 2)] == [16, 17]


def test_single_process_helpers_are_identities():
    x = torch.arange(12.0).reshape(6, 2)
    own = torch.tensor([True, False] * 3)
    assert torch.equal(dist.merge_rows(x, own), x)
    assert torch.equal(dist.all_reduce_sum(x.clone()), x)
    assert not dist.current().enabled and dist.current().is_main
    assert not dist.launched_by_torchrun({"RANK": "0", "WORLD_SIZE": "1"})
    assert dist.launched_by_torchrun({"RANK": "1", "WORLD_SIZE": "2"})


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from cryofield.simulate.config import preset_config
    from cryofield.simulate.dataset import simulate_dataset

    out = tmp_path_factory.mktemp("ddp")
    cfg = preset_config("demo-homo", n_particles=96, D=32, snr=1.0, seed=5)
    return simulate_dataset(cfg, out)


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "cryofield", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _compare(a: RunDir, b: RunDir) -> tuple[float, float, float]:
    """Largest pose difference (deg), largest relative difference of the field's weights
    over the image-trained epochs, and of the field's map over the field-fit epochs
    (hundreds of Adam steps on one map amplify the different order of float sums into
    different weights; measured: maps 4.3% apart, 2 ranks vs 1 process)."""
    from cryofield.io.mrc import read_mrc

    worst_deg, worst_rel, worst_map = 0.0, 0.0, 0.0
    phase = {m["epoch"]: m["phase"] for m in a.metrics()}
    for e in a.epochs():
        Ra, Rb = a.poses(e)["rotations"], b.poses(e)["rotations"]
        cos = np.clip((np.einsum("nij,nij->n", Ra, Rb) - 1) / 2, -1, 1)
        worst_deg = max(worst_deg, float(np.degrees(np.arccos(cos)).max()))
        if phase[e] == "field":
            va, vb = (np.asarray(read_mrc(r.epoch_dir(e) / "volume.mrc")[0]) for r in (a, b))
            worst_map = max(worst_map, float(np.linalg.norm(va - vb) / np.linalg.norm(va)))
            continue
        wa = torch.load(a.epoch_dir(e) / "weights.pt", weights_only=True)["state_dict"]
        wb = torch.load(b.epoch_dir(e) / "weights.pt", weights_only=True)["state_dict"]
        for k in wa:
            d = (wa[k].float() - wb[k].float()).norm() / (wa[k].float().norm() + 1e-12)
            worst_rel = max(worst_rel, float(d))
    return worst_deg, worst_rel, worst_map


def test_two_ranks_match_one_process_and_resume_across_rank_counts(sim, tmp_path):
    """2 gloo ranks with the same global batch give the run of one process (the ranks'
    gradient sum is the global batch's mean-loss gradient; only the order of float sums
    differs), and a checkpoint of either resumes on the other."""
    star = str(sim / "particles.star")
    one, two = tmp_path / "one", tmp_path / "two"
    # the coarse test search ends with collapsed views: no restart (a restarted run adds a
    # second search whose float-order differences between 1 and 2 ranks grow past the
    # tolerance; restarts are tested in tests/cli/test_train.py)
    norestart = tmp_path / "norestart.yaml"
    # nor the balanced search (the same discrete decisions per image, which also amplify
    # those differences: maps 13% apart instead of under 10%; its counts are summed over
    # the ranks every batch, tests/inference/test_balance.py); nor the translation grid
    # about the map's centre of mass (the centre, computed on each rank, differs in its
    # last bits: the found translations are no longer the same grid values, and the
    # field-fit epochs amplify that into maps 19% apart)
    norestart.write_text("search_restarts: 0\nsearch_balance: 0\nsearch_centre: false\n")
    fast = [*_FAST, "--config", str(norestart)]
    threads = torch.get_num_threads()
    try:
        assert main(["train", star, "-o", str(one), *fast, "--epochs", "3"]) == 0
        # 1 -> 2 ranks: epoch 1 alone, then --resume on two ranks
        r12 = tmp_path / "r12"
        assert main(["train", star, "-o", str(r12), *fast, "--epochs", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    _torchrun(["train", star, "-o", str(two), *fast, "--epochs", "3"])
    _torchrun(["train", "--resume", str(r12), "--epochs", "3"])
    run_one, run_two = RunDir(one), RunDir(two)
    assert run_two.epochs() == [1, 2, 3]
    phases = [m["phase"] for m in run_two.metrics()]
    assert "hps" in phases and len(set(phases)) > 1  # search and a later phase
    log = (two / "run.log").read_text()
    assert "data-parallel: 2 ranks (gloo backend)" in log
    assert log.count("cryofield train: 96 images") == 1  # rank 0 alone logs
    deg, rel, vol = _compare(run_one, run_two)
    assert deg < 0.5 and rel < 1e-4 and vol < 0.1, (deg, rel, vol)
    # every image was trained once per epoch, by one of the ranks: all residuals written
    res = np.load(two / "epoch_003" / "residuals.npz")
    assert np.isfinite(res[res.files[0]]).all()
    deg, rel, vol = _compare(run_one, RunDir(r12))
    assert deg < 0.5 and rel < 1e-4 and vol < 0.1, (deg, rel, vol)
    # 2 -> 1: epoch 1 on two ranks, then --resume in one process
    r21 = tmp_path / "r21"
    _torchrun(["train", star, "-o", str(r21), *fast, "--epochs", "1"])
    try:
        assert main(["train", "--resume", str(r21), "--epochs", "3"]) == 0
    finally:
        torch.set_num_threads(threads)
    deg, rel, vol = _compare(run_one, RunDir(r21))
    assert deg < 0.5 and rel < 1e-4 and vol < 0.1, (deg, rel, vol)
