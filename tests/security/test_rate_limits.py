"""Rate limits and ingest hardening: a flooding device is throttled and counted, the others are not starved;
a message the database cannot hold costs no other device its data."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlmodel import Session, func, select

from controller.broker.embedded import EmbeddedBroker
from controller.db.models import TelemetryRecord
from controller.telemetry.ingest import TelemetryIn
from controller.telemetry.ratelimit import TokenBuckets
from tests.conftest import LiveController
from tests.helpers import RawMqtt, metric_value, wait_until
from tests.security import payloads
from wire import codec, topics


def _stored(ctl: LiveController, device_id: str) -> int:
    with Session(ctl.runtime.engine) as session:
        stmt = select(func.count()).select_from(TelemetryRecord).where(TelemetryRecord.device_id == device_id)
        return int(session.exec(stmt).one())


def _throttled(ctl: LiveController) -> float:
    return metric_value(ctl.client.get("/metrics").text, "slmfleet_telemetry_throttled_total")


def _telemetry(seq: int) -> bytes:
    msg = payloads.telemetry(seq).model_copy(update={"ts": time.time() + seq * 1e-3})
    return codec.encode(msg)


def test_token_bucket_allows_the_burst_then_the_rate_and_stays_bounded() -> None:
    now = [100.0]
    buckets = TokenBuckets(rate=2.0, burst=5, max_keys=3, clock=lambda: now[0])
    assert [buckets.allow("a") for _ in range(7)] == [True] * 5 + [False] * 2
    assert buckets.allow("b")  # another key has its own bucket
    now[0] += 1.0  # two tokens back
    assert [buckets.allow("a") for _ in range(3)] == [True, True, False]
    now[0] += 1000.0  # never more than the burst
    assert sum(buckets.allow("a") for _ in range(10)) == 5
    for key in ("c", "d", "e"):
        buckets.allow(key)
    assert len(buckets) == 3  # forged ids cannot grow it without bound


def test_a_flooding_device_is_throttled_and_the_others_are_not_starved(
    private_broker: EmbeddedBroker, make_controller: Callable[..., LiveController]
) -> None:
    rate, burst = 20.0, 50
    ctl = make_controller(private_broker, telemetry_rate_per_s=rate, telemetry_burst=burst)
    flooder = RawMqtt(private_broker.port, "flooder")
    normal = RawMqtt(private_broker.port, "normal-devices")
    quiet = [f"quiet-{i}" for i in range(5)]
    try:
        for device_id in ["loud", *quiet]:
            normal.publish(topics.state(device_id), codec.encode(payloads.birth()))
        wait_until(lambda: all(ctl.runtime.registry.known(d) for d in ["loud", *quiet]), 10, what="births")

        flood, per_quiet = 3000, 10
        started = time.monotonic()
        infos = []
        for i in range(flood):  # as fast as the broker takes them (QoS 1 in flight, no waiting per message)
            infos.append(flooder.client.publish(topics.telemetry("loud"), _telemetry(i), qos=1))
            if i % (flood // per_quiet) == 0:  # meanwhile the others report as usual
                for device_id in quiet:
                    normal.publish(topics.telemetry(device_id), _telemetry(i))
        for info in infos:
            info.wait_for_publish(30)

        wait_until(lambda: _stored(ctl, "loud") + _throttled(ctl) >= flood, 30, what="the flood received")
        elapsed = time.monotonic() - started
        ctl.flush()
        # every message of the quiet devices is stored
        wait_until(lambda: all(_stored(ctl, d) == per_quiet for d in quiet), 10, what="the others' telemetry")
        stored, throttled = _stored(ctl, "loud"), _throttled(ctl)
        assert stored + throttled == flood
        assert burst <= stored <= burst + rate * elapsed + 1, (stored, elapsed)
        assert throttled >= flood - (burst + rate * elapsed + 1)
        # nothing else was lost or counted invalid along the way
        metrics = ctl.client.get("/metrics").text
        assert metric_value(metrics, "slmfleet_invalid_payloads_total") == 0
        assert metric_value(metrics, "slmfleet_ingest_dropped_total") == 0
        # a quiet device keeps its full rate while the flooder is held back
        for seq in range(per_quiet, per_quiet + 20):
            normal.publish(topics.telemetry(quiet[0]), _telemetry(seq))
        wait_until(lambda: _stored(ctl, quiet[0]) == per_quiet + 20, 10, what="a quiet device's burst")
    finally:
        flooder.close()
        normal.close()


def test_a_value_the_database_cannot_hold_is_refused_and_spoils_no_batch(
    make_controller: Callable[..., LiveController],
) -> None:
    ctl = make_controller(None)
    handler = ctl.runtime.handler
    for device_id in ("good", "evil"):
        handler(topics.state(device_id), codec.encode(payloads.birth()))
    # beyond a BIGINT column (and any device: the wire schema refuses it), and valid but beyond an INTEGER column
    huge = payloads.telemetry(1).model_copy(update={"rss_bytes": 2**64})
    handler(topics.telemetry("evil"), codec.encode(huge))
    handler(topics.telemetry("evil"), codec.encode(payloads.telemetry(2**31)))
    handler(topics.telemetry("good"), _telemetry(1))
    ctl.flush()
    assert _stored(ctl, "good") == 1 and _stored(ctl, "evil") == 0
    metrics = ctl.client.get("/metrics").text
    assert metric_value(metrics, "slmfleet_invalid_payloads_total", {"reason": "schema"}) == 1
    assert metric_value(metrics, "slmfleet_invalid_payloads_total", {"reason": "out_of_range"}) == 1

    # and should one reach the writer anyway, only that one is lost, not its batch
    writer = ctl.runtime.writer
    now = time.time()
    writer.put(TelemetryIn("evil", huge, now))
    for seq in range(2, 6):
        writer.put(TelemetryIn("good", payloads.telemetry(seq), now))
    assert writer.flush(30)
    assert _stored(ctl, "good") == 5 and _stored(ctl, "evil") == 0
    assert metric_value(ctl.client.get("/metrics").text, "slmfleet_ingest_dropped_total") == 1


def test_births_and_events_are_limited_per_device_so_a_birth_flood_is_not_amplified(
    make_controller: Callable[..., LiveController],
) -> None:
    rate, burst = 5.0, 10
    ctl = make_controller(None, control_rate_per_s=rate, control_burst=burst)
    handler = ctl.runtime.handler
    rebirths: list[str] = []
    on_birth = handler.on_birth
    assert on_birth is not None

    def counting(device_id: str) -> None:  # each birth re-sends the device's pending commands
        rebirths.append(device_id)
        on_birth(device_id)

    handler.on_birth = counting
    flood = 500
    started = time.monotonic()
    for _ in range(flood):
        handler(topics.state("loud"), codec.encode(payloads.birth()))
    for seq in range(flood):
        handler(topics.events("loud"), codec.encode(payloads.agent_event(seq)))
    handler(topics.state("quiet"), codec.encode(payloads.birth()))
    handler(topics.events("quiet"), codec.encode(payloads.agent_event(1)))
    allowed = burst + rate * (time.monotonic() - started) + 1
    assert rebirths.count("quiet") == 1 and rebirths.count("loud") <= allowed
    metrics = ctl.client.get("/metrics").text
    state = metric_value(metrics, "slmfleet_control_throttled_total", {"channel": "state"})
    events = metric_value(metrics, "slmfleet_control_throttled_total", {"channel": "events"})
    assert state + events >= 2 * flood - allowed
    assert state >= flood - allowed
    ctl.flush()
    assert ctl.runtime.registry.known("quiet")
