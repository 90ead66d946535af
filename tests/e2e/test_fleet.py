"""The walking skeleton end to end: a controller and agents as separate processes, a real broker."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import httpx

from controller.broker.embedded import EmbeddedBroker, free_port
from tests.e2e.fleet import Fleet, broker_url_from_banner
from tests.helpers import Proc, slmfleet_cmd, wait_until

KEEPALIVE = 4


def test_three_agents_online_telemetry_kill_restart(fleet: Fleet, private_broker: EmbeddedBroker) -> None:
    ctl = fleet.start_controller()
    ids = ["edge-1", "edge-2", "edge-3"]
    for device_id in ids:
        fleet.start_agent(device_id, "--keepalive", str(KEEPALIVE), "--telemetry-interval", "0.5")
    wait_until(lambda: ctl.devices() == dict.fromkeys(ids, "online"), 20, what="3 agents online")
    wait_until(
        lambda: all(len(ctl.get(f"/api/v1/devices/{d}/telemetry").json()) >= 2 for d in ids),
        20,
        what="telemetry rows from every agent",
    )
    row = ctl.get("/api/v1/devices/edge-1/telemetry").json()[-1]
    assert row["rss_bytes"] > 10_000_000 and row["data"]["uptime_s"] > 0

    fleet.agents["edge-2"].kill()
    killed_at = time.monotonic()
    wait_until(lambda: ctl.devices()["edge-2"] == "offline", 1.5 * KEEPALIVE, what="edge-2 offline after SIGKILL")
    assert time.monotonic() - killed_at <= 1.5 * KEEPALIVE
    assert ctl.get("/api/v1/devices/edge-2").json()["offline_reason"] == "will"
    assert ctl.devices()["edge-1"] == "online"

    fleet.start_agent("edge-2", "--keepalive", str(KEEPALIVE), "--telemetry-interval", "0.5")
    wait_until(lambda: ctl.devices()["edge-2"] == "online", 20, what="edge-2 back online")


def test_broker_restart_every_client_reconnects_and_the_registry_is_right(
    fleet: Fleet, private_broker: EmbeddedBroker, requires_mosquitto: None
) -> None:
    ctl = fleet.start_controller(env={"SLMFLEET_OFFLINE_AFTER_FACTOR": "1.5", "SLMFLEET_SWEEP_INTERVAL_S": "0.5"})
    ids = ["r-1", "r-2", "r-3"]
    for device_id in ids:
        fleet.start_agent(device_id, "--keepalive", str(KEEPALIVE), "--telemetry-interval", "1")
    wait_until(lambda: ctl.devices() == dict.fromkeys(ids, "online"), 20, what="3 agents online")

    private_broker.stop()
    fleet.agents["r-3"].kill()  # dies while the broker is down: no will can ever be delivered for it
    private_broker.start()

    wait_until(lambda: ctl.get("/api/v1/health").json()["broker"]["connected"], 30, what="controller reconnected")
    wait_until(
        lambda: ctl.devices() == {"r-1": "online", "r-2": "online", "r-3": "offline"},
        30,
        what="registry right after the broker restart",
    )
    # the survivors really are back: fresh telemetry after the restart
    since = time.time()
    wait_until(
        lambda: all(ctl.get(f"/api/v1/devices/{d}/telemetry", params={"since": since}).json() for d in ("r-1", "r-2")),
        20,
        what="telemetry after the restart",
    )


def test_agent_shutdown_says_goodbye(fleet: Fleet) -> None:
    ctl = fleet.start_controller()
    agent = fleet.start_agent("polite-1", "--keepalive", "30")
    wait_until(lambda: ctl.devices().get("polite-1") == "online", 20)
    assert agent.stop(15) == 0
    wait_until(lambda: ctl.devices()["polite-1"] == "offline", 5, what="offline right after SIGTERM")
    assert ctl.get("/api/v1/devices/polite-1").json()["offline_reason"] == "shutdown"
    assert "started" in [e["kind"] for e in ctl.get("/api/v1/devices/polite-1/events").json()]
    # a normal stop is not an error: no traceback, no CancelledError, nothing at ERROR
    log = agent.log()
    assert "connected to broker" in log
    bad = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line or "Cancelled" in line]
    assert not bad, log


def test_slmfleet_up_on_embedded_defaults(tmp_path: Path) -> None:
    port, broker_port = free_port(), free_port()
    data = tmp_path / "data"
    up = Proc(
        slmfleet_cmd("up", "--data-dir", str(data), "--port", str(port), "--broker-port", str(broker_port)),
        tmp_path / "up.log",
    )
    agent = None
    try:
        api = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: httpx.get(api + "/api/v1/health", timeout=2).json()["broker"]["connected"],
            30,
            what="slmfleet up ready",
        )
        banner = up.log()
        pinned = data / "signing-key.pub.pem"
        for needle in (f"{api}/api/v1", f"{api}/docs", "admin token", str(data / "admin-token"), str(pinned)):
            assert needle in banner
        # the public key devices pin is the one the API serves
        assert pinned.read_text() == httpx.get(api + "/api/v1/signing-key", timeout=5).json()["public_key_pem"]
        broker_url = broker_url_from_banner(banner)
        assert broker_url == f"mqtt://127.0.0.1:{broker_port}"
        token_file = data / "admin-token"
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        token = token_file.read_text().strip()
        agent = Proc(
            slmfleet_cmd("agent", "--broker", broker_url, "--device-id", "first", "--data-dir", str(tmp_path / "dev")),
            tmp_path / "agent.log",
        )
        wait_until(lambda: httpx.get(api + "/api/v1/devices/first", timeout=2).status_code == 200, 20)
        r = httpx.patch(
            api + "/api/v1/devices/first",
            json={"labels": {"k": "v"}},
            timeout=5,
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 200
        assert httpx.patch(api + "/api/v1/devices/first", json={"labels": {}}, timeout=5).status_code == 401
    finally:
        if agent is not None:
            agent.stop()
        assert up.stop(30) == 0, up.log()
    # stopping up stops the broker it started
    assert "embedded" in up.log()
    from controller.broker.embedded import port_open

    assert not port_open("127.0.0.1", broker_port)
    # a second start reuses the same admin token
    up2 = Proc(
        slmfleet_cmd("up", "--data-dir", str(data), "--port", str(port), "--broker-port", str(broker_port)),
        tmp_path / "up2.log",
    )
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=2).status_code == 200, 30)
        assert (data / "admin-token").read_text().strip() == token
    finally:
        up2.stop(30)


def test_slmfleet_up_refuses_a_busy_port_clearly(tmp_path: Path, private_broker: EmbeddedBroker) -> None:
    up = Proc(
        slmfleet_cmd(
            "up",
            "--data-dir",
            str(tmp_path / "d"),
            "--port",
            str(free_port()),
            "--broker-port",
            str(private_broker.port),
        ),
        tmp_path / "up.log",
    )
    up.popen.wait(30)
    assert up.popen.returncode != 0
    assert "already in use" in up.log()


def test_agent_refuses_bad_settings_with_a_clear_message(tmp_path: Path) -> None:
    bad = Proc(
        slmfleet_cmd("agent", "--broker", "mqtt://127.0.0.1:1", "--device-id", "bad/id", "--data-dir", str(tmp_path)),
        tmp_path / "a.log",
    )
    bad.popen.wait(30)
    assert bad.popen.returncode == 2 and "invalid device id" in bad.log()
    conf = tmp_path / "agent.toml"
    conf.write_text('device_id = "ok"\ntelemetry_interval_s = -1\n')
    bad2 = Proc(slmfleet_cmd("agent", "--config", str(conf)), tmp_path / "b.log")
    bad2.popen.wait(30)
    assert bad2.popen.returncode == 2 and "telemetry_interval_s" in bad2.log()


def test_slmfleet_up_falls_back_to_amqtt_and_says_what_it_lacks(tmp_path: Path) -> None:
    port, broker_port = free_port(), free_port()
    up = Proc(
        slmfleet_cmd(
            "up",
            "--data-dir",
            str(tmp_path / "d"),
            "--port",
            str(port),
            "--broker-port",
            str(broker_port),
            "--broker-engine",
            "amqtt",
        ),
        tmp_path / "up.log",
    )
    agent = None
    try:
        api = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(api + "/api/v1/health", timeout=2).json()["broker"]["connected"], 30)
        log = up.log()
        assert "amqtt" in log and "3.1.1 only" in log and "no shared subscriptions" in log
        agent = Proc(
            slmfleet_cmd(
                "agent",
                "--broker",
                f"mqtt://127.0.0.1:{broker_port}",
                "--device-id",
                "a1",
                "--data-dir",
                str(tmp_path / "dev"),
                "--mqtt-protocol",
                "3.1.1",
            ),
            tmp_path / "agent.log",
        )
        wait_until(lambda: httpx.get(api + "/api/v1/devices/a1", timeout=2).json().get("status") == "online", 20)
    finally:
        if agent is not None:
            agent.stop()
        assert up.stop(30) == 0, up.log()
