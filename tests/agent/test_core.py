"""The sans-IO agent core with a controllable clock and the in-memory transport."""

import json
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core import AgentCore, CoreConfig, Publish, Subscribe, TelemetrySample
from agent.core.guard import CommandGuard
from agent.transport.memory import MemoryBroker, MemoryTransport
from wire import codec, signing, topics
from wire.messages import Configure, HardwareProfile, InstalledModel, Ping
from wire.topics import DeviceChannel

HW = HardwareProfile(cpu_count=4, ram_bytes=4 * 2**30, arch="aarch64", os="Linux")
KEY = Ed25519PrivateKey.generate()


def make_core(interval: float = 10.0, **kw: object) -> AgentCore:
    return AgentCore(
        CoreConfig(device_id="dev-1", agent_version="9.9", telemetry_interval_s=interval, labels={"site": "x"}),
        HW,
        lambda dt: TelemetrySample(cpu_percent=12.5, rss_bytes=1000),
        started_at=1000.0,
        guard=CommandGuard("dev-1", KEY.public_key()),
        **kw,  # type: ignore[arg-type]
    )


def test_connect_subscribes_to_commands_then_announces_itself_retained() -> None:
    core = make_core(installed=lambda: [InstalledModel(model="m", version=2, variant="int8")])
    actions = core.on_connected(1000.0)
    assert actions[0] == Subscribe(topics.cmd("dev-1"), 1)
    birth = actions[1]
    assert isinstance(birth, Publish) and birth.retain and birth.qos == 1 and not birth.durable
    msg = codec.decode(DeviceChannel.STATE, birth.payload)
    assert msg.type == "online" and msg.agent_version == "9.9"
    assert msg.installed[0].version == 2 and msg.labels == {"site": "x"}
    will = core.will(1000.0)
    assert will.retain and codec.decode(DeviceChannel.STATE, will.payload).reason == "will"


def test_telemetry_follows_the_clock_without_bursting_after_a_stall() -> None:
    core = make_core(interval=10.0)
    assert core.tick(1005.0) == []
    first = core.tick(1010.0)
    assert len(first) == 1 and first[0].durable and first[0].topic == topics.telemetry("dev-1")
    body = json.loads(first[0].payload)
    assert body["seq"] == 0 and body["cpu_percent"] == 12.5 and body["uptime_s"] == 10.0
    assert core.tick(1015.0) == []
    assert len(core.tick(1020.0)) == 1
    # the process was stopped for 100 s: one message, then back on a 10 s period
    late = core.tick(1120.0)
    assert len(late) == 1 and json.loads(late[0].payload)["interval_s"] == 100.0
    assert core.tick(1125.0) == [] and len(core.tick(1130.0)) == 1


def test_ping_is_acknowledged_and_configure_changes_the_interval() -> None:
    core = make_core()
    ack = core.on_message(topics.cmd("dev-1"), codec.encode(Ping(ts=1.0, command_id="p1")), 1001.0)
    event = codec.decode(DeviceChannel.EVENTS, ack[0].payload)
    assert event.type == "ack" and event.command_id == "p1" and event.ok
    configure = Configure(ts=1.0, command_id="c1", telemetry_interval_s=2.0)
    payload = signing.seal_command(configure, KEY, device_id="dev-1", now=time.time(), ttl_s=60)
    actions = core.on_message(topics.cmd("dev-1"), payload, 1001.0)
    assert core.config.telemetry_interval_s == 2.0
    kinds = [codec.decode(DeviceChannel.STATE if a.retain else DeviceChannel.EVENTS, a.payload).type for a in actions]
    assert kinds == ["online", "ack"]
    assert core.tick(1003.5)  # due within the new interval


def test_invalid_commands_are_counted_and_produce_nothing() -> None:
    core = make_core()
    for payload in (b"garbage", b"{}", b'{"type":"ping"}', b"x" * 100_000):
        assert core.on_message(topics.cmd("dev-1"), payload, 1001.0) == []
    assert core.on_message(topics.cmd("other"), codec.encode(Ping(ts=1, command_id="a")), 1001.0) == []
    assert core.drops.total == 5


def test_core_over_the_memory_transport_reaches_a_controller_side_subscriber() -> None:
    broker = MemoryBroker()
    core = make_core(interval=1.0)
    device = MemoryTransport(broker, "dev-1", will=core.will(1000.0))
    watcher = MemoryTransport(broker, "watcher")
    seen: list[tuple[str, bytes]] = []
    watcher.on_message = lambda t, p: seen.append((t, p))
    watcher.subscribe("slmfleet/v1/dev/+/#")
    watcher.start()

    def execute(actions: list) -> None:  # type: ignore[type-arg]
        for a in actions:
            if isinstance(a, Subscribe):
                device.subscribe(a.filter, a.qos)
            else:
                device.publish(a.topic, a.payload, a.qos, a.retain)

    device.on_connect = lambda: execute(core.on_connected(1000.0))
    device.on_message = lambda t, p: execute(core.on_message(t, p, 1000.5))
    device.start()
    watcher.publish(topics.cmd("dev-1"), codec.encode(Ping(ts=1, command_id="z")))
    execute(core.tick(1001.0))
    device.abort()
    types = [json.loads(p)["type"] for t, p in seen if not t.endswith("/cmd")]
    assert types == ["online", "ack", "telemetry", "offline"]
    assert broker.retained(topics.state("dev-1")) == core.will(1000.0).payload
