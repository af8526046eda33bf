"""``analyze_run`` on fake runs: every figure, map and script is written."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from fakerun import FakeRun

from cryofield.analysis import latent
from cryofield.analysis.report import (
    PC_PERCENTILES,
    analyze_run,
    kmeans_for_run,
    read_verdict,
    verdict_banner,
)
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
    "path_gallery.png",
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
        path = f["path_coordinate"]
    np.testing.assert_array_equal(labels, latent.kmeans(z, 20).labels)
    np.testing.assert_allclose(path, latent.path_coordinate(z))
    np.testing.assert_array_equal(kmeans_for_run(run, 2).labels, labels)
    # maps at the particles nearest the centres, and along the PCs
    kfiles = sorted((folder / "kmeans").glob("vol_*.mrc"))
    assert len(kfiles) == 20
    field = run.load_field()
    vol, info = read_mrc(kfiles[3])
    assert info.apix_A == pytest.approx(3.0)
    ref = field.render_volume(torch.as_tensor(z[nearest[3]])).numpy()
    np.testing.assert_allclose(vol, ref, atol=1e-5)
    # the main path's maps: the field at the mean z of the particles about each percentile
    pts = latent.path_trajectory(z, path, PC_PERCENTILES)
    pfiles = sorted((folder / "path").glob("vol_*.mrc"))
    assert len(pfiles) == 10
    ref = field.render_volume(torch.as_tensor(pts[0], dtype=torch.float32)).numpy()
    np.testing.assert_allclose(read_mrc(pfiles[0])[0], ref, atol=1e-5)
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


# ------------------------------------------------------------------ verdict, junk, links
FAILED_VERDICT = {
    "converged": False,
    "headline": "viewing directions collapsed into two antipodal blobs",
    "reasons": [
        "poses did not settle: 97% of the images moved by more than 15 deg",
        "viewing directions collapsed (two antipodal blobs): 12 of 192 cells <occupied>",
    ],
    "advice": "Check the particle contrast (--contrast) and the CTF parameters.",
    "checks": [],
}
GOOD_VERDICT = {
    "converged": True,
    "headline": "poses stable, views spread, half-map FSC=0.143 at 7.5 A",
    "reasons": [],
    "advice": "",
}


def _copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("analyze.*"))
    return dst


def _banner(text: str) -> str:
    m = re.search(r"<div class='verdict (\w+)' id='verdict'>(.*?)</div>", text, re.S)
    assert m, "no verdict banner"
    # the banner comes first: right after the title, before the summary table
    assert text.index("id='verdict'") < text.index("<table>")
    return m.group(1) + ":" + m.group(2)


def test_verdict_banner_both_ways(fake_hom_run: FakeRun, tmp_path) -> None:
    out = _copy_run(fake_hom_run.outdir, tmp_path / "run")
    (out / "verdict.json").write_text(json.dumps(FAILED_VERDICT))
    text = analyze_run(out).read_text()
    banner = _banner(text)
    assert banner.startswith("bad:")
    assert "did not converge: viewing directions collapsed into two antipodal blobs" in banner
    assert "<li>poses did not settle: 97% of the images" in banner
    assert "12 of 192 cells &lt;occupied&gt;" in banner  # escaped
    assert "What to try:</b> Check the particle contrast (--contrast)" in banner
    assert "<tr><th>verdict</th><td>did not converge</td></tr>" in text

    (out / "verdict.json").write_text(json.dumps(GOOD_VERDICT))
    text = analyze_run(out).read_text()
    banner = _banner(text)
    assert (
        banner == "ok:<h2>converged: poses stable, views spread, half-map FSC=0.143 at 7.5 A</h2>"
    )
    assert "did not converge" not in text

    (out / "verdict.json").unlink()
    banner = _banner(analyze_run(out).read_text())
    assert banner.startswith("none:<h2>no convergence verdict recorded</h2>")
    (out / "verdict.json").write_text("{not json")
    banner = _banner(analyze_run(out).read_text())
    assert banner.startswith("none:") and "verdict.json unreadable" in banner


def test_verdict_banner_helpers(tmp_path) -> None:
    assert read_verdict(tmp_path) is None
    (tmp_path / "verdict.json").write_text(json.dumps({**GOOD_VERDICT, "headline": "x"}))
    assert read_verdict(tmp_path) == {**GOOD_VERDICT, "headline": "x"}
    assert "converged: x" in verdict_banner(read_verdict(tmp_path))
    (tmp_path / "verdict.json").write_text(json.dumps({"headline": "no flag"}))
    assert "error" in read_verdict(tmp_path)
    bad = verdict_banner({**FAILED_VERDICT, "headline": "did not converge: poses moved"})
    assert "did not converge: poses moved" in bad and "converge: did not" not in bad


def test_report_links_next_steps_and_homogeneous_junk(fake_hom_run: FakeRun, tmp_path) -> None:
    out = _copy_run(fake_hom_run.outdir, tmp_path / "my run")  # a space in the path
    n = len(fake_hom_run.input_index)
    rng = np.random.default_rng(0)
    residual = np.exp(rng.normal(0.0, 0.05, n))
    planted = np.array([3, 17, 40, 41, 66])
    residual[planted] *= 1.5
    np.savez(out / "epoch_002" / "residuals.npz", residual=residual.astype(np.float32))
    page = analyze_run(out)
    text = _check_page(page)
    # every figure is a link to its own png (click to enlarge), shown at natural size
    imgs = re.findall(r'<img src="([^"]+)"', text)
    assert imgs and all(
        f'<a href="{s}" title="open full size"><img src="{s}"' in text for s in imgs
    )
    assert "max-width:560px" not in text and "img{max-width:100%" in text
    # next steps: the run's real absolute path, quoted for the shell, no placeholder
    root = str(out.resolve())
    assert "OUTDIR" not in text
    assert (
        f"cryofield select &#x27;{root}&#x27; --ind &#x27;{root}/analyze.2/junk_indices.npy" in text
    )
    assert f"chimerax &#x27;{root}/analyze.2/open_in_chimerax.cxc&#x27;" in text
    # homogeneous runs get a junk estimate from the residuals
    with np.load(page.parent / "junk.npz") as f:
        junk, score = f["junk"], f["junk_score"]
        assert list(f["signals"]) == ["residual"]
        np.testing.assert_array_equal(f["particle_index"], fake_hom_run.input_index)
        assert np.isfinite(float(f["threshold"]))
    assert junk.dtype == bool and junk.shape == (n,) and score.shape == (n,)
    np.testing.assert_array_equal(np.nonzero(junk)[0], planted)
    np.testing.assert_array_equal(
        np.load(page.parent / "junk_indices.npy"), fake_hom_run.input_index[planted]
    )
    assert (page.parent / "junk.png").stat().st_size > 1000


def test_heterogeneous_junk_with_residuals(fake_het_run: FakeRun, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(latent, "umap_embedding", lambda z, seed=0: None)  # speed only
    out = _copy_run(fake_het_run.outdir, tmp_path / "run")
    n = len(fake_het_run.input_index)
    rng = np.random.default_rng(1)
    residual = np.exp(rng.normal(0.0, 0.05, n))
    planted = np.array([0, 9, 30, 55])
    residual[planted] *= 1.5
    np.savez(out / "epoch_002" / "residuals.npz", residual=residual.astype(np.float32))
    page = analyze_run(out, volumes=False)
    text = page.read_text()
    with np.load(page.parent / "junk.npz") as f:
        junk = f["junk"]
        assert list(f["signals"]) == ["residual", "isolation"]
        assert np.isfinite(f["isolation_z"]).all() and np.isfinite(f["residual_z"]).all()
    assert junk[planted].all() and junk.sum() <= len(planted) + 2
    with np.load(page.parent / "analysis.npz") as f:
        np.testing.assert_array_equal(f["is_junk"], junk)
    assert "--clusters 0,1" in text and "latents only" not in text
