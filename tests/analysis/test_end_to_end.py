"""simulate -> train -> analyze / select / evaluate on real outputs (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cryofield.cli.main import main
from cryofield.io.metadata import load_particle_table


@pytest.mark.slow
def test_simulate_train_analyze_select_evaluate(tmp_path) -> None:
    from cryofield.inference.config import TrainConfig
    from cryofield.inference.runner import train
    from cryofield.simulate.dataset import SimulationConfig, simulate_dataset

    sim = simulate_dataset(
        SimulationConfig(source="states", n_particles=300, D=32, apix_A=6.0, snr=1.0, seed=1),
        tmp_path / "sim",
    )
    cfg = TrainConfig(
        particles=str(sim / "particles.star"),
        outdir=str(tmp_path / "run"),
        zdim=2,
        hidden=64,
        layers=2,
        epochs=3,
        poses_from_file=True,
        refine_poses=False,
        batch_size=32,
        num_threads=1,
    )
    out = train(cfg)
    assert main(["analyze", str(out), "--ksample", "6"]) == 0
    folder = out / "analyze.3"
    for name in ("pca_clusters.png", "umap_clusters.png", "kmeans_gallery.png", "poses.png"):
        assert (folder / name).stat().st_size > 1000
    assert len(list((folder / "kmeans").glob("vol_*.mrc"))) == 6
    # select: the index file picks the same particles from the original star file
    assert (
        main(
            [
                "select",
                str(out),
                "--clusters",
                "0,2",
                "--ksample",
                "6",
                "-o",
                str(tmp_path / "sel.star"),
            ]
        )
        == 0
    )
    ind = np.load(tmp_path / "sel_indices.npy")
    sel = load_particle_table(tmp_path / "sel.star")
    orig = load_particle_table(sim / "particles.star", ind=ind)
    np.testing.assert_array_equal(sel.image_index, orig.image_index)
    np.testing.assert_array_equal(sel.image_paths, orig.image_paths)
    # evaluate: the file poses are the truth, so the pose error is ~0 after alignment
    assert (
        main(
            [
                "evaluate",
                str(out),
                "--truth",
                str(sim / "truth.npz"),
                "-o",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["poses"]["rot_median_deg"] < 0.1 and not res["poses"]["mirrored"]
    assert len(res["maps"]) == 3
    assert all(m["fsc_auc"] > 0.1 for m in res["maps"])
