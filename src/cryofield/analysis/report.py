"""``analyze_run``: figures, volumes, junk estimate and a one-page HTML report of a run.

Everything goes to ``OUTDIR/analyze.EPOCH/``::

    report.html            the page (relative links to the PNGs; no network assets)
    *.png                  figures
    analysis.npz           PCA, UMAP, k-means labels/centres/nearest, junk flags
    kmeans/vol_NNN.mrc     maps at the particles nearest the k-means centres (+ .cxc)
    pc1/vol_NNN.mrc ...    maps along each PC at percentiles (+ .cxc)
    junk_indices.npy       junk particles as indices into the ORIGINAL input particles
    junk.npz               junk (N,) bool, junk_score (N,), particle_index (N,), threshold,
                           method, residual_z, isolation_z, junk_cluster (run order)
    final_map.mrc, fsc_halfmaps.png   homogeneous runs

The page opens with the run's convergence verdict (``OUTDIR/verdict.json``, written by
the trainer: green "converged" or red "did not converge" with the reasons and advice;
"no convergence verdict recorded" for older runs) and ends with the next commands to
run, written with the run's absolute path. Figures show at their natural size (at most
the page width) and open full size on a click.

Each step is optional: a failure is logged and listed in the report, the others go on.
"""

from __future__ import annotations

import html
import json
import logging
import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryofield.analysis import latent
from cryofield.io.atomic import atomic_path, write_text_atomic

if TYPE_CHECKING:
    from cryofield.inference.rundir import RunDir

__all__ = [
    "PC_PERCENTILES",
    "analyze_run",
    "chimerax_script",
    "kmeans_for_run",
    "read_verdict",
    "verdict_banner",
]

log = logging.getLogger("cryofield.analysis.report")

#: UMAP is fitted on at most this many particles (a seeded random subset).
UMAP_MAX_POINTS = 50000

#: Percentiles of the particles' PC values at which PC trajectories are rendered.
PC_PERCENTILES = (5.0, 15.0, 25.0, 35.0, 45.0, 55.0, 65.0, 75.0, 85.0, 95.0)


def kmeans_for_run(run: RunDir, epoch: int, n_clusters: int | None = None) -> latent.KMeansResult:
    """k-means of a run's latents, reusing ``analyze.EPOCH/analysis.npz`` when it matches.

    Without a saved result (or with another K) k-means is computed with the same seed
    as ``analyze``, so labels agree either way.
    """
    z = run.latents(epoch)
    if z is None:
        from cryofield.errors import CryofieldError

        raise CryofieldError(f"{run.path}: homogeneous run (no latents): there are no clusters")
    k = latent.default_n_clusters(len(z), n_clusters)
    saved = run.analyze_dir(epoch) / "analysis.npz"
    if saved.is_file():
        from cryofield.errors import InputFileError
        from cryofield.io.arrays import load_npz

        try:
            f = load_npz(saved, what="analysis file")
        except InputFileError as err:  # the same seed gives the same clusters: recompute
            log.warning("%s; k-means recomputed", err)
            f = {}
        keys = ("kmeans_labels", "kmeans_centers", "kmeans_nearest")
        if all(key in f for key in keys) and len(f["kmeans_centers"]) == k:
            labels = f["kmeans_labels"]
            if (
                labels.shape == (len(z),)
                and labels.dtype.kind in "iu"
                and (len(z) == 0 or 0 <= labels.min() <= labels.max() < k)
            ):
                return latent.KMeansResult(
                    labels=labels,
                    centers=f["kmeans_centers"],
                    nearest=f["kmeans_nearest"],
                    counts=np.bincount(labels, minlength=k),
                )
            log.warning("%s: k-means labels do not fit this run's latents; recomputed", saved)
    return latent.kmeans(z, k)


def chimerax_script(mrc_names: list[str], apix_A: float, level: float, title: str) -> str:
    """ChimeraX commands opening maps (relative names) as a series with voxel size and level."""
    lines = [f"# {title}: open with  chimerax <this file>"]
    if len(mrc_names) > 1:
        lines.append("open " + " ".join(mrc_names) + " vseries true")
    else:
        lines.append(f"open {mrc_names[0]}")
    lines.append(f"volume #1 voxelSize {apix_A:.4f} level {level:.5g} style surface")
    lines.append("view")
    return "\n".join(lines) + "\n"


def _surface_level(vol: np.ndarray) -> float:
    """Contour level enclosing the top 2 % of voxels (a particle filling ~2 % of the box)."""
    return float(np.percentile(vol, 98.0))


def read_verdict(outdir: str | Path) -> dict[str, Any] | None:
    """The trainer's convergence verdict, ``OUTDIR/verdict.json``, or None when absent.

    Returns a dict with ``converged`` (bool), ``headline`` (str), ``reasons`` (list of
    str) and ``advice`` (str); an unreadable file gives ``{"error": message}``.
    """
    from cryofield.inference.rundir import VERDICT_FILE

    path = Path(outdir) / VERDICT_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        if not isinstance(d, dict) or not isinstance(d.get("converged"), bool):
            raise ValueError("no boolean 'converged'")
        reasons = d.get("reasons") or []
        if not isinstance(reasons, list):
            reasons = [str(reasons)]
        return {
            "converged": d["converged"],
            "headline": str(d.get("headline") or ""),
            "reasons": [str(r) for r in reasons],
            "advice": str(d.get("advice") or ""),
        }
    except (OSError, ValueError) as err:
        log.warning("%s unreadable: %s", path, err)
        return {"error": f"{path.name} unreadable: {err}"}


def _strip_prefix(headline: str, prefixes: tuple[str, ...]) -> str:
    low = headline.lower()
    for p in prefixes:
        if low.startswith(p):
            return headline[len(p) :].lstrip(" :-")
    return headline


def verdict_banner(verdict: dict[str, Any] | None) -> str:
    """HTML banner of a verdict (:func:`read_verdict`): green "converged", red "did not
    converge: headline" with the reasons and advice, grey when no verdict is recorded."""
    if verdict is None:
        return (
            "<div class='verdict none' id='verdict'><h2>no convergence verdict recorded</h2>"
            "<p>This run has no <code>verdict.json</code> (trained before the trainer "
            "judged its runs): check the pose plot, the FSC and the latent space "
            "below.</p></div>"
        )
    if "error" in verdict:
        return (
            "<div class='verdict none' id='verdict'><h2>no convergence verdict recorded</h2>"
            f"<p>{html.escape(verdict['error'])}</p></div>"
        )
    if verdict["converged"]:
        head = _strip_prefix(verdict["headline"], ("converged",))
        text = "converged" + (f": {head}" if head else "")
        return f"<div class='verdict ok' id='verdict'><h2>{html.escape(text)}</h2></div>"
    head = _strip_prefix(verdict["headline"], ("did not converge",))
    text = "did not converge" + (f": {head}" if head else "")
    parts = [f"<div class='verdict bad' id='verdict'><h2>{html.escape(text)}</h2>"]
    if verdict["reasons"]:
        parts.append("<ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in verdict["reasons"]))
        parts.append("</ul>")
    if verdict["advice"]:
        parts.append(f"<p><b>What to try:</b> {html.escape(verdict['advice'])}</p>")
    parts.append(
        "<p>The figures below describe this run as it is; do not interpret its map or "
        "latent space as a result.</p></div>"
    )
    return "".join(parts)


def _verdict_summary(verdict: dict[str, Any] | None) -> str:
    if verdict is None or "error" in verdict:
        return "not recorded"
    return "converged" if verdict["converged"] else "did not converge"


def _q(path: Path | str) -> str:
    return shlex.quote(str(path))


def _save_junk(folder: Path, junk: Any, index: np.ndarray) -> None:
    """``junk_indices.npy`` (input-particle indices, for ``select --ind``) and ``junk.npz``."""
    with atomic_path(folder / "junk_indices.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.asarray(index)[junk.is_junk].astype(np.int64))
    with atomic_path(folder / "junk.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            junk=np.asarray(junk.is_junk, bool),
            junk_score=np.asarray(junk.score, np.float32),
            particle_index=np.asarray(index, np.int64),
            threshold=np.float64(junk.threshold),
            method=np.array(junk.method),
            signals=np.array(junk.signals, dtype=str),
            residual_z=np.asarray(junk.residual_z, np.float32),
            isolation_z=np.asarray(junk.isolation_z, np.float32),
            junk_cluster=np.asarray(junk.by_cluster, bool),
        )


def _junk_figure(rep: _Report, folder: Path, junk: Any, xy: np.ndarray | None) -> None:
    from cryofield.analysis import plots

    what = " / ".join(junk.signals) if junk.signals else "no signal"
    rep.figure(
        "Junk",
        rep.step(
            "junk plot",
            lambda: plots.plot_junk(
                junk.score,
                junk.is_junk,
                xy,
                junk.threshold,
                folder / "junk.png",
                xlabel=f"junk score (robust z, max of {what})",
            ),
        ),
        f"junk estimate: {junk.summary()}",
    )


class _Report:
    """Collects figures, tables and failures, and runs optional steps."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sections: list[tuple[str, list[str]]] = []
        self.failures: list[str] = []
        self.banner = ""
        self.next_steps: list[tuple[str, str]] = []

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.time()
        try:
            out = fn()
            log.info("%s: done (%.1f s)", name, time.time() - t0)
            return out
        except Exception as err:  # an optional step: log it and go on
            log.warning("%s failed: %s: %s", name, type(err).__name__, err)
            self.failures.append(f"{name}: {type(err).__name__}: {err}")
            return None

    def add(self, section: str, item: str) -> None:
        for name, items in self.sections:
            if name == section:
                items.append(item)
                return
        self.sections.append((section, [item]))

    def figure(self, section: str, path: Path | None, caption: str) -> None:
        if path is None:
            return
        rel = html.escape(Path(path).name)
        self.add(
            section,
            f'<figure><a href="{rel}" title="open full size"><img src="{rel}" '
            f'alt="{html.escape(caption)}"></a>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>",
        )

    def write(self, title: str, summary: list[tuple[str, str]]) -> Path:
        rows = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary
        )
        body = [f"<h1>{html.escape(title)}</h1>", self.banner, f"<table>{rows}</table>"]
        for name, items in self.sections:
            body.append(f"<h2>{html.escape(name)}</h2><div class='row'>{''.join(items)}</div>")
        if self.next_steps:
            steps = "".join(
                f"<li>{html.escape(what)}<pre><code>{html.escape(cmd)}</code></pre></li>"
                for what, cmd in self.next_steps
            )
            body.append(f"<h2>Next steps</h2><ul class='steps'>{steps}</ul>")
        if self.failures:
            lis = "".join(f"<li>{html.escape(f)}</li>" for f in self.failures)
            body.append(f"<h2>Skipped steps</h2><ul>{lis}</ul>")
        style = (
            "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
            "figure{display:inline-block;margin:.5em;vertical-align:top;max-width:100%}"
            "img{max-width:100%;height:auto;border:0}th{text-align:left;padding-right:1em}"
            "figcaption{font-size:90%;color:#444}"
            ".verdict{padding:.6em 1em;border-radius:6px;margin:1em 0;border:2px solid}"
            ".verdict h2{margin:.1em 0 .3em 0}"
            ".ok{background:#e6f4ea;border-color:#1e8e3e;color:#0d5223}"
            ".bad{background:#fce8e6;border-color:#d93025;color:#7a1a12}"
            ".none{background:#f1f3f4;border-color:#9aa0a6;color:#3c4043}"
            "pre{background:#f6f8fa;padding:.4em;overflow-x:auto}"
        )
        page = (
            "<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{style}</style></head><body>"
            + "\n".join(body)
            + "</body></html>\n"
        )
        path = self.folder / "report.html"
        write_text_atomic(path, page)
        return path


def _write_series(field: Any, z_points: np.ndarray, folder: Path, apix_A: float, title: str):
    from cryofield.analysis.volumes import render_volumes
    from cryofield.io.mrc import write_mrc

    folder.mkdir(parents=True, exist_ok=True)
    vols = render_volumes(field, z_points, apix_A)
    names = []
    for i, v in enumerate(vols):
        write_mrc(folder / f"vol_{i:03d}.mrc", v, apix_A)
        names.append(f"vol_{i:03d}.mrc")
    write_text_atomic(
        folder / "z_values.txt", "".join(" ".join(f"{x:.6g}" for x in r) + "\n" for r in z_points)
    )
    script = chimerax_script(names, apix_A, _surface_level(vols[0]), title)
    write_text_atomic(folder / "open_in_chimerax.cxc", script)
    return names, [v.sum(axis=0) for v in vols]


def half_map_fsc(run: RunDir, epoch: int, max_particles: int = 20000) -> dict[str, Any]:
    """Reconstruct two half maps with the run's poses and return their FSC.

    Halves: RELION ``rlnRandomSubset`` when the input has it, else even/odd particles.
    At most ``max_particles`` (evenly spaced) are used. A run with a point group
    (``symmetry`` of config.yaml) inserts every image at its equivalent poses.
    """
    import torch

    from cryofield.analysis.metrics import fsc_curve
    from cryofield.inference.consensus import backproject_sets
    from cryofield.io.particles import ParticleSource
    from cryofield.physics.ctf import CTFParams
    from cryofield.physics.fsc import resolution_at
    from cryofield.physics.symmetry import symmetry_operators

    table = run.table()
    poses = run.poses(epoch)
    D = run.training_D()
    apix = run.apix_A()
    n = len(poses["rotations"])
    rows = np.arange(n)
    if n > max_particles:
        rows = rows[:: int(np.ceil(n / max_particles))]
    raw = table.raw
    half = rows % 2
    if raw is not None and hasattr(raw, "columns") and "rlnRandomSubset" in raw.columns:
        subset = raw["rlnRandomSubset"].to_numpy()[rows]
        if set(np.unique(subset)) == {1, 2}:
            half = subset - 1
    bps = backproject_sets(
        ParticleSource(table, D=D),  # images Fourier-cropped to the training box
        torch.as_tensor(poses["rotations"][rows], dtype=torch.float32),
        torch.as_tensor(poses["shifts_px"][rows], dtype=torch.float32),
        None if table.ctf is None else CTFParams.from_table(table, rows),
        apix, rows=rows, sets=half,
        symmetry=symmetry_operators(str(run.config().get("symmetry") or "C1")),
    )  # fmt: skip
    maps = [bp.volume().numpy() for bp in bps]
    curve = fsc_curve(maps[0], maps[1])
    res05 = resolution_at(torch.as_tensor(curve), 0.5, apix)[1]
    res0143 = resolution_at(torch.as_tensor(curve), 0.143, apix)[1]
    return {"fsc": curve, "res_0.5_A": res05, "res_0.143_A": res0143, "maps": maps}


def _pose_section(rep: _Report, run: RunDir, epoch: int, folder: Path) -> None:
    from cryofield.analysis import plots
    from cryofield.analysis.metrics import viewing_directions

    def poses_plot() -> Path:
        R = run.poses(epoch)["rotations"]
        return plots.plot_viewing_directions(viewing_directions(R), folder / "poses.png")

    rep.figure("Poses", rep.step("pose plot", poses_plot), "distribution of viewing directions")

    def curves() -> Path | None:
        rows = run.metrics()
        return plots.plot_training_curves(rows, folder / "training.png") if rows else None

    rep.figure("Training", rep.step("training curves", curves), "loss and band limit per epoch")


def _homogeneous(rep: _Report, run: RunDir, epoch: int, folder: Path, summary: list) -> None:
    from cryofield.analysis import plots
    from cryofield.io.mrc import write_mrc

    def final_map() -> str:
        src = run.volume_path(epoch)
        dst = folder / "final_map.mrc"
        if src is not None:
            shutil.copyfile(src, dst)
            from cryofield.io.mrc import read_mrc

            vol = np.asarray(read_mrc(dst)[0])
        else:
            vol = run.load_field(epoch).render_volume().numpy()
            write_mrc(dst, vol, run.apix_A())
        script = chimerax_script([dst.name], run.apix_A(), _surface_level(vol), "final map")
        write_text_atomic(folder / "open_in_chimerax.cxc", script)
        views = [vol.sum(axis=a) for a in (0, 1, 2)]
        rep.figure(
            "Map",
            rep.step(
                "map projections",
                lambda: plots.plot_volume_gallery(
                    views, ["along z", "along y", "along x"], folder / "map_projections.png"
                ),
            ),
            "projections of the final map along the three axes",
        )
        return dst.name

    name = rep.step("final map", final_map)
    if name:
        rep.add(
            "Map",
            f"<p>Final map: <code>{html.escape(name)}</code> "
            "(ChimeraX: <code>open_in_chimerax.cxc</code>)</p>",
        )

    def fsc_step() -> Path:
        res = half_map_fsc(run, epoch)
        summary.append(("half-map FSC=0.143", f"{res['res_0.143_A']:.2f} A"))
        summary.append(("half-map FSC=0.5", f"{res['res_0.5_A']:.2f} A"))
        np.savetxt(folder / "fsc_halfmaps.txt", res["fsc"], fmt="%.6f")
        return plots.plot_fsc(
            {"half maps": res["fsc"]}, run.training_D(), run.apix_A(), folder / "fsc_halfmaps.png"
        )

    rep.figure("Map", rep.step("half-map FSC", fsc_step), "FSC between half-set reconstructions")

    from cryofield.analysis.junk import load_residuals, score_junk

    index = run.poses(epoch)["particle_index"]
    residual = load_residuals(run.epoch_dir(epoch), len(index))
    if residual is None:
        summary.append(("junk estimate", "not available (no residuals.npz in this run)"))
        return
    junk = rep.step("junk estimate", lambda: score_junk(residual=residual))
    if junk is not None:
        summary.append(("junk estimate", junk.summary()))
        rep.step("junk files", lambda: _save_junk(folder, junk, index))
        _junk_figure(rep, folder, junk, None)


def _heterogeneous(
    rep: _Report,
    run: RunDir,
    epoch: int,
    folder: Path,
    summary: list,
    n_clusters: int | None,
    n_pcs: int,
    volumes: bool,
) -> None:
    from cryofield.analysis import plots
    from cryofield.analysis.junk import estimate_junk_combined, load_residuals

    z = np.asarray(run.latents(epoch), np.float64)
    N, zdim = z.shape
    summary.append(("particles / zdim", f"{N} / {zdim}"))
    mask = _mask_summary(rep, run, summary)
    pc = latent.pca(z)
    km = kmeans_for_run(run, epoch, n_clusters)
    K = len(km.centers)
    summary.append(("k-means clusters", str(K)))
    xy = pc.projected[:, :2] if zdim >= 2 else np.c_[pc.projected[:, 0], np.zeros(N)]
    cxy = (km.centers - pc.mean) @ pc.components[:2].T
    cxy = cxy if zdim >= 2 else np.c_[cxy[:, 0], np.zeros(K)]
    ev = ", ".join(f"{100 * r:.1f}%" for r in pc.explained_variance_ratio[:5])
    summary.append(("explained variance (PC1..)", ev))
    axes_pc = ("PC1", "PC2" if zdim >= 2 else "(zdim 1)")
    s = "Latent space"
    rep.figure(
        s,
        rep.step(
            "PCA plot",
            lambda: plots.plot_scatter(
                xy,
                km.labels,
                folder / "pca_clusters.png",
                "latent PCA, k-means clusters",
                axes_pc,
                cxy,
            ),
        ),
        "PCA of the latents coloured by k-means cluster (centres numbered)",
    )
    rep.figure(
        s,
        rep.step(
            "explained variance",
            lambda: plots.plot_explained_variance(
                pc.explained_variance_ratio, folder / "explained_variance.png"
            ),
        ),
        "explained variance per principal component",
    )
    umap_idx = latent.subsample_index(N, UMAP_MAX_POINTS)
    emb = rep.step("UMAP", lambda: latent.umap_embedding(z[umap_idx]))
    lab_u = km.labels[umap_idx]
    if emb is not None:
        emb_centres = np.array(
            [emb[lab_u == k].mean(0) if (lab_u == k).any() else [np.nan] * 2 for k in range(K)]
        )
        rep.figure(
            s,
            rep.step(
                "UMAP plot",
                lambda: plots.plot_scatter(
                    emb,
                    lab_u,
                    folder / "umap_clusters.png",
                    "UMAP, k-means clusters",
                    ("UMAP1", "UMAP2"),
                    emb_centres,
                ),
            ),
            "UMAP of the latents coloured by k-means cluster",
        )
    if zdim >= 2 and N >= 5:
        rep.figure(
            s,
            rep.step(
                "PCA density",
                lambda: plots.plot_kde(
                    *latent.kde_2d(xy), folder / "kde_pca.png", "latent density (PCA)", axes_pc
                ),
            ),
            "kernel density of the latents (PC1 vs PC2)",
        )
    if emb is not None:
        rep.figure(
            s,
            rep.step(
                "UMAP density",
                lambda: plots.plot_kde(
                    *latent.kde_2d(emb),
                    folder / "kde_umap.png",
                    "latent density (UMAP)",
                    ("UMAP1", "UMAP2"),
                ),
            ),
            "kernel density of the UMAP embedding",
        )
    residual = load_residuals(run.epoch_dir(epoch), N)
    junk = rep.step(
        "junk estimate", lambda: estimate_junk_combined(z, residual, km.labels, km.centers)
    )
    rep.figure(
        "Clusters",
        rep.step(
            "cluster counts",
            lambda: plots.plot_cluster_counts(
                km.counts, folder / "cluster_counts.png", junk.junk_clusters if junk else ()
            ),
        ),
        "particles per k-means cluster (hatched: judged junk)",
    )
    index = run.poses(epoch)["particle_index"]
    if junk is not None:
        summary.append(("junk estimate", junk.summary()))
        if residual is None:
            summary.append(("junk signals", "latents only (no residuals.npz in this run)"))
        rep.step("junk files", lambda: _save_junk(folder, junk, index))
        _junk_figure(rep, folder, junk, xy)
    counts = "".join(
        f"<tr><td>{k}</td><td>{c}</td><td>{km.nearest[k]}</td></tr>"
        for k, c in enumerate(km.counts)
    )
    rep.add(
        "Clusters",
        "<table><tr><th>cluster</th><th>particles</th><th>nearest particle</th>"
        f"</tr>{counts}</table>",
    )
    path = rep.step("main path", lambda: latent.path_coordinate(z)) if zdim >= 2 else None
    out = {
        "z_pca": pc.projected,
        "pca_components": pc.components,
        "pca_mean": pc.mean,
        "explained_variance_ratio": pc.explained_variance_ratio,
        "kmeans_labels": km.labels,
        "kmeans_centers": km.centers,
        "kmeans_nearest": km.nearest,
        "particle_index": index,
    }
    if path is not None:
        out["path_coordinate"] = path
    if emb is not None:
        out["umap"] = emb
        out["umap_index"] = umap_idx
    if junk is not None:
        out["is_junk"] = junk.is_junk
        out["junk_score"] = junk.score
    with atomic_path(folder / "analysis.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **out)
    if not volumes:
        return
    field = rep.step("load field", lambda: run.load_field(epoch))
    if field is None:
        return
    apix = run.apix_A()
    series = rep.step(
        "k-means volumes",
        lambda: _write_series(field, z[km.nearest], folder / "kmeans", apix, "k-means centre maps"),
    )
    if series:
        names, projs = series
        rep.add(
            "Volumes",
            f"<p>{len(names)} maps at the particles nearest the k-means centres: "
            "<code>kmeans/</code> (ChimeraX: <code>kmeans/open_in_chimerax.cxc"
            "</code>)</p>",
        )
        titles = [f"cluster {k} ({c})" for k, c in enumerate(km.counts)]
        rep.figure(
            "Volumes",
            rep.step(
                "k-means gallery",
                lambda: plots.plot_volume_gallery(
                    projs, titles, folder / "kmeans_gallery.png", plots.cluster_colors(K)
                ),
            ),
            "projections along z of the k-means maps (frame: cluster colour)",
        )
    for j in range(min(n_pcs, zdim)):
        pts = latent.pc_trajectory(z, pc, j, PC_PERCENTILES)
        series = rep.step(
            f"PC{j + 1} volumes",
            lambda pts=pts, j=j: _write_series(
                field, pts, folder / f"pc{j + 1}", apix, f"PC{j + 1} trajectory"
            ),
        )
        if series:
            names, projs = series
            rep.add(
                "Volumes",
                f"<p>PC{j + 1}: {len(names)} maps at percentiles "
                f"{', '.join(f'{p:g}' for p in PC_PERCENTILES)} in "
                f"<code>pc{j + 1}/</code></p>",
            )
            titles = [f"PC{j + 1} {p:g}%" for p in PC_PERCENTILES]
            rep.figure(
                "Volumes",
                rep.step(
                    f"PC{j + 1} gallery",
                    lambda projs=projs, titles=titles, j=j: plots.plot_volume_gallery(
                        projs, titles, folder / f"pc{j + 1}_gallery.png"
                    ),
                ),
                f"projections along z of the PC{j + 1} maps",
            )
    if path is not None:
        pts = latent.path_trajectory(z, path, PC_PERCENTILES)
        series = rep.step(
            "main path volumes",
            lambda: _write_series(field, pts, folder / "path", apix, "main path of the latents"),
        )
        if series:
            names, projs = series
            rep.add(
                "Volumes",
                f"<p>Main path (geodesic, follows a curved trajectory that PC1 folds back "
                f"on): {len(names)} maps at percentiles of the path coordinate in "
                f"<code>path/</code></p>",
            )
            titles = [f"path {p:g}%" for p in PC_PERCENTILES]
            rep.figure(
                "Volumes",
                rep.step(
                    "main path gallery",
                    lambda: plots.plot_volume_gallery(projs, titles, folder / "path_gallery.png"),
                ),
                "projections along z of the main-path maps",
            )
    if mask is not None:
        for j in range(min(n_pcs, zdim)):
            rep.step(f"PC{j + 1} change in the mask",
                     lambda j=j: _masked_change(rep, folder, mask, j, summary))  # fmt: skip


def _mask_summary(rep: _Report, run: RunDir, summary: list) -> np.ndarray | None:
    """The run's ``--mask`` (focused heterogeneity) in the summary: its path and volume
    fraction; the mask at the training box, or None (no mask, or its file unreadable)."""
    path = run.config().get("mask")
    if not path:
        return None
    mask = rep.step("mask", run.mask)
    if mask is None:
        summary.append(("mask (focused heterogeneity)", f"{path} (not readable now)"))
        return None
    from cryofield.io.mask import mask_fraction

    summary.append(("mask (focused heterogeneity)",
                    f"{path}: {100 * mask_fraction(mask):.2f}% of the box"))  # fmt: skip
    return mask


def _masked_change(rep: _Report, folder: Path, mask: np.ndarray, j: int, summary: list) -> None:
    """Where the PC maps (``pcJ/vol_*.mrc``) change, against the mask: the voxel variance
    along the series per voxel inside the mask over that outside (mask-weighted; a field
    whose z acts inside the mask: well above 1; noise-like change everywhere: about 1), the
    share of the summed variance inside, and a figure of the projected difference of the
    last and first maps with the mask's outline."""
    from cryofield.analysis import plots
    from cryofield.io.mrc import read_mrc

    files = sorted((folder / f"pc{j + 1}").glob("vol_*.mrc"))
    if len(files) < 2:
        return
    vols = np.stack([np.asarray(read_mrc(f, mmap=False)[0], np.float64) for f in files])
    var = vols.var(0)
    inside, outside = float((mask * var).sum()), float(((1 - mask) * var).sum())
    share = inside / max(inside + outside, 1e-30)
    per_in = inside / max(float(mask.sum()), 1e-30)
    per_out = outside / max(float((1 - mask).sum()), 1e-30)
    ratio = f"{per_in / per_out:.1f}x" if per_out > 0 else "all"
    text = f"{ratio} that outside it per voxel ({100 * share:.0f}% of the total)"
    summary.append((f"PC{j + 1} map change inside the mask", text))
    change = (vols[-1] - vols[0]).sum(axis=0)
    rep.figure(
        "Mask",
        plots.plot_masked_change(
            change,
            mask.max(axis=0),
            folder / f"pc{j + 1}_mask_change.png",
            f"PC{j + 1}: last - first map, mask outline",
        ),
        f"where the PC{j + 1} maps change: projection along z of the {PC_PERCENTILES[-1]:g}% "
        f"map minus the {PC_PERCENTILES[0]:g}% map (red: density gained, blue: lost) with "
        f"the mask outline (black); per voxel the maps change {ratio} as much inside the mask "
        "as outside",
    )


def _next_steps(
    run: RunDir, epoch: int, folder: Path, het: bool, n_clusters: int | None
) -> list[tuple[str, str]]:
    """(what, command) pairs with the run's absolute paths."""
    root = run.path.resolve()
    out = folder.resolve()
    ep = [] if epoch == run.epochs()[-1] else ["--epoch", str(epoch)]
    k = [] if n_clusters is None else ["--ksample", str(n_clusters)]
    steps: list[tuple[str, str]] = []

    def cmd(*parts: Any) -> str:
        return " ".join(_q(p) for p in parts)

    if (out / "junk_indices.npy").is_file():
        steps.append(
            (
                "drop the junk particles (RELION .star and cryoSPARC .cs, original columns)",
                cmd("cryofield", "select", root, *ep, "--ind", out / "junk_indices.npy",
                    "--invert", "-o", root / "particles_clean.star", "-o",
                    root / "particles_clean.cs"),
            )
        )  # fmt: skip
    if het:
        steps.append(
            (
                "keep the particles of chosen k-means clusters (here 0 and 1; numbers as in "
                "the cluster plot)",
                cmd("cryofield", "select", root, *ep, *k, "--clusters", "0,1", "-o",
                    root / "clusters_0_1.star"),
            )
        )  # fmt: skip
        if (out / "kmeans" / "open_in_chimerax.cxc").is_file():
            steps.append(
                (
                    "look at the maps at the k-means centres",
                    cmd("chimerax", out / "kmeans" / "open_in_chimerax.cxc"),
                )
            )
    elif (out / "open_in_chimerax.cxc").is_file():
        steps.append(("look at the final map", cmd("chimerax", out / "open_in_chimerax.cxc")))
    steps.append(
        (
            "poses (and latents) for refinement in RELION / cryoSPARC",
            cmd("cryofield", "export", root, *ep, "-o", root / "refine_me.star"),
        )
    )
    return steps


def analyze_run(
    outdir: str | Path,
    epoch: int | None = None,
    n_clusters: int | None = None,
    n_pcs: int = 2,
    volumes: bool = True,
) -> Path:
    """Analyse a training run; returns the path of ``OUTDIR/analyze.EPOCH/report.html``.

    Parameters
    ----------
    outdir : the ``cryofield train`` output folder.
    epoch : epoch to analyse (default: last complete).
    n_clusters : k-means K (default 20, capped at N).
    n_pcs : PCs along which volume series are rendered.
    volumes : render the volume series (the slow part on CPU).

    Raises
    ------
    CryofieldError
        When the folder is not a run or has no complete epoch; optional steps never raise.
    """
    from cryofield.inference.rundir import RunDir

    run = RunDir(outdir)
    ep = run.choose_epoch(epoch, verb="analyse")
    folder = run.analyze_dir(ep)
    folder.mkdir(parents=True, exist_ok=True)
    rep = _Report(folder)
    verdict = read_verdict(run.path)
    rep.banner = verdict_banner(verdict)
    summary: list[tuple[str, str]] = [
        ("run", str(run.path.resolve())),
        ("epoch", str(ep)),
        ("verdict", _verdict_summary(verdict)),
    ]
    het = run.latents(ep) is not None
    summary.append(("type", "heterogeneous" if het else "homogeneous"))
    if het:
        _heterogeneous(rep, run, ep, folder, summary, n_clusters, n_pcs, volumes)
    else:
        _homogeneous(rep, run, ep, folder, summary)
    _pose_section(rep, run, ep, folder)
    rep.next_steps = _next_steps(run, ep, folder, het, n_clusters)
    path = rep.write(f"cryofield analysis: {run.path.name}, epoch {ep}", summary)
    log.info("report: %s", path)
    return path
