"""Store and forward: order, bounds, crash safety."""

from pathlib import Path

import pytest

from agent.core.actions import Publish
from agent.core.outbox import Outbox
from agent.telemetry.spool import MemorySpool, SqliteSpool


@pytest.fixture(params=["memory", "sqlite"])
def spool_factory(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    made = []

    def make(max_messages: int = 100, max_bytes: int = 10_000):  # type: ignore[no-untyped-def]
        made.append(1)
        if request.param == "memory":
            return MemorySpool(max_messages, max_bytes)
        return SqliteSpool(tmp_path / f"spool-{len(made)}.db", max_messages, max_bytes)

    return make


def msg(i: int) -> Publish:
    return Publish("t", f"m{i}".encode(), qos=1, durable=True)


class FakeClient:
    def __init__(self) -> None:
        self.online = False
        self.sent: list[bytes] = []
        self.mid = 0

    def send(self, topic: str, payload: bytes, qos: int, retain: bool) -> int:
        if not self.online:
            return 0
        self.mid += 1
        self.sent.append(payload)
        return self.mid


def test_offline_messages_are_kept_and_sent_in_order_on_reconnect(spool_factory) -> None:  # type: ignore[no-untyped-def]
    outbox, client = Outbox(spool_factory(), max_inflight=3), FakeClient()
    for i in range(10):
        outbox.add(msg(i))
        outbox.pump(client.send)
    assert client.sent == []
    client.online = True
    outbox.pump(client.send)
    assert client.sent == [b"m0", b"m1", b"m2"]  # window of 3 in flight
    for mid in range(1, 11):
        outbox.acked(mid)
        outbox.pump(client.send)
    assert client.sent == [f"m{i}".encode() for i in range(10)]
    assert len(outbox.spool) == 0


def test_unacknowledged_messages_survive_a_crash(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "s.db")
    outbox, client = Outbox(spool), FakeClient()
    client.online = True
    for i in range(5):
        outbox.add(msg(i))
    outbox.pump(client.send)
    outbox.acked(1)
    outbox.acked(2)
    spool.close()  # the process dies with m2..m4 in flight
    reopened = SqliteSpool(tmp_path / "s.db")
    outbox2, client2 = Outbox(reopened), FakeClient()
    client2.online = True
    outbox2.pump(client2.send)
    assert client2.sent == [b"m2", b"m3", b"m4"]


def test_the_bound_drops_the_oldest_and_counts_them(spool_factory) -> None:  # type: ignore[no-untyped-def]
    spool = spool_factory(max_messages=5)
    for i in range(12):
        spool.append("t", f"m{i}".encode(), 1, False)
    assert len(spool) == 5 and spool.dropped == 7
    assert [e.payload for e in spool.after(0, 10)] == [f"m{i}".encode() for i in range(7, 12)]
    byte_bound = spool_factory(max_messages=1000, max_bytes=1000)
    for _ in range(30):
        byte_bound.append("t", b"x" * 100, 1, False)
    assert len(byte_bound) == 10 and byte_bound.dropped == 20


def test_drop_count_persists(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "s.db", max_messages=2)
    for _ in range(5):
        spool.append("t", b"x", 1, False)
    spool.close()
    assert SqliteSpool(tmp_path / "s.db", max_messages=2).dropped == 3


class CountingSpool:
    """A real spool that counts the look-ups ``Outbox.pump`` makes."""

    def __init__(self, inner: MemorySpool | SqliteSpool) -> None:
        self.inner = inner
        self.lookups = 0
        self.dropped = 0

    def append(self, topic: str, payload: bytes, qos: int, retain: bool, keep=()) -> int:  # type: ignore[no-untyped-def]
        return self.inner.append(topic, payload, qos, retain, keep)

    def after(self, last_id: int, limit: int):  # type: ignore[no-untyped-def]
        self.lookups += 1
        return self.inner.after(last_id, limit)

    def remove(self, entry_id: int) -> None:
        self.inner.remove(entry_id)

    def __len__(self) -> int:
        return len(self.inner)


def test_pump_asks_the_spool_only_when_something_may_be_waiting(spool_factory) -> None:  # type: ignore[no-untyped-def]
    """The agent pumps after every received message (each chunk of a download): with nothing added since the
    spool was last found empty, a pump must not query it; anything added, a restart or a full window still
    send everything in order."""
    spool = CountingSpool(spool_factory())
    outbox, client = Outbox(spool, max_inflight=2), FakeClient()  # type: ignore[arg-type]
    client.online = True
    outbox.pump(client.send)  # a fresh outbox asks once: the spool may hold messages from before a restart
    assert spool.lookups == 1
    for _ in range(50):
        outbox.pump(client.send)
    assert spool.lookups == 1 and client.sent == []
    for i in range(3):
        outbox.add(msg(i))
    outbox.pump(client.send)
    assert client.sent == [b"m0", b"m1"]  # the window of 2 is full: m2 waits
    for mid in (1, 2):
        outbox.acked(mid)
        outbox.pump(client.send)
    assert client.sent == [b"m0", b"m1", b"m2"]
    outbox.acked(3)
    looked = spool.lookups
    for _ in range(50):
        outbox.pump(client.send)
    assert spool.lookups == looked  # found empty after m2 went: no more look-ups
    outbox.add(msg(3))
    outbox.pump(client.send)
    assert client.sent[-1] == b"m3"
    outbox.restart()  # a new session: what is unacknowledged (m3) goes again
    outbox.pump(client.send)
    assert client.sent[-2:] == [b"m3", b"m3"]
