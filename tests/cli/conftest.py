"""Fixtures of the CLI tests: fake training runs from ``tests/analysis/fakerun.py``.

The runs are module-scoped, so each test module works on its own copy (commands such as
``analyze`` write into the run folder).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


def _fakerun() -> ModuleType:
    """``tests/analysis/fakerun.py`` as module ``fakerun`` (shared with the analysis tests)."""
    if "fakerun" in sys.modules:
        return sys.modules["fakerun"]
    path = Path(__file__).resolve().parents[1] / "analysis" / "fakerun.py"
    spec = importlib.util.spec_from_file_location("fakerun", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def het_run(tmp_path_factory: pytest.TempPathFactory):
    """Heterogeneous (zdim 2) fake run; see ``fakerun.make_fake_run``."""
    return _fakerun().make_fake_run(tmp_path_factory.mktemp("cli_het"), zdim=2)


@pytest.fixture(scope="module")
def hom_run(tmp_path_factory: pytest.TempPathFactory):
    """Homogeneous fake run (poses and map = truth rotated by ``G``)."""
    return _fakerun().make_fake_run(tmp_path_factory.mktemp("cli_hom"), zdim=0)
