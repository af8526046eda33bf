"""User-facing errors.

Raise :class:`CryofieldError` (or a subclass) for anything the user can fix: a bad file,
a missing column, an impossible option. The CLI prints its message on one line, without a
traceback (``--debug`` shows it). The message must name the file, the row and the field
when they are known.
"""

from __future__ import annotations


class CryofieldError(Exception):
    """An error caused by user input, reported on one line."""


class InputFileError(CryofieldError):
    """A particle, metadata or volume file that cannot be read as expected."""

    def __init__(self, path: object, message: str, row: int | None = None) -> None:
        where = f"{path}" if row is None else f"{path}, row {row}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.row = row
