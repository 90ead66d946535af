"""One worker process: started with its limits, its progress lines read, stopped on request."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.jobs.limits import WorkerLimits, preexec_for, thread_env

log = logging.getLogger(__name__)

#: how long a worker has to stop at its next safe point after SIGTERM before it is killed
STOP_GRACE_S = 60.0


@dataclass
class WorkerState:
    progress: float = 0.0
    message: str = ""
    report: dict[str, Any] | None = None
    error: str | None = None
    lines: list[str] = field(default_factory=list)


class Worker:
    """``python -m controller.jobs.worker <step_dir>`` under ``limits``; ``state`` follows its stdout."""

    def __init__(self, step_dir: Path, limits: WorkerLimits) -> None:
        self.step_dir = step_dir
        self.state = WorkerState()
        self._log = open(step_dir / "worker.log", "ab")  # noqa: SIM115 (closed in wait)
        env = {**os.environ, **thread_env(limits.threads)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller.jobs.worker", str(step_dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=step_dir,
            preexec_fn=preexec_for(limits),  # noqa: PLW1509 (only system calls, see limits.py)
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, name=f"derive-worker-{self.pid}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(line, dict):
                continue
            if "progress" in line:
                self.state.progress = float(line["progress"])
                self.state.message = str(line.get("message", ""))
            if "report" in line:
                self.state.report = line["report"]
            if "error" in line:
                self.state.error = str(line["error"])

    def watch(self, tick: Callable[[WorkerState], bool], every_s: float = 0.5) -> int:
        """Wait for the worker to exit, calling ``tick`` every ``every_s``; ``tick`` answering True stops it
        (SIGTERM: it stops at its next safe point). The exit status (negative: the signal that ended it)."""
        stopping_since: float | None = None
        while True:
            try:
                rc = self.proc.wait(every_s)
                break
            except subprocess.TimeoutExpired:
                pass
            if stopping_since is None and tick(self.state):
                stopping_since = time.monotonic()
                self.terminate()
            elif stopping_since is not None and time.monotonic() - stopping_since > STOP_GRACE_S:
                self.proc.kill()
        self._reader.join(5)
        self._log.close()
        return rc

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = STOP_GRACE_S) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log_tail(self, n: int = 800) -> str:
        try:
            text = (self.step_dir / "worker.log").read_text(errors="replace")
        except OSError:
            return ""
        return text[-n:].strip()


def is_worker(pid: int, step_dir: Path) -> bool:
    """True when ``pid`` is a live worker of ``step_dir`` (one a previous controller process left behind)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"controller.jobs.worker" in cmdline and str(step_dir).encode() in cmdline


def end_stray(pid: int, step_dir: Path, timeout: float = STOP_GRACE_S) -> None:
    """Stop a worker a previous controller process left behind on ``step_dir`` (normally it died with it)."""
    if not is_worker(pid, step_dir):
        return
    log.info("derive: stopping worker %d left on %s", pid, step_dir)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while is_worker(pid, step_dir) and time.monotonic() < deadline:
        time.sleep(0.2)  # a process that is not our child: no wait() for it
    if is_worker(pid, step_dir):
        os.kill(pid, signal.SIGKILL)
