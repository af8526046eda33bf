"""``cryofield select``: subsets round-trip through the project's own readers."""

from __future__ import annotations

import numpy as np

from cryofield.analysis import latent
from cryofield.cli.main import main
from cryofield.inference.rundir import RunDir
from cryofield.io.metadata import load_particle_table


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
    assert main([*base, "--clusters", "99", "-o", str(tmp_path / "x.star")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main([*base, "--clusters", "1", "-o", str(tmp_path / "x.txt")]) == 2
    assert (
        main([*base, "--ind", str(tmp_path / "missing.npy"), "-o", str(tmp_path / "x.star")]) == 2
    )
    assert "missing.npy" in capsys.readouterr().err
