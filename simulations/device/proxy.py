"""The link of a real agent: a loopback TCP proxy between it and the broker that the runner controls.

A real agent whose scenario faults touch its link (``latency``, ``loss``, ``bandwidth``, ``disconnect``)
connects to its own listening port here instead of the broker's; every byte it exchanges with the broker
then passes one asyncio event loop (a thread of the runner) that can

* delay it: one-way latency with jitter in each direction, order kept (a TCP stream never reorders);
* hold it back as TCP does for a lost segment: with probability ``loss`` a read waits ``rto_ms`` more;
* cap it: the broker-to-agent direction at ``bytes_per_s`` (what a slow link does to a download);
* cut it: every connection of the agent is aborted (no goodbye: the broker sends the will) and new ones
  are refused until the partition ends, after which the agent's own reconnect gets through.

Loopback only, bounded: reads of at most ``READ_BYTES`` and a bounded queue per direction (a full queue
stops reading, so a capped link pushes back on the sender as a real one does).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from dataclasses import dataclass, field

#: largest read forwarded at once (small enough that a bandwidth cap paces a download smoothly)
READ_BYTES = 16384
#: reads queued per direction before the proxy stops reading that side
QUEUE_READS = 64


@dataclass
class LinkState:
    """What the link of one agent does now (the runner sets it from the scenario's active faults)."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    rto_ms: float = 200.0
    bytes_per_s: float | None = None
    #: monotonic time until which the link is cut (0: up)
    down_until: float = 0.0
    connections: int = 0
    refused: int = 0
    cuts: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    delayed_reads: int = 0
    _open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = field(default_factory=set, repr=False)


class LinkProxy:
    """One listening port per agent on 127.0.0.1, each forwarding to the broker at ``upstream``."""

    def __init__(self, upstream_host: str, upstream_port: int, seed: int = 0) -> None:
        if upstream_host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"the link proxy forwards to loopback only, not {upstream_host}")
        self.upstream = (upstream_host, upstream_port)
        self.links: dict[str, LinkState] = {}
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.Server] = []
        self._thread = threading.Thread(target=self._loop.run_forever, name="real-agents-links", daemon=True)
        self._thread.start()

    def _call(self, coro: object, timeout: float = 10.0) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    def add(self, device_id: str) -> int:
        """Open the agent's port (a free one on 127.0.0.1) and return it."""
        link = self.links.setdefault(device_id, LinkState())

        async def open_server() -> int:
            server = await asyncio.start_server(
                lambda r, w: self._serve(link, r, w), "127.0.0.1", 0, limit=READ_BYTES * 2
            )
            self._servers.append(server)
            return int(server.sockets[0].getsockname()[1])

        return int(self._call(open_server()))  # type: ignore[call-overload]

    def configure(
        self,
        device_id: str,
        *,
        latency_ms: float = 0.0,
        jitter_ms: float = 0.0,
        loss: float = 0.0,
        rto_ms: float = 200.0,
        bytes_per_s: float | None = None,
    ) -> None:
        """The link's delay, loss and cap from now on (plain assignments: the loop reads them per read)."""
        link = self.links[device_id]
        link.latency_ms, link.jitter_ms, link.loss, link.rto_ms = latency_ms, jitter_ms, loss, rto_ms
        link.bytes_per_s = bytes_per_s

    def cut(self, device_id: str, down_s: float) -> None:
        """A partition of ``down_s`` seconds: abort the agent's connections, refuse new ones until it ends."""
        link = self.links[device_id]

        async def abort() -> None:
            link.down_until = time.monotonic() + down_s
            link.cuts += 1
            for pair in list(link._open):
                for writer in pair:
                    writer.transport.abort()
            link._open.clear()

        self._call(abort())

    def stop(self) -> None:
        async def close() -> None:
            for server in self._servers:
                server.close()
            for link in self.links.values():
                for pair in list(link._open):
                    for writer in pair:
                        writer.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    # ------------------------------------------------------------- the loop --

    async def _serve(self, link: LinkState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < link.down_until:
            link.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream, limit=READ_BYTES * 2)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        link._open.add(pair)
        link.connections += 1
        try:
            await asyncio.gather(
                self._pipe(link, reader, up_writer, down=False),
                self._pipe(link, up_reader, writer, down=True),
                return_exceptions=True,
            )
        finally:
            link._open.discard(pair)
            for w in pair:
                w.transport.abort()

    def _delay_s(self, link: LinkState) -> float:
        delay = link.latency_ms
        if link.jitter_ms:
            delay += self._rng.uniform(-link.jitter_ms, link.jitter_ms)
        if link.loss and self._rng.random() < link.loss:
            delay += link.rto_ms
            link.delayed_reads += 1
        return max(0.0, delay) / 1000.0

    async def _pipe(self, link: LinkState, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, down: bool) -> None:
        """Forward ``src`` to ``dst`` in order, each read after its delay, the downlink under the cap."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_READS)

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if down and link.bytes_per_s:
                    await asyncio.sleep(len(data) / link.bytes_per_s)
                dst.write(data)
                await dst.drain()
                if down:
                    link.bytes_down += len(data)
                else:
                    link.bytes_up += len(data)

        sender = asyncio.create_task(deliver())
        last_due = 0.0
        try:
            while data := await src.read(READ_BYTES):
                last_due = max(last_due, loop.time() + self._delay_s(link))
                await queue.put((last_due, data))
            await queue.put(None)
            await sender
        finally:
            sender.cancel()
            dst.transport.abort()
