"""Latent-space analysis, volumes and an HTML report of a training run.

Writes OUTDIR/analyze.EPOCH/: report.html (the training's convergence verdict first,
all figures, no network assets, the next commands to run), PCA / UMAP / density /
cluster-count / junk / pose / training-curve plots, analysis.npz (PCA, UMAP, k-means
labels and centres), junk.npz and junk_indices.npy (junk from the residuals and the
latents), maps at the particles nearest the k-means centres (kmeans/) and along the
first principal components at percentiles (pc1/, pc2/), each series with a ChimeraX
script (open_in_chimerax.cxc). Homogeneous runs get the final map, the half-map FSC and
the pose plot. A step that fails is logged and skipped.

examples:
  cryofield analyze out/
  cryofield analyze out/ --epoch 20 --ksample 10 --pcs 3
  cryofield analyze out/ --no-volumes        # figures only (fast on a CPU)
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cryofield analyze``."""
    parser.add_argument("outdir", help="output folder of 'cryofield train'")
    parser.add_argument("--epoch", type=int, help="epoch to analyse (default: last complete)")
    parser.add_argument(
        "--ksample",
        "--n-clusters",
        dest="n_clusters",
        type=int,
        help="number of k-means clusters (default 20, at most the number of particles)",
    )
    parser.add_argument("--pcs", type=int, default=2, help="PCs with a volume series (default 2)")
    parser.add_argument("--no-volumes", action="store_true", help="skip rendering volumes")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    """Run ``cryofield analyze``."""
    from pathlib import Path

    from cryofield.analysis.report import analyze_run
    from cryofield.errors import CryofieldError
    from cryofield.lock import folder_lock
    from cryofield.logs import setup_logging

    if args.n_clusters is not None and args.n_clusters < 1:
        raise CryofieldError(f"--ksample must be >= 1, got {args.n_clusters}")
    if args.pcs < 0:
        raise CryofieldError(f"--pcs must be >= 0, got {args.pcs}")
    outdir = Path(args.outdir)
    if not outdir.is_dir():
        raise CryofieldError(f"{outdir}: not a training output folder (does not exist)")
    # its own lock: analyze may run while the training goes on, but not twice at once
    with folder_lock(outdir, "cryofield analyze", name=".analyze.lock"):
        setup_logging(outdir, verbose=args.verbose)
        path = analyze_run(
            outdir,
            epoch=args.epoch,
            n_clusters=args.n_clusters,
            n_pcs=args.pcs,
            volumes=not args.no_volumes,
        )
    print(f"report: {path}")
    return 0
