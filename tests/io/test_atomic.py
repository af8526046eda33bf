"""Safe output: atomic writes name the real file on OS errors; inputs are never written."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from cryofield.errors import CryofieldError
from cryofield.io.atomic import atomic_path, refuse_overwrite


def test_refuse_overwrite_same_path_symlink_hardlink_and_dotdot(tmp_path):
    src = tmp_path / "particles.star"
    src.write_text("data\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.star").symlink_to(src)
    os.link(src, tmp_path / "hard.star")
    for out in (src, tmp_path / "link.star", tmp_path / "hard.star",
                tmp_path / "sub" / ".." / "particles.star", str(src)):  # fmt: skip
        with pytest.raises(CryofieldError) as exc:
            refuse_overwrite([tmp_path / "other.star", out], [None, src])
        msg = str(exc.value)
        assert msg.startswith(f"refusing to write {out}: it is an input of this command")
        assert str(src) in msg and "choose another output path" in msg
    # other files, missing outputs or inputs, None entries: fine
    (tmp_path / "other.star").write_text("x\n")
    refuse_overwrite([tmp_path / "other.star", tmp_path / "new.star", None],
                     [src, tmp_path / "missing.star", None, ""])  # fmt: skip
    assert src.read_text() == "data\n"


def test_atomic_path_names_the_final_file_on_a_full_disk(tmp_path):
    final = tmp_path / "poses.npz"
    final.write_bytes(b"old")
    with pytest.raises(OSError) as exc, atomic_path(final) as tmp:
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")  # as fh.write raises it
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(final)
    assert final.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["poses.npz"]  # no temporary left
    # an error naming the temporary file is renamed too; other errors pass unchanged
    with pytest.raises(PermissionError) as exc2, atomic_path(final) as tmp:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp))
    assert exc2.value.filename == str(final)
    with pytest.raises(ValueError), atomic_path(final) as tmp:
        np.save(tmp, np.zeros(2))
        raise ValueError("bug")
    assert final.read_bytes() == b"old"
