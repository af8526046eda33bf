"""Write a particle subset of a run back as RELION .star and/or cryoSPARC .cs.

Choose particles by k-means cluster (--clusters, the same clustering as 'cryofield
analyze': same seed, same K; run here if analyze has not been) or by an index file
(--ind: .npy or text of indices into the ORIGINAL input particles, e.g. the
junk_indices.npy of analyze); --invert keeps the others. Each -o file keeps every
original column and the optics block and points at the original image stacks. An index
file (.npy, indices into the original input particles) is written next to the first
output as <name>_indices.npy.

examples:
  cryofield select out/ --clusters 1,3 -o good.star -o good.cs
  cryofield select out/ --ind out/analyze.20/junk_indices.npy --invert -o clean.star
  cryofield select out/ --clusters 0 --ksample 10 --epoch 20 -o state0.cs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cryofield.errors import CryofieldError, InputFileError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cryofield select``."""
    parser.add_argument("outdir", help="output folder of 'cryofield train'")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--clusters", help="comma-separated k-means cluster numbers, e.g. 1,3")
    src.add_argument("--ind", help=".npy/.txt indices into the original input particles")
    parser.add_argument("--invert", action="store_true", help="keep the particles NOT chosen")
    parser.add_argument(
        "-o",
        "--out",
        action="append",
        required=True,
        help="output .star or .cs (repeat for both)",
    )
    parser.add_argument("--epoch", type=int, help="epoch (default: last complete)")
    parser.add_argument(
        "--ksample",
        "--n-clusters",
        dest="n_clusters",
        type=int,
        help="k-means K, as given to analyze (default 20)",
    )
    parser.add_argument("--ind-out", help="index file to write (default <first -o>_indices.npy)")


def _parse_clusters(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise CryofieldError(f"--clusters: expected integers like 1,3, got {text!r}") from None
    if not vals:
        raise CryofieldError("--clusters: no cluster given")
    return vals


def _read_indices(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "file not found")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise InputFileError(path, f"not a plain .npy array ({err})") from None
    else:
        try:
            arr = np.loadtxt(path, dtype=np.float64, ndmin=1)
        except ValueError as err:
            raise InputFileError(path, f"not a list of integers ({err})") from None
    arr = np.asarray(arr).reshape(-1)
    if arr.size and (arr.dtype.kind not in "iu" and not np.all(arr == np.round(arr))):
        raise InputFileError(path, "indices must be integers")
    return arr.astype(np.int64)


def select_rows(
    run_dir: object,
    epoch: int,
    clusters: list[int] | None,
    ind: np.ndarray | None,
    invert: bool,
    n_clusters: int | None,
) -> np.ndarray:
    """Rows of the run (and of its particles.npz) chosen by clusters or input indices."""
    from cryofield.analysis.report import kmeans_for_run

    index = run_dir.poses(epoch)["particle_index"]
    if clusters is not None:
        km = kmeans_for_run(run_dir, epoch, n_clusters)
        K = len(km.centers)
        bad = [c for c in clusters if not 0 <= c < K]
        if bad:
            raise CryofieldError(
                f"--clusters: {bad} out of range (the run has clusters 0..{K - 1})"
            )
        chosen = np.isin(km.labels, clusters)
    else:
        chosen = np.isin(index, ind)
        unknown = np.setdiff1d(ind, index)
        if unknown.size:
            print(f"note: {unknown.size} indices are not particles of this run; ignored")
    if invert:
        chosen = ~chosen
    return np.nonzero(chosen)[0]


def run(args: argparse.Namespace) -> int:
    """Run ``cryofield select``."""
    from cryofield.analysis.report import resolve_epoch
    from cryofield.inference.rundir import RunDir
    from cryofield.io.atomic import atomic_path
    from cryofield.io.export import write_particles

    outs = [Path(o) for o in args.out]
    for o in outs:
        if o.suffix.lower() not in (".star", ".cs"):
            raise CryofieldError(f"{o}: output must end in .star or .cs")
    run_dir = RunDir(args.outdir)
    epoch = resolve_epoch(run_dir, args.epoch)
    clusters = _parse_clusters(args.clusters) if args.clusters is not None else None
    ind = _read_indices(args.ind) if args.ind is not None else None
    rows = select_rows(run_dir, epoch, clusters, ind, args.invert, args.n_clusters)
    if rows.size == 0:
        raise CryofieldError("the selection is empty: nothing to write")
    table = run_dir.table()
    index = run_dir.poses(epoch)["particle_index"]
    for o in outs:
        write_particles(o, table, indices=rows)
        print(f"wrote {rows.size} particles to {o}")
    ind_out = (
        Path(args.ind_out) if args.ind_out else outs[0].with_name(outs[0].stem + "_indices.npy")
    )
    with atomic_path(ind_out) as tmp, open(tmp, "wb") as fh:
        np.save(fh, index[rows].astype(np.int64))
    print(f"wrote indices into the original input particles to {ind_out}")
    return 0
