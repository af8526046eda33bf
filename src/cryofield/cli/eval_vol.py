"""Generate volumes at chosen latent points of a trained run.

Each latent point gives one map, written as DIR/vol_NNN.mrc at the training box with the
training pixel size (header cell = D * apix); DIR/vol_z.txt lists the points. --z takes
one point (zdim numbers) or several points back to back (a multiple of zdim numbers);
--zfile reads a text file with one point per line. A homogeneous run needs neither and
renders its single map.

examples:
  cryofield eval-vol out/ --z 0.5 -1.2 -o maps/
  cryofield eval-vol out/ --zfile out/analyze.20/kmeans/z_values.txt --lowpass 8 -o maps/
  cryofield eval-vol out/ --epoch 10 --flip-hand -o maps/    # homogeneous run
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cryofield.errors import CryofieldError, InputFileError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cryofield eval-vol``."""
    parser.add_argument("outdir", help="output folder of 'cryofield train'")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--z", type=float, nargs="+", help="latent point(s): zdim numbers each")
    src.add_argument("--zfile", help="text file, one latent point per line")
    parser.add_argument("--epoch", type=int, help="epoch (default: last complete)")
    parser.add_argument("-o", "--out", help="output folder (default OUTDIR/eval_vol.EPOCH)")
    parser.add_argument("--prefix", default="vol_", help="file name prefix (default vol_)")
    parser.add_argument("--lowpass", type=float, metavar="A", help="low-pass to this resolution")
    parser.add_argument(
        "--flip-hand",
        action="store_true",
        help="mirror the maps (z -> -z; T, I3, I4 runs: p -> -p, which keeps their axes)",
    )


def read_zfile(path: str | Path, zdim: int) -> np.ndarray:
    """Latent points ``(K, zdim)`` from a text file (one per line, '#' comments)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "file not found")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            vals = [float(v) for v in line.replace(",", " ").split()]
        except ValueError:
            raise InputFileError(path, f"not a list of numbers: {line!r}", row=i) from None
        if len(vals) != zdim:
            raise InputFileError(path, f"{len(vals)} values, the run has zdim={zdim}", row=i)
        rows.append(vals)
    if not rows:
        raise InputFileError(path, "no latent points in the file")
    return np.asarray(rows, np.float32)


def run(args: argparse.Namespace) -> int:
    """Run ``cryofield eval-vol``."""
    from cryofield.analysis.volumes import write_volume_series
    from cryofield.inference.rundir import WEIGHTS_FILE, RunDir
    from cryofield.io.atomic import refuse_overwrite
    from cryofield.logs import setup_logging
    from cryofield.physics.symmetry import mirror_keeps_axes

    run_dir = RunDir(args.outdir)
    epoch = run_dir.choose_epoch(args.epoch, verb="render")
    symmetry = str(run_dir.config().get("symmetry") or "C1")
    field = run_dir.load_field(epoch)
    zdim = int(field.zdim)
    if args.lowpass is not None and args.lowpass <= 0:
        raise CryofieldError(f"--lowpass must be > 0 A, got {args.lowpass}")
    if zdim == 0:
        if args.z is not None or args.zfile is not None:
            raise CryofieldError(f"{run_dir.path}: homogeneous run (zdim 0): omit --z/--zfile")
        z_points = None
    elif args.zfile is not None:
        z_points = read_zfile(args.zfile, zdim)
    elif args.z is not None:
        if len(args.z) % zdim:
            raise CryofieldError(f"--z got {len(args.z)} numbers, not a multiple of zdim={zdim}")
        z_points = np.asarray(args.z, np.float32).reshape(-1, zdim)
    else:
        raise CryofieldError(
            f"{run_dir.path}: heterogeneous run (zdim {zdim}): give --z or --zfile"
        )
    out = Path(args.out) if args.out else run_dir.path / f"eval_vol.{epoch}"
    n_maps = 1 if z_points is None else len(z_points)
    outputs = [out / f"{args.prefix}{i:03d}.mrc" for i in range(n_maps)]
    refuse_overwrite([*outputs, out / f"{args.prefix}z.txt"],
                     [args.zfile, run_dir.epoch_dir(epoch) / WEIGHTS_FILE])  # fmt: skip
    setup_logging()
    paths = write_volume_series(
        field,
        z_points,
        out,
        args.prefix,
        run_dir.apix_A(),
        lowpass_A=args.lowpass,
        flip_hand=args.flip_hand,
        invert=args.flip_hand and not mirror_keeps_axes(symmetry),
    )
    for p in paths:
        print(p)
    return 0
