"""The output-folder lock: atomic, released on errors, stale locks taken over."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys

import pytest

from cryofield.errors import CryofieldError
from cryofield.lock import LOCK_NAME, acquire, folder_lock, release


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder, pid, host=None):
    owner = {"pid": pid, "host": host or platform.node(), "started": "2024-05-01T10:00:00",
             "command": "cryofield train"}  # fmt: skip
    (folder / LOCK_NAME).write_text(json.dumps(owner))


def test_lock_is_taken_and_released_also_on_error(tmp_path):
    out = tmp_path / "run"
    with folder_lock(out, "cryofield train") as path:
        owner = json.loads(path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == platform.node()
        assert owner["command"] == "cryofield train" and owner["started"]
        with pytest.raises(CryofieldError, match="in use by another cryofield run"):
            acquire(out, "cryofield train")  # the same folder, a second time
    assert not (out / LOCK_NAME).exists()
    with pytest.raises(RuntimeError), folder_lock(out, "cryofield train"):
        raise RuntimeError("crash")
    assert not (out / LOCK_NAME).exists()


def test_live_lock_refused_with_pid_host_and_start(tmp_path):
    _write_lock(tmp_path, os.getppid())  # a live process of this host
    with pytest.raises(CryofieldError) as exc:
        acquire(tmp_path, "cryofield train")
    msg = str(exc.value)
    assert f"pid {os.getppid()} on host {platform.node()}" in msg
    assert "started 2024-05-01T10:00:00" in msg and "\n" not in msg
    release(tmp_path / LOCK_NAME)  # not ours: left alone
    assert (tmp_path / LOCK_NAME).exists()


def test_stale_lock_taken_over_with_a_warning(tmp_path, caplog, monkeypatch):
    _write_lock(tmp_path, _dead_pid())
    monkeypatch.setattr(logging.getLogger("cryofield"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="cryofield"):
        path = acquire(tmp_path, "cryofield train")
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text
    release(path)
    assert not path.exists()


def test_lock_of_another_host_is_refused(tmp_path):
    _write_lock(tmp_path, _dead_pid(), host="other-node-17")
    with pytest.raises(CryofieldError) as exc:
        acquire(tmp_path, "cryofield train")
    msg = str(exc.value)
    assert "other-node-17" in msg and f"delete {tmp_path / LOCK_NAME}" in msg
    (tmp_path / LOCK_NAME).write_text("")  # unreadable (e.g. a crash while creating it)
    with pytest.raises(CryofieldError, match="cannot be read"):
        acquire(tmp_path, "cryofield train")
