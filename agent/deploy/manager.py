"""The sans-IO deployment manager: commands, chunk frames, job results and the time in; actions out.

It owns the state machine (``states.TRANSITIONS``) and the persisted record. Every method that changes
the state persists the record *before* returning the actions (events, subscriptions, jobs) that the
driver then carries out, so whatever a crash interrupts, the record names a step that can be resumed.

Chunk frames are checked and written here, on the network thread: one sha256 of at most a chunk and
one positioned write. Everything heavier (allocating, copying, fsync, hashing files, loading models)
is a job for the driver's worker thread.

Not thread-safe: the driver calls it from one thread (the event loop).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.core.core import DeployCommand, Unsubscribe
from agent.deploy import faults
from agent.deploy.actions import (
    Action,
    Checkpoint,
    Checkpointed,
    Discard,
    InstalledChanged,
    Prepare,
    Prepared,
    Publish,
    Release,
    Released,
    Result,
    Serve,
    Served,
    ShadowReport,
    StartShadow,
    StopShadow,
    Subscribe,
    Switch,
    Switched,
    Verified,
    Verify,
)
from agent.deploy.bitmap import ChunkBitmap, ranges
from agent.deploy.config import DeployConfig
from agent.deploy.delta import goes_sparse
from agent.deploy.errors import StorageError
from agent.deploy.ids import artifact_id
from agent.deploy.record import DeploymentRecord, PersistedState, RecordStore, SeenDeployment
from agent.deploy.states import BEFORE_SWITCH, FINAL, Event, resumable, transition
from agent.deploy.storage import SLOTS, SlotMeta, SlotStorage, installed_models, other_slot
from agent.deploy.verify import VerificationError, check_manifest, verify_grant
from wire import chunks, codec, topics
from wire.manifest import SignedManifest
from wire.messages import (
    Activate,
    Cancel,
    ChunkRequest,
    CommandAck,
    Commit,
    Deploy,
    DeploymentEvent,
    DeployState,
    InstalledModel,
    Rollback,
)

log = logging.getLogger(__name__)

S = DeployState
_BROADCAST_FILTER = f"{topics.ARTIFACT_PREFIX}/+/chunks"
_MAX_STATES = 64


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class DeploymentManager:
    """One device's deployments. Call ``start(now)`` once, then feed it; execute what it returns."""

    def __init__(
        self,
        device_id: str,
        storage: SlotStorage,
        records: RecordStore,
        key: Ed25519PublicKey | None,
        config: DeployConfig | None = None,
        *,
        hash_chunk: Callable[[bytes | memoryview], str] = sha256_hex,
    ) -> None:
        """``hash_chunk`` lets a simulator of thousands of devices share one hash per broadcast frame."""
        self.device_id = device_id
        self._hash_chunk = hash_chunk
        self.storage = storage
        self.records = records
        self.key = key
        self.config = config or DeployConfig()
        self.persisted: PersistedState = records.load()
        self.counters: Counter[str] = Counter()
        self.drops = codec.DropCounter(log)
        self._events_topic = topics.events(device_id)
        self._repair_topic = topics.chunks(device_id)
        self._token = 0
        self._awaiting: int | None = None  # the job result the current state waits for
        self._serve_token: int | None = None
        self._fallback_token: int | None = None
        self._started_at = 0.0
        self._pending: list[DeployCommand] = []
        self._reset_download()

    def _reset_download(self) -> None:
        self._signed: SignedManifest | None = None
        self._signed_id = ""
        self._bitmap: ChunkBitmap | None = None
        #: chunks received, checked and written by this process in this download (not read back to verify)
        self._fresh: ChunkBitmap | None = None
        self._prepared = False
        self._download_token = -1
        self._subscribed: str | None = None
        self._outstanding: dict[int, float] = {}
        #: chunks that arrived and failed their sha256 since the last request: the controller hears of them
        self._bad: set[int] = set()
        self._repair_mode = False
        #: asks for its few missing chunks instead of following the broadcast (``delta.goes_sparse``)
        self._sparse = False
        self._last_chunk_at = 0.0
        self._last_progress_at = -math.inf
        self._progress_dirty = False
        self._progress_count = 0  # chunks held at the last progress report
        self._shadow_deadline: float | None = None

    # ------------------------------------------------------------ reads --

    @property
    def record(self) -> DeploymentRecord | None:
        return self.persisted.record

    @property
    def state(self) -> DeployState:
        rec = self.record
        return rec.state if rec is not None else S.IDLE

    @property
    def bitmap(self) -> ChunkBitmap | None:
        return self._bitmap

    def installed(self) -> list[InstalledModel]:
        """The true installed models: the active pointer and the slots' metadata."""
        return installed_models(self.storage)

    def handles(self, topic: str) -> bool:
        """True for chunk topics: this device's repair topic and any artifact broadcast."""
        return topic == self._repair_topic or topics.matches(_BROADCAST_FILTER, topic)

    # ------------------------------------------------------- persistence --

    def _persist(self, now: float) -> None:
        rec = self.record
        if rec is not None:
            rec.updated_at = now
        self.records.save(self.persisted)

    def _bump_seq(self) -> int:
        self.persisted.seq += 1
        return self.persisted.seq

    def _next_token(self) -> int:
        self._token += 1
        return self._token

    def _await(self) -> int:
        self._awaiting = self._next_token()
        return self._awaiting

    def _remember(self, rec: DeploymentRecord) -> None:
        seen = self.persisted.seen
        seen.pop(rec.deployment_id, None)
        seen[rec.deployment_id] = SeenDeployment(artifact_id=rec.artifact_id, state=rec.state, reason=rec.reason)
        while len(seen) > self.config.history_size:
            del seen[next(iter(seen))]

    # ------------------------------------------------------- transitions --

    def _transition(
        self,
        rec: DeploymentRecord,
        event: Event,
        now: float,
        *,
        reason: str | None = None,
        metrics: dict[str, float] | None = None,
    ) -> list[Action]:
        """Apply ``event`` from the table, persist, and return the event to publish (durable)."""
        new = transition(rec.state, event)
        log.info(
            "deployment %s (artifact %s): %s --%s--> %s%s",
            rec.deployment_id,
            rec.artifact_id[:12],
            rec.state.value,
            event.value,
            new.value,
            f": {reason}" if reason else "",
        )
        rec.state = new
        rec.states = [*rec.states, new][-_MAX_STATES:]
        if event != Event.RESUME:
            rec.starts = 0
        if reason is not None:
            rec.reason = reason[:4096]
        if metrics:
            rec.metrics.update({k: float(v) for k, v in metrics.items() if math.isfinite(v)})
        if new in FINAL or new == S.ACTIVE:
            self._remember(rec)
        seq = self._bump_seq()
        self._persist(now)
        if event != Event.RESUME:  # fault tests only (an env var): die right after entering ``new``
            faults.crash_point(new.value, getattr(self.records, "root", None))
        return [self._event(rec, now, seq)]

    def _event(self, rec: DeploymentRecord, now: float, seq: int, *, progress: bool = False) -> Publish:
        total = self._total(rec)
        if rec.state == S.DOWNLOADING:
            have = self._bitmap.count if self._bitmap is not None else 0
            contiguous = self._bitmap.contiguous if self._bitmap is not None else 0
        elif rec.state in (S.VERIFYING, S.STAGED, S.SHADOW, S.ACTIVATING, S.ACTIVE) and rec.kind == "deploy":
            have = contiguous = total
        else:
            have = contiguous = 0
        installed = None
        if rec.state in (S.ACTIVE, S.ROLLED_BACK, S.FAILED, S.CANCELLED):
            current = self.installed()
            installed = current[0] if current and current[0].active else None
        metrics = {} if progress else dict(list(rec.metrics.items())[:64])
        msg = DeploymentEvent(
            ts=now,
            seq=seq,
            deployment_id=rec.deployment_id,
            artifact_id=rec.artifact_id,
            state=rec.state,
            progress=min(1.0, have / total) if total else 0.0,
            chunks_have=have,
            chunks_total=total,
            contiguous=contiguous,
            listening=rec.state == S.DOWNLOADING and self._subscribed is not None,
            sparse=rec.state == S.DOWNLOADING and self._sparse,
            reason=rec.reason,
            installed=installed,
            metrics=metrics,
        )
        return Publish(self._events_topic, codec.encode(msg), qos=1, durable=True)

    def _total(self, rec: DeploymentRecord) -> int:
        signed = self._manifest_of(rec)
        return len(signed.manifest.chunks) if signed is not None else 0

    def _refuse(self, command_id: str, detail: str, now: float) -> list[Action]:
        log.warning("command %s refused: %s", command_id, detail)
        msg = CommandAck(ts=now, seq=self._bump_seq(), command_id=command_id, ok=False, detail=detail[:4096])
        self._persist(now)
        return [Publish(self._events_topic, codec.encode(msg), qos=1, durable=True)]

    def _manifest_of(self, rec: DeploymentRecord) -> SignedManifest | None:
        """The signed manifest of ``rec``'s artifact: in memory, in the record store, or in a slot."""
        if self._signed is not None and self._signed_id == rec.artifact_id:
            return self._signed
        signed = self.records.load_manifest(rec.artifact_id)
        if signed is None:
            for slot in SLOTS:
                meta = self.storage.meta(slot)
                if meta is not None and meta.artifact_id == rec.artifact_id:
                    signed = meta.signed
                    break
        if signed is not None and rec is self.record:
            self._set_signed(signed, rec.artifact_id)
        return signed

    def _set_signed(self, signed: SignedManifest | None, artifact: str = "") -> None:
        self._signed = signed
        self._signed_id = artifact

    def _active_meta(self) -> SlotMeta | None:
        active = self.storage.active_slot()
        return self.storage.meta(active) if active is not None else None

    # ------------------------------------------------------------- start --

    def start(self, now: float) -> list[Action]:
        """After the agent (re)started: resume the persisted deployment and serve the active slot.

        The crash-loop guard counts starts in the same state without progress; beyond
        ``config.max_starts`` the deployment is given up and the previous model kept or restored.
        """
        self._started_at = now
        actions: list[Action] = []
        rec = self.record
        if rec is not None and resumable(rec.state) and not (rec.state == S.ACTIVE and rec.committed):
            rec.starts += 1
            self._persist(now)
            if rec.starts > self.config.max_starts:
                actions += self._crash_loop(rec, now)
            else:
                actions += self._resume(rec, now)
        active = self.storage.active_slot()
        if active is not None and not any(isinstance(a, Switch) for a in actions):
            meta = self.storage.meta(active)
            if meta is not None:
                self._serve_token = self._next_token()
                # Serve first: the jobs run in order, and the device should answer requests soon.
                actions.insert(0, Serve(self._serve_token, active, meta.signed))
        return actions

    def _resume(self, rec: DeploymentRecord, now: float) -> list[Action]:
        signed = self._manifest_of(rec)
        if signed is None and rec.state in (*BEFORE_SWITCH, S.ACTIVATING):
            return self._fail(rec, "the deployment's manifest was lost while the agent was down", now)
        actions = self._transition(rec, Event.RESUME, now)
        if rec.state in (S.ACTIVE, S.ROLLING_BACK):
            # ACTIVE: the pointer names the new slot and Serve loads it; ROLLING_BACK: finish going back.
            return actions + (self._restore(rec) if rec.state == S.ROLLING_BACK else [])
        assert signed is not None
        if rec.state == S.DOWNLOADING:
            return actions + self._start_download(rec, signed)
        if rec.state == S.VERIFYING:
            assert rec.target_slot is not None
            return actions + [Verify(self._await(), rec.target_slot, signed, keep=self._keep(rec))]
        if rec.state == S.STAGED:
            return actions + self._after_staged(rec, now)
        if rec.state == S.SHADOW:
            return actions + self._start_shadow(rec, now)
        return actions + [Switch(self._await(), rec.target_slot, signed, "activate")]  # ACTIVATING: finish it

    def _crash_loop(self, rec: DeploymentRecord, now: float) -> list[Action]:
        reason = (
            f"the agent started {rec.starts} times in state {rec.state.value} without progress"
            f" (limit {self.config.max_starts}); giving the deployment up"
        )
        if rec.state in (S.ACTIVATING, S.ACTIVE):
            rec.restore_slot, rec.restore_outcome = rec.previous_slot, "failed"
            return self._transition(rec, Event.CRASH_LOOP, now, reason=reason) + self._restore(rec)
        return self._transition(rec, Event.CRASH_LOOP, now, reason=reason) + self._cleanup(rec)

    # ------------------------------------------------------------ events --

    def on_connected(self, now: float) -> list[Action]:
        """(Re)connected: subscribe to repairs (and the broadcast while downloading) and report progress."""
        actions: list[Action] = [Subscribe(self._repair_topic, 1)]
        rec = self.record
        if rec is not None and rec.state == S.DOWNLOADING and self._prepared:
            if self._subscribed is not None:
                actions.append(Subscribe(self._subscribed, 1))
            actions += self._progress(rec, now)
        return actions

    def on_command(self, command: DeployCommand, now: float) -> list[Action]:
        """A deployment command (already validated by the codec)."""
        if isinstance(command, Deploy):
            return self._on_deploy(command, now)
        if isinstance(command, Rollback):
            return self._on_rollback(command, now)
        if isinstance(command, Activate):
            return self._on_activate(command, now)
        if isinstance(command, Commit):
            return self._on_commit(command, now)
        if isinstance(command, Cancel):
            return self._on_cancel(command, now)
        return []  # pragma: no cover - the union is exhaustive

    # ----------------------------------------------------------- deploy --

    def _busy(self) -> bool:
        """A switch is in flight: it finishes before another command may start."""
        return self.state in (S.ACTIVATING, S.ROLLING_BACK)

    def _repeat(self, rec: DeploymentRecord, now: float) -> list[Action]:
        """The same command again (a retry, a reconnect): report where we are, restart nothing."""
        self.counters["repeated_commands"] += 1
        seq = self._bump_seq()
        self._persist(now)
        return [self._event(rec, now, seq, progress=rec.state == S.DOWNLOADING)]

    def _on_deploy(self, cmd: Deploy, now: float) -> list[Action]:
        rec = self.record
        if rec is not None and rec.deployment_id == cmd.deployment_id:
            return self._repeat(rec, now)
        seen = self.persisted.seen.get(cmd.deployment_id)
        if seen is not None:
            old = DeploymentRecord(
                deployment_id=cmd.deployment_id, artifact_id=seen.artifact_id, state=seen.state, reason=seen.reason
            )
            return self._repeat(old, now)
        if self._busy():
            self._pending.append(cmd)
            return []
        signed = cmd.manifest
        manifest = signed.manifest
        artifact = artifact_id(manifest)
        active = self.storage.active_slot()
        active_meta = self._active_meta()
        already = active_meta is not None and active_meta.artifact_id == artifact
        try:
            installed = None if already or active_meta is None else active_meta.manifest
            check_manifest(signed, self.key, now=now, installed=installed)
        except VerificationError as exc:
            return self._reject(cmd.deployment_id, artifact, f"{exc.reason}: {exc}", now)
        target = other_slot(active)
        if not already:
            space = self.storage.space_error(manifest, target)
            if space is not None:
                return self._reject(cmd.deployment_id, artifact, f"disk_space: {space}", now)
        actions = self._supersede(rec, f"superseded by deployment {cmd.deployment_id}", now, overwrite=not already)
        if already:
            rec = self._new_record(cmd.deployment_id, artifact, now, target_slot=active, previous_slot=active)
            rec.committed = True  # nothing was replaced, nothing to keep
            return actions + self._transition(rec, Event.ALREADY_ACTIVE, now, reason="already the active model")
        rec = self._new_record(
            cmd.deployment_id,
            artifact,
            now,
            target_slot=target,
            previous_slot=active,
            previous_artifact=active_meta.artifact_id if active_meta else "",
            activate=cmd.activate,
            shadow=cmd.shadow,
        )
        self.records.save_manifest(signed)  # before the record that names it
        self._set_signed(signed, artifact)
        return actions + self._transition(rec, Event.ACCEPT, now) + self._start_download(rec, signed)

    def _reject(self, deployment_id: str, artifact_id: str, reason: str, now: float) -> list[Action]:
        """A Deploy that must not be installed: FAILED for it; a deployment in progress is not touched."""
        log.warning("deployment %s rejected: %s", deployment_id, reason)
        self.counters["rejected"] += 1
        rejected = DeploymentRecord(deployment_id=deployment_id, artifact_id=artifact_id, created_at=now)
        rejected.state = transition(rejected.state, Event.REJECT)
        rejected.reason = reason[:4096]
        self._remember(rejected)
        seq = self._bump_seq()
        self._persist(now)
        return [self._event(rejected, now, seq)]

    def _new_record(
        self,
        deployment_id: str,
        artifact_id: str,
        now: float,
        *,
        kind: Literal["deploy", "rollback"] = "deploy",
        **fields: Any,
    ) -> DeploymentRecord:
        old = self.record
        if old is not None:
            self._remember(old)
        rec = DeploymentRecord(
            deployment_id=deployment_id,
            artifact_id=artifact_id,
            kind=kind,
            created_at=now,
            updated_at=now,
            states=[S.IDLE],
            **fields,
        )
        self.persisted.record = rec
        self._reset_download()
        self._awaiting = None
        return rec

    def _supersede(
        self, rec: DeploymentRecord | None, reason: str, now: float, *, overwrite: bool = True
    ) -> list[Action]:
        """Make room for a new deployment: cancel one that has not switched; an unconfirmed switch is kept
        (and implicitly confirmed when the new deployment ``overwrite``s its previous slot)."""
        if rec is None:
            return []
        if rec.state in BEFORE_SWITCH:
            return self._cleanup(rec) + self._transition(rec, Event.CANCEL, now, reason=reason)
        if overwrite and rec.state == S.ACTIVE and not rec.committed:
            # The new deployment writes over the previous slot: this switch is implicitly confirmed.
            rec.committed = True
            self._persist(now)
        return []

    def _cleanup(self, rec: DeploymentRecord) -> list[Action]:
        """Leave the download/verify/shadow steps: stop receiving chunks, drop a loaded candidate."""
        actions: list[Action] = []
        if self._subscribed is not None:
            actions.append(Unsubscribe(self._subscribed))
        if rec.state == S.SHADOW and self._awaiting is not None:
            actions.append(StopShadow(self._awaiting))
        if rec.target_slot is not None and rec.target_slot != self.storage.active_slot():
            actions.append(Discard(rec.target_slot))
        signed, signed_id = self._signed, self._signed_id
        self._reset_download()
        self._set_signed(signed, signed_id)
        self._awaiting = None
        return actions

    def _keep(self, rec: DeploymentRecord) -> bool:
        """Keep the self-tested candidate loaded: it is about to serve or to shadow."""
        return rec.activate or (rec.shadow is not None and not rec.shadow_done)

    # --------------------------------------------------------- download --

    def _start_download(
        self, rec: DeploymentRecord, signed: SignedManifest, discard: tuple[int, ...] = ()
    ) -> list[Action]:
        assert rec.target_slot is not None
        self._prepared = False
        self._sparse = False
        self._download_token = self._await()
        source = self.storage.active_slot()
        return [Prepare(self._download_token, rec.target_slot, signed, source, discard)]

    def _on_prepared(self, rec: DeploymentRecord, result: Prepared, now: float) -> list[Action]:
        if result.error or result.bitmap is None:
            return self._fail(rec, result.error or "the slot could not be prepared", now)
        self._bitmap = result.bitmap
        self._fresh = ChunkBitmap(result.bitmap.total)
        self._progress_count = result.bitmap.count
        self._prepared = True
        self._awaiting = None
        self._last_chunk_at = now
        self.counters["copied"] += result.copied
        # After a repair round the broadcast is long over: ask at once instead of waiting to be idle.
        self._repair_mode = rec.attempts.get("repair", 0) > 0
        if result.bitmap.complete:
            return self._downloaded(rec, now)
        signed = self._manifest_of(rec)
        assert signed is not None
        self._sparse = goes_sparse(signed.manifest, result.bitmap, result.copied, self.config.sparse_fraction)
        if self._sparse:
            self._repair_mode = True
            self.counters["sparse_downloads"] += 1
            return [*self._progress(rec, now), *self._request(rec, now)]
        self._subscribed = topics.artifact_chunks(rec.artifact_id)
        actions: list[Action] = [Subscribe(self._subscribed, 1), *self._progress(rec, now)]
        if self._repair_mode:
            actions += self._request(rec, now)
        return actions

    def on_chunk(self, topic: str, payload: bytes, now: float) -> list[Action]:
        """A chunk frame from the broadcast or the repair topic."""
        try:
            frame = chunks.decode(payload)
        except chunks.FrameError as exc:
            self.drops.drop(topic, "chunks", "frame", str(exc))
            return []
        rec = self.record
        if rec is None or rec.state != S.DOWNLOADING or not self._prepared or frame.artifact_id != rec.artifact_id:
            self.counters["chunks_ignored"] += 1  # another artifact, or a download that is over
            return []
        bitmap, signed = self._bitmap, self._signed
        assert bitmap is not None and signed is not None and rec.target_slot is not None
        manifest = signed.manifest
        assert self._signed_id == rec.artifact_id
        if frame.index >= len(manifest.chunks):
            self.drops.drop(topic, "chunks", "index", f"chunk {frame.index} of {len(manifest.chunks)}")
            return []
        if bitmap.has(frame.index):
            self.counters["chunks_duplicate"] += 1
            return []
        ref = manifest.chunks[frame.index]
        if len(frame.data) != ref.size or self._hash_chunk(frame.data) != ref.sha256:
            # Never written; asked for again with the next request.
            self.counters["chunks_bad"] += 1
            self._outstanding.pop(frame.index, None)
            if len(self._bad) < 256:
                self._bad.add(frame.index)
            self.drops.drop(topic, "chunks", "bad_hash", f"chunk {frame.index} does not match its sha256")
            return []
        try:
            self.storage.write_chunk(rec.target_slot, ref, frame.data)
        except StorageError as exc:
            return self._fail(rec, str(exc), now)
        bitmap.add(frame.index)
        if self._fresh is not None:
            self._fresh.add(frame.index)
        self.counters["chunks_received"] += 1
        self.counters["chunks_repaired" if topic == self._repair_topic else "chunks_broadcast"] += 1
        self._outstanding.pop(frame.index, None)
        self._last_chunk_at = now
        self._progress_dirty = True
        if bitmap.complete:
            return self._downloaded(rec, now)
        actions: list[Action] = []
        if now - self._last_progress_at >= self.config.progress_interval_s:
            actions += self._progress(rec, now)
        if self._repair_mode and not self._outstanding:
            actions += self._request(rec, now)
        return actions

    def _progress(self, rec: DeploymentRecord, now: float) -> list[Action]:
        """Report download progress and checkpoint the held chunks (new chunks reset the crash-loop count).

        The record is written only when the crash-loop count is reset: the held chunks are checkpointed by
        the worker thread, and an fsync a second on the event loop would stall MQTT and local inference on
        slow storage. (The event's seq may then repeat after a crash; nothing orders deployment events by it.)
        """
        assert self._bitmap is not None and rec.target_slot is not None
        self._last_progress_at = now
        self._progress_dirty = False
        if self._bitmap.count > self._progress_count and rec.starts:
            rec.starts = 0
            self._persist(now)
        self._progress_count = self._bitmap.count
        seq = self._bump_seq()
        return [
            self._event(rec, now, seq, progress=True),
            Checkpoint(self._download_token, rec.target_slot, self._bitmap.to_bytes()),
        ]

    def _request(self, rec: DeploymentRecord, now: float) -> list[Action]:
        """Ask for missing chunks: at most ``request_window`` outstanding, re-asked after a timeout."""
        assert self._bitmap is not None
        cfg = self.config
        for index, asked_at in list(self._outstanding.items()):
            if now - asked_at >= cfg.request_timeout_s:
                del self._outstanding[index]
        room = cfg.request_window - len(self._outstanding)
        if room <= 0:
            return []
        missing = self._bitmap.missing(room, skip=set(self._outstanding))
        if not missing:
            return []
        asked = ranges(missing, 256)
        for start, end in asked:
            for index in range(start, end):
                self._outstanding[index] = now
        self._repair_mode = True
        self.counters["chunk_requests"] += 1
        bad, self._bad = sorted(self._bad), set()
        msg = ChunkRequest(
            ts=now,
            seq=self._bump_seq(),
            deployment_id=rec.deployment_id,
            artifact_id=rec.artifact_id,
            ranges=asked,
            bad=bad,
        )
        # Not durable: a request is only useful now; it is repeated after the timeout anyway.
        return [Publish(self._events_topic, codec.encode(msg), qos=1, durable=False)]

    def _downloaded(self, rec: DeploymentRecord, now: float) -> list[Action]:
        assert self._bitmap is not None and rec.target_slot is not None
        signed = self._manifest_of(rec)
        assert signed is not None
        actions = self._transition(rec, Event.DOWNLOADED, now)
        if self._subscribed is not None:
            actions.append(Unsubscribe(self._subscribed))
            self._subscribed = None
        self._outstanding.clear()
        self._repair_mode = False
        actions.append(Checkpoint(self._download_token, rec.target_slot, self._bitmap.to_bytes()))
        fresh = self._fresh.to_bytes() if self._fresh is not None else b""
        actions.append(Verify(self._await(), rec.target_slot, signed, keep=self._keep(rec), fresh=fresh))
        return actions

    # ---------------------------------------------------- stage / switch --

    def _on_verified(self, rec: DeploymentRecord, result: Verified, now: float) -> list[Action]:
        self._awaiting = None
        if result.corrupt:
            rec.attempts["repair"] = rec.attempts.get("repair", 0) + 1
            if rec.attempts["repair"] > self.config.max_repairs:
                return self._fail(
                    rec, f"files still fail their sha256 after {self.config.max_repairs} repairs: {result.reason}", now
                )
            signed = self._manifest_of(rec)
            assert signed is not None
            reason = f"{len(result.corrupt)} chunks failed their sha256 after assembly; fetching them again"
            return self._transition(rec, Event.CORRUPT, now, reason=reason) + self._start_download(
                rec, signed, discard=tuple(result.corrupt)
            )
        if not result.ok:
            return self._fail(rec, result.reason, now, metrics=result.metrics)
        return self._transition(rec, Event.VERIFIED, now, reason="", metrics=result.metrics) + self._after_staged(
            rec, now
        )

    def _after_staged(self, rec: DeploymentRecord, now: float) -> list[Action]:
        if rec.shadow is not None and not rec.shadow_done:
            return self._transition(rec, Event.SHADOW, now) + self._start_shadow(rec, now)
        if rec.activate:
            return self._activate(rec, now)
        return []  # wait for the Activate command

    def _start_shadow(self, rec: DeploymentRecord, now: float) -> list[Action]:
        signed = self._manifest_of(rec)
        assert signed is not None and rec.shadow is not None and rec.target_slot is not None
        self._shadow_deadline = now + rec.shadow.max_duration_s
        return [StartShadow(self._await(), rec.target_slot, signed, rec.shadow)]

    def _on_shadow(self, rec: DeploymentRecord, result: ShadowReport, now: float) -> list[Action]:
        self._awaiting = None
        self._shadow_deadline = None
        if result.error:
            return self._fail(rec, f"shadow run failed: {result.error}", now, metrics=result.metrics)
        rec.shadow_done = True
        return self._transition(rec, Event.SHADOW_DONE, now, metrics=result.metrics) + self._after_staged(rec, now)

    def _activate(self, rec: DeploymentRecord, now: float) -> list[Action]:
        signed = self._manifest_of(rec)
        assert signed is not None and rec.target_slot is not None
        actions = self._transition(rec, Event.ACTIVATE, now)
        return actions + [Switch(self._await(), rec.target_slot, signed, "activate")]

    def _restore(self, rec: DeploymentRecord) -> list[Action]:
        """In ROLLING_BACK: switch to ``restore_slot`` (None: the model that served before any slot)."""
        slot = rec.restore_slot
        meta = self.storage.meta(slot) if slot is not None else None
        return [Switch(self._await(), slot, meta.signed if meta is not None else None, "restore")]

    def _on_switched(self, rec: DeploymentRecord, result: Switched, now: float) -> list[Action]:
        self._awaiting = None
        if rec.state == S.ACTIVATING:
            if result.ok:
                event = Event.RESTORED if rec.kind == "rollback" else Event.SWITCHED
                return self._transition(rec, event, now, reason=rec.reason if rec.kind == "rollback" else "") + [
                    InstalledChanged()
                ]
            rec.restore_slot, rec.restore_outcome = rec.previous_slot, "failed"
            reason = f"the switch to the new model failed: {result.reason}"
            return self._transition(rec, Event.REVERT, now, reason=reason) + self._restore(rec)
        # ROLLING_BACK
        if result.ok:
            event = Event.REVERTED if rec.restore_outcome == "failed" else Event.ROLLED_BACK
            return self._transition(rec, event, now) + [InstalledChanged()]
        reason = f"{rec.reason}; restoring the previous model failed too: {result.reason}"
        return self._transition(rec, Event.FAIL, now, reason=reason) + [InstalledChanged()]

    def _fail(
        self, rec: DeploymentRecord, reason: str, now: float, metrics: dict[str, float] | None = None
    ) -> list[Action]:
        """An error: before the switch the active model never changed (FAILED); after it, go back first."""
        self.counters["failed"] += 1
        if rec.state in (S.ACTIVATING, S.ACTIVE):
            rec.restore_slot, rec.restore_outcome = rec.previous_slot, "failed"
            return self._transition(rec, Event.REVERT, now, reason=reason, metrics=metrics) + self._restore(rec)
        return self._cleanup(rec) + self._transition(rec, Event.FAIL, now, reason=reason, metrics=metrics)

    # ------------------------------------------------------------ results --

    def on_result(self, result: Result, now: float) -> list[Action]:
        """A job's result (on the same thread as every other call)."""
        actions = self._on_result(result, now)
        if self._pending and not self._busy():
            pending, self._pending = self._pending, []
            for cmd in pending:
                actions += self.on_command(cmd, now)
        return actions

    def _on_result(self, result: Result, now: float) -> list[Action]:
        rec = self.record
        if isinstance(result, Served):
            return self._on_served(result, now) if result.token == self._serve_token else []
        if isinstance(result, Switched) and result.token == self._fallback_token:
            self._fallback_token = None
            return [InstalledChanged()]
        if isinstance(result, Released):
            if result.error:
                log.warning("freeing the previous slot failed: %s", result.error)
            return [InstalledChanged()]
        if isinstance(result, Checkpointed):
            if result.error and rec is not None and rec.state == S.DOWNLOADING and result.token == self._download_token:
                return self._fail(rec, result.error, now)
            return []
        if rec is None or result.token != self._awaiting:
            self.counters["stale_results"] += 1
            return []
        if isinstance(result, Prepared) and rec.state == S.DOWNLOADING:
            return self._on_prepared(rec, result, now)
        if isinstance(result, Verified) and rec.state == S.VERIFYING:
            return self._on_verified(rec, result, now)
        if isinstance(result, ShadowReport) and rec.state == S.SHADOW:
            return self._on_shadow(rec, result, now)
        if isinstance(result, Switched) and rec.state in (S.ACTIVATING, S.ROLLING_BACK):
            return self._on_switched(rec, result, now)
        self.counters["stale_results"] += 1
        return []

    def _on_served(self, result: Served, now: float) -> list[Action]:
        self._serve_token = None
        if result.ok:
            return []
        log.error("the active model does not load: %s", result.reason)
        rec = self.record
        active = self.storage.active_slot()
        if (
            rec is not None
            and rec.state == S.ACTIVE
            and not rec.committed
            and rec.previous_slot != active
            and rec.target_slot == active
        ):
            rec.restore_slot, rec.restore_outcome = rec.previous_slot, "failed"
            reason = f"the new model does not load after a restart: {result.reason}"
            return self._transition(rec, Event.REVERT, now, reason=reason) + self._restore(rec)
        # Never without a model: serve the other slot if it holds a complete one.
        other = other_slot(active)
        meta = self.storage.meta(other)
        if meta is not None and meta.status == "ready" and not self._busy():
            self._fallback_token = self._next_token()
            return [Switch(self._fallback_token, other, meta.signed, "fallback")]
        return []

    # ------------------------------------------------------ other commands --

    def _on_rollback(self, cmd: Rollback, now: float) -> list[Action]:
        try:
            grant = verify_grant(cmd, self.key, device_id=self.device_id, now=now)
        except VerificationError as exc:
            return self._refuse(cmd.command_id, f"rollback refused: {exc.reason}: {exc}", now)
        rec = self.record
        same = rec is not None and rec.deployment_id == cmd.deployment_id
        if (
            same
            and rec is not None
            and (rec.state in (S.ROLLED_BACK, S.ROLLING_BACK) or (rec.kind == "rollback" and rec.state not in FINAL))
        ):
            return self._repeat(rec, now)
        if self._busy():
            self._pending.append(cmd)
            return []
        active = self.storage.active_slot()
        found = None
        for slot in sorted(SLOTS, key=lambda s: s != active):  # the active slot first
            meta = self.storage.meta(slot)
            if meta is not None and meta.status == "ready" and meta.artifact_id == grant.artifact_id:
                found = slot
                break
        fetch = found is None
        if fetch:
            if cmd.manifest is None:
                return self._refuse(
                    cmd.command_id,
                    f"rollback refused: artifact {grant.artifact_id[:12]} is not on this device and the command"
                    " carries no manifest to fetch it",
                    now,
                )
            try:
                active_meta = self._active_meta()
                installed = active_meta.manifest if active_meta is not None else None
                check_manifest(cmd.manifest, self.key, now=now, installed=installed, allow_version=grant.version)
            except VerificationError as exc:
                return self._refuse(cmd.command_id, f"rollback refused: {exc.reason}: {exc}", now)
            space = self.storage.space_error(cmd.manifest.manifest, other_slot(active))
            if space is not None:
                return self._refuse(cmd.command_id, f"rollback refused: {space}", now)
        actions: list[Action] = []
        if same and rec is not None and rec.state != S.IDLE:
            actions += self._cleanup(rec) if rec.state in BEFORE_SWITCH else []
        else:
            actions += self._supersede(rec, f"superseded by rollback {cmd.deployment_id}", now)
            rec = self._new_record(cmd.deployment_id, grant.artifact_id, now, kind="rollback", previous_slot=active)
        assert rec is not None
        rec.restore_outcome = "rolled_back"
        reason = cmd.reason or f"rollback to {grant.model} v{grant.version}"
        if not fetch:
            rec.restore_slot = found
            return actions + self._transition(rec, Event.ROLLBACK, now, reason=reason) + self._restore(rec)
        assert cmd.manifest is not None
        actions += self._transition(rec, Event.ROLLBACK, now, reason=reason)
        self.records.save_manifest(cmd.manifest)
        self._set_signed(cmd.manifest, grant.artifact_id)
        rec.kind = "rollback"
        rec.artifact_id = grant.artifact_id
        rec.allow_version = grant.version
        rec.target_slot = other_slot(active)
        rec.previous_slot = active
        rec.activate, rec.shadow, rec.shadow_done = True, None, False
        return actions + self._transition(rec, Event.ROLLBACK_FETCH, now) + self._start_download(rec, cmd.manifest)

    def _on_activate(self, cmd: Activate, now: float) -> list[Action]:
        rec = self.record
        if rec is None or rec.deployment_id != cmd.deployment_id:
            return self._refuse(cmd.command_id, f"no deployment {cmd.deployment_id} on this device", now)
        if rec.state == S.STAGED:
            rec.activate = True
            return self._activate(rec, now)
        if rec.state == S.SHADOW:
            rec.activate = True
            stop: list[Action] = [StopShadow(self._awaiting)] if self._awaiting is not None else []
            self._shadow_deadline = None
            return stop + self._activate(rec, now)
        if rec.state in (S.DOWNLOADING, S.VERIFYING):
            rec.activate = True  # switch as soon as the self-test passes
            self._persist(now)
        return []

    def _on_commit(self, cmd: Commit, now: float) -> list[Action]:
        rec = self.record
        if rec is None or rec.deployment_id != cmd.deployment_id or rec.state != S.ACTIVE or rec.committed:
            return []  # nothing to confirm (or confirmed already)
        rec.committed = True
        actions = self._transition(rec, Event.COMMIT, now, reason="committed")
        previous = rec.previous_slot
        if previous is not None and previous != self.storage.active_slot():
            actions.append(Release(self._next_token(), previous))
        return actions

    def _on_cancel(self, cmd: Cancel, now: float) -> list[Action]:
        rec = self.record
        if rec is None or rec.deployment_id != cmd.deployment_id:
            seen = self.persisted.seen.get(cmd.deployment_id)
            if seen is not None:
                old = DeploymentRecord(
                    deployment_id=cmd.deployment_id, artifact_id=seen.artifact_id, state=seen.state, reason=seen.reason
                )
                return self._repeat(old, now)
            return self._refuse(cmd.command_id, f"no deployment {cmd.deployment_id} on this device", now)
        if rec.state in BEFORE_SWITCH:
            return self._cleanup(rec) + self._transition(rec, Event.CANCEL, now, reason="cancelled by the controller")
        if rec.state in FINAL:
            return self._repeat(rec, now)
        return self._refuse(
            cmd.command_id,
            f"deployment {cmd.deployment_id} is {rec.state.value}: the device switched already; send a rollback",
            now,
        )

    # -------------------------------------------------------------- time --

    def tick(self, now: float) -> list[Action]:
        """Time passed: ask for missing chunks, report progress, end a shadow run, clear the crash counter."""
        rec = self.record
        if rec is None:
            return []
        actions: list[Action] = []
        if rec.state == S.DOWNLOADING and self._prepared:
            cfg = self.config
            if self._progress_dirty and now - self._last_progress_at >= cfg.progress_interval_s:
                actions += self._progress(rec, now)
            idle = now - self._last_chunk_at >= cfg.chunk_idle_s
            expired = any(now - t >= cfg.request_timeout_s for t in self._outstanding.values())
            if idle or expired or (self._repair_mode and not self._outstanding):
                actions += self._request(rec, now)
        elif rec.state == S.SHADOW and self._shadow_deadline is not None and now >= self._shadow_deadline:
            self._shadow_deadline = None
            if self._awaiting is not None:
                actions.append(StopShadow(self._awaiting))  # the runner reports what it measured
        elif (
            rec.state == S.ACTIVE
            and not rec.committed
            and rec.starts > 0
            and now - self._started_at >= self.config.healthy_after_s
        ):
            rec.starts = 0  # it served long enough: restarts from now on are not its fault
            self._persist(now)
        return actions

    def next_wakeup(self) -> float | None:
        """When ``tick`` next has something to do (None: nothing scheduled)."""
        rec = self.record
        if rec is None:
            return None
        cfg = self.config
        if rec.state == S.DOWNLOADING and self._prepared:
            times = [self._last_chunk_at + cfg.chunk_idle_s]
            if self._progress_dirty:
                times.append(self._last_progress_at + cfg.progress_interval_s)
            times += [t + cfg.request_timeout_s for t in self._outstanding.values()]
            return min(times)
        if rec.state == S.SHADOW:
            return self._shadow_deadline
        if rec.state == S.ACTIVE and not rec.committed and rec.starts > 0:
            return self._started_at + cfg.healthy_after_s
        return None
