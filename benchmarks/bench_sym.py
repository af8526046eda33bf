"""Point-group symmetry ab initio with the default command (issue #23).

For each group (C4, D7, O by default):

1. **A symmetric test map.** The built-in protein (``simulate.volumes.protein_like``, its
   pseudo-atoms centred on the box centre) averaged over the group's operators in RELION's
   axes (``physics.symmetry.symmetry_operators``): the map of the pseudo-atoms ``g a``
   (every operator ``g``, every atom ``a``, weight ``1 / |G|``), i.e. the exact group
   average of the continuous density, rendered at ``D``; the symmetry axes pass through
   voxel ``D // 2``. The map is checked: its correlation with every rotation by an
   operator (``analysis.align.rotate_volume``, ``W(p) = V(g^T p)``) must exceed 0.99
   (:func:`check_symmetric`; trilinear resampling of the 7-fold keeps D7 at ~0.994). The
   share of its variance that is not radial is reported (``anisotropy``): the larger the
   group, the more the average of a centred monomer tends to a ball (O: ~0.13).
2. ``cryofield simulate --volume sym.mrc -n 2000 -D 32 --apix 8 --snr 0.1 -o data``
   (default CTF, defocus and shifts).
3. ``cryofield train data/particles.star -o run_sym --symmetry G --threads T`` and the same
   without ``--symmetry`` (``run_c1``); both child processes, timed (wall time of the whole
   command; mean ``time_s`` of the search epochs, phase ``hps``, of ``metrics.jsonl``).
4. Scores against ``truth.npz`` *modulo the group* (both runs: the data are symmetric, so
   any of the ``|G|`` equivalent poses ``R_true g`` is right):

   * rotation error mod G: the estimated poses are related to the truth by
     ``R_true^T R_est = g_i A`` (``g_i`` any operator per image, ``A`` one global
     rotation, or with the hand flipped ``(M R_true M)^T R_est = g_i A``, M the z-flip).
     :func:`align_mod_group` finds ``A``: each candidate (64 of the ``Q_i = R_true^T
     R_est``) maps every ``Q_i`` to its equivalent ``g Q_i`` nearest the candidate, the
     best candidate (median angle) is refined by robust rotation averaging
     (``analysis.metrics._robust_mean_rotation``, chordal L1) with the mapping redone each
     round. Per image: ``min_g angle(R_true g, R_est A^T)``; median, mean, fraction within
     10 deg; and the out-of-plane angle (viewing directions) to the same nearest ``R_true
     g``. ``cryofield evaluate`` (``analysis.metrics.pose_errors``) has no symmetry
     argument, so it would count the equivalent poses as errors.
   * ``consensus.mrc`` (and the field's map of the last epoch) against the symmetric true
     map, as ``cryofield evaluate`` scores maps (``analysis.evaluate._map_scores``: rigid
     alignment seeded with the pose alignment, FSC, resolution at FSC = 0.5).
   * the run's verdict (``verdict.json``; the last lines of ``run.log``).
   * pose stability of the last search epoch, as the verdict measures it (C1: the search
     runs without the symmetry) and modulo the map's symmetry in the search's frame
     (``A^T G A`` with ``A`` the global rotation of that epoch's poses onto the truth):
     the share of images whose pose moved more than the 15 deg step only because it
     jumped to a symmetry-equivalent orientation (rotation only: a jump also moves the
     shift when the C1 map is off-centre).
   * ``sym`` runs, :func:`alignment_diagnosis`: at the last search epoch (before
     ``Trainer.align_symmetry``), the poses' error mod G, how far the C1 map's origin is
     from the symmetry centre, and whether ``physics.symmetry.symmetry_alignment`` on the
     back-projection at those poses finds the group's axes (``axes_error_deg``: 0 when
     the rotation it returns maps the true axes onto RELION's), as is and re-centred
     (``symmetry_frame``, rotation and centre, where the library has it; the centre it
     finds is to be compared with ``origin_offset_px``).

Writes OUT/G/{sym.mrc, data/, run_sym/, run_c1/, *.log, *.json}, OUT/bench_sym.json and
OUT/bench_sym.md (the markdown tables, also printed). Finished runs are reused (delete
OUT/G/run_*.json, or pass --rescore to score them again).

examples:
  python benchmarks/bench_sym.py -o sym_out --threads 1
  python benchmarks/bench_sym.py -o sym_out --groups C4 D7 --threads 1
  python benchmarks/bench_sym.py -o sym_out --rescore

Results: benchmarks/README.md, "bench_sym.py" (C4 and D7, 30 Nov 2026).
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

GROUPS = ("C4", "D7", "O")
RUNS = ("sym", "c1")
WITHIN_DEG = 10.0


def _ops(group: str) -> np.ndarray:
    from cryofield.physics.symmetry import symmetry_operators

    return symmetry_operators(group, torch.float64).numpy()


def symmetric_map(group: str, D: int) -> np.ndarray:
    """The built-in protein averaged over ``group`` (module docstring, step 1)."""
    from cryofield.simulate.volumes import _ATOM_SIGMA, _protein_atoms, render_gaussians

    atoms = _protein_atoms(7)  # box fractions, centred on the box centre (protein_like)
    ops = _ops(group)
    pts = np.concatenate([atoms @ g.T for g in ops])  # the atoms g a
    vol = render_gaussians(pts * D, 1.0 / len(ops), _ATOM_SIGMA * D, D)
    return (vol / vol.max()).astype(np.float32)


def check_symmetric(vol: np.ndarray, group: str, min_corr: float = 0.99) -> list[float]:
    """Correlation of ``vol`` with its rotation by every operator; asserts ``> min_corr``."""
    from cryofield.analysis.align import rotate_volume

    ops = torch.as_tensor(_ops(group), dtype=torch.float32)
    rot = rotate_volume(torch.as_tensor(vol), ops).numpy()  # W_g(p) = V(g^T p)
    corr = [float(np.corrcoef(vol.ravel(), w.ravel())[0, 1]) for w in rot]
    assert min(corr) > min_corr, f"{group} map not symmetric: min corr {min(corr):.4f}"
    return corr


def anisotropy(vol: np.ndarray) -> float:
    """Share of the map's variance (about its mean) not explained by its radial profile."""
    D = vol.shape[0]
    c = np.arange(D) - D // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    r = np.rint(np.sqrt(x * x + y * y + z * z)).astype(np.int64).ravel()
    v = np.asarray(vol, np.float64).ravel()
    prof = np.bincount(r, v) / np.bincount(r)
    return float(((v - prof[r]) ** 2).sum() / ((v - v.mean()) ** 2).sum())


# ------------------------------------------------------------------- poses modulo G
def align_mod_group(R_est: np.ndarray, R_true: np.ndarray, ops: np.ndarray) -> dict[str, Any]:
    """Global rotation (and hand) of estimated poses onto the truth, modulo a point group
    (:func:`cryofield.analysis.metrics.align_rotations_mod_group`): ``A``, ``mirrored``,
    and per image the rotation and out-of-plane errors (deg) to the nearest ``R_true g``."""
    from cryofield.analysis.metrics import (
        _geodesic_rad,
        align_rotations_mod_group,
        out_of_plane_error_rad,
    )

    A, mirrored, aligned, near = align_rotations_mod_group(R_est, R_true, ops)
    return {
        "A": A, "mirrored": mirrored,
        "rot_err_deg": np.degrees(_geodesic_rad(aligned, near)),
        "oop_err_deg": np.degrees(out_of_plane_error_rad(aligned, near)),
    }  # fmt: skip


def pose_scores(R_est: np.ndarray, R_true: np.ndarray, group: str) -> dict[str, Any]:
    al = align_mod_group(R_est, R_true, _ops(group))
    e, o = al["rot_err_deg"], al["oop_err_deg"]
    return {
        "group": group, "mirrored": bool(al["mirrored"]), "A": al["A"].tolist(),
        "rot_median_deg": float(np.median(e)), "rot_mean_deg": float(e.mean()),
        "oop_median_deg": float(np.median(o)), "oop_mean_deg": float(o.mean()),
        f"frac_within_{WITHIN_DEG:g}deg": float((e <= WITHIN_DEG).mean()),
    }  # fmt: skip


def _stability_mod_group(run: Any, truth: Any, group: str) -> dict[str, Any] | None:
    """Pose change of the last search epoch, as logged (C1) and modulo the map's group in
    the search frame (``A^T G A``, ``A`` from that epoch's poses against the truth)."""
    from cryofield.inference.diagnostics import pose_change
    from cryofield.physics.symmetry import nearest_equivalent

    hps = [m for m in run.metrics() if m.get("phase") == "hps" and m.get("pose_change")]
    if not hps:
        return None
    last = hps[-1]
    ep = int(last["epoch"])
    try:
        p1, p0 = run.poses(ep), run.poses(ep - 1)
    except Exception:  # the epoch's checkpoint was not kept
        return {"epoch": ep, "logged": last["pose_change"], "mod_group": None}
    idx = np.asarray(p1["particle_index"])
    R_true = np.asarray(truth["rotations"], np.float64)[idx]
    R1 = np.asarray(p1["rotations"], np.float64)
    R0 = np.asarray(p0["rotations"], np.float64)
    al = align_mod_group(R1, R_true, _ops(group))
    ops = _ops(group)
    if al["mirrored"]:
        from cryofield.analysis.metrics import MIRROR

        ops = MIRROR @ ops @ MIRROR
    A = al["A"]
    conj = np.einsum("ji,gjk,kl->gil", A, ops, A)  # A^T g A: the search map's group
    R1n = nearest_equivalent(torch.as_tensor(R1), torch.as_tensor(R0), torch.as_tensor(conj))[0]
    pc = last["pose_change"]
    t0 = p0.get("shifts_px")
    t1 = p1.get("shifts_px")
    mod = pose_change(R0, t0, R1n.numpy(), t1, step_deg=float(pc["step_deg"]),
                      t_step_px=float(pc["t_step_px"]))  # fmt: skip
    c1 = pose_change(R0, t0, R1, t1, step_deg=float(pc["step_deg"]),
                     t_step_px=float(pc["t_step_px"]))  # fmt: skip
    keep = ("frac_moved", "frac_rot_moved", "median_deg")
    return {"epoch": ep, "logged": {k: pc[k] for k in keep if k in pc},
            "c1_recomputed": {k: c1[k] for k in keep},
            "mod_group": {k: mod[k] for k in keep}}  # fmt: skip


def _normalizer_miss_deg(M: np.ndarray, ops: np.ndarray) -> float:
    """How far ``M`` is from the normalizer of the group (``M G M^T = G``): the largest,
    over ``g``, angle from ``M g M^T`` to the nearest operator (0: ``M`` maps the group's
    axes onto its axes, i.e. the symmetry alignment is right)."""
    conj = np.einsum("ij,gjk,lk->gil", M, ops, M)
    tr = np.einsum("aij,bij->ab", conj, ops)  # tr(c^T g)
    return float(np.degrees(np.arccos(np.clip((tr.max(1) - 1) / 2, -1, 1))).max())


def alignment_diagnosis(run: Any, truth: Any, group: str, data: Path) -> dict[str, Any]:
    """What ``Trainer.align_symmetry`` had to work with, at the last search epoch: the
    poses' error modulo G, the 3-D offset of the C1 map's origin from the symmetry centre
    (least squares on the shifts, ``analysis.metrics._translation_errors_px``), and
    whether ``physics.symmetry.symmetry_alignment`` on the back-projection at those
    poses (as the trainer makes it) finds the group's axes: as is, and re-centred on the
    true symmetry centre (the poses' shifts corrected by the fitted offset)."""
    from cryofield.analysis.metrics import MIRROR, _translation_errors_px
    from cryofield.io.metadata import load_particle_table
    from cryofield.io.particles import ParticleSource
    from cryofield.physics import symmetry
    from cryofield.physics.backproject import reconstruct_fourier
    from cryofield.physics.ctf import CTFParams

    symmetry_alignment = symmetry.symmetry_alignment
    frame_fn = getattr(symmetry, "symmetry_frame", None)
    hps = [m["epoch"] for m in run.metrics() if m.get("phase") == "hps"]
    if not hps:
        return {}
    ep = int(hps[-1])
    p = run.poses(ep)
    idx = np.asarray(p["particle_index"])
    R = np.asarray(p["rotations"], np.float64)
    t = np.asarray(p["shifts_px"], np.float64)
    al = pose_scores(R, np.asarray(truth["rotations"], np.float64)[idx], group)
    _, c = _translation_errors_px(R, t, np.asarray(truth["shifts_px"], np.float64)[idx])
    table = load_particle_table(data / "particles.star")
    images = ParticleSource(table)[idx]
    ops = _ops(group)
    if al["mirrored"]:
        ops = MIRROR @ ops @ MIRROR
    cfg = run.config()
    D = run.training_D()
    box = min(D, 32, max(16, 2 * round(float(cfg.get("radius_search_px") or D / 4))))
    out: dict[str, Any] = {"epoch": ep, "rot_median_deg": al["rot_median_deg"],
                           "frac_within_10deg": al[f"frac_within_{WITHIN_DEG:g}deg"],
                           "origin_offset_px": [float(v) for v in c],
                           "origin_offset_norm_px": float(np.linalg.norm(c))}  # fmt: skip
    for name, shifts in (("as_is", t), ("recentred", t - (R[:, :2, :] @ c))):
        vol = reconstruct_fourier(
            images, torch.as_tensor(R, dtype=torch.float32),
            torch.as_tensor(shifts, dtype=torch.float32), CTFParams.from_table(table),
            run.apix_A(),
        )  # fmt: skip
        if frame_fn is None:  # a version that searches the rotation about the box centre
            A, sc = symmetry_alignment(vol, torch.as_tensor(ops), max_D=box)
            centre = None
        else:  # the rotation and the symmetry centre (Trainer.align_symmetry's call)
            fr = frame_fn(vol, torch.as_tensor(ops), max_D=box)
            A, sc, centre = fr.rotation, fr.score, [float(v) for v in fr.centre_px]
        miss = _normalizer_miss_deg(np.asarray(al["A"]) @ A.numpy(), ops)
        out[name] = {"score": float(sc), "axes_error_deg": miss, "centre_px": centre}
    return out


# ------------------------------------------------------------------- running
def _exe() -> list[str]:
    exe = Path(sys.executable).with_name("cryofield")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "cryofield"]


def _child(cmd: list[str], log: Path, threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print(f"  $ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    with open(log, "ab") as fh:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
    return {"command": shlex.join(cmd), "returncode": proc.returncode,
            "wall_s": time.perf_counter() - t0}  # fmt: skip


def prepare(group: str, gdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The symmetric map and its simulated particles (reused when present)."""
    from cryofield.io.mrc import write_mrc

    info_path = gdir / "map.json"
    if info_path.is_file() and (gdir / "data" / "truth.npz").is_file():
        return json.loads(info_path.read_text())
    gdir.mkdir(parents=True, exist_ok=True)
    vol = symmetric_map(group, args.D)
    corr = check_symmetric(vol, group)
    write_mrc(gdir / "sym.mrc", vol, args.apix)
    cmd = [*_exe(), "simulate", "--volume", str(gdir / "sym.mrc"), "-n", str(args.n),
           "-D", str(args.D), "--apix", f"{args.apix:g}", "--snr", f"{args.snr:g}",
           "--seed", str(args.seed), "-o", str(gdir / "data")]  # fmt: skip
    sim = _child(cmd, gdir / "simulate.log", args.threads)
    if sim["returncode"] != 0:
        raise SystemExit(f"simulate failed: see {gdir / 'simulate.log'}")
    info = {"group": group, "order": len(_ops(group)), "min_symmetry_corr": min(corr),
            "anisotropy": anisotropy(vol), "simulate": sim["command"]}  # fmt: skip
    info_path.write_text(json.dumps(info, indent=1))
    return info


def train(group: str, kind: str, gdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    run = gdir / f"run_{kind}"
    cmd = [*_exe(), "train", str(gdir / "data" / "particles.star"), "-o", str(run),
           "--threads", str(args.threads)]  # fmt: skip
    if kind == "sym":
        cmd += ["--symmetry", group]
    cmd += args.train_args
    return _child(cmd, gdir / f"train_{kind}.log", args.threads)


def score(group: str, kind: str, gdir: Path, tr: dict[str, Any]) -> dict[str, Any]:
    from cryofield.analysis.evaluate import _map_scores, _read_map
    from cryofield.analysis.metrics import MIRROR
    from cryofield.inference.rundir import RunDir
    from cryofield.io.mrc import read_mrc

    run = RunDir(gdir / f"run_{kind}")
    truth = np.load(gdir / "data" / "truth.npz")
    poses = run.poses()
    idx = np.asarray(poses["particle_index"])
    R_true = np.asarray(truth["rotations"], np.float64)[idx]
    ps = pose_scores(np.asarray(poses["rotations"]), R_true, group)
    metrics = run.metrics()
    hps = [m["time_s"] for m in metrics if m.get("phase") == "hps"]
    D, apix = run.training_D(), run.apix_A()
    true_map = _read_map(gdir / "data" / str(truth["volume_paths"][0]), D, apix)
    # the pose alignment predicts the map alignment (as in `cryofield evaluate`)
    A, mir = np.asarray(ps["A"]), ps["mirrored"]
    hints = [(MIRROR @ A @ MIRROR if mir else A, mir)]
    maps = {}
    for name, path in (("consensus", run.path / "consensus.mrc"), ("field", run.volume_path())):
        if path is not None and Path(path).is_file():
            vol = np.asarray(read_mrc(path, mmap=False)[0], np.float32)
            m = _map_scores(vol, true_map, apix, hints)
            maps[name] = {k: m[k] for k in ("res_0.5_A", "res_0.143_A", "correlation",
                                            "mirrored", "negated")}  # fmt: skip
    vpath = run.path / "verdict.json"
    verdict = json.loads(vpath.read_text()) if vpath.is_file() else None
    log_path = run.path / "run.log"
    log = log_path.read_text().splitlines() if log_path.is_file() else []
    sym_lines = [ln for ln in log if "symmetry" in ln and "imposed" in ln]
    return {
        "group": group, "run": kind, **tr,
        "epochs": len(metrics), "search_epochs": len(hps),
        "search_epoch_mean_s": float(np.mean(hps)) if hps else None,
        "phases": [m.get("phase") for m in metrics],
        "poses": ps, "maps": maps,
        "converged": None if verdict is None else verdict["converged"],
        "verdict_headline": None if verdict is None else verdict["headline"],
        "verdict_reasons": None if verdict is None else verdict["reasons"],
        "run_log_tail": log[-6:], "symmetry_log": sym_lines,
        "last_search_stability": _stability_mod_group(run, truth, group),
        "alignment_diagnosis": (
            alignment_diagnosis(run, truth, group, gdir / "data") if kind == "sym" else None
        ),
    }  # fmt: skip


def table(results: list[dict[str, Any]]) -> str:
    """The markdown table of the runs, then one of the symmetry alignment (``sym`` runs)."""
    rows = [
        "| group | run | train wall (s) | search epoch (s) | epochs (search) | rot. err. "
        "mod G median / mean (deg) | out-of-plane median (deg) | within 10 deg | consensus "
        "FSC=0.5 (A) / correlation | last search epoch: moved (logged) / rotation moved "
        "mod G | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    diag = [
        "",
        "| group | last search epoch | rot. err. mod G median (deg) | within 10 deg | C1 map's "
        "origin off the symmetry centre (px) | symmetry alignment as is: score / axes error "
        "(deg) / centre error (px) | re-centred: score / axes error (deg) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.get("returncode") != 0:
            rows.append(f"| {r['group']} | {r['run']} | failed (rc {r.get('returncode')}) "
                        "| | | | | | | | |")  # fmt: skip
            continue
        p, c = r["poses"], r["maps"].get("consensus", {})
        st = r.get("last_search_stability") or {}
        mv = "n/a"
        if st.get("logged") is not None:
            mod = st.get("mod_group")
            mv = f"{100 * st['logged']['frac_moved']:.0f}% / " + (
                f"{100 * mod['frac_rot_moved']:.0f}%" if mod else "n/a"
            )
        verdict = "converged" if r["converged"] else f"did not converge: {r['verdict_headline']}"
        name = f"`--symmetry {r['group']}`" if r["run"] == "sym" else "C1 (none)"
        rows.append(
            f"| {r['group']} | {name} | {r['wall_s']:.0f} | {r['search_epoch_mean_s']:.1f} | "
            f"{r['epochs']} ({r['search_epochs']}) | {p['rot_median_deg']:.1f} / "
            f"{p['rot_mean_deg']:.1f} | {p['oop_median_deg']:.1f} | "
            f"{100 * p[f'frac_within_{WITHIN_DEG:g}deg']:.0f}% | "
            f"{c.get('res_0.5_A', float('nan')):.1f} / {c.get('correlation', float('nan')):.3f} | "
            f"{mv} | {verdict} |"
        )
        d = r.get("alignment_diagnosis")
        if d:
            a, b = d["as_is"], d["recentred"]
            cerr = "n/a"
            if a.get("centre_px") is not None:  # the centre is -offset or +offset (convention)
                o, cf = np.asarray(d["origin_offset_px"]), np.asarray(a["centre_px"])
                cerr = f"{min(np.linalg.norm(cf + o), np.linalg.norm(cf - o)):.2f}"
            diag.append(
                f"| {r['group']} | {d['epoch']} | {d['rot_median_deg']:.1f} | "
                f"{100 * d['frac_within_10deg']:.0f}% | {d['origin_offset_norm_px']:.2f} | "
                f"{a['score']:.3f} / {a['axes_error_deg']:.1f} / {cerr} | "
                f"{b['score']:.3f} / {b['axes_error_deg']:.1f} |"
            )
    return "\n".join(rows + (diag if len(diag) > 3 else []))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-o", "--out", default="bench_sym_out", help="output folder")
    p.add_argument("--groups", nargs="+", default=list(GROUPS), help="default: C4 D7 O")
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS),
                   help="sym: --symmetry G; c1: without (default both)")  # fmt: skip
    p.add_argument("--n", type=int, default=2000, help="particles (default 2000)")
    p.add_argument("-D", type=int, default=32, help="box (default 32)")
    p.add_argument("--apix", type=float, default=8.0, help="pixel size, A (default 8)")
    p.add_argument("--snr", type=float, default=0.1, help="SNR (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="simulation seed")
    p.add_argument("--threads", type=int, default=1, help="cryofield --threads (default 1)")
    p.add_argument("--rescore", action="store_true", help="score finished runs again")
    p.add_argument("train_args", nargs="*", help="more cryofield train flags (after --)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, maps = [], {}
    for group in args.groups:
        gdir = out / group
        maps[group] = prepare(group, gdir, args)
        print(json.dumps(maps[group]), file=sys.stderr, flush=True)
        for kind in args.runs:
            res_path = gdir / f"run_{kind}.json"
            if res_path.is_file() and not args.rescore:
                results.append(json.loads(res_path.read_text()))
                continue
            tr_path = gdir / f"train_{kind}.json"
            if tr_path.is_file():
                tr = json.loads(tr_path.read_text())
            else:
                tr = train(group, kind, gdir, args)
                tr_path.write_text(json.dumps(tr, indent=1))
            r = {"group": group, "run": kind, **tr}
            if tr["returncode"] == 0:
                r = score(group, kind, gdir, tr)
            res_path.write_text(json.dumps(r, indent=1, default=float))
            results.append(r)
            (out / "bench_sym.json").write_text(
                json.dumps({"maps": maps, "runs": results}, indent=1, default=float)
            )
    (out / "bench_sym.json").write_text(
        json.dumps({"maps": maps, "runs": results}, indent=1, default=float)
    )
    md = table(results)
    (out / "bench_sym.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
