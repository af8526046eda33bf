"""Fixtures of the io tests."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def io_records(caplog):
    """INFO and above of the ``cryofield.io`` logger (which may not propagate)."""
    logger = logging.getLogger("cryofield.io")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.INFO)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield caplog
    logger.setLevel(old)
    logger.removeHandler(caplog.handler)
