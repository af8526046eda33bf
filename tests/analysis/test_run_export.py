"""``analysis.export``: choosing a run's particles and writing them back (the library of
``cryofield select`` / ``export``; the commands themselves: tests/cli/test_select.py and
tests/cli/test_export_cli.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from fakerun import FakeRun

from cryofield.analysis import export, latent
from cryofield.errors import CryofieldError
from cryofield.inference.rundir import RunDir
from cryofield.io.metadata import load_particle_table


@pytest.fixture
def run_dir(fake_het_run: FakeRun, tmp_path: Path) -> Path:
    """A private copy of the heterogeneous fake run (particles 5..84 of the input), without
    what other tests' ``analyze`` wrote into the shared one."""
    ignore = shutil.ignore_patterns("analyze.*", "eval_vol.*")
    return Path(shutil.copytree(fake_het_run.outdir, tmp_path / "run", ignore=ignore))


def test_select_by_input_indices_and_invert(run_dir: Path, fake_het_run: FakeRun, capsys):
    index = fake_het_run.input_index
    sel = export.select_particles(run_dir, ind=index[[3, 0]])
    assert sel.epoch == 2 and sel.labels is None  # no clusters asked, none saved
    np.testing.assert_array_equal(sel.rows, [0, 3])
    np.testing.assert_array_equal(sel.index[sel.rows], index[[0, 3]])
    others = export.select_particles(run_dir, ind=index[[3, 0]], invert=True)
    assert others.rows.size == len(index) - 2 and not set(others.rows) & {0, 3}
    # input rows 0..4 are not particles of the run: an error, or ignored with a note
    with pytest.raises(CryofieldError, match="are not particles of this run"):
        export.select_particles(run_dir, ind=np.array([0, 5]))
    sel = export.select_particles(run_dir, ind=np.array([0, 5]), strict_ind=False)
    np.testing.assert_array_equal(sel.rows, [0])
    assert "1 indices are not particles of this run; ignored" in capsys.readouterr().out
    with pytest.raises(CryofieldError, match="the selection is empty"):
        export.select_particles(run_dir, ind=np.array([0]), strict_ind=False)


def test_cluster_labels_follow_analyze(run_dir: Path, capsys) -> None:
    run = RunDir(run_dir)
    assert export.cluster_labels(run, 2, None, required=False) is None
    with pytest.raises(CryofieldError, match="has not run for epoch 2"):
        export.cluster_labels(run, 2, None, required=True)
    km = export.cluster_labels(run, 2, 3, required=True)  # computed here, analyze's seed
    assert "computing its k-means with K=3" in capsys.readouterr().out
    np.testing.assert_array_equal(km.labels, latent.kmeans(run.latents(2), 3).labels)
    folder = run.analyze_dir(2)
    folder.mkdir()
    np.savez(folder / "analysis.npz", kmeans_labels=km.labels, kmeans_centers=km.centers,
             kmeans_nearest=km.nearest)  # fmt: skip
    saved = export.cluster_labels(run, 2, None, required=False)  # analyze's K by default
    np.testing.assert_array_equal(saved.labels, km.labels)
    with pytest.raises(CryofieldError, match="into K=3 clusters"):
        export.cluster_labels(run, 2, 4, required=True)
    sel = export.select_particles(run_dir, clusters=[1])
    np.testing.assert_array_equal(sel.rows, np.flatnonzero(km.labels == 1))
    with pytest.raises(CryofieldError, match=r"\[3\] out of range \(clusters are 0\.\.2\)"):
        export.select_particles(run_dir, clusters=[3])


def test_export_run_and_the_index_file(run_dir: Path, fake_het_run: FakeRun, tmp_path) -> None:
    index = fake_het_run.input_index
    out, n, epoch = export.export_run(run_dir, tmp_path / "some.star", ind=index[10:20])
    assert (n, epoch) == (10, 2)
    back = load_particle_table(out)
    poses = RunDir(run_dir).poses(2)
    np.testing.assert_allclose(back.rotations, poses["rotations"][10:20], atol=1e-5)
    np.testing.assert_array_equal(back.image_index, index[10:20])
    sel = export.select_particles(run_dir, ind=index[10:20])
    path = export.write_index_file(sel, export.index_file_path(out))
    assert path == tmp_path / "some_indices.npy"
    np.testing.assert_array_equal(np.load(path), index[10:20])
    with pytest.raises(CryofieldError, match=r"some\.txt: output must end in \.star or \.cs"):
        export.export_run(run_dir, tmp_path / "some.txt")


def test_check_table_refuses_a_table_that_no_longer_matches(run_dir: Path) -> None:
    run = RunDir(run_dir)
    poses = run.poses(2)
    table = run.table()
    np.testing.assert_array_equal(export.check_table(run, table, poses, 2),
                                  poses["particle_index"])  # fmt: skip
    with pytest.raises(CryofieldError, match="the table no longer matches the run"):
        export.check_table(run, table.subset(np.arange(len(table) - 1)), poses, 2)
