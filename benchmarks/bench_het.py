"""Heterogeneity benchmark: latent recovery at the information limit, default command.

Each cell simulates a heterogeneous dataset (cryofield.simulate; reused when its
truth.npz exists) and runs the default command with ``--zdim 8`` as a subprocess, in one
or both modes:

    known      cryofield train particles.star -o run --zdim 8 --poses-from-file
    abinitio   cryofield train particles.star -o run --zdim 8

then scores the last epoch with ``cryofield.analysis.evaluate.evaluate_run`` (what
``cryofield evaluate`` writes): for discrete states the ARI of k-means on z (k = number
of states) beside the state ceiling (every image assigned to the true map that explains
it best at its true pose and CTF: what the data hold) and their gap; for continuous
motions the best |Spearman| of the first principal components of z against the true
coordinate and that of the main path of z (the 1-D Isomap coordinate of ``analyze``'s
``path/`` maps, which follows a curve that PC1 folds back on); ab initio also the median
out-of-plane pose error.

The base is the built-in two-domain object at D=64, 5 A/px, N=6000, SNR 0.1. Cells:

  dom0.90, dom0.93, dom0.97   two states 50/50: the built-in object without and with a
                              small bound domain whose density is scaled so that the two
                              maps correlate at 0.90 / 0.93 / 0.97 (Pearson, full box)
  dom0.93_snr0.05, _snr0.3    dom0.93 at SNR 0.05 / 0.3
  dom0.93_pop10               dom0.93 with populations 90 / 10 %
  pop10_30_60                 three built-in states (arm closed / open / absent), 10/30/60 %
  cont1.0, cont0.3            the built-in hinge motion (40 frames) over its full swing
                              (75 deg) and over 30 % of it

Targets: ARI within 0.05 of the ceiling where the ceiling is >= 0.9; |Spearman| >= 0.95
(the better of the PCs and the main path: the two read-outs of ``analyze``).

Writes OUT/CELL/{data/, MODE/run/, MODE/train.log, MODE/result.json} and OUT/bench_het.json
and .md. Finished cells are reused (--rescore scores them again).

examples:
  python benchmarks/bench_het.py -o het_out --cells dom0.93 cont1.0 --modes known
  python benchmarks/bench_het.py -o het_out --grid full --modes known abinitio --threads 16
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_robust import _meta  # the benchmarks share their run metadata

BASE: dict[str, Any] = dict(n_particles=6000, D=64, apix_A=5.0, snr=0.1)
CELLS: dict[str, dict[str, Any]] = {
    "dom0.90": {"corr": 0.90},
    "dom0.93": {"corr": 0.93},
    "dom0.97": {"corr": 0.97},
    "dom0.93_snr0.05": {"corr": 0.93, "snr": 0.05},
    "dom0.93_snr0.3": {"corr": 0.93, "snr": 0.3},
    "dom0.93_pop10": {"corr": 0.93, "weights": [0.9, 0.1]},
    "pop10_30_60": {"source": "states", "n_states": 3, "weights": [0.1, 0.3, 0.6]},
    "cont1.0": {"source": "continuous", "motion_amplitude": 1.0},
    "cont0.3": {"source": "continuous", "motion_amplitude": 0.3},
}
GRIDS = {
    "small": ["dom0.93", "dom0.93_snr0.05", "cont1.0"],
    "full": list(CELLS),
}
MODES = {"known": ["--poses-from-file"], "abinitio": []}
ARI_GAP, SPEARMAN = 0.05, 0.95


def domain_maps(D: int, corr: float) -> tuple[np.ndarray, np.ndarray, float]:
    """The built-in object without (state 0) and with its extra domain (state 3), the
    domain's density scaled by the factor that makes the maps correlate at ``corr``
    (bisection: the correlation falls as the factor grows). Returns both maps and the
    correlation reached."""
    from cryofield.simulate.volumes import discrete_states

    states = discrete_states(D, 4)
    base, dom = states[0].astype(np.float64), (states[3] - states[0]).astype(np.float64)

    def c(a: float) -> float:
        return float(np.corrcoef(base.ravel(), (base + a * dom).ravel())[0, 1])

    lo, hi = 0.0, 1.0
    while c(hi) > corr:
        hi *= 2.0
        if hi > 1e3:
            raise ValueError(f"cannot reach correlation {corr}")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if c(mid) > corr else (lo, mid)
    a = (lo + hi) / 2
    return base.astype(np.float32), (base + a * dom).astype(np.float32), c(a)


def simulate(name: str, args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """Simulate cell ``name`` into ``data`` (unless its truth.npz exists)."""
    from cryofield.io.mrc import write_mrc
    from cryofield.simulate.config import SimulationConfig
    from cryofield.simulate.dataset import simulate_dataset

    info_path = data / "cell.json"
    if (data / "truth.npz").is_file() and info_path.is_file():
        return json.loads(info_path.read_text())
    spec = {**BASE, **CELLS[name], "seed": args.seed}
    if args.n:
        spec["n_particles"] = args.n
    if args.D:
        spec.update(D=args.D, apix_A=BASE["apix_A"] * BASE["D"] / args.D)
    corr = spec.pop("corr", None)
    data.mkdir(parents=True, exist_ok=True)
    if corr is not None:
        a, b, reached = domain_maps(spec["D"], corr)
        maps = data / "input_maps"
        maps.mkdir(exist_ok=True)
        paths = [str(write_mrc(maps / f"state_{i}.mrc", v, spec["apix_A"]).resolve())
                 for i, v in enumerate((a, b))]  # fmt: skip
        spec.update(source="volumes", volume_paths=paths, map_corr=reached)
    map_corr = spec.pop("map_corr", None)
    simulate_dataset(SimulationConfig(**spec), data)
    spec["map_corr"] = map_corr
    info_path.write_text(json.dumps(spec, indent=1))
    return spec


def train(mode_dir: Path, data: Path, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """The default command with ``--zdim 8`` (and the mode's flags) as a child process."""
    from cryofield.inference.rundir import RunDir

    run = mode_dir / "run"
    exe = Path(sys.executable).with_name("cryofield")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "cryofield"]
    if (run / "config.yaml").is_file() and RunDir(run).last_complete_epoch() is not None:
        cmd += ["train", "--resume", str(run)]
    else:
        cmd += ["train", str(data / "particles.star"), "-o", str(run), "--zdim", "8"]
        cmd += [*MODES[mode], "--threads", str(args.threads)]
    print(f"  $ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    mode_dir.mkdir(parents=True, exist_ok=True)
    with open(mode_dir / "train.log", "ab") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    return {"command": shlex.join(cmd), "returncode": os.waitstatus_to_exitcode(status),
            "wall_s": time.perf_counter() - t0,
            "peak_rss_mb": usage.ru_maxrss / 1024.0}  # fmt: skip


def score(run: Path, data: Path) -> dict[str, Any]:
    """ARI / ceiling / gap or |Spearman|, pose error, from ``evaluate_run``."""
    from cryofield.analysis.evaluate import evaluate_run

    ev = evaluate_run(run, data / "truth.npz")
    out: dict[str, Any] = {}
    c = ev.get("clustering")
    if c is not None:
        out.update(ari=c["ari"], ceiling_ari=c.get("ceiling_ari"), ari_gap=c.get("ari_gap"))
    rho = ev.get("latent_vs_coord_spearman")
    if rho is not None:
        out["spearman_abs"] = float(max(abs(r) for r in rho))
        out["spearman_ceiling"] = ev.get("latent_vs_coord_ceiling")
        path = ev.get("latent_path_spearman")
        out["spearman_path_abs"] = None if path is None else abs(float(path))
    poses = ev.get("poses") or {}
    out["oop_median_deg"] = poses.get("out_of_plane_median_deg")
    return out


def check(r: dict[str, Any]) -> bool | None:
    """Whether the cell meets its target (None: no target applies)."""
    if r.get("spearman_abs") is not None:
        return max(r["spearman_abs"], r.get("spearman_path_abs") or 0.0) >= SPEARMAN
    if r.get("ceiling_ari") is not None and r["ceiling_ari"] >= 0.9:
        return r["ceiling_ari"] - r["ari"] <= ARI_GAP
    return None


def run_cell(name: str, mode: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    tag = f"@n{args.n}" if args.n else ""
    cell_dir = out / f"{name}{tag}"
    mode_dir = cell_dir / mode
    result_path = mode_dir / "result.json"
    if result_path.is_file() and not args.rescore:
        return json.loads(result_path.read_text())
    print(f"[{name}{tag} {mode}] simulate", file=sys.stderr, flush=True)
    sim = simulate(name, args, cell_dir / "data")
    train_path = mode_dir / "train.json"
    tr = json.loads(train_path.read_text()) if train_path.is_file() else None
    if tr is None:
        tr = train(mode_dir, cell_dir / "data", mode, args)
    r = {"cell": f"{name}{tag}", "mode": mode, "N": sim["n_particles"], "D": sim["D"],
         "snr": sim["snr"], "weights": sim.get("weights"), "map_corr": sim.get("map_corr"),
         **tr, **_meta()}  # fmt: skip
    if tr["returncode"] != 0:
        r["error"] = f"train exited with {tr['returncode']}; see {mode_dir / 'train.log'}"
        return r
    train_path.write_text(json.dumps(tr, indent=1))
    print(f"[{name}{tag} {mode}] score", file=sys.stderr, flush=True)
    r.update(score(mode_dir / "run", cell_dir / "data"))
    r["pass"] = check(r)
    result_path.write_text(json.dumps(r, indent=1, default=float))
    return r


def _f(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def table(results: list[dict[str, Any]]) -> str:
    head = ["cell", "mode", "N", "SNR", "map corr", "ARI", "ceiling", "gap", "|Spearman|",
            "path", "ceiling", "oop med °", "wall min", "target"]  # fmt: skip
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['cell']} | {r['mode']} | {r['N']} | {r['snr']} | {r['error']} |")
            continue
        ok = {True: "PASS", False: "FAIL", None: "n/a"}[r["pass"]]
        rows.append("| " + " | ".join([
            r["cell"], r["mode"], str(r["N"]), str(r["snr"]), _f(r.get("map_corr")),
            _f(r.get("ari")), _f(r.get("ceiling_ari")), _f(r.get("ari_gap")),
            _f(r.get("spearman_abs")), _f(r.get("spearman_path_abs")),
            _f(r.get("spearman_ceiling")),
            _f(r.get("oop_median_deg"), ".2f"),
            f"{r['wall_s'] / 60:.1f}", ok,
        ]) + " |")  # fmt: skip
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-o", "--out", default="bench_het_out", help="output folder")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--cells", nargs="+", choices=list(CELLS), metavar="CELL",
                     help=f"cells: {', '.join(CELLS)}")  # fmt: skip
    sel.add_argument("--grid", choices=list(GRIDS), default="small",
                     help="small: " + ", ".join(GRIDS["small"]) + "; full: all cells")  # fmt: skip
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=["known"],
                   help="known (--poses-from-file) and/or abinitio (default: known)")  # fmt: skip
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="cryofield --threads")
    p.add_argument("--seed", type=int, default=0, help="simulation seed")
    p.add_argument("--rescore", action="store_true", help="score finished runs again")
    # smaller cells (CELL@nN folders): tests, and machines where N=6000 is too slow
    p.add_argument("--n", type=int, default=None, help="particles per cell (default 6000)")
    p.add_argument("--D", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.cells or GRIDS[args.grid]:
        for mode in args.modes:
            results.append(run_cell(name, mode, args, out))
            (out / "bench_het.json").write_text(json.dumps(results, indent=1, default=float))
    md = table(results)
    (out / "bench_het.md").write_text(md + "\n")
    print(md)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
