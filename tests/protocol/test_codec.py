import json
import logging

import pytest

from wire import codec
from wire.messages import (
    CommandAck,
    DeviceOffline,
    DeviceOnline,
    HardwareProfile,
    Ping,
    Telemetry,
)
from wire.topics import DeviceChannel

HW = HardwareProfile(cpu_count=2, ram_bytes=2**30, arch="aarch64", os="Linux 6.1")


def test_every_message_round_trips_with_type_and_schema_version() -> None:
    cases = [
        (
            DeviceChannel.STATE,
            DeviceOnline(ts=1.5, agent_version="1", hardware=HW, keepalive_s=30, telemetry_interval_s=10),
        ),
        (DeviceChannel.STATE, DeviceOffline(ts=2.0)),
        (DeviceChannel.TELEMETRY, Telemetry(ts=3.0, seq=4, interval_s=10, uptime_s=99, cpu_percent=5, rss_bytes=10)),
        (DeviceChannel.EVENTS, CommandAck(ts=4.0, seq=1, command_id="c-1", ok=True)),
        (DeviceChannel.CMD, Ping(ts=5.0, command_id="c-2")),
    ]
    for channel, msg in cases:
        wire = codec.encode(msg)
        body = json.loads(wire)
        assert body["v"] == 1 and body["type"] == msg.type
        assert codec.decode(channel, wire) == msg


def test_messages_are_frozen() -> None:
    msg = DeviceOffline(ts=1.0)
    with pytest.raises(Exception, match="frozen"):
        msg.ts = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "not_json"),
        (b"", "empty"),
        (b"[1,2]", "schema"),
        (b'{"type":"online","ts":1}', "schema"),
        (b'{"type":"nope","ts":1}', "schema"),
        (b'{"type":"offline","ts":1,"v":2}', "schema"),
        (b'{"type":"offline","ts":-5}', "schema"),
        (b'{"type":"offline","ts":1e300}', "schema"),
        (b'{"type":"offline","ts":NaN}', "schema"),
        (b" " * (70 * 1024), "too_large"),
    ],
)
def test_bad_payloads_raise_payload_error_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(codec.PayloadError) as info:
        codec.decode(DeviceChannel.STATE, payload)
    assert info.value.reason == reason


def test_unknown_fields_are_tolerated_for_forward_compatibility() -> None:
    msg = codec.decode(DeviceChannel.STATE, b'{"type":"offline","ts":1,"added_later":true}')
    assert isinstance(msg, DeviceOffline)


def test_drop_counter_counts_everything_and_logs_each_source_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    drops = codec.DropCounter(logging.getLogger("t"), interval_s=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t"):
        for _ in range(5):
            drops.drop("dev-a", "telemetry", "schema", "x")
        drops.drop("dev-b", "state", "not_json", "y")
        now[0] = 61.0
        drops.drop("dev-a", "telemetry", "schema", "x")
    assert drops.counts[("telemetry", "schema")] == 6
    assert drops.total == 7
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 3  # dev-a, dev-b, dev-a again after the interval
    assert "4 more suppressed" in logged[2]


def test_drop_counter_memory_is_bounded_under_forged_sources() -> None:
    drops = codec.DropCounter(logging.getLogger("t"), max_sources=100)
    for i in range(5000):
        drops.drop(f"forged-{i}", "state", "schema", "")
    assert len(drops._last_logged) <= 100
    assert drops.total == 5000
