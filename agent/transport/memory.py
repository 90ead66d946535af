"""An in-process broker and transport with MQTT's delivery semantics, for unit and contract tests.

Messages are delivered in FIFO order on the publisher's thread; retained
messages and last wills behave as on a real broker. There is no network, so
there is no loss: fault injection belongs to the real-broker tests.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from agent.transport.base import Will
from wire.topics import matches


class MemoryBroker:
    """Routes messages between MemoryTransports."""

    def __init__(self) -> None:
        self._clients: dict[str, MemoryTransport] = {}
        self._retained: dict[str, bytes] = {}
        self._queue: deque[tuple[MemoryTransport, str, bytes]] = deque()
        self._dispatching = False
        self._lock = threading.RLock()
        self.published = 0

    def _attach(self, client: MemoryTransport) -> None:
        with self._lock:
            old = self._clients.get(client.client_id)
            if old is not None and old is not client:
                old._kicked()
            self._clients[client.client_id] = client

    def _detach(self, client: MemoryTransport, will: Will | None) -> None:
        with self._lock:
            if self._clients.get(client.client_id) is client:
                del self._clients[client.client_id]
        if will is not None:
            self.publish(will.topic, will.payload, will.retain)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        with self._lock:
            self.published += 1
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            for client in list(self._clients.values()):
                if any(matches(f, topic) for f in client._subs):
                    self._queue.append((client, topic, payload))
            self._drain()

    def _deliver_retained(self, client: MemoryTransport, filter_: str) -> None:
        with self._lock:
            for topic, payload in self._retained.items():
                if matches(filter_, topic):
                    self._queue.append((client, topic, payload))
            self._drain()

    def _drain(self) -> None:
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self._queue:
                client, topic, payload = self._queue.popleft()
                if client.connected:
                    client._deliver(topic, payload)
        finally:
            self._dispatching = False

    def retained(self, topic: str) -> bytes | None:
        return self._retained.get(topic)


class MemoryTransport:
    """A client of MemoryBroker implementing ``agent.transport.base.Transport``."""

    def __init__(self, broker: MemoryBroker, client_id: str, will: Will | None = None) -> None:
        self.broker = broker
        self.client_id = client_id
        self.will = will
        self._subs: dict[str, int] = {}
        self._connected = False
        self._mid = 0
        self.on_connect: Callable[[], None] | None = None
        self.on_disconnect: Callable[[str], None] | None = None
        self.on_message: Callable[[str, bytes], None] | None = None
        self.on_published: Callable[[int], None] | None = None

    @property
    def connected(self) -> bool:
        return self._connected

    def start(self) -> None:
        self.broker._attach(self)
        self._connected = True
        if self.on_connect is not None:
            self.on_connect()
        for f in list(self._subs):
            self.broker._deliver_retained(self, f)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> int:
        if not self._connected:
            return 0
        self._mid += 1
        mid = self._mid
        self.broker.publish(topic, payload, retain)
        if self.on_published is not None:
            self.on_published(mid)
        return mid

    def subscribe(self, filter_: str, qos: int = 1) -> None:
        self._subs[filter_] = qos
        if self._connected:
            self.broker._deliver_retained(self, filter_)

    def unsubscribe(self, filter_: str) -> None:
        self._subs.pop(filter_, None)

    def stop(self) -> None:
        """Clean disconnect: no will."""
        self._connected = False
        self.broker._detach(self, None)

    def abort(self) -> None:
        """Unclean disconnect: the broker publishes the will."""
        self._connected = False
        self.broker._detach(self, self.will)

    def _kicked(self) -> None:
        self._connected = False
        if self.on_disconnect is not None:
            self.on_disconnect("session taken over")

    def _deliver(self, topic: str, payload: bytes) -> None:
        if self.on_message is not None:
            self.on_message(topic, payload)
