"""Deployments to real agent processes: the controller (``slmfleet up``) delivers a signed artifact over
a real broker; each agent verifies it, stages it, self-tests, switches while serving, and rolls back.
Agents are killed with SIGKILL in the middle and must resume from their persisted state."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.broker.embedded import free_port
from tests.e2e.fleet import ControllerProc, Fleet
from tests.helpers import wait_until
from tests.registry.tiny_models import anomaly_model

pytestmark = pytest.mark.slow

WINDOW = {"values": [0.1, -0.2, 0.3, 0.0, 0.5, -0.1, 0.2, 0.05]}


def register(ctl: ControllerProc, tmp_path: Path, seed: int, trees: int = 50) -> dict[str, Any]:
    """One more version of the ``pump`` anomaly model (a different forest each time)."""
    path, threshold = anomaly_model(tmp_path / f"m{seed}.onnx", seed=seed, trees=trees)
    options = {"task": "anomaly", "anomaly": {"threshold": threshold, "higher_is_anomalous": False, "output": "scores"}}
    r = httpx.post(
        ctl.api + "/api/v1/models/pump/versions",
        files=[("file", ("m.onnx", path.read_bytes()))],
        data={"options": json.dumps(options)},
        headers=ctl.auth,
        timeout=120,
    )
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def deploy(ctl: ControllerProc, version: int, devices: list[str]) -> str:
    body = {"model": "pump", "version": version, "variant": "fp32", "target": {"devices": devices}}
    r = httpx.post(ctl.api + "/api/v1/deployments", json=body, headers=ctl.auth, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["id"]  # type: ignore[no-any-return]


def deployment(ctl: ControllerProc, dep_id: str) -> dict[str, Any]:
    return ctl.get(f"/api/v1/deployments/{dep_id}").json()  # type: ignore[no-any-return]


def active_version(ctl: ControllerProc, device_id: str) -> int | None:
    device = ctl.get(f"/api/v1/devices/{device_id}").json()
    active = [m for m in device.get("installed", []) if m.get("active") and m.get("model") == "pump"]
    return active[0]["version"] if active else None


def pin_key(ctl: ControllerProc, path: Path) -> Path:
    path.write_text(ctl.get("/api/v1/signing-key").json()["public_key_pem"])
    return path


class Traffic:
    """Applications on the device: requests to the agent's local endpoint until stopped (bounded)."""

    def __init__(self, port: int, limit: int = 20_000, body: dict[str, Any] | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}/v1/infer"
        self.body = WINDOW if body is None else body
        self.versions: Counter[int] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._limit = limit
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            for _ in range(self._limit):
                if self._stop.is_set():
                    return
                try:
                    r = client.post(self.url, json=self.body)
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                body = r.json()
                if r.status_code != 200 or "error" in body.get("result", {}):
                    self.failures.append(f"{r.status_code} {body}")
                else:
                    self.versions[body["model"]["version"]] += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def test_deploy_switch_while_serving_roll_back_and_refuse_unsigned(fleet: Fleet, tmp_path: Path) -> None:
    ctl = fleet.start_controller()
    for seed in (1, 2):
        register(ctl, tmp_path, seed)
    key = pin_key(ctl, tmp_path / "controller.pem")
    http_port = free_port()
    fleet.start_agent("edge-a", "--signing-key-file", str(key), "--http-port", str(http_port))
    fleet.start_agent("edge-b", "--signing-key-file", str(key))
    fleet.start_agent("edge-nokey")
    fleet.wait_online(["edge-a", "edge-b", "edge-nokey"], 30)

    first = deploy(ctl, 1, ["edge-a", "edge-b", "edge-nokey"])
    done = wait_until(lambda: (d := deployment(ctl, first))["status"] in ("completed", "failed") and d, 60)
    by_device = {t["device_id"]: t for t in done["targets"]}
    assert by_device["edge-a"]["state"] == by_device["edge-b"]["state"] == "active", done
    assert by_device["edge-nokey"]["state"] == "failed" and "signing key" in by_device["edge-nokey"]["reason"]
    wait_until(lambda: active_version(ctl, "edge-a") == active_version(ctl, "edge-b") == 1, 20)
    assert active_version(ctl, "edge-nokey") is None

    # version 2 while an application keeps asking edge-a: no request fails across the switch
    traffic = Traffic(http_port)
    try:
        wait_until(lambda: traffic.versions[1] >= 20, 20, what="requests served by version 1")
        second = deploy(ctl, 2, ["edge-a", "edge-b"])
        wait_until(lambda: deployment(ctl, second)["status"] == "completed", 60, what="version 2 deployed")
        wait_until(lambda: traffic.versions[2] >= 20, 20, what="requests served by version 2")
    finally:
        traffic.stop()
    assert traffic.failures == [] and traffic.versions[1] >= 20 and traffic.versions[2] >= 20
    # a device's installed models reach the API with its birth, the message after its ACTIVE report, through the
    # ingest writer (which lingers up to 0.2 s for a batch): "completed" can be read before that row is written
    wait_until(lambda: active_version(ctl, "edge-a") == active_version(ctl, "edge-b") == 2, 20, what="v2 installed")

    # an agent restart reports its true installed model: the active slot, not a configured one
    fleet.agents["edge-b"].kill()
    wait_until(lambda: ctl.devices()["edge-b"] == "offline", 30)
    fleet.start_agent("edge-b", "--signing-key-file", str(key))
    wait_until(lambda: ctl.devices()["edge-b"] == "online" and active_version(ctl, "edge-b") == 2, 30)

    # a rollback command takes both back to version 1 (the previous slot)
    r = httpx.post(ctl.api + f"/api/v1/deployments/{second}/rollback", headers=ctl.auth, timeout=10)
    assert r.status_code == 200, r.text
    wait_until(lambda: active_version(ctl, "edge-a") == active_version(ctl, "edge-b") == 1, 60, what="rolled back")
    assert httpx.post(f"http://127.0.0.1:{http_port}/v1/infer", json=WINDOW, timeout=10).json()["model"]["version"] == 1


def test_agents_killed_mid_deployment_resume_and_finish(fleet: Fleet, tmp_path: Path) -> None:
    """SIGKILL each agent at a different point of a deployment (just after the command, while downloading,
    after it) and restart it: every one ends with the new model active, verified, exactly once."""
    ctl = fleet.start_controller(env={"SLMFLEET_CHUNK_SIZE": "4096"})
    register(ctl, tmp_path, 1)
    register(ctl, tmp_path, 2)
    key = pin_key(ctl, tmp_path / "controller.pem")
    devices = ["k0", "k1", "k2"]
    for d in devices:
        fleet.start_agent(d, "--signing-key-file", str(key))
    fleet.wait_online(devices, 30)
    dep = deploy(ctl, 1, devices)

    def target(device: str) -> dict[str, Any]:
        return next(t for t in deployment(ctl, dep)["targets"] if t["device_id"] == device)

    fleet.agents["k0"].kill()  # right after the command
    wait_until(lambda: target("k1")["chunks_have"] > 0 or target("k1")["state"] != "pending", 30)
    fleet.agents["k1"].kill()  # somewhere in the download or after it
    wait_until(lambda: target("k2")["state"] in ("verifying", "staged", "activating", "active"), 60)
    fleet.agents["k2"].kill()
    for d in devices:
        fleet.start_agent(d, "--signing-key-file", str(key))
    done = wait_until(lambda: (x := deployment(ctl, dep))["status"] in ("completed", "failed") and x, 90)
    assert done["status"] == "completed", done
    wait_until(lambda: all(active_version(ctl, d) == 1 for d in devices), 30)
    for d in devices:
        log = (tmp_path / f"{d}.log").read_text()
        assert "Traceback" not in log, log[-3000:]


def test_a_deployed_model_over_the_memory_ceiling_is_refused_with_the_reason(fleet: Fleet, tmp_path: Path) -> None:
    """``--model-max-rss-mib`` holds for deployed models too: the self-test refuses one whose weights exceed it."""
    ctl = fleet.start_controller()
    version = register(ctl, tmp_path, 1, trees=400)
    size = next(v for v in version["variants"] if v["variant"] == "fp32")["size_bytes"]
    assert size > 2 * 2**20, size  # the ceiling below is under its weights alone
    key = pin_key(ctl, tmp_path / "controller.pem")
    fleet.start_agent("small", "--signing-key-file", str(key), "--model-max-rss-mib", "1")
    fleet.wait_online(["small"], 30)
    dep = deploy(ctl, 1, ["small"])
    done = wait_until(lambda: (d := deployment(ctl, dep))["status"] in ("completed", "failed") and d, 60)
    target = done["targets"][0]
    assert target["state"] == "failed" and "memory ceiling" in target["reason"], target
    assert active_version(ctl, "small") is None
    assert fleet.agents["small"].alive()
