"""The core's action interpreter (agent.core.shell), shared by the device process and the virtual devices,
over the in-memory broker."""

from __future__ import annotations

from agent.core import Publish, Reconnect, Subscribe, Unsubscribe
from agent.core.outbox import Outbox
from agent.core.shell import CoreShell
from agent.telemetry.spool import MemorySpool
from agent.transport.memory import MemoryBroker, MemoryTransport


class Wiring:
    def __init__(self) -> None:
        self.broker = MemoryBroker()
        self.outbox = Outbox(MemorySpool(), max_inflight=2)
        self.transport: MemoryTransport | None = None
        self.seen: list[str] = []
        self.reconnects: list[str] = []
        self.shell = CoreShell(
            self.outbox,
            lambda: self.transport,
            reconnect=lambda action: self.reconnects.append(action.reason),
            on_publish=lambda action: self.seen.append(action.topic),
        )
        self.received: list[tuple[str, bytes]] = []
        observer = MemoryTransport(self.broker, "observer")
        observer.on_message = lambda topic, payload: self.received.append((topic, payload))
        observer.subscribe("#")
        observer.start()

    def connect(self, client_id: str = "dev-1") -> MemoryTransport:
        self.transport = MemoryTransport(self.broker, client_id)
        self.transport.start()
        return self.transport


def test_durable_messages_wait_in_the_outbox_until_connected_and_leave_it_when_acked() -> None:
    w = Wiring()
    w.shell.execute([Publish("t/a", b"1", durable=True), Publish("t/b", b"2")])
    assert w.received == []
    assert len(w.outbox.spool) == 1  # the durable one waits; the other is lost without a connection
    assert w.seen == ["t/a", "t/b"]

    w.connect()
    w.shell.pump()
    assert w.received == [("t/a", b"1")]
    assert len(w.outbox.spool) == 1  # sent, not yet acknowledged
    mids = list(w.outbox._inflight)
    assert w.shell.acked(mids[0]) is True
    assert len(w.outbox.spool) == 0
    assert w.shell.acked(12345) is False  # not the outbox's message


def test_the_in_flight_window_refills_on_each_ack() -> None:
    w = Wiring()
    w.connect()
    w.shell.execute([Publish(f"t/{i}", b"x", durable=True) for i in range(4)])
    assert [t for t, _ in w.received] == ["t/0", "t/1"]  # max_inflight=2
    w.shell.acked(next(iter(w.outbox._inflight)))
    assert [t for t, _ in w.received] == ["t/0", "t/1", "t/2"]


def test_subscriptions_and_reconnects_go_to_the_transport() -> None:
    w = Wiring()
    w.shell.execute([Reconnect("no connection yet")])
    assert w.reconnects == []  # nothing to reconnect
    transport = w.connect()
    w.shell.execute([Subscribe("cmd/#"), Reconnect("renewed certificate")], pump=False)
    assert "cmd/#" in transport._subs
    assert w.reconnects == ["renewed certificate"]
    w.shell.execute([Unsubscribe("cmd/#")])
    assert "cmd/#" not in transport._subs


def test_without_a_reconnect_hook_a_reconnect_is_ignored() -> None:
    w = Wiring()
    w.connect()
    shell = CoreShell(w.outbox, lambda: w.transport)
    shell.execute([Reconnect("virtual devices do not renew certificates"), Publish("t/x", b"y")])
    assert w.received == [("t/x", b"y")]
