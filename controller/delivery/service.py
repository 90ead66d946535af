"""Deployments: create them, follow every device, time out, cancel and roll back.

Three parts (docs: the delivery's layout):

- ``transitions``: what happens to one device of one deployment, a pure table ``(state, event) -> (state,
  actions)`` over ``DeployState`` (plus the controller's ``PENDING``);
- ``store.TargetStore``: the targets, in memory and in the database (the only code that touches their rows);
- ``wire.DeliveryLink``: the commands and chunks sent through one ``Transport`` (the MQTT bridge).

This service connects them: each operation or report becomes an event, the table says what follows,
the new state is kept in the store, and only then the wire carries the actions out.

Threads: the API creates and cancels; the MQTT loop feeds device events and chunk requests and runs the
transfers; a scheduler job flushes target states to the database and enforces per-device timeouts.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from controller.cluster import inbox
from controller.cluster.keeper import Ownership, SoleOwner
from controller.cluster.leases import StaleLease
from controller.db.models import Artifact, Deployment, Device, ModelVersion
from controller.db.models import Model as ModelRow
from controller.delivery import transitions
from controller.delivery.damage import DamageReports
from controller.delivery.link import DeliveryLink, ManifestMissing, Transport
from controller.delivery.plan import (
    DeploymentError,
    DeploymentRequest,
    new_target,
    refuse_corrupt,
    resolve_devices,
    variant_table,
)
from controller.delivery.store import DeploymentInfo, FinishListener, TargetStore
from controller.delivery.targets import BEFORE_SWITCH, PENDING, Target, deployment_status
from controller.delivery.transfer import ChunkSource, ChunkUnavailable, TransferSettings
from controller.delivery.transitions import Action, Control, Event, Facts, Step
from controller.devices.commands import CommandSender
from controller.metrics import Metrics
from controller.registry.integrity import ArtifactIntegrity
from controller.registry.keys import SigningKey
from controller.registry.store import ArtifactStore
from wire import signing
from wire.manifest import SignedManifest
from wire.messages import (
    ChunkRequest,
    DeploymentEvent,
    DeployState,
    Rollback,
    RollbackGrant,
)

__all__ = ["DeliveryService", "DeploymentError", "DeploymentRequest", "TIMEOUT_REASON", "iso"]

log = logging.getLogger(__name__)

#: how a target the controller gave up on (per-device timeout) is marked; such a device may still switch
TIMEOUT_REASON = "timed out after"

#: a report that changes nothing but the progress
RECORD_ONLY = (Action.RECORD,)
#: told of every change of a target's state (MQTT thread): the rollout engine judges failures at once
TargetListener = Callable[[Target], None]


class DeliveryService:
    def __init__(
        self,
        engine: Engine,
        store: ArtifactStore,
        key: SigningKey,
        metrics: Metrics,
        settings: TransferSettings | None = None,
        commands: CommandSender | None = None,
        integrity: ArtifactIntegrity | None = None,
        *,
        clock: Callable[[], float] = time.time,
        is_online: Callable[[str], bool] = lambda device_id: True,
        on_target_change: Sequence[TargetListener] = (),
        on_finish: FinishListener | None = None,
        grant_artifact: Callable[[str, str], None] | None = None,
        owner: Ownership | None = None,
    ) -> None:
        """``is_online``: whether a device is online now (offline ones are not waited for);
        ``on_finish``: writes notifications of a deployment's end in its transaction;
        ``grant_artifact``: lets a device read an artifact's chunk topic at the broker (per-device ACLs)."""
        self.engine = engine
        self.metrics = metrics
        self.clock = clock
        self.is_online = is_online
        self.on_target_change = list(on_target_change)
        self.on_finish = on_finish
        #: marks of artifacts damaged in the store: nothing is sent from them
        self.integrity = integrity or ArtifactIntegrity(engine, store, metrics)
        self.targets_store = TargetStore(engine, clock)
        self._lock = self.targets_store.lock
        self.wire = DeliveryLink(
            engine,
            store,
            key,
            metrics,
            settings or TransferSettings(),
            commands or CommandSender(key),
            self._unavailable,
            clock,
            grant_artifact,
        )
        self.integrity.on_repaired.append(self.wire.forget_checks)
        #: devices' reports of chunks that arrived damaged
        self.damage = DamageReports(metrics)
        #: who drives which deployment: replicas follow only those whose lease ``deployment:<id>`` they hold
        self.owner: Ownership = owner or SoleOwner()
        if self.owner.clustered:
            self.targets_store.fence = lambda conn, deployment_id: self.owner.fence(conn, lease_name(deployment_id))
            self.targets_store.on_stale = self._stale
        #: messages from other replicas handed to the transport's loop, and those it handled (deleted next drive)
        self._inflight: set[int] = set()
        self._handled: list[int] = []
        #: replicas: the device's time of the last report applied per target; an older one (it came the long way,
        #: through another replica and the database) is stale and ignored
        self._report_ts: dict[tuple[str, str], float] = {}
        #: replicas: when a quiet device was last sent its command again (it answers with its state)
        self._nudged: dict[tuple[str, str], float] = {}

    @property
    def grant_artifact(self) -> Callable[[str, str], None] | None:
        return self.wire.grant_artifact

    # ------------------------------------------------------------ life --

    def attach(self, transport: Transport) -> None:
        """Start sending through ``transport`` and resume what the database says is unfinished; ``reconnected``
        must be called on each (re)connection (the bridge's ``on_reconnect``)."""
        self._resume()
        self.wire.attach(transport)
        if transport.connected:
            transport.call_soon(self.reconnected)

    def stop(self) -> None:
        self.flush()
        self.wire.stop()

    def _resume(self) -> None:
        """Reload unfinished deployments (their commands go out again when the broker connection is up). A replica
        loads none here: it takes deployments over one lease at a time (``drive``)."""
        if self.owner.clustered:
            return
        for session, dep, targets in self.targets_store.resume():
            for target in targets:
                if not target.terminal and target.artifact_id:
                    self._remember(session, dep, target)
        if len(self.targets_store):
            log.info("delivery: resumed %d device deployments", len(self.targets_store))

    def _remember(self, session: Session, dep: Deployment, target: Target) -> None:
        try:
            self.wire.remember(session, dep, target)
        except ManifestMissing as exc:
            raise DeploymentError(str(exc), 409) from None

    # ---------------------------------------------------------- create --

    def create(self, request: DeploymentRequest, actor: str) -> str:
        """Resolve the devices and variants, record the deployment, send the commands. Returns its id."""
        with Session(self.engine) as session:
            model = session.exec(select(ModelRow).where(ModelRow.name == request.model)).first()
            if model is None:
                raise DeploymentError(f"model {request.model!r} not found", 404)
            version = session.exec(
                select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.number == request.version)
            ).first()
            if version is None:
                raise DeploymentError(f"model {request.model!r} has no version {request.version}", 404)
            artifacts = session.exec(select(Artifact).where(Artifact.version_id == version.id)).all()
            if not artifacts:
                raise DeploymentError(f"{request.model} v{request.version} has no artifacts", 409)
            refuse_corrupt(artifacts, request, self.integrity.corrupt_reason)
            by_variant = variant_table(artifacts, self.integrity.corrupt_reason)
            if request.variant != "auto" and request.variant not in by_variant:
                raise DeploymentError(
                    f"{request.model} v{request.version} has no {request.variant} variant"
                    f" (it has {', '.join(sorted(by_variant))})",
                    404,
                )
            devices = resolve_devices(session, request)
            deployment_id = uuid.uuid4().hex
            assert version.id is not None
            dep = Deployment(
                id=deployment_id,
                model_name=request.model,
                version_number=request.version,
                version_id=version.id,
                variant_rule=request.variant,
                selector=request.selector,
                device_ids=request.device_ids,
                activate=request.activate,
                shadow=request.shadow.model_dump() if request.shadow else None,
                timeout_s=request.timeout_s,
                rollout_id=request.rollout_id,
                rollout_wave=request.rollout_wave,
                max_concurrent=request.max_concurrent,
                created_by=actor,
            )
            session.add(dep)
            now = self.clock()
            targets = [
                new_target(deployment_id, device, by_variant, request.variant, request.max_concurrent, now)
                for device in devices
            ]
            for target in targets:
                self.targets_store.insert(session, target)
            session.commit()
            self.owner.drive(lease_name(deployment_id))  # a new lease: the creating replica drives it
            with self._lock:
                self.targets_store.follow(deployment_id, DeploymentInfo(request.timeout_s, request.max_concurrent))
                for target in targets:
                    self.targets_store.add(target)
                    if target.artifact_id:
                        self._remember(session, dep, target)
        for target in targets:
            if target.artifact_id and not target.queued:
                self.wire.send_deploy(target)
        self._dispatch(deployment_id)
        self._maybe_finish(deployment_id)
        log.info("deployment %s: %s v%d to %d devices", deployment_id[:8], request.model, request.version, len(targets))
        return deployment_id

    def add_devices(self, deployment_id: str, device_ids: list[str]) -> list[str]:
        """Add devices to a running deployment (late joiners of a rollout wave); returns those added."""
        if not self._local(deployment_id, "add_devices", devices=device_ids):
            return []
        self.targets(deployment_id)  # make sure a finished deployment's devices are known
        with Session(self.engine) as session:
            dep = session.get(Deployment, deployment_id)
            if dep is None or dep.status == "cancelled":
                return []
            if dep.status != "running":  # a late device reopens a finished wave
                dep.status, dep.finished_at = "running", None
                session.add(dep)
                self.targets_store.follow(deployment_id, DeploymentInfo.of(dep)).status = "running"
            artifacts = session.exec(select(Artifact).where(Artifact.version_id == dep.version_id)).all()
            by_variant = variant_table(artifacts, self.integrity.corrupt_reason)
            added: list[Target] = []
            now = self.clock()
            for device in session.exec(select(Device).where(col(Device.id).in_(device_ids))).all():
                if self.targets_store.get(deployment_id, device.id) is not None:
                    continue
                target = new_target(deployment_id, device, by_variant, dep.variant_rule, dep.max_concurrent, now)
                self.targets_store.insert(session, target)
                added.append(target)
            session.commit()
            with self._lock:
                for target in added:
                    self.targets_store.add(target)
                    if target.artifact_id:
                        self._remember(session, dep, target)
        for target in added:
            if target.artifact_id and not target.queued:
                self.wire.send_deploy(target)
        self._dispatch(deployment_id)
        return [t.device_id for t in added]

    # ----------------------------------------------------------- the table --

    def _facts(self, target: Target) -> Callable[[], Facts]:
        def facts() -> Facts:
            info = self.targets_store.info(target.deployment_id)
            return Facts(
                timed_out=target.state == DeployState.FAILED and target.reason.startswith(TIMEOUT_REASON),
                withdrawn=info is not None and info.withdrawn,
                has_previous=bool(target.previous),
            )

        return facts

    def _decide(self, target: Target, event: Event, reason: str = "") -> Step:
        """Look the event up and keep the new state (under the lock); the caller then ``_carry_out``s the step."""
        with self._lock:
            step = transitions.step(target.state, event, self._facts(target))
            if step.state is not None and Action.RECORD not in step.actions:
                now = self.clock()
                values: dict[str, object] = {"state": str(step.state)}
                if reason:
                    values["reason"] = reason
                if Action.RESTART_CLOCK in step.actions:
                    values["started_at"] = now
                target.update(now, **values)
        return step

    def _carry_out(
        self, target: Target, event: Event, step: Step, reason: str = "", done: Action | None = None
    ) -> None:
        """The step's actions other than RECORD (kept by ``_decide`` or ``on_event``) and ``done``, in order."""
        for action in step.actions:
            if action == Action.RECORD or action == done:
                continue
            if action == Action.SEND_DEPLOY:
                self.wire.send_deploy(target)
            elif action == Action.SEND_CANCEL:
                self.wire.send_cancel(target, "timeout" if event == Control.TIMEOUT else "cancel")
            elif action == Action.SEND_ROLLBACK:
                self.wire.send(target.device_id, self.rollback_command(target, reason or target.reason or "rollback"))
            elif action == Action.SEND_ACTIVATE:
                self.wire.send_activate(target)
            elif action == Action.SEND_COMMIT:
                self.wire.send_commit(target)
            elif action == Action.NOTIFY:
                label = event.value if isinstance(event, DeployState) else str(step.state)
                self.metrics.deployment_transitions.labels(label).inc()
                for callback in list(self.on_target_change):
                    callback(target)
        if Action.SETTLE in step.actions and target.terminal:
            self._dispatch(target.deployment_id)
            self._maybe_finish(target.deployment_id)

    def _apply(self, targets: Sequence[Target], event: Event, reason: str = "") -> int:
        """Decide for every target, then carry out; returns how many had a row that did something."""
        steps = [(t, self._decide(t, event, reason)) for t in targets]
        for target, step in steps:
            self._carry_out(target, event, step, reason)
        return sum(1 for _, step in steps if not step.ignored)

    # ----------------------------------------------------------- control --

    def cancel(self, deployment_id: str, actor: str) -> int:
        """Stop a deployment on every device that has not switched yet; returns how many were told."""
        if not self._local(deployment_id, "cancel", actor=actor):
            return 0
        with self._lock:
            info = self.targets_store.info(deployment_id)
            if info is None:
                raise DeploymentError(f"deployment {deployment_id!r} is not running", 409)
            info.cancelled = True
            targets = [t for t in self.targets_store.of_deployment(deployment_id) if not t.terminal]
        told = self._apply(targets, Control.CANCEL, f"cancelled by {actor}")
        self._maybe_finish(deployment_id)
        return told

    def rollback(self, deployment_id: str, actor: str, reason: str = "") -> int:
        """Send every device this deployment touched back to the model it had before (signed grants)."""
        with Session(self.engine) as session:
            if session.get(Deployment, deployment_id) is None:
                raise DeploymentError(f"deployment {deployment_id!r} not found", 404)
        if not self._local(deployment_id, "rollback", actor=actor, reason=reason):
            return 0
        with self._lock:
            targets = self.targets_store.of_deployment(deployment_id)
            info = self.targets_store.info(deployment_id)
            if info is not None:
                info.rolled_back = True  # late switches go back too
        return self._apply(targets, Control.ROLLBACK, reason or f"rolled back by {actor}")

    def rollback_command(self, target: Target, reason: str) -> Rollback:
        prev = target.previous or {}
        grant = RollbackGrant(
            device_id=target.device_id,
            deployment_id=target.deployment_id,
            artifact_id=prev.get("artifact", "0" * 64),
            model=prev.get("model", "unknown"),
            version=int(prev.get("version", 1)),
            expires_at=self.clock() + 86400,
        )
        target.rollback_artifact = grant.artifact_id
        manifest = None
        if prev.get("artifact"):
            with Session(self.engine) as session:
                artifact = session.get(Artifact, prev["artifact"])
                if artifact is not None:
                    manifest = SignedManifest.model_validate(artifact.signed_manifest)
        return Rollback(
            ts=self.clock(),
            command_id=f"{target.deployment_id[:16]}-rollback",
            deployment_id=target.deployment_id,
            grant=grant,
            signature=signing.sign_grant(grant, self.wire.key.private),
            manifest=manifest,
            reason=reason[:4096],
        )

    def activate(self, deployment_id: str) -> int:
        """Switch devices waiting in STAGED or SHADOW (a deployment created with activate=false)."""
        if not self._local(deployment_id, "activate"):
            return 0
        return self._apply(self.targets_store.of_deployment(deployment_id), Control.ACTIVATE)

    def commit(self, deployment_id: str) -> int:
        """Tell every device that switched that the new model is confirmed (it may free the old slot)."""
        if not self._local(deployment_id, "commit"):
            return 0
        return self._apply(self.targets_store.of_deployment(deployment_id), Control.COMMIT)

    def device_online(self, device_id: str) -> None:
        """A birth: re-send what this device may have missed (commands expire, and a device that was away
        longer than their validity refuses the ones its broker session kept): the Deploy of deployments it
        has not started, the Rollback of rollbacks it has not finished."""
        mine = [t for t in self.targets_store.of_device(device_id) if not (t.queued and t.state == PENDING)]
        self._apply(mine, Control.ONLINE)

    def reconnected(self) -> None:
        """(Re)connected to the broker (MQTT loop): reset transfers, re-send unfinished commands.

        Devices treat a repeated Deploy as a no-op, so this is safe after a controller restart, a broker
        restart (with or without persistence) or a lost session.
        """
        if self.wire.transport is None:
            return  # connected before ``attach``: attach re-sends once it has resumed
        self.wire.reconnected()
        unfinished = self.targets_store.select(lambda t: not t.terminal and bool(t.artifact_id) and not t.queued)
        self._apply(unfinished, Control.RECONNECTED)

    def _dispatch(self, deployment_id: str) -> None:
        """Start queued devices while the deployment has fewer than max_concurrent in progress."""
        with self._lock:
            info = self.targets_store.info(deployment_id)
            if info is None or info.cancelled:
                return
            limit = info.max_concurrent
            targets = self.targets_store.of_deployment(deployment_id)
            busy = sum(1 for t in targets if not t.terminal and not t.queued)
            starting = []
            now = self.clock()
            for t in targets:
                if limit is not None and busy >= limit:
                    break
                if t.queued and not t.terminal:
                    t.update(now, queued=False, started_at=now)
                    starting.append(t)
                    busy += 1
        for t in starting:
            self.wire.send_deploy(t)

    # ------------------------------------------------------------ events --

    def knows(self, device_id: str, deployment_id: str) -> bool:
        """Whether the controller sent ``deployment_id`` to this device (MQTT thread)."""
        return self.targets_store.knows(device_id, deployment_id)

    def on_event(self, device_id: str, event: DeploymentEvent) -> None:
        """A device reported progress or a transition (MQTT thread)."""
        now = self.clock()
        target = self.targets_store.get(event.deployment_id, device_id)
        if target is None:
            if self.owner.clustered:  # another replica drives it: it reads the report from the database
                self._forward(event.deployment_id, device_id, inbox.EVENT, event.model_dump(mode="json"))
            return
        if self.owner.clustered:
            key = (event.deployment_id, device_id)
            with self._lock:
                if event.ts < self._report_ts.get(key, 0.0):
                    return  # overtaken by a later report that reached this replica directly
                self._report_ts[key] = event.ts
        with self._lock:
            step = transitions.step(target.state, event.state, self._facts(target))
            if step.ignored:
                return  # late reports of a device given up on or cancelled
            values: dict[str, object] = {"state": event.state.value, "reason": event.reason}
            if event.chunks_total:
                values.update(
                    progress=event.progress,
                    chunks_have=event.chunks_have,
                    chunks_total=event.chunks_total,
                    contiguous=event.contiguous,
                    last_progress_at=now,
                )
            elif event.state in transitions.DOWNLOADED:
                values["progress"] = 1.0
            if event.metrics:
                values["metrics"] = {**target.metrics, **event.metrics}
            target.update(now, **values)
            if step.state is not None and step.state != event.state:
                # the switch crossed a cancel or a rollback on the wire: the device must go back
                reason = "switched after the deployment was cancelled"
                target.update(now, state=str(step.state), reason=reason, started_at=now)
        if step.state is not None and step.state != event.state:
            self.wire.send(device_id, self.rollback_command(target, target.reason))
        if event.state == DeployState.DOWNLOADING and event.artifact_id == target.artifact_id:
            self._join_broadcast(target)  # a rollback re-download is served by repairs alone
        broadcast = self.wire.broadcasts.get(event.artifact_id)
        if broadcast is not None:
            downloading = event.state == DeployState.DOWNLOADING
            broadcast.progress(
                device_id, event.contiguous, event.chunks_have, downloading, event.listening, event.sparse
            )
        if step.actions != RECORD_ONLY:
            self._carry_out(target, event.state, step, done=Action.SEND_ROLLBACK)

    def on_chunk_request(self, device_id: str, request: ChunkRequest) -> None:
        if self.owner.clustered and self.targets_store.get(request.deployment_id, device_id) is None:
            self._forward(request.deployment_id, device_id, inbox.CHUNKS, request.model_dump(mode="json"))
            return
        with self._lock:
            target = self.targets_store.get(request.deployment_id, device_id)
            if target is None or request.artifact_id not in (target.artifact_id, target.rollback_artifact):
                return
            if target.terminal and request.artifact_id != target.rollback_artifact:
                return
        self.metrics.chunk_requests.inc()
        source = self._source(request.artifact_id)
        if source is None:
            return
        if request.bad:
            verdict = self.damage.judge(device_id, source, request.bad)
            if isinstance(verdict, ChunkUnavailable):
                self._unavailable(verdict)  # the controller's own copy is damaged
                return
            if verdict is not None:
                self._give_up([target], verdict)
                return
        self.wire.repair(device_id, source, [(a, b) for a, b in request.ranges])

    def _source(self, artifact_id: str) -> ChunkSource | None:
        if self.integrity.corrupt_reason(artifact_id) is not None:
            return None  # damaged in the store: nothing is sent from it until it is repaired
        return self.wire.source(artifact_id)

    def _unavailable(self, exc: ChunkUnavailable) -> None:
        """A chunk failed its check in the store (MQTT loop): stop sending the artifact, mark it corrupt, alert,
        and fail the devices that wait for it (they keep their model) with the reason."""
        artifact_id = exc.artifact_id
        self.wire.stop_artifact(exc)
        self.integrity.mark_corrupt(artifact_id, str(exc), blob=exc.blob, chunk=exc.index, file=exc.path)
        reason = (
            f"artifact {artifact_id[:12]} is corrupt in the controller's store ({exc}); the device keeps its model."
            f" Repair it (slmfleet model repair {artifact_id} FILE...) and deploy again"
        )
        waiting = self.targets_store.select(
            lambda t: (
                not t.terminal
                and (
                    (t.artifact_id == artifact_id and t.state in BEFORE_SWITCH)
                    or (t.rollback_artifact == artifact_id and t.state == DeployState.ROLLING_BACK)
                )
            )
        )
        self._give_up(waiting, reason)

    def _give_up(self, targets: list[Target], reason: str) -> None:
        """Fail these devices' deployments with ``reason`` and tell each device to stop (a Cancel)."""
        steps = [(t, self._decide(t, Control.GIVE_UP, reason)) for t in targets]
        changed = [(t, s) for t, s in steps if not s.ignored]
        for target, step in changed:
            log.warning("deployment %s on %s failed: %s", target.deployment_id[:8], target.device_id, reason)
            self._carry_out(target, Control.GIVE_UP, step, done=Action.SETTLE)
        for deployment_id in {t.deployment_id for t, _ in changed}:
            self._dispatch(deployment_id)
            self._maybe_finish(deployment_id)

    def _join_broadcast(self, target: Target) -> None:
        artifact_id = target.artifact_id
        if artifact_id is None:
            return
        broadcast = self.wire.broadcasts.get(artifact_id)
        if broadcast is not None and broadcast.finished and target.broadcast_joined:
            return  # its broadcast went by: the device repairs what it missed
        if broadcast is None or broadcast.finished:
            # the first device of this artifact, or one that came after its last broadcast ended (a later
            # wave, a later deployment, a queued device let in): a new broadcast, so a wave of hundreds
            # is one stream of chunks through the broker, not hundreds of repair streams
            source = self._source(artifact_id)
            if source is None:
                return
            expected = {
                t.device_id
                for t in self.targets_store.select(
                    lambda t: t.artifact_id == artifact_id and t.state in (PENDING, DeployState.DOWNLOADING)
                )
                if self.is_online(t.device_id)
            }
            broadcast = self.wire.start_broadcast(source, expected)
        broadcast.join(target.device_id)
        target.broadcast_joined = True

    # --------------------------------------------------------- bookkeeping --

    def check_timeouts(self, now: float | None = None) -> list[Target]:
        """Fail devices that exceeded their deployment's timeout (scheduler thread)."""
        now = self.clock() if now is None else now
        expired = []
        with self._lock:
            for target in self.targets_store.select(lambda t: not t.terminal and not t.queued):
                info = self.targets_store.info(target.deployment_id)
                if info is None or now - target.started_at <= info.timeout_s:
                    continue
                reason = f"{TIMEOUT_REASON} {info.timeout_s:.0f}s in state {target.state}"
                step = transitions.step(target.state, Control.TIMEOUT)
                target.update(now, state=str(step.state), reason=reason)
                expired.append((target, step))
        for target, step in expired:
            self._carry_out(target, Control.TIMEOUT, step)
        return [t for t, _ in expired]

    def _maybe_finish(self, deployment_id: str) -> None:
        with self._lock:
            info = self.targets_store.info(deployment_id)
            if info is None:
                return
            targets = self.targets_store.of_deployment(deployment_id)
            status = deployment_status(targets, info.cancelled)
            if status == info.status:
                return
            info.status = status
            if status != "running":
                self.wire.forget(deployment_id)
        if status != "running":
            try:
                self.targets_store.finish(deployment_id, status, targets, self.on_finish)
            except StaleLease as exc:
                self._stale(deployment_id, exc)
                return
            log.info("deployment %s %s", deployment_id[:8], status)

    def flush(self) -> int:
        """Write changed targets to the database."""
        return self.targets_store.flush()

    # ------------------------------------------------------------ reads --

    def targets(self, deployment_id: str) -> list[Target]:
        """The devices of a deployment; finished ones not in memory (after a restart) are read back; on a replica,
        those of a deployment another replica drives are read from the database each time."""
        if self.owner.clustered and self.targets_store.info(deployment_id) is None:
            return self.targets_store.read(deployment_id)
        return self.targets_store.targets(deployment_id)

    def live_status(self, deployment_id: str) -> str | None:
        info = self.targets_store.info(deployment_id)
        return info.status if info else None

    def state_counts(self) -> dict[str, int]:
        return self.targets_store.state_counts()

    # ------------------------------------------------------------ replicas --

    def drive(self) -> int:
        """Replicas (a scheduler job each second): take the running deployments nobody drives (up to a fair
        share), and those with messages waiting; handle the messages of the deployments this replica drives;
        let go of finished ones. Returns how many messages were handled."""
        if not self.owner.clustered:
            return 0
        with Session(self.engine) as session:
            running = list(session.exec(select(Deployment.id).where(Deployment.status == "running")).all())
        for deployment_id in running:
            if self.owner.drive(lease_name(deployment_id), ("deployment", len(running))) is not None:
                self._adopt(deployment_id)
        waiting = set(inbox.waiting(self.engine))
        for deployment_id in waiting:
            if self.owner.drive(lease_name(deployment_id)) is not None:
                self._adopt(deployment_id)
        with self._lock:
            handled, self._handled = self._handled, []
            self._inflight.difference_update(handled)
        inbox.done(self.engine, handled)
        mine = [name.removeprefix("deployment:") for name in self.owner.held() if name.startswith("deployment:")]
        transport = self.wire.transport
        if transport is not None:
            with self._lock:
                fresh = [m for m in inbox.take(self.engine, mine) if m.id not in self._inflight]
                self._inflight.update(m.id for m in fresh)
            if fresh:
                transport.call_soon(self._handle, fresh)  # reports and repairs run on the transport's loop
        active = set(running)
        for deployment_id in mine:
            info = self.targets_store.info(deployment_id)
            if deployment_id not in active | waiting and (info is None or info.status != "running"):
                self.owner.release(lease_name(deployment_id))
                self.lost(lease_name(deployment_id))
        return len(handled)

    def nudge(self) -> int:
        """A scheduler job (every process, replica or not): every device of a deployment this process drives that
        has been silent ``NUDGE_S`` while its target is unfinished gets its command again, at most once per
        ``NUDGE_S``. A Deploy lost on its way (with a broker node that died, say) is never acknowledged, and a
        report lost with a replica never arrives: either way the device hears the command again and answers
        with where it is (devices ignore a Deploy they already carried out). Returns how many were nudged."""
        transport = self.wire.transport
        if transport is None:
            return 0
        now = self.clock()
        quiet = self.targets_store.select(
            lambda t: not t.terminal and not t.queued and bool(t.artifact_id) and now - t.updated_at > NUDGE_S
        )
        with self._lock:
            # only the quiet ones are remembered: one heard since starts its NUDGE_S again from its report
            nudged = {
                (t.deployment_id, t.device_id): self._nudged.get((t.deployment_id, t.device_id), 0.0) for t in quiet
            }
            due = [t for t in quiet if now - nudged[(t.deployment_id, t.device_id)] > NUDGE_S]
            for t in due:
                nudged[(t.deployment_id, t.device_id)] = now
            self._nudged = nudged
        if due:
            log.info("delivery: %d devices silent %.0f s mid-deployment get their command again", len(due), NUDGE_S)
            transport.call_soon(self._apply, due, Control.RECONNECTED)
        return len(due)

    def _adopt(self, deployment_id: str) -> None:
        """Follow a deployment this replica just took (or took back): its targets from the database, and the
        commands of unfinished devices again (devices ignore a Deploy they already have)."""
        if self.targets_store.info(deployment_id) is not None:
            return
        loaded: list[Target] = []
        for session, dep, targets in self.targets_store.resume(only=deployment_id):
            for target in targets:
                if not target.terminal and target.artifact_id:
                    self._remember(session, dep, target)
            loaded = targets
        if not loaded:  # finished: its rows, for late reports
            self.targets_store.targets(deployment_id)
            return
        log.info(
            "delivery: %s drives deployment %s (%d devices)", self.owner.replica_id, deployment_id[:8], len(loaded)
        )
        transport = self.wire.transport
        if transport is not None:
            transport.call_soon(self._resend, deployment_id)

    def _resend(self, deployment_id: str) -> None:
        """The commands of a taken-over deployment's unfinished devices again (transport loop)."""
        unfinished = [
            t
            for t in self.targets_store.of_deployment(deployment_id)
            if not t.terminal and t.artifact_id and not t.queued
        ]
        self._apply(unfinished, Control.RECONNECTED)
        self._dispatch(deployment_id)
        self._maybe_finish(deployment_id)

    def lost(self, name: str) -> None:
        """The lease of a deployment is gone (taken over, or not renewed in time): stop following it."""
        if name.startswith("deployment:"):
            deployment_id = name.removeprefix("deployment:")
            self.targets_store.drop(deployment_id)
            with self._lock:
                for key in [k for k in self._report_ts if k[0] == deployment_id]:
                    del self._report_ts[key]
                for key in [k for k in self._nudged if k[0] == deployment_id]:
                    del self._nudged[key]
            self.wire.forget(deployment_id)

    def _stale(self, deployment_id: str, exc: StaleLease) -> None:
        refused = getattr(self.owner, "refused_write", None)
        if refused is not None:
            refused(lease_name(deployment_id), exc)
        self.owner.release(lease_name(deployment_id))
        self.lost(lease_name(deployment_id))

    def _local(self, deployment_id: str, op: str, **args: object) -> bool:
        """Whether this process acts on ``deployment_id`` itself; on a replica that does not drive it (and cannot
        take it), the operation is left for its driver in the database."""
        if not self.owner.clustered:
            return True
        if self.owner.drive(lease_name(deployment_id)) is not None:
            self._adopt(deployment_id)
            return True
        self._forward(deployment_id, "", inbox.OP, {"op": op, **args})
        return False

    def _forward(self, deployment_id: str, device_id: str, kind: str, payload: dict[str, object]) -> None:
        try:
            inbox.put(self.engine, deployment_id, device_id, kind, payload, self.owner.replica_id)
        except Exception:
            log.exception("delivery: could not leave a %s for deployment %s to its driver", kind, deployment_id[:8])

    def _handle(self, messages: list[inbox.Message]) -> int:
        """Messages other replicas left for deployments this one drives (transport loop), in order."""
        handled: list[int] = []
        for m in messages:
            try:
                if self.owner.holds(lease_name(m.deployment_id)) is None:
                    with self._lock:
                        self._inflight.discard(m.id)
                    continue  # lost it meanwhile: stays for the next driver
                if m.kind == inbox.EVENT:
                    self.on_event(m.device_id, DeploymentEvent.model_validate(m.payload))
                elif m.kind == inbox.CHUNKS:
                    self.on_chunk_request(m.device_id, ChunkRequest.model_validate(m.payload))
                elif m.kind == inbox.OP:
                    self._operation(m.deployment_id, m.payload)
            except Exception:
                log.exception("delivery: a %s for deployment %s failed", m.kind, m.deployment_id[:8])
            handled.append(m.id)
        with self._lock:
            self._handled.extend(handled)
        return len(handled)

    def _operation(self, deployment_id: str, payload: dict[str, object]) -> None:
        op = payload.get("op")
        actor = str(payload.get("actor", "replica"))
        if op == "cancel":
            self.cancel(deployment_id, actor)
        elif op == "rollback":
            self.rollback(deployment_id, actor, str(payload.get("reason", "")))
        elif op == "activate":
            self.activate(deployment_id)
        elif op == "commit":
            self.commit(deployment_id)
        elif op == "add_devices":
            devices = payload.get("devices")
            self.add_devices(deployment_id, [str(d) for d in devices] if isinstance(devices, list) else [])


#: a device of a running deployment silent this long gets its command again (a repeated Deploy makes it report
#: where it is): a command lost on its way (a broker node died) or a report lost with a replica is asked again
NUDGE_S = 15.0


def lease_name(deployment_id: str) -> str:
    return f"deployment:{deployment_id}"


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts else None
