"""Write a particle subset of a run back as RELION .star and/or cryoSPARC .cs.

Choose particles by k-means cluster (--clusters: the clusters 'cryofield analyze' saved
for the epoch, numbered as in its report) or by an index file (--ind: .npy or text of
rows of the training input file, e.g. the junk_indices.npy of analyze); --complement keeps
the others. Each -o file holds the chosen particles with the learned poses of the epoch,
their latents (rlnCryofieldZ01.., cryofield/z01..) and clusters (rlnClassNumber /
alignments3D/class), every original column and the optics block, written by the same
code as 'cryofield export'. A run trained on the output of 'cryofield downsample' gives
the ORIGINAL particles (their images, box, pixel size; shifts at their pixel size), or
the downsampled ones with --write-downsampled. An index file (.npy, rows of the training
input file) is written next to the first output as <name>_indices.npy.
A run trained with --symmetry or --mask records them: '# cryofield:' comment lines at
the top of a .star, a sidecar <name>.cs.cryofield.yaml next to a .cs (a Dn run's .cs
poses, and the map written beside them, are in cryoSPARC's axes: 2-fold on y).

--ksample must match the K of analyze (a different K is refused: cluster numbers would
not match the report); without analyze output, --clusters needs --ksample K and
clusters here with that K (same seed as analyze).

examples:
  cryofield analyze out/ --ksample 10
  cryofield select out/ --clusters 1,3 -o good.star -o good.cs
  cryofield select out/ --ind out/analyze.20/junk_indices.npy --complement -o clean.star
  cryofield select out/ --drop-junk -o clean.star
  cryofield select out_64px/ --clusters 0 --epoch 20 -o state0_full_res.star
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryofield.cli.export import add_cluster_k_argument, add_downsampled_argument, parse_clusters
from cryofield.errors import CryofieldError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cryofield select``."""
    parser.add_argument("outdir", help="output folder of 'cryofield train'")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--clusters", help="comma-separated k-means cluster numbers, e.g. 1,3")
    src.add_argument("--ind", help=".npy/.txt indices: rows of the training input file")
    parser.add_argument("--complement", "--invert", dest="invert", action="store_true",
                        help="keep the particles NOT chosen (--invert: older name)")  # fmt: skip
    parser.add_argument(
        "--drop-junk", action="store_true",
        help="leave out the particles analyze flagged as junk (analyze.EPOCH/junk.npz); alone: "
        "every particle that is not junk",
    )  # fmt: skip
    parser.add_argument(
        "-o",
        "--out",
        action="append",
        required=True,
        help="output .star or .cs (repeat for both)",
    )
    parser.add_argument("--epoch", type=int, help="epoch (default: last complete)")
    add_cluster_k_argument(parser)
    add_downsampled_argument(parser)
    parser.add_argument("--ind-out", help="index file to write (default <first -o>_indices.npy)")


def run(args: argparse.Namespace) -> int:
    """Run ``cryofield select``."""
    from cryofield.analysis import export
    from cryofield.io.atomic import refuse_overwrite

    outs = [export.check_output_suffix(o) for o in args.out]
    if args.clusters is None and args.ind is None and not args.drop_junk:
        raise CryofieldError("give --clusters, --ind or --drop-junk")
    sel = export.select_particles(
        args.outdir, epoch=args.epoch, ind=args.ind, clusters=parse_clusters(args.clusters),
        n_clusters=args.n_clusters, invert=args.invert, strict_ind=False,
        drop_junk=args.drop_junk,
    )  # fmt: skip
    ind_out = Path(args.ind_out) if args.ind_out else export.index_file_path(outs[0])
    refuse_overwrite([*(f for o in outs for f in export.output_paths(o)), ind_out], sel.inputs)
    for o in outs:
        export.write_selection(sel, o, downsampled=args.write_downsampled)
        print(f"wrote {sel.rows.size} particles (epoch {sel.epoch}) to {o}")
    export.write_index_file(sel, ind_out)
    print(f"wrote indices into the training input file to {ind_out}")
    return 0
