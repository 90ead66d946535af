"""Store and forward: durable messages go through a spool and leave it only when the broker has them.

Order is kept: entries are sent oldest first, at most ``max_inflight`` at a
time, and removed from the spool when the broker acknowledges them. After a
reconnect the MQTT client re-sends what was in flight; after a crash or
power loss everything still in the spool is sent again.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from agent.core.actions import Publish


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Spool(Protocol):
    """Ordered, bounded storage of messages waiting for the broker."""

    dropped: int

    def append(self, topic: str, payload: bytes, qos: int, retain: bool, keep: Collection[int] = ()) -> int:
        """Store a message; over the bound, drop (and count) the oldest entries except those in ``keep``."""
        ...

    def after(self, last_id: int, limit: int) -> list[SpoolEntry]: ...

    def remove(self, entry_id: int) -> None: ...

    def __len__(self) -> int: ...


Send = Callable[[str, bytes, int, bool], int]


class Outbox:
    """Moves durable messages from the spool to the broker, in order."""

    def __init__(self, spool: Spool, max_inflight: int = 20) -> None:
        self.spool = spool
        self.max_inflight = max_inflight
        self._inflight: dict[int, int] = {}  # mid -> spool id
        self._sent_upto = 0  # highest spool id handed to the client since the last (re)start
        # The spool held nothing after _sent_upto when last asked, and nothing was added since: pump need not
        # ask again (it runs after every received message; asking SQLite each time cost a query per chunk).
        self._drained = False

    def add(self, publish: Publish) -> None:
        # Entries in flight are with the MQTT client, which re-sends them after a reconnect: evicting them
        # would count as dropped messages that still arrive, so the bound spares them (at most max_inflight).
        self.spool.append(publish.topic, publish.payload, publish.qos, publish.retain, keep=self._inflight.values())
        self._drained = False

    def pump(self, send: Send) -> int:
        """Send waiting entries while the in-flight window has room; returns how many were sent."""
        sent = 0
        while not self._drained and len(self._inflight) < self.max_inflight:
            batch = self.spool.after(self._sent_upto, self.max_inflight - len(self._inflight))
            if not batch:
                self._drained = True
                break
            for entry in batch:
                mid = send(entry.topic, entry.payload, entry.qos, entry.retain)
                if mid == 0:
                    return sent  # offline: try again after the next connect
                self._sent_upto = entry.id
                sent += 1
                if entry.qos == 0 or mid < 0:
                    self.spool.remove(entry.id)
                else:
                    self._inflight[mid] = entry.id
        return sent

    def acked(self, mid: int) -> bool:
        """The broker has message ``mid``: drop it from the spool. True if it was ours."""
        entry_id = self._inflight.pop(mid, None)
        if entry_id is None:
            return False
        self.spool.remove(entry_id)
        return True

    def restart(self) -> None:
        """Forget what was in flight (a new client session): everything spooled is sent again."""
        self._inflight.clear()
        self._sent_upto = 0
        self._drained = False

    @property
    def inflight(self) -> int:
        return len(self._inflight)
