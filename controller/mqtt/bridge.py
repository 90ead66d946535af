"""The controller's MQTT connection, on its own asyncio loop in its own thread."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence

from agent.transport.mqtt import MqttConfig, MqttTransport

log = logging.getLogger(__name__)


class MqttBridge:
    """Owns one MqttTransport; ``publish`` is safe from any thread."""

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        on_message: Callable[[str, bytes], None],
        subscriptions: list[tuple[str, int]],
        on_connection_change: Callable[[bool], None] | None = None,
        on_oversize: Callable[[str, int], None] | None = None,
        on_reconnect: Sequence[Callable[[], None]] = (),
    ) -> None:
        """``on_reconnect``: called in order on the loop thread after each (re)connection."""
        self.config = config
        self.client_id = client_id
        self._on_message = on_message
        self._subscriptions = subscriptions
        self._on_change = on_connection_change
        self._on_oversize = on_oversize
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self.transport: MqttTransport | None = None
        self.connected_since: float | None = None
        self._acks: dict[int, Callable[[], None]] = {}
        self.on_reconnect = list(on_reconnect)

    @property
    def connected(self) -> bool:
        return bool(self.transport and self.transport.connected)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()
        self._started.wait(10)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        transport = self.transport = MqttTransport(
            self.config,
            self.client_id,
            loop=loop,
            name="controller",
            on_message=self._on_message,
            on_connect=self._connected,
            on_disconnect=self._disconnected,
            on_published=self._published,
            on_oversize=self._on_oversize,
        )
        for filter_, qos in self._subscriptions:
            transport.subscribe(filter_, qos)
        transport.start()
        self._started.set()
        loop.run_forever()
        loop.close()

    def _connected(self) -> None:
        self.connected_since = time.time()
        for callback in list(self.on_reconnect):
            try:
                callback()
            except Exception:
                log.exception("reconnect hook failed")
        log.info(
            "controller connected to broker %s (MQTT %s)",
            self.transport and self.transport.server_url,
            self.transport and self.transport.protocol,
        )
        if self._on_change is not None:
            self._on_change(True)

    def _disconnected(self, reason: str) -> None:
        self.connected_since = None
        if self._on_change is not None:
            self._on_change(False)

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connected:
                return True
            time.sleep(0.02)
        return self.connected

    def _published(self, mid: int) -> None:
        callback = self._acks.pop(mid, None)
        if callback is not None:
            callback()

    def publish_tracked(self, topic: str, payload: bytes, on_ack: Callable[[], None], qos: int = 1) -> bool:
        """Publish from the loop thread and call ``on_ack`` when the broker has it. False when offline."""
        if self.transport is None:
            return False
        mid = self.transport.publish(topic, payload, qos, False)
        if mid == 0:
            return False
        if mid < 0 or qos == 0:
            on_ack()
        else:
            self._acks[mid] = on_ack
        return True

    def forget_acks(self) -> None:
        """After a reconnect paho re-sends what was unacknowledged; waiters start over."""
        self._acks.clear()

    def call_soon(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` on the MQTT loop (from any thread)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        if self.transport is None:
            return 0
        return self.transport.publish(topic, payload, qos, retain)

    def stop(self, timeout: float = 5.0) -> None:
        loop, transport = self._loop, self.transport
        if loop is None or transport is None or loop.is_closed():
            return
        future = asyncio.run_coroutine_threadsafe(transport.stop(), loop)
        try:
            future.result(timeout)
        except Exception as exc:
            log.debug("mqtt stop: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
