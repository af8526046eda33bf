"""``analyze`` of a run trained with ``--mask``: the mask and where the PC maps change."""

from __future__ import annotations

import html
import shutil

import numpy as np
import pytest
import yaml
from fakerun import FakeRun

from cryofield.analysis import latent
from cryofield.analysis.report import analyze_run
from cryofield.inference.rundir import RunDir
from cryofield.io.mrc import write_mrc


def _with_mask(src: FakeRun, dst, mask_path) -> RunDir:
    shutil.copytree(src.outdir, dst, ignore=shutil.ignore_patterns("analyze.*"))
    cfg_path = dst / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["mask"] = str(mask_path)
    cfg_path.write_text(yaml.safe_dump(cfg))
    return RunDir(dst)


@pytest.fixture(autouse=True)
def _no_umap(monkeypatch):
    """UMAP's first call compiles for ~20 s; the mask does not need it."""
    monkeypatch.setattr(latent, "umap_embedding", lambda z: np.asarray(z, np.float64)[:, :2])


def test_report_gives_the_mask_and_the_share_of_change_inside_it(fake_het_run, tmp_path):
    D = 16
    mask = np.zeros((D, D, D), np.float32)
    mask[4:12, 4:12, 4:12] = 1.0
    path = write_mrc(tmp_path / "mask.mrc", mask, 3.0)
    run = _with_mask(fake_het_run, tmp_path / "run", path)
    np.testing.assert_array_equal(run.mask(), mask)
    page = analyze_run(run.path, n_clusters=2, n_pcs=1)
    text = html.unescape(page.read_text())
    assert f"{path}: 12.50% of the box" in text
    assert "PC1 map change inside the mask" in text
    assert (page.parent / "pc1_mask_change.png").stat().st_size > 1000
    assert "Skipped steps" not in text


def test_report_says_when_the_mask_is_gone(fake_het_run, tmp_path):
    run = _with_mask(fake_het_run, tmp_path / "run", tmp_path / "gone.mrc")
    page = analyze_run(run.path, n_clusters=4, volumes=False)
    text = html.unescape(page.read_text())
    assert "gone.mrc (not readable now)" in text
    assert "Skipped steps" in text and "file not found" in text
    assert RunDir(fake_het_run.outdir).mask() is None
