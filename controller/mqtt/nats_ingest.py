"""Device traffic over NATS's own protocol, shared between controller replicas by a queue group.

NATS's MQTT gateway speaks MQTT 3.1.1, without ``$share`` subscriptions: several controllers each subscribing
over MQTT would each store every message. Every MQTT publish is also a NATS message, though, on the subject the
topic maps to (``slmfleet/v1/dev/pump-7/telemetry`` is ``slmfleet.v1.dev.pump-7.telemetry``), and NATS spreads
the messages of a subject over the members of a queue group: each telemetry message and event reaches one
replica. A subscription without a group reaches every replica: state messages (births and wills), which the
runtime also takes over MQTT (retained births arrive on subscribing, the persistent session keeps those sent
while the controller was away), handling the first copy of each (``StateDedup``).

The client is nats-py (asyncio), on a loop of its own in the ``nats-ingest`` thread. Each message goes to
``deliver(topic, payload)`` with its MQTT topic restored; the runtime passes a function that hands it to the MQTT
bridge's loop, where the same handler the MQTT subscription feeds takes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


def topic_to_subject(topic: str) -> str:
    """The NATS subject of an MQTT topic or filter, as NATS's MQTT gateway maps it (nats-server >= 2.10 for '.').

    ``/`` separates levels in MQTT and ``.`` in NATS; a ``.`` inside an MQTT level becomes ``//``; the wildcards
    ``+`` and ``#`` become ``*`` and ``>``. Topics with empty levels (leading, trailing or double ``/``), which
    slmfleet never uses, are refused."""
    levels = topic.split("/")
    if any(level == "" for level in levels):
        raise ValueError(f"topic {topic!r} has an empty level: not mapped to a NATS subject")
    out = []
    for level in levels:
        if level == "+":
            out.append("*")
        elif level == "#":
            out.append(">")
        else:
            out.append(level.replace(".", "//"))
    return ".".join(out)


def subject_to_topic(subject: str) -> str:
    """The MQTT topic of a NATS subject (the inverse of ``topic_to_subject`` for a topic without wildcards)."""
    return subject.replace("//", "\0").replace(".", "/").replace("\0", ".")


@dataclass(frozen=True)
class NatsSubscription:
    """One subject filter, with the queue group its messages are shared in (None: every replica gets them)."""

    subject: str
    queue: str | None


def ingest_subscriptions(filters: Sequence[tuple[str, int]]) -> list[NatsSubscription]:
    """MQTT subscriptions as NATS ones: a shared one (``$share/{group}/{filter}``) in queue group ``group``."""
    out = []
    for filter_, _qos in filters:
        group: str | None = None
        if filter_.startswith("$share/"):
            _, group, filter_ = filter_.split("/", 2)
        out.append(NatsSubscription(topic_to_subject(filter_), group))
    return out


class StateDedup:
    """The state messages (births, wills) a controller receives twice, over NATS and over MQTT: per topic, the
    digest of the last one handled; the same bytes again are a copy (a birth carries its connection's id and time,
    so a new birth never matches the previous one). Used on one thread (the MQTT loop's)."""

    def __init__(self) -> None:
        self._last: dict[str, bytes] = {}

    def fresh(self, topic: str, payload: bytes) -> bool:
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        if self._last.get(topic) == digest:
            return False
        self._last[topic] = digest
        return True


class Handoff:
    """Messages from the NATS thread to another loop, a batch per wake-up: ``put`` appends and schedules one
    drain through ``call_soon`` (thread-safe) unless one is pending; the drain calls ``handler`` in order."""

    def __init__(self, call_soon: Callable[[Callable[[], None]], None], handler: Callable[[str, bytes], None]) -> None:
        self._call_soon = call_soon
        self._handler = handler
        self._queue: deque[tuple[str, bytes]] = deque()
        self._scheduled = False

    def put(self, topic: str, payload: bytes) -> None:
        self._queue.append((topic, payload))
        if not self._scheduled:
            self._scheduled = True
            self._call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False  # from here on a put schedules another drain (which may find nothing left)
        queue, handler = self._queue, self._handler
        while queue:
            topic, payload = queue.popleft()
            handler(topic, payload)


class NatsIngest:
    """Subscribes on NATS (reconnecting through every server given) and delivers messages to ``deliver``."""

    def __init__(
        self,
        servers: Sequence[str],
        subscriptions: Sequence[NatsSubscription],
        deliver: Callable[[str, bytes], None],
        *,
        name: str = "slmfleet-controller",
        user: str | None = None,
        password: str | None = None,
        reconnect_wait_s: float = 0.5,
        on_connection_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.servers = list(servers)
        self.subscriptions = list(subscriptions)
        self.deliver = deliver
        self.name = name
        self.user = user
        self.password = password
        self.reconnect_wait_s = reconnect_wait_s
        self.on_connection_change = on_connection_change
        #: messages received, and of them those of a queue group (shared with the other replicas)
        self.received = 0
        self.shared_received = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._nc: Any = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self.connected_url: str | None = None

    @property
    def connected(self) -> bool:
        nc = self._nc
        return bool(nc is not None and nc.is_connected)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nats-ingest", daemon=True)
        self._thread.start()

    def wait_subscribed(self, timeout: float) -> bool:
        """Until the subscriptions are in place on a server (True), or ``timeout``."""
        return self._ready.wait(timeout)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        import nats  # the controller extra; imported here so the MQTT-only controller does not need it

        self._stop = asyncio.Event()
        options: dict[str, Any] = {
            "servers": self.servers,
            "name": self.name,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": self.reconnect_wait_s,
            "connect_timeout": 2,
            "disconnected_cb": self._disconnected,
            "reconnected_cb": self._reconnected,
            "error_cb": self._error,
        }
        if self.user is not None:
            options["user"], options["password"] = self.user, self.password
        attempt = 0
        while not self._stop.is_set():  # the first connection: nats-py only retries once it was connected
            try:
                self._nc = await nats.connect(**options)
                break
            except Exception as exc:  # no server answered: try again with a capped backoff
                if attempt == 0:
                    log.warning("NATS ingest: cannot reach %s: %s (retrying)", ",".join(self.servers), exc)
                attempt += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), min(5.0, self.reconnect_wait_s * 2**attempt))
        if self._nc is None:
            return
        for sub in self.subscriptions:
            # nats-py subscribes again by itself after each reconnect, in the same queue group
            callback = self._on_shared_msg if sub.queue else self._on_msg
            await self._nc.subscribe(sub.subject, queue=sub.queue or "", cb=callback)
        await self._nc.flush()
        self.connected_url = str(self._nc.connected_url.netloc) if self._nc.connected_url else None
        log.info(
            "NATS ingest: subscribed on %s (%s)",
            self.connected_url,
            ", ".join(f"{s.subject}{' queue ' + s.queue if s.queue else ''}" for s in self.subscriptions),
        )
        self._ready.set()
        if self.on_connection_change is not None:
            self.on_connection_change(True)
        await self._stop.wait()
        try:
            await self._nc.drain()  # what the server already sent us is delivered before closing
        except Exception as exc:
            log.debug("NATS ingest drain: %s", exc)

    async def _on_msg(self, msg: Any) -> None:
        self.received += 1
        try:
            self.deliver(subject_to_topic(msg.subject), msg.data)
        except Exception:
            log.exception("NATS ingest: delivering %s failed", msg.subject)

    async def _on_shared_msg(self, msg: Any) -> None:
        self.shared_received += 1
        await self._on_msg(msg)

    async def _disconnected(self) -> None:
        log.warning("NATS ingest: disconnected; reconnecting through %s", ",".join(self.servers))
        if self.on_connection_change is not None:
            self.on_connection_change(False)

    async def _reconnected(self) -> None:
        nc = self._nc
        self.connected_url = str(nc.connected_url.netloc) if nc is not None and nc.connected_url else None
        log.info("NATS ingest: reconnected to %s", self.connected_url)
        if self.on_connection_change is not None:
            self.on_connection_change(True)

    async def _error(self, exc: Exception) -> None:
        # a slow consumer (more than nats-py's pending limit waiting: 512 Ki messages, 128 MiB) loses messages
        level = logging.WARNING if "slow consumer" in str(exc).lower() else logging.DEBUG
        log.log(level, "NATS ingest: %s", exc)

    def stop(self, timeout: float = 5.0) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
