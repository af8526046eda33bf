"""Score a run against simulation truth: poses, maps, clusters, latents.

Pose errors (out-of-plane and in-plane in degrees, translation in px; mean and median)
after a global alignment that includes the mirror; FSC, resolution (FSC 0.5 / 0.143) and
CryoBench FSC-AUC against the true map(s) after rigid alignment; ARI, NMI and accuracy
of k-means (K = number of true states) vs the true labels; junk precision/recall;
Spearman correlation of the latent PCs with a continuous truth coordinate. Writes JSON
(default OUTDIR/evaluate.EPOCH.json) and prints a table.

examples:
  cryofield evaluate out/ --truth sim/truth.npz
  cryofield evaluate out/ --truth sim/truth.npz --volume sim/volumes/state_00.mrc -o m.json
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
    parser.add_argument("-o", "--out", help="JSON output (default OUTDIR/evaluate.EPOCH.json)")


def run(args: argparse.Namespace) -> int:
    """Run ``cryofield evaluate``."""
    from cryofield.analysis.evaluate import evaluate_run, format_table
    from cryofield.io.atomic import write_text_atomic
    from cryofield.logs import setup_logging

    setup_logging()
    res = evaluate_run(args.outdir, args.truth, volumes=args.volume, epoch=args.epoch)
    out = Path(args.out) if args.out else Path(args.outdir) / f"evaluate.{res['epoch']}.json"
    write_text_atomic(out, json.dumps(res, indent=2) + "\n")
    print(format_table(res))
    print(f"metrics: {out}")
    return 0
