"""``cryofield`` entry point: OS errors and closed pipes are one line (or silence), exit 2/0,
and the error line also goes to the run's ``run.log``."""

from __future__ import annotations

import errno
import subprocess
import sys

import numpy as np
import pytest

from cryofield.cli.main import main
from cryofield.errors import CryofieldError
from cryofield.io.mrc import write_mrc


@pytest.fixture
def stack(tmp_path):
    return write_mrc(tmp_path / "stack.mrcs", np.zeros((3, 8, 8), np.float32), 2.0)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    ("code", "reason", "words"),
    [
        (errno.ENOSPC, "No space left on device", "free some space or choose another output"),
        (errno.EROFS, "Read-only file system", "choose another output path"),
        (errno.EACCES, "Permission denied", "check its permissions"),
        (errno.EDQUOT, "Disk quota exceeded", "free some space"),
    ],
)
def test_write_errors_are_one_line_exit_2(stack, tmp_path, capsys, monkeypatch, code, reason,
                                          words):  # fmt: skip
    import cryofield.io.atomic as atomic

    def fail(*args, **kwargs):
        raise OSError(code, reason)  # a write of the open file: no file name in the error

    monkeypatch.setattr(atomic.os, "replace", fail)
    out = tmp_path / "table.npz"
    assert main(["parse", str(stack), "-o", str(out)]) == 2
    line = _one_line(capsys)
    assert line.startswith("cryofield parse: error: cannot ") and str(out) in line
    assert reason in line and words in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["stack.mrcs"]


def test_traceback_only_with_debug(stack, tmp_path, capsys, monkeypatch):
    import cryofield.io.atomic as atomic

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", fail)
    assert main(["parse", str(stack), "-o", str(tmp_path / "t.npz"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("cryofield parse: error")


def test_error_line_goes_to_run_log(tmp_path, capsys, monkeypatch):
    import cryofield.inference.runner as runner

    def broken(cfg):
        raise CryofieldError(f"{cfg.particles}: row 3: bad defocus")

    monkeypatch.setattr(runner, "_load_inputs", broken)
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "p.star"), "-o", str(out)]) == 2
    line = _one_line(capsys)
    assert line == f"cryofield train: error: {tmp_path / 'p.star'}: row 3: bad defocus"
    assert line in (out / "run.log").read_text()
    assert not (out / ".lock").exists()
    # the next command's errors do not go to that run.log
    assert main(["info", str(tmp_path / "missing.star")]) == 2
    assert "missing.star" not in (out / "run.log").read_text()


def test_closed_pipe_is_not_an_error(stack):
    """``cryofield info FILE | head -1``: no traceback, exit 0 (``set -o pipefail``)."""
    code = "import sys; from cryofield.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "info", str(stack)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
