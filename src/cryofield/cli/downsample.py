"""Fourier-crop a particle stack to a smaller box.

Reads the images in chunks from memory-mapped stacks (the whole stack is never loaded),
crops each image's centred Fourier transform to D x D (which keeps pixel values and
low frequencies, and multiplies the pixel size by box/D), and writes one .mrcs with the
new pixel size in its header. For a .star or .cs input it also writes OUT.star (next to
OUT.mrcs) with every original column, poses (origins in px rescaled), and the new pixel
size and box, pointing at the new stack. Each row of OUT.star also links back to the
image it was cropped from (rlnImageOriginalName = idx@path, with
rlnCryofieldOriginalImageSize and rlnCryofieldOriginalPixelSize), so that 'cryofield
select' and 'export' of a run trained on OUT.star write the ORIGINAL particles at their
own box and pixel size. Outputs are written atomically.

examples:
  cryofield downsample particles.star -D 128 -o particles.128.mrcs
  cryofield downsample J24_particles.cs --datadir /data/P12 -D 64 -o p64.mrcs --chunk 2000
  cryofield downsample stack.mrcs -D 64 -o stack.64.mrcs
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cryofield.errors import CryofieldError
from cryofield.io.atomic import refuse_overwrite
from cryofield.io.indices import load_index
from cryofield.io.metadata import load_particle_table
from cryofield.io.mrc import MRCStackWriter
from cryofield.io.particles import ParticleSource
from cryofield.io.star import original_link_columns, write_star


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cryofield downsample``."""
    parser.add_argument("particles", help="input: .mrcs/.mrc, .txt, .star or .cs")
    parser.add_argument("-D", type=int, required=True, help="new box size in pixels (even)")
    parser.add_argument("-o", "--output", required=True, help="output stack (.mrcs)")
    parser.add_argument("--chunk", type=int, default=1000, help="images per chunk (memory)")
    parser.add_argument("--datadir", help="folder where relative image paths are looked up")
    parser.add_argument("--ind", help="index filter: .npy, text, or cryoDRGN .pkl")
    parser.add_argument(
        "--star", help="star file to write (default: OUT.star for .star/.cs inputs)"
    )


def run(args: argparse.Namespace) -> int:
    """Downsample; exit status 0, or 2 on a bad input."""
    out = Path(args.output)
    if out.suffix.lower() not in (".mrcs", ".mrc"):
        raise CryofieldError(f"{out}: the output stack must end in .mrcs")
    if args.chunk < 1:
        raise CryofieldError(f"--chunk must be positive, got {args.chunk}")
    refuse_overwrite([out, args.star], [args.particles, args.ind])
    table = load_particle_table(args.particles, datadir=args.datadir)
    if args.ind:
        table = table.subset(load_index(args.ind, len(table), args.particles))
    star_path = args.star
    if star_path is None and table.source_format in ("star", "cs"):
        star_path = out.with_suffix(".star")
    refuse_overwrite([out, star_path], [args.particles, *np.unique(table.image_paths)])
    source = ParticleSource(table, D=args.D)
    ratio = source.box_px / source.D
    apix_new = source.apix_A
    if not np.allclose(apix_new, apix_new[0], rtol=1e-4):
        print(
            f"note: pixel sizes differ between particles ({apix_new.min():.4g} - "
            f"{apix_new.max():.4g} A); the stack header gets the first one, the star file "
            "keeps one per optics group"
        )
    n = len(source)
    with (
        MRCStackWriter(out, source.D, float(apix_new[0])) as writer,
        tqdm(total=n, desc="downsample", unit="img") as bar,
    ):
        for start in range(0, n, args.chunk):
            idx = np.arange(start, min(start + args.chunk, n))
            writer.write(source[idx].numpy())
            bar.update(len(idx))
    print(
        f"wrote {out}: {n} images, {source.box_px} -> {source.D} px, "
        f"{table.apix_A[0]:.4g} -> {table.apix_A[0] * ratio:.4g} A/px"
    )
    if star_path is not None:
        star_path = Path(star_path)
        star_dir = star_path.resolve().parent
        rel = os.path.relpath(out.resolve(), star_dir)
        names = [f"{i + 1:06d}@{rel}" for i in range(n)]
        link = original_link_columns(table, star_dir)
        write_star(star_path, table, image_names=names, box_px=source.D, extra_columns=link)
        print(f"wrote {star_path} (rlnImageOriginalName links each particle to its original)")
    return 0
