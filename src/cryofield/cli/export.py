"""Export a run's poses, latents and clusters to RELION (.star) or cryoSPARC (.cs).

Writes the run's input particles (every original column, the optics block, image paths
pointing at the original stacks) with the poses of the chosen epoch in the target's own
convention: RELION rlnAngleRot/Tilt/Psi + rlnOriginX/YAngst, cryoSPARC alignments3D/pose
(axis-angle) + alignments3D/shift (px). A run trained on the output of 'cryofield
downsample' exports the ORIGINAL particles (their images, box, pixel size and optics
block; shifts at their pixel size), or the downsampled ones with --write-downsampled.
Latents go to numbered columns (rlnCryofieldZ01.., cryofield/z01..); the k-means clusters
that 'cryofield analyze' saved go to rlnClassNumber (cluster + 1) / alignments3D/class.
--ind (rows of the training input file) and --clusters export only those particles;
--ksample must match analyze's K (without analyze output it clusters with that K).
--flip-hand mirrors the poses so that they reconstruct the mirror image of the map, and
writes the mirrored map of the epoch (homogeneous runs) next to the output as
<name>_flipped_hand.mrc. An unfinished run exports its last complete epoch and says so.
A run trained with --symmetry or --mask records them in the output: '# cryofield:'
comment lines at the top of a .star (RELION's axes: give the same --sym to RELION), a
sidecar <name>.cs.cryofield.yaml next to a .cs. A Dn run's .cs poses are rotated into
cryoSPARC's axes (2-fold on y, not x) and its map is written beside them in those axes
as <name>_cryosparc_axes.mrc (docs/export.md, 'Symmetry and mask').

examples:
  cryofield export out/ -o out/refine_me.star
  cryofield export out/ --epoch 20 -o particles.cs --flip-hand
  cryofield analyze out/ --ksample 10 && cryofield export out/ --clusters 1,3 -o state13.star
  cryofield export out/ --ind good.npy -o good.cs
  cryofield export out_64px/ -o full_res.star      # trained on 'downsample' output
"""

from __future__ import annotations

import argparse

from cryofield.errors import CryofieldError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cryofield export``."""
    parser.add_argument("outdir", help="output folder of 'cryofield train'")
    parser.add_argument("-o", "--out", required=True, help="output file, .star or .cs")
    parser.add_argument("--epoch", type=int, help="epoch to export (default: last complete)")
    parser.add_argument(
        "--ind",
        help="only these particles: .npy/.txt of 0-based rows of the training input file",
    )
    parser.add_argument(
        "--clusters", help="only these k-means clusters of 'cryofield analyze', e.g. 1,3"
    )
    add_cluster_k_argument(parser)
    parser.add_argument(
        "--flip-hand", action="store_true", help="mirror poses (and the map) to the other hand"
    )
    add_downsampled_argument(parser)


def add_cluster_k_argument(parser: argparse.ArgumentParser) -> None:
    """``--ksample`` of ``select`` and ``export``."""
    parser.add_argument(
        "--ksample", "--n-clusters", dest="n_clusters", type=int,
        help="k-means K: must match the K 'cryofield analyze' saved (default: that K); "
        "without analyze output, cluster here with this K",
    )  # fmt: skip


def add_downsampled_argument(parser: argparse.ArgumentParser) -> None:
    """``--write-downsampled`` of ``select`` and ``export``."""
    parser.add_argument(
        "--write-downsampled", action="store_true",
        help="for a run trained on the output of 'cryofield downsample': write the "
        "downsampled particles instead of the original ones they link to",
    )  # fmt: skip


def parse_clusters(text: str | None) -> list[int] | None:
    """``--clusters`` of ``select`` and ``export`` (``"1,3"`` -> ``[1, 3]``; None stays None)."""
    if text is None:
        return None
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise CryofieldError(f"--clusters: expected integers like 1,3, got {text!r}") from None
    if not vals:
        raise CryofieldError("--clusters: no cluster given")
    return vals


def run(args: argparse.Namespace) -> int:
    """Run ``cryofield export``."""
    from cryofield.analysis.export import export_run

    path, n, ep = export_run(
        args.outdir, args.out, epoch=args.epoch, ind=args.ind,
        clusters=parse_clusters(args.clusters), n_clusters=args.n_clusters,
        flip_hand=args.flip_hand, downsampled=args.write_downsampled,
    )  # fmt: skip
    hand = ", hand flipped" if args.flip_hand else ""
    print(f"wrote {n} particles (epoch {ep}{hand}) to {path}")
    _symmetry_note(args.outdir, path, epoch=ep)
    return 0


def _symmetry_note(outdir: str, path: object, epoch: int | None = None) -> None:
    """Say which point group the exported poses assume (config.yaml ``symmetry``; with
    ``epoch``, as :func:`cryofield.analysis.export.run_symmetry` finds it for that epoch)."""
    from cryofield.inference.rundir import RunDir
    from cryofield.io.export import cryosparc_axes
    from cryofield.physics.symmetry import SymmetryError, canonical_symmetry

    try:
        if epoch is None:
            sym = canonical_symmetry(str(RunDir(outdir).config().get("symmetry") or "C1"))
        else:
            from cryofield.analysis.export import run_symmetry

            sym = run_symmetry(RunDir(outdir), epoch, quiet=True)
    except (SymmetryError, CryofieldError, OSError):
        return
    if sym == "C1":
        return
    extra = ""
    if str(path).lower().endswith(".cs"):
        Q, axes, note = cryosparc_axes(sym)
        if Q is not None:
            extra = " (poses rotated into cryoSPARC's axes: 2-fold on y)"
        elif axes != "cryoSPARC":
            extra = f" ({note})"
    elif sym.startswith("D"):
        extra = (" (RELION's axes: 2-fold on x; cryoSPARC puts it on y, see docs/train.md, "
                 "'Symmetry')")  # fmt: skip
    print(f"note: {path}: the run imposed symmetry {sym}; each pose is one of the image's "
          f"equivalent poses: reconstruct or refine them with symmetry {sym}{extra}")  # fmt: skip
