"""``cryofield export`` on a hand-built run folder with known poses (the true ones)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
import torch
import yaml

from cryofield.cli.main import main
from cryofield.io.export import latent_column_names
from cryofield.io.metadata import ParticleTable, load_particle_table
from cryofield.io.mrc import read_mrc, write_mrc
from cryofield.physics.backproject import reconstruct_fourier
from cryofield.physics.ctf import CTFParams
from cryofield.physics.fsc import fsc
from cryofield.physics.handedness import flip_hand_volume, mirror_matrix
from cryofield.physics.rotation import random_rotations

N, D, APIX = 200, 32, 6.0


def _strip_poses(table: ParticleTable) -> ParticleTable:
    cols = [c for c in table.raw.columns if c.startswith(("rlnAngle", "rlnOrigin"))]
    return replace(table, raw=table.raw.drop(columns=cols), rotations=None, shifts_px=None)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


@pytest.fixture(scope="module")
def sim(simulated) -> Path:
    return simulated(N, D, APIX, seed=11)[0]


@pytest.fixture(scope="module")
def truth(simulated) -> dict[str, np.ndarray]:
    return simulated(N, D, APIX, seed=11)[1]


@pytest.fixture(scope="module")
def run_template(sim: Path, truth: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-epoch run stopped during epoch 3: epoch 1 random poses, epoch 2 the true ones."""
    out = tmp_path_factory.mktemp("run")
    (out / "config.yaml").write_text(
        yaml.safe_dump({"particles": str(sim / "particles.star"), "epochs": 3, "zdim": 1})
    )
    _strip_poses(load_particle_table(sim / "particles.star")).save_npz(out / "particles.npz")
    index = np.arange(N)
    R1 = random_rotations(N, torch.Generator().manual_seed(5)).numpy()
    R2, t2 = truth["rotations"], truth["shifts_px"]
    group = (R2[:, 2, 2] > 0).astype(np.int64)  # two "conformations"
    z = (4.0 * group - 2.0 + 0.1 * np.random.default_rng(0).normal(size=N))[:, None]
    vol, _ = read_mrc(sim / str(truth["volume_paths"][0]), mmap=False)
    for ep, (R, t) in enumerate([(R1, np.zeros((N, 2))), (R2, t2), (R1, t2)], start=1):
        d = out / f"epoch_{ep:03d}"
        d.mkdir()
        _save_npz(d / "poses.npz", rotations=R.astype(np.float32), shifts_px=t.astype(np.float32),
                  shifts_A=(t * APIX).astype(np.float32), particle_index=index)  # fmt: skip
        _save_npz(d / "latents.npz", z=z.astype(np.float32))
        write_mrc(d / "volume.mrc", np.asarray(vol, dtype=np.float32), APIX)
        if ep < 3:
            (d / "DONE").write_text("ok\n")
    np.save(out / "group.npy", group)
    return out


@pytest.fixture
def run_dir(run_template: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run_template, dest)
    return dest


def _particles(path: Path) -> pd.DataFrame:
    return starfile.read(path, always_dict=True)["particles"]


def test_unfinished_run_exports_last_complete_epoch(
    run_dir: Path, truth: dict, capsys: pytest.CaptureFixture
) -> None:
    out = run_dir / "export.star"
    assert main(["export", str(run_dir), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "unfinished" in printed and "exporting epoch 2" in printed
    back = load_particle_table(out)
    np.testing.assert_allclose(back.rotations, truth["rotations"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(back.shifts_px, truth["shifts_px"], atol=1e-4, rtol=0)
    df = _particles(out)
    z = np.load(run_dir / "epoch_002" / "latents.npz")["z"]
    np.testing.assert_allclose(df[latent_column_names(1)].to_numpy(), z, rtol=1e-6)
    assert "rlnClassNumber" not in df.columns  # analyze has not run


def test_epoch_choice_and_incomplete_epoch(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    out = run_dir / "e1.cs"
    assert main(["export", str(run_dir), "--epoch", "1", "-o", str(out)]) == 0
    R1 = np.load(run_dir / "epoch_001" / "poses.npz")["rotations"]
    np.testing.assert_allclose(load_particle_table(out).rotations, R1, atol=1e-5, rtol=0)
    assert main(["export", str(run_dir), "--epoch", "3", "-o", str(out)]) == 2
    assert "epoch 3 is missing or incomplete" in capsys.readouterr().err


def test_table_that_no_longer_matches_is_refused(
    run_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    table = ParticleTable.load_npz(run_dir / "particles.npz")
    table.subset(np.arange(N - 1)).save_npz(run_dir / "particles.npz")
    out = run_dir / "x.star"
    assert main(["export", str(run_dir), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"has {N - 1} rows" in err and f"poses for {N} particles" in err
    assert "no longer matches" in err
    assert not out.exists()


def test_flip_hand_reconstructs_the_mirrored_map(run_dir: Path, truth: dict) -> None:
    out = run_dir / "flipped.cs"
    assert main(["export", str(run_dir), "--epoch", "2", "--flip-hand", "-o", str(out)]) == 0
    flipped_map, _ = read_mrc(run_dir / "flipped_flipped_hand.mrc", mmap=False)
    original, _ = read_mrc(run_dir / "epoch_002" / "volume.mrc", mmap=False)
    np.testing.assert_array_equal(flipped_map, flip_hand_volume(np.asarray(original)))
    back = load_particle_table(out)
    M = mirror_matrix(torch.float64).numpy()
    np.testing.assert_allclose(back.rotations, M @ truth["rotations"] @ M, atol=1e-5, rtol=0)
    images = np.asarray(read_mrc(back.image_paths[0], mmap=False)[0])[back.image_index]
    recon = reconstruct_fourier(
        torch.as_tensor(images), torch.as_tensor(back.rotations),
        torch.as_tensor(back.shifts_px), CTFParams.from_table(back),
        torch.as_tensor(back.apix_A, dtype=torch.float32),
    )  # fmt: skip
    sign = -1.0 if truth["invert"] else 1.0
    ref = torch.as_tensor(np.asarray(flipped_map, dtype=np.float32))
    curve = fsc(sign * recon, ref)[1 : D // 4]
    assert curve.min() > 0.9, curve
    assert fsc(sign * recon, torch.as_tensor(np.asarray(original)))[1 : D // 4].mean() < 0.8


def _write_analysis(run_dir: Path, labels: np.ndarray) -> None:
    z = np.load(run_dir / "epoch_002" / "latents.npz")["z"]
    centers = np.stack([z[labels == k].mean(0) for k in range(2)])
    folder = run_dir / "analyze.2"
    folder.mkdir()
    nearest = np.array([np.flatnonzero(labels == k)[0] for k in range(2)])
    _save_npz(folder / "analysis.npz", kmeans_labels=labels, kmeans_centers=centers,
              kmeans_nearest=nearest)  # fmt: skip


def test_clusters_from_analyze(run_dir: Path) -> None:
    group = np.load(run_dir / "group.npy")
    _write_analysis(run_dir, group)
    every = run_dir / "all.star"
    assert main(["export", str(run_dir), "--epoch", "2", "-o", str(every)]) == 0
    np.testing.assert_array_equal(_particles(every)["rlnClassNumber"], group + 1)
    one = run_dir / "one.cs"
    assert main(["export", str(run_dir), "--epoch", "2", "--clusters", "1", "-o", str(one)]) == 0
    arr = np.load(one, allow_pickle=False)
    table = load_particle_table(run_dir / "particles.npz")
    np.testing.assert_array_equal(arr["blob/idx"], table.image_index[group == 1])
    np.testing.assert_array_equal(arr["alignments3D/class"], 1)


def test_clusters_without_analyze_are_computed(
    run_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    group = np.load(run_dir / "group.npy")
    out = run_dir / "c0.star"
    argv = ["export", str(run_dir), "--epoch", "2", "--clusters", "0", "--ksample", "2"]
    assert main([*argv, "-o", str(out)]) == 0
    assert "has not run" in capsys.readouterr().out
    chosen = np.sort(load_particle_table(out).image_index)
    table = load_particle_table(run_dir / "particles.npz")
    groups = [np.sort(table.image_index[group == g]) for g in (0, 1)]
    assert any(np.array_equal(chosen, g) for g in groups)
    assert main([*argv[:-2], "--clusters", "5", "--ksample", "2", "-o", str(out)]) == 2


def test_ind_subset(run_dir: Path, truth: dict, capsys: pytest.CaptureFixture) -> None:
    ind = run_dir / "keep.npy"
    np.save(ind, np.array([7, 0, 42]))
    out = run_dir / "keep.star"
    assert main(["export", str(run_dir), "--epoch", "2", "--ind", str(ind), "-o", str(out)]) == 0
    back = load_particle_table(out)
    np.testing.assert_allclose(back.rotations, truth["rotations"][[0, 7, 42]], atol=1e-5, rtol=0)
    np.save(ind, np.array([N + 3]))
    assert main(["export", str(run_dir), "--ind", str(ind), "-o", str(out)]) == 2
    assert "out of range" in capsys.readouterr().err


def test_help_has_an_example(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["export", "--help"])
    assert info.value.code == 0
    assert "cryofield export out/ -o" in capsys.readouterr().out


def test_export_names_the_point_group_of_a_symmetric_run(tmp_path, capsys) -> None:
    from cryofield.cli.export import _symmetry_note

    (tmp_path / "config.yaml").write_text("symmetry: d7\n")
    _symmetry_note(str(tmp_path), "out.star")
    out = capsys.readouterr().out
    assert "symmetry D7" in out and "2-fold on x" in out
    (tmp_path / "config.yaml").write_text("symmetry: C1\n")
    _symmetry_note(str(tmp_path), "out.star")
    assert capsys.readouterr().out == ""
