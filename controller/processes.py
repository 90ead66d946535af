"""Child processes that must not outlive the process that started them (the broker, a simulated controller)."""

from __future__ import annotations

import ctypes
import os
import signal

__all__ = ["die_with_parent"]


def die_with_parent() -> None:
    """``preexec_fn`` for a child on Linux: ask the kernel to SIGTERM it when its parent dies (even by SIGKILL),
    and make every file it writes (persistence, credentials, logs) readable by this user only.

    Runs in the child between fork and exec: it takes no locks and only calls ``umask`` and ``prctl``.
    """
    os.umask(0o077)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
