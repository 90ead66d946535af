"""What the controller does with each message from a device.

Every payload is validated against the wire contract; whatever fails, or
comes from a device that never sent a birth message, is counted and dropped.
Nothing raises into the network thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

from controller.devices.registry import DeviceRegistry
from controller.metrics import Metrics
from controller.mqtt.held import HeldTraffic
from controller.telemetry import fast
from controller.telemetry.bounds import ValueBounds
from controller.telemetry.ingest import Birth, EventIn, IngestWriter, Offline, TelemetryIn, out_of_range
from controller.telemetry.ratelimit import TokenBuckets
from wire import codec, topics
from wire.messages import (
    CertificateRequest,
    ChunkRequest,
    CommandAck,
    DeploymentEvent,
    DeployState,
    DeviceOnline,
    Telemetry,
)
from wire.topics import DeviceChannel

log = logging.getLogger(__name__)


class DeviceTrafficHandler:
    """Routes state, telemetry and events messages into the registry and the writer."""

    def __init__(
        self,
        registry: DeviceRegistry,
        writer: IngestWriter,
        metrics: Metrics,
        *,
        max_payload: int,
        clock: Callable[[], float] = time.time,
        telemetry_rate_per_s: float = 50.0,
        telemetry_burst: int = 1000,
        control_rate_per_s: float = 20.0,
        control_burst: int = 1000,
        max_clock_skew_s: float = 300.0,
        max_age_s: float = 30 * 86400.0,
        on_deployment_event: Callable[[str, DeploymentEvent], None] | None = None,
        on_chunk_request: Callable[[str, ChunkRequest], None] | None = None,
        on_birth: Callable[[str], None] | None = None,
        knows_deployment: Callable[[str, str], bool] = lambda device_id, deployment_id: True,
        on_cert_request: Callable[[str, CertificateRequest], None] | None = None,
        on_ack: Callable[[str, CommandAck], None] | None = None,
        unknown_hold_s: float = 0.0,
    ) -> None:
        self.registry = registry
        self.writer = writer
        self.metrics = metrics
        self.max_payload = max_payload
        self.clock = clock
        self._invalid = metrics.invalid_payloads
        #: hooks for delivery: (device_id, event), (device_id, request), (device_id)
        self.on_deployment_event = on_deployment_event
        self.on_chunk_request = on_chunk_request
        self.on_birth = on_birth
        #: client certificates (controller.pki): renewal requests, and acks of the certificates sent
        self.on_cert_request = on_cert_request
        self.on_ack = on_ack
        self.drops = codec.DropCounter(log, on_drop=lambda ch, reason: self._invalid.labels(ch, reason).inc())
        #: telemetry per device: a flooding device is throttled before its payloads are even parsed
        self.telemetry_limit = TokenBuckets(telemetry_rate_per_s, telemetry_burst)
        self.throttled = Counter(
            "slmfleet_telemetry_throttled",
            "Telemetry messages dropped because their device exceeded its rate (telemetry_rate_per_s, burst)",
            registry=metrics.registry,
        )
        self._throttled_log = codec.DropCounter(log)
        #: births, wills and events per device: a birth makes the controller re-send pending commands, so an
        #: unbounded stream of births would be amplified into commands
        self.control_limit = TokenBuckets(control_rate_per_s, control_burst)
        self.control_throttled = Counter(
            "slmfleet_control_throttled",
            "State and event messages dropped because their device exceeded its rate (control_rate_per_s, burst)",
            ["channel"],
            registry=metrics.registry,
        )
        #: devices an operator revoked: whatever still arrives from them is dropped (counted as "revoked")
        self.revoked: frozenset[str] = frozenset()
        #: devices an operator forgot: their births do not bring them back (dropped, counted as "forgotten")
        self.forgotten: frozenset[str] = frozenset()
        #: values held to what the device can do, timestamps to the controller's clock
        self.bounds = ValueBounds(metrics, max_clock_skew_s, max_age_s)
        #: whether (device, deployment) is one the controller created; reports of others are dropped
        self.knows_deployment = knows_deployment
        #: telemetry and events of a device not born yet, held until its birth (births and telemetry arrive on
        #: different subscriptions, which may be handled out of order); None: dropped at once
        self.held = HeldTraffic(unknown_hold_s) if unknown_hold_s > 0 else None
        self.held_messages = Counter(
            "slmfleet_held_before_birth",
            "Telemetry and event messages that arrived before their device's birth and were held for it"
            " (unknown_hold_s), by outcome: released (handled after the birth), expired or full (dropped)",
            ["outcome"],
            registry=metrics.registry,
        )

    def subscriptions(self, shared_group: str | None = None) -> list[tuple[str, int]]:
        """Topic filters to subscribe to; telemetry and events may be shared between controller replicas."""
        subs = [(topics.all_devices(DeviceChannel.STATE), 1)]
        for channel in (DeviceChannel.TELEMETRY, DeviceChannel.EVENTS):
            f = topics.all_devices(channel)
            subs.append((topics.shared(f, shared_group) if shared_group else f, 1))
        return subs

    def __call__(self, topic: str, payload: bytes) -> None:
        try:
            self._handle(topic, payload)
        except Exception:  # never into paho's loop; keep the others running
            log.exception("handler failed on topic %s", topic)
            self._invalid.labels("unknown", "handler_error").inc()

    def _handle(self, topic: str, payload: bytes) -> None:
        parsed = topics.parse_device(topic)
        if parsed is None:
            self.drops.drop(topic[:200], "unknown", "topic", "not a device topic")
            return
        device_id, channel = parsed.device_id, parsed.channel
        if device_id in self.revoked:
            self.drops.drop(device_id, channel.value, "revoked", "the device was revoked")
            return
        if device_id in self.forgotten:
            self.drops.drop(
                device_id,
                channel.value,
                "forgotten",
                "the device was forgotten: an admin's enrollment token bound to its id brings it back",
            )
            return
        if channel not in (DeviceChannel.STATE, DeviceChannel.TELEMETRY, DeviceChannel.EVENTS):
            self.drops.drop(device_id, channel.value, "topic", "the controller does not consume this channel")
            return
        if channel is DeviceChannel.TELEMETRY and not self.telemetry_limit.allow(device_id):
            self.throttled.inc()
            self._throttled_log.drop(device_id, channel.value, "throttled", "over its telemetry rate")
            return
        if channel is not DeviceChannel.TELEMETRY and not self.control_limit.allow(device_id):
            self.control_throttled.labels(channel.value).inc()
            self._throttled_log.drop(device_id, channel.value, "throttled", "over its state/event rate")
            return
        msg: Any
        try:
            if channel is DeviceChannel.TELEMETRY:  # the hot path: msgspec, pydantic's rules (telemetry/fast.py)
                msg = fast.decode(payload, self.max_payload)
            else:
                msg = codec.decode(channel, payload, self.max_payload)
        except codec.PayloadError as exc:
            self.drops.drop(device_id, channel.value, exc.reason, exc.detail)
            return
        problem = out_of_range(msg)
        if problem is not None:
            self.drops.drop(device_id, channel.value, "out_of_range", problem)
            return
        now = self.clock()
        if isinstance(msg, DeviceOnline):
            self.bounds.learn(device_id, msg.hardware)
            self.registry.online(device_id, now, msg.keepalive_s, msg.telemetry_interval_s)
            self.writer.put(Birth(device_id, msg, now))
            if self.on_birth is not None:
                self.on_birth(device_id)
            if self.held is not None:
                released = self.held.release(device_id)
                if released:
                    self.held_messages.labels("released").inc(len(released))
                for held_channel, held_msg in released:  # in the order they came, after the birth
                    self._route(device_id, held_channel, held_msg, self.clock())
            return
        if not self.registry.known(device_id):
            if channel is DeviceChannel.STATE:
                pass  # a will or goodbye of a device never born: nothing to wait for
            elif self.held is not None and self.held.hold(device_id, channel, msg, len(payload), now):
                return
            elif self.held is not None:
                self.held_messages.labels("full").inc()
            self.drops.drop(device_id, channel.value, "unknown_device", "no birth message was received from it")
            return
        self._route(device_id, channel, msg, now)

    def expire_held(self) -> int:
        """Drop (as ``unknown_device``) what was held longer than ``unknown_hold_s`` without a birth; returns
        how many messages. Called periodically, on any thread."""
        if self.held is None:
            return 0
        dropped = 0
        for device_id, messages in self.held.expire(self.clock()):
            for channel, _msg in messages:
                self.drops.drop(
                    device_id, channel.value, "unknown_device", "no birth message was received from it (held for it)"
                )
            dropped += len(messages)
        if dropped:
            self.held_messages.labels("expired").inc(dropped)
        return dropped

    def _route(self, device_id: str, channel: DeviceChannel, msg: Any, now: float) -> None:
        """A decoded, checked message of a known device: its offline, telemetry, event or request."""
        if channel is DeviceChannel.STATE:  # offline: will or goodbye
            self.registry.offline(device_id)
            self.writer.put(Offline(device_id, msg.reason, now))
            return
        if isinstance(msg, DeploymentEvent | ChunkRequest) and not self.knows_deployment(device_id, msg.deployment_id):
            self.drops.drop(device_id, channel.value, "unknown_deployment", f"no deployment {msg.deployment_id} for it")
            return
        self.registry.heard(device_id, now)
        skew = self.bounds.clock_skew(device_id, channel.value, msg.ts, now)
        if isinstance(msg, fast.FastTelemetry | Telemetry):
            if self.registry.is_replay(device_id, msg.ts, msg.seq):
                self.metrics.telemetry_replays.inc()
                return
            self.writer.put(TelemetryIn(device_id, self.bounds.telemetry(device_id, msg), now, skew))
        elif isinstance(msg, ChunkRequest):
            if self.on_chunk_request is not None:
                self.on_chunk_request(device_id, msg)
        elif isinstance(msg, CertificateRequest):  # not stored: a request, answered with a command
            if self.on_cert_request is None:
                self.drops.drop(device_id, channel.value, "no_pki", "this controller issues no client certificates")
            else:
                self.on_cert_request(device_id, msg)
        elif isinstance(msg, DeploymentEvent):
            # download progress arrives about once a second: keep transitions, not every tick
            if msg.state != DeployState.DOWNLOADING or msg.chunks_have == 0:
                self.writer.put(EventIn(device_id, msg, now, skew))
            if self.on_deployment_event is not None:
                self.on_deployment_event(device_id, msg)
        else:
            self.writer.put(EventIn(device_id, msg, now, skew))
            if isinstance(msg, CommandAck) and self.on_ack is not None:
                self.on_ack(device_id, msg)
