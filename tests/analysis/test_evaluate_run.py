"""``evaluate_run`` against the exact truth of fake runs."""

from __future__ import annotations

import numpy as np
import pytest
from fakerun import FakeRun

from cryofield.analysis.evaluate import evaluate_run, format_table, load_truth
from cryofield.errors import InputFileError


def test_homogeneous_rotated_run_scores_perfectly(fake_hom_run: FakeRun) -> None:
    res = evaluate_run(fake_hom_run.outdir, fake_hom_run.truth_path)
    p = res["poses"]
    assert p["mirrored"] is False
    assert p["rot_median_deg"] < 0.01 and p["out_of_plane_mean_deg"] < 0.01
    assert p["trans_mean_px"] < 1e-6
    np.testing.assert_allclose(np.asarray(p["R_global"]), fake_hom_run.G, atol=1e-4)
    (m,) = res["maps"]
    # the run's map is the truth resampled once by trilinear rotation
    assert m["mirrored"] is False and m["correlation"] > 0.98
    assert m["fsc_auc"] > 0.35
    assert m["res_0.143_A"] < 8.0  # Nyquist is 6 A
    assert "hand" in format_table(res)


def test_mirrored_run_is_detected(fake_hom_mirror_run: FakeRun) -> None:
    res = evaluate_run(fake_hom_mirror_run.outdir, fake_hom_mirror_run.truth_path)
    assert res["poses"]["mirrored"] is True
    assert res["poses"]["rot_median_deg"] < 0.01
    (m,) = res["maps"]
    assert m["mirrored"] is True and m["correlation"] > 0.98
    assert "mirrored" in format_table(res)


def test_heterogeneous_clusters_and_coord(fake_het_run: FakeRun) -> None:
    res = evaluate_run(fake_het_run.outdir, fake_het_run.truth_path, volumes=[])
    c = res["clustering"]
    assert c["k"] == 3
    assert c["ari"] == pytest.approx(1.0) and c["accuracy"] == pytest.approx(1.0)
    assert c["nmi"] == pytest.approx(1.0)
    # the fake latents do not encode the coordinate: |rho| small, but computed
    assert len(res["latent_vs_coord_spearman"]) == 2
    assert max(abs(v) for v in res["latent_vs_coord_spearman"]) < 0.5
    assert res["maps"] == []


def test_truth_errors(tmp_path, fake_hom_run: FakeRun) -> None:
    bad = tmp_path / "t.npz"
    np.savez(bad, labels=np.zeros(3))
    with pytest.raises(InputFileError, match="rotations"):
        load_truth(bad)
    small = tmp_path / "s.npz"
    np.savez(small, rotations=np.tile(np.eye(3), (10, 1, 1)))
    with pytest.raises(InputFileError, match="10 particles"):
        evaluate_run(fake_hom_run.outdir, small)


def test_inverted_contrast_map_is_negated(fake_hom_run: FakeRun, tmp_path) -> None:
    import shutil

    from cryofield.io.mrc import read_mrc, write_mrc

    out = tmp_path / "run"
    shutil.copytree(fake_hom_run.outdir, out, ignore=shutil.ignore_patterns("analyze.*"))
    vol, _ = read_mrc(out / "epoch_002" / "volume.mrc")
    write_mrc(out / "epoch_002" / "volume.mrc", -np.asarray(vol), 3.0)
    (m,) = evaluate_run(out, fake_hom_run.truth_path)["maps"]
    assert m["negated"] is True and m["correlation"] > 0.98


def test_symmetric_run_is_scored_modulo_its_group(fake_hom_run: FakeRun, tmp_path) -> None:
    """A run trained with ``symmetry: C4`` (config.yaml) whose poses are the truth's up to
    one C4 operator per image (``R_true g_i G``: equivalent poses, the same images of a C4
    particle) scores as exact: `cryofield evaluate` compares each pose with the nearest
    equivalent of the true one (issue #23; before, such poses scored as 90-180 deg off)."""
    import shutil

    import torch
    import yaml

    from cryofield.physics.symmetry import symmetry_operators

    run = tmp_path / "run_c4"
    shutil.copytree(fake_hom_run.outdir, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["symmetry"] = "C4"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    ops = symmetry_operators("C4", torch.float64).numpy()
    R_true = np.load(fake_hom_run.truth_path)["rotations"].astype(np.float64)
    for ed in sorted(run.glob("epoch_*")):
        poses = dict(np.load(ed / "poses.npz"))
        idx = poses["particle_index"]
        g = ops[np.arange(len(idx)) % 4]
        poses["rotations"] = (R_true[idx] @ g @ fake_hom_run.G).astype(np.float32)
        np.savez(ed / "poses.npz", **poses)
    res = evaluate_run(run, fake_hom_run.truth_path)
    p = res["poses"]
    assert p["symmetry"] == "C4" and p["group_order"] == 4
    assert p["rot_median_deg"] < 0.01 and p["frac_within_10deg"] == 1.0, p
    # the global rotation is G up to an operator of the group
    rel = np.asarray(p["R_global"]) @ fake_hom_run.G.T
    assert np.abs(ops - rel).reshape(4, 9).max(1).min() < 1e-4
    # the C1 score of the same poses: three quarters of them 90-180 deg off
    plain = evaluate_run(fake_hom_run.outdir, fake_hom_run.truth_path)["poses"]
    assert plain["symmetry"] == "C1" and plain["rot_median_deg"] < 0.01


def test_pose_floor_of_a_homogeneous_run(fake_hom_run: FakeRun, monkeypatch) -> None:
    """The pose floor aligns the run's own training images from their true poses; the
    fake run's noiseless projections stay near them, and the run (exact poses) is below
    the floor. Heterogeneous runs and too few particles are skipped with the reason."""
    import cryofield.analysis.evaluate as ev

    res = evaluate_run(fake_hom_run.outdir, fake_hom_run.truth_path)
    assert "at least 100" in res["pose_floor"]["skipped"]
    monkeypatch.setattr(ev, "FLOOR_MIN_IMAGES", 10)
    res = evaluate_run(fake_hom_run.outdir, fake_hom_run.truth_path, floor_max_images=40)
    pf = res["pose_floor"]
    assert pf["n"] == 40 and pf["folds"] == 8
    # 90 images at D=16: each fold-out half map has ~40 slices, a coarse reference
    assert pf["out_of_plane_median_deg"] < 3.0 and pf["trans_median_px"] < 0.3
    assert res["poses"]["oop_median_over_floor"] < 0.1  # exact poses: below the floor
    assert "pose floor" in format_table(res)
    off = evaluate_run(fake_hom_run.outdir, fake_hom_run.truth_path, floor_max_images=0)
    assert "floor_max_images = 0" in off["pose_floor"]["skipped"]


def test_no_pose_floor_for_heterogeneous_runs(fake_het_run: FakeRun) -> None:
    res = evaluate_run(fake_het_run.outdir, fake_het_run.truth_path, volumes=[])
    assert res["pose_floor"] == {"skipped": "heterogeneous run"}
