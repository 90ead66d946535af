"""Shared test helpers: waiting on conditions, processes, raw MQTT clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what or predicate}; last value: {last!r}")


def slmfleet_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "slmfleet", *args]


class FakeClock:
    """A clock the test moves: ``clock()`` is now, ``advance(s)`` moves it."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Proc:
    """A child process with its output in a log file, ended by PID."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None, stdin: bool = False) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.popen = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            cwd=REPO,
            env=full_env,
        )

    def write_stdin(self, text: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text.encode())
        self.popen.stdin.flush()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: a crash or power loss."""
        if self.alive():
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()
        return int(self.popen.returncode)


class RawMqtt:
    """A plain paho client (threaded loop) for publishing crafted payloads and watching topics in tests."""

    def __init__(self, port: int, client_id: str = "test-raw", protocol: int = mqtt.MQTTv311) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        wait_until(self.client.is_connected, 10, what="raw MQTT client connected")

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def subscribe(self, filter_: str, qos: int = 1) -> None:
        self.client.subscribe(filter_, qos)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(10)

    def received(self, topic_prefix: str = "") -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return [m for m in self.messages if m[0].startswith(topic_prefix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """A sample's value from Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in (labels or {}).items())
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_part = head.partition("{")
        if metric != name:
            continue
        if want and not all(part in label_part for part in want.split(",")):
            continue
        total += float(value)
    return total


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


class LoopThread:
    """An asyncio loop in a background thread, for driving MqttTransports from synchronous tests."""

    def __init__(self) -> None:
        import asyncio

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the loop thread and return its result."""
        import asyncio
        import concurrent.futures

        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        del asyncio
        return future.result(15)

    def run(self, coro: Any) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
