"""A secured fleet end to end: ``slmfleet up --broker-auth dynsec``, a device joins with
``slmfleet agent enroll`` and its own broker credentials, receives a deployment through the
per-device ACLs (the artifact's chunk topic is granted at deploy time), and is revoked."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import httpx
import pytest

from controller.broker import dynsec
from controller.broker.embedded import free_port, mosquitto_binary
from tests.e2e.fleet import ControllerProc, broker_url_from_banner
from tests.e2e.test_deploy_real_agents import active_version, deploy, deployment, register
from tests.helpers import Proc, metric_value, slmfleet_cmd, wait_until


def _broker_url(banner: str) -> str:
    url = broker_url_from_banner(banner)
    assert url is not None, f"no broker URL in the banner: {banner[-500:]}"
    return url


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        mosquitto_binary() is None or dynsec.plugin_path() is None,
        reason="needs mosquitto and its dynamic security plugin",
    ),
]


def test_enrolled_device_gets_a_deployment_and_a_revoked_one_is_shut_out(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "controller"
    up = Proc(
        slmfleet_cmd(
            "up",
            "--data-dir",
            str(data),
            "--port",
            str(port),
            "--broker-port",
            str(free_port()),
            "--broker-auth",
            "dynsec",
        ),
        tmp_path / "controller.log",
    )
    procs = [up]
    try:
        ctl = ControllerProc(up, f"http://127.0.0.1:{port}", data)
        wait_until(
            lambda: up.alive() and httpx.get(ctl.api + "/api/v1/health", timeout=2).json()["broker"]["connected"],
            30,
            what=f"controller up (log: {up.log_path})",
        )
        register(ctl, tmp_path, seed=1)
        auth = {"Authorization": f"Bearer {ctl.token}"}

        def enroll(device_id: str) -> Path:
            r = httpx.post(
                ctl.api + "/api/v1/enrollment-tokens", json={"labels": {"site": "lab"}}, headers=auth, timeout=30.0
            )
            token_file = tmp_path / f"{device_id}.token"
            token_file.write_text(r.json()["token"])
            out = tmp_path / device_id
            done = subprocess.run(
                [
                    *slmfleet_cmd("agent", "enroll", "--controller", ctl.api, "--token-file", str(token_file)),
                    *("--dir", str(out / "etc"), "--device-id", device_id, "--data-dir", str(out / "state")),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            assert stat.S_IMODE((out / "etc" / "mqtt-password").stat().st_mode) == 0o600
            return out / "etc" / "agent.toml"

        for device_id in ("edge-1", "edge-2"):
            procs.append(
                Proc(
                    slmfleet_cmd("agent", "--config", str(enroll(device_id)), "--reconnect-max", "1"),
                    tmp_path / f"{device_id}.log",
                )
            )
        intruder = Proc(
            slmfleet_cmd(
                "agent",
                "--broker",
                _broker_url(up.log()),
                "--device-id",
                "intruder",
                "--data-dir",
                str(tmp_path / "intruder"),
                "--broker-refused-retry",
                "0",
            ),
            tmp_path / "intruder.log",
        )
        procs.append(intruder)
        wait_until(lambda: ctl.devices() == {"edge-1": "online", "edge-2": "online"}, 30, what="enrolled agents")
        wait_until(lambda: not intruder.alive(), 30, what="the anonymous agent refused and exited")
        assert intruder.popen.returncode == 3  # --broker-refused-retry 0: give up
        assert "Not authorized" in intruder.log_path.read_text()

        dep = deploy(ctl, 1, ["edge-1"])
        done = wait_until(lambda: (d := deployment(ctl, dep))["status"] in ("completed", "failed") and d, 90)
        assert done["status"] == "completed", done
        wait_until(lambda: active_version(ctl, "edge-1") == 1, 30, what="edge-1 reports v1 active")
        # the device read the broadcast (its ACL was extended for this artifact), not a per-device repair
        metrics = ctl.get("/metrics").text
        assert metric_value(metrics, "slmfleet_chunks_published_total", {"kind": "broadcast"}) >= 1
        assert metric_value(metrics, "slmfleet_chunks_published_total", {"kind": "repair"}) == 0
        assert active_version(ctl, "edge-2") is None

        r = httpx.post(ctl.api + "/api/v1/devices/edge-2/revoke", headers=auth, timeout=10)
        assert r.status_code == 200, r.text
        # shut out by the broker, it keeps running for its local applications and tries again now and then
        wait_until(lambda: "trying the broker again" in procs[2].log(), 30, what="the revoked agent shut out")
        assert "Not authorized" in procs[2].log() and procs[2].alive()
        devices = httpx.get(ctl.api + "/api/v1/devices", timeout=5).json()["items"]
        assert {d["id"]: d["revoked_at"] is not None for d in devices} == {"edge-1": False, "edge-2": True}
    finally:
        for proc in reversed(procs):
            proc.stop(20)
