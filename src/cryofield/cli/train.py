"""Neural ab initio / fixed-pose reconstruction (homogeneous or heterogeneous).

Learns a neural field V(k, z) in Hartley space, a pose per image (hierarchical pose
search, then gradient refinement of the pose table) and, with --zdim > 0, a latent z per
image. Writes OUTDIR/config.yaml, run.log, metrics.jsonl, particles.npz, epoch_NNN/
(weights.pt, state.pt, poses.npz, latents.npz or volume.mrc, DONE) and particles.star.

examples:
  cryofield train particles.star -o run_homo --epochs 10
  cryofield train particles.cs -o run_het --zdim 8 -D 64 --device cuda
  cryofield train particles.star -o run_fixed --poses-from-file --zdim 8
  cryofield train --resume run_homo --epochs 20
"""

from __future__ import annotations

import argparse

from cryofield.errors import CryofieldError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``cryofield train``."""
    parser.add_argument("particles", nargs="?", help=".star, .cs, .mrcs, .txt or .npz particles")
    parser.add_argument("-o", "--outdir", help="output folder (new)")
    parser.add_argument("--resume", metavar="OUTDIR", help="continue the run in OUTDIR")
    parser.add_argument("--datadir", help="folder to resolve relative image paths against")
    parser.add_argument("--ind", help="index file (.npy/.txt) selecting particles")
    parser.add_argument("-D", type=int, help="training box (Fourier-cropped; default: input box)")
    parser.add_argument("--zdim", type=int, default=0, help="latent dimension (0: homogeneous)")
    parser.add_argument("--epochs", type=int, help="total epochs (default 20)")
    parser.add_argument("--hps-images", type=int, help="images seen with pose search (5e5)")
    parser.add_argument("-b", "--batch-size", type=int, help="images per batch (default 64)")
    parser.add_argument("--steps-per-batch", type=int, help="optimiser steps per search batch (1)")
    parser.add_argument("--lr-field", type=float, help="field learning rate (1e-4)")
    parser.add_argument("--lr-pose", type=float, help="pose table learning rate (1e-3)")
    parser.add_argument("--lr-latent", type=float, help="latent table learning rate (1e-2)")
    parser.add_argument(
        "--latent-init",
        choices=["pca", "random"],
        help="start z by linear variability analysis at the poses found (pca, default) or "
        "keep the random start",
    )
    parser.add_argument(
        "--latent-init-radius", type=float, help="Fourier radius of that analysis, px (D/4)"
    )
    parser.add_argument("--hidden", type=int, help="MLP width (256)")
    parser.add_argument("--layers", type=int, help="residual hidden layers (3)")
    parser.add_argument("--n-freqs", type=int, help="random Fourier features (64)")
    parser.add_argument("--sigma", type=float, help="random Fourier feature scale (0.5)")
    parser.add_argument("--t-extent", type=float, help="translation search extent, px")
    parser.add_argument("--search-levels", type=int, help="pose search subdivisions (4)")
    parser.add_argument("--base-nside", type=int, help="HEALPix nside of the base grid (4)")
    parser.add_argument("--base-psi", type=int, help="in-plane angles of the base grid (24)")
    parser.add_argument("--radius-start", type=float, help="first search radius, px")
    parser.add_argument("--radius-search", type=float, help="last search radius, px")
    parser.add_argument("--radius-max", type=float, help="training radius after search, px")
    parser.add_argument(
        "--latent-warmup",
        type=float,
        metavar="FRAC",
        help="fraction of the search epochs with z = 0 (consensus) before the latents start "
        "from PCA and the search uses each image's z (default 0: z from the start)",
    )
    parser.add_argument(
        "--no-latent-refresh",
        action="store_true",
        help="set z by variability analysis only at the first search epoch with z and after "
        "the search (default: at the start of every search epoch from the current poses)",
    )
    parser.add_argument(
        "--search-groups", type=int, help="reference volumes per batch in the search (8)"
    )
    parser.add_argument(
        "--research-epochs", type=int,
        help="global search epochs again after the gradient epochs (heterogeneous: 1, else 0)",
    )  # fmt: skip
    parser.add_argument(
        "--local-refine-epochs", type=int, help="last epochs with a local pose search (1)"
    )
    parser.add_argument("--poses-from-file", action="store_true", help="use the file's poses")
    parser.add_argument(
        "--refine-poses",
        action="store_true",
        help="with --poses-from-file: also refine the file's poses (default: kept fixed)",
    )
    parser.add_argument(
        "--no-refine-poses", action="store_true", help="ab initio: no pose refinement after search"
    )
    parser.add_argument(
        "--contrast",
        choices=["auto", "light-on-dark", "dark-on-light"],
        default="auto",
        help="particle contrast; light-on-dark stacks (RELION/cryoSPARC) are inverted to "
        "meet the CTF (default auto: guessed from the images and logged)",
    )
    parser.add_argument("--invert", action="store_true", help="same as --contrast light-on-dark")
    parser.add_argument("--no-window", action="store_true", help="no real-space soft window")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--deterministic", action="store_true", help="deterministic kernels")
    parser.add_argument("--seed", type=int, help="random seed (0)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")


_MAP = {
    "D": "D", "zdim": "zdim", "epochs": "epochs", "hps_images": "hps_images",
    "batch_size": "batch_size", "steps_per_batch": "steps_per_batch", "lr_field": "lr_field",
    "lr_pose": "lr_pose",
    "lr_latent": "lr_latent", "latent_init": "latent_init",
    "latent_init_radius": "latent_init_radius_px", "hidden": "hidden", "layers": "layers",
    "n_freqs": "n_freqs",
    "sigma": "sigma", "t_extent": "t_extent_px", "search_levels": "search_levels",
    "base_nside": "base_nside", "base_psi": "base_psi", "radius_start": "radius_start_px",
    "radius_search": "radius_search_px", "radius_max": "radius_max_px",
    "search_groups": "het_search_groups", "device": "device", "latent_warmup": "latent_warmup",
    "local_refine_epochs": "local_refine_epochs", "research_epochs": "research_epochs",
    "seed": "seed", "threads": "num_threads", "datadir": "datadir", "ind": "ind",
}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run ``cryofield train``."""
    from cryofield.inference.config import TrainConfig
    from cryofield.inference.trainer import resume, train

    if args.resume:
        out = resume(args.resume, epochs=args.epochs)
        print(f"resumed run in {out}")
        return 0
    if not args.particles or not args.outdir:
        raise CryofieldError("give PARTICLES and -o OUTDIR (or --resume OUTDIR)")
    cfg = TrainConfig(particles=str(args.particles), outdir=str(args.outdir))
    for arg, key in _MAP.items():
        value = getattr(args, arg)
        if value is not None:
            setattr(cfg, key, value)
    cfg.poses_from_file = bool(args.poses_from_file)
    if args.refine_poses and args.no_refine_poses:
        raise CryofieldError("give --refine-poses or --no-refine-poses, not both")
    if args.refine_poses or args.no_refine_poses:
        cfg.refine_poses = bool(args.refine_poses)
    cfg.latent_refresh = not args.no_latent_refresh
    cfg.contrast = "light-on-dark" if args.invert else args.contrast
    cfg.window = not args.no_window
    cfg.amp = not args.no_amp
    cfg.deterministic = bool(args.deterministic)
    cfg.validate()
    out = train(cfg)
    print(f"training output in {out}")
    return 0
