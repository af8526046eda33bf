"""``cryofield train`` end to end on a tiny simulated dataset (.star and .cs)."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from cryofield.cli.main import main
from cryofield.inference.rundir import RunDir


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from cryofield.simulate.config import preset_config
    from cryofield.simulate.dataset import simulate_dataset

    out = tmp_path_factory.mktemp("sim")
    cfg = preset_config("demo-homo", n_particles=48, D=32, snr=1.0, seed=5)
    return simulate_dataset(cfg, out)


_FAST = ["--epochs", "2", "--hps-images", "48", "-b", "16", "--hidden", "32", "--n-freqs", "8",
         "--base-nside", "1", "--base-psi", "6", "--search-levels", "2", "--threads", "1",
         "--deterministic"]  # fmt: skip


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "cryofield train particles.star -o" in out and "--resume" in out


def test_train_star_then_resume_and_cs_gives_same_result(tiny_dataset, tmp_path):
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "run"
        assert main(["train", str(tiny_dataset / "particles.star"), "-o", str(out), *_FAST]) == 0
        run = RunDir(out)
        assert run.epochs() == [1, 2]
        for name in ("config.yaml", "run.log", "metrics.jsonl", "particles.npz", "verdict.json"):
            assert (out / name).is_file(), name
        assert (out / "epoch_002" / "volume.mrc").is_file()
        from cryofield.io.metadata import load_particle_table

        back = load_particle_table(out / "particles.star")
        assert len(back) == 48 and back.rotations is not None
        p2 = RunDir(out).poses()
        assert np.allclose(back.rotations, p2["rotations"], atol=1e-3)
        assert "device cpu" in (out / "run.log").read_text()
        assert run.config()["D"] == 32 and len(run.table()) == 48
        p = run.poses()
        assert p["rotations"].shape == (48, 3, 3) and p["shifts_A"].shape == (48, 2)
        # the divergence reference (loss of the first step) is kept for --resume
        st = torch.load(out / "epoch_002" / "state.pt", weights_only=True)
        assert 0 < st["loss_start"] < 100 and not (out / ".lock").exists()
        # refusing to overwrite, then resuming to a third epoch
        assert main(["train", str(tiny_dataset / "particles.star"), "-o", str(out)]) == 2
        assert main(["train", "--resume", str(out), "--epochs", "3"]) == 0
        assert run.epochs() == [1, 2, 3]
        # the .cs export of the same simulation gives the same run (same seed)
        out_cs = tmp_path / "run_cs"
        assert main(["train", str(tiny_dataset / "particles.cs"), "-o", str(out_cs), *_FAST]) == 0
        a, b = RunDir(out).poses(2), RunDir(out_cs).poses(2)
        assert np.allclose(a["rotations"], b["rotations"], atol=1e-5)
        assert np.allclose(a["shifts_px"], b["shifts_px"], atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_bad_input_is_one_line_error(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.star"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.star" in err[0]
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2


@pytest.fixture(scope="module")
def tiny_states(tmp_path_factory):
    from cryofield.simulate.config import preset_config
    from cryofield.simulate.dataset import simulate_dataset

    cfg = preset_config("demo-hetero", n_particles=60, D=32, apix_A=10.0, snr=1.0, seed=6)
    return simulate_dataset(cfg, tmp_path_factory.mktemp("states"))


def test_heterogeneous_known_pose_run_same_from_star_and_cs(tiny_states, tmp_path, one_thread):
    het = ["--zdim", "2", "--poses-from-file", "--epochs", "2", "-b", "20", "--hidden", "32",
           "--n-freqs", "8", "--threads", "1", "--deterministic"]  # fmt: skip
    runs = {}
    for ext in ("star", "cs"):
        out = tmp_path / f"run_{ext}"
        assert main(["train", str(tiny_states / f"particles.{ext}"), "-o", str(out), *het]) == 0
        runs[ext] = RunDir(out)
    z_star, z_cs = runs["star"].latents(), runs["cs"].latents()
    assert z_star.shape == (60, 2) and np.isfinite(z_star).all()
    # the CTF columns differ at float precision (1e-3 A of defocus) between the two files
    assert np.allclose(z_star, z_cs, atol=1e-4), np.abs(z_star - z_cs).max()
    log = (runs["star"].path / "run.log").read_text()
    assert "3-D classification" in log and "class embedding" in log
    assert runs["star"].config()["latent_init"] == "classes"


def test_config_file_sets_keys_and_resume_refuses_flags_it_would_ignore(tiny_dataset, tmp_path):
    cfg = tmp_path / "settings.yaml"
    cfg.write_text("hidden: 24\nn_freqs: 8\nbase_nside: 1\nbase_psi: 6\nsearch_levels: 1\n"
                   "latent_init_iters: 3\nbatch_size: 16\nsearch_restarts: 0\n"
                   "search_restart: 1\nplanned_search: [9, 99]\n")  # fmt: skip
    out = tmp_path / "run"
    args = ["train", str(tiny_dataset / "particles.star"), "-o", str(out), "--config", str(cfg),
            "--epochs", "1", "--hps-images", "48", "--threads", "1", "--hidden", "16"]  # fmt: skip
    assert main(args) == 0
    saved = RunDir(out).config()
    # the file's keys are used, the flag overrides the file, the rest is resolved
    assert saved["n_freqs"] == 8 and saved["search_levels"] == 1 and saved["hidden"] == 16
    assert saved["epochs"] == 1 and saved["t_extent_px"] == pytest.approx(3.2)
    # a previous run's attempt (config.yaml keys the run writes) does not carry over
    assert saved["search_restart"] == 0 and saved["planned_search"] == [1, 48]
    assert main(["train", "--resume", str(out), "--epochs", "2", "--lr-field", "0.1"]) == 2
    assert main(["train", "--resume", str(out), "--epochs", "2", "--no-window"]) == 2
    assert RunDir(out).epochs() == [1]
    bad = tmp_path / "bad.yaml"
    bad.write_text("hiden: 3\n")
    assert main(["train", str(tiny_dataset / "particles.star"), "-o", str(tmp_path / "r2"),
                 "--config", str(bad)]) == 2  # fmt: skip


# ------------------------------------------------------------------ reliability
def _err_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "error:" in ln]
    assert len(err) == 1, err
    return err[0]


def test_train_never_writes_its_inputs(tiny_dataset, tmp_path, capsys):
    """particles.star (a run's output name) in -o, as the input, a hard link or --config."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    before = (data / "particles.star").read_bytes()
    assert main(["train", str(data / "particles.star"), "-o", str(data), *_FAST]) == 2
    line = _err_line(capsys)
    assert f"refusing to write {data / 'particles.star'}: it is an input" in line
    assert (data / "particles.star").read_bytes() == before
    assert not (data / "run.log").exists() and not (data / "config.yaml").exists()
    # a hard link of the input under the output's name
    other = tmp_path / "other"
    other.mkdir()
    os.link(data / "particles.star", other / "particles.star")
    assert main(["train", str(data / "particles.star"), "-o", str(other), *_FAST]) == 2
    assert "refusing to write" in _err_line(capsys)
    # the --config file is the run's config.yaml-to-be
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "config.yaml").write_text("hidden: 16\n")
    assert main(["train", str(data / "particles.star"), "-o", str(cfg_dir), "--config",
                 str(cfg_dir / "config.yaml"), *_FAST]) == 2  # fmt: skip
    assert "config.yaml: it is an input" in _err_line(capsys)
    assert (cfg_dir / "config.yaml").read_text() == "hidden: 16\n"


def test_diverging_training_stops_with_exit_2(tiny_dataset, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    argv = ["train", str(tiny_dataset / "particles.star"), "-o", str(out), *_FAST]
    assert main([*argv, "--lr-field", "100"]) == 2
    line = _err_line(capsys)
    assert "training diverged" in line and "epoch 1, batch 1" in line and "--lr-field" in line
    assert line in (out / "run.log").read_text()
    assert not list(out.glob("epoch_*")) and not (out / ".lock").exists()
    for name in ("particles.star", "consensus.mrc", "verdict.json"):
        assert not (out / name).exists(), name


def test_too_little_disk_space_is_refused(tiny_dataset, tmp_path, capsys, monkeypatch):
    import cryofield.inference.rundir as rundir

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: usage._replace(free=50_000))
    out = tmp_path / "run"
    assert main(["train", str(tiny_dataset / "particles.star"), "-o", str(out), *_FAST]) == 2
    line = _err_line(capsys)
    assert f"{out}: not enough free disk space: 2 epoch checkpoints" in line
    assert "choose another -o" in line and not list(out.glob("epoch_*"))


def test_full_disk_while_saving_is_one_line(tiny_dataset, tmp_path, capsys, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    assert main(["train", str(tiny_dataset / "particles.star"), "-o", str(out), *_FAST]) == 2
    line = _err_line(capsys)
    assert line == (f"cryofield train: error: cannot write {out / 'epoch_001' / 'weights.pt'}: "
                    "No space left on device; free some space or choose another output path "
                    "(-o)")  # fmt: skip
    assert line in (out / "run.log").read_text()
    assert sorted(p.name for p in (out / "epoch_001").iterdir()) == []  # no temporary left
    assert not (out / ".lock").exists()


def _lock(folder, pid):
    import platform

    (folder / ".lock").write_text(json.dumps({"pid": pid, "host": platform.node(),
                                              "started": "2024-05-01T10:00:00"}))  # fmt: skip


def test_second_run_into_a_locked_folder_is_refused(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    _lock(out, os.getppid())  # a live process on this host holds it
    assert main(["train", str(tiny_dataset / "particles.star"), "-o", str(out), *_FAST]) == 2
    line = _err_line(capsys)
    assert f"in use by another cryofield run (pid {os.getppid()} on host" in line
    assert "started 2024-05-01T10:00:00" in line
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written, lock kept


@pytest.fixture(scope="module")
def one_epoch_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    fast = [*_FAST[:1], "1", *_FAST[2:]]
    assert main(["train", str(tiny_dataset / "particles.star"), "-o", str(out), *fast]) == 0
    return out


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_resume_of_damaged_run_files_is_one_line(one_epoch_run, tmp_path, capsys):
    def copy(name):
        dst = tmp_path / name
        shutil.copytree(one_epoch_run, dst)
        return dst

    run = copy("yaml")
    (run / "config.yaml").write_text("zdim: [0\nD: 32\n")
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    line = _err_line(capsys)
    assert f"{run / 'config.yaml'}: not valid YAML" in line and "start a new run" in line
    assert not (run / ".lock").exists()
    for damage in ("truncated", "foreign", "malicious"):
        run = copy(damage)
        state = run / "epoch_001" / "state.pt"
        if damage == "truncated":
            state.write_bytes(state.read_bytes()[:1000])
        elif damage == "foreign":
            torch.save({"epoch": 1}, state)
        else:
            state.write_bytes(pickle.dumps({"x": _Evil()}))
        assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
        line = _err_line(capsys)
        assert f"{state}: cannot be read" in line, line
        assert f"delete {run / 'epoch_001'}" in line and "start a new run" in line
    run = copy("locked")
    _lock(run, os.getppid())
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    assert "in use by another cryofield run" in _err_line(capsys)


def test_export_of_truncated_poses_is_one_line(one_epoch_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    poses = run / "epoch_001" / "poses.npz"
    poses.write_bytes(poses.read_bytes()[:200])
    assert main(["export", str(run), "-o", str(tmp_path / "x.star")]) == 2
    line = _err_line(capsys)
    assert str(poses) in line and f"delete {run / 'epoch_001'}" in line


def _force_checks(monkeypatch, collapsed, moved) -> None:
    """Every epoch's checks with the views ``collapsed(seed)`` (bool) and the share of
    images that changed basin ``moved(seed)`` (float), whatever the run found."""
    import cryofield.inference.trainer as trainer_mod

    real = trainer_mod.epoch_checks

    def checks(cfg, *a, **kw):
        out = real(cfg, *a, **kw)
        if "view_coverage" in out:
            out["view_coverage"] = dict(out["view_coverage"], collapsed=collapsed(cfg.seed))
        out["pose_change"] = dict(out["pose_change"], frac_moved=moved(cfg.seed))
        return out

    monkeypatch.setattr(trainer_mod, "epoch_checks", checks)


def test_failed_search_starts_again_with_the_next_seed(tiny_dataset, tmp_path, monkeypatch):
    """A search that ends with collapsed views starts again with the next seed (at most
    ``search_restarts`` times); the failed attempts' epochs and metrics move to
    ``failed_search_<k>/`` and config.yaml names the attempt that produced the run."""
    from cryofield.inference.config import TrainConfig

    collapse_seeds = {0}
    # the refinement's global check passes (48 images: tested below)
    _force_checks(monkeypatch, lambda seed: seed in collapse_seeds, lambda seed: 0.0)
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "run"
        assert main(["train", str(tiny_dataset / "particles.star"), "-o", str(out), *_FAST]) == 0
        assert RunDir(out).epochs() == [1, 2]
        assert RunDir(out / "failed_search_1").epochs() == [1]  # the search of seed 0
        assert (out / "failed_search_1" / "metrics.jsonl").is_file()
        assert len(RunDir(out).metrics()) == 2
        cfg = TrainConfig.load(out / "config.yaml")
        assert (cfg.seed, cfg.search_restart, cfg.epochs) == (1, 1, 2)
        log = (out / "run.log").read_text()
        assert "starting again with seed 1 (restart 1 of at most 2)" in log
        checks = json.loads((out / "verdict.json").read_text())["checks"]
        assert [c["name"] for c in checks if "failed with 1 other" in c["message"]] == [
            "search restarts"
        ]
        # every attempt collapses: two restarts, then the run goes on (and says so)
        collapse_seeds.update({1, 2})
        out2 = tmp_path / "run2"
        assert main(["train", str(tiny_dataset / "particles.star"), "-o", str(out2), *_FAST]) == 0
        assert RunDir(out2).epochs() == [1, 2]
        assert [RunDir(out2 / f"failed_search_{k}").epochs() for k in (1, 2)] == [[1], [1]]
        assert TrainConfig.load(out2 / "config.yaml").seed == 2
        log2 = (out2 / "run.log").read_text()
        assert "collapsed at the end of the search" in log2
        assert "after 2 restart(s) with other seeds: going on" in log2
    finally:
        torch.set_num_threads(threads)


def test_a_failed_gold_standard_check_starts_again(tiny_dataset, tmp_path, monkeypatch):
    """A search whose views are spread but whose map does not explain its images (the
    refinement's global search against the half maps moved more than 5% of them to
    another basin) starts again with the next seed too; the verdict's gold-standard
    check reads the same number."""
    import cryofield.inference.diagnostics as dg
    from cryofield.inference.config import TrainConfig

    monkeypatch.setattr(dg, "REFINE_CHECK_MIN_IMAGES", 1)  # judged from 1,000 images on
    moved = {0: 0.3, 1: 0.01}  # seed -> share of images moved by the refinement
    _force_checks(monkeypatch, lambda seed: False, lambda seed: moved.get(seed, 0.3))
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "run"
        assert main(["train", str(tiny_dataset / "particles.star"), "-o", str(out), *_FAST]) == 0
        assert [m["phase"] for m in RunDir(out).metrics()] == ["hps", "refine"]
        assert RunDir(out / "failed_search_1").epochs() == [1, 2]  # search and refinement
        assert TrainConfig.load(out / "config.yaml").seed == 1
        log = (out / "run.log").read_text()
        assert "moved 30.0% of the images to another basin" in log
        assert "starting again with seed 1 (restart 1 of at most 2)" in log
        checks = json.loads((out / "verdict.json").read_text())["checks"]
        assert next(c for c in checks if c["name"] == "gold-standard check")["ok"] is True
    finally:
        torch.set_num_threads(threads)
