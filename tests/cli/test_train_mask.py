"""``cryofield train --mask``: a focused heterogeneous run, and bad masks on one line."""

from __future__ import annotations

import numpy as np
import pytest

from cryofield.cli.main import main
from cryofield.inference.rundir import RunDir
from cryofield.io.mrc import write_mrc


@pytest.fixture(scope="module")
def tiny_states(tmp_path_factory):
    from cryofield.simulate.config import preset_config
    from cryofield.simulate.dataset import simulate_dataset

    cfg = preset_config("demo-hetero", n_particles=40, D=32, apix_A=10.0, snr=1.0, seed=6)
    return simulate_dataset(cfg, tmp_path_factory.mktemp("states"))


def _ball(D: int, radius: float) -> np.ndarray:
    c = np.arange(D) - D // 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    r = np.sqrt(xx**2 + yy**2 + zz**2)
    return np.clip((radius + 2 - r) / 4, 0, 1).astype(np.float32)


FLAGS = ["--zdim", "2", "--poses-from-file", "--epochs", "1", "-b", "20", "--hidden", "32",
         "--n-freqs", "8", "--threads", "1"]  # fmt: skip


def test_focused_run_records_the_mask_and_holds_z(tiny_states, tmp_path, monkeypatch, one_thread):
    write_mrc(tmp_path / "mask.mrc", _ball(32, 6.0), 10.0)
    monkeypatch.chdir(tmp_path)  # a relative path is recorded absolute
    (tmp_path / "free.yaml").write_text("mask_hold_latents: false\n")
    runs = {}
    for name, more in (("held", []), ("free", ["--config", "free.yaml"])):
        out = tmp_path / name
        args = ["train", str(tiny_states / "particles.star"), "-o", str(out), *FLAGS, *more]
        assert main([*args, "--epochs", "2", "--mask", "mask.mrc"]) == 0
        runs[name] = RunDir(out)
    run = runs["held"]
    assert run.config()["mask"] == str(tmp_path / "mask.mrc")
    assert run.config()["mask_hold_latents"] is True
    assert run.mask().shape == (32, 32, 32) and run.latents().shape == (40, 2)
    log = (run.path / "run.log").read_text()
    assert "focused on a mask" in log and "masked" in log
    # after the masked start z takes no steps (mask_hold_latents), else it moves
    np.testing.assert_array_equal(run.latents(2), run.latents(1))
    free = runs["free"]
    np.testing.assert_array_equal(free.latents(1), run.latents(1))
    assert not np.array_equal(free.latents(2), free.latents(1))


@pytest.mark.parametrize(
    "vol, msg",
    [
        (_ball(24, 6.0), "expected 32^3"),
        (10 * _ball(32, 6.0), "must lie in [0, 1]"),
        (np.zeros((32, 32, 32), np.float32), "zero everywhere"),
    ],
)
def test_bad_mask_is_one_line_error(tiny_states, tmp_path, capsys, vol, msg):
    path = write_mrc(tmp_path / "bad.mrc", vol, 10.0)
    args = ["train", str(tiny_states / "particles.star"), "-o", str(tmp_path / "o"), *FLAGS]
    assert main([*args, "--mask", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the log's INFO lines, then the error
    assert "Traceback" not in "".join(err) and msg in err[-1] and str(path) in err[-1]
    assert err[-1].startswith("cryofield train: error:") and "INFO" not in err[-1]
    assert not list((tmp_path / "o").glob("epoch_*"))


def test_mask_without_latents_is_refused(tiny_states, tmp_path, capsys):
    path = write_mrc(tmp_path / "m.mrc", _ball(32, 6.0), 10.0)
    args = ["train", str(tiny_states / "particles.star"), "-o", str(tmp_path / "o")]
    assert main([*args, "--mask", str(path)]) == 2
    assert "needs --zdim" in capsys.readouterr().err
