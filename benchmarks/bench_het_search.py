"""Accuracy of the heterogeneous pose search against the true maps: assigned and exhaustive.

Takes a simulated discrete-state dataset (``cryofield simulate``: truth.npz and the true
state maps) and searches a subset of its images once, with the settings of the last
search epoch of ``cryofield train --zdim 8`` (``TrainConfig().resolved`` for the data;
the images prepared by the training's ``BatchMaker``), against ``G = 8`` references
built from the true maps: the ``S`` state maps and ``8 - S`` mixtures of them (stand-ins
for k-means centres between states), cut to the search radius and scaled to the images
(least squares at the true poses). No field is trained, so the comparison is of the
search alone:

  exhaustive   ``search_poses`` without a hint: every image against every reference
  assigned     with a hint per image: its own state's map, except for the fraction
               ``--wrong`` of the images, which get a reference drawn at random

Reports per mode: the median rotation error (deg) and the fraction within 10 deg of the
true pose (no alignment needed: the maps are in the truth's frame), the fraction of the
images on a reference dominated by their own state, and the search time. Writes
``OUT/bench_het_search.json``::

    python benchmarks/bench_het_search.py --data het_data -o het_search_out --wrong 0 0.3 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_robust import _meta  # the benchmarks share their run metadata


def _mixtures(S: int, G: int) -> torch.Tensor:
    """``(G, S)`` weights: the ``S`` states, then pairs and thirds of them."""
    rows = [torch.eye(S)[i] for i in range(S)]
    extra = []
    for i in range(S):
        for j in range(i + 1, S):
            m = torch.zeros(S)
            m[i] = m[j] = 0.5
            extra.append(m)
    extra.append(torch.full((S,), 1.0 / S))
    for i in range(S):
        m = torch.full((S,), 0.25 / max(S - 1, 1))
        m[i] = 0.75
        extra.append(m)
    return torch.stack((rows + extra)[:G])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="folder written by 'cryofield simulate'")
    p.add_argument("-o", "--out", default="het_search_out")
    p.add_argument("-n", "--n-images", type=int, default=256, help="images searched")
    p.add_argument("--groups", type=int, default=8, help="references (het_search_groups)")
    p.add_argument("--wrong", type=float, nargs="+", default=[0.0, 0.3, 1.0],
                   help="fractions of random hints of the assigned search")  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from cryofield.inference.config import TrainConfig
    from cryofield.inference.pose_search import (
        centre_images,
        level0_slices,
        search_poses,
        slice_grid,
    )
    from cryofield.inference.references import search_settings
    from cryofield.inference.runner import build_trainer
    from cryofield.io.metadata import load_particle_table
    from cryofield.io.mrc import read_mrc
    from cryofield.io.particles import ParticleSource
    from cryofield.physics.fourier import fft3_centered
    from cryofield.physics.rotation import geodesic_distance_rad

    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    truth = np.load(data / "truth.npz")
    labels = truth["labels"]
    R_true = torch.as_tensor(truth["rotations"]).float()
    t_true = torch.as_tensor(truth["shifts_px"]).float()
    table = load_particle_table(data / "particles.star")
    cfg = TrainConfig(particles=str(data / "particles.star"), outdir=str(out / "scratch"),
                      zdim=8, device="cpu", num_threads=args.threads)  # fmt: skip
    tr = build_trainer(cfg, table, ParticleSource(table, lazy=True))
    D, pts = tr.D, tr.points
    st = search_settings(tr.cfg, tr.schedule.final_search_plan())
    # the true maps, cut to a cube holding the search ball (as the field's grids are)
    vols = [np.array(read_mrc(data / v)[0], dtype=np.float32) for v in truth["volume_paths"]]
    F = torch.stack([fft3_centered(torch.as_tensor(v)) for v in vols])
    r = math.floor(st.radius_hi_px) + 1.0
    Dc = 2 * (math.ceil(r) + 2)
    c0 = D // 2 - Dc // 2
    F = F[:, c0 : c0 + Dc, c0 : c0 + Dc, c0 : c0 + Dc]
    k = (torch.arange(Dc) - Dc // 2).float()
    F = F * ((k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2) <= r * r)
    # scale to the images: least squares at the true poses of every 50th image
    rows_s = np.arange(0, len(labels), 50)
    b = tr.batches.batch(rows_s)
    idx, w = pts.half_index(st.radius_hi_px)
    fr = pts.freqs[idx]
    S_true = torch.stack([slice_grid(F[labels[i]], D, R_true[i : i + 1], fr)[0] for i in rows_s])
    X = centre_images(b.images_ft[:, idx], fr, t_true[rows_s][:, None])[:, 0]
    C = b.ctf[:, idx]
    scale = float((w * C * (X * S_true.conj()).real).sum() / (w * C**2 * S_true.abs() ** 2).sum())
    mix = _mixtures(F.shape[0], args.groups)
    refs = torch.einsum("gs,sxyz->gxyz", mix.to(F.dtype), F * scale)
    slices0 = level0_slices(refs, D, pts, st)
    own = mix.argmax(1).numpy()  # the state that dominates each reference

    rows = np.linspace(0, len(labels) - 1, args.n_images).round().astype(np.int64)
    rng = np.random.default_rng(args.seed)
    modes = [("exhaustive", None)] + [("assigned", f) for f in args.wrong]
    found: dict[int, list[Any]] = {i: [[], [], 0.0] for i in range(len(modes))}
    with torch.no_grad():
        for b0 in range(0, len(rows), 32):
            ii = rows[b0 : b0 + 32]
            b = tr.batches.batch(ii)
            for i, (_, frac) in enumerate(modes):
                hint = None
                if frac is not None:
                    random = torch.as_tensor(rng.random(len(ii)) < frac)
                    drawn = torch.as_tensor(rng.integers(0, args.groups, len(ii)))
                    hint = torch.where(random, drawn, torch.as_tensor(labels[ii]).long())
                t0 = time.perf_counter()
                res = search_poses(refs, D, b.images_ft, b.ctf, pts, st, hint=hint,
                                   slices0=slices0)  # fmt: skip
                found[i][2] += time.perf_counter() - t0
                found[i][0].append(res.rotations)
                found[i][1].append(res.reference)
    results = []
    for i, (mode, frac) in enumerate(modes):
        R = torch.cat(found[i][0])
        ref = torch.cat(found[i][1]).numpy()
        err = np.degrees(geodesic_distance_rad(R, R_true[rows]).numpy())
        results.append({
            "mode": mode, "random_hints": frac, "images": len(rows),
            "median_deg": float(np.median(err)), "within_10deg": float(np.mean(err < 10)),
            "own_state_reference": float(np.mean(own[ref] == labels[rows])),
            "search_s": found[i][2],
        })  # fmt: skip
        r_ = results[-1]
        name = mode if frac is None else f"{mode}, {frac:.0%} random hints"
        print(f"{name:34s} median {r_['median_deg']:6.2f} deg, within 10 deg "
              f"{r_['within_10deg']:.3f}, own-state reference {r_['own_state_reference']:.3f}, "
              f"{r_['search_s']:.1f} s")  # fmt: skip
    summary = {"meta": _meta(), "args": vars(args), "settings": str(st), "scale": scale,
               "results": results}  # fmt: skip
    (out / "bench_het_search.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
