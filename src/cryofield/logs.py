"""Logging set-up shared by the commands: console plus ``run.log`` in an output folder."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOGGER_NAME = "cryofield"


def get_logger(name: str | None = None) -> logging.Logger:
    """Return the package logger or one of its children (``cryofield.<name>``)."""
    return logging.getLogger(LOGGER_NAME if name is None else f"{LOGGER_NAME}.{name}")


def setup_logging(outdir: str | Path | None = None, verbose: bool = False) -> logging.Logger:
    """Log to stderr and, when ``outdir`` is given, append to ``outdir/run.log``.

    Calling it again replaces the handlers, so each command run logs to its own folder.
    """
    logger = get_logger()
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if outdir is not None:
        Path(outdir).mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(Path(outdir) / "run.log")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    logger.propagate = False
    return logger
