"""Device traffic through a real broker into the controller: registry, telemetry, bad input."""

from __future__ import annotations

import time

import pytest
from sqlmodel import Session, func, select

from controller.db.models import Device, DeviceEvent, TelemetryRecord
from tests.controller import devices_util as du
from tests.helpers import RawMqtt, metric_value, wait_until


@pytest.fixture
def raw(controller):  # type: ignore[no-untyped-def]
    client = RawMqtt(controller.broker.port, "raw-device-sim")
    yield client
    client.close()


def rows(controller, model) -> int:  # type: ignore[no-untyped-def]
    controller.flush()
    with Session(controller.runtime.engine) as s:
        return int(s.exec(select(func.count()).select_from(model)).one())


def device(controller, device_id: str) -> dict:  # type: ignore[no-untyped-def]
    r = controller.client.get(f"/api/v1/devices/{device_id}")
    return r.json() if r.status_code == 200 else {}


def test_birth_registers_the_device_with_its_hardware_and_telemetry_is_stored(controller, raw) -> None:  # type: ignore[no-untyped-def]
    raw.publish(*du.birth("dev-a", labels={"site": "berlin"}), retain=True)
    d = wait_until(lambda: device(controller, "dev-a"), 10, what="dev-a registered")
    assert d["status"] == "online" and d["hardware"]["cpu_count"] == 4 and d["labels"] == {"site": "berlin"}
    for seq in range(5):
        raw.publish(*du.telemetry("dev-a", seq))
    raw.publish(*du.event("dev-a", 1))
    wait_until(lambda: rows(controller, TelemetryRecord) == 5, 10, what="5 telemetry rows")
    tel = controller.client.get("/api/v1/devices/dev-a/telemetry").json()
    assert [t["seq"] for t in tel] == [0, 1, 2, 3, 4]
    assert tel[0]["inference_count"] == 10 and tel[0]["latency_p95_ms"] == 2.0
    assert tel[0]["data"]["inference"]["latency"]["buckets"] == [[40, 10]]
    wait_until(lambda: rows(controller, DeviceEvent) == 1, 10)
    assert controller.client.get("/api/v1/devices/dev-a/events").json()[0]["kind"] == "started"
    metrics = controller.client.get("/metrics").text
    assert metric_value(metrics, "slmfleet_telemetry_ingested_total") == 5
    assert metric_value(metrics, "slmfleet_devices", {"status": "online"}) == 1


def test_will_marks_offline_and_a_new_birth_online_again(controller, raw) -> None:  # type: ignore[no-untyped-def]
    raw.publish(*du.birth("dev-b"), retain=True)
    wait_until(lambda: device(controller, "dev-b").get("status") == "online", 10)
    raw.publish(*du.offline("dev-b"), retain=True)
    d = wait_until(lambda: (x := device(controller, "dev-b")).get("status") == "offline" and x, 10)
    assert d["offline_reason"] == "will"
    raw.publish(*du.birth("dev-b"), retain=True)
    wait_until(lambda: device(controller, "dev-b").get("status") == "online", 10)


def test_a_silent_device_is_marked_offline_even_without_a_will(controller, raw) -> None:  # type: ignore[no-untyped-def]
    # keepalive 1 s, telemetry every 0.5 s, factor 3: silent for 3 s means gone
    raw.publish(*du.birth("dev-quiet", keepalive=1, interval=0.5))
    wait_until(lambda: device(controller, "dev-quiet").get("status") == "online", 10)
    started = time.monotonic()
    d = wait_until(lambda: (x := device(controller, "dev-quiet")).get("status") == "offline" and x, 15)
    assert time.monotonic() - started >= 2.5
    assert d["offline_reason"] == "lapsed"


def test_replayed_telemetry_is_stored_once(controller, raw) -> None:  # type: ignore[no-untyped-def]
    raw.publish(*du.birth("dev-r"))
    wait_until(lambda: device(controller, "dev-r"), 10)
    topic, payload = du.telemetry("dev-r", 7, ts=1_800_000_000.0)
    for _ in range(3):
        raw.publish(topic, payload)
    raw.publish(*du.telemetry("dev-r", 8))
    wait_until(lambda: rows(controller, TelemetryRecord) == 2, 10)
    wait_until(lambda: metric_value(controller.client.get("/metrics").text, "slmfleet_telemetry_replays_total") == 2, 5)


BAD_INPUT = [
    ("state", b"{definitely not json", "not_json"),
    ("state", b'{"type": "online", "ts": 1}', "schema"),
    ("state", b'{"type": "reboot", "ts": 1}', "schema"),
    ("state", b"", "empty"),
    ("telemetry", b"\xff\xfe\x00binary", "not_json"),
    ("telemetry", b'{"type": "telemetry", "ts": 1, "seq": -1}', "schema"),
    (
        "telemetry",
        b'{"type":"telemetry","ts":1,"seq":1,"interval_s":1,"uptime_s":1,"cpu_percent":1,"rss_bytes":1,'
        b'"pad":"' + b"x" * 70_000 + b'"}',
        "too_large",
    ),
    ("events", b"[]", "schema"),
    ("events", b'{"type": "agent", "ts": 1, "seq": 1, "kind": ""}', "schema"),
]


@pytest.mark.parametrize(("channel", "payload", "reason"), BAD_INPUT)
def test_bad_payloads_are_counted_and_store_nothing(controller, raw, channel: str, payload: bytes, reason: str) -> None:  # type: ignore[no-untyped-def]
    raw.publish(*du.birth("dev-known"))
    wait_until(lambda: device(controller, "dev-known"), 10)
    before = (rows(controller, TelemetryRecord), rows(controller, DeviceEvent))
    raw.publish(f"slmfleet/v1/dev/dev-known/{channel}", payload)
    wait_until(
        lambda: (
            metric_value(
                controller.client.get("/metrics").text,
                "slmfleet_invalid_payloads_total",
                {"channel": channel, "reason": reason},
            )
            == 1
        ),
        10,
        what=f"{channel}/{reason} counted",
    )
    assert (rows(controller, TelemetryRecord), rows(controller, DeviceEvent)) == before
    # still working: a valid message after the bad one is processed
    raw.publish(*du.telemetry("dev-known", 1))
    wait_until(lambda: rows(controller, TelemetryRecord) == before[0] + 1, 10)
    assert device(controller, "dev-known")["status"] == "online"


def test_messages_for_unknown_devices_and_odd_topics_are_counted_and_ignored(controller, raw) -> None:  # type: ignore[no-untyped-def]
    raw.publish(*du.telemetry("ghost", 1))
    raw.publish(*du.event("ghost", 1))
    raw.publish(*du.offline("ghost"))
    raw.publish("slmfleet/v1/dev/bad id!/state", du.birth("x")[1])
    raw.publish("slmfleet/v1/dev/ghost/telemetry/extra", b"{}")
    text = lambda: controller.client.get("/metrics").text  # noqa: E731
    wait_until(lambda: metric_value(text(), "slmfleet_invalid_payloads_total", {"reason": "unknown_device"}) == 3, 10)
    assert rows(controller, Device) == 0
    assert rows(controller, TelemetryRecord) == 0 and rows(controller, DeviceEvent) == 0
    assert controller.client.get("/api/v1/health").json()["status"] == "ok"


def test_a_birth_and_a_last_seen_of_the_same_device_in_one_batch_are_written_together(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Regression: a LastSeen whose every device also has a birth in the batch made an empty executemany that
    failed the whole batch (three retries, then row by row), delaying every device's births by a second."""
    from controller.db.engine import make_engine, migrate
    from controller.telemetry.ingest import Birth, IngestWriter, LastSeen
    from wire import codec
    from wire.topics import DeviceChannel

    engine = make_engine(f"sqlite:///{tmp_path / 'i.db'}")
    migrate(engine)
    writer = IngestWriter(engine, flush_interval_s=0.05)
    topic, payload = du.birth("dev-z")
    birth = codec.decode(DeviceChannel.STATE, payload)
    writer.put(Birth("dev-z", birth, time.time()))
    writer.put(LastSeen({"dev-z": time.time()}))  # after it: the batch's births cover every device seen
    writer.start()
    try:
        assert writer.flush(10)
    finally:
        writer.stop()
    assert writer.failed_batches == 0 and writer.batches == 1
    with Session(engine) as s:
        assert s.get(Device, "dev-z") is not None
