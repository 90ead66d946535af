"""Sending chunks: one broadcast per artifact, paced by the devices, and repairs to single devices.

Why pacing: a stock mosquitto keeps at most ``max_queued_messages`` (1000)
QoS 1 messages for a slow subscriber and silently drops the rest while the
publisher still gets every acknowledgement. So the broadcast never runs more
than ``window`` chunks ahead of the slowest device that is still making
progress (its ``contiguous`` count); a device that stalls is left out of the
pacing and catches up through repairs. Neither does one slow link hold the
others back: a device that stays more than half a window behind the head for
``laggard_after_s`` while another device has every chunk sent so far (it waits
for the slow one) is a laggard, no longer waited for. It keeps reading the
broadcast at its own pace from its queue at the broker, and repairs what the
broker dropped. Repairs go to the device's own topic, at most
``repair_window`` chunks outstanding per device.

Everything here runs on the controller's MQTT event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from controller.registry.store import ArtifactStore, BlobMissing
from wire import chunks as frames
from wire import topics
from wire.manifest import Manifest

log = logging.getLogger(__name__)

#: chunks repairs read ahead in a worker thread per round (256 KiB each by default: 16 MiB at most)
PREFETCH_MAX = 64

PublishTracked = Callable[[str, bytes, Callable[[], None]], bool]


@dataclass
class TransferSettings:
    window: int = 256
    max_inflight: int = 64
    start_grace_s: float = 2.0
    stall_s: float = 5.0
    #: a device this long more than half a window behind while another waits for it stops pacing the broadcast
    laggard_after_s: float = 5.0
    repair_window: int = 256
    repair_inflight: int = 32


class ChunkUnavailable(Exception):
    """A chunk the store cannot supply as the manifest describes it: never sent, the artifact is unusable."""

    def __init__(self, artifact_id: str, index: int, path: str, blob: str, problem: str) -> None:
        super().__init__(f"chunk {index} of {path}: {problem}")
        self.artifact_id = artifact_id
        self.index = index
        self.path = path
        self.blob = blob
        self.problem = problem


#: what the delivery does when a chunk cannot be sent (stop, fail the devices waiting for it, mark, alert)
OnUnavailable = Callable[[ChunkUnavailable], None]


class ChunkSource:
    """Reads chunk ``i`` of an artifact from the content store, checked against the manifest's sha256.

    The check is one sha256 of the chunk (under a millisecond for 256 KiB) the first time a chunk is sent;
    ``verified`` (shared by every source of the artifact) remembers it, so repairs cost no more than before.
    A byte flipped in the store stops the delivery with the reason instead of sending devices a chunk they
    must refuse; one flipped after its check is caught when devices report it damaged (``recheck``).
    """

    def __init__(self, manifest: Manifest, store: ArtifactStore, verified: set[int] | None = None) -> None:
        self.manifest = manifest
        self.store = store
        self.artifact_id = manifest.artifact_id
        self.verified = verified if verified is not None else set()
        #: reads may take milliseconds (a database, a network filesystem): broadcasts make them in a worker thread,
        #: repairs prefetch them there (``prefetch``)
        self.shared = store.shared
        self._prefetched: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self.manifest.chunks)

    def prefetch(self, indices: list[int]) -> None:
        """Read these chunks now (in a worker thread), for ``frame`` to use once; a failed read is left for
        ``frame`` to make again and report."""
        for index in indices:
            if index in self._prefetched:
                continue
            ref = self.manifest.chunks[index]
            with contextlib.suppress(Exception):
                self._prefetched[index] = self.store.read_range(
                    self.manifest.files[ref.file].sha256, ref.offset, ref.size
                )

    def drop_prefetched(self) -> None:
        self._prefetched.clear()

    def frame(self, index: int, recheck: bool = False) -> bytes:
        """The frame of chunk ``index``; ChunkUnavailable when the store's copy is missing or damaged."""
        ref = self.manifest.chunks[index]
        entry = self.manifest.files[ref.file]
        data = None if recheck else self._prefetched.pop(index, None)
        try:
            if data is None:
                data = self.store.read_range(entry.sha256, ref.offset, ref.size)
        except (BlobMissing, OSError) as exc:
            detail = "missing from the store" if isinstance(exc, BlobMissing) else f"unreadable: {exc}"
            raise ChunkUnavailable(self.artifact_id, index, entry.path, entry.sha256, detail) from None
        if len(data) != ref.size:
            problem = f"the store holds {len(data)} of its {ref.size} bytes (truncated)"
            raise ChunkUnavailable(self.artifact_id, index, entry.path, entry.sha256, problem)
        if recheck or index not in self.verified:
            if hashlib.sha256(data).hexdigest() != ref.sha256:
                self.verified.discard(index)
                problem = "does not match its sha256 in the signed manifest (damaged in the controller's store)"
                raise ChunkUnavailable(self.artifact_id, index, entry.path, entry.sha256, problem)
            self.verified.add(index)
        return frames.encode(self.artifact_id, index, data)


@dataclass
class Participant:
    contiguous: int = 0
    have: int = 0
    last_progress_at: float = field(default_factory=time.time)
    downloading: bool = True
    #: subscribed to the broadcast topic (its report said so): the first chunk may go out for it
    listening: bool = False
    #: since when it holds the broadcast back while another device waits (None: it does not)
    behind_since: float | None = None
    #: too slow to wait for: the broadcast no longer paces to it (it reads its broker queue, then repairs)
    laggard: bool = False


class Broadcast:
    """Publishes every chunk of one artifact once on its broadcast topic, paced by its participants."""

    def __init__(
        self,
        source: ChunkSource,
        publish: PublishTracked,
        settings: TransferSettings,
        on_sent: Callable[[int], None],
        expected: set[str] | None = None,
        on_unavailable: OnUnavailable | None = None,
    ) -> None:
        self.source = source
        self.on_unavailable = on_unavailable
        #: devices worth waiting for (up to start_grace_s) before the first chunk goes out
        self.expected = set(expected or ())
        self.publish = publish
        self.settings = settings
        self.on_sent = on_sent
        self.topic = topics.artifact_chunks(source.artifact_id)
        self.participants: dict[str, Participant] = {}
        self.next_index = 0
        self.inflight = 0
        self.generation = 0
        self.created_at = time.time()
        self.finished = False
        #: devices the broadcast stopped waiting for (``_find_laggards``)
        self.laggards = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def poke(self) -> None:
        self._wake.set()

    def join(self, device_id: str) -> None:
        self.participants.setdefault(device_id, Participant())
        self.poke()

    def progress(
        self,
        device_id: str,
        contiguous: int,
        have: int,
        downloading: bool,
        listening: bool = False,
        sparse: bool = False,
    ) -> None:
        """A device's report. A ``sparse`` one asks for its few missing chunks by request (it holds the rest
        from its installed model): it no longer paces the broadcast, as one that finished."""
        downloading = downloading and not sparse
        p = self.participants.setdefault(device_id, Participant())
        if contiguous > p.contiguous or have > p.have or downloading != p.downloading:
            p.last_progress_at = time.time()
        p.contiguous, p.have, p.downloading = contiguous, have, downloading
        p.listening = p.listening or listening
        self.poke()

    def reconnected(self) -> None:
        """paho re-sends what was in flight; stop waiting for acknowledgements of the old session."""
        self.generation += 1
        self.inflight = 0
        self.poke()

    def position(self, now: float) -> int | None:
        """Where the slowest active downloader that is not a laggard is; None when nobody needs the broadcast
        any more."""
        if not any(p.downloading for p in self.participants.values()):
            return None
        active = {
            d: p
            for d, p in self.participants.items()
            if p.downloading and not p.laggard and now - p.last_progress_at < self.settings.stall_s
        }
        if not active:
            return self.next_index  # everyone stalled or too slow: go on; they read their queue and repair
        self._find_laggards(active, now)
        paced = [p.contiguous for p in active.values() if not p.laggard]
        return min(paced) if paced else self.next_index

    def _find_laggards(self, active: dict[str, Participant], now: float) -> None:
        """Mark the devices that have held the broadcast back for ``laggard_after_s`` while another device had
        every chunk sent so far: more than half a window behind the head, continuously. Devices of a fleet
        that all read at the broadcast's pace are never more than half a window apart for long, so this
        leaves out slow links, not the slowest of equals."""
        s = self.settings
        waiting = any(p.contiguous >= self.next_index - max(1, s.window // 8) for p in active.values())
        for device_id, p in active.items():
            if waiting and p.contiguous < self.next_index - s.window // 2:
                if p.behind_since is None:
                    p.behind_since = now
                elif now - p.behind_since >= s.laggard_after_s:
                    p.laggard = True
                    self.laggards += 1
                    log.info(
                        "broadcast of %s: %s is %d chunks behind while others wait: no longer waited for",
                        self.source.artifact_id[:12],
                        device_id,
                        self.next_index - p.contiguous,
                    )
            else:
                p.behind_since = None

    async def _run(self) -> None:
        s = self.settings
        total = len(self.source)
        try:
            # Give the devices a moment to receive the command and subscribe, so few start late.
            deadline = self.created_at + s.start_grace_s
            while time.time() < deadline and not self._all_ready():
                await self._sleep(deadline - time.time())
            while self.next_index < total:
                position = self.position(time.time())
                if position is None:
                    log.info("broadcast of %s: no device needs it any more", self.source.artifact_id[:12])
                    break
                # Every device still following holds the chunks before its ``contiguous`` (copied from the
                # model it runs, or received): start at the first one the slowest lacks, not at 0.
                self.next_index = max(self.next_index, position)
                while (
                    self.next_index < total and self.next_index < position + s.window and self.inflight < s.max_inflight
                ):
                    if self.source.shared:  # a database or network read: off the loop that hears the devices
                        frame = await asyncio.to_thread(self.source.frame, self.next_index)
                    else:
                        frame = self.source.frame(self.next_index)
                    if not self._send(frame):
                        break
                    self.next_index += 1
                if self.next_index < total:
                    await self._sleep(0.25)
            log.info(
                "broadcast of %s: %d of %d chunks sent (%d devices too slow to wait for)",
                self.source.artifact_id[:12],
                self.next_index,
                total,
                self.laggards,
            )
        except asyncio.CancelledError:
            raise
        except ChunkUnavailable as exc:
            log.error("broadcast of %s stopped: %s", self.source.artifact_id[:12], exc)
            if self.on_unavailable is not None:
                self.on_unavailable(exc)
        except Exception:
            log.exception("broadcast of %s failed; devices will repair", self.source.artifact_id[:12])
        finally:
            self.finished = True

    def _all_ready(self) -> bool:
        """Every expected device subscribed (an agent accepts a deployment, then prepares its slot, then
        subscribes and says ``listening``): chunks sent before that would only be repaired later."""
        listening = {d for d, p in self.participants.items() if p.listening or not p.downloading}
        return bool(listening) and self.expected <= listening

    def _send(self, frame: bytes) -> bool:
        generation = self.generation

        def acked() -> None:
            if generation == self.generation:
                self.inflight -= 1
                self._wake.set()

        if not self.publish(self.topic, frame, acked):
            return False
        self.inflight += 1
        self.on_sent(len(frame))
        return True

    async def _sleep(self, timeout: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(timeout, 0.001))


class Repairs:
    """Sends chunks a device asked for to that device alone, a bounded number at a time."""

    def __init__(
        self,
        publish: PublishTracked,
        settings: TransferSettings,
        on_sent: Callable[[int], None],
        on_unavailable: OnUnavailable | None = None,
    ) -> None:
        self.publish = publish
        self.settings = settings
        self.on_sent = on_sent
        self.on_unavailable = on_unavailable
        self._queues: dict[tuple[str, str], deque[int]] = {}
        self._queued: dict[tuple[str, str], set[int]] = {}
        self._inflight: dict[str, int] = {}
        self._sources: dict[str, ChunkSource] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.generation = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def reconnected(self) -> None:
        self.generation += 1
        self._inflight.clear()
        self._wake.set()

    def request(self, device_id: str, source: ChunkSource, ranges: list[tuple[int, int]]) -> int:
        """Queue the chunks in ``ranges`` for ``device_id``; returns how many were added."""
        key = (device_id, source.artifact_id)
        self._sources[source.artifact_id] = source
        queue = self._queues.setdefault(key, deque())
        queued = self._queued.setdefault(key, set())
        added = 0
        total = len(source)
        for start, end in ranges:
            for index in range(max(0, start), min(end, total)):
                if index not in queued and len(queued) < self.settings.repair_window:
                    queue.append(index)
                    queued.add(index)
                    added += 1
        if added:
            self._wake.set()
        return added

    def forget(self, device_id: str) -> None:
        for key in [k for k in self._queues if k[0] == device_id]:
            self._queues.pop(key, None)
            self._queued.pop(key, None)

    def drop_artifact(self, artifact_id: str) -> None:
        """Send nothing more of ``artifact_id`` to anyone (its store copy is damaged)."""
        for key in [k for k in self._queues if k[1] == artifact_id]:
            self._queues.pop(key, None)
            self._queued.pop(key, None)

    async def _run(self) -> None:
        while True:
            try:
                await self._prefetch()
                sent_any = self._send_round()
            except Exception:  # the repair task serves every device: it must outlive one bad round
                log.exception("chunk repairs failed; retrying")
                sent_any = False
            if not sent_any:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.5)

    async def _prefetch(self) -> None:
        """Chunks of shared stores (a database, a network filesystem) the next round will send, read in a worker
        thread (at most ``PREFETCH_MAX`` a round), so the MQTT loop does not wait on them."""
        wanted: dict[str, list[int]] = {}
        budget = PREFETCH_MAX
        for (device_id, artifact_id), queue in list(self._queues.items()):
            source = self._sources.get(artifact_id)
            if source is None or not source.shared or budget <= 0:
                continue
            room = min(budget, self.settings.repair_inflight - self._inflight.get(device_id, 0))
            indices = list(itertools.islice(queue, max(0, room)))
            wanted.setdefault(artifact_id, []).extend(indices)
            budget -= len(indices)
        if not wanted:
            return
        sources = {a: self._sources[a] for a in wanted}

        def read() -> None:
            for artifact_id, indices in wanted.items():
                sources[artifact_id].prefetch(indices)

        await asyncio.to_thread(read)

    def _send_round(self) -> bool:
        sent_any = False
        for (device_id, artifact_id), queue in list(self._queues.items()):
            if (device_id, artifact_id) not in self._queues:
                continue  # dropped in this round (its artifact is damaged)
            source = self._sources[artifact_id]
            topic = topics.chunks(device_id)
            while queue and self._inflight.get(device_id, 0) < self.settings.repair_inflight:
                index = queue[0]
                try:
                    sent = self._send(device_id, topic, source, index)
                except ChunkUnavailable as exc:
                    log.error("repairs of %s stopped: %s", artifact_id[:12], exc)
                    self.drop_artifact(artifact_id)
                    if self.on_unavailable is not None:
                        self.on_unavailable(exc)
                    break
                if not sent:
                    break
                queue.popleft()
                self._queued[(device_id, artifact_id)].discard(index)
                sent_any = True
            if not queue:
                self._queues.pop((device_id, artifact_id), None)
        for source in self._sources.values():
            source.drop_prefetched()  # what a full device could not take: read again next time, memory bounded
        return sent_any

    def _send(self, device_id: str, topic: str, source: ChunkSource, index: int) -> bool:
        frame = source.frame(index)
        generation = self.generation

        def acked() -> None:
            if generation == self.generation:
                self._inflight[device_id] = max(0, self._inflight.get(device_id, 1) - 1)
                self._wake.set()

        if not self.publish(topic, frame, acked):
            return False
        self._inflight[device_id] = self._inflight.get(device_id, 0) + 1
        self.on_sent(len(frame))
        return True
