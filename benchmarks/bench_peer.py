"""Side-by-side benchmark: ``cryofield train`` vs the peer ``cryodrgn abinit`` (DRGN-AI).

One run on one machine, the same simulated particles, CTF and box for both tools:

1. simulate a dataset with :func:`cryofield.simulate.dataset.simulate_dataset` (a preset,
   with optional N / D / pixel size / SNR overrides) into ``OUT/data``;
2. run the peer (``cryodrgn parse_ctf_star`` then ``cryodrgn abinit``) in its own venv;
3. run ``cryofield train`` (CLI, a subprocess of this Python) with the same budget:
   ``--hps-epochs`` pose-search epochs then ``--sgd-epochs`` gradient epochs over all N
   images (the peer also runs its own pretraining epoch 0 on ``min(N, 10000)`` images,
   reported as a separate phase);
4. both under ``/usr/bin/time -v`` (wall time, peak RSS); per-phase images/s from the
   peer's ``run.log`` and our ``metrics.jsonl``;
5. score both with the SAME code: :func:`cryofield.analysis.metrics.pose_errors` (global
   rotation and hand aligned), and the FSC of each tool's map against the true map after
   rigid alignment (:func:`cryofield.analysis.metrics.align_volume`, mirror included);
6. write ``OUT/results.json`` and ``OUT/results.md`` and print the markdown table.

Example (a moderate comparison on CPU; the peer's pose search dominates, ~20 min)::

    python benchmarks/bench_peer.py --peer-venv /work/peer_venv --out bench_out/peer \\
        --n 2000 --D 32 --apix 10 --snr 0.1 --zdim 0 --hps-epochs 2 --sgd-epochs 2

Any failing step raises with the step's name, its log file and the log's last lines.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peer  # benchmarks/peer.py, next to this file
from peer import BenchmarkError

from cryofield.errors import CryofieldError

TOOLS = ("peer", "cryofield")


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="bench_peer.py",
        description=__doc__.split("\n\n")[0],
        epilog=(
            "example:\n  python benchmarks/bench_peer.py --peer-venv /work/peer_venv "
            "--out bench_out/peer --n 2000 --D 32 --apix 10 --snr 0.1 --zdim 0"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--peer-venv", required=True, help="venv holding cryoDRGN (bin/cryodrgn)")
    p.add_argument("--out", required=True, help="output folder (data/, peer/, cryofield/, ...)")
    g = p.add_argument_group("dataset")
    g.add_argument("--preset", default="demo-homo", help="simulation preset (demo-homo)")
    g.add_argument("--n", type=int, help="number of particles (preset: 5000)")
    g.add_argument("--D", type=int, help="box size, px (preset: 64)")
    g.add_argument("--apix", type=float, help="pixel size, A (preset: 5.0)")
    g.add_argument("--snr", type=float, help="signal-to-noise ratio (preset: 0.1)")
    g.add_argument("--data-seed", type=int, default=0, help="simulation seed (0)")
    g.add_argument("--reuse-data", action="store_true", help="keep OUT/data if it exists")
    g = p.add_argument_group("budget (the same for both tools)")
    g.add_argument("--zdim", type=int, default=0, help="latent dimension (0: homogeneous)")
    g.add_argument("--hps-epochs", type=int, default=2, help="pose-search epochs (2)")
    g.add_argument("--sgd-epochs", type=int, default=3, help="gradient epochs after (3)")
    g.add_argument("--peer-pretrain", type=int, default=10000,
                   help="peer's --n-imgs-pretrain (its default 10000; 0: no epoch 0)")  # fmt: skip
    g.add_argument("--peer-radii", action="store_true",
                   help="keep the peer's own search radii (12 -> 32 px, 20 px shifts, tuned "
                   "for D=128) instead of giving both tools ours scaled by D/128")  # fmt: skip
    g.add_argument("--threads", type=int, default=1, help="CPU threads per tool (1)")
    g.add_argument("--device", default="auto", help="cryofield device: auto, cpu, cuda")
    g.add_argument("--seed", type=int, default=0, help="training seed of both tools (0)")
    g.add_argument("--timeout", type=float, default=1200, help="seconds per tool (1200)")
    g.add_argument(
        "--peer-args", default="", help="extra abinit arguments: --peer-args='--lr 2e-4'"
    )
    g.add_argument(
        "--ours-args", default="", help="extra cryofield train arguments: --ours-args='-b 32'"
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--skip", choices=TOOLS, action="append", default=[],
                   help="do not run or score this tool (repeatable)")  # fmt: skip
    g.add_argument("--check-conventions", action="store_true",
                   help="first pin the peer's pose convention from true poses")  # fmt: skip
    g.add_argument("--rescore", action="store_true",
                   help="run nothing; score the outputs already in OUT")  # fmt: skip
    return p


# ----------------------------------------------------------------------------- helpers
def _log(msg: str) -> None:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S")
    print(f"[bench {stamp}] {msg}", flush=True)


def _write_json(path: Path, obj: Any) -> None:
    from cryofield.io.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _peer_version(venv: str) -> str:
    sp = sorted(Path(venv).glob("lib/python*/site-packages/cryodrgn-*.dist-info"))
    return sp[0].name.removeprefix("cryodrgn-").removesuffix(".dist-info") if sp else "?"


# ----------------------------------------------------------------------------- dataset
def simulate(args: argparse.Namespace, data_dir: Path) -> Path:
    """Simulate (or reuse) the dataset; returns the truth.npz path."""
    from cryofield.simulate.dataset import preset_config, simulate_dataset

    truth = data_dir / "truth.npz"
    if (args.reuse_data or args.rescore) and truth.is_file():
        _log(f"reusing dataset {data_dir}")
        return truth
    over: dict[str, Any] = {"seed": args.data_seed}
    for arg, key in (("n", "n_particles"), ("D", "D"), ("apix", "apix_A"), ("snr", "snr")):
        if getattr(args, arg) is not None:
            over[key] = getattr(args, arg)
    cfg = preset_config(args.preset, **over)
    _log(f"simulating {cfg.n_particles} particles, D={cfg.D}, apix={cfg.apix_A}, snr={cfg.snr}")
    t0 = time.perf_counter()
    simulate_dataset(cfg, data_dir)
    _log(f"simulated in {time.perf_counter() - t0:.1f} s")
    return truth


def search_radii(D: int) -> dict[str, float]:
    """The DRGN-AI search settings at D=128 scaled to box ``D`` (our TrainConfig defaults).

    Radius of the first / last pose-search frequency disc (px) and the translation search
    half-extent (px); the same rule as :meth:`cryofield.inference.config.TrainConfig.resolved`.
    """
    nyq = D / 2 - 1
    scale = D / 128.0
    start = max(1, round(min(12.0 * scale, nyq)))
    end = max(start, round(min(32.0 * scale, nyq)))
    return {"radius_start_px": start, "radius_search_px": end, "t_extent_px": 20.0 * scale}


# ----------------------------------------------------------------------------- phases
def _phases(epochs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Aggregate per-epoch ``{phase, time_s, images}`` into per-phase totals and images/s."""
    out: dict[str, dict[str, float]] = {}
    for e in epochs:
        ph = out.setdefault(e["phase"], {"epochs": 0, "time_s": 0.0, "images": 0})
        ph["epochs"] += 1
        ph["time_s"] += float(e["time_s"])
        ph["images"] += int(e["images"])
    for ph in out.values():
        ph["images_s"] = ph["images"] / ph["time_s"] if ph["time_s"] > 0 else float("nan")
    return out


def _run_info(run: peer.TimedRun) -> dict[str, Any]:
    return {
        "command": shlex.join(run.cmd),
        "returncode": run.returncode,
        "wall_s": run.wall_s,
        "peak_rss_mb": run.peak_rss_mb,
        "rss_method": run.rss_method,
        "cpu_user_s": run.extra.get("user_s"),
        "cpu_sys_s": run.extra.get("sys_s"),
        "log": str(run.log_path),
    }


# ----------------------------------------------------------------------------- the tools
def run_peer_tool(args: argparse.Namespace, out: Path, star: Path, D: int, apix: float) -> None:
    """Run ``parse_ctf_star`` + ``abinit``; store the run facts in ``OUT/peer.run.json``."""
    pdir = out / "peer"
    pdir.mkdir(parents=True, exist_ok=True)
    _log("peer: parse_ctf_star")
    ctf = peer.run_parse_ctf_star(
        args.peer_venv, star, pdir / "ctf.pkl", D, apix, pdir / "parse_ctf_star.log"
    )
    extra = ["--n-imgs-pretrain", str(args.peer_pretrain)]
    if not args.peer_radii:
        r = search_radii(D)
        extra += ["--l-start", str(int(r["radius_start_px"]))]
        extra += ["--l-end", str(int(r["radius_search_px"]))]
        extra += ["--t-extent", str(r["t_extent_px"])]
    extra += shlex.split(args.peer_args)
    _log(f"peer: abinit ({args.hps_epochs} HPS + {args.sgd_epochs} SGD epochs)")
    run = peer.run_abinit(
        args.peer_venv, star, pdir / "ctf.pkl", pdir / "out", args.zdim, args.hps_epochs,
        args.sgd_epochs, args.threads, args.seed, pdir / "abinit.log", args.timeout, extra,
    )  # fmt: skip
    info = {"parse_ctf_star": _run_info(ctf), "train": _run_info(run)}
    _write_json(out / "peer.run.json", info)
    if run.returncode != 0:
        why = "timed out" if run.returncode == 124 else f"rc {run.returncode}"
        raise BenchmarkError(f"peer abinit {why} (log {run.log_path}):\n{run.tail()}")
    _log(f"peer: done in {run.wall_s:.1f} s, peak RSS {run.peak_rss_mb:.0f} MB")


def run_ours_tool(
    args: argparse.Namespace, out: Path, star: Path, invert: bool, n: int, D: int
) -> None:
    """Run ``cryofield train``; store the run facts in ``OUT/cryofield.run.json``."""
    import shutil

    cdir = out / "cryofield"
    cdir.mkdir(parents=True, exist_ok=True)
    rundir = cdir / "out"
    if rundir.exists():
        shutil.rmtree(rundir)
    device = _resolve_device(args.device)
    cmd = [sys.executable, "-m", "cryofield.cli.main", "train", str(star), "-o", str(rundir)]
    cmd += ["--zdim", str(args.zdim), "--epochs", str(args.hps_epochs + args.sgd_epochs)]
    cmd += ["--hps-images", str(args.hps_epochs * n), "--seed", str(args.seed)]
    cmd += ["--threads", str(args.threads), "--device", device]
    if not args.peer_radii:
        r = search_radii(D)
        cmd += ["--radius-start", str(r["radius_start_px"])]
        cmd += ["--radius-search", str(r["radius_search_px"])]
        cmd += ["--t-extent", str(r["t_extent_px"])]
    if invert:
        cmd.append("--invert")  # light-on-dark stack; the peer inverts by default too
    cmd += shlex.split(args.ours_args)
    env = peer.peer_env(args.threads)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    _log(f"cryofield: train ({args.hps_epochs} HPS + {args.sgd_epochs} SGD epochs, {device})")
    run = peer.run_timed(cmd, cdir / "train.log", args.timeout, env=env)
    _write_json(out / "cryofield.run.json", {"train": {**_run_info(run), "device": device}})
    if run.returncode != 0:
        why = "timed out" if run.returncode == 124 else f"rc {run.returncode}"
        raise BenchmarkError(f"cryofield train {why} (log {run.log_path}):\n{run.tail()}")
    _log(f"cryofield: done in {run.wall_s:.1f} s, peak RSS {run.peak_rss_mb:.0f} MB")


# ----------------------------------------------------------------------------- scoring
def score(
    R: np.ndarray,
    shift_px: np.ndarray | None,
    vol: np.ndarray | None,
    truth: dict[str, np.ndarray],
    true_map: np.ndarray | None,
    apix_A: float,
) -> dict[str, Any]:
    """Pose errors and map FSC of one tool against the truth (same code for both tools).

    Parameters
    ----------
    R : (N, 3, 3) predicted rotations (our convention, RELION's ``A``).
    shift_px : (N, 2) predicted displacements in dataset px, or None.
    vol : (D, D, D) predicted map or None.
    truth : contents of ``truth.npz``.
    true_map : (D, D, D) true map or None.
    apix_A : pixel size of the maps.
    """
    import torch

    from cryofield.analysis import metrics
    from cryofield.physics.fsc import resolution_at

    R_true = np.asarray(truth["rotations"], np.float64)
    if len(R) != len(R_true):
        raise BenchmarkError(f"{len(R)} predicted poses but {len(R_true)} true ones")
    good = ~np.asarray(truth.get("is_junk", np.zeros(len(R_true), bool)), bool)
    t_true = np.asarray(truth["shifts_px"], np.float64)[good] if "shifts_px" in truth else None
    t_pred = None if shift_px is None or t_true is None else np.asarray(shift_px)[good]
    poses = metrics.pose_errors(R[good], R_true[good], t_pred, t_true)
    # convention check: R^T instead of R should fit much worse if the convention is right
    alt = metrics.pose_errors(np.swapaxes(R[good], -1, -2), R_true[good])
    check = {
        "rot_median_deg_as_is": poses["rot_median_deg"],
        "rot_median_deg_transposed": alt["rot_median_deg"],
    }
    if t_pred is not None and t_true is not None:
        flipped = metrics.pose_errors(R[good], R_true[good], -t_pred, t_true)
        check["trans_median_px_as_is"] = poses["trans_median_px"]
        check["trans_median_px_sign_flipped"] = flipped["trans_median_px"]
    res: dict[str, Any] = {"poses": poses, "convention_check": check}
    if vol is not None and true_map is not None:
        G = np.asarray(poses["R_global"])
        mir = bool(poses["mirrored"])
        hints = [(metrics.MIRROR @ G @ metrics.MIRROR if mir else G, mir)]
        al = metrics.align_volume(np.asarray(vol, np.float32), true_map, hints=hints)
        curve = metrics.fsc_curve(al.aligned, true_map)
        c = torch.as_tensor(curve)
        res["map"] = {
            "mirrored": bool(al.mirrored),
            "correlation": float(al.correlation),
            "fsc_auc": metrics.fsc_auc(curve),
            "res_0.5_A": float(resolution_at(c, 0.5, apix_A)[1]),
            "res_0.143_A": float(resolution_at(c, 0.143, apix_A)[1]),
            "fsc": [float(v) for v in curve],
        }
    return res


def _true_map(truth_path: Path, truth: dict[str, np.ndarray]) -> np.ndarray | None:
    from cryofield.io.mrc import read_mrc

    paths = [str(p) for p in np.atleast_1d(truth.get("volume_paths", np.array([])))]
    if len(paths) != 1:
        _log(f"{len(paths)} true volumes: maps are scored only for homogeneous data")
        return None
    return np.array(read_mrc(truth_path.parent / paths[0])[0], np.float32)


def _read_map(path: Path, D: int) -> np.ndarray:
    from cryofield.io.mrc import read_mrc

    vol = np.array(read_mrc(path)[0], np.float32)
    if vol.shape != (D, D, D):
        raise BenchmarkError(f"{path}: map shape {vol.shape}, expected {(D, D, D)}")
    return vol


def collect_peer(
    args: argparse.Namespace, out: Path, truth: dict, true_map: np.ndarray | None
) -> dict[str, Any]:
    """Timings and scores of the peer's run in ``OUT/peer``."""
    info = json.loads((out / "peer.run.json").read_text())
    odir = out / "peer" / "out"
    n, D, apix = len(truth["rotations"]), int(truth["D"]), float(truth["apix_A"])
    eps = peer.parse_peer_log(odir / "run.log")
    if not eps:
        raise BenchmarkError(f"{odir / 'run.log'}: no finished epoch found")
    rows = []
    for e in eps:
        images = min(n, args.peer_pretrain) if e.phase == "pretrain" else n
        rows.append({"epoch": e.epoch, "phase": e.phase, "time_s": e.time_s, "images": images,
                     "loss": e.loss})  # fmt: skip
    ep = peer.last_peer_epoch(odir)
    R, shift = peer.read_peer_poses(odir, ep)
    vol = _read_map(peer.peer_volume_path(odir, ep), D)
    res = {
        "tool": f"cryodrgn abinit {_peer_version(args.peer_venv)}",
        **info["train"],
        "parse_ctf_star_s": info["parse_ctf_star"]["wall_s"],
        "epochs": rows,
        "phases": _phases(rows),
        "overhead_s": info["train"]["wall_s"] - sum(r["time_s"] for r in rows),
        "epoch_scored": ep,
        **score(R, shift, vol, truth, true_map, apix),
    }
    return res


def collect_ours(
    args: argparse.Namespace, out: Path, truth: dict, true_map: np.ndarray | None
) -> dict[str, Any]:
    """Timings and scores of our run in ``OUT/cryofield``."""
    from cryofield.inference.rundir import RunDir

    info = json.loads((out / "cryofield.run.json").read_text())
    run = RunDir(out / "cryofield" / "out")
    n, D = len(truth["rotations"]), int(truth["D"])
    apix = float(truth["apix_A"])
    rows = [
        {
            "epoch": m["epoch"],
            "phase": m["phase"],
            "time_s": m["time_s"],
            "images": n,
            "loss": m["loss"],
        }
        for m in run.metrics()
    ]
    ep = run.last_complete_epoch()
    if ep is None:
        raise BenchmarkError(f"{run.path}: no complete epoch")
    poses = run.poses(ep)
    index = np.asarray(poses["particle_index"], np.int64)
    if len(index) != n or np.any(index != np.arange(n)):
        raise BenchmarkError(f"{run.path}: poses do not cover all {n} particles in order")
    R = np.asarray(poses["rotations"], np.float64)
    shift = np.asarray(poses["shifts_A"], np.float64) / apix if "shifts_A" in poses else None
    vpath = run.volume_path(ep)
    vol = None
    if vpath is not None:
        vol = _read_map(vpath, D)
    elif args.zdim == 0:
        raise BenchmarkError(f"{run.path}: epoch {ep} has no volume.mrc")
    import cryofield

    return {
        "tool": f"cryofield train {getattr(cryofield, '__version__', '?')}",
        **info["train"],
        "epochs": rows,
        "phases": _phases(rows),
        "overhead_s": info["train"]["wall_s"] - sum(r["time_s"] for r in rows),
        "epoch_scored": ep,
        **score(R, shift, vol, truth, true_map, apix),
    }


# ----------------------------------------------------------------------------- conventions
def check_conventions(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Pin the peer's pose convention empirically: SGD from the TRUE poses, three ways.

    A small high-SNR dataset (``OUT/convcheck``) is reconstructed by ``cryodrgn abinit
    --load-poses`` with no pose search (``--epochs-pose-search 0``, no pretraining), from
    the true poses written as (a) our reading of its convention (``R``, ``trans =
    -shift_px``), (b) ``R`` transposed, (c) the shift sign flipped. Only the right
    convention gives a map that matches the true map WITHOUT any alignment (which also
    pins the axis order of ``reconstruct.N.mrc``) and poses that stay at the truth.
    """
    from cryofield.analysis import metrics
    from cryofield.analysis.evaluate import load_truth
    from cryofield.io.mrc import read_mrc
    from cryofield.simulate.dataset import preset_config, simulate_dataset

    cdir = out / "convcheck"
    data = cdir / "data"
    if not (data / "truth.npz").is_file():
        cfg = preset_config("demo-homo", n_particles=500, D=32, apix_A=10.0, snr=1.0, seed=7)
        simulate_dataset(cfg, data)
    truth = load_truth(data / "truth.npz")
    D = int(truth["D"])
    true_map = np.array(read_mrc(data / str(truth["volume_paths"][0]))[0], np.float32)
    R, t = np.asarray(truth["rotations"]), np.asarray(truth["shifts_px"])
    peer.run_parse_ctf_star(
        args.peer_venv, data / "particles.star", cdir / "ctf.pkl", D,
        float(truth["apix_A"]), cdir / "parse_ctf_star.log",
    )  # fmt: skip
    hyps = {
        "as_pinned": (R, t),
        "R_transposed": (np.swapaxes(R, -1, -2), t),
        "shift_sign_flipped": (R, -t),
    }
    res: dict[str, Any] = {"dataset": "N=500, D=32, apix 10 A, SNR 1.0, true poses, 4 epochs"}
    for name, (Rh, th) in hyps.items():
        pkl = peer.write_peer_pose_pkl(cdir / f"{name}.pkl", Rh, th)
        _log(f"convention check: {name}")
        run = peer.run_abinit(
            args.peer_venv, data / "particles.star", cdir / "ctf.pkl", cdir / name, 0, 0, 4,
            args.threads, args.seed, cdir / f"{name}.log", args.timeout,
            ["--load-poses", str(pkl), "--n-imgs-pretrain", "0"],
        )  # fmt: skip
        if run.returncode != 0:
            raise BenchmarkError(f"convention check {name}: rc {run.returncode}\n{run.tail()}")
        ep = peer.last_peer_epoch(cdir / name)
        vol = _read_map(peer.peer_volume_path(cdir / name, ep), D)
        Rp, tp = peer.read_peer_poses(cdir / name, ep)
        direct = metrics.fsc_curve(vol, true_map)
        pe = metrics.pose_errors(Rp, R, tp, t, allow_mirror=False)
        res[name] = {
            "fsc_auc_no_alignment": metrics.fsc_auc(direct),
            "fsc_no_alignment": [round(float(v), 3) for v in direct],
            "final_rot_median_deg_vs_truth": pe["rot_median_deg"],
            "final_trans_median_px_vs_truth": pe["trans_median_px"],
        }
        _log(f"  FSC-AUC without alignment {res[name]['fsc_auc_no_alignment']:.3f}")
    best = max(hyps, key=lambda k: res[k]["fsc_auc_no_alignment"])
    res["best"] = best
    if best != "as_pinned":
        raise BenchmarkError(f"peer convention check: '{best}' fits better than ours: {res}")
    return res


# ----------------------------------------------------------------------------- table
def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, spec)


def _phase_order(phase_dicts: list[dict[str, Any]]) -> list[str]:
    """Phases of all tools, the known ones in schedule order first."""
    seen = {ph for d in phase_dicts for ph in d}
    known = ["pretrain", "hps", "local", "sgd", "fixed"]
    return [ph for ph in known if ph in seen] + sorted(seen - set(known))


def markdown_table(results: dict[str, Any]) -> str:
    """Side-by-side markdown table of the main numbers."""
    tools = [t for t in TOOLS if t in results["tools"]]

    def g(t: str, *keys: str) -> Any:
        v: Any = results["tools"][t]
        for k in keys:
            if not isinstance(v, dict) or k not in v:
                return None
            v = v[k]
        return v

    def status(t: str) -> str:
        r = results["tools"][t]
        if "error" not in r:
            return "ok"
        return "partial: " + r["error"].splitlines()[0] if r.get("partial") else "failed"

    def _phase_cell(ph: str) -> Any:
        return lambda t: (
            _fmt(g(t, "phases", ph, "time_s"), ".1f")
            + " / "
            + _fmt(g(t, "phases", ph, "images_s"), ".1f")
        )

    rows = [
        ("status", status),
        ("wall time, s (all)", lambda t: _fmt(g(t, "wall_s"), ".1f")),
        ("peak RSS, MB", lambda t: _fmt(g(t, "peak_rss_mb"), ".0f")),
        ("CPU user time, s", lambda t: _fmt(g(t, "cpu_user_s"), ".1f")),
        *[
            (f"{ph}: s / img/s", _phase_cell(ph))
            for ph in _phase_order([g(t, "phases") or {} for t in tools])
        ],
        ("other (start-up, I/O, maps), s", lambda t: _fmt(g(t, "overhead_s"), ".1f")),
        ("rotation error median / mean, deg",
         lambda t: _fmt(g(t, "poses", "rot_median_deg")) + " / "
         + _fmt(g(t, "poses", "rot_mean_deg"))),
        ("out-of-plane median, deg", lambda t: _fmt(g(t, "poses", "out_of_plane_median_deg"))),
        ("in-plane median, deg", lambda t: _fmt(g(t, "poses", "in_plane_median_deg"))),
        ("shift error median, px", lambda t: _fmt(g(t, "poses", "trans_median_px"))),
        ("mirrored (wrong hand)", lambda t: _fmt(g(t, "poses", "mirrored"))),
        ("map correlation", lambda t: _fmt(g(t, "map", "correlation"), ".3f")),
        ("FSC=0.5 resolution, A", lambda t: _fmt(g(t, "map", "res_0.5_A"), ".1f")),
        ("FSC=0.143 resolution, A", lambda t: _fmt(g(t, "map", "res_0.143_A"), ".1f")),
        ("FSC-AUC", lambda t: _fmt(g(t, "map", "fsc_auc"), ".3f")),
    ]  # fmt: skip
    names = {t: results["tools"][t]["tool"] for t in tools}
    lines = ["| metric | " + " | ".join(names[t] for t in tools) + " |"]
    lines.append("|---|" + "---|" * len(tools))
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(t) for t in tools) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 or raises."""
    args = build_parser().parse_args(argv)
    if args.hps_epochs < 1 or args.sgd_epochs < 0:
        raise BenchmarkError("need --hps-epochs >= 1 and --sgd-epochs >= 0")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_tools = [t for t in TOOLS if t not in args.skip]
    if "peer" in run_tools:
        peer.peer_binary(args.peer_venv)  # fail early if the peer is missing
    from cryofield.analysis.evaluate import load_truth

    truth_path = simulate(args, out / "data")
    truth = load_truth(truth_path)
    n, D, apix = len(truth["rotations"]), int(truth["D"]), float(truth["apix_A"])
    star = out / "data" / "particles.star"
    invert = bool(truth.get("invert", np.bool_(True)))
    failures: dict[str, str] = {}
    load_start = os.getloadavg()
    convention = None
    if args.check_conventions:
        convention = check_conventions(args, out)
    if not args.rescore:
        # ours first: a slow peer that hits --timeout then cannot cost us our numbers
        for tool in ("cryofield", "peer"):
            if tool not in run_tools:
                continue
            try:
                if tool == "peer":
                    run_peer_tool(args, out, star, D, apix)
                else:
                    run_ours_tool(args, out, star, invert, n, D)
            except BenchmarkError as err:
                failures[tool] = str(err)
                _log(f"ERROR {tool}: {err}")
    true_map = _true_map(truth_path, truth)
    results: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {
            "machine": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_1_5_15_start": list(load_start),
            "loadavg_1_5_15_end": list(os.getloadavg()),
        },
        "dataset": {
            "path": str(out / "data"),
            "n_particles": n,
            "D": D,
            "apix_A": apix,
            "snr": float(truth["snr"]) if "snr" in truth else None,
            "contrast": str(truth.get("contrast", "?")),
            "n_junk": int(np.asarray(truth.get("is_junk", np.zeros(n, bool))).sum()),
        },
        "budget": {
            "zdim": args.zdim,
            "hps_epochs": args.hps_epochs,
            "sgd_epochs": args.sgd_epochs,
            "peer_pretrain_images": min(n, args.peer_pretrain),
            "threads": args.threads,
            "seed": args.seed,
            "cryofield_device": _resolve_device(args.device),
            "search": "peer defaults" if args.peer_radii else search_radii(D),
        },
        "conventions": {
            "peer_rotations": "pose.N.pkl rots used as-is (RELION matrix A, coords @ R)",
            "peer_shifts": "pose.N.pkl trans in training px; shift_px = -trans",
            "peer_map": "reconstruct.N.mrc of the last epoch",
            "cryofield_map": "epoch_NNN/volume.mrc of the last complete epoch",
        },
        "tools": {},
    }
    if convention is not None:
        results["convention_check_true_poses"] = convention
    for tool, fn in (("peer", collect_peer), ("cryofield", collect_ours)):
        if tool in run_tools:
            _log(f"scoring {tool}")
            try:
                res = fn(args, out, truth, true_map)
            except (BenchmarkError, CryofieldError, OSError, KeyError, ValueError) as err:
                failures.setdefault(tool, f"scoring failed: {type(err).__name__}: {err}")
                results["tools"][tool] = {"tool": tool, "error": failures[tool]}
                _log(f"ERROR {tool}: {failures[tool]}")
                continue
            if tool in failures:  # e.g. timed out: the last epoch it wrote was scored
                res.update(partial=True, error=failures[tool])
            results["tools"][tool] = res
            cc = res["convention_check"]
            if cc["rot_median_deg_transposed"] < 0.5 * cc["rot_median_deg_as_is"]:
                _log(f"WARNING {tool}: transposed rotations fit the truth better: {cc}")
    table = markdown_table(results)
    _write_json(out / "results.json", results)
    from cryofield.io.atomic import write_text_atomic

    head = (
        f"N={n}, D={D}, apix={apix} A, SNR={results['dataset']['snr']}, zdim={args.zdim}, "
        f"{args.hps_epochs} HPS + {args.sgd_epochs} SGD epochs, {args.threads} threads\n\n"
    )
    write_text_atomic(out / "results.md", head + table + "\n")
    print(head + table, flush=True)
    _log(f"wrote {out / 'results.json'}")
    if failures:
        raise BenchmarkError("; ".join(f"{t}: {m.splitlines()[0]}" for t, m in failures.items()))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as err:
        print(f"bench_peer: error: {err}", file=sys.stderr)
        sys.exit(1)
