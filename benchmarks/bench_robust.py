"""Robustness benchmark of the default ``cryofield train`` on simulated data unlike the demo.

Each cell simulates a dataset (cryofield.simulate; reused when its truth.npz exists), runs

    cryofield train particles.star -o run [--zdim 8] --threads T

as a subprocess (wall time and peak RSS of that child, from os.wait4) and scores the run
against truth.npz: pose errors after global alignment (out-of-plane / in-plane median and
mean, fraction of poses within 10 deg, translation median), the run's consensus.mrc FSC=0.5
against the true map (after align_volume) over the same for the back-projection with the
true poses (the oracle), plus the exact consensus (the learned poses mapped into the truth
frame and back-projected again, no map resampling), and the pose floor (homogeneous cells:
each of 2,000 images aligned from its true pose to the true-pose half map without it,
cryofield.inference.refine.pose_floor: what an ideal refinement reaches on these images;
"floor" in the table); heterogeneous runs: ARI of k-means(z)
(k = number of states) and the best |Spearman| of the first PCs of z vs the coordinate.
The run's verdict.json (converged, headline) is reported when it exists.

The base cell is the protein object, D=64 (320 A box: apix = 320/D A), N=5000, SNR 0.1,
uniform views, default CTF and shifts; every other cell changes one thing:

  base           as above                   box32, box128    D=32 / D=128 (N=2000)
  n1k, n20k      N=1000 / N=20000           snr0.05, snr0.3  SNR 0.05 / 0.3
  pref_view      30% of the views within 15 deg of +z
  pref_strong    70% of the views within 15 deg of +z (a particle that mostly lies flat)
  missing_band   no view with tilt 60-120 deg (|cos tilt| < 0.5): a 30-deg missing cone
  defocus_wide   defocus 0.5-3.5 um         shift8           shifts uniform in +-8 px
  elongated      Gaussian-blob ellipsoid, semi-axes 0.28 x 0.075 x 0.075 box (aspect 3.7)
  flat           Gaussian-blob disc, semi-axes 0.24 x 0.24 x 0.055 box (aspect 4.4)
  small          small Gaussian-blob object, semi-axes 0.09 x 0.07 x 0.06 box
  het_pop        3 built-in discrete states, populations 10/30/60%, N=6000, --zdim 8
  het_domain     2 states differing by a small bound domain (map correlation ~0.93), N=6000
  continuous     built-in hinge motion (40 frames), N=6000, --zdim 8

Targets (pass/fail where SNR >= 0.1): out-of-plane median <= 1.5 deg, mean <= 2 deg,
>= 99% of the poses within 10 deg (full rotation), translation median <= 0.3 px, consensus
FSC=0.5 <= 1.05 x the oracle's; ARI >= 0.95; |Spearman| >= 0.9.

Writes OUT/CELL/{data/, run/, train.log, train.json, result.json} and OUT/bench_robust.json,
.md and .png. Cells with result.json are reused (so a grid can be continued; --rescore
scores finished runs again); an interrupted training is resumed.

examples:
  python benchmarks/bench_robust.py -o robust_out --grid small --threads 2
  python benchmarks/bench_robust.py -o robust_out --grid full --threads 16
  python benchmarks/bench_robust.py -o robust_out --cells pref_view het_pop
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

BASE: dict[str, Any] = dict(source="protein", n_particles=5000, D=64, snr=0.1)
BOX_A = 320.0  # physical box (A): the same particle at every D
CELLS: dict[str, dict[str, Any]] = {
    "base": {},
    "box32": {"D": 32},
    "box128": {"D": 128, "n_particles": 2000},
    "n1k": {"n_particles": 1000},
    "n20k": {"n_particles": 20000},
    "snr0.05": {"snr": 0.05},
    "snr0.3": {"snr": 0.3},
    "pref_view": {"views": "preferred"},
    "pref_strong": {"views": "preferred70"},
    "missing_band": {"views": "missing_band"},
    "defocus_wide": {"defocus_min_A": 5000.0, "defocus_max_A": 35000.0},
    "shift8": {"shift_px": 8.0, "shift_distribution": "uniform"},
    "elongated": {"shape": "elongated"},
    "flat": {"shape": "flat"},
    "small": {"shape": "small"},
    "het_pop": {"source": "states", "n_states": 3, "weights": [0.1, 0.3, 0.6],
                "n_particles": 6000, "zdim": 8},
    "het_domain": {"shape": "domain", "n_particles": 6000, "zdim": 8},
    "continuous": {"source": "continuous", "n_particles": 6000, "zdim": 8},
}  # fmt: skip
GRIDS = {
    "small": ["base", "box32", "n1k", "snr0.3", "pref_view", "shift8", "flat", "het_pop"],
    "full": list(CELLS),
}
#: semi-axes (box fractions) of the Gaussian-blob objects
SHAPES = {
    "elongated": (0.28, 0.075, 0.075),
    "flat": (0.24, 0.24, 0.055),
    "small": (0.09, 0.07, 0.06),
}
ATOMS_PER_VOLUME = 42000.0  # pseudo-atoms per box^3: the density of the built-in protein
#: (result key, comparison, threshold), checked where SNR >= 0.1
TARGETS = [
    ("oop_median_deg", "<=", 1.5), ("oop_mean_deg", "<=", 2.0), ("frac_rot_10deg", ">=", 0.99),
    ("trans_median_px", "<=", 0.3), ("map_ratio", "<=", 1.05), ("ari", ">=", 0.95),
    ("spearman_abs", ">=", 0.9),
]  # fmt: skip


# ------------------------------------------------------------------------------ simulate


def _views(kind: str, n: int, seed: int) -> np.ndarray:
    """(n, 3, 3) poses: 30% ('preferred') or 70% ('preferred70') within 15 deg of +z, or
    no tilt in 60-120 deg ('missing_band')."""
    from cryofield.physics.rotation import euler_relion_to_matrix

    rng = np.random.default_rng(seed + 17)
    cos_t = rng.uniform(-1.0, 1.0, n)  # uniform viewing directions (tilt = angle from z)
    if kind in ("preferred", "preferred70"):
        k = round((0.7 if kind == "preferred70" else 0.3) * n)
        cos_t[:k] = rng.uniform(np.cos(np.radians(15.0)), 1.0, k)  # uniform on the cap
    else:  # Friedel: tilt t and 180 - t give the same central slice, so drop both bands
        cos_t = rng.choice([-1.0, 1.0], n) * rng.uniform(0.5, 1.0, n)
    ang = np.stack([rng.uniform(0, 2 * np.pi, n), np.arccos(cos_t), rng.uniform(0, 2 * np.pi, n)])
    R = euler_relion_to_matrix(torch.as_tensor(ang.T)).numpy().astype(np.float32)
    return R[rng.permutation(n)]


def _write_maps(shape: str, D: int, apix: float, folder: Path, seed: int) -> tuple[list, float]:
    """Input maps of a 'shape' cell and the correlation of the first two (nan if one map)."""
    from cryofield.io.mrc import write_mrc
    from cryofield.simulate.volumes import discrete_states, render_gaussians

    if shape == "domain":  # built-in states 0 (arm closed) and 3 (same + a small domain)
        states = discrete_states(D, 4)
        vols = [states[0], states[3]]
    else:
        rng = np.random.default_rng(seed + 29)
        axes = np.asarray(SHAPES[shape])
        n = max(30, round(ATOMS_PER_VOLUME * 4.0 / 3.0 * np.pi * np.prod(axes)))
        ball = rng.uniform(-1.0, 1.0, (8 * n, 3))
        atoms = ball[np.linalg.norm(ball, axis=1) <= 1.0][:n] * axes  # uniform in the ellipsoid
        vol = render_gaussians(atoms * D, np.ones(n), 0.013 * D, D)  # built-in atom width
        vols = [vol / vol.max()]
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(write_mrc(folder / f"{shape}_{i}.mrc", v, apix).resolve()) for i, v in
             enumerate(vols)]  # fmt: skip
    corr = float(np.corrcoef(vols[0].ravel(), vols[1].ravel())[0, 1]) if len(vols) > 1 else np.nan
    return paths, corr


def simulate(name: str, args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """Simulate cell ``name`` into ``data`` (unless truth.npz exists); returns its settings."""
    from cryofield.simulate.config import SimulationConfig
    from cryofield.simulate.dataset import simulate_dataset

    spec = {**BASE, **CELLS[name], "seed": args.seed}
    views, shape, zdim = spec.pop("views", None), spec.pop("shape", None), spec.pop("zdim", 0)
    if args.n_override:
        spec.update(n_particles=args.n_override, D=args.d_override)
    spec["apix_A"] = BOX_A / spec["D"]
    info = {"zdim": zdim, "views": views, "shape": shape, "map_corr": None}
    if (data / "truth.npz").is_file():
        cached = data / "cell.json"
        return json.loads(cached.read_text()) if cached.is_file() else {**spec, **info}
    data.mkdir(parents=True, exist_ok=True)
    if views:
        np.savez(data / "views.npz", rotations=_views(views, spec["n_particles"], args.seed))
        spec["rotations_path"] = str((data / "views.npz").resolve())
    if shape:
        paths, corr = _write_maps(shape, spec["D"], spec["apix_A"], data / "input_maps", args.seed)
        spec.update(source="volumes", volume_paths=paths)
        info["map_corr"] = None if np.isnan(corr) else corr
    simulate_dataset(SimulationConfig(**spec), data)
    (data / "cell.json").write_text(json.dumps({**spec, **info}, indent=1))
    return {**spec, **info}


# --------------------------------------------------------------------------------- train


def train(cell_dir: Path, data: Path, zdim: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run the default command (or --resume an interrupted run) as a child process."""
    from cryofield.inference.rundir import RunDir

    run = cell_dir / "run"
    exe = Path(sys.executable).with_name("cryofield")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "cryofield"]
    resumed = (run / "config.yaml").is_file() and RunDir(run).last_complete_epoch() is not None
    if resumed:
        cmd += ["train", "--resume", str(run)]
    else:
        cmd += ["train", str(data / "particles.star"), "-o", str(run)]
        cmd += ["--zdim", str(zdim)] if zdim else []
        cmd += ["--threads", str(args.threads)]
    cmd += ["--epochs", str(args.epochs_override)] if args.epochs_override else []
    print(f"  $ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    with open(cell_dir / "train.log", "ab") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        # the child's own rusage (RUSAGE_CHILDREN would be the max over all cells so far)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"command": shlex.join(cmd), "returncode": proc.returncode, "resumed": resumed,
            "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024.0}  # fmt: skip


# --------------------------------------------------------------------------------- score


def _fsc05(vol: Any, ref: np.ndarray, apix: float) -> float:
    from cryofield.analysis.metrics import fsc_curve
    from cryofield.physics.fsc import resolution_at

    return float(resolution_at(torch.as_tensor(fsc_curve(np.asarray(vol), ref)), 0.5, apix)[1])


def _pose_scores(R: np.ndarray, R_true: np.ndarray, t: np.ndarray, t_true: np.ndarray) -> dict:
    from cryofield.analysis.metrics import align_rotations, out_of_plane_error_rad, pose_errors

    pe = pose_errors(R, R_true, t, t_true)
    _, _, R_al = align_rotations(R, R_true)
    cos = np.clip((np.einsum("nij,nij->n", R_al, R_true) - 1.0) / 2.0, -1.0, 1.0)
    rot, oop = np.degrees(np.arccos(cos)), np.degrees(out_of_plane_error_rad(R_al, R_true))
    return {
        "oop_median_deg": pe["out_of_plane_median_deg"],
        "oop_mean_deg": pe["out_of_plane_mean_deg"],
        "inp_median_deg": pe["in_plane_median_deg"], "inp_mean_deg": pe["in_plane_mean_deg"],
        "rot_median_deg": pe["rot_median_deg"], "frac_rot_10deg": float((rot <= 10).mean()),
        "frac_oop_10deg": float((oop <= 10).mean()), "trans_median_px": pe["trans_median_px"],
        "mirrored": pe["mirrored"], "_G": np.asarray(pe["R_global"]), "_R_al": R_al,
        "off10_by_shift": _off_by_shift(rot > 10, t_true),
    }  # fmt: skip


#: edges (px, input box) of the bins of :func:`_off_by_shift`
SHIFT_BINS = (0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, np.inf)


def _off_by_shift(off: np.ndarray, t_true: np.ndarray) -> list[dict]:
    """Share of the images ``off (N,)`` (e.g. > 10 deg from the truth) per bin of their
    largest true shift component ``t_true (N, 2)`` px: whether a tail comes from the
    translation range."""
    m = np.abs(t_true).max(axis=1)
    rows = []
    for lo, hi in itertools.pairwise(SHIFT_BINS):
        sel = (m >= lo) & (m < hi)
        if sel.any():
            rows.append({"shift_px": [lo, float(hi)], "n": int(sel.sum()),
                         "frac_off": float(off[sel].mean())})  # fmt: skip
    return rows


def _map_scores(run: Any, data: Path, truth: Any, idx: np.ndarray, f: float, ps: dict) -> dict:
    """FSC=0.5 (A) of consensus.mrc (aligned), the oracle and the exact consensus."""
    from cryofield.analysis.align import align_volume
    from cryofield.analysis.metrics import MIRROR
    from cryofield.inference.consensus import backproject_halves
    from cryofield.io.mrc import read_mrc
    from cryofield.io.particles import ParticleSource
    from cryofield.physics.ctf import CTFParams
    from cryofield.physics.filters import fourier_crop_3d

    Dtr, apix = run.training_D(), float(truth["apix_A"]) * f
    true_vol = np.asarray(read_mrc(data / "volumes" / "state_00.mrc", mmap=False)[0], np.float32)
    if true_vol.shape[0] != Dtr:
        true_vol = fourier_crop_3d(torch.as_tensor(true_vol), Dtr).numpy()
    table = run.table()  # the rows of the poses
    src, ctf = ParticleSource(table, D=Dtr), CTFParams.from_table(table)
    sign = -1.0 if bool(truth["invert"]) else 1.0
    R_true, t_true = truth["rotations"][idx], truth["shifts_px"][idx] / f
    oracle = backproject_halves(src, torch.as_tensor(R_true), torch.as_tensor(t_true), ctf,
                                apix, sign)[0].numpy()  # fmt: skip
    G, mir = ps["_G"], bool(ps["mirrored"])
    cons = np.asarray(read_mrc(run.path / "consensus.mrc", mmap=False)[0], np.float32)
    hints = [(MIRROR @ G @ MIRROR if mir else G, mir)]
    cons = align_volume(cons, true_vol, hints=hints).aligned
    # exact: learned poses in the truth frame, origin offset fitted (as bench_train.py)
    R_al, t = ps["_R_al"], run.poses()["shifts_px"].astype(np.float64)
    A = R_al[:, :2, :].reshape(-1, 3)
    s_fit = np.linalg.lstsq(A, (t - t_true).reshape(-1), rcond=None)[0]
    t_al = t - (A @ s_fit).reshape(-1, 2)
    exact = backproject_halves(src, torch.as_tensor(R_al, dtype=torch.float32),
                               torch.as_tensor(t_al, dtype=torch.float32), ctf, apix,
                               sign)[0].numpy()  # fmt: skip
    maps = {"cons_fsc05_A": cons, "oracle_fsc05_A": oracle, "exact_fsc05_A": exact}
    out = {k: _fsc05(v, true_vol, apix) for k, v in maps.items()}
    out["map_ratio"] = out["cons_fsc05_A"] / out["oracle_fsc05_A"]
    out["map_ratio_exact"] = out["exact_fsc05_A"] / out["oracle_fsc05_A"]
    return out


def score(cell_dir: Path, data: Path, zdim: int) -> dict[str, Any]:
    """All metrics of a finished run against truth.npz."""
    from sklearn.cluster import KMeans

    from cryofield.analysis.metrics import adjusted_rand_index, spearman_latent_vs_coord
    from cryofield.inference.rundir import RunDir

    truth, run = np.load(data / "truth.npz"), RunDir(cell_dir / "run")
    poses = run.poses()
    idx = poses["particle_index"]
    f = int(truth["D"]) / run.training_D()  # input px per training px
    ps = _pose_scores(poses["rotations"], truth["rotations"][idx], poses["shifts_px"] * f,
                      truth["shifts_px"][idx])  # fmt: skip
    out = {"epochs": run.train_config().epochs, "training_D": run.training_D()}
    if zdim == 0:
        out.update(_map_scores(run, data, truth, idx, f, ps))
        from cryofield.analysis.evaluate import pose_floor_scores

        junk = truth["is_junk"] if "is_junk" in truth.files else np.zeros(len(truth["rotations"]))
        good = ~np.asarray(junk, bool)[idx]
        fl = pose_floor_scores(run, dict(truth), idx, good, True, "C1", 2000)
        out["floor_oop_median_deg"] = fl.get("out_of_plane_median_deg")
        out["floor_oop_mean_deg"] = fl.get("out_of_plane_mean_deg")
    else:
        z = run.latents()
        if truth["frame_coords"].size == 0:  # discrete states
            k = len(truth["volume_paths"])
            pred = KMeans(k, n_init=10, random_state=0).fit_predict(z)
            out["ari"] = adjusted_rand_index(truth["labels"][idx], pred)
        else:
            rho = spearman_latent_vs_coord(z, truth["coord"][idx])
            out.update(spearman_pcs=rho, spearman_abs=max(abs(r) for r in rho))
    vpath = run.path / "verdict.json"
    v = json.loads(vpath.read_text()) if vpath.is_file() else None
    out["verdict"] = None if v is None else {k: v.get(k) for k in ("converged", "headline")}
    return {**{k: v for k, v in ps.items() if not k.startswith("_")}, **out}


def check(r: dict[str, Any]) -> dict[str, Any]:
    """Pass/fail of the targets (they apply where SNR >= 0.1)."""
    failed = [k for k, op, thr in TARGETS if r.get(k) is not None
              and not (r[k] <= thr if op == "<=" else r[k] >= thr)]  # fmt: skip
    applies = r["snr"] >= 0.1
    return {"applies": applies, "failed": failed, "pass": (not failed) if applies else None}


# ---------------------------------------------------------------------------------- cell


def _meta() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "nproc": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
    }  # fmt: skip


def run_cell(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    tag = f"@n{args.n_override}" if args.n_override else ""
    tag += f"e{args.epochs_override}" if args.epochs_override else ""
    cell_dir = out / f"{name}{tag}"
    result_path = cell_dir / "result.json"
    if result_path.is_file() and not args.rescore:
        print(f"[{name}{tag}] reused {result_path}", file=sys.stderr)
        return json.loads(result_path.read_text())
    cell_dir.mkdir(parents=True, exist_ok=True)
    print(f"[{name}{tag}] simulate", file=sys.stderr, flush=True)
    sim = simulate(name, args, cell_dir / "data")
    train_path = cell_dir / "train.json"
    if train_path.is_file():  # trained before (scoring crashed, or --rescore)
        tr = json.loads(train_path.read_text())
    else:
        tr = train(cell_dir, cell_dir / "data", sim["zdim"], args)
    r = {"cell": f"{name}{tag}", "D": sim["D"], "N": sim["n_particles"], "snr": sim["snr"],
         "apix_A": sim["apix_A"], "zdim": sim["zdim"], "map_corr": sim["map_corr"], **tr,
         **_meta()}  # fmt: skip
    if tr["returncode"] != 0:
        r["error"] = f"train exited with {tr['returncode']}; see {cell_dir / 'train.log'}"
        return r  # no train.json/result.json: a later call retries (resumes) it
    train_path.write_text(json.dumps(tr, indent=1))
    print(f"[{name}{tag}] score", file=sys.stderr, flush=True)
    r.update(score(cell_dir, cell_dir / "data", sim["zdim"]))
    r["targets"] = check(r)
    result_path.write_text(json.dumps(r, indent=1, default=float))
    return r


# ------------------------------------------------------------------------------- report


def _f(v: Any, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def table(results: list[dict[str, Any]]) -> str:
    head = ["cell", "D", "N", "SNR", "oop med/mean ° (floor)", "inp med °", "≤10° %", "trans px",
            "FSC0.5 cons/oracle Å (ratio; exact)", "ARI / ρ (abs)", "verdict", "wall min",
            "RSS GB", "targets"]  # fmt: skip
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['cell']} | {r['D']} | {r['N']} | {r['snr']} | {r['error']} |")
            continue
        fsc = "-"
        if r.get("cons_fsc05_A") is not None:
            fsc = (f"{r['cons_fsc05_A']:.1f}/{r['oracle_fsc05_A']:.1f} ({r['map_ratio']:.2f}; "
                   f"{r['map_ratio_exact']:.2f})")  # fmt: skip
        het = _f(r.get("ari", r.get("spearman_abs")), ".3f")
        v = r.get("verdict") or {}
        verdict = "-" if not v else f"{'ok' if v.get('converged') else 'NO'}: {v.get('headline')}"
        verdict = verdict.replace("|", "\\|")  # keep the markdown table intact
        t = r["targets"]
        ok = "n/a" if not t["applies"] else "PASS" if t["pass"] else "FAIL " + ",".join(t["failed"])
        rows.append(" | ".join([
            f"| {r['cell']}", str(r["D"]), str(r["N"]), str(r["snr"]),
            f"{r['oop_median_deg']:.2f}/{r['oop_mean_deg']:.2f} "
            f"({_f(r.get('floor_oop_median_deg'))}/{_f(r.get('floor_oop_mean_deg'))})",
            _f(r["inp_median_deg"]),
            f"{100 * r['frac_rot_10deg']:.1f}", _f(r["trans_median_px"]), fsc, het, verdict,
            f"{r['wall_s'] / 60:.1f}", f"{r['peak_rss_mb'] / 1024:.2f}", ok + " |",
        ]))  # fmt: skip
    return "\n".join(rows)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.6 * len(ok) + 2), 9), sharex=True)
    x, names = np.arange(len(ok)), [r["cell"] for r in ok]
    panels = [  # (axis, values, target lines, label)
        (axes[0], [r["oop_median_deg"] for r in ok], [1.5], "out-of-plane median (deg)"),
        (axes[1], [r.get("map_ratio") for r in ok], [1.05], "FSC0.5 consensus / oracle"),
        (axes[2], [r.get("ari", r.get("spearman_abs")) for r in ok], [0.95, 0.9], "ARI / ρ (abs)"),
    ]
    floor = [r.get("floor_oop_median_deg") for r in ok]
    if any(v is not None for v in floor):
        y = [np.nan if v is None else v for v in floor]
        axes[0].plot(x, y, "k_", ms=14, mew=2, label="floor (ideal refinement)")
        axes[0].legend(fontsize=8)
    for ax, vals, lines, label in panels:
        y = np.array([np.nan if v is None else v for v in vals], dtype=float)
        colors = ["tab:gray" if r["snr"] < 0.1 else "tab:blue" for r in ok]
        ax.bar(x, np.nan_to_num(y), color=colors)
        for t in lines:
            ax.axhline(t, color="tab:red", ls="--", lw=1)
        ax.set_ylabel(label)
    axes[0].set_yscale("log")
    axes[0].set_title(
        "cryofield train (default) robustness; gray: SNR < 0.1 (no target)", fontsize=10
    )
    axes[2].set_xticks(x, names, rotation=45, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-o", "--out", default="bench_robust_out", help="output folder")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--cells", nargs="+", choices=list(CELLS), metavar="CELL",
                     help=f"cells to run: {', '.join(CELLS)}")  # fmt: skip
    sel.add_argument("--grid", choices=list(GRIDS), default="small",
                     help="small: " + ", ".join(GRIDS["small"]) + "; full: all cells")  # fmt: skip
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="cryofield --threads")
    p.add_argument("--seed", type=int, default=0, help="simulation seed")
    p.add_argument("--rescore", action="store_true", help="score finished runs again")
    # testing only: tiny cells (N images at D=--d-override, --epochs E), in CELL@nNeE folders
    p.add_argument("--n-override", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--d-override", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--epochs-override", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.cells or GRIDS[args.grid]:
        results.append(run_cell(name, args, out))
        (out / "bench_robust.json").write_text(json.dumps(results, indent=1, default=float))
    md = table(results)
    (out / "bench_robust.md").write_text(md + "\n")
    plot(results, out / "bench_robust.png")
    print(md)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
