"""Reconstruct a map from known poses.

Direct Fourier inversion with CTF correction (cryofield.physics.backproject): every
image is re-centred by its shift, multiplied by its CTF, and inserted as a central slice
at its pose; the map is the CTF^2-weighted average with a small Wiener constant. Poses
and CTF come from the particle file (RELION star, cryoSPARC .cs, a particle .npz), or
from --poses (a cryoDRGN pose .pkl, or a training poses.npz) and --ctf (a cryoDRGN
ctf.pkl). With --half-maps the particles are split into two halves (even/odd rows), both
half maps are written next to the output and the gold-standard FSC resolution is
printed; a sharp map needs correct poses, so this is the quickest check of a pose file.
With --symmetry (RELION's point groups and axes: C<n>, D<n>, T, O, I) every image is
inserted at its equivalent poses, as RELION's relion_reconstruct --sym does.

examples:
  cryofield backproject particles.star -o map.mrc --datadir /data/project
  cryofield backproject J24_particles.cs -o map.mrc -D 128 --half-maps
  cryofield backproject projections.star --poses angles.pkl -o toy.mrc --half-maps
  cryofield backproject run_data.star -o map.mrc --symmetry D7
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cryofield.errors import CryofieldError, InputFileError
from cryofield.io.atomic import refuse_overwrite
from cryofield.io.metadata import ParticleTable, load_particle_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cryofield backproject``."""
    parser.add_argument("particles", help="particle file: .star, .cs, .mrcs, .txt or .npz")
    parser.add_argument("-o", "--output", required=True, help="output map (.mrc)")
    parser.add_argument("--datadir", help="folder where relative image paths are looked up")
    parser.add_argument("--ind", help="index filter: .npy, text, or cryoDRGN .pkl")
    parser.add_argument("-D", type=int, help="Fourier-crop images to this box first (even)")
    parser.add_argument(
        "--poses", help="poses: cryoDRGN pose .pkl, or .npz with rotations (+ shifts_A)"
    )
    parser.add_argument("--ctf", help="cryoDRGN ctf.pkl (read without executing code)")
    parser.add_argument("--no-ctf", action="store_true", help="ignore the CTF (no correction)")
    parser.add_argument(
        "--contrast",
        default="auto",
        choices=("auto", "light-on-dark", "dark-on-light", "as-is", "invert"),
        help="particle contrast, as in 'cryofield train': 'auto' guesses it from the images; "
        "light-on-dark stacks are inverted when the CTF is applied (see docs/backproject.md); "
        "'as-is' or 'invert' force the sign",
    )
    parser.add_argument("--first", type=int, help="use only the first N particles")
    parser.add_argument("--half-maps", action="store_true", help="also write half maps + FSC")
    parser.add_argument(
        "--symmetry", default="C1",
        help="point group of the map in RELION's axes: C<n>, D<n> (2-fold on x), T, O, "
        "I (= I2), I1-I4; every image is inserted at its equivalent poses (default C1)",
    )  # fmt: skip
    parser.add_argument("--chunk", type=int, default=500, help="images per chunk (memory)")
    parser.add_argument(
        "--pad", type=int, choices=(1, 2), default=2,
        help="Fourier oversampling (2: accurate; 1: 8x less memory, faster)",
    )  # fmt: skip
    parser.add_argument(
        "--wiener", type=float, default=1e-3, help="Wiener constant relative to mean weight"
    )


def _load(args: argparse.Namespace) -> ParticleTable:
    from cryofield.io.legacy import attach_legacy, attach_poses

    table = load_particle_table(args.particles, datadir=args.datadir, ind=args.ind)
    if args.ctf:
        table = attach_legacy(table, ctf_pkl=args.ctf)
    if args.poses:
        table = attach_poses(table, args.poses)
    if args.first is not None:
        if args.first < 1:
            raise CryofieldError(f"--first must be positive, got {args.first}")
        table = table.subset(np.arange(min(args.first, len(table))))
    if table.rotations is None:
        raise InputFileError(
            args.particles,
            "no poses (rlnAngleRot/Tilt/Psi or alignments3D/pose); give them with --poses",
        )
    return table


def run(args: argparse.Namespace) -> int:
    """Back-project; exit status 0, or 2 on a bad input."""
    from cryofield.inference.consensus import reconstruct_particles
    from cryofield.inference.data import decide_inversion
    from cryofield.io.mrc import write_mrc
    from cryofield.io.particles import ParticleSource
    from cryofield.physics.fsc import fsc, resolution_at
    from cryofield.physics.symmetry import SymmetryError, canonical_symmetry, symmetry_operators

    out = Path(args.output)
    try:
        symmetry = canonical_symmetry(args.symmetry)
    except SymmetryError as err:
        raise CryofieldError(f"--symmetry: {err}") from None
    if out.suffix.lower() not in (".mrc", ".map"):
        raise CryofieldError(f"{out}: the output map must end in .mrc")
    if args.chunk < 1:
        raise CryofieldError(f"--chunk must be positive, got {args.chunk}")
    stem = out.with_suffix("")
    outputs = [out, *([f"{stem}_half1.mrc", f"{stem}_half2.mrc"] if args.half_maps else [])]
    refuse_overwrite(outputs, [args.particles, args.ind, args.ctf, args.poses])
    table = _load(args)
    refuse_overwrite(outputs, np.unique(table.image_paths).tolist())
    use_ctf = table.ctf is not None and not args.no_ctf
    if table.ctf is None and not args.no_ctf:
        print("note: no CTF parameters found; reconstructing without CTF correction")
    source = ParticleSource(table, D=args.D)
    decision = decide_inversion(args.contrast, use_ctf, source)
    if decision.guessed:
        print(decision.message)
    rec = reconstruct_particles(
        source, use_ctf=use_ctf, invert=decision.invert, half_maps=args.half_maps,
        chunk=args.chunk, pad_factor=args.pad, wiener=args.wiener,
        symmetry=symmetry_operators(symmetry),
    )  # fmt: skip
    apix = rec.apix_A
    apix_out = float(apix[0])
    if not np.allclose(apix, apix_out, rtol=1e-4):
        print(f"note: pixel sizes differ ({apix.min():.4g} - {apix.max():.4g} A); header gets "
              f"{apix_out:.4g}")  # fmt: skip
    if rec.halves is not None:
        v1, v2 = rec.halves
        write_mrc(f"{stem}_half1.mrc", v1.numpy(), apix_out)
        write_mrc(f"{stem}_half2.mrc", v2.numpy(), apix_out)
        curve = fsc(v1, v2)
        for thr in (0.5, 0.143):
            shell, res = resolution_at(curve, thr, apix_out)
            print(f"half-map FSC = {thr}: shell {shell:.1f} px, {res:.2f} A")
    write_mrc(out, rec.volume.numpy(), apix_out)
    sym = "" if symmetry == "C1" else f", symmetry {symmetry}"
    print(f"wrote {out}: {len(table)} particles, box {rec.D} px, {apix_out:.4g} A/px{sym}")
    return 0
