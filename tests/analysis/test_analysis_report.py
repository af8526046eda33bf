"""``analyze_run`` on fake runs: every figure, map and script is written."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
from fakerun import FakeRun

from cryofield.analysis import latent
from cryofield.analysis.report import analyze_run, kmeans_for_run
from cryofield.errors import CryofieldError
from cryofield.inference.rundir import RunDir
from cryofield.io.mrc import read_mrc

HET_FIGURES = (
    "pca_clusters.png",
    "explained_variance.png",
    "umap_clusters.png",
    "kde_pca.png",
    "kde_umap.png",
    "cluster_counts.png",
    "junk.png",
    "poses.png",
    "training.png",
)


def _check_page(path) -> str:
    text = path.read_text()
    assert "http://" not in text and "https://" not in text  # no network assets
    for src in re.findall(r'src="([^"]+)"', text):
        img = path.parent / src
        assert img.is_file() and img.stat().st_size > 1000, src
        assert img.read_bytes()[:4] == b"\x89PNG"
    return text


def test_heterogeneous_report(fake_het_run: FakeRun) -> None:
    page = analyze_run(fake_het_run.outdir)
    folder = fake_het_run.outdir / "analyze.2"
    assert page == folder / "report.html"
    text = _check_page(page)
    for name in HET_FIGURES:
        assert (folder / name).stat().st_size > 1000, name
        assert f'src="{name}"' in text, name
    assert "Skipped steps" not in text
    run = RunDir(fake_het_run.outdir)
    z = run.latents()
    with np.load(folder / "analysis.npz") as f:
        labels, nearest = f["kmeans_labels"], f["kmeans_nearest"]
        np.testing.assert_allclose(f["explained_variance_ratio"].sum(), 1.0)
    np.testing.assert_array_equal(labels, latent.kmeans(z, 20).labels)
    np.testing.assert_array_equal(kmeans_for_run(run, 2).labels, labels)
    # maps at the particles nearest the centres, and along the PCs
    kfiles = sorted((folder / "kmeans").glob("vol_*.mrc"))
    assert len(kfiles) == 20
    field = run.load_field()
    vol, info = read_mrc(kfiles[3])
    assert info.apix_A == pytest.approx(3.0)
    ref = field.render_volume(torch.as_tensor(z[nearest[3]])).numpy()
    np.testing.assert_allclose(vol, ref, atol=1e-5)
    for pc in ("pc1", "pc2"):
        assert len(list((folder / pc).glob("vol_*.mrc"))) == 10
        cxc = (folder / pc / "open_in_chimerax.cxc").read_text()
        assert "vseries true" in cxc and "voxelSize 3.0000" in cxc and "level" in cxc
    junk = np.load(folder / "junk_indices.npy")
    assert set(junk) <= set(fake_het_run.input_index)


def test_homogeneous_report(fake_hom_run: FakeRun) -> None:
    page = analyze_run(fake_hom_run.outdir, epoch=1)
    folder = fake_hom_run.outdir / "analyze.1"
    text = _check_page(page)
    for name in ("fsc_halfmaps.png", "poses.png", "training.png", "map_projections.png"):
        assert (folder / name).stat().st_size > 1000
    assert "half-map FSC=0.143" in text
    # noise-free projections with exact poses: the half maps agree to high resolution
    fsc = np.loadtxt(folder / "fsc_halfmaps.txt")
    assert fsc[: len(fsc) // 2].min() > 0.95
    final, info = read_mrc(folder / "final_map.mrc")
    assert final.shape == (16, 16, 16) and info.apix_A == pytest.approx(3.0)
    assert "voxelSize 3.0000" in (folder / "open_in_chimerax.cxc").read_text()


def test_failed_steps_are_skipped(fake_het_run: FakeRun, tmp_path) -> None:
    out = tmp_path / "run"
    shutil.copytree(fake_het_run.outdir, out, ignore=shutil.ignore_patterns("analyze.*"))
    (out / "epoch_002" / "weights.pt").write_bytes(b"not a checkpoint")
    (out / "metrics.jsonl").write_text("{broken\n")
    page = analyze_run(out, n_clusters=4)
    text = page.read_text()
    assert "Skipped steps" in text and "load field" in text and "training curves" in text
    assert (page.parent / "pca_clusters.png").is_file()
    assert not (page.parent / "kmeans").exists()
    with pytest.raises(CryofieldError, match="epoch 5"):
        analyze_run(out, epoch=5)
