"""Safe file output: atomic writes (temporary file, then rename) and a guard that refuses
to write over an input of the same command."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from cryofield.errors import CryofieldError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched, so a
    crash never leaves a half-written output behind.

    Examples
    --------
    >>> with atomic_path("out.npz") as tmp:  # doctest: +SKIP
    ...     np.savez(tmp, x=x)
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{final.name}.", suffix=final.suffix, dir=final.parent
        )
    except OSError as err:  # name the file the user asked for, not the temporary one
        if err.errno is None:
            raise
        raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(final)) from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno is not None and err.filename in (None, str(tmp), tmp):
            # name the file the user asked for, not the hidden temporary one
            raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(final)) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def refuse_overwrite(
    outputs: Iterable[str | os.PathLike[str] | None],
    inputs: Iterable[str | os.PathLike[str] | None],
) -> None:
    """Refuse to write any of ``outputs`` over one of ``inputs`` (before any work starts).

    Two paths are the same file when they resolve to the same inode (``os.path.samefile``:
    the same path, a symbolic link to it, a hard link, ``..`` components). Paths that do not
    exist yet cannot hold an input, and ``None`` entries are skipped.

    Raises
    ------
    CryofieldError
        ``refusing to write OUT: it is an input of this command (IN); choose another
        output path``.
    """
    stats = []
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        try:
            stats.append((inp, os.stat(inp)))
        except (OSError, ValueError):
            continue
    if not stats:
        return
    for out in outputs:
        if out is None:
            continue
        try:
            st = os.stat(out)
        except (OSError, ValueError):
            continue
        for inp, st_in in stats:
            if os.path.samestat(st, st_in):
                raise CryofieldError(
                    f"refusing to write {out}: it is an input of this command ({inp}); "
                    "choose another output path"
                )
