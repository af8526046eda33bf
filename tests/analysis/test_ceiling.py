"""The information-limit state ceiling (``analysis.ceiling``) and its place in evaluate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cryofield.analysis.ceiling import skip_reason, state_ceiling
from cryofield.analysis.evaluate import evaluate_run, format_table, load_truth
from cryofield.io.metadata import load_particle_table
from cryofield.model.field import HartleyField
from cryofield.simulate.dataset import preset_config, simulate_dataset

N = 300


def _simulate(folder: Path, snr: float) -> Path:
    cfg = preset_config("demo-hetero", D=32, n_particles=N, snr=snr, seed=1, chunk_size=N)
    return simulate_dataset(cfg, folder) / "truth.npz"


@pytest.fixture(scope="module")
def high_snr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _simulate(tmp_path_factory.mktemp("ceil_hi"), 1.0)


def test_ceiling_is_high_at_high_snr(high_snr: Path) -> None:
    res = state_ceiling(high_snr)
    assert res["ari"] >= 0.95 and res["accuracy"] >= 0.98
    assert res["n_images"] == res["n_eligible"] == N and res["subsampled"] is False
    assert res["n_states"] == 3 and res["D"] == 32 and res["invert"] is True
    assert res["radius_px"] == 16.0 and res["resolution_A"] == pytest.approx(10.0)


def test_ceiling_falls_at_very_low_snr(tmp_path: Path) -> None:
    res = state_ceiling(_simulate(tmp_path, 0.001))
    assert res["ari"] < 0.5


def test_ceiling_subsample_and_radius(high_snr: Path) -> None:
    res = state_ceiling(high_snr, max_images=100, radius_px=8, seed=3)
    assert res["n_images"] == 100 and res["n_eligible"] == N and res["subsampled"] is True
    assert res["seed"] == 3 and res["resolution_A"] == pytest.approx(20.0)
    assert res["ari"] >= 0.9


def test_wrong_contrast_breaks_the_assignment(high_snr: Path) -> None:
    """The contrast is taken from the truth: claiming the opposite must hurt."""
    truth = load_truth(high_snr)
    truth["invert"] = np.bool_(False)
    assert state_ceiling(high_snr, truth, max_images=150)["ari"] < 0.9


@pytest.mark.parametrize(("snr", "lo", "hi"), [(1.0, 0.9, 1.0), (0.002, 0.0, 0.6)])
def test_continuous_ceiling_orders_the_frames(tmp_path: Path, snr, lo, hi) -> None:
    """Continuous truth: each image assigned to the frame map that explains it best; the
    assigned frames' coordinates order the images as the true ones do at a high SNR, and
    hardly at all in noise (issue #24: a ceiling for continuous motions)."""
    cfg = preset_config("demo-continuous", D=32, n_particles=240, n_frames=8, snr=snr,
                        seed=2, chunk_size=240)  # fmt: skip
    truth_path = simulate_dataset(cfg, tmp_path) / "truth.npz"
    assert skip_reason(load_truth(truth_path)) is None
    res = state_ceiling(truth_path)
    assert "ari" not in res and res["n_frames"] == 8 and res["n_images"] == 240
    assert lo <= res["spearman_abs"] <= hi, res
    if snr >= 1:
        assert res["frame_accuracy"] > 0.5 and res["coord_error_median"] < 0.15, res


def test_skipped_for_homogeneous() -> None:
    n = 6
    base = {"rotations": np.tile(np.eye(3), (n, 1, 1)), "labels": np.arange(n) % 3}
    homo = {**base, "labels": np.zeros(n, int), "coord": np.full(n, np.nan)}
    assert "homogeneous" in state_ceiling("unused/truth.npz", homo)["skipped"]
    # one state left once junk is excluded
    junk = {**base, "labels": np.where(np.arange(n) < 3, 0, -1)}
    assert "homogeneous" in skip_reason(junk)
    assert skip_reason({**base, "coord": np.full(n, np.nan)}) is None


def _run_on(truth_path: Path, folder: Path, ind: np.ndarray, noise: float) -> Path:
    """A minimal run directory over particles ``ind`` with true poses and noisy one-hot z."""
    out = folder / "run"
    (out / "epoch_001").mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump({"zdim": 3, "D": 32}))
    table = load_particle_table(truth_path.parent / "particles.star").subset(ind)
    table.save_npz(out / "particles.npz")
    truth = load_truth(truth_path)
    ed = out / "epoch_001"
    field = HartleyField(D=32, apix_A=5.0, zdim=3, hidden=8, layers=1, n_freqs=4)
    torch.save({"state_dict": field.state_dict(), "hparams": field.hparams}, ed / "weights.pt")
    np.savez(
        ed / "poses.npz",
        rotations=truth["rotations"][ind],
        shifts_px=truth["shifts_px"][ind],
        shifts_A=truth["shifts_px"][ind] * 5.0,
        particle_index=ind,
    )
    rng = np.random.default_rng(0)
    z = np.eye(3)[truth["labels"][ind]] + noise * rng.normal(size=(len(ind), 3))
    np.savez(ed / "latents.npz", z=z.astype(np.float32))
    (ed / "DONE").write_text("")
    return out


def test_evaluate_reports_ceiling_beside_learned_ari(high_snr: Path, tmp_path: Path) -> None:
    ind = np.arange(20, N - 20)
    out = _run_on(high_snr, tmp_path, ind, noise=0.6)
    res = evaluate_run(out, high_snr, volumes=[], ceiling_max_images=120)
    ce, c = res["ceiling"], res["clustering"]
    assert ce["n_images"] == 120 and ce["n_eligible"] == len(ind) and ce["subsampled"]
    assert ce["ari"] >= 0.95
    assert c["ceiling_ari"] == ce["ari"] and c["ari"] < 0.95
    assert c["ari_gap"] == pytest.approx(ce["ari"] - c["ari"])
    table = format_table(res)
    assert "state ceiling ARI" in table and "gap" in table and "120 of 260" in table
    off = evaluate_run(out, high_snr, volumes=[], ceiling_max_images=0)
    assert "skipped" in off["ceiling"] and "ceiling_ari" not in off["clustering"]
    assert "skipped" in format_table(off)
