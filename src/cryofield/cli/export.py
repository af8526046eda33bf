"""Export a run's poses, latents and clusters to RELION (.star) or cryoSPARC (.cs).

Writes the run's input particles (every original column, the optics block, image paths
pointing at the original stacks) with the poses of the chosen epoch in the target's own
convention: RELION rlnAngleRot/Tilt/Psi + rlnOriginX/YAngst, cryoSPARC alignments3D/pose
(axis-angle) + alignments3D/shift (px). Latents go to numbered columns (rlnCryofieldZ01..,
cryofield/z01..); k-means clusters of 'cryofield analyze' (when it has run, or when
--clusters asks for them) to rlnClassNumber (cluster + 1) / alignments3D/class. --ind and
--clusters export only those particles. --flip-hand mirrors the poses so that they
reconstruct the mirror image of the map, and writes the mirrored map of the epoch
(homogeneous runs) next to the output as <name>_flipped_hand.mrc. An unfinished run
exports its last complete epoch and says so.

examples:
  cryofield export out/ -o out/refine_me.star
  cryofield export out/ --epoch 20 -o particles.cs --flip-hand
  cryofield export out/ --clusters 1,3 -o state13.star
  cryofield export out/ --ind good.npy -o good.cs
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from cryofield.errors import CryofieldError
from cryofield.logs import get_logger

_log = get_logger("export")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cryofield export``."""
    parser.add_argument("outdir", help="output folder of 'cryofield train'")
    parser.add_argument("-o", "--out", required=True, help="output file, .star or .cs")
    parser.add_argument("--epoch", type=int, help="epoch to export (default: last complete)")
    parser.add_argument(
        "--ind", help="only these particles: .npy/.txt of 0-based rows of the run's input table"
    )
    parser.add_argument(
        "--clusters", help="only these k-means clusters of 'cryofield analyze', e.g. 1,3"
    )
    parser.add_argument(
        "--ksample", "--n-clusters", dest="n_clusters", type=int,
        help="k-means K used by analyze (default: the K analyze saved, else 20)",
    )  # fmt: skip
    parser.add_argument(
        "--flip-hand", action="store_true", help="mirror poses (and the map) to the other hand"
    )


# ----------------------------------------------------------------------------- steps
def choose_epoch(run: Any, epoch: int | None) -> int:
    """The epoch to export; for an unfinished run, the last complete one (logged)."""
    done = run.epochs()
    if not done:
        raise CryofieldError(
            f"{run.path}: no complete epoch yet (no epoch_NNN/DONE): nothing to export"
        )
    if epoch is not None:
        if epoch not in done:
            raise CryofieldError(
                f"{run.path}: epoch {epoch} is missing or incomplete (complete epochs: "
                f"{_ranges(done)})"
            )
        return int(epoch)
    last = done[-1]
    planned = run.config().get("epochs")
    partial = sorted(
        int(p.name.split("_")[1])
        for p in run.path.glob("epoch_*")
        if p.is_dir() and p.name.split("_")[1].isdigit() and not (p / "DONE").is_file()
    )
    if (isinstance(planned, int) and last < planned) or partial:
        why = f"{last} of {planned} epochs complete" if isinstance(planned, int) else ""
        if partial:
            why = (why + "; " if why else "") + f"epoch {partial[-1]} incomplete"
        msg = f"the run is unfinished ({why}): exporting epoch {last}, its last complete checkpoint"
        _log.warning(msg)
        print(f"note: {msg}")
    return last


def _ranges(values: list[int]) -> str:
    return ", ".join(map(str, values)) if len(values) <= 8 else f"{values[0]}..{values[-1]}"


def load_run_table(run: Any) -> Any:
    """The run's input table: ``OUTDIR/particles.npz``, else the config's particle file."""
    from cryofield.io.metadata import load_particle_table

    if (run.path / "particles.npz").is_file():
        return run.table()
    cfg = run.config()
    particles = cfg.get("particles")
    if not particles:
        raise CryofieldError(f"{run.path}: no particles.npz and no particles path in config.yaml")
    _log.info("no %s; reading %s", run.path / "particles.npz", particles)
    return load_particle_table(particles, datadir=cfg.get("datadir"), ind=cfg.get("ind"))


def check_table(run: Any, table: Any, poses: dict[str, np.ndarray], epoch: int) -> np.ndarray:
    """Row of ``table`` of each pose; refuses a table that does not match the run."""
    index = np.asarray(poses["particle_index"], dtype=np.int64)
    n_run = len(index)
    if len(table) != n_run or (n_run and (index.min() < 0 or index.max() >= len(table))):
        raise CryofieldError(
            f"{table.source_path}: the particle table has {len(table)} rows but epoch {epoch} "
            f"of {run.path} has poses for {n_run} particles (rows up to "
            f"{int(index.max()) if n_run else -1}); the table no longer matches the run"
        )
    return index


def cluster_labels(run: Any, epoch: int, n_clusters: int | None, required: bool) -> Any:
    """k-means labels of the run (one per pose row), or None.

    Without ``required``, labels are returned only when ``analyze`` saved them for this
    epoch (``OUTDIR/analyze.EPOCH/analysis.npz``); with it, k-means is computed the same
    way as ``analyze`` when it has not run.
    """
    from cryofield.analysis.report import kmeans_for_run

    saved = run.path / f"analyze.{epoch}" / "analysis.npz"
    k_saved = None
    if saved.is_file():
        with np.load(saved, allow_pickle=False) as f:
            if "kmeans_centers" in f.files:
                k_saved = len(f["kmeans_centers"])
    if k_saved is None and not required:
        return None
    if run.latents(epoch) is None:
        if required:
            raise CryofieldError(f"{run.path}: homogeneous run (no latents): there are no clusters")
        return None
    if k_saved is None:
        print(f"note: 'cryofield analyze' has not run for epoch {epoch}; computing its k-means")
    return kmeans_for_run(run, epoch, n_clusters or k_saved)


def _parse_clusters(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise CryofieldError(f"--clusters: expected integers like 1,3, got {text!r}") from None
    if not vals:
        raise CryofieldError("--clusters: no cluster given")
    return vals


def export_run(
    outdir: str | Path,
    out: str | Path,
    epoch: int | None = None,
    ind: str | Path | np.ndarray | None = None,
    clusters: list[int] | None = None,
    n_clusters: int | None = None,
    flip_hand: bool = False,
) -> tuple[Path, int, int]:
    """Library form of ``cryofield export``; returns ``(path, n_written, epoch)``."""
    from cryofield.inference.rundir import RunDir
    from cryofield.io.export import write_particles
    from cryofield.io.metadata import load_index

    out = Path(out)
    if out.suffix.lower() not in (".star", ".cs"):
        raise CryofieldError(f"{out}: output must end in .star or .cs")
    run = RunDir(outdir)
    ep = choose_epoch(run, epoch)
    poses = run.poses(ep)
    table = load_run_table(run)
    index = check_table(run, table, poses, ep)
    rows = np.arange(len(index))
    km = cluster_labels(run, ep, n_clusters, required=clusters is not None)
    if clusters is not None:
        K = len(km.centers)
        bad = [c for c in clusters if not 0 <= c < K]
        if bad:
            raise CryofieldError(f"--clusters: {bad} out of range (clusters are 0..{K - 1})")
        rows = rows[np.isin(km.labels[rows], clusters)]
    if ind is not None:
        wanted = load_index(ind, len(table), table.source_path)
        missing = np.setdiff1d(wanted, index)
        if missing.size:
            raise CryofieldError(f"{ind}: {missing.size} indices (e.g. {int(missing[0])}) are not "
                                 "particles of this run")  # fmt: skip
        rows = rows[np.isin(index[rows], wanted)]
    if rows.size == 0:
        raise CryofieldError("the selection is empty: nothing to write")

    rotations = np.asarray(poses["rotations"], dtype=np.float64)[rows]
    if "shifts_A" in poses:
        shift_kw = {"shifts_A": np.asarray(poses["shifts_A"], dtype=np.float64)[rows]}
    else:  # training px -> input px through the box ratio
        scale = table.box_px / run.training_D()
        shift_kw = {"shifts_px": np.asarray(poses["shifts_px"], dtype=np.float64)[rows] * scale}
    if flip_hand:
        from cryofield.physics.handedness import flip_hand_poses

        rotations, _ = flip_hand_poses(rotations)
        _write_flipped_map(run, ep, out)
    z = run.latents(ep)
    write_particles(
        out, table, indices=index[rows], rotations=rotations,
        latents=None if z is None else z[rows],
        classes=None if km is None else km.labels[rows], **shift_kw,
    )  # fmt: skip
    return out, int(rows.size), ep


def _write_flipped_map(run: Any, epoch: int, out: Path) -> None:
    from cryofield.io.mrc import read_mrc, write_mrc
    from cryofield.physics.handedness import flip_hand_volume

    src = run.volume_path(epoch)
    if src is None:
        print(
            "note: heterogeneous run: no single map to mirror; maps rendered from this run "
            "have the old hand (mirror them with cryofield.physics.handedness.flip_hand_volume)"
        )
        return
    vol, info = read_mrc(src, mmap=False)
    dest = out.with_name(out.stem + "_flipped_hand.mrc")
    write_mrc(dest, flip_hand_volume(np.asarray(vol, dtype=np.float32)), info.apix_A)
    print(f"wrote the mirrored map of epoch {epoch} to {dest}")


def run(args: argparse.Namespace) -> int:
    """Run ``cryofield export``."""
    clusters = _parse_clusters(args.clusters) if args.clusters is not None else None
    path, n, ep = export_run(
        args.outdir, args.out, epoch=args.epoch, ind=args.ind, clusters=clusters,
        n_clusters=args.n_clusters, flip_hand=args.flip_hand,
    )  # fmt: skip
    hand = ", hand flipped" if args.flip_hand else ""
    print(f"wrote {n} particles (epoch {ep}{hand}) to {path}")
    return 0
