"""Simulation settings: :class:`SimulationConfig` (saved as ``simulation.yaml``) and presets.

The physics of each setting is described in :mod:`cryofield.simulate.dataset` and
docs/simulate.md.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cryofield.errors import CryofieldError, InputFileError
from cryofield.io.atomic import atomic_path

__all__ = ["JUNK_KINDS", "PRESETS", "SOURCES", "SimulationConfig", "preset_config"]

SOURCES = ("protein", "states", "continuous", "volumes", "atomic")
JUNK_KINDS = ("noise", "fragment", "other")


@dataclass
class SimulationConfig:
    """Everything that defines a simulated dataset (saved as ``simulation.yaml``).

    Attributes
    ----------
    source
        ``'protein'`` (built-in chiral object, homogeneous), ``'states'`` (built-in discrete
        states), ``'continuous'`` (built-in hinge motion), ``'volumes'`` (``volume_paths``:
        one map = homogeneous, several = discrete states), ``'atomic'`` (``atomic_path``:
        one model = homogeneous, several models = continuous frames).
    n_particles
        Number of images N (junk included).
    D
        Box size (px). None with ``'volumes'``: the maps' size; with ``'atomic'``: automatic.
    apix_A
        Pixel size (A). None with ``'volumes'``: read from the map header.
    volume_paths, weights
        Input maps and their relative populations (default equal).
    atomic_path, atomic_bfactor_A2, use_atom_bfactors
        Atomic model and its rendering (global B added to every atom; per-atom B on/off).
    n_states, n_frames
        Built-in discrete states (2-4) and continuous frames (coordinate ``k/(n_frames-1)``).
    motion_amplitude
        Built-in continuous motion: the arm swings over this fraction (0, 1] of the full
        hinge angle (:data:`~cryofield.simulate.volumes.TWO_DOMAIN_MAX_ANGLE_DEG`); the
        coordinate stays in [0, 1].
    rotations_path
        Optional file with poses to use (``.npz`` with ``rotations`` (N, 3, 3) or a
        .star/.cs file with poses); default Haar-uniform random rotations.
    shift_px, shift_distribution
        Translation scale (px): Gaussian standard deviation per axis, or the half-width of
        a uniform distribution.
    defocus_min_A, defocus_max_A, astig_max_A
        Mean defocus uniform in [min, max]; ``defocus_u - defocus_v`` uniform in
        [0, astig_max]; astigmatism angle uniform in [0, 180) deg.
    voltage_kV, cs_mm, amp_contrast, ctf_bfactor_A2
        Microscope: 300 kV, 2.7 mm, 0.1 and no envelope by default.
    snr, snr_region
        Target signal-to-noise ratio (None or inf: noiseless) and where the signal
        variance is measured (``'image'`` or ``'particle'``, see the module docstring).
    junk_fraction, junk_kinds
        Fraction of junk images and which kinds to draw (equal shares).
    invert
        Write light-on-dark images (the negated physical image).
    oversample
        Zero-padding factor of the Fourier-slice projector.
    chunk_size
        Images computed and written at once.
    seed
        Master seed; every random quantity derives from it.
    """

    source: str = "protein"
    n_particles: int = 5000
    D: int | None = 64
    apix_A: float | None = 5.0
    volume_paths: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    atomic_path: str | None = None
    atomic_bfactor_A2: float = 0.0
    use_atom_bfactors: bool = False
    n_states: int = 3
    n_frames: int = 40
    motion_amplitude: float = 1.0
    rotations_path: str | None = None
    shift_px: float = 2.0
    shift_distribution: str = "gaussian"
    defocus_min_A: float = 10000.0
    defocus_max_A: float = 25000.0
    astig_max_A: float = 500.0
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amp_contrast: float = 0.1
    ctf_bfactor_A2: float = 0.0
    snr: float | None = 0.1
    snr_region: str = "image"
    junk_fraction: float = 0.0
    junk_kinds: list[str] = field(default_factory=lambda: list(JUNK_KINDS))
    invert: bool = True
    oversample: int = 2
    chunk_size: int = 500
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`CryofieldError` naming the first invalid field."""
        bad = _first_problem(self)
        if bad:
            raise CryofieldError(f"simulation config: {bad}")

    def to_yaml(self, path: str | os.PathLike[str]) -> Path:
        """Write the config as yaml (atomically)."""
        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))
        return Path(path)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> SimulationConfig:
        """Read a config written by :meth:`to_yaml` (unknown keys are an error)."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise InputFileError(path, f"cannot read simulation config ({err})") from err
        if not isinstance(data, dict):
            raise InputFileError(path, "simulation config must be a mapping")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputFileError(path, f"unknown field(s) {', '.join(unknown)}")
        return cls(**data)


def _first_problem(c: SimulationConfig) -> str | None:
    if c.source not in SOURCES:
        return f"source must be one of {', '.join(SOURCES)}, got '{c.source}'"
    if c.n_particles < 1:
        return f"n_particles must be >= 1, got {c.n_particles}"
    if c.D is not None and (c.D < 16 or c.D % 2):
        return f"D must be even and >= 16, got {c.D}"
    if c.apix_A is not None and not c.apix_A > 0:
        return f"apix_A must be positive, got {c.apix_A}"
    if c.source == "volumes" and not c.volume_paths:
        return "source 'volumes' needs volume_paths"
    if c.source == "atomic" and not c.atomic_path:
        return "source 'atomic' needs atomic_path"
    if c.source == "atomic" and c.apix_A is None:
        return "source 'atomic' needs apix_A"
    if c.weights is not None:
        n = {"volumes": len(c.volume_paths), "states": c.n_states}.get(c.source)
        if n is None:
            return f"weights apply to source 'volumes' or 'states', not '{c.source}'"
        if len(c.weights) != n or min(c.weights) < 0 or sum(c.weights) <= 0:
            return f"weights must be {n} non-negative numbers with a positive sum"
    if not 2 <= c.n_states <= 4:
        return f"n_states must be 2, 3 or 4, got {c.n_states}"
    if c.n_frames < 2:
        return f"n_frames must be >= 2, got {c.n_frames}"
    if not 0.0 < c.motion_amplitude <= 1.0:
        return f"motion_amplitude must be in (0, 1], got {c.motion_amplitude}"
    if c.shift_distribution not in ("gaussian", "uniform"):
        return f"shift_distribution must be 'gaussian' or 'uniform', got '{c.shift_distribution}'"
    if c.shift_px < 0:
        return f"shift_px must be >= 0, got {c.shift_px}"
    if not 0 < c.defocus_min_A <= c.defocus_max_A:
        return "defocus range must satisfy 0 < defocus_min_A <= defocus_max_A"
    if c.astig_max_A < 0 or c.astig_max_A >= 2 * c.defocus_min_A:
        return "astig_max_A must be >= 0 and smaller than twice defocus_min_A"
    if not 0 <= c.amp_contrast < 1:
        return f"amp_contrast must be in [0, 1), got {c.amp_contrast}"
    if c.snr is not None and not c.snr > 0:
        return f"snr must be positive (or None for no noise), got {c.snr}"
    if c.snr_region not in ("image", "particle"):
        return f"snr_region must be 'image' or 'particle', got '{c.snr_region}'"
    if not 0 <= c.junk_fraction < 1:
        return f"junk_fraction must be in [0, 1), got {c.junk_fraction}"
    if c.junk_fraction > 0 and (not c.junk_kinds or set(c.junk_kinds) - set(JUNK_KINDS)):
        return f"junk_kinds must be a non-empty subset of {', '.join(JUNK_KINDS)}"
    if c.oversample < 1:
        return f"oversample must be >= 1, got {c.oversample}"
    if c.chunk_size < 1:
        return f"chunk_size must be >= 1, got {c.chunk_size}"
    return None


#: the built-in demo datasets (``cryofield simulate --preset NAME``)
PRESETS: dict[str, dict[str, object]] = {
    "demo-homo": dict(source="protein", n_particles=5000, D=64, apix_A=5.0),
    "demo-hetero": dict(source="states", n_states=3, n_particles=6000, D=64, apix_A=5.0),
    "demo-continuous": dict(source="continuous", n_frames=40, n_particles=6000, D=64, apix_A=5.0),
}


def preset_config(name: str, **overrides: object) -> SimulationConfig:
    """The :class:`SimulationConfig` of a preset, with optional field overrides."""
    if name not in PRESETS:
        raise CryofieldError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    return SimulationConfig(**{**PRESETS[name], **overrides})
