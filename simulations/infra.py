"""The broker and the controller a scenario runs against, and a small client for the controller's API."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from controller.broker.embedded import EmbeddedBroker, free_port
from controller.processes import die_with_parent
from simulations.errors import SimulationError

log = logging.getLogger(__name__)

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int | None) -> float | None:
    """User plus system CPU seconds of process ``pid`` (Linux /proc), or None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class Api:
    """The controller's REST API with an operator token; errors say which call failed and why."""

    def __init__(self, base: str, token: str, timeout: float = 60.0) -> None:
        self.base = base.rstrip("/")
        self.client = httpx.Client(
            base_url=self.base,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            # idle connections are dropped before any server closes them (uvicorn's default: after 5 s), so
            # no request goes out on a connection the server is closing
            limits=httpx.Limits(keepalive_expiry=2.0),
        )

    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (200, 201), **kwargs: Any) -> Any:
        try:
            try:
                r = self.client.request(method, path, **kwargs)
            except httpx.RemoteProtocolError:
                if method != "GET":
                    raise
                r = self.client.request(method, path, **kwargs)  # a read is safe to ask again on a new connection
        except httpx.HTTPError as exc:
            raise SimulationError(f"{method} {self.base}{path}: {exc}") from None
        if r.status_code not in ok:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise SimulationError(f"{method} {path} answered {r.status_code}: {detail}")
        return r.json() if r.content else None

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def devices(
        self, selector: str | None = None, status: str | None = None, q: str | None = None
    ) -> list[dict[str, Any]]:
        """Every device (paginated), optionally filtered by selector, status and id substring."""
        out: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 1000}
        if selector:
            params["selector"] = selector
        if status:
            params["status"] = status
        if q:
            params["q"] = q
        while True:
            page = self.get("/api/v1/devices", params={**params, "offset": len(out)})
            out.extend(page["items"])
            if len(out) >= page["total"] or not page["items"]:
                return out

    def count_devices(self, selector: str | None = None, status: str | None = None, q: str | None = None) -> int:
        params: dict[str, Any] = {"limit": 1}
        if selector:
            params["selector"] = selector
        if status:
            params["status"] = status
        if q:
            params["q"] = q
        return int(self.get("/api/v1/devices", params=params)["total"])

    def close(self) -> None:
        self.client.close()


class BrokerHandle:
    """A private broker this run started, or a running one given by URL."""

    def __init__(self, url: str | None, engine: str, state_dir: Path) -> None:
        self._broker: EmbeddedBroker | None = None
        if url is None:
            self._broker = EmbeddedBroker(state_dir, engine=engine)  # type: ignore[arg-type]
            self.url = self._broker.start()
            self.engine = self._broker.engine or engine
        else:
            self.url = url
            # a running broker: its engine when the scenario names it (amqtt speaks MQTT 3.1.1 only)
            self.engine = engine if engine != "auto" else "external"

    @property
    def pid(self) -> int | None:
        return self._broker.pid if self._broker is not None else None

    @property
    def protocol(self) -> str:
        return self._broker.protocol if self._broker is not None else "auto"

    def stop(self) -> None:
        if self._broker is not None:
            self._broker.stop()
            self._broker = None


class ControllerHandle:
    """``slmfleet up`` as a child process on a free port and a temporary data directory, or a running one."""

    def __init__(
        self,
        *,
        url: str | None,
        token: str | None,
        broker_url: str,
        data_dir: Path,
        settings: dict[str, Any],
        amqtt: bool = False,
        timeout: float = 60.0,
    ) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.data_dir = data_dir
        if url is not None:
            assert token is not None
            self.url, self.token = url.rstrip("/"), token
            self.api = Api(self.url, self.token)
            self.api.get("/api/v1/health")
            return
        data_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        env = dict(os.environ)
        for key, value in settings.items():
            env[f"SLMFLEET_{key.upper()}"] = json.dumps(value) if isinstance(value, dict | list) else str(value)
        if amqtt:
            env.setdefault("SLMFLEET_MQTT_PROTOCOL", "3.1.1")
        env.setdefault("SLMFLEET_LOG_LEVEL", "WARNING")
        env["PYTHONUNBUFFERED"] = "1"
        self.log_path = data_dir / "controller.log"
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        cmd = [
            sys.executable,
            "-m",
            "slmfleet",
            "up",
            "--data-dir",
            str(data_dir),
            "--broker",
            broker_url,
            "--port",
            str(port),
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - prctl only, no locks taken
        )
        log_file.close()
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SimulationError(f"the controller exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                health = httpx.get(self.url + "/api/v1/health", timeout=2).json()
                if health["broker"]["connected"] and (data_dir / "admin-token").is_file():
                    break
                last = health
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                last = exc
            time.sleep(0.1)
        else:
            self.stop()
            raise SimulationError(f"the controller was not ready within {timeout:.0f}s ({last}): {self.log_tail()}")
        self.token = (data_dir / "admin-token").read_text().strip()
        self.api = Api(self.url, self.token)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def cpu_s(self) -> float | None:
        return process_cpu_s(self.pid)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except (OSError, AttributeError):
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        if hasattr(self, "api"):
            self.api.close()
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
