"""One contract, two transports: the in-memory broker and a real broker over MqttTransport."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from agent.transport.base import Will
from agent.transport.memory import MemoryBroker, MemoryTransport
from agent.transport.mqtt import MqttConfig, MqttTransport
from controller.broker.embedded import EmbeddedBroker
from tests.helpers import LoopThread, wait_until


class Harness:
    """Creates connected clients for one transport kind."""

    def __init__(self, kind: str, broker: EmbeddedBroker | None) -> None:
        self.kind = kind
        self.broker = broker
        self.memory = MemoryBroker()
        self.loop = LoopThread() if kind == "mqtt" else None
        self.clients: list[Any] = []

    def client(self, client_id: str, will: Will | None = None) -> Any:
        got: list[tuple[str, bytes]] = []
        acked: list[int] = []
        if self.kind == "memory":
            t = MemoryTransport(self.memory, client_id, will=will)
        else:
            assert self.broker is not None and self.loop is not None
            config = MqttConfig(
                port=self.broker.port,
                reconnect_min_s=0.05,
                reconnect_max_s=0.5,
                protocol="3.1.1" if self.broker.engine == "amqtt" else "auto",
            )
            t = self.loop.call(lambda: MqttTransport(config, client_id, will=will, loop=self.loop.loop))
        t.on_message = lambda topic, payload: got.append((topic, payload))
        t.on_published = acked.append
        t.got, t.acked = got, acked  # type: ignore[attr-defined]
        self.clients.append(t)
        return t

    def start(self, t: Any) -> None:
        if self.loop is None:
            t.start()
        else:
            self.loop.call(t.start)
        wait_until(lambda: t.connected, 15, what=f"{t.client_id} connected")

    def subscribe(self, t: Any, filter_: str) -> None:
        if self.loop is None:
            t.subscribe(filter_, 1)
        else:
            self.loop.call(t.subscribe, filter_, 1)

    def abort(self, t: Any) -> None:
        if self.loop is None:
            t.abort()
        else:
            self.loop.call(t.abort)

    def stop(self, t: Any) -> None:
        if self.loop is None:
            t.stop()
        else:
            self.loop.run(t.stop())

    def close(self) -> None:
        for t in self.clients:
            with contextlib.suppress(Exception):
                self.abort(t)
        if self.loop is not None:
            self.loop.close()


@pytest.fixture(params=["memory", "mqtt"])
def harness(request: pytest.FixtureRequest, private_broker: EmbeddedBroker) -> Iterator[Harness]:
    h = Harness(request.param, private_broker if request.param == "mqtt" else None)
    yield h
    h.close()


def test_published_messages_reach_matching_subscribers_in_order(harness: Harness) -> None:
    sub, pub = harness.client("sub"), harness.client("pub")
    harness.start(sub)
    harness.subscribe(sub, "slmfleet/v1/dev/+/telemetry")
    harness.start(pub)
    wait_until(
        lambda: pub.publish("slmfleet/v1/dev/x/telemetry", b"probe", 1) and sub.got, 10, what="subscription live"
    )
    sub.got.clear()
    for i in range(200):
        assert pub.publish("slmfleet/v1/dev/a/telemetry", str(i).encode(), 1) != 0
    pub.publish("slmfleet/v1/dev/a/events", b"not subscribed", 1)
    wait_until(lambda: len([p for _, p in sub.got if p != b"probe"]) >= 200, 10, what="200 messages")
    assert [int(p) for _, p in sub.got if p != b"probe"][:200] == list(range(200))
    wait_until(lambda: len(pub.acked) >= 202, 10, what="acknowledgements for QoS 1")


def test_retained_state_reaches_a_late_subscriber(harness: Harness) -> None:
    pub = harness.client("pub")
    harness.start(pub)
    pub.publish("slmfleet/v1/dev/a/state", b"online", 1, True)
    wait_until(lambda: pub.acked, 10)
    late = harness.client("late")
    harness.start(late)
    harness.subscribe(late, "slmfleet/v1/dev/+/state")
    wait_until(lambda: late.got, 10, what="retained message")
    assert late.got[0] == ("slmfleet/v1/dev/a/state", b"online")


def test_will_fires_on_a_crash_and_not_on_a_clean_stop(harness: Harness) -> None:
    watcher = harness.client("watcher")
    harness.start(watcher)
    harness.subscribe(watcher, "w/#")
    crasher = harness.client("crasher", will=Will("w/crasher", b"dead", 1, False))
    polite = harness.client("polite", will=Will("w/polite", b"dead", 1, False))
    harness.start(crasher)
    harness.start(polite)
    harness.stop(polite)
    harness.abort(crasher)
    wait_until(lambda: watcher.got, 10, what="the crasher's will")
    # a message sent after both wills would have been queued behind them proves the polite one never came
    marker = harness.client("marker")
    harness.start(marker)
    marker.publish("w/end", b"end", 1)
    wait_until(lambda: any(t == "w/end" for t, _ in watcher.got), 10)
    assert [t for t, _ in watcher.got] == ["w/crasher", "w/end"]


def test_subscriptions_come_back_after_the_broker_restarts(
    private_broker: EmbeddedBroker, requires_mosquitto: None
) -> None:
    h = Harness("mqtt", private_broker)
    try:
        sub, pub = h.client("sub-r"), h.client("pub-r")
        h.start(sub)
        h.subscribe(sub, "r/#")
        h.start(pub)
        private_broker.restart()
        wait_until(lambda: sub.connects >= 2 and pub.connects >= 2, 20, what="both reconnected")
        wait_until(
            lambda: pub.publish("r/x", b"after", 1) and any(p == b"after" for _, p in sub.got),
            10,
            what="delivery after the restart",
        )
    finally:
        h.close()


def test_mqtt5_where_the_broker_has_it_and_311_where_it_does_not(tmp_path: Any) -> None:
    loop = LoopThread()
    brokers = []
    try:
        engines = ["amqtt"] + (["mosquitto"] if __import__("shutil").which("mosquitto") else [])
        for engine in engines:
            b = EmbeddedBroker(tmp_path / engine, engine=engine)  # type: ignore[arg-type]
            b.start()
            brokers.append(b)
            t = loop.call(
                lambda b=b: MqttTransport(MqttConfig(port=b.port, connect_timeout_s=2), "auto", loop=loop.loop)
            )
            loop.call(t.start)
            wait_until(lambda t=t: t.connected, 20, what=f"connected to {engine}")
            assert t.protocol == ("5" if engine == "mosquitto" else "3.1.1")
            loop.run(t.stop())
    finally:
        for b in brokers:
            b.stop()
        loop.close()


def test_refused_credentials_stop_the_retries(tmp_path: Any, requires_mosquitto: None) -> None:
    b = EmbeddedBroker(tmp_path / "b", engine="mosquitto", allow_anonymous=False)
    b.start()
    loop = LoopThread()
    try:
        refused: list[str] = []
        t = loop.call(lambda: MqttTransport(MqttConfig(port=b.port, protocol="3.1.1"), "anon", loop=loop.loop))
        t.on_refused = refused.append
        loop.call(t.start)
        wait_until(lambda: refused, 10, what="a refusal")
        assert "not authori" in refused[0].lower()
        assert not t.connected and t._reconnect_handle is None
    finally:
        loop.close()
        b.stop()


def test_with_refused_retry_a_refusal_is_tried_again_and_recovers(
    tmp_path: Any, requires_mosquitto: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker that refused the client for a while (its auth broken, the device's credentials restored)
    lets it in later: the transport tries again at its slow pace and reports the refusal once."""
    strict = EmbeddedBroker(tmp_path / "strict", engine="mosquitto", allow_anonymous=False)
    strict.start()
    loop = LoopThread()
    relaxed: EmbeddedBroker | None = None
    try:
        refused: list[str] = []
        config = MqttConfig(port=strict.port, protocol="3.1.1", refused_retry_s=0.5)
        t = loop.call(lambda: MqttTransport(config, "anon", loop=loop.loop))
        t.on_refused = refused.append
        loop.call(t.start)
        wait_until(lambda: refused, 10, what="a refusal")
        assert t._reconnect_handle is not None and t.refused is not None  # a try is scheduled
        strict.stop()
        relaxed = EmbeddedBroker(tmp_path / "relaxed", port=strict.port, engine="mosquitto")
        relaxed.start()
        wait_until(lambda: t.connected, 20, what="connected once the broker lets it in")
        assert t.refused is None and len(refused) == 1
        # the refusal is logged once with its pace, not mistaken for a failure to be retried with backoff
        messages = [r.getMessage() for r in caplog.records if r.name == "agent.transport.mqtt"]
        assert any("trying again every" in m for m in messages), messages
        assert not any("before it was accepted" in m or "retrying with backoff" in m for m in messages), messages
        loop.run(t.stop())
    finally:
        loop.close()
        if relaxed is not None:
            relaxed.stop()
        strict.stop()
