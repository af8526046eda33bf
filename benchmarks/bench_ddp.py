"""Data-parallel scaling of ``cryofield train`` (torchrun): 1 rank against R ranks.

Simulates one homogeneous dataset (built-in protein, D, N, SNR 0.1; reused when it
exists), then runs the same command with 1 process and with ``torchrun
--nproc-per-node R`` (gloo on CPU with one torch thread per rank, or NCCL with one GPU per
rank with --device cuda), each for ``--epochs`` epochs whose first ones are search
epochs, and reads the images/s of every epoch from metrics.jsonl. Scaling efficiency of
a phase = (images/s with R ranks) / (R x images/s with 1 rank); the target for the search
phase is >= 0.85 at 2 ranks. The poses of the two runs are compared too (median angle
between them after the same number of epochs).

Writes OUT/bench_ddp.json and OUT/bench_ddp.md and prints the table.

examples:
  python benchmarks/bench_ddp.py -o ddp_out                       # CPU, 2 ranks
  python benchmarks/bench_ddp.py -o ddp_out --device cuda --ranks 2 -D 128 -n 20000
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_robust import _meta  # the benchmarks share their run metadata


def simulate(out: Path, args: argparse.Namespace) -> Path:
    from cryofield.simulate.config import preset_config
    from cryofield.simulate.dataset import simulate_dataset

    data = out / f"data_D{args.D}_n{args.n}"
    if not (data / "truth.npz").is_file():
        cfg = preset_config("demo-homo", n_particles=args.n, D=args.D, snr=0.1, seed=args.seed)
        simulate_dataset(cfg, data)
    return data


def run(data: Path, out: Path, ranks: int, args: argparse.Namespace) -> dict[str, Any]:
    from cryofield.inference.rundir import RunDir

    run_dir = out / f"run_{ranks}r"
    if (run_dir / "metrics.jsonl").is_file() and RunDir(run_dir).epochs()[-1:] == [args.epochs]:
        print(f"[{ranks} rank(s)] reused {run_dir}", file=sys.stderr)
        wall = json.loads((run_dir / "bench_wall.json").read_text())["wall_s"]
    else:
        cmd = ["train", str(data / "particles.star"), "-o", str(run_dir),
               "--epochs", str(args.epochs), "--device", args.device]  # fmt: skip
        if args.device == "cpu":
            cmd += ["--threads", "1"]
        launch = [sys.executable, "-m", "cryofield"]
        if ranks > 1:
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      f"--nproc-per-node={ranks}", "-m", "cryofield"]  # fmt: skip
        print(f"  $ {shlex.join(launch + cmd)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with open(out / f"train_{ranks}r.log", "wb") as log:
            subprocess.run(launch + cmd, stdout=log, stderr=subprocess.STDOUT, check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        wall = time.perf_counter() - t0
        (run_dir / "bench_wall.json").write_text(json.dumps({"wall_s": wall}))
    metrics = RunDir(run_dir).metrics()
    return {"ranks": ranks, "wall_s": wall, "run": str(run_dir),
            "epochs": [{k: m[k] for k in ("epoch", "phase", "images_s", "time_s")}
                       for m in metrics]}  # fmt: skip


def summarise(one: dict[str, Any], many: dict[str, Any]) -> dict[str, Any]:
    """Efficiency per phase (mean images/s over that phase's epochs)."""
    from cryofield.inference.rundir import RunDir

    out: dict[str, Any] = {}
    for phase in dict.fromkeys(e["phase"] for e in one["epochs"]):
        a = [e["images_s"] for e in one["epochs"] if e["phase"] == phase]
        b = [e["images_s"] for e in many["epochs"] if e["phase"] == phase]
        if a and b:
            r = many["ranks"]
            out[phase] = {"images_s_1": float(np.mean(a)), f"images_s_{r}": float(np.mean(b)),
                          "efficiency": float(np.mean(b) / (r * np.mean(a)))}  # fmt: skip
    from cryofield.analysis.metrics import align_rotations

    Ra = RunDir(one["run"]).poses()["rotations"]
    Rb = RunDir(many["run"]).poses()["rotations"]
    # ab initio runs agree up to a global rotation (and hand): compare after aligning them
    _, _, Rb_al = align_rotations(Rb, Ra)
    cos = np.clip((np.einsum("nij,nij->n", Ra, Rb_al) - 1) / 2, -1, 1)
    out["pose_diff_median_deg"] = float(np.degrees(np.median(np.arccos(cos))))
    data = Path(one["run"]).parent.glob("data_*/truth.npz")
    truth = next(iter(data), None)
    if truth is not None:  # and each against the truth
        t = np.load(truth)
        for key, run in (("1", one), (str(many["ranks"]), many)):
            p = RunDir(run["run"]).poses()
            Rt = t["rotations"][p["particle_index"]]
            _, _, R_al = align_rotations(p["rotations"], Rt)
            c = np.clip((np.einsum("nij,nij->n", Rt, R_al) - 1) / 2, -1, 1)
            out[f"rot_error_median_deg_{key}"] = float(np.degrees(np.median(np.arccos(c))))
    return out


def table(res: dict[str, Any]) -> str:
    r = res["ranks"]
    rows = [f"| phase | 1 rank img/s | {r} ranks img/s | efficiency |", "|---|---|---|---|"]
    for phase, v in res["phases"].items():
        if isinstance(v, dict):
            rows.append(f"| {phase} | {v['images_s_1']:.1f} | {v[f'images_s_{r}']:.1f} | "
                        f"{v['efficiency']:.2f} |")  # fmt: skip
    rows.append(f"| wall (s) | {res['runs'][0]['wall_s']:.0f} | {res['runs'][1]['wall_s']:.0f} | "
                f"{res['runs'][0]['wall_s'] / res['runs'][1]['wall_s'] / r:.2f} |")  # fmt: skip
    ph = res["phases"]
    rows.append(f"\nmedian pose difference between the runs (globally aligned): "
                f"{ph['pose_diff_median_deg']:.3f} deg; median rotation error vs truth: "
                f"{ph.get('rot_error_median_deg_1', np.nan):.2f} deg (1 rank), "
                f"{ph.get(f'rot_error_median_deg_{r}', np.nan):.2f} deg ({r} ranks)")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-o", "--out", default="bench_ddp_out")
    p.add_argument("-D", type=int, default=32, help="box (px)")
    p.add_argument("-n", type=int, default=2000, help="particles")
    p.add_argument("--epochs", type=int, default=3, help="epochs of each run")
    p.add_argument("--ranks", type=int, default=2, help="processes of the parallel run")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = simulate(out, args)
    runs = [run(data, out, 1, args), run(data, out, args.ranks, args)]
    res = {"D": args.D, "N": args.n, "ranks": args.ranks, "device": args.device, "runs": runs,
           "phases": summarise(*runs), **_meta()}  # fmt: skip
    (out / "bench_ddp.json").write_text(json.dumps(res, indent=1))
    md = table(res)
    (out / "bench_ddp.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
