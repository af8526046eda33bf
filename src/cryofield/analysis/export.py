"""Choose particles of a training run and write them back to RELION / cryoSPARC.

The library of ``cryofield export`` and ``cryofield select``: :func:`select_particles`
chooses rows of a run (k-means clusters of ``analyze``, indices of the training input
file, ``--invert``, analyze's junk flags), :func:`write_selection` writes them with the
learned poses, latents and cluster classes through :func:`cryofield.io.export.
write_particles` (the one particle writer), and :func:`export_run` is ``export`` in one
call. A run trained on the output of ``cryofield downsample`` is written as its ORIGINAL
particles unless ``downsampled`` (see :mod:`cryofield.io.export`).

Symmetry and mask: the selection carries the point group the epoch's poses assume
(:func:`run_symmetry`) and the run's ``--mask`` (config.yaml ``mask``); the files record
both (:mod:`cryofield.io.export`: ``# cryofield:`` lines of a .star, the sidecar
``<name>.cs.cryofield.yaml`` of a .cs). A ``Dn`` run written to .cs has its poses in
cryoSPARC's axes (2-fold on y, ``R Q^T``), so the map of a homogeneous run is written
beside it rotated the same way, ``<name>_cryosparc_axes.mrc`` (or, with ``flip_hand``,
the mirrored map ``<name>_flipped_hand.mrc`` in those axes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cryofield.errors import CryofieldError
from cryofield.inference.rundir import CONFIG_FILE, STATE_FILE, TABLE_FILE, RunDir
from cryofield.io.atomic import refuse_overwrite

if TYPE_CHECKING:
    from cryofield.analysis.latent import KMeansResult
    from cryofield.io.metadata import ParticleTable

__all__ = [
    "RunSelection",
    "check_output_suffix",
    "check_table",
    "cluster_labels",
    "cryosparc_map_path",
    "export_run",
    "flipped_map_path",
    "index_file_path",
    "output_paths",
    "read_run_indices",
    "relion_to_cryosparc_volume",
    "run_symmetry",
    "select_particles",
    "write_index_file",
    "write_selection",
]

#: extensions of particle files the run can be written to
OUTPUT_SUFFIXES = (".star", ".cs")


def check_output_suffix(out: str | Path) -> Path:
    """``out`` as a Path; an error unless it ends in .star or .cs."""
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise CryofieldError(f"{out}: output must end in .star or .cs")
    return out


def check_table(
    run: RunDir, table: ParticleTable, poses: dict[str, np.ndarray], epoch: int
) -> np.ndarray:
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


def cluster_labels(
    run: RunDir, epoch: int, n_clusters: int | None, required: bool
) -> KMeansResult | None:
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
    saved = run.analyze_dir(epoch) / "analysis.npz"
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


def _input_rows(run: RunDir, index: np.ndarray, ind: object) -> int:
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
    run: RunDir, ind: str | Path | np.ndarray, index: np.ndarray, strict: bool
) -> np.ndarray:
    """``--ind`` of select/export as rows of the training input file.

    Integer indices are rows of that file; a boolean mask must have one entry per row (its
    True rows are chosen). With ``strict``, an index beyond the run's particles is an
    error; else the caller ignores indices that are not particles of the run.
    """
    from cryofield.io.indices import load_index

    if _is_mask(ind):
        return load_index(ind, _input_rows(run, index, ind), f"{run.config().get('particles')}")
    n_max = int(index.max()) + 1 if strict else np.iinfo(np.int64).max
    return load_index(ind, n_max, f"{run.path} (its particle_index)")


@dataclass
class RunSelection:
    """Chosen particles of a run: what ``select`` and ``export`` write.

    ``rows`` are rows of the poses (and of ``table``); ``index[rows]`` are the chosen
    particles' rows in the training input file.
    """

    run: RunDir
    epoch: int
    table: ParticleTable
    poses: dict[str, np.ndarray]
    index: np.ndarray
    rows: np.ndarray
    labels: np.ndarray | None
    #: files read to make the selection: no output may be written over them
    inputs: list[Path] = dataclasses.field(default_factory=list)
    #: point group the poses assume, in RELION's axes (:func:`run_symmetry`)
    symmetry: str = "C1"
    #: the run's ``--mask`` (config.yaml ``mask``), None without one
    mask: str | None = None


def run_symmetry(run: RunDir, epoch: int, quiet: bool = False) -> str:
    """The point group the poses of ``epoch`` assume (canonical, RELION's axes).

    config.yaml ``symmetry``, except for an ab initio run whose epoch came before the
    symmetry was imposed (the search runs in C1 and the map's axes are aligned to the
    group's afterwards: ``state.pt`` ``symmetry_aligned`` false, docs/train.md): C1, with
    a note (unless ``quiet``). Known poses (``poses_from_file``) and
    ``symmetry_in_search`` have the symmetry from the start; an epoch without a readable
    ``state.pt`` is taken to have it.
    """
    from cryofield.physics.symmetry import SymmetryError, canonical_symmetry

    cfg = run.config()
    try:
        sym = canonical_symmetry(str(cfg.get("symmetry") or "C1"))
    except SymmetryError as err:
        raise CryofieldError(f"{run.path / CONFIG_FILE}: {err}") from None
    if sym == "C1" or cfg.get("poses_from_file") or cfg.get("symmetry_in_search"):
        return sym
    if _symmetry_aligned(run.epoch_dir(epoch) / STATE_FILE) is False:
        if not quiet:
            print(
                f"note: epoch {epoch} of {run.path} comes before symmetry {sym} was imposed "
                "(the ab initio search runs in C1): its poses are exported as C1"
            )
        return "C1"
    return sym


def _symmetry_aligned(path: Path) -> bool | None:
    """``symmetry_aligned`` of a ``state.pt`` (memory-mapped: the tensors are not read);
    None when the file or the key is missing or unreadable."""
    import torch

    if not path.is_file():
        return None
    try:
        st = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # damaged or foreign: 'train --resume' says what is wrong with it
        return None
    value = st.get("symmetry_aligned") if isinstance(st, dict) else None
    return None if value is None else bool(value)


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
    if n_clusters is not None and n_clusters < 1:
        raise CryofieldError(f"--ksample must be >= 1, got {n_clusters}")
    run = RunDir(outdir)
    ep = run.choose_epoch(epoch, verb="export")
    poses = run.poses(ep)
    table = run.input_table()
    index = check_table(run, table, poses, ep)
    chosen = np.ones(len(index), dtype=bool)
    required = clusters is not None or n_clusters is not None
    km = cluster_labels(run, ep, n_clusters, required=required)
    if clusters is not None:
        assert km is not None  # required
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
    junk_path = run.analyze_dir(ep) / "junk.npz"
    if drop_junk:
        if not junk_path.is_file():
            raise CryofieldError(f"{junk_path}: no junk scores; run 'cryofield analyze "
                                 f"{run.path} --epoch {ep}' first")  # fmt: skip
        from cryofield.io.arrays import load_npz

        remedy = f"re-run 'cryofield analyze {run.path} --epoch {ep}'"
        junk = np.asarray(load_npz(junk_path, ("junk",), "junk file", remedy)["junk"], dtype=bool)
        if junk.shape != chosen.shape:
            raise CryofieldError(f"{junk_path}: {junk.size} junk flags for {chosen.size} particles")
        print(f"dropping {int((chosen & junk).sum())} junk particles ({junk_path})")
        chosen &= ~junk
    rows = np.flatnonzero(chosen)
    if rows.size == 0:
        raise CryofieldError("the selection is empty: nothing to write")
    inputs = [run.path / CONFIG_FILE, run.path / TABLE_FILE]
    inputs += [Path(p) for p in (run.config().get("particles"), table.source_path) if p]
    if isinstance(ind, (str, Path)):
        inputs.append(Path(ind))
    if drop_junk:
        inputs.append(junk_path)
    inputs += [p for p in [run.volume_path(ep)] if p is not None]
    mask = run.config().get("mask")
    return RunSelection(run, ep, table, poses, index, rows, None if km is None else km.labels,
                        inputs, run_symmetry(run, ep), str(mask) if mask else None)  # fmt: skip


def write_selection(
    sel: RunSelection, out: str | Path, flip_hand: bool = False, downsampled: bool = False
) -> Path:
    """Write the chosen particles with the learned poses, latents and cluster classes.

    The particles are the run's input rows, or, when the run was trained on a star file
    written by ``cryofield downsample``, the ORIGINAL particles it links to (unless
    ``downsampled``); see :func:`cryofield.io.export.write_particles`. ``flip_hand``
    mirrors the poses and writes the mirrored map (:func:`flipped_map_path`). The file
    records ``sel.symmetry`` and ``sel.mask``; a ``Dn`` selection written to .cs has its
    poses in cryoSPARC's axes and its map is written in them too
    (:func:`cryosparc_map_path`, or the mirrored map with ``flip_hand``).
    """
    from cryofield.io.export import write_particles
    from cryofield.io.star import has_original_link

    out = check_output_suffix(out)
    run, rows, poses, table = sel.run, sel.rows, sel.poses, sel.table
    rotations = np.asarray(poses["rotations"], dtype=np.float64)[rows]
    if "shifts_A" in poses:
        shift_kw = {"shifts_A": np.asarray(poses["shifts_A"], dtype=np.float64)[rows]}
    else:  # training px -> input px through the box ratio
        scale = table.box_px / run.training_D()
        shift_kw = {"shifts_px": np.asarray(poses["shifts_px"], dtype=np.float64)[rows] * scale}
    cryosparc = out.suffix.lower() == ".cs" and sel.symmetry[0] == "D"
    if flip_hand:  # the mirror M G M of a Cn, Dn, O, I1, I2 group is the group itself
        from cryofield.physics.handedness import flip_hand_poses
        from cryofield.physics.symmetry import mirror_keeps_axes

        invert = not mirror_keeps_axes(sel.symmetry)
        rotations, _ = flip_hand_poses(rotations, invert=invert)
        if invert:
            print(
                f"note: {out}: the z-mirror of a {sel.symmetry} map moves RELION's "
                f"{sel.symmetry} axes; the hand is flipped by inversion through the centre "
                "instead (the map V(-p), poses turned 180 deg in-plane), which keeps them"
            )
        _write_flipped_map(run, sel.epoch, out, cryosparc=cryosparc, invert=invert)
    elif cryosparc:
        _write_cryosparc_map(run, sel.epoch, out)
    z = run.latents(sel.epoch)
    write_particles(
        out, table, indices=rows, rotations=rotations,
        latents=None if z is None else z[rows],
        classes=None if sel.labels is None else sel.labels[rows], downsampled=downsampled,
        symmetry=sel.symmetry, mask=sel.mask, **shift_kw,
    )  # fmt: skip
    _say_recorded(out, sel.symmetry, sel.mask)
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
    out = check_output_suffix(out)
    sel = select_particles(outdir, epoch, ind, clusters, n_clusters)
    refuse_overwrite(output_paths(out), sel.inputs)
    write_selection(sel, out, flip_hand=flip_hand, downsampled=downsampled)
    return out, int(sel.rows.size), sel.epoch


def index_file_path(out: str | Path) -> Path:
    """Default index file of ``select``: ``<out stem>_indices.npy`` beside ``out``."""
    out = Path(out)
    return out.with_name(out.stem + "_indices.npy")


def write_index_file(sel: RunSelection, path: str | Path) -> Path:
    """Write the chosen particles' rows of the training input file (int64 ``.npy``)."""
    from cryofield.io.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, sel.index[sel.rows].astype(np.int64))
    return path


def flipped_map_path(out: str | Path) -> Path:
    """Where ``--flip-hand`` writes the mirrored map: ``<out stem>_flipped_hand.mrc``."""
    out = Path(out)
    return out.with_name(out.stem + "_flipped_hand.mrc")


def cryosparc_map_path(out: str | Path) -> Path:
    """Where the map of a ``Dn`` run exported to .cs goes, in cryoSPARC's axes:
    ``<out stem>_cryosparc_axes.mrc``."""
    out = Path(out)
    return out.with_name(out.stem + "_cryosparc_axes.mrc")


def output_paths(out: str | Path) -> list[Path]:
    """Every file writing ``out`` may create (for :func:`refuse_overwrite`): ``out``, the
    maps of :func:`flipped_map_path` and :func:`cryosparc_map_path`, the .cs sidecar."""
    from cryofield.io.export import sidecar_path

    out = Path(out)
    paths = [out, flipped_map_path(out), cryosparc_map_path(out)]
    return paths + ([sidecar_path(out)] if out.suffix.lower() == ".cs" else [])


def relion_to_cryosparc_volume(vol: np.ndarray) -> np.ndarray:
    """A map in RELION's ``Dn`` axes turned into cryoSPARC's: ``V_cs(p) = V(Q^T p)``.

    ``Q`` (:func:`cryofield.physics.symmetry.relion_to_cryosparc_dihedral`) is 90 deg
    about z, so the map is permuted on its grid, exactly: ``Q^T (x, y, z) = (y, -x, z)``
    gives ``V_cs[k, j, i] = V[k, (2c - i) mod D, j]`` with ``c = D // 2`` (the origin voxel
    stays fixed; in an even box the first column wraps to the last, as in
    :func:`cryofield.physics.handedness.flip_hand_volume`). The poses against it are
    ``R Q^T``: they give the same images.

    Parameters
    ----------
    vol
        ``(D, D, D)`` map indexed ``[z, y, x]``.
    """
    vol = np.asarray(vol)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"relion_to_cryosparc_volume: expected a (D, D, D) map, got {vol.shape}")
    D = vol.shape[-1]
    m = (2 * (D // 2) - np.arange(D)) % D
    return np.ascontiguousarray(np.swapaxes(vol[:, m, :], 1, 2))


def _say_recorded(out: Path, symmetry: str, mask: str | None) -> None:
    """One line: where the file's symmetry and mask are recorded (nothing for C1, no mask)."""
    from cryofield.io.export import cryosparc_axes, sidecar_path

    if symmetry == "C1" and mask is None:
        return
    what = f"symmetry {symmetry}"
    if out.suffix.lower() == ".cs":
        if symmetry != "C1":
            what += f" ({cryosparc_axes(symmetry)[1]} axes)"
        where = f"in {sidecar_path(out)}"
    else:
        if symmetry != "C1":
            what += " (RELION axes)"
        where = f"in the '# cryofield:' lines at the top of {out}"
    if mask is not None:
        what += f" and mask {mask}"
    print(f"recorded {what} {where}")


def _write_flipped_map(
    run: RunDir, epoch: int, out: Path, cryosparc: bool = False, invert: bool = False
) -> None:
    from cryofield.io.mrc import read_mrc, write_mrc
    from cryofield.physics.handedness import flip_hand_volume

    src = run.volume_path(epoch)
    if src is None:
        print(
            "note: heterogeneous run: no single map to mirror; maps rendered from this run "
            "have the old hand (mirror them with cryofield.physics.handedness.flip_hand_volume"
            + (", invert=True" if invert else "")
            + ", or `cryofield eval-vol --flip-hand`)"
            + (_CRYOSPARC_RENDER_NOTE if cryosparc else "")
        )
        return
    vol, info = read_mrc(src, mmap=False)
    dest = flipped_map_path(out)
    mirrored = flip_hand_volume(np.asarray(vol, dtype=np.float32), invert=invert)
    axes = ""
    if cryosparc:
        mirrored, axes = relion_to_cryosparc_volume(mirrored), " in cryoSPARC's axes"
    write_mrc(dest, mirrored, info.apix_A)
    print(f"wrote the mirrored map of epoch {epoch}{axes} to {dest}")


#: what a heterogeneous Dn run exported to .cs says about the maps rendered from it
_CRYOSPARC_RENDER_NOTE = (
    " and RELION's axes (turn them into cryoSPARC's with "
    "cryofield.analysis.export.relion_to_cryosparc_volume)"
)


def _write_cryosparc_map(run: RunDir, epoch: int, out: Path) -> None:
    """The map of ``epoch`` in cryoSPARC's ``Dn`` axes, beside a .cs export."""
    from cryofield.io.mrc import read_mrc, write_mrc

    src = run.volume_path(epoch)
    if src is None:
        print(
            f"note: {out}: poses in cryoSPARC's axes (2-fold on y); heterogeneous run: maps "
            "rendered from it are in RELION's axes (2-fold on x): turn them with "
            "cryofield.analysis.export.relion_to_cryosparc_volume before using them with "
            "these poses"
        )
        return
    vol, info = read_mrc(src, mmap=False)
    dest = cryosparc_map_path(out)
    write_mrc(dest, relion_to_cryosparc_volume(np.asarray(vol, dtype=np.float32)), info.apix_A)
    print(f"wrote the map of epoch {epoch} in cryoSPARC's axes (2-fold on y) to {dest}")
