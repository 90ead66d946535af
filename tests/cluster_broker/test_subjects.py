"""MQTT topics as NATS subjects, several broker URLs, and the rotation through them (no broker needed)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from agent.transport.mqtt import MqttConfig, MqttTransport, first_server, parse_broker_url
from controller.broker.embedded import free_port
from controller.mqtt.nats_ingest import (
    Handoff,
    NatsSubscription,
    StateDedup,
    ingest_subscriptions,
    subject_to_topic,
    topic_to_subject,
)
from controller.settings import SettingsError, load_settings
from wire import topics


def test_topics_map_to_subjects_as_nats_mqtt_gateway_maps_them() -> None:
    assert topic_to_subject("slmfleet/v1/dev/pump-7/telemetry") == "slmfleet.v1.dev.pump-7.telemetry"
    assert topic_to_subject("slmfleet/v1/dev/+/state") == "slmfleet.v1.dev.*.state"
    assert topic_to_subject("slmfleet/v1/#") == "slmfleet.v1.>"
    # a '.' inside a level is '//' in the subject (nats-server >= 2.10), and back
    assert topic_to_subject(topics.telemetry("pump.7")) == "slmfleet.v1.dev.pump//7.telemetry"
    for topic in (topics.telemetry("pump.7"), topics.events("a.b.c"), topics.state("x_1:y-2")):
        assert subject_to_topic(topic_to_subject(topic)) == topic
        assert topics.parse_device(subject_to_topic(topic_to_subject(topic))) is not None
    with pytest.raises(ValueError):
        topic_to_subject("/leading/slash")


def test_shared_mqtt_subscriptions_become_a_queue_group_and_state_reaches_every_replica() -> None:
    subs = ingest_subscriptions(
        [
            (topics.all_devices(topics.DeviceChannel.STATE), 1),
            (topics.shared(topics.all_devices(topics.DeviceChannel.TELEMETRY), "ingest"), 1),
            (topics.shared(topics.all_devices(topics.DeviceChannel.EVENTS), "ingest"), 1),
        ]
    )
    assert subs == [
        NatsSubscription("slmfleet.v1.dev.*.state", None),
        NatsSubscription("slmfleet.v1.dev.*.telemetry", "ingest"),
        NatsSubscription("slmfleet.v1.dev.*.events", "ingest"),
    ]


def test_a_comma_separated_broker_list_names_every_node() -> None:
    fields = parse_broker_url("mqtt://u:p@n1:1883, mqtt://n2:1884,mqtt://n3")
    config = MqttConfig(**fields)
    assert config.rotation == (("n1", 1883), ("n2", 1884), ("n3", 1883))
    assert (config.host, config.port, config.username, config.password) == ("n1", 1883, "u", "p")
    assert [config.server_url(i) for i in range(4)] == [
        "mqtt://n1:1883",
        "mqtt://n2:1884",
        "mqtt://n3:1883",
        "mqtt://n1:1883",
    ]
    assert MqttConfig(**parse_broker_url("mqtt://solo:1")).rotation == (("solo", 1),)
    with pytest.raises(ValueError, match="mix"):
        parse_broker_url("mqtt://a:1,mqtts://b:2")


def test_nats_ingest_needs_its_servers_and_the_mqtt_gateway(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SettingsError, match="nats_url"):
        load_settings(data_dir=tmp_path, ingest="nats", broker_url="mqtt://127.0.0.1:1")
    settings = load_settings(
        data_dir=tmp_path, ingest="nats", broker_url="mqtt://127.0.0.1:1", nats_url="nats://127.0.0.1:2"
    )
    assert settings.nats_queue_group == "slmfleet-ingest"


def test_the_transport_tries_every_broker_in_turn_before_backing_off() -> None:
    """Three closed ports: attempts go to each in turn, and only after a full round does the delay grow."""
    ports = [free_port(), free_port(), free_port()]
    url = ",".join(f"mqtt://127.0.0.1:{p}" for p in ports)

    async def run() -> list[str]:
        config = MqttConfig(**parse_broker_url(url), reconnect_min_s=0.05, reconnect_max_s=0.05, connect_timeout_s=1)
        transport = MqttTransport(config, "rotation-test")
        tried: list[str] = []
        original = transport._try_connect

        def spy() -> None:
            tried.append(transport.server_url)
            original()

        transport._try_connect = spy  # type: ignore[method-assign]
        transport.start()
        deadline = asyncio.get_running_loop().time() + 10
        while len(tried) < 7 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        await transport.stop()
        return tried

    tried = asyncio.run(run())
    assert len(tried) >= 7, tried
    first = first_server("rotation-test", 3)
    expected = [f"mqtt://127.0.0.1:{ports[(first + i) % 3]}" for i in range(7)]
    assert tried[:7] == expected


def test_a_fleet_given_the_same_list_spreads_over_the_nodes() -> None:
    starts = [first_server(f"pump-{i}", 3) for i in range(300)]
    assert all(starts.count(k) > 60 for k in range(3)), [starts.count(k) for k in range(3)]
    assert first_server("pump-1", 3) == first_server("pump-1", 3)
    assert first_server("pump-1", 1) == 0


def test_the_handoff_delivers_every_message_in_order_with_fewer_wake_ups() -> None:
    """NATS thread -> MQTT loop: a batch per wake-up, nothing lost or reordered under a concurrent producer."""
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    got: list[bytes] = []
    wakeups = 0

    def call_soon(fn: Callable[[], None]) -> None:
        nonlocal wakeups
        wakeups += 1
        loop.call_soon_threadsafe(fn)

    handoff = Handoff(call_soon, lambda topic, payload: got.append(payload))
    count = 20_000
    for i in range(count):
        handoff.put("t", str(i).encode())
    deadline = time.monotonic() + 10
    while len(got) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    loop.call_soon_threadsafe(loop.stop)
    runner.join(5)
    loop.close()
    assert got == [str(i).encode() for i in range(count)]
    assert wakeups < count


def test_a_state_that_comes_over_nats_and_over_mqtt_is_handled_once() -> None:
    states = StateDedup()
    birth, will = b'{"type":"online","ts":1}', b'{"type":"offline","ts":2}'
    topic = topics.state("pump-7")
    assert states.fresh(topic, birth)
    assert not states.fresh(topic, birth)  # the other way's copy
    assert states.fresh(topic, will)
    assert not states.fresh(topic, will)
    assert states.fresh(topic, b'{"type":"online","ts":3}')  # a new birth
    assert states.fresh(topics.state("pump-8"), birth)  # another device
