"""Score a run against simulation truth: poses, maps, clusters, latents.

Pose errors (out-of-plane and in-plane in degrees, translation in px; mean and median)
after a global alignment that includes the mirror; FSC, resolution (FSC 0.5 / 0.143) and
CryoBench FSC-AUC against the true map(s) after rigid alignment; ARI, NMI and accuracy
of k-means (K = number of true states) vs the true labels, beside the state ceiling (the
ARI of assigning each image to the true map that explains it best at its true pose,
shift and CTF: what the data hold) and their gap; for homogeneous runs the pose floor
(each image aligned from its true pose to the half map of the true poses without it:
the pose error an ideal refinement reaches on these images); junk precision/recall;
Spearman correlation of the latent PCs with a continuous truth coordinate. Writes JSON
(default OUTDIR/evaluate.EPOCH.json) and prints a table.

examples:
  cryofield evaluate out/ --truth sim/truth.npz
  cryofield evaluate out/ --truth sim/truth.npz --volume sim/volumes/state_00.mrc -o m.json
  cryofield evaluate out/ --truth sim/truth.npz --ceiling-max-images 0   # no ceiling
  cryofield evaluate out/ --truth sim/truth.npz --floor-max-images 0     # no pose floor
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cryofield evaluate``."""
    parser.add_argument("outdir", help="output folder of 'cryofield train'")
    parser.add_argument("--truth", required=True, help="truth.npz written by 'cryofield simulate'")
    parser.add_argument(
        "--volume",
        nargs="+",
        help="true map(s), one per state in label order (default: the truth's volume_paths)",
    )
    parser.add_argument("--epoch", type=int, help="epoch (default: last complete)")
    parser.add_argument(
        "--ceiling-max-images",
        type=int,
        default=5000,
        metavar="N",
        help="state ceiling on at most N images (seeded random subset; 0: skip it; default 5000)",
    )
    parser.add_argument(
        "--ceiling-radius",
        type=float,
        metavar="PX",
        help="Fourier radius (px) of the ceiling's residual (default: Nyquist)",
    )
    parser.add_argument(
        "--floor-max-images",
        type=int,
        default=2000,
        metavar="N",
        help="pose floor (homogeneous runs: each image aligned from its true pose to the "
        "true-pose half map without it) on at most N images (0: skip it; default 2000)",
    )
    parser.add_argument("-o", "--out", help="JSON output (default OUTDIR/evaluate.EPOCH.json)")


def run(args: argparse.Namespace) -> int:
    """Run ``cryofield evaluate``."""
    from cryofield.analysis.evaluate import evaluate_run, format_table
    from cryofield.errors import CryofieldError
    from cryofield.io.atomic import write_text_atomic
    from cryofield.logs import setup_logging

    setup_logging()
    if args.ceiling_max_images < 0:
        raise CryofieldError("--ceiling-max-images must be >= 0")
    if args.floor_max_images < 0:
        raise CryofieldError("--floor-max-images must be >= 0")
    res = evaluate_run(
        args.outdir,
        args.truth,
        volumes=args.volume,
        epoch=args.epoch,
        ceiling_max_images=args.ceiling_max_images,
        ceiling_radius_px=args.ceiling_radius,
        floor_max_images=args.floor_max_images,
    )
    out = Path(args.out) if args.out else Path(args.outdir) / f"evaluate.{res['epoch']}.json"
    write_text_atomic(out, json.dumps(res, indent=2) + "\n")
    print(format_table(res))
    print(f"metrics: {out}")
    return 0
