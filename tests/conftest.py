"""Shared pytest fixtures for all test areas.

``interop_data``: the folder of real RELION/cryoSPARC/EMPIAR files:
``$CRYOFIELD_INTEROP_DATA`` when set, else ``<repo>/../shared/data/interop`` (the files are
not copied into the repository: their README asks so). The first folder that holds every
file of :data:`INTEROP_FILES` is used; tests that use it are skipped with a reason when
none does. ``simulated``: noiseless simulated datasets with their truth,
built once per session and parameter set. Every test starts from ``torch.manual_seed(0)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

#: The interop files the tests read.
INTEROP_FILES = (
    "FinalRefinement-OriginalParticles-PfCRT.star",
    "cryosparc_J2_particles_exported.cs",
    "cryosparc_P12_J24_001_particles.cs",
    "ctf1.pkl",
    "empiar_10076_7.cs",
    "empiar_10076_7.mrc",
    "empiar_10076_7.star",
    "hand-vol.mrc",
    "pose.star.pkl",
    "relion31.6opticsgroups.star",
    "relion31.mrcs",
    "relion31.star",
    "relion31.v2.star",
    "relion5.star",
    "toy_angles.pkl",
    "toy_projections.mrcs",
    "toy_projections.star",
)


def _interop_dir() -> Path | None:
    """The first candidate folder that holds every interop file, or ``None``."""
    env = os.environ.get("CRYOFIELD_INTEROP_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "data" / "interop")
    for path in candidates:
        if all((path / name).is_file() for name in INTEROP_FILES):
            return path
    return None


@pytest.fixture(scope="session")
def interop_data() -> Path:
    """Folder of the interop fixture files; skips the test when it is absent."""
    path = _interop_dir()
    if path is None:
        pytest.skip(
            "interop data not found: set CRYOFIELD_INTEROP_DATA or provide ../shared/data/interop"
        )
    return path


@pytest.fixture(scope="session")
def simulated(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., tuple[Path, dict[str, np.ndarray]]]:
    """Factory ``simulated(n_particles, D, apix_A, seed)`` -> ``(folder, truth arrays)``.

    A noiseless ``protein`` dataset from :func:`cryofield.simulate.dataset.simulate_dataset`
    (``particles.star/.cs/.mrcs``, ``truth.npz``, true volumes), built once per session for
    each parameter set; ``truth`` holds every array of ``truth.npz``.
    """
    from cryofield.simulate.dataset import SimulationConfig, simulate_dataset

    cache: dict[tuple, tuple[Path, dict[str, np.ndarray]]] = {}

    def make(
        n_particles: int, D: int, apix_A: float, seed: int
    ) -> tuple[Path, dict[str, np.ndarray]]:
        key = (n_particles, D, apix_A, seed)
        if key not in cache:
            cfg = SimulationConfig(
                source="protein", n_particles=n_particles, D=D, apix_A=apix_A, snr=None, seed=seed
            )
            folder = simulate_dataset(cfg, tmp_path_factory.mktemp("sim"))
            with np.load(folder / "truth.npz") as f:
                cache[key] = (folder, {k: f[k] for k in f.files})
        return cache[key]

    return make


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Make every test deterministic."""
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (much faster than two on a shared, busy CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
