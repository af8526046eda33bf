"""Fixtures of the analysis tests: fake training runs (see ``fakerun.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from fakerun import FakeRun, make_fake_run


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Small maps: one intra-op thread is faster (and fair on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fake_het_run(tmp_path_factory: pytest.TempPathFactory) -> FakeRun:
    """Heterogeneous (zdim 2) fake run with three latent clusters = the true labels."""
    return make_fake_run(tmp_path_factory.mktemp("het"), zdim=2)


@pytest.fixture(scope="session")
def fake_hom_run(tmp_path_factory: pytest.TempPathFactory) -> FakeRun:
    """Homogeneous fake run: poses = truth rotated by G, map = truth rotated by G."""
    return make_fake_run(tmp_path_factory.mktemp("hom"), zdim=0)


@pytest.fixture(scope="session")
def fake_hom_mirror_run(tmp_path_factory: pytest.TempPathFactory) -> FakeRun:
    """Homogeneous fake run of the wrong hand: poses M R M G, map V(M G p)."""
    return make_fake_run(tmp_path_factory.mktemp("homm"), zdim=0, mirrored=True)
