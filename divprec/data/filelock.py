"""An inter-process exclusive lock on a file, so one of several ranks builds a shared cache."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

# flock is unsupported on some network file systems (e.g. Lustre mounted without -o flock).
_NO_LOCKING = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}


@contextmanager
def exclusive_lock(path: str | os.PathLike[str], what: str = "") -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` body.

    Yields True when locked, False when the file system cannot lock: callers must then stay
    correct without exclusivity (e.g. build privately and rename into place). The kernel drops
    the lock when the holder dies, so a crashed builder never wedges the others.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process to finish %s (lock %s)", what or "work", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in _NO_LOCKING:
                raise
            logger.warning("cannot lock %s (%s); continuing without the lock", path, e.strerror)
            yield False
            return
        yield True
    finally:
        # Closing the descriptor releases the lock.
        os.close(fd)
