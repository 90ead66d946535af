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

    @property
    def token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    def get(self, path: str, **kw: object) -> httpx.Response:
        return httpx.get(self.api + path, timeout=10, **kw)  # type: ignore[arg-type]

    def devices(self) -> dict[str, str]:
        page = self.get("/api/v1/devices", params={"limit": 1000}).json()
        return {d["id"]: d["status"] for d in page["items"]}


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
            30,
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

    def stop(self) -> None:
        for proc in self.agents.values():
            proc.stop(10)
        if self.controller is not None:
            self.controller.proc.stop(20)


def broker_url_from_banner(text: str) -> str | None:
    m = re.search(r"MQTT broker\s+(mqtt://\S+)", text)
    return m.group(1) if m else None
