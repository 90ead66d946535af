"""The broker the product runs: a size cap in every configuration it writes (mosquitto and amqtt), a controller
client that refuses what it cannot hold, and supervision that starts a killed embedded broker again."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from controller.broker.embedded import EmbeddedBroker, mosquitto_config, packet_limit
from tests.conftest import LiveController
from tests.e2e.fleet import broker_url_from_banner, start_up
from tests.helpers import Proc, RawMqtt, metric_value, slmfleet_cmd, wait_until
from tests.security import payloads
from wire import codec, topics
from wire.messages import MAX_COMMAND_PAYLOAD

MIB = 1024 * 1024


class Publisher:
    """A raw client that sends one (large) message and reports whether the broker hung up on it."""

    def __init__(self, port: int, client_id: str = "big-sender") -> None:
        self.disconnected = False
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        self.client.on_disconnect = self._gone
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        wait_until(self.client.is_connected, 10, what="publisher connected")

    def _gone(self, *args: Any) -> None:
        self.disconnected = True

    def send(self, topic: str, size: int) -> None:
        self.client.publish(topic, b"x" * size, qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_every_written_config_caps_packets_above_commands_and_chunks() -> None:
    limit = packet_limit()
    assert limit > MAX_COMMAND_PAYLOAD and limit > 256 * 1024 + 48, "a Deploy command and a chunk frame fit"
    assert limit < 16 * MIB
    assert packet_limit(32 * MIB) > 32 * MIB  # a larger chunk_size raises it
    conf = mosquitto_config("127.0.0.1", 1, Path("/tmp/x"))
    assert f"max_packet_size {limit}" in conf
    shipped = (Path(__file__).parents[2] / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    assert f"max_packet_size {limit}" in shipped, "the shipped configuration has the same cap"


@pytest.mark.parametrize("engine", ["mosquitto", "amqtt"])
def test_the_embedded_broker_refuses_a_packet_over_its_cap(tmp_path: Path, engine: str) -> None:
    if engine == "mosquitto" and os.environ.get("SLMFLEET_TEST_BROKER") == "amqtt":
        pytest.skip("running against amqtt")
    broker = EmbeddedBroker(tmp_path / engine, engine=engine, max_packet_size=1 * MIB)  # type: ignore[arg-type]
    broker.start()
    watcher = RawMqtt(broker.port, "watcher")
    try:
        watcher.subscribe("slmfleet/v1/dev/+/telemetry")
        small = Publisher(broker.port, "small-sender")
        probe = topics.telemetry("d0")  # sent until it arrives: then the subscription is in place
        wait_until(lambda: small.send(probe, 10) or watcher.received(probe), 10, interval=0.2, what="subscribed")
        small.send(topics.telemetry("d1"), 100_000)
        wait_until(lambda: watcher.received(topics.telemetry("d1")), 10, what="a message under the cap delivered")
        big = Publisher(broker.port)
        big.send(topics.telemetry("d2"), 2 * MIB)
        wait_until(lambda: big.disconnected, 10, what=f"{engine} hanging up on the oversized publish")
        small.send(topics.telemetry("d1"), 10)  # sent after it: its arrival shows the big one was not forwarded
        wait_until(lambda: len(watcher.received(topics.telemetry("d1"))) == 2, 10)
        assert watcher.received(topics.telemetry("d2")) == []
        big.close()
        small.close()
    finally:
        watcher.close()
        broker.stop()


def test_the_controller_client_never_reads_a_message_it_cannot_hold(
    private_broker: EmbeddedBroker, make_controller: Any
) -> None:
    ctl: LiveController = make_controller(private_broker)
    raw = RawMqtt(private_broker.port, "device-x")
    try:
        raw.publish(topics.state("x"), codec.encode(payloads.birth()), retain=True)
        wait_until(lambda: ctl.client.get("/api/v1/devices/x").status_code == 200, 10)
        big = Publisher(private_broker.port)
        big.send(topics.telemetry("x"), 4 * MIB)  # under the broker's cap, far over max_control_payload (64 KiB)
        # then, from the same client (so it arrives after the big one), a message the controller stores
        big.client.publish(topics.telemetry("x"), codec.encode(payloads.telemetry(seq=7)), qos=1)
        ctl.flush()
        wait_until(lambda: ctl.client.get("/api/v1/devices/x/telemetry").json(), 10, what="the message after it")
        assert not big.disconnected
        metrics = ctl.client.get("/metrics").text
        dropped = metric_value(metrics, "slmfleet_invalid_payloads_total", {"reason": "too_large"})
        if private_broker.engine == "mosquitto":
            # MQTT 5: the controller told the broker its limit in CONNECT; the broker discarded the message
            assert ctl.runtime.bridge is not None and ctl.runtime.bridge.transport.protocol == "5"  # type: ignore[union-attr]
            assert dropped == 0 and ctl.runtime.bridge.transport.oversize_dropped == 0  # type: ignore[union-attr]
        else:
            # MQTT 3.1.1 (amqtt): dropped by the transport before it is copied or parsed, and counted
            assert dropped == 1
        big.close()
    finally:
        raw.close()


def test_a_killed_embedded_broker_is_started_again_with_its_persistence(tmp_path: Path) -> None:
    broker = EmbeddedBroker(tmp_path / "b", engine="auto", supervise=True)
    broker.start()
    try:
        first_pid = broker.pid
        raw = RawMqtt(broker.port, "retainer")
        raw.publish("slmfleet/v1/dev/keep/state", b"kept", retain=True)
        raw.close()
        if broker.engine == "mosquitto":
            assert first_pid is not None
            os.kill(first_pid, signal.SIGTERM)  # dies cleanly: it saves its persistence, and is started again
            wait_until(lambda: broker.restarts == 1 and broker.running, 20, what="restarted after SIGTERM")
            assert broker.pid != first_pid and broker.last_exit == "exit code 0"
            watcher = RawMqtt(broker.port, "watcher")
            watcher.subscribe("slmfleet/v1/dev/keep/state")
            wait_until(lambda: watcher.received(), 10, what="the retained message kept across the restart")
            watcher.close()
            os.kill(broker.pid, signal.SIGKILL)  # type: ignore[arg-type]
            wait_until(lambda: broker.restarts == 2 and broker.running, 20, what="restarted after SIGKILL")
            assert broker.last_exit == "killed by SIGKILL"
        else:
            broker.kill()
            wait_until(lambda: broker.restarts == 1 and broker.running, 20, what="amqtt restarted")
        RawMqtt(broker.port, "after").close()
    finally:
        broker.stop()
    assert not broker.running
    assert broker.restarts in (1, 2), "stopping is not dying: no restart after stop()"


def test_slmfleet_up_supervises_its_broker_and_health_shows_it(tmp_path: Path, requires_mosquitto: None) -> None:
    ctl = start_up(tmp_path)
    up, api, data, broker_port = ctl.proc, ctl.api, ctl.data_dir, ctl.broker_port
    assert broker_port is not None
    agent = None
    try:
        conf = (data / "broker" / "mosquitto.conf").read_text()
        assert f"max_packet_size {packet_limit()}" in conf
        broker_url = broker_url_from_banner(up.log())
        assert broker_url is not None
        agent = Proc(
            slmfleet_cmd(
                "agent",
                "--broker",
                broker_url,
                "--device-id",
                "sup-1",
                "--data-dir",
                str(tmp_path / "dev"),
                "--reconnect-max",
                "1",
                "--telemetry-interval",
                "1",
            ),
            tmp_path / "agent.log",
        )
        wait_until(lambda: httpx.get(api + "/api/v1/devices/sup-1", timeout=2).status_code == 200, 30)

        # a 100 MB publish on the device's telemetry topic: the broker hangs up, the controller never sees it
        big = Publisher(broker_port)
        big.send(topics.telemetry("sup-1"), 100 * MIB)
        wait_until(lambda: big.disconnected, 30, what="the broker refusing 100 MB")
        big.close()

        health = httpx.get(api + "/api/v1/health", timeout=5).json()
        embedded = health["broker"]["embedded"]
        assert embedded["engine"] == "mosquitto" and embedded["running"] and embedded["restarts"] == 0
        os.kill(embedded["pid"], signal.SIGKILL)

        def back() -> dict[str, Any] | None:
            h = httpx.get(api + "/api/v1/health", timeout=5).json()
            return h if h["status"] == "ok" and h["broker"]["embedded"]["restarts"] == 1 else None

        health = wait_until(back, 30, what="the broker restarted and the controller reconnected")
        assert health["broker"]["embedded"]["pid"] != embedded["pid"]
        assert health["broker"]["embedded"]["last_exit"] == "killed by SIGKILL"
        metrics = httpx.get(api + "/metrics", timeout=5).text
        assert metric_value(metrics, "slmfleet_broker_restarts_total") == 1
        assert metric_value(metrics, "slmfleet_broker_up") == 1
        assert "died (killed by SIGKILL)" in up.log()
        # the agent reconnects and its telemetry flows again
        seen = len(httpx.get(api + "/api/v1/devices/sup-1/telemetry", timeout=5).json())
        wait_until(
            lambda: len(httpx.get(api + "/api/v1/devices/sup-1/telemetry", timeout=5).json()) > seen + 1,
            30,
            what="telemetry after the restart",
        )
    finally:
        if agent is not None:
            agent.stop()
        assert up.stop(30) == 0, up.log()[-3000:]
    assert "died" not in up.log().split("stopped")[-1], "stopping up is not a death to restart from"
