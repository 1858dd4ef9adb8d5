"""Crash-safe file writes that both parties use (the audit logs, checkpoints, state, keys).

``atomic_write_bytes`` (and ``atomic_write_stream`` for large files): temp file in the same
folder, fsync, one ``os.replace``: a crash leaves the old file or the new one, never a torn one. ``append_line``: one write per line, then fsync:
a line is either fully in the file or absent. ``FileLock``: an exclusive advisory lock that
serialises read-modify-write cycles of several processes on one folder (the auditor's ledger).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["FileLock", "append_line", "atomic_write_bytes", "atomic_write_stream"]


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically; ``mode``: permission bits set before any byte is
    written (e.g. 0o600 for a private key). Creates missing parent folders.

    The bytes go to a temp file beside ``path`` (``.<name>.*.tmp``), are fsynced, and the temp
    file is renamed over ``path`` with one ``os.replace`` (then the folder is fsynced, so the
    rename survives a power cut). On any failure before the rename (a full disk, a quota, an
    I/O error) the temp file is removed and ``path`` still holds its previous content, untouched.

    Raises:
        OSError: the folder or the temp file cannot be written (``path`` is unchanged).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_stream(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically with ``write(fh)`` streaming into the temp file (for large files
    that should not be built in memory first, e.g. ``np.savez`` of a decoded-image cache); the
    same temp file, fsync and single ``os.replace`` as :func:`atomic_write_bytes`.

    Raises:
        OSError: the folder or the temp file cannot be written (``path`` is unchanged); and
            whatever ``write`` raises (the temp file is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte of ``data`` is written (a write may be partial)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(folder: Path) -> None:
    """Best-effort fsync of ``folder`` so a rename in it is durable (not every OS or file
    system can open or fsync a folder; the rename itself has already happened)."""
    try:
        dfd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


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


class FileLock:
    """An exclusive advisory lock (``flock``) on ``path``, re-entrant within one process.

    Processes that share a folder (a restarted auditor beside a dying one, a launcher's check
    beside the executor) hold it around every read-modify-write of a shared file, so no update
    is lost. ``path`` may be the folder itself (preferred: a lock file can be deleted while held,
    after which a second process would lock a new file; the folder cannot go while it holds the
    shared files). Use as a context manager; nested ``with`` blocks in one process lock once.

    Raises:
        OSError: the lock file cannot be created (on entering).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._mutex = threading.RLock()
        self._fd: int | None = None
        self._depth = 0

    def __enter__(self) -> "FileLock":
        self._mutex.acquire()
        try:
            if self._depth == 0:
                if self.path.is_dir():
                    fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
                else:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd = fd
            self._depth += 1
        except BaseException:
            self._mutex.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._depth -= 1
            if self._depth == 0 and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
        finally:
            self._mutex.release()
