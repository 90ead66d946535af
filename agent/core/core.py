"""The agent's protocol core: birth and will, commands, periodic telemetry, events.

Deployments (Deploy, Rollback, Activate, Commit, Cancel and the chunk frames) are routed to an optional
``DeploymentHooks`` object (``agent.deploy.driver.DeploymentDriver`` on devices and in simulations),
which also supplies the installed models for the birth message.

Every command but ``ping`` must pass the ``CommandGuard`` first: sealed by the controller for this device, not
expired, never seen before (``agent.core.guard``); a device with a client certificate renews it through the
optional ``CertificateHooks`` (``agent.runtime.identity``).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import ValidationError

from agent.core.actions import Action, Publish, Subscribe
from agent.core.guard import CommandGuard
from agent.transport.base import Will
from wire import codec, topics
from wire.messages import (
    MAX_BYTES,
    MAX_CPU_PERCENT,
    MAX_TEMPERATURE_C,
    MAX_UPTIME_S,
    MIN_TEMPERATURE_C,
    Activate,
    AgentEvent,
    Cancel,
    CertificateRequest,
    CommandAck,
    Commit,
    Configure,
    Deploy,
    DeploymentEvent,
    DeployState,
    DeviceOffline,
    DeviceOnline,
    HardwareProfile,
    InferenceStats,
    InstallCertificate,
    InstalledModel,
    ModelRef,
    Ping,
    Rollback,
    Telemetry,
)
from wire.signing import VerificationError
from wire.topics import DeviceChannel

log = logging.getLogger(__name__)

#: a refused command is reported to the controller at most this often per reason (an attacker's stream of
#: forged commands must not become a stream of events that pushes real telemetry out of the spool)
REFUSAL_REPORT_INTERVAL_S = 60.0
#: refusals reported per interval, at most
MAX_REFUSAL_REPORTS = 10
#: why a Deploy can never be accepted by this agent as it is configured (its deployment fails at once)
_NEVER_ACCEPTED = frozenset({"no_key", "wrong_key", "unsigned"})

DeployCommand = Deploy | Rollback | Activate | Commit | Cancel
_DEPLOY_COMMANDS = (Deploy, Rollback, Activate, Commit, Cancel)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Stop receiving ``filter`` (an artifact's chunk broadcast once the download is over)."""

    filter: str


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Close the broker connection cleanly and connect again with fresh credentials (a renewed certificate)."""

    reason: str


#: What the core (with deployments) asks its driver to do.
CoreAction = Action | Unsubscribe | Reconnect


class CertificateHooks(Protocol):
    """The device's client certificate for the broker (``agent.runtime.identity.ClientIdentity``)."""

    def renewal(self, now: float) -> CertificateRequest | None:
        """A request for a new certificate when the current one is due for renewal (seq is set by the core)."""
        ...

    def install(self, command: InstallCertificate, now: float) -> str | None:
        """Take the renewed certificate; None when done, else why not."""
        ...

    def next_wakeup(self) -> float | None: ...


class DeploymentHooks(Protocol):
    """What the core needs from the deployment side (``agent.deploy.driver.DeploymentDriver``)."""

    def bind(self, birth: Callable[[float], Publish]) -> None:
        """Called once by the core: how to build a fresh birth message when the installed models change."""
        ...

    def handles(self, topic: str) -> bool:
        """True for the chunk topics the deployment side subscribes to."""
        ...

    def on_command(self, command: DeployCommand, now: float) -> list[CoreAction]: ...

    def on_chunk(self, topic: str, payload: bytes, now: float) -> list[CoreAction]: ...

    def on_connected(self, now: float) -> list[CoreAction]: ...

    def tick(self, now: float) -> list[CoreAction]: ...

    def next_wakeup(self) -> float | None: ...

    def installed(self) -> list[InstalledModel]: ...


@dataclass
class CoreConfig:
    device_id: str
    agent_version: str
    keepalive_s: int = 30
    telemetry_interval_s: float = 10.0
    labels: dict[str, str] = field(default_factory=dict)
    capabilities: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TelemetrySample:
    """What the driver measured for one telemetry message."""

    cpu_percent: float
    rss_bytes: int
    temperature_c: float | None = None
    model: ModelRef | None = None
    inference: InferenceStats | None = None
    spool_depth: int = 0
    spool_dropped: int = 0
    serving_s: float | None = None
    model_rss_bytes: int | None = None


Sampler = Callable[[float], TelemetrySample]
InstalledProvider = Callable[[], list[InstalledModel]]


class AgentCore:
    """Decides what to publish and when. Call its methods with the current time ``now`` (seconds)."""

    def __init__(
        self,
        config: CoreConfig,
        hardware: HardwareProfile,
        sampler: Sampler,
        *,
        started_at: float,
        installed: InstalledProvider | None = None,
        deployments: DeploymentHooks | None = None,
        guard: CommandGuard | None = None,
        certificates: CertificateHooks | None = None,
    ) -> None:
        """``guard`` admits signed commands (``agent.core.guard``); without one every command but ``ping``
        is refused, as an agent without a pinned signing key must. ``certificates``: the client certificate
        of a device that authenticates to the broker with one (renewed before it expires)."""
        self.config = config
        self.certificates = certificates
        self.guard = guard or CommandGuard(config.device_id, None)
        self._refusals_reported: dict[str, float] = {}
        self.hardware = hardware
        self._sampler = sampler
        self._deployments: DeploymentHooks | None = None
        self._fallback_installed: InstalledProvider = installed or list
        self._installed: InstalledProvider = self._fallback_installed
        self._started_at = started_at
        self._seq = 0
        self._telemetry_seq = 0
        self._next_telemetry = started_at + config.telemetry_interval_s
        self._last_telemetry = started_at
        self.drops = codec.DropCounter(log)
        #: this MQTT connection's id in births (new on every connect): the controller keeps "online since"
        self._connection: str | None = None
        self._topic_state = topics.state(config.device_id)
        self._topic_telemetry = topics.telemetry(config.device_id)
        self._topic_events = topics.events(config.device_id)
        self._topic_cmd = topics.cmd(config.device_id)
        if deployments is not None:
            self.attach_deployments(deployments)

    def attach_deployments(self, deployments: DeploymentHooks) -> None:
        """Route deployment commands and chunk frames to ``deployments`` (also after construction).

        The birth then reports what the slots hold (the pointer file and slot metadata: the truth after
        any switch, rollback or restart); while no slot is active it falls back to the ``installed``
        provider given at construction (e.g. a model configured outside deployments).
        """
        self._deployments = deployments
        fallback = self._fallback_installed

        def installed() -> list[InstalledModel]:
            return deployments.installed() or fallback()

        self._installed = installed
        deployments.bind(self.birth)

    # ------------------------------------------------------------- hooks --

    def will(self, now: float) -> Will:
        """The last will to register with the broker: a retained ``offline``."""
        return Will(self._topic_state, codec.encode(DeviceOffline(ts=now, reason="will")), qos=1, retain=True)

    def on_connected(self, now: float) -> list[CoreAction]:
        """Subscribe to commands and announce ourselves (again, after every reconnect)."""
        self._connection = secrets.token_hex(8)
        extra = self._deployments.on_connected(now) if self._deployments is not None else []
        return [Subscribe(self._topic_cmd, 1), *extra, self.birth(now)]

    def birth(self, now: float) -> Publish:
        msg = DeviceOnline(
            ts=now,
            agent_version=self.config.agent_version,
            hardware=self.hardware,
            installed=self._installed(),
            labels=self.config.labels,
            keepalive_s=self.config.keepalive_s,
            telemetry_interval_s=self.config.telemetry_interval_s,
            capabilities=self.config.capabilities,
            connection=self._connection,
        )
        return Publish(self._topic_state, codec.encode(msg), qos=1, retain=True)

    def goodbye(self, now: float) -> Publish:
        """A clean ``offline`` for a planned shutdown."""
        return Publish(self._topic_state, codec.encode(DeviceOffline(ts=now, reason="shutdown")), qos=1, retain=True)

    def on_message(self, topic: str, payload: bytes, now: float) -> list[CoreAction]:
        """Handle a message on one of our subscriptions. Invalid ones are counted and dropped."""
        if self._deployments is not None and self._deployments.handles(topic):
            return self._deployments.on_chunk(topic, payload, now)  # binary frames, not JSON
        parsed = topics.parse_device(topic)
        if parsed is None or parsed.device_id != self.config.device_id or parsed.channel != DeviceChannel.CMD:
            self.drops.drop(topic, "cmd", "topic", "not a command topic of this device")
            return []
        try:
            obj, command = codec.parse_command(payload)
        except codec.PayloadError as exc:
            self.drops.drop(topic, "cmd", exc.reason, exc.detail)
            return []
        if not isinstance(command, Ping):
            try:
                self.guard.admit(obj, now)
            except VerificationError as exc:
                return self._refused(command, exc, topic, now)
        if isinstance(command, Ping):
            return [self._ack(command.command_id, True, "pong", now)]
        if isinstance(command, Configure):
            return self._configure(command, now)
        if isinstance(command, InstallCertificate):
            return self._install_certificate(command, now)
        if isinstance(command, _DEPLOY_COMMANDS):
            if self._deployments is None:
                return [self._ack(command.command_id, False, "this agent does not take deployments", now)]
            return self._deployments.on_command(command, now)
        return []  # pragma: no cover - the union is exhaustive

    def tick(self, now: float) -> list[CoreAction]:
        """Emit telemetry when it is due; let the deployment side act on time (repairs, progress); ask for a
        new client certificate when the current one is due."""
        actions: list[CoreAction] = self._deployments.tick(now) if self._deployments is not None else []
        request = self.certificates.renewal(now) if self.certificates is not None else None
        if request is not None:
            request = request.model_copy(update={"seq": self._next_seq()})  # ts stays: the proof covers it
            actions.append(Publish(self._topic_events, codec.encode(request), qos=1, durable=False))
        return actions + self._telemetry(now)

    def _telemetry(self, now: float) -> list[CoreAction]:
        if now < self._next_telemetry:
            return []
        interval = max(now - self._last_telemetry, 1e-6)
        sample = self._sampler(interval)
        temperature = sample.temperature_c
        if temperature is not None and not MIN_TEMPERATURE_C <= temperature <= MAX_TEMPERATURE_C:
            temperature = None  # a sensor's error value (e.g. 1000 degrees), not a temperature
        try:
            msg = Telemetry(
                ts=now,
                seq=self._telemetry_seq,
                interval_s=min(interval, 86400.0),
                uptime_s=min(max(0.0, now - self._started_at), MAX_UPTIME_S),
                cpu_percent=min(sample.cpu_percent, MAX_CPU_PERCENT) if math.isfinite(sample.cpu_percent) else 0.0,
                rss_bytes=min(sample.rss_bytes, MAX_BYTES),
                temperature_c=temperature,
                model=sample.model,
                inference=sample.inference,
                spool_depth=sample.spool_depth,
                spool_dropped=sample.spool_dropped,
                serving_s=None if sample.serving_s is None else min(max(0.0, sample.serving_s), MAX_UPTIME_S),
                model_rss_bytes=None if sample.model_rss_bytes is None else min(sample.model_rss_bytes, MAX_BYTES),
            )
        except ValidationError as exc:  # a measurement beyond the wire schema must not stop the agent's loop
            log.error("telemetry %d not sent: a measured value is out of range: %s", self._telemetry_seq, exc)
            msg = None
        self._telemetry_seq += 1
        self._last_telemetry = now
        period = self.config.telemetry_interval_s
        # Stay on the grid; after a long stall, skip the missed slots instead of bursting.
        self._next_telemetry += period
        if self._next_telemetry <= now:
            self._next_telemetry = now + period
        if msg is None:
            return []
        return [Publish(self._topic_telemetry, codec.encode(msg), qos=1, durable=True)]

    def next_wakeup(self) -> float:
        wakes = [self._next_telemetry]
        for hooks in (self._deployments, self.certificates):
            wake = hooks.next_wakeup() if hooks is not None else None
            if wake is not None:
                wakes.append(wake)
        return min(wakes)

    def event(self, kind: str, message: str, now: float) -> Publish:
        """An agent event (started, error, ...), durable."""
        msg = AgentEvent(ts=now, seq=self._next_seq(), kind=kind, message=message[:4096])
        return Publish(self._topic_events, codec.encode(msg), qos=1, durable=True)

    # ---------------------------------------------------------- commands --

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _ack(self, command_id: str, ok: bool, detail: str, now: float) -> Publish:
        msg = CommandAck(ts=now, seq=self._next_seq(), command_id=command_id, ok=ok, detail=detail)
        return Publish(self._topic_events, codec.encode(msg), qos=1, durable=True)

    def _refused(self, command: object, exc: VerificationError, topic: str, now: float) -> list[CoreAction]:
        """A command not signed for this device, expired or replayed: counted and logged, never obeyed.

        The controller hears of it without letting a stream of forged commands become a stream of events that
        pushes real telemetry out of the spool: a Deploy this device can never accept (no pinned key, another
        key, unsigned) fails that deployment, like a manifest it refuses; anything else is an undurable
        ``command_refused`` event. Either at most once a minute per deployment or reason, and ten a minute
        in all.
        """
        what = f"{getattr(command, 'type', '?')} {getattr(command, 'command_id', '?')}"
        self.drops.drop(topic, "cmd", exc.reason, f"{what} refused: {exc}")
        permanent = isinstance(command, Deploy) and exc.reason in _NEVER_ACCEPTED
        key = f"deploy:{command.deployment_id}" if isinstance(command, Deploy) and permanent else exc.reason
        if not self._may_report(key, now):
            return []
        if isinstance(command, Deploy) and permanent:
            failed = DeploymentEvent(
                ts=now,
                seq=self._next_seq(),
                deployment_id=command.deployment_id,
                artifact_id=command.manifest.manifest.artifact_id,
                state=DeployState.FAILED,
                reason=f"{exc.reason}: {exc}"[:4096],
            )
            return [Publish(self._topic_events, codec.encode(failed), qos=1, durable=True)]
        msg = AgentEvent(
            ts=now, seq=self._next_seq(), kind="command_refused", message=f"{what} refused: {exc.reason}: {exc}"[:4096]
        )
        return [Publish(self._topic_events, codec.encode(msg), qos=1, durable=False)]

    def _may_report(self, key: str, now: float) -> bool:
        reported = self._refusals_reported
        for old in [k for k, t in reported.items() if now - t >= REFUSAL_REPORT_INTERVAL_S or t > now]:
            del reported[old]
        if key in reported or len(reported) >= MAX_REFUSAL_REPORTS:
            return False
        reported[key] = now
        return True

    def _install_certificate(self, command: InstallCertificate, now: float) -> list[CoreAction]:
        if self.certificates is None:
            return [self._ack(command.command_id, False, "this agent does not use a client certificate", now)]
        problem = self.certificates.install(command, now)
        if problem is not None:
            return [self._ack(command.command_id, False, f"certificate refused: {problem}", now)]
        # acknowledged before reconnecting: the ack goes out on the old connection or, spooled, on the new one
        ack = self._ack(command.command_id, True, f"certificate {command.serial} installed", now)
        return [ack, Reconnect(f"renewed client certificate {command.serial}")]

    def _configure(self, command: Configure, now: float) -> list[CoreAction]:
        actions: list[CoreAction] = []
        if command.telemetry_interval_s is not None:
            self.config.telemetry_interval_s = command.telemetry_interval_s
            self._next_telemetry = min(self._next_telemetry, now + command.telemetry_interval_s)
            actions.append(self.birth(now))  # the controller learns the new interval from the state
        actions.append(self._ack(command.command_id, True, "configured", now))
        return actions
