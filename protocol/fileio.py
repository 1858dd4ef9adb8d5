"""Crash-safe file writes that both parties use (the audit logs, checkpoints, state, keys).

``atomic_write_bytes``: temp file in the same folder, fsync, one ``os.replace``: a crash leaves
the old file or the new one, never a torn one. ``append_line``: one write per line, then fsync:
a line is either fully in the file or absent.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["append_line", "atomic_write_bytes"]


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically; ``mode``: permission bits set before any byte is
    written (e.g. 0o600 for a private key). Creates missing parent folders.

    Raises:
        OSError: the folder cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_line(path: Path, line: str) -> None:
    """Append ``line`` (a newline is added) with a single write, then flush and fsync.

    Raises:
        OSError: the file cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
