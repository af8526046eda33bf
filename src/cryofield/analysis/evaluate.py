"""Score a training run against simulation truth (``truth.npz`` of ``simulate_dataset``).

Truth arrays are indexed by the ORIGINAL input particles; the run's ``particle_index``
maps its rows onto them. Reported (JSON-ready dict):

* ``poses``: :func:`metrics.pose_errors` after global alignment incl. the mirror; shifts
  compared in truth pixels (the run's ``shifts_A`` divided by the truth pixel size). A run
  with a point group (``symmetry`` in its config.yaml) is scored modulo the group: each
  pose against the nearest equivalent of the true pose (``poses.symmetry``).
* ``maps``: per true state, the run's map (homogeneous: the epoch's map; heterogeneous:
  rendered at the latent of the particle of that state nearest the state's mean
  latent) rigidly aligned to the true map (:func:`align.align_volume`, seeded with the
  pose alignment), then FSC, resolution at FSC 0.5 / 0.143 and FSC-AUC (CryoBench).
* ``clustering``: k-means with K = number of true states vs the labels (ARI, NMI,
  accuracy after matching), junk particles excluded; with ``ceiling_ari`` (below) and
  ``ari_gap = ceiling_ari - ari``.
* ``ceiling``: the information limit of the state assignment (continuous truth: of the
  coordinate, ``spearman_abs``, reported beside the latents' score as
  ``latent_vs_coord_ceiling``)
  (:func:`ceiling.state_ceiling`: each image assigned to the true map that explains it
  best at its true pose, shift and CTF; ARI against the labels, on at most
  ``ceiling_max_images`` images), or ``{"skipped": reason}`` (homogeneous truth, images
  not found, ``ceiling_max_images=0``).
* ``pose_floor``: homogeneous C1 runs, the pose error an ideal refinement reaches
  (:func:`cryofield.inference.refine.pose_floor`: each image aligned, from its true pose,
  to the half map of the true poses without its fold, on the run's training images; on
  at most ``floor_max_images`` non-junk images), the same keys as ``poses`` plus
  ``fsc0143_A``; ``poses.oop_median_over_floor`` compares the run with it. Or
  ``{"skipped": reason}``.
* ``junk``: precision / recall of :func:`junk.estimate_junk_combined` (the junk mask of
  ``analyze``: latents and, when the run wrote them, residuals) when the truth has junk.
* ``latent_vs_coord``: Spearman correlation of PC1..3 with a continuous coordinate; and
  ``latent_path_spearman``, that of the main path of the latent space
  (:func:`cryofield.analysis.latent.path_coordinate`, the path of ``analyze``'s
  ``path/`` maps), which follows a curved trajectory that PC1 folds back on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryofield.analysis import latent, metrics
from cryofield.errors import InputFileError

if TYPE_CHECKING:
    from cryofield.inference.rundir import RunDir

__all__ = [
    "clustering_scores",
    "evaluate_run",
    "format_table",
    "load_truth",
    "pose_floor_scores",
    "scored_particles",
]

#: fewest scored particles for the pose floor (fewer: each fold's reference is noise)
FLOOR_MIN_IMAGES = 100

log = logging.getLogger("cryofield.analysis.evaluate")

_REQUIRED = ("rotations",)


def load_truth(path: str | Path) -> dict[str, np.ndarray]:
    """Read ``truth.npz`` (no pickles); raises InputFileError naming a missing key."""
    from cryofield.io.arrays import load_npz

    truth = load_npz(
        path, _REQUIRED, "simulation truth file", "re-create it with 'cryofield simulate'"
    )
    R = truth["rotations"]
    if R.ndim != 3 or R.shape[1:] != (3, 3):
        raise InputFileError(path, f"'rotations' must be (N, 3, 3), got {R.shape}")
    return truth


def _true_volumes(truth_path: Path, truth: dict, volumes: list[str] | None) -> list[Path]:
    """The true maps: ``volumes`` if given (``[]``: none), else the truth's volume_paths."""
    if volumes is not None:
        return [Path(v) for v in volumes]
    if "volume_paths" in truth:
        return [truth_path.parent / str(p) for p in np.atleast_1d(truth["volume_paths"])]
    return []


def _read_map(path: Path, D: int, apix_A: float) -> np.ndarray:
    """Read a true map and bring it to the run's box (Fourier crop) and pixel size."""
    from cryofield.analysis.align import _fourier_crop
    from cryofield.io.mrc import read_mrc

    if not path.is_file():
        raise InputFileError(path, "true map not found")
    vol, info = read_mrc(path)
    vol = np.asarray(vol, np.float32)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputFileError(path, f"not a cubic map: shape {vol.shape}")
    Dt = vol.shape[0]
    if Dt != D:
        if Dt < D:
            raise InputFileError(path, f"true map box {Dt} is smaller than the run's box {D}")
        vol = _fourier_crop(vol, D)
    apix_t = float(info.apix_A) * Dt / D
    if info.apix_A > 0 and abs(apix_t - apix_A) > 0.02 * apix_A:
        log.warning(
            "%s: pixel size %.3f A at box %d differs from the run's %.3f A", path, apix_t, D, apix_A
        )
    return vol


def _skewness(vol: np.ndarray) -> float:
    v = np.asarray(vol, np.float64).ravel()
    v = v - v.mean()
    sd = v.std()
    return float((v**3).mean() / sd**3) if sd > 0 else 0.0


def _map_scores(pred: np.ndarray, true: np.ndarray, apix_A: float, hints: list) -> dict:
    """Align ``pred`` onto ``true`` and score it.

    A map of inverted contrast (density negative: negative skewness while the truth's is
    positive) is negated first and reported with ``negated: true``.
    """
    import torch

    from cryofield.physics.fsc import resolution_at

    negated = _skewness(pred) * _skewness(true) < 0
    if negated:
        log.warning("the map has inverted contrast relative to the truth; negating it")
        pred = -np.asarray(pred)
    al = metrics.align_volume(pred, true, hints=hints)
    curve = metrics.fsc_curve(al.aligned, true)
    return {
        "mirrored": bool(al.mirrored),
        "negated": bool(negated),
        "correlation": al.correlation,
        "fsc_auc": metrics.fsc_auc(curve),
        "res_0.5_A": resolution_at(torch.as_tensor(curve), 0.5, apix_A)[1],
        "res_0.143_A": resolution_at(torch.as_tensor(curve), 0.143, apix_A)[1],
        "fsc": [float(v) for v in curve],
    }


def scored_particles(junk: np.ndarray) -> np.ndarray:
    """Mask of the particles that are scored: all but the true junk (all of them when
    fewer than 3 would remain)."""
    junk = np.asarray(junk, bool)
    return ~junk if (~junk).sum() >= 3 else np.ones(len(junk), bool)


def clustering_scores(z: np.ndarray, labels: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """k-means of the latents with K = the number of true states, against the true labels.

    Parameters
    ----------
    z : (N, zdim) latents.
    labels : (N,) true state of each particle.

    Returns
    -------
    scores : ``{"k", "ari", "nmi", "accuracy"}`` (:func:`latent.kmeans`, seed
        :data:`latent.DEFAULT_SEED`; :mod:`metrics`).
    predicted : (N,) the k-means labels.
    """
    labels = np.asarray(labels)
    k = len(np.unique(labels))
    km = latent.kmeans(np.asarray(z), k)
    scores = {
        "k": k,
        "ari": metrics.adjusted_rand_index(labels, km.labels),
        "nmi": metrics.normalized_mutual_info(labels, km.labels),
        "accuracy": metrics.cluster_accuracy(labels, km.labels),
    }
    return scores, km.labels


def evaluate_run(
    outdir: str | Path,
    truth_path: str | Path,
    volumes: list[str] | None = None,
    epoch: int | None = None,
    ceiling_max_images: int | None = 5000,
    ceiling_radius_px: float | None = None,
    floor_max_images: int | None = 2000,
) -> dict[str, Any]:
    """Score a run against the truth; see the module docstring for the fields.

    ``ceiling_max_images`` (None: all, 0: no ceiling) and ``ceiling_radius_px`` (default
    Nyquist) bound the cost of the state ceiling (:func:`ceiling.state_ceiling`);
    ``floor_max_images`` (None: all, 0: none) the images aligned for the pose floor.
    """
    from cryofield.inference.rundir import RunDir

    run = RunDir(outdir)
    ep = run.choose_epoch(epoch, verb="evaluate")
    truth_path = Path(truth_path)
    truth = load_truth(truth_path)
    poses = run.poses(ep)
    index = np.asarray(poses["particle_index"], np.int64)
    n_true = len(truth["rotations"])
    if index.size and index.max() >= n_true:
        raise InputFileError(
            truth_path, f"has {n_true} particles but the run uses input particle {index.max()}"
        )
    res: dict[str, Any] = {"run": str(run.path), "epoch": ep, "n_particles": len(index)}
    R_pred = np.asarray(poses["rotations"], np.float64)
    R_true = np.asarray(truth["rotations"], np.float64)[index]
    junk = np.asarray(truth.get("is_junk", np.zeros(n_true, bool)), bool)[index]
    good = scored_particles(junk)
    t_pred = t_true = None
    if "shifts_px" in truth and "shifts_A" in poses and "apix_A" in truth:
        t_pred = np.asarray(poses["shifts_A"], np.float64)[good] / float(truth["apix_A"])
        t_true = np.asarray(truth["shifts_px"], np.float64)[index][good]
    symmetry = str(run.config().get("symmetry") or "C1")
    ops = None
    if symmetry.upper() != "C1":
        import torch

        from cryofield.physics.symmetry import symmetry_operators

        ops = symmetry_operators(symmetry, torch.float64).numpy()
    res["poses"] = metrics.pose_errors(R_pred[good], R_true[good], t_pred, t_true, operators=ops)
    res["poses"]["symmetry"] = symmetry
    G = np.asarray(res["poses"]["R_global"])
    mir = bool(res["poses"]["mirrored"])
    # the pose alignment predicts the map alignment: W(p) = V(Q p), Q = G or M G
    hints = [(metrics.MIRROR @ G @ metrics.MIRROR if mir else G, mir)]

    z = run.latents(ep)
    res["pose_floor"] = pose_floor_scores(
        run, truth, index, good, z is None, symmetry, floor_max_images
    )
    if "out_of_plane_median_deg" in res["pose_floor"]:
        res["poses"]["oop_median_over_floor"] = res["poses"]["out_of_plane_median_deg"] / max(
            res["pose_floor"]["out_of_plane_median_deg"], 1e-6
        )
    labels = np.asarray(truth["labels"])[index] if "labels" in truth else None
    vol_paths = _true_volumes(truth_path, truth, volumes)
    D, apix = run.training_D(), run.apix_A()
    maps: list[dict] = []
    if vol_paths:
        field = run.load_field(ep)
        for s, vp in enumerate(vol_paths):
            true_map = _read_map(vp, D, apix)
            if z is None:
                vpath = run.volume_path(ep)
                if vpath is not None:
                    from cryofield.io.mrc import read_mrc

                    pred = np.asarray(read_mrc(vpath)[0], np.float32)
                else:
                    pred = field.render_volume().numpy()
            else:
                if labels is None:
                    members = good
                else:
                    members = good & (labels == s)
                if not members.any():
                    log.warning("state %d has no particles in the run; skipped", s)
                    continue
                zs = z[members]
                zc = zs[np.argmin(((zs - zs.mean(0)) ** 2).sum(1))]
                import torch

                pred = field.render_volume(torch.as_tensor(zc, dtype=torch.float32)).numpy()
            scores = _map_scores(pred, true_map, apix, hints)
            scores.update({"state": s, "true_map": str(vp)})
            maps.append(scores)
            if z is None:
                break
    res["maps"] = maps
    if maps:
        res["fsc_auc_mean"] = float(np.mean([m["fsc_auc"] for m in maps]))
    if z is not None and labels is not None:
        if len(np.unique(labels[good])) >= 2:
            res["clustering"], _ = clustering_scores(np.asarray(z)[good], labels[good])
    res["ceiling"] = _ceiling(
        truth_path, truth, run, index, volumes, ceiling_max_images, ceiling_radius_px
    )
    if "ari" in res["ceiling"] and "clustering" in res:
        c = res["clustering"]
        c["ceiling_ari"] = res["ceiling"]["ari"]
        c["ari_gap"] = c["ceiling_ari"] - c["ari"]
    residual = None
    if junk.any() and not junk.all():
        from cryofield.analysis.junk import load_residuals

        residual = load_residuals(run.epoch_dir(ep), len(index))
    if (z is not None or residual is not None) and junk.any() and not junk.all():
        from cryofield.analysis.junk import estimate_junk_combined

        km = latent.kmeans(z) if z is not None else None
        combined = estimate_junk_combined(
            z, residual, None if km is None else km.labels, None if km is None else km.centers
        )
        est = combined.is_junk
        tp = int((est & junk).sum())
        res["junk"] = {
            "n_true": int(junk.sum()),
            "n_flagged": int(est.sum()),
            "precision": float(tp / max(int(est.sum()), 1)),
            "recall": float(tp / int(junk.sum())),
            "signals": list(combined.signals),
        }
    if z is not None and "coord" in truth:
        coord = np.asarray(truth["coord"], np.float64)[index]
        if np.isfinite(coord).sum() >= 3:
            res["latent_vs_coord_spearman"] = metrics.spearman_latent_vs_coord(z, coord)
            res["latent_path_spearman"] = metrics.spearman_path_vs_coord(z, coord)
            if "spearman_abs" in res["ceiling"]:
                res["latent_vs_coord_ceiling"] = res["ceiling"]["spearman_abs"]
    return res


def _ceiling(
    truth_path: Path,
    truth: dict,
    run: RunDir,
    index: np.ndarray,
    volumes: list[str] | None,
    max_images: int | None,
    radius_px: float | None,
) -> dict[str, Any]:
    """The state ceiling on the run's particles (its images, else the dataset's)."""
    from cryofield.analysis.ceiling import skip_reason, state_ceiling
    from cryofield.errors import CryofieldError
    from cryofield.io.metadata import load_particle_table

    reason = skip_reason(truth, index)
    if reason is None and max_images == 0:
        reason = "not computed (ceiling_max_images = 0)"
    if reason is not None:
        return {"skipped": reason}
    errors = []
    for where in ("run", "dataset"):
        try:
            if where == "run":
                table = run.table()
            else:
                table = load_particle_table(truth_path.parent / "particles.star").subset(index)
            if len(table) != len(index):
                raise CryofieldError(f"{len(table)} particles for {len(index)} poses")
            # volumes=[] turns the map scores off, not the ceiling: use the truth's maps
            res = state_ceiling(
                truth_path, truth, table, index, volumes or None, max_images, radius_px
            )
            return {**res, "images_from": where} if "ari" in res else res
        except CryofieldError as err:
            errors.append(f"{where} particles: {err}")
            log.warning("state ceiling: %s particles unusable (%s)", where, err)
    return {"skipped": "; ".join(errors)}


def pose_floor_scores(
    run: RunDir,
    truth: dict,
    index: np.ndarray,
    good: np.ndarray,
    homogeneous: bool,
    symmetry: str,
    max_images: int | None,
) -> dict[str, Any]:
    """The pose floor of a homogeneous C1 run (see the module docstring): ``index``
    maps the run's rows onto the truth's, ``good`` (bool, per run row) the particles
    scored (non-junk); at most ``max_images`` of them (seeded random subset) aligned."""
    import torch

    from cryofield.errors import CryofieldError
    from cryofield.inference.config import TrainConfig
    from cryofield.inference.refine import pose_floor
    from cryofield.inference.runner import training_batches

    if not homogeneous:
        return {"skipped": "heterogeneous run"}
    if symmetry.upper() != "C1":
        return {"skipped": f"symmetric run ({symmetry})"}
    if max_images == 0:
        return {"skipped": "not computed (floor_max_images = 0)"}
    if "shifts_px" not in truth or "D" not in truth:
        return {"skipped": "the truth has no shifts"}
    rows = np.flatnonzero(good)
    if rows.size < FLOOR_MIN_IMAGES:
        return {"skipped": f"{rows.size} scored particles (at least {FLOOR_MIN_IMAGES} needed)"}
    try:
        batches = training_batches(TrainConfig.load(run.path / "config.yaml"), run.table())
    except (CryofieldError, OSError) as err:
        log.warning("pose floor: the run's images are unusable (%s)", err)
        return {"skipped": f"the run's images: {err}"}
    if len(batches.source) != len(index):
        return {"skipped": f"{len(batches.source)} images for {len(index)} poses"}
    sub = rows
    if max_images is not None and rows.size > max_images:
        sub = np.sort(np.random.default_rng(0).choice(rows, max_images, replace=False))
    R_true = np.asarray(truth["rotations"], np.float64)[index]
    t_true = np.asarray(truth["shifts_px"], np.float64)[index]
    scale = batches.points.D / float(truth["D"])  # truth px -> training px
    pf = pose_floor(
        batches, torch.as_tensor(R_true), torch.as_tensor(t_true * scale), rows=rows,
        refine_rows=sub,
    )  # fmt: skip
    out = metrics.pose_errors(
        pf.rotations.double().numpy(), R_true[pf.rows], pf.shifts_px.double().numpy() / scale,
        t_true[pf.rows],
    )  # fmt: skip
    out.pop("R_global", None)
    return {**out, "fsc0143_A": pf.fsc0143_A, "folds": pf.folds}


def format_table(res: dict[str, Any]) -> str:
    """Plain-text table of the main numbers of :func:`evaluate_run`."""
    rows: list[tuple[str, str]] = [
        ("epoch", str(res["epoch"])),
        ("particles", str(res["n_particles"])),
    ]
    p = res["poses"]
    rows.append(("hand", "mirrored (flip the map)" if p["mirrored"] else "correct"))
    rows.append(
        ("rotation error mean / median", f"{p['rot_mean_deg']:.2f} / {p['rot_median_deg']:.2f} deg")
    )
    rows.append(
        (
            "out-of-plane mean / median",
            f"{p['out_of_plane_mean_deg']:.2f} / {p['out_of_plane_median_deg']:.2f} deg",
        )
    )
    rows.append(
        (
            "in-plane mean / median",
            f"{p['in_plane_mean_deg']:.2f} / {p['in_plane_median_deg']:.2f} deg",
        )
    )
    if "trans_mean_px" in p:
        rows.append(
            (
                "translation mean / median",
                f"{p['trans_mean_px']:.2f} / {p['trans_median_px']:.2f} px",
            )
        )
    pf = res.get("pose_floor", {})
    if "out_of_plane_median_deg" in pf:
        rows.append((
            "pose floor out-of-plane / in-plane / shift",
            f"{pf['out_of_plane_median_deg']:.2f} / {pf['in_plane_median_deg']:.2f} deg / "
            f"{pf['trans_median_px']:.2f} px (medians, {pf['n']} images; run "
            f"{p['oop_median_over_floor']:.2f}x)",
        ))  # fmt: skip
    for m in res.get("maps", []):
        rows.append(
            (
                f"state {m['state']} map: FSC 0.5 / 0.143",
                f"{m['res_0.5_A']:.2f} / {m['res_0.143_A']:.2f} A, AUC {m['fsc_auc']:.3f}",
            )
        )
    if "fsc_auc_mean" in res:
        rows.append(("mean FSC-AUC", f"{res['fsc_auc_mean']:.3f}"))
    if "clustering" in res:
        c = res["clustering"]
        rows.append(
            (
                f"clustering (K={c['k']}) ARI / NMI / acc",
                f"{c['ari']:.3f} / {c['nmi']:.3f} / {c['accuracy']:.3f}",
            )
        )
    ce = res.get("ceiling")
    if ce is not None:
        if "ari" in ce:
            sub = f"{ce['n_images']} of {ce['n_eligible']} images" + (
                f" (random, seed {ce['seed']})" if ce["subsampled"] else ""
            )
            val = (
                f"{ce['ari']:.3f} ({sub}, r <= {ce['radius_px']:.0f} px = "
                f"{ce['resolution_A']:.1f} A)"
            )
            if "clustering" in res:
                c = res["clustering"]
                val += f"; learned {c['ari']:.3f}, gap {c['ari_gap']:.3f}"
            rows.append(("state ceiling ARI (true maps)", val))
        elif "spearman_abs" in ce:
            rows.append((
                "coordinate ceiling |Spearman|",
                f"{ce['spearman_abs']:.3f} ({ce['n_images']} of {ce['n_eligible']} images, "
                f"{ce['n_frames']} frame maps, r <= {ce['radius_px']:.0f} px)",
            ))  # fmt: skip
        else:
            rows.append(("state ceiling ARI", f"skipped: {ce['skipped']}"))
    if "junk" in res:
        j = res["junk"]
        rows.append(("junk precision / recall", f"{j['precision']:.3f} / {j['recall']:.3f}"))
    if "latent_vs_coord_spearman" in res:
        rows.append(
            (
                "Spearman PC1.. vs coord",
                ", ".join(f"{v:.3f}" for v in res["latent_vs_coord_spearman"]),
            )
        )
    if res.get("latent_path_spearman") is not None:
        rows.append(("Spearman main path vs coord", f"{res['latent_path_spearman']:.3f}"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
