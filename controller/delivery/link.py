"""The delivery's I/O: the commands it sends to devices and the chunks it publishes, through one ``Transport``.

It decides nothing: ``DeliveryService`` decides (``transitions``) and calls these to carry the actions out.
Commands are sealed per send by the ``CommandSender``; a deployment's Deploy is serialized once per artifact
and kept while the deployment runs (a re-send is a new seal of the same body, never a replay).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from sqlalchemy import Engine
from sqlmodel import Session

from controller.db.models import Artifact, Deployment
from controller.delivery.targets import Target
from controller.delivery.transfer import (
    Broadcast,
    ChunkSource,
    ChunkUnavailable,
    OnUnavailable,
    Repairs,
    TransferSettings,
)
from controller.devices.commands import CommandSender
from controller.metrics import Metrics
from controller.registry.keys import SigningKey
from controller.registry.store import ArtifactStore
from wire import signing
from wire.manifest import SignedManifest
from wire.messages import Activate, Cancel, Commit, Deploy, Rollback, ShadowSpec
from wire.signing import CommandBody

log = logging.getLogger(__name__)


class ManifestMissing(Exception):
    """An artifact a deployment names is no longer in the registry."""


class Transport(Protocol):
    """The broker connection the delivery publishes through (``MqttBridge``; an in-memory fake in unit tests)."""

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int: ...

    def publish_tracked(self, topic: str, payload: bytes, on_ack: Callable[[], None], qos: int = 1) -> bool: ...

    def call_soon(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` on the transport's event loop (the transfers run there)."""


class DeliveryLink:
    def __init__(
        self,
        engine: Engine,
        store: ArtifactStore,
        key: SigningKey,
        metrics: Metrics,
        settings: TransferSettings,
        commands: CommandSender,
        on_unavailable: OnUnavailable,
        clock: Callable[[], float],
        grant_artifact: Callable[[str, str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.key = key
        self.metrics = metrics
        self.settings = settings
        #: seals every command for its device (wire.signing) and publishes it
        self.commands = commands
        self.on_unavailable = on_unavailable
        self.clock = clock
        #: lets a device read an artifact's chunk topic at the broker (per-device ACLs), before its command
        self.grant_artifact = grant_artifact
        self.transport: Transport | None = None
        self._manifests: dict[str, SignedManifest] = {}
        #: the Deploy of each unfinished (deployment, device), serialized once per artifact, sealed per send
        self._commands: dict[tuple[str, str], CommandBody] = {}
        self._bodies: dict[tuple[str, str], CommandBody] = {}
        #: chunks checked against their manifest once, per artifact (a repair does not hash them again)
        self._verified: dict[str, set[int]] = {}
        self.broadcasts: dict[str, Broadcast] = {}
        self.repairs: Repairs | None = None

    # ------------------------------------------------------------ life --

    def attach(self, transport: Transport) -> None:
        self.transport = transport
        if self.commands.publish is None:
            self.commands.publish = lambda topic, payload: transport.publish(topic, payload, qos=1)
        transport.call_soon(self._start_repairs)

    def _start_repairs(self) -> None:
        self.repairs = Repairs(self._publish_tracked, self.settings, self._sent("repair"), self.on_unavailable)
        self.repairs.start()

    def stop(self) -> None:
        if self.transport is not None:
            for b in list(self.broadcasts.values()):
                self.transport.call_soon(b.stop)
            if self.repairs is not None:
                self.transport.call_soon(self.repairs.stop)

    def reconnected(self) -> None:
        """paho re-sends what was in flight: the transfers stop waiting for the old session's acknowledgements."""
        for b in self.broadcasts.values():
            b.reconnected()
        if self.repairs is not None:
            self.repairs.reconnected()

    # --------------------------------------------------------- commands --

    def remember(self, session: Session, dep: Deployment, target: Target) -> None:
        """Prepare the target's Deploy (once per artifact of the deployment)."""
        assert target.artifact_id is not None
        body = self._bodies.get((dep.id, target.artifact_id))
        if body is None:
            command = Deploy(
                ts=self.clock(),
                command_id=f"{dep.id[:16]}-deploy",
                deployment_id=dep.id,
                manifest=self.manifest(session, target.artifact_id),
                activate=dep.activate,
                shadow=ShadowSpec(**dep.shadow) if dep.shadow else None,
            )
            body = self._bodies[(dep.id, target.artifact_id)] = signing.command_body(command)
        self._commands[(dep.id, target.device_id)] = body

    def forget(self, deployment_id: str) -> None:
        """The deployment ended: nothing of it is re-sent any more (a late device re-creates its command)."""
        for key in [k for k in self._bodies if k[0] == deployment_id]:
            del self._bodies[key]
        for key in [k for k in self._commands if k[0] == deployment_id]:
            del self._commands[key]

    def manifest(self, session: Session, artifact_id: str) -> SignedManifest:
        signed = self._manifests.get(artifact_id)
        if signed is None:
            artifact = session.get(Artifact, artifact_id)
            if artifact is None:
                raise ManifestMissing(f"artifact {artifact_id} vanished from the registry")
            signed = self._manifests[artifact_id] = SignedManifest.model_validate(artifact.signed_manifest)
        return signed

    def send_deploy(self, target: Target) -> None:
        body = self._commands.get((target.deployment_id, target.device_id))
        if body is None or self.transport is None:
            return
        target.last_command_at = self.clock()
        if self.grant_artifact is not None and target.artifact_id:
            # on the same connection, so the broker applies the grant before the device reads the command
            self.grant_artifact(target.device_id, target.artifact_id)
        self.commands.send(target.device_id, body)  # sealed afresh: a re-send is never a replay

    def send_cancel(self, target: Target, why: str = "cancel") -> None:
        dep = target.deployment_id
        self.send(target.device_id, Cancel(ts=self.clock(), command_id=f"{dep[:16]}-{why}", deployment_id=dep))

    def send_activate(self, target: Target) -> None:
        dep = target.deployment_id
        self.send(target.device_id, Activate(ts=self.clock(), command_id=f"{dep[:16]}-activate", deployment_id=dep))

    def send_commit(self, target: Target) -> None:
        dep = target.deployment_id
        self.send(target.device_id, Commit(ts=self.clock(), command_id=f"{dep[:16]}-commit", deployment_id=dep))

    def send(self, device_id: str, message: Rollback | Cancel | Activate | Commit) -> None:
        if self.transport is not None:
            self.commands.send(device_id, message)

    # ----------------------------------------------------------- chunks --

    def source(self, artifact_id: str) -> ChunkSource | None:
        """Where the artifact's chunks come from; None when its manifest is gone."""
        signed = self._manifests.get(artifact_id)
        if signed is None:
            with Session(self.engine) as session:
                try:
                    signed = self.manifest(session, artifact_id)
                except ManifestMissing:
                    return None
        return ChunkSource(signed.manifest, self.store, self._verified.setdefault(artifact_id, set()))

    def forget_checks(self, artifact_id: str) -> None:
        """The artifact's files changed in the store (a repair): its chunks are checked again when sent."""
        self._verified.pop(artifact_id, None)

    def stop_artifact(self, exc: ChunkUnavailable) -> None:
        """Send nothing more of an artifact whose store copy is damaged."""
        self.forget_checks(exc.artifact_id)
        broadcast = self.broadcasts.get(exc.artifact_id)
        if broadcast is not None:
            broadcast.stop()
        if self.repairs is not None:
            self.repairs.drop_artifact(exc.artifact_id)

    def start_broadcast(self, source: ChunkSource, expected: set[str]) -> Broadcast:
        """A new broadcast of the source's artifact, waiting (briefly) for the ``expected`` devices to listen."""
        broadcast = self.broadcasts[source.artifact_id] = Broadcast(
            source, self._publish_tracked, self.settings, self._sent("broadcast"), expected, self.on_unavailable
        )
        broadcast.start()
        return broadcast

    def repair(self, device_id: str, source: ChunkSource, ranges: list[tuple[int, int]]) -> None:
        if self.repairs is not None:
            self.repairs.request(device_id, source, ranges)

    def _publish_tracked(self, topic: str, payload: bytes, on_ack: Callable[[], None]) -> bool:
        return self.transport is not None and self.transport.publish_tracked(topic, payload, on_ack)

    def _sent(self, kind: str) -> Callable[[int], None]:
        chunks = self.metrics.chunks_published.labels(kind)
        size = self.metrics.bytes_published.labels(kind)

        def count(n: int) -> None:
            chunks.inc()
            size.inc(n)

        return count
