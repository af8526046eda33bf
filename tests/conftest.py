"""Shared pytest fixtures for all test areas.

``interop_data``: the folder of real RELION/cryoSPARC/EMPIAR files
(``$CRYOFIELD_INTEROP_DATA`` or ``<repo>/../shared/data/interop``); tests that use it are
skipped with a reason when it is absent. Every test starts from ``torch.manual_seed(0)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _interop_dir() -> Path | None:
    env = os.environ.get("CRYOFIELD_INTEROP_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "data" / "interop")
    for path in candidates:
        if path.is_dir():
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


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Make every test deterministic."""
    torch.manual_seed(0)
