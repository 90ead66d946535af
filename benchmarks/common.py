"""Helpers shared by benchmarks: child processes that talk JSON lines, private brokers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from controller.broker.embedded import EmbeddedBroker, mosquitto_binary


class JsonProc:
    """A ``python -m module args...`` child that prints JSON lines on stdout."""

    def __init__(self, module: str, *args: object, stdin: bool = False) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", module, *map(str, args)],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )

    def read(self, timeout: float = 300.0) -> dict[str, Any]:
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.popen.args} ended without output (exit {self.popen.wait(timeout)})")
        return json.loads(line)  # type: ignore[no-any-return]

    def send(self, line: str = "") -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def wait(self, timeout: float = 300.0) -> int:
        return self.popen.wait(timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


def start_broker(path: Path) -> EmbeddedBroker:
    broker = EmbeddedBroker(path, engine="mosquitto" if mosquitto_binary() else "amqtt")
    broker.start()
    return broker


def wait_for(predicate: Any, timeout: float, interval: float = 0.005) -> float:
    """Poll until ``predicate()``; returns the time it became true. Raises at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.time()
        time.sleep(interval)
    raise TimeoutError(f"benchmark condition not met within {timeout}s")
