"""Every MQTT handler of the controller and the agent under random and mutated payloads (hypothesis).

No exception escapes a handler, nothing invalid is stored or acted on, and every invalid payload is
counted: ``slmfleet_invalid_payloads_total{channel,reason}`` on the controller, the DropCounter on the agent.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlmodel import Session, func, select

from agent.core import AgentCore, CoreConfig, TelemetrySample
from agent.core.actions import Publish
from agent.core.guard import CommandGuard
from controller.broker.embedded import EmbeddedBroker
from controller.db.models import Device, DeviceEvent, TelemetryRecord
from tests.agent.deploy.harness import DEVICE, Artifact, artifact, deploy, memory_device, rollback, sealed
from tests.conftest import LiveController
from tests.helpers import RawMqtt, metric_value, wait_until
from tests.security import payloads
from wire import chunks as frames
from wire import codec, topics
from wire.messages import (
    Activate,
    Cancel,
    Commit,
    Configure,
    DeployState,
    HardwareProfile,
    Ping,
)
from wire.topics import DeviceChannel

FUZZ = settings(
    max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
CONSUMED = (DeviceChannel.STATE, DeviceChannel.TELEMETRY, DeviceChannel.EVENTS)
KNOWN = "dev-known"


def _invalid_total(ctl: LiveController) -> float:
    return sum(v for v in _invalid_counts(ctl).values())


def _invalid_counts(ctl: LiveController) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for family in ctl.runtime.metrics.registry.collect():
        if family.name == "slmfleet_invalid_payloads":
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[(s.labels["channel"], s.labels["reason"])] = s.value
    return out


def _rows(ctl: LiveController, model: Any, device_id: str | None = None) -> int:
    ctl.flush()
    with Session(ctl.runtime.engine) as session:
        stmt = select(func.count()).select_from(model)
        if device_id is not None:
            stmt = stmt.where(model.device_id == device_id)
        return int(session.exec(stmt).one())


@pytest.fixture
def ctl(make_controller: Callable[..., LiveController]) -> LiveController:
    """A controller without a broker: the handler is called directly, as the MQTT thread calls it.

    The per-device rate limits are lifted: thousands of hostile payloads come from one device here, and
    each must reach validation (the limits have tests of their own in test_rate_limits.py)."""
    c = make_controller(None, control_rate_per_s=100_000, control_burst=1_000_000, telemetry_burst=1_000_000)
    c.runtime.handler(topics.state(KNOWN), codec.encode(payloads.birth()))
    return c


# ------------------------------------------------------------ controller --

TEMPLATES = payloads.control_templates()


@given(rng=st.randoms(use_true_random=False), channel=st.sampled_from(CONSUMED), data=st.data())
@FUZZ
def _fuzz_controller_handler(ctl: LiveController, rng: random.Random, channel: DeviceChannel, data: Any) -> None:
    handler = ctl.runtime.handler
    max_size = ctl.runtime.settings.max_control_payload
    # a valid birth registers any device (enrollment is not built yet): strangers only on the other channels
    strangers = [] if channel is DeviceChannel.STATE else ["never-born", "x" * 128]
    device_id = data.draw(st.sampled_from([KNOWN, KNOWN, *strangers]))
    payload = data.draw(
        st.one_of(
            st.binary(max_size=512),
            st.just(payloads.hostile(rng, TEMPLATES[channel], max_size)),
        )
    )
    valid = payloads.is_valid(channel, payload, max_size)
    before_invalid, before_queued = _invalid_total(ctl), ctl.runtime.writer._enqueued
    handler(topics.device(device_id, channel), payload)
    after_invalid, after_queued = _invalid_total(ctl), ctl.runtime.writer._enqueued
    if not valid:
        assert after_invalid == before_invalid + 1, payload[:200]
        assert after_queued == before_queued, f"an invalid payload was queued for the database: {payload[:200]!r}"
    else:  # still valid after mutation: stored, or counted (unknown device, out of range), never both
        assert (after_invalid - before_invalid) + (after_queued - before_queued) <= 1


def test_controller_handlers_survive_hostile_payloads(ctl: LiveController) -> None:
    telemetry_before = _rows(ctl, TelemetryRecord)
    events_before = _rows(ctl, DeviceEvent)
    _fuzz_controller_handler(ctl)
    # valid by the schema, beyond the database's columns: whether the fuzzer's mutations happen to make
    # one depends on its (derandomized) sequence, so one of each kind is sent for certain
    handler = ctl.runtime.handler
    handler(topics.telemetry(KNOWN), codec.encode(payloads.telemetry(seq=2**40)))
    handler(topics.events(KNOWN), codec.encode(payloads.agent_event(seq=2**40)))
    counts = _invalid_counts(ctl)
    assert counts.get(("unknown", "handler_error"), 0) == 0, "an exception escaped into the handler's guard"
    # the writer never choked on what the handler let through: no batch failed, nothing dropped
    assert ctl.runtime.writer.flush(30)
    assert ctl.runtime.writer.failed_batches == 0
    assert ctl.runtime.metrics.ingest_dropped._value.get() == 0
    assert sum(counts.values()) >= 100, counts
    assert {reason for (_, reason) in counts} >= {
        "not_json",
        "schema",
        "empty",
        "too_large",
        "unknown_device",
        "out_of_range",
    }
    # nothing from devices that never said hello
    for stranger in ("never-born", "x" * 128):
        assert _rows(ctl, TelemetryRecord, stranger) == 0 and _rows(ctl, DeviceEvent, stranger) == 0
        with Session(ctl.runtime.engine) as session:
            assert session.get(Device, stranger) is None
    assert _rows(ctl, TelemetryRecord) >= telemetry_before and _rows(ctl, DeviceEvent) >= events_before
    # and the handler still takes good traffic afterwards
    ctl.runtime.handler(topics.state(KNOWN), codec.encode(payloads.birth()))
    n = _rows(ctl, TelemetryRecord, KNOWN)
    ctl.runtime.handler(topics.telemetry(KNOWN), codec.encode(payloads.telemetry(seq=10**6)))
    assert _rows(ctl, TelemetryRecord, KNOWN) == n + 1


def test_controller_drops_traffic_on_topics_it_does_not_consume(ctl: LiveController) -> None:
    rng = random.Random(7)
    before = _invalid_total(ctl)
    sent = 0
    for channel in (DeviceChannel.RESULTS, DeviceChannel.CHUNKS, DeviceChannel.CMD):
        for _ in range(20):
            ctl.runtime.handler(
                topics.device(KNOWN, channel), payloads.hostile(rng, TEMPLATES[DeviceChannel.EVENTS], 4096)
            )
            sent += 1
    for topic in ("slmfleet/v1/dev/a+b/telemetry", "slmfleet/v1/dev//state", "x" * 70000, "", "slmfleet/v1/dev/a/b/c"):
        ctl.runtime.handler(topic, b"{}")
        sent += 1
    assert _invalid_total(ctl) == before + sent
    assert _invalid_counts(ctl).get(("unknown", "handler_error"), 0) == 0


def test_hostile_traffic_over_a_real_broker_is_counted_and_not_stored(
    private_broker: EmbeddedBroker, make_controller: Callable[..., LiveController]
) -> None:
    ctl = make_controller(private_broker)
    raw = RawMqtt(private_broker.port, "fuzz-device")
    try:
        raw.publish(*_birth_msg(KNOWN))
        wait_until(lambda: ctl.runtime.registry.known(KNOWN), 10, what="device registered")
        rng = random.Random(2026)
        max_size = ctl.runtime.settings.max_control_payload
        sent = 0
        for i in range(300):
            channel = CONSUMED[i % 3]
            payload = payloads.hostile(rng, TEMPLATES[channel], max_size)
            if payloads.is_valid(channel, payload, max_size):
                continue  # a mutation that is still a valid message is not hostile
            raw.publish(topics.device(KNOWN, channel), payload, qos=1)
            sent += 1
        # valid messages from a device that never sent a birth
        raw.publish(topics.telemetry("ghost"), codec.encode(payloads.telemetry()))
        raw.publish(topics.events("ghost"), codec.encode(payloads.birth()))  # and a birth on the wrong channel
        sent += 2
        raw.publish(topics.telemetry(KNOWN), codec.encode(payloads.telemetry(seq=77)))  # the sentinel, last
        wait_until(lambda: _invalid_total(ctl) >= sent, 20, what=f"{sent} invalid payloads counted")
        wait_until(lambda: _rows(ctl, TelemetryRecord, KNOWN) == 1, 10, what="the sentinel stored")
        assert _invalid_total(ctl) == sent
        assert _rows(ctl, DeviceEvent) == 0 and _rows(ctl, TelemetryRecord) == 1
        metrics = ctl.client.get("/metrics").text
        assert metric_value(metrics, "slmfleet_invalid_payloads_total") == sent
        assert metric_value(metrics, "slmfleet_invalid_payloads_total", {"reason": "unknown_device"}) == 1
        assert metric_value(metrics, "slmfleet_invalid_payloads_total", {"reason": "handler_error"}) == 0
        assert sent >= 250
    finally:
        raw.close()


def _birth_msg(device_id: str) -> tuple[str, bytes]:
    return topics.state(device_id), codec.encode(payloads.birth())


# ----------------------------------------------------------------- agent --


HW = HardwareProfile(cpu_count=4, ram_bytes=4 * 2**30, arch="aarch64", os="Linux")


class AgentUnderFire:
    """A real AgentCore with the real deployment side (memory storage) in the middle of a download."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        files = {"model.onnx": bytes(range(256)) * 20, "tokenizer.json": b"{}"}
        self.art: Artifact = artifact(files, self.key)
        self.device = memory_device(self.key)
        self.core = AgentCore(
            CoreConfig(device_id=DEVICE, agent_version="9.9", telemetry_interval_s=10.0),
            HW,
            lambda dt: TelemetrySample(cpu_percent=1.0, rss_bytes=1000),
            started_at=1000.0,
            deployments=self.device.driver,
            guard=CommandGuard(DEVICE, self.key.public_key()),
        )
        self.device.take(self.device.driver.start(1000.0))
        self.device.take(self.core.on_connected(1000.0))
        self.device.take(self.core.on_message(topics.cmd(DEVICE), sealed(deploy(self.art), self.key), 1000.0))
        assert self.device.state == DeployState.DOWNLOADING
        self.genuine = [self.art.frame(i) for i in range(len(self.art))]
        now = 1000.0
        # genuine signed commands (and an unsigned ping): mutations of them must never be obeyed
        self.command_templates = [codec.encode(Ping(ts=now, command_id="p-1"))] + [
            sealed(m, self.key)
            for m in (
                Configure(ts=now, command_id="c-1", telemetry_interval_s=5.0),
                deploy(self.art, "dep-2"),
                rollback(self.key, "dep-3", self.art),
                Activate(ts=now, command_id="a-1", deployment_id="dep-1"),
                Commit(ts=now, command_id="m-1", deployment_id="dep-1"),
                Cancel(ts=now, command_id="x-1", deployment_id="dep-9"),
            )
        ]

    @property
    def writes(self) -> int:
        return int(self.device.storage.writes)  # type: ignore[attr-defined]

    def dropped(self) -> int:
        return self.core.drops.total + self.device.manager.drops.total


@pytest.fixture
def agent() -> Iterator[AgentUnderFire]:
    a = AgentUnderFire()
    yield a
    a.device.driver.close()


@given(rng=st.randoms(use_true_random=False), data=st.data())
@FUZZ
def _fuzz_agent_commands(a: AgentUnderFire, rng: random.Random, data: Any) -> None:
    import json

    templates = [json.loads(t) for t in a.command_templates]
    payload = data.draw(st.one_of(st.binary(max_size=512), st.just(payloads.hostile(rng, templates, 64 * 1024))))
    topic = data.draw(
        st.sampled_from([topics.cmd(DEVICE)] * 4 + [topics.cmd("dev-2"), topics.state(DEVICE), "x/y", ""])
    )
    valid = topic == topics.cmd(DEVICE) and payloads.is_valid(DeviceChannel.CMD, payload)
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        obj = None
    genuine = obj in templates  # a mutation that changed nothing (an edge equal to the old value)
    before = a.dropped()
    actions = a.core.on_message(topic, payload, 1000.0)
    a.device.take(actions)
    if not valid:
        assert a.dropped() == before + 1, (topic, payload[:200])
        assert actions == [], f"an invalid command was acted on: {payload[:200]!r}"
    elif not genuine and isinstance(obj, dict) and obj.get("type") != "ping":
        # schema-valid but not what the controller signed for this device: refused, only reported
        assert a.dropped() == before + 1, (topic, payload[:200])
        reports = [json.loads(x.payload) for x in actions if isinstance(x, Publish)]
        assert len(reports) == len(actions), f"obeyed: {payload[:200]!r}"
        for r in reports:  # a refusal event, or the deployment of a Deploy this agent can never accept failed
            assert r.get("kind") == "command_refused" or r.get("state") == "failed", f"obeyed: {payload[:200]!r}"


def test_agent_commands_survive_hostile_payloads(agent: AgentUnderFire) -> None:
    _fuzz_agent_commands(agent)
    reasons = {reason for (_, reason) in agent.core.drops.counts}
    assert reasons >= {"not_json", "schema", "empty", "topic", "bad_signature"}, agent.core.drops.counts
    # still answers a good command afterwards
    actions = agent.core.on_message(topics.cmd(DEVICE), codec.encode(Ping(ts=1001.0, command_id="p-9")), 1001.0)
    assert any(isinstance(x, Publish) and b"pong" in x.payload for x in actions)


def _same_chunk(frame: bytes, genuine: list[bytes]) -> bool:
    try:
        decoded = frames.decode(frame)
    except frames.FrameError:
        return False
    return decoded in [frames.decode(g) for g in genuine]


@given(rng=st.randoms(use_true_random=False), repair=st.booleans(), raw=st.binary(max_size=200), use_raw=st.booleans())
@FUZZ
def _fuzz_agent_chunks(a: AgentUnderFire, rng: random.Random, repair: bool, raw: bytes, use_raw: bool) -> None:
    frame = raw if use_raw else payloads.hostile_frame(rng, a.art.id, a.genuine)
    if _same_chunk(frame, a.genuine):
        return  # the same chunk (reserved header bits differ, which receivers ignore): not a forgery
    topic = topics.chunks(DEVICE) if repair else topics.artifact_chunks(a.art.id)
    counters = a.device.manager.counters
    before = (a.dropped(), counters["chunks_ignored"], counters["chunks_duplicate"], a.writes)
    a.device.take(a.core.on_message(topic, frame, 1000.0))
    after = (a.dropped(), counters["chunks_ignored"], counters["chunks_duplicate"], a.writes)
    assert after[3] == before[3], f"a forged chunk was written: {frame[:80]!r}"
    assert sum(after[:3]) == sum(before[:3]) + 1, (before, after, frame[:80])


def test_agent_chunk_frames_survive_hostile_payloads(agent: AgentUnderFire) -> None:
    _fuzz_agent_chunks(agent)
    assert agent.device.state == DeployState.DOWNLOADING and agent.writes == 0
    reasons = {reason for (_, reason) in agent.device.manager.drops.counts}
    assert reasons >= {"frame", "bad_hash"}, agent.device.manager.drops.counts
    # the genuine frames still complete the download afterwards
    for frame in agent.genuine:
        agent.device.take(agent.core.on_message(topics.artifact_chunks(agent.art.id), frame, 1000.0))
    assert agent.writes == len(agent.genuine)
    assert agent.device.state != DeployState.DOWNLOADING
