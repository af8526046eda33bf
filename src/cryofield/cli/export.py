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

examples:
  cryofield export out/ -o out/refine_me.star
  cryofield export out/ --epoch 20 -o particles.cs --flip-hand
  cryofield analyze out/ --ksample 10 && cryofield export out/ --clusters 1,3 -o state13.star
  cryofield export out/ --ind good.npy -o good.cs
  cryofield export out_64px/ -o full_res.star      # trained on 'downsample' output
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryofield.errors import CryofieldError
from cryofield.io.atomic import refuse_overwrite
from cryofield.logs import get_logger

_log = get_logger("export")


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
    """``particle_index`` of the poses; refuses a table that does not match the run.

    Pose row ``i`` goes with row ``i`` of the run's table (``particles.npz``, the input
    after ``--ind``); ``particle_index[i]`` is that particle's row in the training input
    file (the table's ``source_index``).
    """
    index = np.asarray(poses["particle_index"], dtype=np.int64)
    n_run = len(index)
    mismatch = len(table) != n_run
    if not mismatch and "source_index" in table._extra:
        mismatch = not np.array_equal(table.source_index, index)
    if mismatch:
        raise CryofieldError(
            f"{table.source_path}: the particle table has {len(table)} rows but epoch {epoch} "
            f"of {run.path} has poses for {n_run} particles (input rows up to "
            f"{int(index.max()) if n_run else -1}); the table no longer matches the run"
        )
    return index


def cluster_labels(run: Any, epoch: int, n_clusters: int | None, required: bool) -> Any:
    """k-means of the run (one label per pose row): the clustering ``analyze`` saved.

    ``OUTDIR/analyze.EPOCH/analysis.npz`` is used when it exists; a ``n_clusters`` that
    differs from its K is an error (cluster numbers refer to analyze's report). Without
    it, k-means is computed here only when ``n_clusters`` is given (same seed as
    ``analyze``, so the labels agree); ``required`` without either is an error that says
    to run ``cryofield analyze``. Returns None when not required and nothing is saved.
    """
    from cryofield.analysis.latent import default_n_clusters
    from cryofield.analysis.report import kmeans_for_run

    z = run.latents(epoch)
    if z is None:
        if required:
            raise CryofieldError(f"{run.path}: homogeneous run (no latents): there are no clusters")
        return None
    saved = run.path / f"analyze.{epoch}" / "analysis.npz"
    k_saved = None
    if saved.is_file():
        from cryofield.io.arrays import load_npz

        f = load_npz(saved, what="analysis file", remedy=f"re-run 'cryofield analyze "
                     f"{run.path} --epoch {epoch}'")  # fmt: skip
        if "kmeans_centers" in f and "kmeans_labels" in f:
            if len(f["kmeans_labels"]) == len(z):
                k_saved = len(f["kmeans_centers"])
    if k_saved is not None:
        if n_clusters is not None and default_n_clusters(len(z), n_clusters) != k_saved:
            raise CryofieldError(
                f"--ksample {n_clusters}: 'cryofield analyze' clustered epoch {epoch} into "
                f"K={k_saved} clusters ({saved}) and cluster numbers refer to that clustering; "
                f"leave --ksample out (or give {k_saved}), or first re-run 'cryofield analyze "
                f"{run.path} --epoch {epoch} --ksample {n_clusters}'"
            )
        return kmeans_for_run(run, epoch, k_saved)
    if not required:
        return None
    if n_clusters is None:
        raise CryofieldError(
            f"{run.path}: 'cryofield analyze' has not run for epoch {epoch} (no {saved}), so "
            f"there are no clusters to choose from: run 'cryofield analyze {run.path} --epoch "
            f"{epoch}' first (its report numbers the clusters), or give --ksample K to "
            "cluster here with K clusters (same seed as analyze)"
        )
    print(
        f"note: 'cryofield analyze' has not run for epoch {epoch}; computing its k-means "
        f"with K={n_clusters}"
    )
    return kmeans_for_run(run, epoch, n_clusters)


def _is_mask(ind: str | Path | np.ndarray) -> bool:
    """Whether ``--ind`` is a boolean mask (a bool array, or an index file holding one)."""
    from cryofield.errors import InputFileError
    from cryofield.io.indices import load_index_array

    try:
        return load_index_array(ind).dtype == np.bool_
    except InputFileError:  # a damaged file: load_index says what is wrong
        return False


def input_rows(run: Any, index: np.ndarray, ind: object) -> int:
    """Number of rows of the run's training input file (what a boolean ``--ind`` covers).

    Without ``--ind`` in training, the run's table is that file; else the file is read.
    """
    from cryofield.io.metadata import load_particle_table

    cfg = run.config()
    n_run = max(len(index), int(index.max()) + 1 if len(index) else 0)
    if not cfg.get("ind"):
        return n_run
    particles = cfg.get("particles")
    try:
        return len(load_particle_table(particles, datadir=cfg.get("datadir")))
    except (CryofieldError, OSError, TypeError) as err:
        raise CryofieldError(
            f"{ind}: a boolean mask covers the rows of the training input file {particles}, "
            f"which cannot be read to count them ({err}); give integer row indices instead"
        ) from None


def read_run_indices(
    run: Any, ind: str | Path | np.ndarray, index: np.ndarray, strict: bool
) -> np.ndarray:
    """``--ind`` of select/export as rows of the training input file.

    Integer indices are rows of that file; a boolean mask must have one entry per row (its
    True rows are chosen). With ``strict``, an index beyond the run's particles is an
    error; else the caller ignores indices that are not particles of the run.
    """
    from cryofield.io.indices import load_index

    if _is_mask(ind):
        return load_index(ind, input_rows(run, index, ind), f"{run.config().get('particles')}")
    n_max = int(index.max()) + 1 if strict else np.iinfo(np.int64).max
    return load_index(ind, n_max, f"{run.path} (its particle_index)")


def parse_clusters(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise CryofieldError(f"--clusters: expected integers like 1,3, got {text!r}") from None
    if not vals:
        raise CryofieldError("--clusters: no cluster given")
    return vals


@dataclass
class RunSelection:
    """Chosen particles of a run: what ``select`` and ``export`` write.

    ``rows`` are rows of the poses (and of ``table``); ``index[rows]`` are the chosen
    particles' rows in the training input file.
    """

    run: Any
    epoch: int
    table: Any
    poses: dict[str, np.ndarray]
    index: np.ndarray
    rows: np.ndarray
    labels: np.ndarray | None
    #: files read to make the selection: no output may be written over them
    inputs: list[Path] = dataclasses.field(default_factory=list)


def select_particles(
    outdir: str | Path,
    epoch: int | None = None,
    ind: str | Path | np.ndarray | None = None,
    clusters: list[int] | None = None,
    n_clusters: int | None = None,
    invert: bool = False,
    strict_ind: bool = True,
    drop_junk: bool = False,
) -> RunSelection:
    """Choose particles of a run by clusters and/or input indices (``--invert``: the others).

    ``drop_junk`` then removes the particles that ``analyze`` flagged as junk
    (``analyze.EPOCH/junk.npz``, key ``junk``, in the run's particle order).

    ``ind`` holds rows of the training input file (the values of ``particle_index``, e.g.
    ``analyze``'s ``junk_indices.npy`` or a ``select`` index file). Indices that are not
    particles of the run are an error with ``strict_ind``, else ignored with a note.
    """
    from cryofield.inference.rundir import RunDir

    if n_clusters is not None and n_clusters < 1:
        raise CryofieldError(f"--ksample must be >= 1, got {n_clusters}")
    run = RunDir(outdir)
    ep = choose_epoch(run, epoch)
    poses = run.poses(ep)
    table = load_run_table(run)
    index = check_table(run, table, poses, ep)
    chosen = np.ones(len(index), dtype=bool)
    required = clusters is not None or n_clusters is not None
    km = cluster_labels(run, ep, n_clusters, required=required)
    if clusters is not None:
        K = len(km.centers)
        bad = [c for c in clusters if not 0 <= c < K]
        if bad:
            raise CryofieldError(f"--clusters: {bad} out of range (clusters are 0..{K - 1})")
        chosen &= np.isin(km.labels, clusters)
    if ind is not None:
        wanted = read_run_indices(run, ind, index, strict_ind)
        missing = np.setdiff1d(wanted, index)
        if missing.size and strict_ind:
            raise CryofieldError(f"{ind}: {missing.size} indices (e.g. {int(missing[0])}) are not "
                                 "particles of this run")  # fmt: skip
        if missing.size:
            print(f"note: {missing.size} indices are not particles of this run; ignored")
        chosen &= np.isin(index, wanted)
    if invert:
        chosen = ~chosen
    if drop_junk:
        path = run.path / f"analyze.{ep}" / "junk.npz"
        if not path.is_file():
            raise CryofieldError(f"{path}: no junk scores; run 'cryofield analyze {run.path} "
                                 f"--epoch {ep}' first")  # fmt: skip
        from cryofield.io.arrays import load_npz

        remedy = f"re-run 'cryofield analyze {run.path} --epoch {ep}'"
        junk = np.asarray(load_npz(path, ("junk",), "junk file", remedy)["junk"], dtype=bool)
        if junk.shape != chosen.shape:
            raise CryofieldError(f"{path}: {junk.size} junk flags for {chosen.size} particles")
        print(f"dropping {int((chosen & junk).sum())} junk particles ({path})")
        chosen &= ~junk
    rows = np.flatnonzero(chosen)
    if rows.size == 0:
        raise CryofieldError("the selection is empty: nothing to write")
    inputs = [run.path / "config.yaml", run.path / "particles.npz"]
    inputs += [Path(p) for p in (run.config().get("particles"), table.source_path) if p]
    if isinstance(ind, (str, Path)):
        inputs.append(Path(ind))
    if drop_junk:
        inputs.append(run.path / f"analyze.{ep}" / "junk.npz")
    inputs += [p for p in [run.volume_path(ep)] if p is not None]
    return RunSelection(run, ep, table, poses, index, rows, None if km is None else km.labels,
                        inputs)  # fmt: skip


def write_selection(
    sel: RunSelection, out: str | Path, flip_hand: bool = False, downsampled: bool = False
) -> Path:
    """Write the chosen particles with the learned poses, latents and cluster classes.

    The particles are the run's input rows, or, when the run was trained on a star file
    written by ``cryofield downsample``, the ORIGINAL particles it links to (unless
    ``downsampled``); see :func:`cryofield.io.export.write_particles`.
    """
    from cryofield.io.export import write_particles
    from cryofield.io.star import has_original_link

    out = Path(out)
    if out.suffix.lower() not in (".star", ".cs"):
        raise CryofieldError(f"{out}: output must end in .star or .cs")
    run, rows, poses, table = sel.run, sel.rows, sel.poses, sel.table
    rotations = np.asarray(poses["rotations"], dtype=np.float64)[rows]
    if "shifts_A" in poses:
        shift_kw = {"shifts_A": np.asarray(poses["shifts_A"], dtype=np.float64)[rows]}
    else:  # training px -> input px through the box ratio
        scale = table.box_px / run.training_D()
        shift_kw = {"shifts_px": np.asarray(poses["shifts_px"], dtype=np.float64)[rows] * scale}
    if flip_hand:
        from cryofield.physics.handedness import flip_hand_poses

        rotations, _ = flip_hand_poses(rotations)
        _write_flipped_map(run, sel.epoch, out)
    z = run.latents(sel.epoch)
    write_particles(
        out, table, indices=rows, rotations=rotations,
        latents=None if z is None else z[rows],
        classes=None if sel.labels is None else sel.labels[rows], downsampled=downsampled,
        **shift_kw,
    )  # fmt: skip
    if has_original_link(table):
        if downsampled:
            print(f"note: {out}: the downsampled particles the run was trained on, as asked")
        else:
            print(
                f"note: {out}: the run was trained on downsampled particles ({table.box_px} px); "
                "wrote the ORIGINAL particles they link to (rlnImageOriginalName), at their "
                "own box and pixel size"
            )
    return out


def export_run(
    outdir: str | Path,
    out: str | Path,
    epoch: int | None = None,
    ind: str | Path | np.ndarray | None = None,
    clusters: list[int] | None = None,
    n_clusters: int | None = None,
    flip_hand: bool = False,
    downsampled: bool = False,
) -> tuple[Path, int, int]:
    """Library form of ``cryofield export``; returns ``(path, n_written, epoch)``."""
    out = Path(out)
    if out.suffix.lower() not in (".star", ".cs"):
        raise CryofieldError(f"{out}: output must end in .star or .cs")
    sel = select_particles(outdir, epoch, ind, clusters, n_clusters)
    refuse_overwrite([out, flipped_map_path(out)], sel.inputs)
    write_selection(sel, out, flip_hand=flip_hand, downsampled=downsampled)
    return out, int(sel.rows.size), sel.epoch


def flipped_map_path(out: str | Path) -> Path:
    """Where ``--flip-hand`` writes the mirrored map: ``<out stem>_flipped_hand.mrc``."""
    out = Path(out)
    return out.with_name(out.stem + "_flipped_hand.mrc")


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
    dest = flipped_map_path(out)
    write_mrc(dest, flip_hand_volume(np.asarray(vol, dtype=np.float32)), info.apix_A)
    print(f"wrote the mirrored map of epoch {epoch} to {dest}")


def run(args: argparse.Namespace) -> int:
    """Run ``cryofield export``."""
    clusters = parse_clusters(args.clusters) if args.clusters is not None else None
    path, n, ep = export_run(
        args.outdir, args.out, epoch=args.epoch, ind=args.ind, clusters=clusters,
        n_clusters=args.n_clusters, flip_hand=args.flip_hand,
        downsampled=args.write_downsampled,
    )  # fmt: skip
    hand = ", hand flipped" if args.flip_hand else ""
    print(f"wrote {n} particles (epoch {ep}{hand}) to {path}")
    return 0
