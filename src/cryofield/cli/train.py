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

#: TrainConfig keys that have a command-line flag: key -> (flag, help). The type and the
#: default come from :class:`~cryofield.inference.config.TrainConfig`; every other key is
#: set with --config FILE.
FLAGS: dict[str, tuple[str, str]] = {
    "datadir": ("--datadir", "folder to resolve relative image paths against"),
    "ind": ("--ind", "index file (.npy/.txt) selecting particles"),
    "D": ("-D", "training box (Fourier-cropped; default: input box)"),
    "zdim": ("--zdim", "latent dimension (0: homogeneous)"),
    "epochs": ("--epochs", "total epochs (default: chosen from N, see docs/train.md)"),
    "hps_images": ("--hps-images", "images seen with global pose search (default max(3e4, 2N))"),
    "field_images": ("--field-images", "images of field training after refinement"),
    "batch_size": ("-b", "images per batch (default 32 on CPU, 64 on CUDA)"),
    "lr_field": ("--lr-field", "field learning rate"),
    "lr_pose": ("--lr-pose", "pose table learning rate (heterogeneous runs)"),
    "lr_latent": ("--lr-latent", "latent table learning rate"),
    "hidden": ("--hidden", "MLP width (default 128 on CPU, 256 on CUDA)"),
    "layers": ("--layers", "residual hidden layers"),
    "n_freqs": ("--n-freqs", "random Fourier features"),
    "refine_iters": ("--refine-iters", "most half-map refinement iterations (0: none)"),
    "t_extent_px": ("--t-extent", "translation search extent, px (default D/10)"),
    "search_levels": ("--search-levels", "pose search subdivisions"),
    "base_nside": ("--base-nside", "HEALPix nside of the base grid"),
    "base_psi": ("--base-psi", "in-plane angles of the base grid"),
    "radius_start_px": ("--radius-start", "first search radius, px (default from 53 A)"),
    "radius_search_px": ("--radius-search", "last search radius, px (default from 20 A)"),
    "radius_max_px": ("--radius-max", "training radius after the search, px (Nyquist)"),
    "search_extend": ("--search-extend", "most extra search, in planned search epochs, while "
                      "the poses have not settled (default 1; 0 with --epochs)"),
    "poses_from_file": ("--poses-from-file", "use the poses of the particle file"),
    "refine_poses": ("--refine-poses", "refine the poses (default: yes ab initio, no with "
                     "--poses-from-file)"),
    "contrast": ("--contrast", "particle contrast; light-on-dark stacks (RELION/cryoSPARC) "
                 "are inverted to meet the CTF (auto: guessed from the images and logged)"),
    "window": ("--window", "real-space soft window on the images"),
    "device": ("--device", "auto (cuda when a GPU is seen, else cpu), cpu, cuda or cuda:N"),
    "amp": ("--amp", "bf16 autocast on CUDA"),
    "deterministic": ("--deterministic", "deterministic kernels"),
    "seed": ("--seed", "random seed"),
    "num_threads": ("--threads", "CPU threads for torch (default: all cores)"),
}  # fmt: skip

_CHOICES = {"contrast": ["auto", "light-on-dark", "dark-on-light"]}


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
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    defaults = TrainConfig()
    for key, (flag, text) in FLAGS.items():
        typ = _field_type(str(fields[key].type))
        default = getattr(defaults, key)
        if default not in (None, "") and typ is not bool:
            text = f"{text} (default {default})"
        if typ is bool:
            parser.add_argument(flag, dest=key, default=None, help=text,
                                action=argparse.BooleanOptionalAction)  # fmt: skip
        else:
            parser.add_argument(flag, dest=key, type=typ, default=None, help=text,
                                choices=_CHOICES.get(key))  # fmt: skip
    parser.add_argument("--invert", action="store_true", help="same as --contrast light-on-dark")


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig keys given on the command line."""
    out = {k: getattr(args, k) for k in FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "invert", False):
        out["contrast"] = "light-on-dark"
    return out


def run(args: argparse.Namespace) -> int:
    """Run ``cryofield train``."""
    from cryofield.inference.config import TrainConfig
    from cryofield.inference.trainer import resume, train

    given = _given(args)
    if args.resume:
        ignored = sorted(FLAGS[k][0] if k in FLAGS else "--invert" for k in given if k != "epochs")
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
    for key, value in given.items():
        setattr(cfg, key, value)
    cfg.particles, cfg.outdir = str(args.particles), str(args.outdir)
    cfg.validate()
    out = train(cfg, inputs=[args.config])
    print(f"training output in {out}")
    return 0
