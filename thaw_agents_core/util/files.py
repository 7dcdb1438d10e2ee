"""File-system steps shared by the snapshot writer, the S3 download and the stores.

- :func:`atomic_replace`: a temp file beside the target, renamed over it only once complete and
  fsynced (readers see the old file or the new one, never a partial one; in-place truncation once
  left safetensors users with zero-filled mmaps);
- :func:`fsync_directory`: makes a rename durable;
- :func:`unlink_if_exists`: removal that tolerates a concurrent remover;
- :func:`flocked`: the cross-process lock of a store; :func:`touch`: the stores' LRU clock.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager


def unlink_if_exists(path: str) -> bool:
    """Remove ``path``; False when it was already gone (another process removed it first)."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def fsync_directory(directory: str) -> None:
    """fsync a directory, so that the renames into it survive a crash."""
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextmanager
def atomic_replace(
    path: str | os.PathLike[str], *, suffix: str = ".tmp", durable: bool = True
) -> Iterator[str]:
    """Yield a temp path in ``path``'s directory for the caller to fill.

    When the block succeeds the temp file is renamed over ``path`` (``durable``: the file is
    fsynced first and the directory after); when it raises the temp file is removed and
    ``path`` is left as it was.
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_if_exists(tmp)
        raise
    if durable:
        fsync_directory(directory)


def touch(path: str) -> None:
    """Mark ``path`` as just used (LRU clock). Does not change its directory's mtime."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except OSError:
        pass


@contextmanager
def flocked(path: str) -> Iterator[None]:
    """Exclusive ``flock`` on ``path`` (created if missing); released on exit or process death."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
