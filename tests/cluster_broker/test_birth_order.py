"""Issue 16: with NATS ingest a device's telemetry may be handled before its birth, and must not be lost for it.

Births come on a subscription every replica has, telemetry in a queue group: two NATS subscriptions, and nats-py
hands each subscription's messages to its callback from a task of its own, so the order the server sent them in
(birth, then telemetry) is not the order the controller handles them in. The controller holds what arrives from
a device not born yet until its birth (``unknown_hold_s``), so every telemetry message of a born device is
stored, once. Here a burst of new devices, each publishing its birth and then telemetry at once (as a fleet does
when it boots), with another device's telemetry before each birth, so the two subscriptions' queues interleave.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.nats_cluster import NatsCluster
from controller.runtime import ControllerRuntime
from tests.cluster_broker.test_nats_cluster import nats_settings
from tests.controller import devices_util as du
from tests.helpers import metric_value, wait_until

pytestmark = pytest.mark.slow

DEVICES = 150
PER_DEVICE = 3


def stored(db: Path) -> list[tuple[str, int]]:
    if not db.is_file():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return [(d, s) for d, s in conn.execute("SELECT device_id, seq FROM telemetry")]
    except sqlite3.OperationalError:  # not migrated yet
        return []
    finally:
        conn.close()


def publisher(port: int) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="birth-order-fleet", protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    connected = threading.Event()
    c.on_connect = lambda *_a: connected.set()
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    assert connected.wait(15)
    return c


def metrics_text(runtime: ControllerRuntime) -> str:
    from prometheus_client import generate_latest

    return generate_latest(runtime.metrics.registry).decode()


def test_telemetry_that_overtakes_its_devices_birth_is_stored_once(nats_cluster: NatsCluster, tmp_path: Path) -> None:
    node = nats_cluster.nodes[1]
    runtime = ControllerRuntime(nats_settings(tmp_path / "ctl", node.mqtt_url, node.nats_url, "ctl-birth-order"))
    runtime.start()
    client: Any = None
    try:
        assert runtime.handler.held is not None, "ingest = nats holds the traffic of unborn devices by default"
        assert runtime.nats_ingest is not None and runtime.nats_ingest.wait_subscribed(15)
        db = tmp_path / "ctl" / "controller.db"
        client = publisher(node.mqtt_port)
        # a device known before the burst: its telemetry goes before each new device's birth
        client.publish(*du.birth("bo-known"), qos=1)
        wait_until(lambda: runtime.registry.known("bo-known"), 15, what="the first device known")
        known_seq = 0
        infos = []
        for i in range(DEVICES):
            device = f"bo-{i:03d}"
            infos.append(client.publish(*du.telemetry("bo-known", known_seq), qos=1))
            known_seq += 1
            infos.append(client.publish(*du.birth(device), qos=1, retain=True))
            for seq in range(PER_DEVICE):
                infos.append(client.publish(*du.telemetry(device, seq), qos=1))
        for info in infos:
            info.wait_for_publish(30)
        expected = DEVICES * PER_DEVICE + known_seq
        wait_until(lambda: len(stored(db)) >= expected, 30, what=f"{expected} telemetry rows stored")
        rows = stored(db)
        assert len(rows) == len(set(rows)) == expected, "a telemetry message stored twice, or one too many"
        text = metrics_text(runtime)
        assert metric_value(text, "slmfleet_invalid_payloads_total", {"reason": "unknown_device"}) == 0
        released = metric_value(text, "slmfleet_held_before_birth_total", {"outcome": "released"})
        print(f"{released:.0f} of {DEVICES * PER_DEVICE} telemetry messages arrived before their device's birth")
    finally:
        if client is not None:
            client.disconnect()
            client.loop_stop()
        runtime.stop()
