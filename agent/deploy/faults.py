"""Fault injection, for the process-level fault tests (tests/e2e/test_deploy_faults.py) and the simulator.

Never active unless asked for: with ``SLMFLEET_FAULT_CRASH_AT=<deploy state>`` in its environment, an
agent process ends itself with ``os._exit(137)`` (what a SIGKILL looks like to its parent) right after
the DeploymentManager has persisted entering that state by a transition of the table (not when a
restarted agent resumes it), before any side effect of the state happens.
Killing a process by timing cannot hit fast states (``activating`` lasts a few milliseconds); this can.

It crashes once per data directory: a marker file ``fault-crashed-<state>`` is written (durably) next to
the deployment record first, so the restarted agent, with the same environment, resumes instead of
crashing again. Record stores without a directory (memory, simulations) never crash the process.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

#: the environment variable naming the deploy state to crash in (e.g. ``verifying``)
CRASH_AT_ENV = "SLMFLEET_FAULT_CRASH_AT"
#: the exit status of the injected crash (128 + SIGKILL)
CRASH_EXIT_CODE = 137

#: how the process ends; tests replace it to observe the crash in-process
exit_process: Callable[[int], object] = os._exit


def marker_path(root: Path, state: str) -> Path:
    return root / f"fault-crashed-{state}"


def crash_point(state: str, root: Path | None) -> None:
    """Called once the manager has persisted entering ``state``; ``root`` is the record store's directory.

    Crashes the process when ``SLMFLEET_FAULT_CRASH_AT`` names ``state`` and it has not crashed there yet.
    """
    wanted = os.environ.get(CRASH_AT_ENV)
    if not wanted or wanted != state or root is None:
        return
    marker = marker_path(root, state)
    if marker.exists():
        return
    with open(marker, "wb") as f:
        f.write(b"crashed here once\n")
        f.flush()
        os.fsync(f.fileno())
    log.warning("fault injection (%s=%s): the agent process ends now", CRASH_AT_ENV, state)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    exit_process(CRASH_EXIT_CODE)
