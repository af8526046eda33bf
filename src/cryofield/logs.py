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


def log_to_run_log(message: str, level: int = logging.ERROR) -> None:
    """Write ``message`` to the ``run.log`` file(s) of the current command only (not to the
    console): the one-line error that the command line prints ends up in the run's log."""
    logger = get_logger()
    record = logger.makeRecord(logger.name, level, __file__, 0, message, None, None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def close_run_log() -> None:
    """Close and remove the ``run.log`` handlers (the console handler stays)."""
    logger = get_logger()
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
            handler.close()
