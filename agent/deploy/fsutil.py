"""Durable file updates: write a temporary file, fsync it, rename it over the target, fsync the directory.

After a crash or power loss the target holds either the old or the new content, never a mix or nothing.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably; the file gets ``mode`` (0600 by default)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        if mode != 0o600:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def durable_unlink(path: Path) -> None:
    """Remove ``path`` (if present) and make the removal durable."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        fsync_dir(path.parent)
