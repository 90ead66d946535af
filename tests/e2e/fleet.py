"""Controller and agents as real processes, for end-to-end tests."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from controller.broker.embedded import free_port
from tests.helpers import Proc, slmfleet_cmd, wait_until


@dataclass
class ControllerProc:
    proc: Proc
    api: str
    data_dir: Path
    #: the embedded broker's port (``start_up``), None with --broker
    broker_port: int | None = None

    @property
    def token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    @property
    def auth(self) -> dict[str, str]:
        """The admin's headers for the API."""
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, **kw: object) -> httpx.Response:
        return httpx.get(self.api + path, timeout=10, **kw)  # type: ignore[arg-type]

    def devices(self) -> dict[str, str]:
        page = self.get("/api/v1/devices", params={"limit": 1000}).json()
        return {d["id"]: d["status"] for d in page["items"]}


#: How long a controller may take to answer its health check after it was started. A few seconds on a quiet
#: machine; on a loaded 2-core machine (load average 14-22) its imports alone have taken more than 30 s
#: (the log still empty), so the deadline is a bound on a hung start, not a measure of start-up speed.
START_S = 90


@dataclass
class Fleet:
    root: Path
    broker_url: str
    controller: ControllerProc | None = None
    agents: dict[str, Proc] = field(default_factory=dict)

    def start_controller(self, *extra: str, env: dict[str, str] | None = None) -> ControllerProc:
        port = free_port()
        data = self.root / "controller"
        proc = Proc(
            slmfleet_cmd("up", "--data-dir", str(data), "--broker", self.broker_url, "--port", str(port), *extra),
            self.root / "controller.log",
            env=env,
        )
        api = f"http://127.0.0.1:{port}"
        self.controller = ControllerProc(proc, api, data)
        wait_until(
            lambda: proc.alive() and httpx.get(api + "/api/v1/health", timeout=2).json()["broker"]["connected"],
            START_S,
            what=f"controller up (log: {proc.log_path})",
        )
        return self.controller

    def start_agent(self, device_id: str, *extra: str) -> Proc:
        proc = Proc(
            slmfleet_cmd(
                "agent",
                "--broker",
                self.broker_url,
                "--device-id",
                device_id,
                "--data-dir",
                str(self.root / device_id),
                "--reconnect-max",
                "1",
                *extra,
            ),
            self.root / f"{device_id}.log",
        )
        self.agents[device_id] = proc
        return proc

    def wait_online(self, devices: list[str] | set[str] | dict[str, object], timeout: float = 60.0) -> None:
        """Every one of ``devices`` reported online by the controller; fails at once when an agent exits,
        and at the deadline with each missing device's status and the end of its log."""
        ctl = self.controller
        assert ctl is not None
        wanted = sorted(devices)
        statuses: dict[str, str] = {}

        def ready() -> bool:
            dead = [d for d in wanted if d in self.agents and not self.agents[d].alive()]
            assert not dead, self._report(dead, statuses, "agent exited")
            statuses.clear()
            statuses.update(ctl.devices())
            return all(statuses.get(d) == "online" for d in wanted)

        try:
            wait_until(ready, timeout, what="agents online")
        except AssertionError as exc:
            missing = [d for d in wanted if statuses.get(d) != "online"]
            raise AssertionError(f"{exc}\n{self._report(missing, statuses, 'not online')}") from None

    def _report(self, devices: list[str], statuses: dict[str, str], what: str) -> str:
        lines = [f"{what}: " + ", ".join(f"{d} ({statuses.get(d, 'unknown')})" for d in devices)]
        for d in devices[:3]:
            proc = self.agents.get(d)
            if proc is not None:
                tail = "\n    ".join(proc.log().splitlines()[-15:])
                lines.append(f"--- {d} (alive: {proc.alive()}) log tail:\n    {tail}")
        if self.controller is not None:
            tail = "\n    ".join(self.controller.proc.log().splitlines()[-25:])
            lines.append(f"--- controller log tail:\n    {tail}")
        return "\n".join(lines)

    def stop(self) -> None:
        for proc in self.agents.values():
            proc.stop(10)
        if self.controller is not None:
            self.controller.proc.stop(20)


def start_up(root: Path, *extra: str, env: dict[str, str] | None = None) -> ControllerProc:
    """``slmfleet up`` on embedded defaults (its own broker) on free ports, once its health says ok."""
    port, broker_port = free_port(), free_port()
    data = root / "controller"
    args = ("up", "--data-dir", str(data), "--port", str(port), "--broker-port", str(broker_port), *extra)
    proc = Proc(slmfleet_cmd(*args), root / "controller.log", env=env)
    ctl = ControllerProc(proc, f"http://127.0.0.1:{port}", data, broker_port)
    try:
        wait_until(
            lambda: proc.alive() and httpx.get(ctl.api + "/api/v1/health", timeout=2).json()["status"] == "ok",
            START_S,
            what=f"slmfleet up ready (log: {proc.log_path})",
        )
    except AssertionError:
        proc.stop(20)
        raise
    return ctl


def served_version(http_port: int) -> int | None:
    """The model version an agent itself says it serves (its local /v1/health), not what the controller believes."""
    model = httpx.get(f"http://127.0.0.1:{http_port}/v1/health", timeout=5).json()["model"]
    return model["version"] if model else None


def broker_url_from_banner(text: str) -> str | None:
    m = re.search(r"MQTT broker\s+(mqtt://\S+)", text)
    return m.group(1) if m else None
