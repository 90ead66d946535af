"""Store and forward through a real broker outage (mosquitto stopped and started again).

Within the spool's bound nothing the agent produced offline is lost and everything arrives in order
after the reconnect; past the bound the oldest messages go and the telemetry says how many.
What counts is what a raw subscriber with a persistent session receives.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from controller.broker.embedded import EmbeddedBroker
from tests import bundles
from tests.helpers import Proc, slmfleet_cmd, wait_until
from wire import topics


class Watcher:
    """A persistent-session QoS 1 subscriber: the broker keeps its messages while it reconnects."""

    def __init__(self, port: int, device_id: str) -> None:
        self.device_id = device_id
        self.received: list[tuple[str, dict[str, Any], float]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"watch-{device_id}", protocol=mqtt.MQTTv311, clean_session=False
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        wait_until(self.client.is_connected, 10, what="watcher connected")
        self.client.subscribe(
            [(topics.telemetry(device_id), 1), (topics.events(device_id), 1), (topics.state(device_id), 1)]
        )
        assert self.subscribed.wait(10)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.received.append((msg.topic, json.loads(msg.payload), time.time()))

    def of(self, channel: str) -> list[dict[str, Any]]:
        """Messages of one channel in arrival order, duplicates (QoS 1 redeliveries) removed."""
        topic = topics.device(self.device_id, topics.DeviceChannel(channel))
        seen: set[int] = set()
        out = []
        with self._lock:
            for t, payload, _ in self.received:
                if t == topic and payload["seq"] not in seen:
                    seen.add(payload["seq"])
                    out.append(payload)
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def spool_state(data_dir: Path) -> tuple[int, int]:
    """(messages waiting, dropped ever) in the agent's spool, read from its SQLite file."""
    path = data_dir / "spool.sqlite3"
    if not path.is_file():
        return 0, 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        waiting = db.execute("SELECT COUNT(*) FROM spool").fetchone()[0]
        row = db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()
    finally:
        db.close()
    return int(waiting), int(row[0]) if row else 0


@pytest.fixture
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bundles.build("classification", tmp_path_factory.getbasetemp() / "agent-bundles")


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop(10)


def start_agent(tmp: Path, broker: EmbeddedBroker, device_id: str, model: Path, config: str = "") -> Proc:
    conf = tmp / "agent.toml"
    conf.write_text(config)
    return Proc(
        slmfleet_cmd(
            "agent",
            *("--config", str(conf), "--broker", broker.url, "--device-id", device_id),
            *("--data-dir", str(tmp / "data"), "--model", str(model), "--input", "-"),
            *("--reconnect-max", "1", "--http-port", "0"),
        ),
        tmp / "agent.log",
        stdin=True,
    )


def in_order(messages: list[dict[str, Any]]) -> bool:
    seqs = [m["seq"] for m in messages]
    return seqs == sorted(seqs)


@pytest.mark.slow
def test_a_60s_broker_outage_loses_nothing_within_the_bound(
    requires_mosquitto: None, private_broker: EmbeddedBroker, classifier: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    device = "sf-outage"
    watch = Watcher(private_broker.port, device)
    agent = start_agent(tmp_path, private_broker, device, classifier, "telemetry_interval_s = 1.0\n")
    procs.append(agent)
    wait_until(lambda: len(watch.of("telemetry")) >= 2, 30, what=f"telemetry before the outage ({agent.log_path})")
    wait_until(lambda: [e["kind"] for e in watch.of("events")] == ["started", "model_loaded"], 10, what="events")

    private_broker.stop()
    outage_started = time.time()
    # Offline: the agent serves 20 records, its input ends (an event), telemetry keeps coming.
    agent.write_stdin("".join(json.dumps({"text": "good day" if i % 2 else "bad day"}) + "\n" for i in range(20)))
    assert agent.popen.stdin is not None
    agent.popen.stdin.close()
    wait_until(
        lambda: time.time() - outage_started >= 60 and spool_state(tmp_path / "data")[0] >= 55,
        90,
        interval=0.5,
        what="60 s of outage with the telemetry spooled",
    )
    spooled, dropped = spool_state(tmp_path / "data")
    assert dropped == 0
    private_broker.start()
    outage_ended = time.time()

    def caught_up() -> bool:
        telemetry = watch.of("telemetry")
        return bool(telemetry) and telemetry[-1]["ts"] > outage_ended and spool_state(tmp_path / "data")[0] <= 1

    wait_until(caught_up, 60, what="the spool forwarded after the outage")
    watch.close()
    telemetry, events = watch.of("telemetry"), watch.of("events")
    # Nothing lost: every sequence number from the first on, and in the order they were produced.
    assert [t["seq"] for t in telemetry] == list(range(len(telemetry)))
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["kind"] for e in events] == ["started", "model_loaded", "input_done"]
    assert "stdin: 20 records" in events[2]["message"]
    offline = [t for t in telemetry if outage_started < t["ts"] < outage_ended]
    assert len(offline) >= 55 and len(offline) >= spooled - 2
    assert sum((t.get("inference") or {}).get("count", 0) for t in telemetry) == 20
    assert max(t["spool_depth"] for t in offline) >= 50  # they really waited in the spool
    assert all(t["spool_dropped"] == 0 for t in telemetry)


@pytest.mark.slow
def test_a_spool_over_its_bound_drops_the_oldest_and_reports_how_many(
    requires_mosquitto: None, private_broker: EmbeddedBroker, classifier: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    device = "sf-bound"
    watch = Watcher(private_broker.port, device)
    agent = start_agent(
        tmp_path, private_broker, device, classifier, "telemetry_interval_s = 0.2\nspool_max_messages = 5\n"
    )
    procs.append(agent)
    wait_until(lambda: len(watch.of("telemetry")) >= 2, 30, what=f"telemetry before the outage ({agent.log_path})")
    wait_until(lambda: [e["kind"] for e in watch.of("events")] == ["started", "model_loaded"], 10, what="events")
    private_broker.stop()
    wait_until(lambda: spool_state(tmp_path / "data")[1] >= 12, 30, what="the bound dropping messages")
    private_broker.start()
    restarted = time.time()

    def settled() -> list[dict[str, Any]]:
        # Telemetry sampled after the spool emptied: online again, nothing more can be dropped.
        return [t for t in watch.of("telemetry") if t["ts"] > restarted and t["spool_depth"] == 0]

    wait_until(settled, 30, what="telemetry after the outage")
    _, dropped = spool_state(tmp_path / "data")
    report = settled()[0]
    watch.close()
    telemetry, events = watch.of("telemetry"), watch.of("events")
    assert in_order(telemetry) and in_order(events)
    assert report["spool_dropped"] == dropped >= 12  # the controller learns how many were lost
    upto = [t for t in telemetry if t["seq"] <= report["seq"]]
    missing = (report["seq"] + 1 - len(upto)) + (events[-1]["seq"] - len(events))
    assert missing == dropped  # exactly the dropped ones are missing
    # The oldest went: the missing telemetry is one run right after what arrived before the outage.
    got = {t["seq"] for t in upto}
    gap = sorted(set(range(report["seq"] + 1)) - got)
    assert gap == list(range(gap[0], gap[0] + len(gap)))
    assert all(seq in got for seq in range(gap[-1] + 1, report["seq"] + 1))
