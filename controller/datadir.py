"""The controller's data directory: private to the controller's user, and held by one controller at a time.

**Private.** The database (password and token hashes), the signing key, the admin token and password, the
broker's credentials and persistence are readable by the controller's user only. ``prepare`` runs where
``slmfleet up`` prepares the directory, before anything is written into it:

- it creates the directory with mode 0700, or checks an existing one: it must belong to this user (another
  user's directory cannot be made private by us: refused with what to do);
- whatever in it other users may read or write is fixed (directories 0700, files 0600; the public signing key
  stays readable), with one log line that says what was changed;
- the process's umask becomes 077, so every file written from then on (SQLite's -wal and -shm files, the
  embedded broker's persistence and its plugin file, artifacts, logs) is private from its creation.

**One controller.** A second controller on the same directory would share the database and the embedded
broker's files and rewrite ``controller.json`` (the first one's CLI then talks to the wrong process).
``slmfleet up`` holds an exclusive lock on ``DATA_DIR/controller.lock``: an ``flock`` on an open file, so the
kernel releases it when the process ends, however it ends (a crash or SIGKILL leaves no stale lock to clean
up); the file also holds the owner's pid, for the refusal message.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import stat
from pathlib import Path
from typing import IO

from controller.errors import ControllerError, DataDirBusy

log = logging.getLogger(__name__)

LOCK_FILE = "controller.lock"
#: files other users may read: the public half of the signing key (devices pin it; also served by the API)
PUBLIC_FILES = frozenset({"signing-key.pub.pem"})
#: how many changed paths the log line names
SHOWN = 8


class DataDirError(ControllerError):
    """The data directory cannot be made private."""


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def prepare(path: Path) -> list[str]:
    """Create or check ``path``, make it and its contents private, set the umask to 077; returns what it fixed."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = path.stat().st_uid
    except OSError as exc:
        raise DataDirError(
            f"cannot create the data directory {path}: {exc.strerror}; choose another with --data-dir"
        ) from None
    me = os.geteuid()
    if owner != me and me != 0:
        raise DataDirError(
            f"the data directory {path} belongs to {_user(owner)}, not to this user, {_user(me)}: its files cannot"
            " be kept private; run the controller as its owner, or choose another directory with --data-dir"
        )
    fixed = make_private(path)
    if fixed:
        shown = ", ".join(fixed[:SHOWN]) + (f" and {len(fixed) - SHOWN} more" if len(fixed) > SHOWN else "")
        log.warning("data directory %s was open to other users: made %d paths private (%s)", path, len(fixed), shown)
    os.umask(0o077)
    return fixed


def make_private(root: Path) -> list[str]:
    """Take group and other permissions off ``root`` and everything below it (symbolic links are not followed).

    Returns each changed path, relative to ``root``, with its old and new mode. Raises DataDirError for a path
    this user may not change.
    """
    fixed: list[str] = []

    def fix(path: Path, mode: int) -> None:
        new = stat.S_IMODE(mode) & ~0o077
        try:
            os.chmod(path, new)
        except OSError as exc:
            raise DataDirError(
                f"{path} is open to other users (mode {stat.S_IMODE(mode):04o}) and cannot be made private"
                f" ({exc.strerror}; it belongs to {_user(path.lstat().st_uid)}): chmod go= it as its owner,"
                " or choose another --data-dir"
            ) from None
        name = path.relative_to(root).as_posix() if path != root else "."
        fixed.append(f"{name} {stat.S_IMODE(mode):04o}->{new:04o}")

    for directory, _subdirs, files in os.walk(root):  # not into linked directories
        here = Path(directory)
        mode = here.lstat().st_mode
        if stat.S_IMODE(mode) & 0o077:
            fix(here, mode)
        for name in files:
            path = here / name
            mode = path.lstat().st_mode
            if not stat.S_ISREG(mode) or (here == root and name in PUBLIC_FILES):
                continue  # links point elsewhere (not ours to change); sockets and fifos hold nothing
            if stat.S_IMODE(mode) & 0o077:
                fix(path, mode)
    return fixed


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
