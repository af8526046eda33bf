"""Summarise a particle stack or metadata file, or an MRC volume.

Prints the particle count, box size, pixel size, optics groups (pixel size, voltage, Cs,
amplitude contrast per group), the CTF and pose columns found, whether the image stacks
were found, and a guess of the contrast (light-on-dark or dark-on-light) from the images.
An MRC volume (a cube with a volume space group, or a .map; never a .mrcs) is reported as
a volume: box, pixel size and min/max/mean density.

examples:
  cryofield info particles.star --datadir /data/project
  cryofield info J24_particles.cs --ind keep.npy
  cryofield info stack.mrcs
  cryofield info map.mrc
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cryofield.errors import CryofieldError
from cryofield.io.indices import load_index
from cryofield.io.metadata import ParticleTable, load_particle_table
from cryofield.io.star import ORIGINAL_APIX, ORIGINAL_BOX, ORIGINAL_NAME, has_original_link

_STAR_CTF = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
             "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnPhaseShift",
             "rlnCtfBfactor")  # fmt: skip
_STAR_POSE = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY",
              "rlnOriginXAngst", "rlnOriginYAngst")  # fmt: skip
_FORMATS = {"star": "RELION star", "cs": "cryoSPARC .cs", "mrcs": "MRC stack",
            "txt": "list of MRC stacks"}  # fmt: skip


def add_table_arguments(parser: argparse.ArgumentParser) -> None:
    """The input arguments shared by ``info`` and ``parse`` (read by :func:`load_table`)."""
    parser.add_argument("particles", help="particle file: .star, .cs, .mrcs/.mrc, .txt or .npz")
    parser.add_argument("--datadir", help="folder where relative image paths are looked up")
    parser.add_argument("--ind", help="index filter: .npy, text, or cryoDRGN .pkl")
    parser.add_argument("--ctf", help="cryoDRGN ctf.pkl to attach (read without executing code)")
    parser.add_argument("--poses", help="cryoDRGN pose .pkl to attach")


def load_table(args: argparse.Namespace) -> tuple[ParticleTable, int]:
    """The table of :func:`add_table_arguments`' inputs and the particle count before --ind.

    Reads ``args.particles`` (with ``--datadir``), keeps the ``--ind`` rows, then attaches
    the cryoDRGN ``--ctf`` / ``--poses`` pickles.
    """
    table = load_particle_table(args.particles, datadir=args.datadir)
    n_total = len(table)
    if args.ind:
        table = table.subset(load_index(args.ind, n_total, args.particles))
    if args.ctf or args.poses:
        from cryofield.io.legacy import attach_legacy

        table = attach_legacy(table, ctf_pkl=args.ctf, pose_pkl=args.poses)
    return table, n_total


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cryofield info``."""
    add_table_arguments(parser)
    parser.add_argument(
        "--n-contrast", type=int, default=200, help="images used for the contrast guess"
    )


def _columns_found(table: ParticleTable) -> tuple[list[str], list[str]]:
    """Names of the CTF and pose columns/fields present in the input file."""
    if table.source_format == "star" and table.raw is not None:
        names = set(table.raw.columns)
        if table.raw_optics is not None:
            names |= set(table.raw_optics.columns)
        return [c for c in _STAR_CTF if c in names], [c for c in _STAR_POSE if c in names]
    if table.source_format == "cs" and table.raw is not None:
        names = list(table.raw.dtype.names)
        ctf = [n for n in names if n.startswith("ctf/") and n != "ctf/type"]
        pose = [n for n in names if n.startswith("alignments") and n.split("/")[-1] in
                ("pose", "shift")]  # fmt: skip
        return ctf, pose
    return [], []


def _range(values: np.ndarray, fmt: str) -> str:
    lo, hi = float(np.min(values)), float(np.max(values))
    return format(lo, fmt) if np.isclose(lo, hi) else f"{lo:{fmt}} - {hi:{fmt}}"


def describe(table: ParticleTable, n_total: int | None = None) -> list[str]:
    """The lines printed by ``cryofield info`` for the metadata (no image access)."""
    n = len(table)
    lines = [f"file:           {table.source_path} ({_FORMATS.get(table.source_format, '?')})"]
    count = f"{n}" if n_total is None or n_total == n else f"{n} (of {n_total}, after --ind)"
    lines.append(f"particles:      {count}")
    lines.append(
        f"box:            {table.box_px} px" if table.box_px else "box:            unknown"
    )
    lines.append(f"pixel size:     {_range(table.apix_A, '.4g')} A")
    groups = np.unique(table.optics_group)
    lines.append(f"optics groups:  {len(groups)}")
    for g in groups:
        sel = table.optics_group == g
        parts = [f"{int(sel.sum())} particles", f"{_range(table.apix_A[sel], '.4g')} A/px"]
        if table.ctf is not None:
            parts += [
                f"{_range(table.ctf['voltage_kV'][sel], '.4g')} kV",
                f"Cs {_range(table.ctf['cs_mm'][sel], '.4g')} mm",
                f"amp. contrast {_range(table.ctf['amp_contrast'][sel], '.3g')}",
            ]
        lines.append(f"  group {int(g)}: " + ", ".join(parts))
    ctf_cols, pose_cols = _columns_found(table)
    if table.ctf is None:
        lines.append("CTF:            none")
    else:
        dfu = table.ctf["defocus_u_A"]
        found = f" [{', '.join(ctf_cols)}]" if ctf_cols else ""
        lines.append(f"CTF:            defocus U {_range(dfu, '.0f')} A{found}")
    if has_original_link(table):
        box = table.raw[ORIGINAL_BOX].iloc[0]
        apix = _range(table.raw[ORIGINAL_APIX].to_numpy(float), ".4g")
        lines.append(
            f"downsampled:    from {box} px, {apix} A/px originals ({ORIGINAL_NAME}, e.g. "
            f"{table.raw[ORIGINAL_NAME].iloc[0]}); select/export write the originals"
        )
    if table.rotations is not None:
        lines.append(f"poses:          3-D poses and shifts [{', '.join(pose_cols)}]")
    elif pose_cols:
        lines.append(f"poses:          no 3-D poses (found only {', '.join(pose_cols)})")
    else:
        lines.append("poses:          none")
    return lines


def describe_volume(path: str | Path) -> list[str] | None:
    """The lines printed by ``cryofield info`` for an MRC volume; None when ``path`` is
    not one (:func:`cryofield.io.mrc.is_volume`).

    Density statistics are computed over every voxel (in slabs, float64); non-finite
    voxels are counted and left out.
    """
    from cryofield.io.mrc import is_volume, read_mrc, read_mrc_header

    path = Path(path)
    if path.suffix.lower() not in (".mrc", ".map") or not path.is_file():
        return None
    info = read_mrc_header(path)
    if not is_volume(path, info):
        return None
    data, _ = read_mrc(path)
    nz, ny, nx = info.shape
    total, count, bad = 0.0, 0, 0
    lo, hi = np.inf, -np.inf
    for z0 in range(0, nz, 16):
        slab = np.asarray(data[z0 : z0 + 16], dtype=np.float64)
        finite = np.isfinite(slab)
        bad += int(slab.size - finite.sum())
        vals = slab[finite]
        if vals.size:
            total += float(vals.sum())
            count += vals.size
            lo, hi = min(lo, float(vals.min())), max(hi, float(vals.max()))
    apix = f"{info.apix_A:.4g} A" if info.apix_A > 0 else "unknown (not in the MRC header)"
    density = (
        f"min {lo:.4g}, max {hi:.4g}, mean {total / count:.4g}" if count else "no finite voxels"
    )
    if bad:
        density += f" ({bad} NaN/infinite voxels)"
    return [
        f"file:           {path} (MRC volume, space group {info.space_group})",
        f"volume:         {nz} x {ny} x {nx} voxels; not a particle stack (a stack of "
        "images must be named .mrcs)",
        f"box:            {nx} px",
        f"pixel size:     {apix}",
        f"density:        {density}",
    ]


def run(args: argparse.Namespace) -> int:
    """Print the summary; exit status 0, or 2 on a bad input file."""
    volume = describe_volume(args.particles)
    if volume is not None:
        given = [f"--{k}" for k in ("ind", "ctf", "poses") if getattr(args, k, None)]
        if given:
            raise CryofieldError(
                f"{args.particles}: a volume, not particles: {', '.join(given)} do not apply"
            )
        for line in volume:
            print(line)
        return 0
    table, n_total = load_table(args)
    for line in describe(table, n_total):
        print(line)

    stacks = np.unique(table.image_paths)
    missing = [s for s in stacks if not Path(s).is_file()]
    if missing:
        print(
            f"images:         {len(missing)} of {len(stacks)} stack(s) not found, e.g. "
            f"{missing[0]} (use --datadir); contrast not checked"
        )
        return 0
    from cryofield.io.particles import ParticleSource

    source = ParticleSource(table)
    contrast = source.contrast(args.n_contrast)
    n_used = min(len(source), args.n_contrast)
    print(
        f"images:         {len(stacks)} stack(s), {source.box_px} x {source.box_px} px, all found"
    )
    # our CTF makes dark-on-light images; light-on-dark stacks are negated before they meet
    # it (docs/dev/contracts.md, "Contrast and CTF sign")
    note = {
        "light-on-dark": " (the usual RELION/cryoSPARC sign: images are multiplied by -1 "
        "before the CTF)",
        "dark-on-light": " (already the sign of the CTF model: images are used as they are)",
    }.get(contrast, "")
    print(f"contrast:       {contrast} (from {n_used} images){note}")
    return 0
