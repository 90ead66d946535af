"""Deployments: create them, send the commands, follow every device, time out, cancel and roll back.

Threads: the API creates and cancels (holding the lock briefly); the MQTT loop
feeds device events and chunk requests and runs the transfers; a scheduler
job flushes target states to the database and enforces per-device timeouts.
The in-memory targets are the working copy; the database is the record a
restarted controller resumes from.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from controller.db.models import Artifact, Deployment, DeploymentTarget, Device, ModelVersion, table
from controller.db.models import Model as ModelRow
from controller.db.types import from_epoch, utcnow
from controller.delivery.targets import BEFORE_SWITCH, PENDING, SUCCESS, Target, deployment_status
from controller.delivery.transfer import Broadcast, ChunkSource, ChunkUnavailable, Repairs, TransferSettings
from controller.delivery.variants import choose_variant
from controller.devices import selectors
from controller.devices.commands import CommandSender
from controller.metrics import Metrics
from controller.mqtt.bridge import MqttBridge
from controller.registry.integrity import ArtifactIntegrity
from controller.registry.keys import SigningKey
from controller.registry.store import ContentStore
from wire import signing
from wire.manifest import SignedManifest
from wire.messages import (
    Activate,
    Cancel,
    ChunkRequest,
    Commit,
    Deploy,
    DeploymentEvent,
    Rollback,
    RollbackGrant,
    ShadowSpec,
)
from wire.signing import CommandBody

log = logging.getLogger(__name__)

#: how a target the controller gave up on (per-device timeout) is marked; such a device may still switch
TIMEOUT_REASON = "timed out after"
#: device reports of one chunk arriving damaged (all devices together) that make the controller re-check its copy
BAD_REPORTS_RECHECK = 3
#: reports by one device of one chunk arriving damaged, its store copy intact, that end its deployment
BAD_REPORTS_GIVE_UP = 10


class DeploymentError(Exception):
    """A deployment request that cannot be carried out; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class DeploymentRequest:
    model: str
    version: int
    variant: str = "auto"
    device_ids: list[str] | None = None
    selector: str | None = None
    activate: bool = True
    shadow: ShadowSpec | None = None
    timeout_s: float = 3600.0
    rollout_id: str | None = None
    rollout_wave: int | None = None
    max_concurrent: int | None = None


class DeliveryService:
    def __init__(
        self,
        engine: Engine,
        store: ContentStore,
        key: SigningKey,
        metrics: Metrics,
        settings: TransferSettings | None = None,
        commands: CommandSender | None = None,
        integrity: ArtifactIntegrity | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.key = key
        self.metrics = metrics
        self.settings = settings or TransferSettings()
        #: seals every command for its device (wire.signing) and publishes it
        self.commands = commands or CommandSender(key)
        #: marks of artifacts damaged in the store: nothing is sent from them
        self.integrity = integrity or ArtifactIntegrity(engine, store, metrics)
        self.integrity.on_repaired.append(self._forget_checks)
        #: devices' reports of chunks that arrived damaged: (artifact, index) and (device, artifact, index)
        #: (deployment, device) pairs looked up in the database: reports of ones never created are dropped
        self._known: OrderedDict[tuple[str, str], bool] = OrderedDict()
        #: chunks checked against their manifest once, per artifact (a repair does not hash them again)
        self._verified: dict[str, set[int]] = {}
        self._bad_chunks: dict[tuple[str, int], int] = {}
        self._bad_by_device: dict[tuple[str, str, int], int] = {}
        self.bridge: MqttBridge | None = None
        self._lock = threading.RLock()
        self._targets: dict[tuple[str, str], Target] = {}
        self._by_device: dict[str, set[str]] = {}
        self._deployments: dict[str, dict[str, Any]] = {}  # id -> {timeout_s, cancelled, status}
        self._manifests: dict[str, SignedManifest] = {}
        #: the Deploy of each unfinished (deployment, device), serialized once per artifact, sealed per send
        self._commands: dict[tuple[str, str], CommandBody] = {}
        self._bodies: dict[tuple[str, str], CommandBody] = {}
        self._broadcasts: dict[str, Broadcast] = {}
        self._repairs: Repairs | None = None
        self.on_target_change: list[Callable[[Target], None]] = []
        #: told when a deployment ends (session, id, status, its targets) before that commits: notifications
        self.on_finish: Callable[[Session, str, str, list[Target]], None] | None = None
        #: whether a device is online now (the device registry); offline ones are not waited for
        self.is_online: Callable[[str], bool] = lambda device_id: True
        #: lets a device read an artifact's chunk topic at the broker (per-device ACLs), before its command
        self.grant_artifact: Callable[[str, str], None] | None = None

    # ------------------------------------------------------------ life --

    def attach(self, bridge: MqttBridge) -> None:
        """Start sending through ``bridge`` and resume what the database says is unfinished."""
        self._resume()
        self.bridge = bridge
        if self.commands.publish is None:
            self.commands.publish = lambda topic, payload: bridge.publish(topic, payload, qos=1)
        bridge.on_reconnect.append(self._reconnected)
        bridge.call_soon(self._start_repairs)
        if bridge.connected:
            bridge.call_soon(self._reconnected)

    def _start_repairs(self) -> None:
        self._repairs = Repairs(self._publish_tracked, self.settings, self._sent("repair"), self._unavailable)
        self._repairs.start()

    def stop(self) -> None:
        self.flush()
        if self.bridge is not None:
            for b in list(self._broadcasts.values()):
                self.bridge.call_soon(b.stop)
            if self._repairs is not None:
                self.bridge.call_soon(self._repairs.stop)

    def _resume(self) -> None:
        """Reload unfinished deployments (their commands go out again when the broker connection is up)."""
        with Session(self.engine) as session:
            running = session.exec(select(Deployment).where(Deployment.status == "running")).all()
            for dep in running:
                self._deployments[dep.id] = {
                    "timeout_s": dep.timeout_s,
                    "cancelled": False,
                    "status": dep.status,
                    "max_concurrent": dep.max_concurrent,
                }
                rows = session.exec(select(DeploymentTarget).where(DeploymentTarget.deployment_id == dep.id)).all()
                for row in rows:
                    target = Target(
                        dep.id,
                        row.device_id,
                        row.artifact_id,
                        row.variant,
                        state=row.state,
                        progress=row.progress,
                        chunks_have=row.chunks_have,
                        chunks_total=row.chunks_total,
                        reason=row.reason,
                        previous=row.previous,
                        metrics=row.metrics,
                        started_at=row.started_at.timestamp(),
                        queued=row.queued,
                        dirty=False,
                    )
                    self._add_target(target)
                    if not target.terminal and target.artifact_id:
                        self._remember_command(session, dep, target)
        if self._targets:
            log.info("delivery: resumed %d device deployments", len(self._targets))

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
            self._refuse_corrupt(artifacts, request)
            by_variant = _variant_table(artifacts, self.integrity.corrupt_reason)
            if request.variant != "auto" and request.variant not in by_variant:
                raise DeploymentError(
                    f"{request.model} v{request.version} has no {request.variant} variant"
                    f" (it has {', '.join(sorted(by_variant))})",
                    404,
                )
            devices = self._resolve_devices(session, request)
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
            targets = []
            for device in devices:
                targets.append(
                    _new_target(session, deployment_id, device, by_variant, request.variant, request.max_concurrent)
                )
            session.commit()
            with self._lock:
                self._deployments[deployment_id] = {
                    "timeout_s": request.timeout_s,
                    "cancelled": False,
                    "status": "running",
                    "max_concurrent": request.max_concurrent,
                }
                for target in targets:
                    self._add_target(target)
                    if target.artifact_id:
                        self._remember_command(session, dep, target)
        for target in targets:
            if target.artifact_id and not target.queued:
                self._send_command(target)
        self._dispatch(deployment_id)
        self._maybe_finish(deployment_id)
        log.info("deployment %s: %s v%d to %d devices", deployment_id[:8], request.model, request.version, len(targets))
        return deployment_id

    def _refuse_corrupt(self, artifacts: Sequence[Artifact], request: DeploymentRequest) -> None:
        """409 when the variant asked for (or, with auto, every variant) is marked corrupt in the store."""
        damaged = {a.variant: (a.id, reason) for a in artifacts if (reason := self.integrity.corrupt_reason(a.id))}
        if request.variant != "auto":
            hit = damaged.get(request.variant)
        else:
            hit = next(iter(damaged.values())) if len(damaged) == len(artifacts) else None
        if hit is not None:
            artifact_id, reason = hit
            raise DeploymentError(
                f"{request.model} v{request.version} ({request.variant}): artifact {artifact_id[:12]} is corrupt in"
                f" the controller's store ({reason}); repair it first: slmfleet model repair {artifact_id} FILE...",
                409,
            )

    def _resolve_devices(self, session: Session, request: DeploymentRequest) -> list[Device]:
        if bool(request.device_ids) == bool(request.selector):
            raise DeploymentError("give exactly one target: a list of device ids or a label selector")
        if request.device_ids:
            found = {d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(request.device_ids))).all()}
            missing = [d for d in request.device_ids if d not in found]
            if missing:
                raise DeploymentError(f"unknown devices: {', '.join(missing[:20])}", 404)
            revoked = [d for d in request.device_ids if found[d].revoked_at is not None]
            if revoked:
                raise DeploymentError(f"revoked devices: {', '.join(revoked[:20])}", 409)
            return [found[d] for d in dict.fromkeys(request.device_ids)]
        try:
            parsed = selectors.parse(request.selector)
        except selectors.SelectorError as exc:
            raise DeploymentError(str(exc)) from None
        devices = [
            d
            for d in session.exec(select(Device).where(col(Device.revoked_at).is_(None)).order_by(col(Device.id))).all()
            if parsed.matches(d.labels)
        ]
        if not devices:
            raise DeploymentError(f"no device matches the selector {request.selector!r}", 409)
        return devices

    def _add_target(self, target: Target) -> None:
        self._targets[(target.deployment_id, target.device_id)] = target
        self._by_device.setdefault(target.device_id, set()).add(target.deployment_id)

    def _remember_command(self, session: Session, dep: Deployment, target: Target) -> None:
        assert target.artifact_id is not None
        body = self._bodies.get((dep.id, target.artifact_id))
        if body is None:
            command = Deploy(
                ts=time.time(),
                command_id=f"{dep.id[:16]}-deploy",
                deployment_id=dep.id,
                manifest=self._manifest(session, target.artifact_id),
                activate=dep.activate,
                shadow=ShadowSpec(**dep.shadow) if dep.shadow else None,
            )
            body = self._bodies[(dep.id, target.artifact_id)] = signing.command_body(command)
        self._commands[(dep.id, target.device_id)] = body

    def _manifest(self, session: Session, artifact_id: str) -> SignedManifest:
        signed = self._manifests.get(artifact_id)
        if signed is None:
            artifact = session.get(Artifact, artifact_id)
            if artifact is None:
                raise DeploymentError(f"artifact {artifact_id} vanished from the registry", 409)
            signed = self._manifests[artifact_id] = SignedManifest.model_validate(artifact.signed_manifest)
        return signed

    # --------------------------------------------------------- commands --

    def _dispatch(self, deployment_id: str) -> None:
        """Start queued devices while the deployment has fewer than max_concurrent in progress."""
        with self._lock:
            info = self._deployments.get(deployment_id)
            if info is None or info["cancelled"]:
                return
            limit = info.get("max_concurrent")
            targets = [t for t in self._targets.values() if t.deployment_id == deployment_id]
            busy = sum(1 for t in targets if not t.terminal and not t.queued)
            starting = []
            for t in targets:
                if limit is not None and busy >= limit:
                    break
                if t.queued and not t.terminal:
                    t.update(time.time(), queued=False, started_at=time.time())
                    starting.append(t)
                    busy += 1
        for t in starting:
            self._send_command(t)

    def _send_command(self, target: Target) -> None:
        body = self._commands.get((target.deployment_id, target.device_id))
        if body is None or self.bridge is None:
            return
        target.last_command_at = time.time()
        if self.grant_artifact is not None and target.artifact_id:
            # on the same connection, so the broker applies the grant before the device reads the command
            self.grant_artifact(target.device_id, target.artifact_id)
        self.commands.send(target.device_id, body)  # sealed afresh: a re-send is never a replay

    def _send(self, device_id: str, message: Any) -> None:
        if self.bridge is not None:
            self.commands.send(device_id, message)

    def device_online(self, device_id: str) -> None:
        """A birth: re-send what this device may have missed (commands expire, and a device that was away
        longer than their validity refuses the ones its broker session kept): the Deploy of deployments it
        has not started, the Rollback of rollbacks it has not finished."""
        with self._lock:
            mine = [self._targets[(d, device_id)] for d in self._by_device.get(device_id, ())]
            waiting = [t for t in mine if t.state == PENDING and not t.queued]
            going_back = [t for t in mine if t.state == "rolling_back"]
        for target in waiting:
            self._send_command(target)
        for target in going_back:
            self._send(device_id, self.rollback_command(target, target.reason or "rollback"))

    # ------------------------------------------------------------ events --

    def knows(self, device_id: str, deployment_id: str) -> bool:
        """Whether the controller sent ``deployment_id`` to this device (MQTT thread): in memory, else the
        database (a finished deployment's late report), remembered for the next report either way."""
        key = (deployment_id, device_id)
        if key in self._targets:
            return True
        with self._lock:
            known = self._known.get(key)
        if known is None:
            with Session(self.engine) as session:
                stmt = select(DeploymentTarget.id).where(
                    DeploymentTarget.deployment_id == deployment_id, DeploymentTarget.device_id == device_id
                )
                known = session.exec(stmt.limit(1)).first() is not None
            with self._lock:
                self._known[key] = known
                while len(self._known) > 10_000:
                    self._known.popitem(last=False)
        return known

    def on_event(self, device_id: str, event: DeploymentEvent) -> None:
        """A device reported progress or a transition (MQTT thread)."""
        now = time.time()
        with self._lock:
            target = self._targets.get((event.deployment_id, device_id))
            if target is None:
                return
            info = self._deployments.get(event.deployment_id) or {}
            # the controller gave up on it (timeout) but it switched after all: the truth wins; if the
            # deployment has been rolled back or cancelled since, it must go back like the others
            late_switch = (
                target.state == "failed" and target.reason.startswith(TIMEOUT_REASON) and event.state.value == "active"
            )
            gave_up = target.terminal and target.state == "failed"
            if gave_up and event.state.value not in ("rolled_back", "failed") and not late_switch:
                return  # late reports of a device the controller gave up on do not revive it
            switched_after_cancel = (target.state == "cancelled" and event.state.value == "active") or (
                late_switch and bool(target.previous) and bool(info.get("cancelled") or info.get("rolled_back"))
            )
            if target.state == "cancelled" and not switched_after_cancel:
                return  # reports still in flight when the cancel went out
            values: dict[str, Any] = {"state": event.state.value, "reason": event.reason}
            if event.chunks_total:
                values.update(
                    progress=event.progress,
                    chunks_have=event.chunks_have,
                    chunks_total=event.chunks_total,
                    contiguous=event.contiguous,
                    last_progress_at=now,
                )
            elif event.state.value in ("verifying", "staged", "shadow", "activating", "active"):
                values["progress"] = 1.0
            if event.metrics:
                values["metrics"] = {**target.metrics, **event.metrics}
            changed = target.update(now, **values)
        if switched_after_cancel:
            # the cancel crossed the switch on the wire: the device must go back
            self._send(device_id, self.rollback_command(target, "switched after the deployment was cancelled"))
            with self._lock:
                target.update(
                    now, state="rolling_back", reason="switched after the deployment was cancelled", started_at=now
                )
        if event.state.value == "downloading" and event.artifact_id == target.artifact_id:
            self._join_broadcast(target)  # a rollback re-download is served by repairs alone
        broadcast = self._broadcasts.get(event.artifact_id)
        if broadcast is not None:
            broadcast.progress(
                device_id, event.contiguous, event.chunks_have, event.state.value == "downloading", event.listening
            )
        if changed:
            self.metrics.deployment_transitions.labels(event.state.value).inc()
            for callback in list(self.on_target_change):
                callback(target)
            if target.terminal:
                self._dispatch(target.deployment_id)
                self._maybe_finish(target.deployment_id)

    def on_chunk_request(self, device_id: str, request: ChunkRequest) -> None:
        with self._lock:
            target = self._targets.get((request.deployment_id, device_id))
            if target is None or request.artifact_id not in (target.artifact_id, target.rollback_artifact):
                return
            if target.terminal and request.artifact_id != target.rollback_artifact:
                return
        self.metrics.chunk_requests.inc()
        source = self._source(request.artifact_id)
        if source is None:
            return
        if request.bad and self._bad_chunks_reported(device_id, target, source, request.bad):
            return
        if self._repairs is not None:
            self._repairs.request(device_id, source, [(a, b) for a, b in request.ranges])

    def _bad_chunks_reported(self, device_id: str, target: Target, source: ChunkSource, bad: list[int]) -> bool:
        """A device says chunks arrived damaged. Repeated reports of one chunk make the controller check its own
        copy (a damaged one stops the artifact); a device that gets an intact chunk damaged again and again is
        given up with the reason instead of looping until its timeout. True when the request is not served."""
        artifact_id = source.artifact_id
        self.metrics.chunk_bad_reports.inc(len(bad))
        if len(self._bad_chunks) > 100_000:  # bounded memory: old reports are worth less than a stable controller
            self._bad_chunks.clear()
            self._bad_by_device.clear()
        for index in bad:
            if index >= len(source):
                continue
            total = self._bad_chunks[(artifact_id, index)] = self._bad_chunks.get((artifact_id, index), 0) + 1
            mine = self._bad_by_device.get((device_id, artifact_id, index), 0) + 1
            self._bad_by_device[(device_id, artifact_id, index)] = mine
            if total % BAD_REPORTS_RECHECK == 0:
                try:
                    source.frame(index, recheck=True)
                except ChunkUnavailable as exc:
                    self._unavailable(exc)
                    return True
                if total == BAD_REPORTS_RECHECK:
                    log.warning(
                        "chunk %d of artifact %s arrived damaged %d times though the controller's copy is intact:"
                        " something between the controller and the devices corrupts data",
                        index,
                        artifact_id[:12],
                        total,
                    )
            if mine >= BAD_REPORTS_GIVE_UP:
                path = source.manifest.files[source.manifest.chunks[index].file].path
                reason = (
                    f"chunk {index} of {path} arrived damaged {mine} times though the controller's copy is intact:"
                    " the broker, the network or this device's memory corrupts data"
                )
                self._give_up([target], reason)
                return True
        return False

    def _source(self, artifact_id: str) -> ChunkSource | None:
        if self.integrity.corrupt_reason(artifact_id) is not None:
            return None  # damaged in the store: nothing is sent from it until it is repaired
        signed = self._manifests.get(artifact_id)
        if signed is None:
            with Session(self.engine) as session:
                try:
                    signed = self._manifest(session, artifact_id)
                except DeploymentError:
                    return None
        return ChunkSource(signed.manifest, self.store, self._verified.setdefault(artifact_id, set()))

    def _forget_checks(self, artifact_id: str) -> None:
        """The artifact's files changed in the store (a repair): its chunks are checked again when sent."""
        self._verified.pop(artifact_id, None)

    def _unavailable(self, exc: ChunkUnavailable) -> None:
        """A chunk failed its check in the store (MQTT loop): stop sending the artifact, mark it corrupt, alert,
        and fail the devices that wait for it (they keep their model) with the reason."""
        artifact_id = exc.artifact_id
        self._forget_checks(artifact_id)
        broadcast = self._broadcasts.get(artifact_id)
        if broadcast is not None:
            broadcast.stop()
        if self._repairs is not None:
            self._repairs.drop_artifact(artifact_id)
        self.integrity.mark_corrupt(artifact_id, str(exc), blob=exc.blob, chunk=exc.index, file=exc.path)
        reason = (
            f"artifact {artifact_id[:12]} is corrupt in the controller's store ({exc}); the device keeps its model."
            f" Repair it (slmfleet model repair {artifact_id} FILE...) and deploy again"
        )
        with self._lock:
            waiting = [
                t
                for t in self._targets.values()
                if not t.terminal
                and (
                    (t.artifact_id == artifact_id and t.state in BEFORE_SWITCH)
                    or (t.rollback_artifact == artifact_id and t.state == "rolling_back")
                )
            ]
        self._give_up(waiting, reason)

    def _give_up(self, targets: list[Target], reason: str) -> None:
        """Fail these devices' deployments with ``reason`` and tell each device to stop (a Cancel)."""
        now = time.time()
        changed = []
        with self._lock:
            for target in targets:
                if not target.terminal and target.update(now, state="failed", reason=reason):
                    changed.append(target)
        for target in changed:
            log.warning("deployment %s on %s failed: %s", target.deployment_id[:8], target.device_id, reason)
            self._send(
                target.device_id,
                Cancel(ts=now, command_id=f"{target.deployment_id[:16]}-cancel", deployment_id=target.deployment_id),
            )
            self.metrics.deployment_transitions.labels("failed").inc()
            for callback in list(self.on_target_change):
                callback(target)
        for deployment_id in {t.deployment_id for t in changed}:
            self._dispatch(deployment_id)
            self._maybe_finish(deployment_id)

    def _join_broadcast(self, target: Target) -> None:
        artifact_id = target.artifact_id
        if artifact_id is None:
            return
        broadcast = self._broadcasts.get(artifact_id)
        if broadcast is not None and broadcast.finished and target.broadcast_joined:
            return  # its broadcast went by: the device repairs what it missed
        if broadcast is None or broadcast.finished:
            # the first device of this artifact, or one that came after its last broadcast ended (a later
            # wave, a later deployment, a queued device let in): a new broadcast, so a wave of hundreds
            # is one stream of chunks through the broker, not hundreds of repair streams
            source = self._source(artifact_id)
            if source is None:
                return
            with self._lock:
                expected = {
                    t.device_id
                    for t in self._targets.values()
                    if t.artifact_id == artifact_id
                    and t.state in (PENDING, "downloading")
                    and self.is_online(t.device_id)
                }
            broadcast = self._broadcasts[artifact_id] = Broadcast(
                source, self._publish_tracked, self.settings, self._sent("broadcast"), expected, self._unavailable
            )
            broadcast.start()
        broadcast.join(target.device_id)
        target.broadcast_joined = True

    def _publish_tracked(self, topic: str, payload: bytes, on_ack: Callable[[], None]) -> bool:
        return self.bridge is not None and self.bridge.publish_tracked(topic, payload, on_ack)

    def _sent(self, kind: str) -> Callable[[int], None]:
        chunks = self.metrics.chunks_published.labels(kind)
        size = self.metrics.bytes_published.labels(kind)

        def count(n: int) -> None:
            chunks.inc()
            size.inc(n)

        return count

    def _reconnected(self) -> None:
        """(Re)connected to the broker (MQTT loop): reset transfers, re-send unfinished commands.

        Devices treat a repeated Deploy as a no-op, so this is safe after a controller restart, a broker
        restart (with or without persistence) or a lost session.
        """
        for b in self._broadcasts.values():
            b.reconnected()
        if self._repairs is not None:
            self._repairs.reconnected()
        with self._lock:
            unfinished = [t for t in self._targets.values() if not t.terminal and t.artifact_id and not t.queued]
        for target in unfinished:
            self._send_command(target)

    # ----------------------------------------------------------- control --

    def cancel(self, deployment_id: str, actor: str) -> int:
        """Stop a deployment on every device that has not switched yet; returns how many were told."""
        with self._lock:
            info = self._deployments.get(deployment_id)
            if info is None:
                raise DeploymentError(f"deployment {deployment_id!r} is not running", 409)
            info["cancelled"] = True
            targets = [t for t in self._targets.values() if t.deployment_id == deployment_id and not t.terminal]
        told = 0
        for target in targets:
            if target.state in BEFORE_SWITCH:
                self._send(
                    target.device_id,
                    Cancel(ts=time.time(), command_id=f"{deployment_id[:16]}-cancel", deployment_id=deployment_id),
                )
                with self._lock:
                    target.update(time.time(), state="cancelled", reason=f"cancelled by {actor}")
                told += 1
        self._maybe_finish(deployment_id)
        return told

    def rollback(self, deployment_id: str, actor: str, reason: str = "") -> int:
        """Send every device this deployment touched back to the model it had before (signed grants)."""
        with Session(self.engine) as session:
            dep = session.get(Deployment, deployment_id)
            if dep is None:
                raise DeploymentError(f"deployment {deployment_id!r} not found", 404)
        with self._lock:
            targets = [t for t in self._targets.values() if t.deployment_id == deployment_id]
            if deployment_id in self._deployments:
                self._deployments[deployment_id]["rolled_back"] = True  # late switches go back too
        told = 0
        for target in targets:
            if target.state in BEFORE_SWITCH:
                self._send(
                    target.device_id,
                    Cancel(ts=time.time(), command_id=f"{deployment_id[:16]}-cancel", deployment_id=deployment_id),
                )
                with self._lock:
                    target.update(time.time(), state="cancelled", reason=reason or f"rolled back by {actor}")
                told += 1
                continue
            if target.state in ("rolled_back", "failed") or not target.previous:
                continue
            self._send(target.device_id, self.rollback_command(target, reason or f"rolled back by {actor}"))
            with self._lock:  # the rollback gets a full timeout of its own
                target.update(
                    time.time(),
                    state="rolling_back",
                    reason=reason or f"rolled back by {actor}",
                    started_at=time.time(),
                )
            told += 1
        return told

    def rollback_command(self, target: Target, reason: str) -> Rollback:
        prev = target.previous or {}
        grant = RollbackGrant(
            device_id=target.device_id,
            deployment_id=target.deployment_id,
            artifact_id=prev.get("artifact", "0" * 64),
            model=prev.get("model", "unknown"),
            version=int(prev.get("version", 1)),
            expires_at=time.time() + 86400,
        )
        target.rollback_artifact = grant.artifact_id
        manifest = None
        if prev.get("artifact"):
            with Session(self.engine) as session:
                artifact = session.get(Artifact, prev["artifact"])
                if artifact is not None:
                    manifest = SignedManifest.model_validate(artifact.signed_manifest)
        return Rollback(
            ts=time.time(),
            command_id=f"{target.deployment_id[:16]}-rollback",
            deployment_id=target.deployment_id,
            grant=grant,
            signature=signing.sign_grant(grant, self.key.private),
            manifest=manifest,
            reason=reason[:4096],
        )

    def activate(self, deployment_id: str) -> int:
        """Switch devices waiting in STAGED or SHADOW (a deployment created with activate=false)."""
        with self._lock:
            targets = [
                t
                for t in self._targets.values()
                if t.deployment_id == deployment_id and t.state in ("staged", "shadow")
            ]
        for target in targets:
            self._send(
                target.device_id,
                Activate(ts=time.time(), command_id=f"{deployment_id[:16]}-activate", deployment_id=deployment_id),
            )
        return len(targets)

    def add_devices(self, deployment_id: str, device_ids: list[str]) -> list[str]:
        """Add devices to a running deployment (late joiners of a rollout wave); returns those added."""
        self.targets(deployment_id)  # make sure a finished deployment's devices are known
        with Session(self.engine) as session:
            dep = session.get(Deployment, deployment_id)
            if dep is None or dep.status == "cancelled":
                return []
            if dep.status != "running":  # a late device reopens a finished wave
                dep.status, dep.finished_at = "running", None
                session.add(dep)
                with self._lock:
                    info = self._deployments.setdefault(
                        deployment_id,
                        {"timeout_s": dep.timeout_s, "cancelled": False, "max_concurrent": dep.max_concurrent},
                    )
                    info["status"] = "running"
            artifacts = session.exec(select(Artifact).where(Artifact.version_id == dep.version_id)).all()
            by_variant = _variant_table(artifacts, self.integrity.corrupt_reason)
            added: list[Target] = []
            for device in session.exec(select(Device).where(col(Device.id).in_(device_ids))).all():
                if (deployment_id, device.id) in self._targets:
                    continue
                target = _new_target(session, deployment_id, device, by_variant, dep.variant_rule, dep.max_concurrent)
                added.append(target)
            session.commit()
            with self._lock:
                for target in added:
                    self._add_target(target)
                    if target.artifact_id:
                        self._remember_command(session, dep, target)
        for target in added:
            if target.artifact_id and not target.queued:
                self._send_command(target)
        self._dispatch(deployment_id)
        return [t.device_id for t in added]

    def commit(self, deployment_id: str) -> int:
        """Tell every device that switched that the new model is confirmed (it may free the old slot)."""
        with self._lock:
            targets = [t for t in self._targets.values() if t.deployment_id == deployment_id and t.state == SUCCESS]
        for target in targets:
            self._send(
                target.device_id,
                Commit(ts=time.time(), command_id=f"{deployment_id[:16]}-commit", deployment_id=deployment_id),
            )
        return len(targets)

    # --------------------------------------------------------- bookkeeping --

    def check_timeouts(self, now: float | None = None) -> list[Target]:
        """Fail devices that exceeded their deployment's timeout (scheduler thread)."""
        now = time.time() if now is None else now
        expired = []
        with self._lock:
            for target in self._targets.values():
                info = self._deployments.get(target.deployment_id)
                if info is None or target.terminal:
                    continue
                if not target.queued and now - target.started_at > info["timeout_s"]:
                    target.update(
                        now, state="failed", reason=f"{TIMEOUT_REASON} {info['timeout_s']:.0f}s in state {target.state}"
                    )
                    expired.append(target)
        for target in expired:
            self._send(
                target.device_id,
                Cancel(ts=now, command_id=f"{target.deployment_id[:16]}-timeout", deployment_id=target.deployment_id),
            )
            self._dispatch(target.deployment_id)
            self._maybe_finish(target.deployment_id)
        return expired

    def _maybe_finish(self, deployment_id: str) -> None:
        with self._lock:
            info = self._deployments.get(deployment_id)
            if info is None:
                return
            targets = [t for t in self._targets.values() if t.deployment_id == deployment_id]
            status = deployment_status(targets, info["cancelled"])
            if status == info["status"]:
                return
            info["status"] = status
            if status != "running":  # nothing is re-sent any more (a late device re-creates its command)
                for key in [k for k in self._bodies if k[0] == deployment_id]:
                    del self._bodies[key]
                for key in [k for k in self._commands if k[0] == deployment_id]:
                    del self._commands[key]
        if status != "running":
            self.flush()
            with Session(self.engine) as session:
                session.execute(
                    update(table(Deployment))
                    .where(table(Deployment).c.id == deployment_id)
                    .values(status=status, finished_at=utcnow())
                )
                if self.on_finish is not None:
                    try:
                        self.on_finish(session, deployment_id, status, targets)
                    except Exception:  # a notification that cannot be written never holds a deployment up
                        log.exception("deployment %s: notifying %s failed", deployment_id[:8], status)
                session.commit()
            log.info("deployment %s %s", deployment_id[:8], status)

    def flush(self) -> int:
        """Write changed targets to the database."""
        with self._lock:
            dirty = [t for t in self._targets.values() if t.dirty]
            rows = []
            for t in dirty:
                row = t.row()
                row["updated_at"] = from_epoch(row["updated_at"])
                row["finished_at"] = from_epoch(row["finished_at"]) if row["finished_at"] else None
                row["started_at"] = from_epoch(row["started_at"])
                rows.append((t.deployment_id, t.device_id, row))
                t.dirty = False
        if not rows:
            return 0
        tt = table(DeploymentTarget)
        with self.engine.begin() as conn:
            for deployment_id, device_id, row in rows:
                conn.execute(
                    update(tt).where(tt.c.deployment_id == deployment_id, tt.c.device_id == device_id).values(**row)
                )
        return len(rows)

    # ------------------------------------------------------------ reads --

    def targets(self, deployment_id: str) -> list[Target]:
        """The devices of a deployment; finished ones not in memory (after a restart) are read back."""
        with self._lock:
            found = [t for t in self._targets.values() if t.deployment_id == deployment_id]
        if found:
            return found
        with Session(self.engine) as session:
            rows = session.exec(select(DeploymentTarget).where(DeploymentTarget.deployment_id == deployment_id)).all()
            loaded = [
                Target(
                    deployment_id,
                    row.device_id,
                    row.artifact_id,
                    row.variant,
                    state=row.state,
                    progress=row.progress,
                    chunks_have=row.chunks_have,
                    chunks_total=row.chunks_total,
                    reason=row.reason,
                    previous=row.previous,
                    metrics=row.metrics,
                    started_at=row.started_at.timestamp(),
                    updated_at=row.updated_at.timestamp(),
                    finished_at=row.finished_at.timestamp() if row.finished_at else None,
                    queued=row.queued,
                    dirty=False,
                )
                for row in rows
            ]
        with self._lock:
            for target in loaded:
                self._targets.setdefault((deployment_id, target.device_id), target)
                self._by_device.setdefault(target.device_id, set()).add(deployment_id)
            return [t for t in self._targets.values() if t.deployment_id == deployment_id]

    def live_status(self, deployment_id: str) -> str | None:
        info = self._deployments.get(deployment_id)
        return info["status"] if info else None

    def state_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._lock:
            for t in self._targets.values():
                counts[t.state] = counts.get(t.state, 0) + 1
        return counts


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts else None


def _variant_table(
    artifacts: Sequence[Artifact], corrupt: Callable[[str], str | None] = lambda _: None
) -> dict[str, dict[str, Any]]:
    """Each variant's artifact and requirements, as ``choose_variant`` takes them (corrupt ones left out)."""
    return {
        a.variant: {
            "artifact_id": a.id,
            "min_ram_bytes": a.signed_manifest["manifest"]["requirements"]["min_ram_bytes"],
            "min_disk_bytes": a.signed_manifest["manifest"]["requirements"].get("min_disk_bytes", 0),
        }
        for a in artifacts
        if corrupt(a.id) is None
    }


def _new_target(
    session: Session,
    deployment_id: str,
    device: Device,
    by_variant: dict[str, dict[str, Any]],
    rule: str,
    max_concurrent: int | None,
) -> Target:
    """A device's target in a deployment (failed at once when no variant fits), its row added to ``session``."""
    choice = choose_variant(device.hardware, by_variant, rule)
    previous = next((m for m in device.installed if m.get("active", True)), None)
    target = Target(
        deployment_id,
        device.id,
        choice.artifact_id,
        choice.variant,
        previous=previous,
        queued=choice.artifact_id is not None and max_concurrent is not None,
    )
    if choice.artifact_id is None:
        target.update(time.time(), state="failed", reason=choice.reason)
    session.add(
        DeploymentTarget(
            deployment_id=deployment_id,
            device_id=device.id,
            artifact_id=choice.artifact_id,
            variant=choice.variant,
            state=target.state,
            reason=target.reason,
            previous=previous,
            queued=target.queued,
        )
    )
    return target
