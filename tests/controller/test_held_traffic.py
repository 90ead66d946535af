"""Telemetry and events of a device whose birth has not arrived yet are held for it (``unknown_hold_s``): handled
after the birth, in the order they came, or dropped as ``unknown_device`` when no birth comes in time; bounded.
The handler is called directly, as the MQTT thread calls it (the NATS ordering itself: tests/cluster_broker)."""

from __future__ import annotations

from collections.abc import Callable

from sqlmodel import Session, select

from controller.db.models import DeviceEvent, TelemetryRecord
from controller.settings import load_settings
from tests.conftest import LiveController
from tests.controller import devices_util as du
from tests.helpers import metric_value


def rows(ctl: LiveController, model: type, device_id: str) -> list[int]:
    ctl.flush()
    with Session(ctl.runtime.engine) as session:
        return list(session.exec(select(model.seq).where(model.device_id == device_id)).all())  # type: ignore[attr-defined]


def metric(ctl: LiveController, name: str, labels: dict[str, str]) -> float:
    return metric_value(ctl.client.get("/metrics").text, name, labels)


def test_traffic_before_a_birth_is_handled_after_it_in_order(make_controller: Callable[..., LiveController]) -> None:
    ctl = make_controller(None, unknown_hold_s=5)
    handler = ctl.runtime.handler
    sent = [du.telemetry("early", seq) for seq in (0, 1, 2)]
    for message in sent:
        handler(*message)
    handler(*du.event("early", 7))
    assert rows(ctl, TelemetryRecord, "early") == []  # held: not stored, not counted
    assert metric(ctl, "slmfleet_invalid_payloads_total", {"reason": "unknown_device"}) == 0
    handler(*du.birth("early"))
    assert sorted(rows(ctl, TelemetryRecord, "early")) == [0, 1, 2]
    assert rows(ctl, DeviceEvent, "early") == [7]
    assert metric(ctl, "slmfleet_held_before_birth_total", {"outcome": "released"}) == 4
    # released once: a second birth finds nothing held, and a repeat of a stored message is a replay
    handler(*du.birth("early"))
    handler(*sent[2])
    assert sorted(rows(ctl, TelemetryRecord, "early")) == [0, 1, 2]
    assert handler.held is not None and len(handler.held) == 0


def test_traffic_of_a_device_never_born_is_dropped_when_its_hold_ends(
    make_controller: Callable[..., LiveController],
) -> None:
    ctl = make_controller(None, unknown_hold_s=5)
    handler = ctl.runtime.handler
    now = [1_000_000.0]
    handler.clock = lambda: now[0]
    handler(*du.telemetry("ghost", 0))
    handler(*du.offline("ghost"))  # a will of a device never born is not held: dropped at once
    assert metric(ctl, "slmfleet_invalid_payloads_total", {"reason": "unknown_device"}) == 1
    now[0] += 4.9
    handler(*du.telemetry("ghost", 1))
    assert handler.expire_held() == 0
    now[0] += 0.2
    assert handler.expire_held() == 2  # both, held since the first
    assert metric(ctl, "slmfleet_invalid_payloads_total", {"reason": "unknown_device"}) == 3
    assert metric(ctl, "slmfleet_held_before_birth_total", {"outcome": "expired"}) == 2
    handler(*du.birth("ghost"))  # too late: nothing of it was kept
    assert rows(ctl, TelemetryRecord, "ghost") == []


def test_what_is_held_is_bounded(make_controller: Callable[..., LiveController]) -> None:
    ctl = make_controller(None, unknown_hold_s=5)
    handler = ctl.runtime.handler
    held = handler.held
    assert held is not None
    for seq in range(held.per_device + 3):
        handler(*du.telemetry("chatty", seq))
    assert len(held) == held.per_device
    assert metric(ctl, "slmfleet_held_before_birth_total", {"outcome": "full"}) == 3
    assert metric(ctl, "slmfleet_invalid_payloads_total", {"reason": "unknown_device"}) == 3
    held.max_devices = 3
    for i in range(5):
        handler(*du.telemetry(f"stranger-{i}", 0))
    assert metric(ctl, "slmfleet_held_before_birth_total", {"outcome": "full"}) == 6  # 2 more devices than room
    handler(*du.birth("chatty"))
    assert sorted(rows(ctl, TelemetryRecord, "chatty")) == list(range(held.per_device))


def test_the_hold_is_on_where_births_and_telemetry_come_on_different_paths() -> None:
    assert (
        load_settings(ingest="nats", nats_url="nats://x:4222", broker_url="mqtt://x:1883").effective_unknown_hold_s
        == 5.0
    )
    assert load_settings(mqtt_shared_group="g").effective_unknown_hold_s == 5.0
    assert load_settings().effective_unknown_hold_s == 0.0  # one MQTT subscription: births come first
    assert load_settings(unknown_hold_s=2).effective_unknown_hold_s == 2.0
    assert (
        load_settings(
            ingest="nats", nats_url="nats://x:4222", broker_url="mqtt://x:1883", unknown_hold_s=0
        ).effective_unknown_hold_s
        == 0.0
    )
