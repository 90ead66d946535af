"""The spool's bound spares messages in flight: the MQTT client re-sends those after a reconnect, so
evicting them would count as dropped messages that still arrive (the drop count must be exact)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.core.actions import Publish
from agent.core.outbox import Outbox
from agent.telemetry.spool import MemorySpool, SqliteSpool


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_messages_in_flight_are_not_evicted(kind: str, tmp_path: Path) -> None:
    spool = MemorySpool(max_messages=3) if kind == "memory" else SqliteSpool(tmp_path / "s.db", max_messages=3)
    outbox = Outbox(spool, max_inflight=2)
    sent: list[bytes] = []

    def send(topic: str, payload: bytes, qos: int, retain: bool) -> int:
        sent.append(payload)
        return len(sent)

    outbox.add(Publish("t", b"m0", durable=True))
    outbox.add(Publish("t", b"m1", durable=True))
    outbox.pump(send)  # m0 and m1 are now with the client, unacknowledged (then the link drops)
    for i in range(2, 7):
        outbox.add(Publish("t", f"m{i}".encode(), durable=True))
    kept = [e.payload for e in spool.after(0, 10)]
    assert kept == [b"m0", b"m1", b"m6"]  # the oldest *waiting* ones went: m2..m5
    assert spool.dropped == 4
    # The client re-sends m0 and m1 after the reconnect; their acks clear them; m6 follows.
    assert outbox.acked(1) and outbox.acked(2)
    outbox.pump(send)
    assert sent == [b"m0", b"m1", b"m6"] and spool.dropped == 4
