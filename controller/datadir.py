"""The data directory is private: the database (password and token hashes), the signing key, the admin token and
password, the broker's credentials and persistence are readable by the controller's user only.

``prepare`` runs where ``slmfleet up`` prepares the directory, before anything is written into it:

- it creates the directory with mode 0700, or checks an existing one: it must belong to this user (another
  user's directory cannot be made private by us: refused with what to do);
- whatever in it other users may read or write is fixed (directories 0700, files 0600; the public signing key
  stays readable), with one log line that says what was changed;
- the process's umask becomes 077, so every file written from then on (SQLite's -wal and -shm files, the
  embedded broker's persistence and its plugin file, artifacts, logs) is private from its creation.
"""

from __future__ import annotations

import logging
import os
import pwd
import stat
from pathlib import Path

from controller.errors import ControllerError

log = logging.getLogger(__name__)

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
