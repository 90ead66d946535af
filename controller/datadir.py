"""One controller per data directory: ``slmfleet up`` holds an exclusive lock on ``DATA_DIR/controller.lock``.

A second controller on the same directory would share the database and the embedded broker's files and
rewrite ``controller.json`` (the first one's CLI then talks to the wrong process). The lock is an
``flock`` on an open file, so the kernel releases it when the process ends, however it ends (a crash or
SIGKILL leaves no stale lock to clean up); the file also holds the owner's pid, for the refusal message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

from controller.errors import DataDirBusy

LOCK_FILE = "controller.lock"


class DataDirLock:
    """Held from ``acquire()`` until ``release()`` or the end of the process."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock, or raise DataDirBusy naming the process that has it."""
        f = open(self.path, "a+")  # noqa: SIM115 - kept open while the lock is held
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise DataDirBusy(
                f"another slmfleet controller (pid {owner}) is running on {self.path.parent}: stop it first,"
                " or give this one its own --data-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            self._file.seek(0)
            self._file.truncate()
        self._file.close()  # closing the last descriptor releases the flock
        self._file = None
