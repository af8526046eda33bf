"""Acceptance benchmark of ``cryofield train`` on simulated data with known truth.

Experiments (each: simulate -> train -> score against truth.npz):

* ``homo``: demo-homo (D=64, 5000 particles, SNR 0.1, CTF), homogeneous ab initio. Scores:
  pose errors after global alignment (incl. mirror), FSC=0.5 resolution of the trained map
  against the true volume, and the same for a reconstruction with the *true* poses
  (``physics.backproject.reconstruct_fourier``) as the reference; their ratio.
* ``hetero``: demo-hetero (3 discrete states), zdim 8. ARI of k-means(z) vs truth labels.
* ``continuous``: demo-continuous, zdim 8. |Spearman| of the best PC of z vs the true
  coordinate.

The latent scores are computed by the functions of ``cryofield evaluate``
(:func:`score_latents`), so published numbers and the command agree.

Writes ``OUT/bench_train.json`` and prints a table. Wall time of each training is recorded.

Example::

    python benchmarks/bench_train.py -o bench_out --only homo --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _simulate(preset: str, out: Path, n: int, D: int, seed: int, apix: float | None) -> Path:
    from cryofield.simulate.config import preset_config
    from cryofield.simulate.dataset import simulate_dataset

    data = out / f"data_{preset}"
    if (data / "truth.npz").is_file():
        return data
    extra = {} if apix is None else {"apix_A": apix}
    cfg = preset_config(preset, n_particles=n, D=D, snr=0.1, seed=seed, **extra)
    return simulate_dataset(cfg, data)


def _train_cfg(args: argparse.Namespace, particles: Path, outdir: Path, zdim: int) -> Any:
    """The settings of ``cryofield train`` with no flags (TrainConfig's defaults, the one
    source of truth), plus ``--zdim`` for the heterogeneous sets and the thread count;
    ``--config FILE`` (yaml of TrainConfig keys) only for ablations."""
    from cryofield.inference.config import TrainConfig

    base = TrainConfig.load(args.config) if args.config else TrainConfig()
    base.particles, base.outdir, base.zdim = str(particles), str(outdir), zdim
    base.seed, base.num_threads, base.device = args.seed, args.threads, args.device
    if args.epochs is not None:
        base.epochs = args.epochs
    return base


def _resolution(
    vol: np.ndarray, ref: np.ndarray, apix: float, align: bool, hints: list | None = None
) -> dict[str, Any]:
    from cryofield.physics.fsc import fsc, resolution_at

    mirrored = False
    if align:
        from cryofield.analysis.align import align_volume

        al = align_volume(vol, ref, hints=hints)
        vol, mirrored = al.aligned, bool(al.mirrored)
    curve = fsc(torch.as_tensor(np.asarray(vol)), torch.as_tensor(np.asarray(ref)))
    shell, res_A = resolution_at(curve, 0.5, apix)
    return {"fsc05_A": float(res_A), "fsc05_shell": float(shell), "mirrored": mirrored}


def run_homo(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from cryofield.analysis.metrics import pose_errors
    from cryofield.inference.rundir import RunDir
    from cryofield.inference.runner import train
    from cryofield.io.metadata import load_particle_table
    from cryofield.io.mrc import read_mrc
    from cryofield.io.particles import ParticleSource
    from cryofield.physics.backproject import reconstruct_fourier
    from cryofield.physics.ctf import CTFParams

    data = _simulate("demo-homo", out, args.n, args.D, args.seed, args.apix)
    truth = np.load(data / "truth.npz")
    apix = float(truth["apix_A"])
    true_vol, _ = read_mrc(data / "volumes" / "state_00.mrc", mmap=False)
    true_vol = np.asarray(true_vol)
    # reference: reconstruction with the true poses; its sign tells the stack's contrast
    table = load_particle_table(data / "particles.star")
    src = ParticleSource(table)
    images = src[np.arange(len(src))]
    ref = reconstruct_fourier(
        images, torch.as_tensor(truth["rotations"]), torch.as_tensor(truth["shifts_px"]),
        CTFParams.from_table(table), apix,
    ).numpy()  # fmt: skip
    if bool(truth["invert"]):  # light-on-dark stack: the reference must be negated too
        ref = -ref
    tp = _resolution(ref, true_vol, apix, align=False)
    run_dir = out / ("run_homo_known" if args.known_poses else "run_homo")
    cfg = _train_cfg(args, data / "particles.star", run_dir, 0)
    if args.known_poses:  # the oracle: refinement started at the true poses must keep them
        cfg.poses_from_file, cfg.refine_poses = True, True
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    run = RunDir(run_dir)
    invert = run.train_config().invert  # resolved by --contrast auto
    poses = run.poses()
    pe = pose_errors(poses["rotations"], truth["rotations"], poses["shifts_px"], truth["shifts_px"])
    # the pose alignment predicts the map alignment (as in `cryofield evaluate`)
    from cryofield.analysis.metrics import MIRROR, align_rotations

    G, mir = np.asarray(pe["R_global"]), bool(pe["mirrored"])
    hints = [(MIRROR @ G @ MIRROR if mir else G, mir)]
    vol, _ = read_mrc(run.volume_path(), mmap=False)
    field_map = _resolution(np.asarray(vol), true_vol, apix, align=True, hints=hints)
    # consensus map (back-projection with the learned poses) put in the truth's frame
    # exactly: the learned poses are mapped by the global rotation (and hand) found by
    # the pose alignment, the global origin offset is fitted by least squares, and the
    # images are back-projected again; no map resampling blurs the comparison
    _, _, R_al = align_rotations(poses["rotations"], truth["rotations"])
    dt = (poses["shifts_px"] - truth["shifts_px"]).astype(np.float64)
    A = R_al[:, :2, :].reshape(-1, 3)  # shift of the origin by s moves images by R[:2] s
    s_fit = np.linalg.lstsq(A, dt.reshape(-1), rcond=None)[0]
    t_al = poses["shifts_px"] - (A @ s_fit).reshape(-1, 2)
    cons = reconstruct_fourier(
        images, torch.as_tensor(R_al, dtype=torch.float32),
        torch.as_tensor(t_al, dtype=torch.float32), CTFParams.from_table(table), apix,
    ).numpy() * (-1.0 if bool(truth["invert"]) else 1.0)  # fmt: skip
    ours = _resolution(cons, true_vol, apix, align=False)
    ours["mirrored"] = mir
    metrics = run.metrics()
    return {
        "experiment": "homo (known poses, refined)" if args.known_poses else "homo",
        "n": args.n, "invert": invert, "D": args.D, "snr": 0.1,
        "train_wall_s": wall,
        "threads": torch.get_num_threads(),
        "images_s_by_phase": {m["phase"]: m["images_s"] for m in metrics},
        "pose_errors": {k: v for k, v in pe.items() if k != "R_global"},
        "fsc05_A": ours["fsc05_A"], "map_mirrored": ours["mirrored"],
        "field_map_fsc05_A": field_map["fsc05_A"],
        "field_vs_consensus": field_map["fsc05_A"] / ours["fsc05_A"],
        "refine": [m.get("refine") for m in metrics if m["phase"] == "refine"],
        "poses_moved_by_epoch": [m.get("poses_moved") for m in metrics],
        "true_pose_fsc05_A": tp["fsc05_A"], "resolution_ratio": ours["fsc05_A"] / tp["fsc05_A"],
    }  # fmt: skip


def score_latents(z: np.ndarray, truth: Any) -> tuple[dict[str, Any], np.ndarray | None]:
    """Latent scores with the functions of ``cryofield evaluate``.

    Truth with a continuous coordinate (``coord`` finite somewhere): ``spearman_abs_pcs``,
    |Spearman| of PC1..3 of z with it
    (:func:`cryofield.analysis.metrics.spearman_latent_vs_coord`, NaN coordinates, i.e.
    junk, left out), and ``spearman_abs_best_pc``. Discrete truth: ``ari`` and
    ``clustering`` (:func:`cryofield.analysis.evaluate.clustering_scores`: k-means with K =
    the number of true states; ARI, NMI, accuracy) on the particles evaluate scores (junk
    excluded, :func:`~cryofield.analysis.evaluate.scored_particles`).

    Returns
    -------
    scores, and the k-means labels of the scored particles (``None`` for a continuous
    truth); the scored particles are ``scored_particles(truth["is_junk"])``.
    """
    from cryofield.analysis.evaluate import clustering_scores, scored_particles
    from cryofield.analysis.metrics import spearman_latent_vs_coord

    z = np.asarray(z)
    coord = np.asarray(truth["coord"], np.float64) if "coord" in truth else None
    if coord is not None and np.isfinite(coord).sum() >= 3:
        rho = [abs(r) for r in spearman_latent_vs_coord(z, coord)]
        return {"spearman_abs_pcs": rho, "spearman_abs_best_pc": max(rho)}, None
    good = scored_particles(truth.get("is_junk", np.zeros(len(z), bool)))
    clustering, pred = clustering_scores(z[good], np.asarray(truth["labels"])[good])
    return {"ari": clustering["ari"], "clustering": clustering}, pred


def _state_maps(
    run: Any,
    z: np.ndarray,
    pred: np.ndarray,
    labels: np.ndarray,
    truth: Any,
    data: Path,
    hints: list,
) -> list[dict[str, Any]]:
    """FSC=0.5 of the field rendered at each k-means centre against the true state it
    holds most of (aligned, mirror included; the pose alignment seeds the search). ``z``,
    ``pred`` and ``labels`` are rows of the same particles."""
    from cryofield.io.mrc import read_mrc

    field = run.load_field()
    apix = float(truth["apix_A"])
    out = []
    for c in range(int(pred.max()) + 1):
        members = pred == c
        state = int(np.bincount(labels[members]).argmax())
        true_vol, _ = read_mrc(data / "volumes" / f"state_{state:02d}.mrc", mmap=False)
        with torch.no_grad():
            vol = field.render_volume(torch.as_tensor(z[members].mean(0))).numpy()
        res = _resolution(vol, np.asarray(true_vol), apix, align=True, hints=hints)
        out.append({"cluster": c, "state": state, "n": int(members.sum()),
                    "fsc05_A": res["fsc05_A"]})  # fmt: skip
    return out


def run_het(args: argparse.Namespace, out: Path, preset: str) -> dict[str, Any]:
    from cryofield.analysis.evaluate import scored_particles
    from cryofield.analysis.metrics import MIRROR, pose_errors
    from cryofield.inference.rundir import RunDir
    from cryofield.inference.runner import resume, train

    data = _simulate(preset, out, args.n_het, args.D, args.seed, args.apix)
    truth = np.load(data / "truth.npz")
    mode = "known_poses" if args.known_poses else "ab_initio"
    run_dir = out / f"run_{preset}_{mode}"
    a = argparse.Namespace(**{**vars(args), "n": args.n_het})
    cfg = _train_cfg(a, data / args.particles_file, run_dir, args.zdim)
    cfg.poses_from_file = bool(args.known_poses)
    t0 = time.perf_counter()
    # an existing run (interrupted, or stopped earlier) is continued to --epochs
    last = RunDir(run_dir).last_complete_epoch() if (run_dir / "config.yaml").is_file() else None
    if last is None:
        train(cfg)
    else:
        resume(run_dir, epochs=args.epochs)
    wall = time.perf_counter() - t0
    run = RunDir(run_dir)
    z = run.latents()
    poses = run.poses()
    res: dict[str, Any] = {"experiment": f"{preset} ({mode})", "n": args.n_het,
                           "input": args.particles_file, "train_wall_s": wall,
                           "resumed_after_epoch": last}  # fmt: skip
    pe = pose_errors(poses["rotations"], truth["rotations"], poses["shifts_px"],
                     truth["shifts_px"])  # fmt: skip
    res["pose_errors"] = {k: v for k, v in pe.items() if k != "R_global"}
    res["images_s_by_phase"] = {m["phase"]: m["images_s"] for m in run.metrics()}
    scores, pred = score_latents(z, truth)
    res.update(scores)
    if pred is not None:
        good = scored_particles(truth.get("is_junk", np.zeros(len(z), bool)))
        G, mir = np.asarray(pe["R_global"]), bool(pe["mirrored"])
        hints = [(MIRROR @ G @ MIRROR if mir else G, mir)]
        res["state_maps"] = _state_maps(
            run, z[good], pred, np.asarray(truth["labels"])[good], truth, data, hints
        )
    np.save(run_dir / "z_final.npy", z)
    return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings (the defaults are the measured configuration)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-o", "--out", default="bench_train_out")
    p.add_argument("--only", nargs="*", default=["homo", "hetero", "continuous"])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--n-het", type=int, default=6000)
    p.add_argument("-D", type=int, default=64)
    p.add_argument("--apix", type=float, default=None, help="pixel size, A (preset's if unset)")
    p.add_argument("--epochs", type=int, default=None, help="default: cryofield train's")
    p.add_argument("--zdim", type=int, default=8)
    p.add_argument("--config", help="yaml of TrainConfig keys (ablations only; default none)")
    p.add_argument(
        "--known-poses",
        action="store_true",
        help="start from the simulated poses (hetero/continuous: fixed; homo: refined, the "
        "oracle test)",
    )
    p.add_argument(
        "--particles-file",
        default="particles.star",
        help="hetero/continuous input: particles.star or particles.cs",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto (cuda when seen), cpu, cuda, cuda:N")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for exp in args.only:
        if exp == "homo":
            results.append(run_homo(args, out))
        elif exp == "hetero":
            results.append(run_het(args, out, "demo-hetero"))
        elif exp == "continuous":
            results.append(run_het(args, out, "demo-continuous"))
        else:
            print(f"unknown experiment {exp}", file=sys.stderr)
            return 2
        (out / "bench_train.json").write_text(json.dumps(results, indent=2, default=float))
    for r in results:
        print(f"== {r['experiment']} (n={r['n']}, train {r['train_wall_s']:.0f} s)")
        for k, v in r.items():
            if k not in ("experiment", "n", "train_wall_s"):
                print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
