"""A virtual device's network: its MQTT connection, and the trouble a scenario puts on the link.

* ``SimTransport`` is the agent's ``MqttTransport``; under a bandwidth cap it stops reading its socket
  until the cap allows more bytes, so the kernel's buffers fill and TCP pushes back on the broker, as on
  a slow link (the broker then queues for the device, and the controller's broadcast pacing sees it lag).
* ``DelayLine`` delivers items in order after a delay (latency and jitter; a retransmission timeout for
  a lost packet).
* ``ChunkHashes`` lets the devices of one process share the sha256 of identical broadcast frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from agent.transport.mqtt import MqttTransport

#: bytes of MQTT framing counted per message on top of the payload
MESSAGE_OVERHEAD = 64


class TokenBucket:
    """``rate`` bytes per second with a burst of ``burst`` bytes; debt is allowed and waited off."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(16_384.0, rate * 0.1)
        self.tokens = self.burst
        self._at = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now

    def consume(self, n: float) -> None:
        self._refill()
        self.tokens -= n

    def wait_s(self) -> float:
        """How long until the debt is paid (0: may read now)."""
        self._refill()
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class SimTransport(MqttTransport):
    """``MqttTransport`` whose reads a token bucket can hold back (a bandwidth cap)."""

    def __init__(self, *args: Any, bucket: TokenBucket | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bucket = bucket
        self._paused: asyncio.TimerHandle | None = None

    def account(self, nbytes: int) -> None:
        if self.bucket is not None:
            self.bucket.consume(nbytes + MESSAGE_OVERHEAD)

    def _readable(self, client: Any) -> None:
        bucket = self.bucket
        if bucket is not None and self._paused is None:
            wait = bucket.wait_s()
            if wait > 0:
                sock = self._sock
                if sock is not None:
                    with contextlib.suppress(ValueError, OSError):
                        self._loop.remove_reader(sock)
                    self._paused = self._loop.call_later(wait, self._resume, sock, client)
                return
        super()._readable(client)

    def _resume(self, sock: Any, client: Any) -> None:
        self._paused = None
        if sock is self._sock and self._sock is not None and client is self._client:
            with contextlib.suppress(ValueError, OSError):
                self._loop.add_reader(sock, self._readable, client)

    def abort(self) -> None:
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        super().abort()


class DelayLine:
    """Deliver items to ``sink`` in order, each not before its due time (one timer for the whole line)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sink: Callable[[Any], None]) -> None:
        self._loop = loop
        self._sink = sink
        self._items: deque[tuple[float, Any]] = deque()
        self._last_due = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, delay_s: float, item: Any) -> None:
        due = max(self._loop.time() + delay_s, self._last_due)
        self._last_due = due
        self._items.append((due, item))
        if self._handle is None:
            self._handle = self._loop.call_at(due, self._drain)

    def _drain(self) -> None:
        self._handle = None
        now = self._loop.time()
        while self._items and self._items[0][0] <= now + 1e-4:
            _, item = self._items.popleft()
            self._sink(item)
        if self._items:
            self._handle = self._loop.call_at(self._items[0][0], self._drain)

    def take_all(self) -> list[Any]:
        """Everything not yet delivered, in order; the line is empty afterwards."""
        items = [item for _, item in self._items]
        self.clear()
        return items

    def clear(self) -> None:
        """Everything in flight is lost (the link went down)."""
        self._items.clear()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class ChunkHashes:
    """sha256 of chunk payloads, shared by the devices of a process.

    Every device of a wave receives the same broadcast frame; hashing it once per process instead of
    once per device is what lets one core run a thousand downloads. The cache is keyed by length and
    CRC-32 of the bytes, so a corrupted copy (the simulator flips a byte) never matches a cached entry:
    CRC-32 detects every error burst of up to 32 bits.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple[int, int], str] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __call__(self, data: bytes | memoryview) -> str:
        key = (len(data), zlib.crc32(data))
        digest = self._cache.get(key)
        if digest is not None:
            self.hits += 1
            return digest
        self.misses += 1
        digest = hashlib.sha256(data).hexdigest()
        self._cache[key] = digest
        if len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return digest
