"""Neural ab initio / fixed-pose reconstruction (homogeneous or heterogeneous).

Learns a neural field V(k, z) in Hartley space, a pose per image (hierarchical pose
search, then gradient refinement of the pose table) and, with --zdim > 0, a latent z per
image. Writes OUTDIR/config.yaml, run.log, metrics.jsonl, particles.npz, epoch_NNN/
(weights.pt, state.pt, poses.npz, latents.npz or volume.mrc, DONE) and particles.star.

Every setting not given is chosen from the data and the machine (box, pixel size, number of
images, CPU/GPU) and written, with the chosen values, to OUTDIR/config.yaml and run.log.
Settings without a flag are keys of that file: give them with --config FILE (a yaml file
with any of config.yaml's keys); flags override the file.

One run at a time uses OUTDIR (OUTDIR/.lock); no input file is ever written over. A run
starts only when the disk holds its checkpoints, and stops with an error (exit 2) when the
loss diverges (then lower --lr-field).

examples:
  cryofield train particles.star -o run_homo
  cryofield train particles.star -o run_homo --config my_settings.yaml
  cryofield train particles.cs -o run_het --zdim 8 -D 64 --device cuda
  cryofield train particles.star -o run_fixed --poses-from-file --zdim 8
  cryofield train --resume run_homo --epochs 20   # continue to epoch 20
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from cryofield.errors import CryofieldError


def _flags() -> dict[str, dataclasses.Field[Any]]:
    """The TrainConfig fields that have a command-line flag (``metadata["flag"]``, with
    ``metadata["help"]``), in the dataclass's order; every other key is set with
    --config FILE."""
    from cryofield.inference.config import TrainConfig

    return {f.name: f for f in dataclasses.fields(TrainConfig) if "flag" in f.metadata}


def _field_type(annotation: str) -> type:
    for name, typ in (("bool", bool), ("int", int), ("float", float)):
        if name in annotation:
            return typ
    return str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``cryofield train`` (generated from TrainConfig)."""
    from cryofield.inference.config import TrainConfig

    parser.add_argument("particles", nargs="?", help=".star, .cs, .mrcs, .txt or .npz particles")
    parser.add_argument("-o", "--outdir", help="output folder (new)")
    parser.add_argument("--resume", metavar="OUTDIR", help="continue the run in OUTDIR")
    parser.add_argument("--config", metavar="FILE", help="yaml file of TrainConfig keys")
    defaults = TrainConfig()
    for key, f in _flags().items():
        flag, text = f.metadata["flag"], f.metadata["help"]
        typ = _field_type(str(f.type))
        default = getattr(defaults, key)
        if default not in (None, "") and typ is not bool:
            text = f"{text} (default {default})"
        if typ is bool:
            parser.add_argument(flag, dest=key, default=None, help=text,
                                action=argparse.BooleanOptionalAction)  # fmt: skip
        else:
            parser.add_argument(flag, dest=key, type=typ, default=None, help=text,
                                choices=f.metadata.get("choices"))  # fmt: skip
    parser.add_argument("--invert", action="store_true", help="same as --contrast light-on-dark")


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig keys given on the command line."""
    out = {k: getattr(args, k) for k in _flags() if getattr(args, k, None) is not None}
    if getattr(args, "invert", False):
        out["contrast"] = "light-on-dark"
    return out


def run(args: argparse.Namespace) -> int:
    """Run ``cryofield train``."""
    from cryofield.inference.config import TrainConfig
    from cryofield.inference.runner import resume, train

    given = _given(args)
    if args.resume:
        flags = {k: f.metadata["flag"] for k, f in _flags().items()}
        ignored = sorted(flags.get(k, "--invert") for k in given if k != "epochs")
        if args.config or args.particles or args.outdir:
            ignored += [x for x, v in (("--config", args.config), ("PARTICLES", args.particles),
                                       ("-o", args.outdir)) if v]  # fmt: skip
        if ignored:
            raise CryofieldError(
                f"--resume continues with the settings in {args.resume}/config.yaml and would "
                f"ignore {', '.join(ignored)}; give only --epochs, or start a new run with -o"
            )
        out = resume(args.resume, epochs=args.epochs)
        print(f"resumed run in {out}")
        return 0
    if not args.particles or not args.outdir:
        raise CryofieldError("give PARTICLES and -o OUTDIR (or --resume OUTDIR)")
    cfg = TrainConfig.load(args.config) if args.config else TrainConfig()
    cfg.search_restart, cfg.planned_search = 0, None  # a previous run's attempt is not this one's
    for key, value in given.items():
        setattr(cfg, key, value)
    cfg.particles, cfg.outdir = str(args.particles), str(args.outdir)
    cfg.validate()
    out = train(cfg, inputs=[args.config])
    print(f"training output in {out}")
    return 0
