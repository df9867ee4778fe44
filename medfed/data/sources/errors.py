"""The one exception a data loader lets out.

A bad file in a hospital export is a data problem, not a bug: the user needs the file (and, for a
manifest, the CSV row and column) to go and fix it, not a traceback from deep inside a decoder.
So every loader catches whatever its decoder raises and re-raises it as ``DataError`` with that
context. Row numbers are spreadsheet rows: the header is row 1, the first data row is row 2.
"""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data (unreadable file, missing column, unknown label, ...); the message says where."""


def where(file: str | Path, row: int | None = None, column: str | None = None) -> str:
    """``file``, ``file row 3`` or ``file row 3, column 'label'``: the prefix of every message."""
    out = str(file)
    if row is not None:
        out += f" row {row}"
    if column is not None:
        out += f", column {column!r}" if row is not None else f" column {column!r}"
    return out
