"""A lock file in an output folder, so that two runs never write into the same folder.

``OUTDIR/.lock`` holds the owner's pid, host, start time and command (JSON). It is created
atomically (``O_CREAT | O_EXCL``) and removed when the run ends, also on an error. A lock
left by a run that died on this host (its pid no longer exists) is taken over with a
warning; a lock of another host is never taken over (its pid cannot be checked from here).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryofield.errors import CryofieldError
from cryofield.logs import get_logger

LOCK_NAME = ".lock"

log = get_logger("lock")


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return True
    return True


def _read_owner(path: Path) -> dict[str, Any] | None:
    """The lock's content, or ``None`` when it cannot be read or parsed."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe(owner: dict[str, Any]) -> str:
    cmd = owner.get("command")
    text = f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}"
    return text + (f": {cmd}" if cmd else "")


def _create(path: Path, owner: dict[str, Any]) -> bool:
    """Create the lock atomically; ``False`` when it exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(owner) + "\n")
    return True


def acquire(outdir: str | os.PathLike[str], command: str, name: str = LOCK_NAME) -> Path:
    """Take the lock of ``outdir`` (created if needed); returns the lock file's path.

    Raises
    ------
    CryofieldError
        When another live run holds it (one line: its pid, host, start time, command, and
        what to do).
    """
    folder = Path(outdir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    owner = {
        "pid": os.getpid(),
        "host": platform.node(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command,
        "argv": sys.argv,
    }
    for _ in range(3):
        if _create(path, owner):
            return path
        held = _read_owner(path)
        if held is None:
            raise CryofieldError(
                f"{folder} is locked by {path}, which cannot be read (another run may be "
                f"starting); if no other cryofield run uses {folder}, delete {path}"
            )
        host = str(held.get("host"))
        try:
            pid = int(held.get("pid"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            pid = -1
        if host != platform.node():
            raise CryofieldError(
                f"{folder} is in use by another cryofield run ({_describe(held)}); it runs "
                f"on another host, so it cannot be checked from here: if that run is dead, "
                f"delete {path}"
            )
        if _pid_alive(pid):
            raise CryofieldError(
                f"{folder} is in use by another cryofield run ({_describe(held)}); wait for "
                f"it to finish or stop it, or choose another output folder (if that process "
                f"is not a cryofield run, delete {path})"
            )
        if _read_owner(path) != held:  # taken over meanwhile by another run
            continue
        log.warning("taking over the stale lock %s of a run that died (%s)", path, _describe(held))
        path.unlink(missing_ok=True)
    raise CryofieldError(f"{folder}: could not take the lock {path}; try again")


def release(path: Path) -> None:
    """Remove a lock taken by this process (a lock of another process is left alone)."""
    held = _read_owner(path)
    if held is not None and held.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def folder_lock(
    outdir: str | os.PathLike[str], command: str, name: str = LOCK_NAME
) -> Iterator[Path]:
    """Hold the lock of ``outdir`` while the block runs (released also on errors)."""
    path = acquire(outdir, command, name)
    try:
        yield path
    finally:
        release(path)
