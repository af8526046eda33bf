"""Synthetic particle datasets with exact ground truth.

Image formation (the same model as training, docs/dev/contracts.md):

``I_i = CTF_i * shift_{t_i}( P_{R_i} V_{s_i} ) + n_i``,  ``n_i ~ N(0, sigma^2)`` white,

computed by :class:`~cryofield.simulate.projection.OversampledProjector` (2x oversampled
Fourier slice, CTF and shift on the fine grid, crop to D). ``R_i`` are Haar-uniform random
rotations (or read from a file), ``t_i`` Gaussian or uniform translations in px, the CTF
has a uniform random mean defocus, random astigmatism and angle. The CTF is negative at low
frequency, so positive density gives dark particles, as in raw micrographs. With
``invert=True`` (default) the written images are ``-I_i``: light-on-dark, like stacks
extracted by RELION/cryoSPARC with contrast inversion; ``truth.npz`` records it
(``invert``, ``contrast``) and readers must negate such stacks before comparing them with
``CTF * P V`` (cryoDRGN does the same by default).

SNR: ``snr = mean_i var(S_i) / sigma^2`` where ``S_i = CTF_i * shift(P V)`` is the
noiseless image and ``var`` is taken over all ``D x D`` pixels of each image
(``snr_region='image'``, cryoDRGN's ``add_noise`` definition) or over the pixels inside
a disc of the object's radius (``snr_region='particle'``); the mean is over non-junk
particles. ``sigma`` is the same for every image.

Junk particles (``junk_fraction``) are pure noise, broken fragments of the first state or
other built-in objects; their label is -1 and ``truth['junk_kind']`` says which.

Outputs in OUTDIR: ``particles.mrcs``, ``particles.star`` (RELION 3.1 with optics block),
``particles.cs`` (cryoSPARC), ``truth.npz``, ``volumes/state_XX.mrc`` (true volumes at
the dataset's D and apix), ``volumes/junk_XX.mrc``, ``simulation.yaml`` (and ``run.log`` from
the command).
Images are computed in chunks and streamed to disk: a first pass writes noiseless images
to a temporary memory-mapped file (one pass per source volume, so each volume is Fourier
transformed once), a second pass adds noise and writes the stack in particle order.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cryofield.errors import CryofieldError, InputFileError
from cryofield.io.atomic import atomic_path
from cryofield.logs import get_logger
from cryofield.physics.ctf import CTFParams
from cryofield.physics.rotation import random_rotations
from cryofield.simulate import volumes as builtin
from cryofield.simulate.config import (
    JUNK_KINDS,
    PRESETS,
    SOURCES,
    SimulationConfig,
    preset_config,
)
from cryofield.simulate.projection import OversampledProjector

__all__ = [
    "JUNK_KINDS",
    "PRESETS",
    "SOURCES",
    "SimulationConfig",
    "build_sources",
    "preset_config",
    "simulate_dataset",
]

_log = get_logger("simulate")

# ----------------------------------------------------------------------------------------
# sources: the true volumes


@dataclass
class Sources:
    """True volumes of a dataset.

    Attributes
    ----------
    volumes
        ``K`` arrays ``(D, D, D)``: states (discrete) or frames (continuous).
    weights
        ``(K,)`` probabilities of drawing each volume.
    coords
        ``(K,)`` continuous coordinate of each frame in [0, 1], or None (discrete).
    D, apix_A
        Box and pixel size of the volumes.
    """

    volumes: list[np.ndarray]
    weights: np.ndarray
    coords: np.ndarray | None
    D: int
    apix_A: float


def _read_volume(path: str, D: int | None) -> tuple[np.ndarray, float]:
    from cryofield.io.mrc import read_mrc

    arr, info = read_mrc(path, mmap=False)
    vol = np.asarray(arr, dtype=np.float32)
    if vol.ndim != 3 or len(set(vol.shape)) != 1 or vol.shape[0] % 2:
        raise InputFileError(path, f"volume must be a cube with an even side, got {vol.shape}")
    apix = float(info.apix_A)
    if D is not None and D != vol.shape[0]:
        if D > vol.shape[0]:
            raise InputFileError(path, f"cannot simulate at D={D} from a {vol.shape[0]}^3 map")
        from cryofield.physics.filters import fourier_crop_3d

        apix = apix * vol.shape[0] / D
        vol = fourier_crop_3d(torch.as_tensor(vol), D).numpy().astype(np.float32)
    return vol, apix


def build_sources(cfg: SimulationConfig) -> Sources:
    """Generate or read the true volumes requested by ``cfg``."""
    cfg.validate()
    coords = None
    if cfg.source == "protein":
        vols, D, apix = [builtin.protein_like(cfg.D or 64)], cfg.D or 64, cfg.apix_A or 5.0
    elif cfg.source == "states":
        D, apix = cfg.D or 64, cfg.apix_A or 5.0
        vols = builtin.discrete_states(D, cfg.n_states)
    elif cfg.source == "continuous":
        D, apix = cfg.D or 64, cfg.apix_A or 5.0
        coords = np.linspace(0.0, 1.0, cfg.n_frames)
        vols = [builtin.two_domain(D, float(c) * cfg.motion_amplitude) for c in coords]
    elif cfg.source == "volumes":
        read = [_read_volume(p, cfg.D) for p in cfg.volume_paths]
        vols = [v for v, _ in read]
        shapes = {v.shape for v in vols}
        if len(shapes) != 1:
            raise CryofieldError(f"input volumes differ in size: {sorted(shapes)}")
        D = vols[0].shape[0]
        apix = cfg.apix_A if cfg.apix_A is not None else read[0][1]
        if not apix > 0:
            raise InputFileError(cfg.volume_paths[0], "header has no pixel size; pass apix_A")
    else:  # atomic
        vols, D = builtin.atomic_model_density(
            cfg.atomic_path,
            cfg.apix_A,
            D=cfg.D,
            bfactor_A2=cfg.atomic_bfactor_A2,
            use_atom_bfactors=cfg.use_atom_bfactors,
        )
        apix = cfg.apix_A
        if len(vols) > 1:
            coords = np.linspace(0.0, 1.0, len(vols))
    if cfg.weights is not None:
        weights = np.asarray(cfg.weights, dtype=np.float64)
    else:
        weights = np.ones(len(vols))
    return Sources(vols, weights / weights.sum(), coords, int(D), float(apix))


def _junk_volumes(
    kinds: list[str], sources: Sources, rng: np.random.Generator
) -> tuple[list[np.ndarray | None], list[str]]:
    """Junk sources: None (pure noise), fragments of state 0, other built-in objects."""
    D = sources.D
    vols: list[np.ndarray | None] = []
    names: list[str] = []
    ref_max = float(sources.volumes[0].max())
    for kind in kinds:
        if kind == "noise":
            vols.append(None)
            names.append(kind)
        elif kind == "fragment":
            for _ in range(3):
                vols.append(builtin.fragment_volume(sources.volumes[0], rng))
                names.append(kind)
        else:  # other objects: different chains, same density scale
            for seed in (101, 202):
                vols.append(builtin.protein_like(D, seed=seed) * ref_max)
                names.append(kind)
    return vols, names


# ----------------------------------------------------------------------------------------
# per-particle parameters


@dataclass
class _Draws:
    source_index: np.ndarray  # (N,) index into volumes + junk volumes
    labels: np.ndarray  # (N,) state/frame index, -1 junk
    junk_kind: np.ndarray  # (N,) '' or kind
    rotations: np.ndarray  # (N, 3, 3) float32
    shifts_px: np.ndarray  # (N, 2) float32
    ctf: dict[str, np.ndarray]


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


def _load_rotations(path: str, n: int) -> np.ndarray:
    if path.endswith(".npz"):
        from cryofield.io.arrays import load_npz

        rot = load_npz(path, ("rotations",), "poses file")["rotations"]
        if rot.dtype.kind not in "iuf":
            raise InputFileError(path, f"'rotations' has dtype {rot.dtype}, expected numbers")
        rot = rot.astype(np.float32)
    else:
        from cryofield.io.metadata import load_particle_table

        rot = load_particle_table(path).rotations
        if rot is None:
            raise InputFileError(path, "no poses in this file")
    if rot.ndim != 3 or rot.shape[1:] != (3, 3):
        raise InputFileError(path, f"rotations must be (N, 3, 3), got {rot.shape}")
    if len(rot) < n:
        raise InputFileError(path, f"has {len(rot)} poses, {n} particles requested")
    return rot[:n]


def _draw(cfg: SimulationConfig, sources: Sources, junk_names: list[str]) -> _Draws:
    n = cfg.n_particles
    K = len(sources.volumes)
    rng = _rng(cfg.seed, 0)
    labels = rng.choice(K, size=n, p=sources.weights).astype(np.int64)
    source_index = labels.copy()
    junk_kind = np.full(n, "", dtype="<U8")
    n_junk = round(cfg.junk_fraction * n)
    if n_junk:
        junk_rows = rng.choice(n, size=n_junk, replace=False)
        kinds = sorted(set(junk_names), key=JUNK_KINDS.index)
        kind_of_row = np.asarray(kinds)[np.arange(n_junk) % len(kinds)]
        rng.shuffle(kind_of_row)
        for kind in kinds:
            rows = junk_rows[kind_of_row == kind]
            choices = [K + j for j, name in enumerate(junk_names) if name == kind]
            source_index[rows] = rng.choice(choices, size=len(rows))
            junk_kind[rows] = kind
        labels[junk_rows] = -1
    if cfg.rotations_path:
        rotations = _load_rotations(cfg.rotations_path, n)
    else:
        gen = torch.Generator().manual_seed(int(_rng(cfg.seed, 1).integers(2**62)))
        rotations = random_rotations(n, gen).numpy().astype(np.float32)
    rng = _rng(cfg.seed, 2)
    if cfg.shift_distribution == "gaussian":
        shifts = rng.normal(0.0, cfg.shift_px, size=(n, 2))
    else:
        shifts = rng.uniform(-cfg.shift_px, cfg.shift_px, size=(n, 2))
    rng = _rng(cfg.seed, 3)
    mean_df = rng.uniform(cfg.defocus_min_A, cfg.defocus_max_A, size=n)
    half_astig = 0.5 * rng.uniform(0.0, cfg.astig_max_A, size=n)
    ctf = dict(
        defocus_u_A=mean_df + half_astig,
        defocus_v_A=mean_df - half_astig,
        astig_angle_deg=rng.uniform(0.0, 180.0, size=n),
        voltage_kV=np.full(n, cfg.voltage_kV),
        cs_mm=np.full(n, cfg.cs_mm),
        amp_contrast=np.full(n, cfg.amp_contrast),
        phase_shift_deg=np.zeros(n),
        bfactor_A2=np.full(n, cfg.ctf_bfactor_A2),
    )
    return _Draws(source_index, labels, junk_kind, rotations, shifts.astype(np.float32), ctf)


def _object_radius_px(vol: np.ndarray) -> float:
    """Radius (px) of the smallest centred ball holding all voxels above 2% of the maximum."""
    D = vol.shape[0]
    idx = np.argwhere(vol > 0.02 * vol.max())
    return float(np.linalg.norm(idx - D // 2, axis=1).max()) + 1.0


# ----------------------------------------------------------------------------------------
# the dataset


def simulate_dataset(cfg: SimulationConfig, outdir: str | os.PathLike[str]) -> Path:
    """Simulate the dataset described by ``cfg`` into ``outdir`` (see the module docstring).

    Returns
    -------
    Path
        ``outdir``.
    """
    cfg.validate()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    sources = build_sources(cfg)
    D, apix = sources.D, sources.apix_A
    junk_vols, junk_names = _junk_volumes(
        list(cfg.junk_kinds) if cfg.junk_fraction > 0 else [], sources, _rng(cfg.seed, 5)
    )
    draws = _draw(cfg, sources, junk_names)
    n = cfg.n_particles
    _log.info(
        "simulating %d particles (%s), D=%d, apix=%.3f A, %d volume(s), SNR %s",
        n, cfg.source, D, apix, len(sources.volumes), cfg.snr,
    )  # fmt: skip
    volume_paths = _write_volumes(outdir, sources, junk_vols)
    disc, r = None, float("nan")
    if cfg.snr_region == "particle":
        r = max(_object_radius_px(v) for v in sources.volumes)
        disc = np.hypot(*np.meshgrid(np.arange(D) - D // 2, np.arange(D) - D // 2)) <= r

    clean_path = outdir / ".clean_images.tmp.npy"
    clean = np.lib.format.open_memmap(clean_path, mode="w+", dtype=np.float32, shape=(n, D, D))
    try:
        signal_var = _clean_pass(cfg, sources, junk_vols, draws, clean, disc)
        noise_std = (
            0.0 if cfg.snr is None or math.isinf(cfg.snr) else math.sqrt(signal_var / cfg.snr)
        )
        _noise_pass(cfg, clean, noise_std, apix, outdir / "particles.mrcs")
    finally:
        del clean
        clean_path.unlink(missing_ok=True)

    _write_metadata(cfg, outdir, draws, D, apix)
    truth = dict(
        rotations=draws.rotations,
        shifts_px=draws.shifts_px,
        labels=draws.labels,
        is_junk=draws.labels < 0,
        junk_kind=draws.junk_kind,
        coord=(
            sources.coords[np.maximum(draws.labels, 0)] * np.where(draws.labels < 0, np.nan, 1.0)
            if sources.coords is not None
            else np.full(n, np.nan)
        ),
        frame_coords=sources.coords if sources.coords is not None else np.zeros(0),
        **{k: v for k, v in draws.ctf.items()},
        snr=np.float64(np.inf if cfg.snr is None else cfg.snr),
        snr_region=np.str_(cfg.snr_region),
        snr_radius_px=np.float64(r),
        signal_var=np.float64(signal_var),
        noise_std=np.float64(noise_std),
        invert=np.bool_(cfg.invert),
        contrast=np.str_("light-on-dark" if cfg.invert else "dark-on-light"),
        seed=np.int64(cfg.seed),
        apix_A=np.float64(apix),
        D=np.int64(D),
        volume_paths=np.asarray(volume_paths[: len(sources.volumes)], dtype=str),
        junk_volume_paths=np.asarray(volume_paths[len(sources.volumes) :], dtype=str),
        weights=sources.weights,
    )
    with atomic_path(outdir / "truth.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **truth)
    resolved = dataclasses.replace(cfg, D=D, apix_A=apix)
    resolved.to_yaml(outdir / "simulation.yaml")
    _log.info("noise sigma %.4g (signal variance %.4g); wrote %s", noise_std, signal_var, outdir)
    return outdir


def _write_volumes(outdir: Path, sources: Sources, junk_vols: list[np.ndarray | None]) -> list[str]:
    from cryofield.io.mrc import write_mrc

    (outdir / "volumes").mkdir(exist_ok=True)
    for stale in [*outdir.glob("volumes/state_*.mrc"), *outdir.glob("volumes/junk_*.mrc")]:
        stale.unlink()  # from an earlier simulation into the same folder
    paths = []
    for k, vol in enumerate(sources.volumes):
        rel = f"volumes/state_{k:02d}.mrc"
        write_mrc(outdir / rel, vol, sources.apix_A)
        paths.append(rel)
    for j, vol in enumerate(v for v in junk_vols if v is not None):
        rel = f"volumes/junk_{j:02d}.mrc"
        write_mrc(outdir / rel, vol, sources.apix_A)
        paths.append(rel)
    return paths


def _clean_pass(
    cfg: SimulationConfig,
    sources: Sources,
    junk_vols: list[np.ndarray | None],
    draws: _Draws,
    clean: np.ndarray,
    disc: np.ndarray | None,
) -> float:
    """Write noiseless images into ``clean`` ``(N, D, D)``; return the mean signal variance."""
    all_vols = list(sources.volumes) + junk_vols
    var_sum, var_count = 0.0, 0
    with tqdm(total=cfg.n_particles, desc="projecting", unit="img", leave=False) as bar:
        for s, vol in enumerate(all_vols):
            rows = np.flatnonzero(draws.source_index == s)
            if len(rows) == 0:
                continue
            if vol is None:
                clean[rows] = 0.0
                bar.update(len(rows))
                continue
            projector = OversampledProjector(vol, cfg.oversample)
            for start in range(0, len(rows), cfg.chunk_size):
                idx = rows[start : start + cfg.chunk_size]
                ctf = CTFParams.from_arrays(**{k: v[idx] for k, v in draws.ctf.items()})
                with torch.no_grad():
                    imgs = projector.project(
                        torch.from_numpy(draws.rotations[idx]),
                        torch.from_numpy(draws.shifts_px[idx]),
                        ctf,
                        sources.apix_A,
                    ).numpy()
                clean[idx] = imgs
                if s < len(sources.volumes):
                    pix = imgs[:, disc] if disc is not None else imgs.reshape(len(idx), -1)
                    var_sum += float(pix.astype(np.float64).var(axis=1).sum())
                    var_count += len(idx)
                bar.update(len(idx))
    return var_sum / max(var_count, 1)


def _noise_pass(
    cfg: SimulationConfig, clean: np.ndarray, noise_std: float, apix: float, path: Path
) -> None:
    from cryofield.io.mrc import MRCStackWriter

    n, D = clean.shape[0], clean.shape[1]
    rng = _rng(cfg.seed, 4)
    sign = -1.0 if cfg.invert else 1.0
    with MRCStackWriter(path, D, apix) as writer:
        for start in tqdm(range(0, n, cfg.chunk_size), desc="writing", unit="chunk", leave=False):
            chunk = np.asarray(clean[start : start + cfg.chunk_size], dtype=np.float32)
            if noise_std > 0:
                chunk = chunk + noise_std * rng.standard_normal(chunk.shape, dtype=np.float32)
            writer.write(sign * chunk)


def _write_metadata(
    cfg: SimulationConfig, outdir: Path, draws: _Draws, D: int, apix: float
) -> None:
    """``particles.star`` (RELION 3.1) and ``particles.cs`` (cryoSPARC) for the stack."""
    from cryofield.io.cryosparc import write_cs
    from cryofield.io.metadata import ParticleTable
    from cryofield.io.star import write_star

    n = cfg.n_particles
    stack = str((outdir / "particles.mrcs").resolve())
    table = ParticleTable(
        image_paths=np.full(n, stack),
        image_index=np.arange(n),
        apix_A=np.full(n, apix),
        box_px=D,
        ctf=draws.ctf,
        rotations=draws.rotations,
        shifts_px=draws.shifts_px,
        optics_group=np.ones(n, dtype=np.int64),
        source_path=stack,
        source_format="mrcs",
    )
    write_star(
        outdir / "particles.star", table, rotations=draws.rotations, shifts_px=draws.shifts_px
    )
    write_cs(outdir / "particles.cs", table, rotations=draws.rotations, shifts_px=draws.shifts_px)
