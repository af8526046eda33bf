"""``cryofield select`` (and ``export``): subsets round-trip through the project's readers.

Also the chain downsample -> train (--ind) -> analyze -> select: the selected files are the
ORIGINAL particles with the learned poses, checked by back-projection.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import starfile
import torch
import yaml

from cryofield.analysis import latent
from cryofield.cli.main import main
from cryofield.inference.rundir import RunDir
from cryofield.io.export import latent_column_names
from cryofield.io.metadata import ParticleTable, load_particle_table
from cryofield.io.mrc import read_mrc
from cryofield.model.field import HartleyField
from cryofield.physics.fsc import fsc


def _assert_same_particles(written, expected) -> None:
    assert len(written) == len(expected)
    np.testing.assert_array_equal(written.image_paths, expected.image_paths)
    np.testing.assert_array_equal(written.image_index, expected.image_index)
    np.testing.assert_allclose(written.apix_A, expected.apix_A)


def test_select_clusters_star_and_cs(het_run, tmp_path) -> None:
    star, cs = tmp_path / "sel.star", tmp_path / "sel.cs"
    rc = main(
        [
            "select",
            str(het_run.outdir),
            "--clusters",
            "2,5",
            "--ksample",
            "8",
            "-o",
            str(star),
            "-o",
            str(cs),
        ]
    )
    assert rc == 0
    run = RunDir(het_run.outdir)
    labels = latent.kmeans(run.latents(), 8).labels  # same seed as select and analyze
    rows = np.nonzero(np.isin(labels, [2, 5]))[0]
    expected = run.table().subset(rows)
    for path in (star, cs):
        _assert_same_particles(load_particle_table(path), expected)
    back = load_particle_table(star)
    for col in ("rlnDefocusU", "rlnRandomSubset"):  # original columns kept
        np.testing.assert_allclose(back.raw[col].to_numpy(float), expected.raw[col].to_numpy(float))
    ind = np.load(tmp_path / "sel_indices.npy")
    np.testing.assert_array_equal(ind, het_run.input_index[rows])


def test_select_ind_invert_roundtrip(het_run, tmp_path) -> None:
    drop = het_run.input_index[[0, 3, 10, 11]]
    ind_file = tmp_path / "drop.npy"
    np.save(ind_file, drop)
    out = tmp_path / "keep.star"
    assert (
        main(["select", str(het_run.outdir), "--ind", str(ind_file), "--invert", "-o", str(out)])
        == 0
    )
    kept = np.load(tmp_path / "keep_indices.npy")
    assert len(kept) == len(het_run.input_index) - 4
    assert not set(drop) & set(kept)
    run = RunDir(het_run.outdir)
    rows = np.nonzero(~np.isin(het_run.input_index, drop))[0]
    _assert_same_particles(load_particle_table(out), run.table().subset(rows))
    # selecting the kept indices again (without --invert) gives the same particles
    out2 = tmp_path / "again.cs"
    assert (
        main(
            [
                "select",
                str(het_run.outdir),
                "--ind",
                str(tmp_path / "keep_indices.npy"),
                "-o",
                str(out2),
            ]
        )
        == 0
    )
    _assert_same_particles(load_particle_table(out2), run.table().subset(rows))


def test_select_errors(het_run, tmp_path, capsys) -> None:
    base = ["select", str(het_run.outdir)]
    assert main([*base, "--clusters", "a,b", "-o", str(tmp_path / "x.star")]) == 2
    assert "--clusters" in capsys.readouterr().err
    assert main([*base, "--clusters", "99", "--ksample", "8", "-o", str(tmp_path / "x.star")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main([*base, "--clusters", "1", "-o", str(tmp_path / "x.txt")]) == 2
    assert (
        main([*base, "--ind", str(tmp_path / "missing.npy"), "-o", str(tmp_path / "x.star")]) == 2
    )
    assert "missing.npy" in capsys.readouterr().err


# ------------------------------------------------- downsample -> run -> analyze -> select
# A noiseless simulation (32 px, 6 A/px, shifted particles) is downsampled to 16 px (a
# subset, --ind), a run is "trained" on the downsampled file with --ind (a fake run whose
# learned poses are the true ones, z = two clusters), analyze clusters it, and select /
# export must give the ORIGINAL particles at 32 px with the learned poses.
N_SIM, D_SIM, APIX_SIM, D_SMALL = 200, 32, 6.0, 16


def _sim(simulated):
    return simulated(N_SIM, D_SIM, APIX_SIM, seed=11)


@pytest.fixture(scope="module")
def chain(simulated, tmp_path_factory) -> SimpleNamespace:
    sim, truth = _sim(simulated)
    root = tmp_path_factory.mktemp("chain")
    keep = np.arange(20, N_SIM)  # downsample --ind
    np.save(root / "keep.npy", keep)
    small = root / "small" / "p16.star"
    assert main(["downsample", str(sim / "particles.star"), "-D", str(D_SMALL), "--ind",
                 str(root / "keep.npy"), "-o", str(small.with_suffix(".mrcs"))]) == 0  # fmt: skip
    train_ind = np.arange(5, len(keep))  # train --ind on the downsampled file
    np.save(root / "train_ind.npy", train_ind)
    out = root / "run"
    out.mkdir()
    cfg = {"particles": str(small), "ind": str(root / "train_ind.npy"), "zdim": 1, "D": D_SMALL}
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    # what train saves: the table after --ind; poses go with its rows, particle_index = --ind
    load_particle_table(small, ind=root / "train_ind.npy").save_npz(out / "particles.npz")
    src = keep[train_ind]  # rows of the simulation
    R = truth["rotations"][src].astype(np.float32)
    shifts_A = (truth["shifts_px"][src] * APIX_SIM).astype(np.float32)
    group = (R[:, 2, 2] > 0).astype(np.int64)
    z = (4.0 * group - 2.0 + 0.1 * np.random.default_rng(0).normal(size=len(src)))[:, None]
    apix_small = APIX_SIM * D_SIM / D_SMALL
    field = HartleyField(D=D_SMALL, apix_A=apix_small, zdim=1, hidden=16, layers=1, n_freqs=4)
    for epoch in (1, 2):
        ep = out / f"epoch_{epoch:03d}"
        ep.mkdir()
        torch.save({"state_dict": field.state_dict(), "hparams": field.hparams}, ep / "weights.pt")
        np.savez(ep / "poses.npz", rotations=R, shifts_px=shifts_A / apix_small,
                 shifts_A=shifts_A, particle_index=train_ind)  # fmt: skip
        np.savez(ep / "latents.npz", z=z.astype(np.float32))
        (ep / "DONE").write_text("")
    # analyze clusters the last epoch only (K=2)
    assert main(["analyze", str(out), "--no-volumes", "--ksample", "2"]) == 0
    labels = np.load(out / "analyze.2" / "analysis.npz")["kmeans_labels"]
    return SimpleNamespace(sim=sim, truth=truth, root=root, out=out, small=small, src=src,
                           train_ind=train_ind, R=R, shifts_A=shifts_A, z=z,
                           labels=labels)  # fmt: skip


def _backproject_fsc(star: Path, truth: dict, sim: Path, tmp: Path) -> np.ndarray:
    out = tmp / (star.stem + "_map.mrc")
    contrast = "invert" if truth["invert"] else "as-is"
    assert main(["backproject", str(star), "-o", str(out), "--contrast", contrast]) == 0
    vol, _ = read_mrc(out, mmap=False)
    ref, _ = read_mrc(sim / str(truth["volume_paths"][0]), mmap=False)
    curve = fsc(torch.as_tensor(np.asarray(vol)), torch.as_tensor(np.asarray(ref)))
    return curve.numpy()


def test_select_after_downsample_writes_the_original_particles(chain, tmp_path, capsys):
    star, cs = tmp_path / "state1.star", tmp_path / "state1.cs"
    # no --ksample: the K that analyze saved
    assert main(["select", str(chain.out), "--clusters", "1", "-o", str(star), "-o", str(cs)]) == 0
    assert "ORIGINAL particles" in capsys.readouterr().out
    rows = np.flatnonzero(chain.labels == 1)
    assert 0 < rows.size < len(chain.src)
    original = load_particle_table(chain.sim / "particles.star").subset(chain.src[rows])
    for path in (star, cs):
        back = load_particle_table(path)
        _assert_same_particles(back, original)  # original stack, frames and pixel size
        assert back.box_px == D_SIM
        np.testing.assert_allclose(back.rotations, chain.R[rows], atol=1e-5)
        # shifts in A of the run, at the original pixel size = the true shifts in px
        np.testing.assert_allclose(back.shifts_px, chain.truth["shifts_px"][chain.src[rows]],
                                   atol=1e-4)  # fmt: skip
        for k in ("defocus_u_A", "defocus_v_A", "voltage_kV"):
            np.testing.assert_allclose(back.ctf[k], original.ctf[k], rtol=1e-6)
    blocks = starfile.read(star, always_dict=True)
    df, optics = blocks["particles"], blocks["optics"]
    assert optics["rlnImagePixelSize"].tolist() == [APIX_SIM]
    assert optics["rlnImageSize"].tolist() == [D_SIM]
    assert not any(c.startswith(("rlnImageOriginalName", "rlnCryofieldOriginal")) for c in df)
    np.testing.assert_allclose(df["rlnOriginXAngst"], -chain.shifts_A[rows, 0], atol=1e-4)
    np.testing.assert_allclose(df[latent_column_names(1)[0]], chain.z[rows, 0], rtol=1e-6)
    assert set(df["rlnClassNumber"]) == {2}  # cluster 1 -> RELION class 2
    arr = np.load(cs, allow_pickle=False)
    assert set(arr["alignments3D/class"].tolist()) == {1}
    assert set(np.asarray(arr["blob/shape"])[:, 0].tolist()) == {D_SIM}
    np.testing.assert_allclose(arr["cryofield/z01"], chain.z[rows, 0], rtol=1e-6)
    # the index file: rows of the training input (the downsampled star)
    np.testing.assert_array_equal(np.load(tmp_path / "state1_indices.npy"), chain.train_ind[rows])


def test_selected_originals_backproject_to_the_true_map(chain, tmp_path):
    star = tmp_path / "all.star"
    assert main(["select", str(chain.out), "--ind", str(chain.root / "train_ind.npy"),
                 "-o", str(star)]) == 0  # fmt: skip
    good = _backproject_fsc(star, chain.truth, chain.sim, tmp_path)
    # the same particles with the shifts converted at the downsampled pixel size
    blocks = starfile.read(star, always_dict=True)
    for c in ("rlnOriginXAngst", "rlnOriginYAngst"):
        blocks["particles"][c] = blocks["particles"][c] * D_SMALL / D_SIM
    wrong = tmp_path / "wrong_scale.star"
    starfile.write(blocks, wrong)
    bad = _backproject_fsc(wrong, chain.truth, chain.sim, tmp_path)
    # measured: FSC >= 0.997 in every shell; 0.02 at Nyquist with the wrong scale
    assert good[1:].min() > 0.95, good
    assert bad[D_SIM // 4 :].mean() < 0.6 and good[1:].mean() > bad[1:].mean() + 0.2, bad


def test_write_downsampled_and_missing_originals(chain, tmp_path, capsys):
    out = tmp_path / "small.star"
    argv = ["select", str(chain.out), "--clusters", "0", "-o", str(out)]
    assert main([*argv, "--write-downsampled"]) == 0
    back = load_particle_table(out)
    rows = np.flatnonzero(chain.labels == 0)
    assert back.box_px == D_SMALL and set(back.image_paths) == {
        str(chain.small.with_suffix(".mrcs"))
    }
    np.testing.assert_array_equal(back.image_index, chain.train_ind[rows])
    np.testing.assert_allclose(back.apix_A, APIX_SIM * D_SIM / D_SMALL)
    np.testing.assert_allclose(back.shifts_px * back.apix_A[:, None], chain.truth["shifts_px"][
        chain.src[rows]] * APIX_SIM, atol=1e-3)  # fmt: skip
    # a run whose originals have gone: a clear error naming the file
    run = tmp_path / "run_copy"
    shutil.copytree(chain.out, run)
    table = ParticleTable.load_npz(run / "particles.npz")
    gone = tmp_path / "gone" / "particles.mrcs"
    table.raw["rlnImageOriginalName"] = [f"{i + 1:06d}@{gone}" for i in range(len(table))]
    table.save_npz(run / "particles.npz")
    capsys.readouterr()
    for cmd in (["select", str(run), "--clusters", "0"], ["export", str(run)]):
        assert main([*cmd, "-o", str(tmp_path / "x.star")]) == 2
        err = capsys.readouterr().err
        assert str(gone) in err and "--write-downsampled" in err, err
    assert main(["export", str(run), "--write-downsampled", "-o", str(tmp_path / "x.star")]) == 0


def test_cluster_k_must_match_analyze(chain, tmp_path, capsys):
    run = str(chain.out)
    out = str(tmp_path / "x.star")
    for cmd in ("select", "export"):
        assert main([cmd, run, "--clusters", "0", "--ksample", "3", "-o", out]) == 2
        err = capsys.readouterr().err
        assert "K=2" in err and "cryofield analyze" in err and "--ksample 3" in err, err
    # the same K is fine, and export writes analyze's clusters as classes
    assert main(["export", run, "--ksample", "2", "-o", out]) == 0
    df = starfile.read(out, always_dict=True)["particles"]
    np.testing.assert_array_equal(df["rlnClassNumber"], chain.labels + 1)
    # epoch 1 was not analysed: --clusters needs analyze or an explicit K
    for cmd in ("select", "export"):
        assert main([cmd, run, "--epoch", "1", "--clusters", "0", "-o", out]) == 2
        err = capsys.readouterr().err
        assert "has not run for epoch 1" in err and "cryofield analyze" in err, err
    assert main(["select", run, "--epoch", "1", "--clusters", "0", "--ksample", "2",
                 "-o", out]) == 0  # fmt: skip
    assert "has not run" in capsys.readouterr().out
    chosen = np.load(tmp_path / "x_indices.npy")
    # same latents, same seed: the same clustering as analyze's (up to numbering)
    assert any(np.array_equal(chosen, chain.train_ind[chain.labels == k]) for k in (0, 1))


def test_export_of_a_run_trained_with_ind(het_run, tmp_path):
    """particle_index are rows of the input file; the run's table holds only its rows."""
    out = tmp_path / "all.star"
    assert main(["export", str(het_run.outdir), "-o", str(out)]) == 0
    back = load_particle_table(out)
    np.testing.assert_array_equal(back.image_index, het_run.input_index)
    ind = tmp_path / "ind.npy"
    np.save(ind, het_run.input_index[[3, 0]])
    assert main(["export", str(het_run.outdir), "--ind", str(ind), "-o", str(out)]) == 0
    np.testing.assert_array_equal(load_particle_table(out).image_index, het_run.input_index[[0, 3]])


_FAST = ["--epochs", "1", "--hps-images", "32", "-b", "16", "--hidden", "16", "--n-freqs", "4",
         "--base-nside", "1", "--base-psi", "6", "--search-levels", "1", "--threads", "1",
         "--deterministic"]  # fmt: skip


def test_real_training_on_downsampled_particles_exports_the_originals(
    simulated, tmp_path, one_thread
):
    sim, _ = _sim(simulated)
    small = tmp_path / "p16.mrcs"
    assert main(["downsample", str(sim / "particles.star"), "-D", str(D_SMALL), "-o",
                 str(small)]) == 0  # fmt: skip
    ind = tmp_path / "ind.npy"
    np.save(ind, np.arange(100, 148))
    out = tmp_path / "run"
    assert main(["train", str(small.with_suffix(".star")), "--ind", str(ind), "-o", str(out),
                 *_FAST]) == 0  # fmt: skip
    poses = RunDir(out).poses()
    np.testing.assert_array_equal(poses["particle_index"], np.arange(100, 148))
    exported = tmp_path / "full.star"
    assert main(["export", str(out), "-o", str(exported)]) == 0
    back = load_particle_table(exported)
    _assert_same_particles(back, load_particle_table(sim / "particles.star").subset(
        np.arange(100, 148)))  # fmt: skip
    assert back.box_px == D_SIM
    df = starfile.read(exported, always_dict=True)["particles"]
    np.testing.assert_allclose(df["rlnOriginXAngst"], -poses["shifts_A"][:, 0], atol=1e-3)
    np.testing.assert_allclose(back.rotations, poses["rotations"], atol=1e-4)
    # train's own OUTDIR/particles.star goes through the same writer: the originals too
    final = load_particle_table(out / "particles.star")
    assert final.box_px == D_SIM
    np.testing.assert_array_equal(final.image_paths, back.image_paths)
    np.testing.assert_allclose(final.shifts_px, back.shifts_px, atol=1e-3)


def test_select_drop_junk_leaves_out_analyze_junk(chain, tmp_path, capsys):
    junk_file = chain.out / "analyze.2" / "junk.npz"
    assert junk_file.is_file()
    saved = junk_file.read_bytes()
    n = len(chain.src)
    junk = np.zeros(n, dtype=bool)
    junk[::5] = True  # a known mask in the run's particle order
    try:
        np.savez(junk_file, junk=junk, junk_score=junk.astype(np.float32))
        out = tmp_path / "clean.star"
        assert main(["select", str(chain.out), "--drop-junk", "-o", str(out)]) == 0
        kept = np.load(tmp_path / "clean_indices.npy")
        assert np.array_equal(kept, np.sort(chain.train_ind[~junk]))
        # with clusters: the cluster minus its junk
        out2 = tmp_path / "c0.star"
        assert (
            main(["select", str(chain.out), "--clusters", "0", "--drop-junk", "-o", str(out2)]) == 0
        )
        kept2 = np.load(tmp_path / "c0_indices.npy")
        want = chain.train_ind[(chain.labels == 0) & ~junk]
        assert np.array_equal(np.sort(kept2), np.sort(want))
    finally:
        junk_file.write_bytes(saved)
    # an epoch that analyze did not run: a clear error
    assert main(["select", str(chain.out), "--drop-junk", "--epoch", "1",
                 "-o", str(tmp_path / "x.star")]) == 2  # fmt: skip
    assert "run 'cryofield analyze" in capsys.readouterr().err
    assert main(["select", str(chain.out), "-o", str(tmp_path / "y.star")]) == 2


def test_boolean_mask_selects_the_same_particles_as_indices(chain, tmp_path, capsys):
    """A mask over the rows of the training input file (here the downsampled star of
    len(keep) rows, trained with --ind) means its True rows, in select and export alike."""
    n_input = len(load_particle_table(chain.small))
    rows = chain.train_ind[[0, 7, 30, 100]]
    mask = np.zeros(n_input, bool)
    mask[rows] = True
    np.save(tmp_path / "mask.npy", mask)
    np.save(tmp_path / "ints.npy", rows)
    for cmd in ("select", "export"):
        got = {}
        for name in ("mask", "ints"):
            out = tmp_path / f"{cmd}_{name}.star"
            assert main([cmd, str(chain.out), "--ind", str(tmp_path / f"{name}.npy"),
                         "-o", str(out)]) == 0  # fmt: skip
            got[name] = load_particle_table(out)
        _assert_same_particles(got["mask"], got["ints"])
        assert len(got["mask"]) == 4
    np.testing.assert_array_equal(np.load(tmp_path / "select_mask_indices.npy"), rows)
    # a mask of another length is an error naming the file
    np.save(tmp_path / "short.npy", mask[:-1])
    capsys.readouterr()
    for cmd in ("select", "export"):
        assert main([cmd, str(chain.out), "--ind", str(tmp_path / "short.npy"),
                     "-o", str(tmp_path / "x.star")]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert "short.npy" in err and f"boolean mask of {n_input - 1} for {n_input}" in err


def test_select_and_export_never_write_their_inputs(chain, tmp_path, capsys):
    """-o at the run's input particle file, or an index file written over the --ind file."""
    before = chain.small.read_bytes()
    assert main(["select", str(chain.out), "--clusters", "0", "-o", str(chain.small)]) == 2
    err = capsys.readouterr().err
    assert f"refusing to write {chain.small}: it is an input of this command" in err
    assert main(["export", str(chain.out), "-o", str(chain.small)]) == 2
    assert "refusing to write" in capsys.readouterr().err
    assert chain.small.read_bytes() == before
    # select --ind X_indices.npy -o X.star would write its index file over the --ind file
    ind = tmp_path / "junk_indices.npy"
    np.save(ind, chain.train_ind[:5])
    argv = ["select", str(chain.out), "--ind", str(ind), "-o", str(tmp_path / "junk.star")]
    assert main(argv) == 2
    assert f"refusing to write {ind}" in capsys.readouterr().err
    assert not (tmp_path / "junk.star").exists()
    np.testing.assert_array_equal(np.load(ind), chain.train_ind[:5])
