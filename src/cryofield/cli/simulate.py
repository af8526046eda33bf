"""Simulate a particle dataset with exact truth.

Projects a volume (or several, or an atomic model, or a built-in test object) under random
poses, applies a random CTF and translation per particle, adds white Gaussian noise at a
target SNR and writes particles.mrcs, particles.star (RELION 3.1), particles.cs,
truth.npz and the true volumes. Images are written light-on-dark (contrast-inverted, as
RELION/cryoSPARC stacks usually are) unless --no-invert. See docs/simulate.md.

examples:
  cryofield simulate -o sim_homo --preset demo-homo
  cryofield simulate -o sim_states --volume a.mrc b.mrc --weights 0.7 0.3 -n 20000 --snr 0.05
  cryofield simulate -o sim_pdb --pdb model.cif --apix 2.0 -D 128 --snr 0.1 --seed 3
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from cryofield.errors import CryofieldError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cryofield simulate``."""
    parser.add_argument("-o", "--outdir", required=True, help="output folder")
    src = parser.add_argument_group("what to simulate (choose one; default --preset demo-homo)")
    src.add_argument(
        "--preset",
        choices=["demo-homo", "demo-hetero", "demo-continuous"],
        help="built-in object: homogeneous (5000 images), 3 discrete states (6000), "
        "continuous hinge motion (6000); D=64, 5 A/px, SNR 0.1",
    )
    src.add_argument(
        "--builtin",
        choices=["protein", "states", "continuous"],
        help="built-in object without the preset's sizes",
    )
    src.add_argument("--volume", nargs="+", metavar="MRC", help="volume(s); several = states")
    src.add_argument(
        "--pdb", metavar="FILE", help="atomic model (PDB/mmCIF; several models = frames)"
    )
    src.add_argument("--config", metavar="YAML", help="a simulation.yaml (options below override)")
    opt = parser.add_argument_group("dataset")
    opt.add_argument("-n", "--n-particles", type=int, help="number of images")
    opt.add_argument("-D", "--box", type=int, dest="D", help="box size in px (even)")
    opt.add_argument("--apix", type=float, dest="apix_A", help="pixel size in A")
    opt.add_argument("--weights", type=float, nargs="+", help="populations of the volumes/states")
    opt.add_argument("--n-states", type=int, help="built-in discrete states (2-4)")
    opt.add_argument("--n-frames", type=int, help="built-in continuous frames")
    opt.add_argument(
        "--motion-amplitude", type=float, help="built-in motion: fraction (0, 1] of the hinge swing"
    )
    opt.add_argument(
        "--bfactor", type=float, dest="atomic_bfactor_A2", help="B (A^2) added to atoms"
    )
    opt.add_argument(
        "--atom-bfactors", action="store_true", help="use the model's atomic B-factors"
    )
    opt.add_argument("--poses", dest="rotations_path", help="poses to use (.npz/.star/.cs)")
    opt.add_argument("--shift-px", type=float, help="translation scale in px (default 2)")
    opt.add_argument("--shift-distribution", choices=["gaussian", "uniform"])
    opt.add_argument("--defocus-min-um", type=float, help="minimum mean defocus (default 1.0)")
    opt.add_argument("--defocus-max-um", type=float, help="maximum mean defocus (default 2.5)")
    opt.add_argument("--astig-max-A", type=float, dest="astig_max_A", help="max dfU - dfV (A)")
    opt.add_argument("--voltage", type=float, dest="voltage_kV", help="kV (default 300)")
    opt.add_argument("--cs", type=float, dest="cs_mm", help="mm (default 2.7)")
    opt.add_argument("--amp-contrast", type=float, help="amplitude contrast (default 0.1)")
    opt.add_argument("--ctf-bfactor", type=float, dest="ctf_bfactor_A2", help="CTF envelope B")
    opt.add_argument("--snr", type=float, help="signal variance / noise variance (default 0.1; "
                     "'inf' for no noise)")  # fmt: skip
    opt.add_argument(
        "--snr-region", choices=["image", "particle"], help="where signal variance is measured"
    )
    opt.add_argument("--junk-fraction", type=float, help="fraction of junk images (label -1)")
    opt.add_argument(
        "--junk-kinds", nargs="+", choices=["noise", "fragment", "other"], help="junk types"
    )
    opt.add_argument("--no-invert", action="store_true", help="write dark-on-light images")
    opt.add_argument("--oversample", type=int, help="Fourier-slice padding factor (default 2)")
    opt.add_argument("--chunk-size", type=int, help="images per chunk (default 500)")
    opt.add_argument("--seed", type=int, help="random seed (default 0)")


def build_config(args: argparse.Namespace):
    """The :class:`SimulationConfig` described by the command line."""
    from cryofield.simulate.dataset import SimulationConfig, preset_config

    chosen = [x for x in ("preset", "builtin", "volume", "pdb") if getattr(args, x, None)]
    if len(chosen) > 1:
        raise CryofieldError(f"choose one of --preset/--builtin/--volume/--pdb, got {chosen}")
    if args.config:
        cfg = SimulationConfig.from_yaml(args.config)
    elif args.preset or not chosen:
        cfg = preset_config(args.preset or "demo-homo")
    else:
        cfg = SimulationConfig()
    if args.builtin:
        cfg.source = args.builtin
    if args.volume:
        cfg = dataclasses.replace(
            cfg, source="volumes", volume_paths=list(args.volume), D=None, apix_A=None
        )
    if args.pdb:
        cfg = dataclasses.replace(cfg, source="atomic", atomic_path=args.pdb, D=None, apix_A=None)
    simple = [
        "n_particles", "D", "apix_A", "weights", "n_states", "n_frames", "motion_amplitude",
        "atomic_bfactor_A2",
        "rotations_path", "shift_px", "shift_distribution", "astig_max_A", "voltage_kV",
        "cs_mm", "amp_contrast", "ctf_bfactor_A2", "snr_region", "junk_fraction",
        "junk_kinds", "oversample", "chunk_size", "seed",
    ]  # fmt: skip
    for name in simple:
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, value)
    if args.atom_bfactors:
        cfg.use_atom_bfactors = True
    if args.snr is not None:
        cfg.snr = None if math.isinf(args.snr) else args.snr
    if args.defocus_min_um is not None:
        cfg.defocus_min_A = args.defocus_min_um * 1e4
    if args.defocus_max_um is not None:
        cfg.defocus_max_A = args.defocus_max_um * 1e4
    if args.no_invert:
        cfg.invert = False
    if cfg.source == "atomic" and cfg.apix_A is None:
        raise CryofieldError("--pdb needs --apix (pixel size in A)")
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    """Simulate and print a summary."""

    from cryofield.io.atomic import refuse_overwrite
    from cryofield.logs import setup_logging
    from cryofield.simulate.dataset import simulate_dataset

    cfg = build_config(args)
    outdir = Path(args.outdir)
    names = ("particles.mrcs", "particles.star", "particles.cs", "truth.npz", "simulation.yaml",
             "run.log")  # fmt: skip
    outputs = [outdir / n for n in names]
    outputs += [*outdir.glob("volumes/state_*.mrc"), *outdir.glob("volumes/junk_*.mrc")]
    inputs = [*(getattr(cfg, "volume_paths", None) or []), getattr(cfg, "atomic_path", None),
              getattr(cfg, "rotations_path", None), args.config]  # fmt: skip
    refuse_overwrite(outputs, inputs)
    setup_logging(outdir)
    simulate_dataset(cfg, outdir)
    from cryofield.analysis.evaluate import load_truth

    truth = load_truth(outdir / "truth.npz")
    n_junk = int(truth["is_junk"].sum())
    D, apix = int(truth["D"]), float(truth["apix_A"])
    n_vol = len(truth["volume_paths"])
    print(
        f"wrote {cfg.n_particles} particles ({n_junk} junk), D={D}, {apix:.3f} A/px, "
        f"{n_vol} true volume(s), SNR {cfg.snr} to {outdir}/ "
        "(particles.mrcs, particles.star, particles.cs, truth.npz)"
    )
    return 0
