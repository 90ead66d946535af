"""Helpers shared by benchmarks: child processes that talk JSON lines, private brokers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from controller.broker.embedded import EmbeddedBroker, mosquitto_binary

#: the PostgreSQL server benchmarks and tests create their throwaway databases on
POSTGRES_ADMIN_URL = os.environ.get("SLMFLEET_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@contextmanager
def postgres_database(prefix: str) -> Iterator[tuple[str | None, str]]:
    """``(url, "")`` of a new, empty database on POSTGRES_ADMIN_URL, dropped afterwards; ``(None, why)`` when
    no server answers."""
    try:
        admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        yield None, f"no PostgreSQL at {POSTGRES_ADMIN_URL} ({type(exc).__name__})"
        return
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False), ""
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


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
