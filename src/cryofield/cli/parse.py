"""Write a particle table (.npz) from .star/.cs/.mrcs/.txt.

The table holds, per particle, the image path and frame, pixel size, CTF (defocus U/V in
A, astigmatism angle in degrees, voltage, Cs, amplitude contrast, phase shift, B-factor),
poses when the file has them (RELION rotation matrices and shifts in px), the optics
group, and the original rows (star columns and optics block, or the .cs array) so that
subsets can be written back without losing a column. It is a plain .npz (no pickles);
see docs/parse.md for the keys. `cryofield train` and `cryofield info` accept it.

examples:
  cryofield parse particles.star --datadir /data/project -o particles.npz
  cryofield parse J24_particles.cs --ind keep.npy -o subset.npz
  cryofield parse stack.mrcs --ctf ctf.pkl --poses pose.pkl -o table.npz
"""

from __future__ import annotations

import argparse

import numpy as np

from cryofield.cli.info import add_table_arguments, describe, load_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cryofield parse``."""
    add_table_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="output table (.npz)")
    parser.add_argument(
        "--no-image-check",
        action="store_true",
        help="do not check that every image stack exists and holds the referenced frames",
    )


def run(args: argparse.Namespace) -> int:
    """Read, check, and save the table; exit status 0, or 2 on a bad input."""
    from cryofield.io.atomic import refuse_overwrite

    inputs = [args.particles, args.ind, args.ctf, args.poses]
    refuse_overwrite([args.output], inputs)
    table, n_total = load_table(args)
    refuse_overwrite([args.output], np.unique(table.image_paths).tolist())
    if not args.no_image_check:
        from cryofield.io.particles import ParticleSource

        source = ParticleSource(table)  # raises on missing stacks / frames / bad headers
        if not table.box_px:
            from dataclasses import replace

            table = replace(table, box_px=source.box_px)
    for line in describe(table, n_total):
        print(line)
    out = table.save_npz(args.output)
    print(f"wrote {out}")
    return 0
