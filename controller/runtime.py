"""Everything a running controller holds: database, device registry, writer, MQTT bridge, scheduler.

``create_app`` wraps one of these in a FastAPI app; tests can build several
with different settings in one process.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import delete, select

from agent import __version__
from agent.transport.mqtt import MqttConfig, parse_broker_url
from controller.broker import dynsec
from controller.broker.dynsec import DynsecAdmin
from controller.broker.embedded import EmbeddedBroker
from controller.cluster.keeper import LeaseKeeper, Ownership, SoleOwner
from controller.db.engine import make_engine, migrate
from controller.db.models import Device, DeviceEvent, TelemetryRecord, table
from controller.db.types import utcnow
from controller.delivery.service import DeliveryService
from controller.devices.commands import CommandSender
from controller.devices.registry import DeviceRegistry
from controller.enrollment.service import EnrollmentService
from controller.health.rollup import HealthRollupJob
from controller.jobs.service import DeriveService, JobSettings
from controller.metrics import Metrics
from controller.mqtt.bridge import MqttBridge
from controller.mqtt.handlers import DeviceTrafficHandler
from controller.mqtt.nats_ingest import Handoff, NatsIngest, StateDedup, ingest_subscriptions
from controller.notify.outbox import Notifier
from controller.notify.sender import SenderSettings, WebhookSender
from controller.notify.triggers import Triggers
from controller.pki import broker as pki_broker
from controller.pki.authority import PkiError
from controller.pki.service import CRL_REFRESH, DevicePki
from controller.registry.integrity import ArtifactIntegrity
from controller.registry.service import RegistryService
from controller.rollouts.engine import RolloutEngine
from controller.settings import ControllerSettings
from controller.telemetry.ingest import IngestWriter, LastSeen, Offline
from wire import chunks as frames
from wire import topics
from wire.messages import CertificateRequest, CommandAck, InstallCertificate

log = logging.getLogger(__name__)


#: room for the topic, packet id and MQTT 5 properties around the largest payload the controller accepts
RECEIVE_OVERHEAD = 8 * 1024
#: with a shared artifact store, how old this replica's copy of the corrupt marks may be (another marks or repairs)
MARKS_REFRESH_S = 5.0


class ControllerRuntime:
    def __init__(self, settings: ControllerSettings, embedded_broker: EmbeddedBroker | None = None) -> None:
        """``embedded_broker``: the broker ``slmfleet up`` started (its supervision shows in metrics and health)."""
        self.settings = settings
        self.embedded_broker = embedded_broker
        self.engine = make_engine(settings.resolved_database_url)
        self.metrics = Metrics()
        #: who drives what: one controller drives everything; a replica what it holds leases for
        self.keeper: LeaseKeeper | None = None
        self.owner: Ownership = SoleOwner()
        if settings.replica:
            scheme = "https" if settings.https else "http"
            self.keeper = LeaseKeeper(
                self.engine,
                settings.replica_id or f"{socket.gethostname()}-{os.getpid()}",
                settings.lease_ttl_s,
                url=settings.public_url or f"{scheme}://{settings.http_host}:{settings.http_port}",
                version=__version__,
            )
            self.owner = self.keeper
        self.metrics.watch_leases(self._leases_by_kind)
        if embedded_broker is not None:
            self.metrics.watch_broker(embedded_broker)
        self.registry = DeviceRegistry(settings.offline_after_factor)
        self.metrics.watch_devices(self.registry.counts)
        self.writer = IngestWriter(
            self.engine,
            batch_size=settings.ingest_batch_size,
            flush_interval_s=settings.ingest_flush_interval_s,
            queue_max=settings.ingest_queue_max,
            on_written=self._written,
            on_dropped=self.metrics.ingest_dropped.inc,
        )
        if settings.shared_artifacts:
            migrate(self.engine)  # the signing key the replicas share is read from the database just below
        elif settings.mqtt_shared_group:
            log.warning(
                "several controllers (mqtt_shared_group) with a local artifact store: a replica that did not import a"
                ' version cannot send it, and each signs with its own key; set artifact_store = "database"'
            )
        self.models = RegistryService(
            self.engine,
            settings.data_dir,
            chunk_size=settings.chunk_size,
            validity_days=settings.manifest_validity_days,
            max_unpacked_bytes=settings.unpack_max_bytes,
            floors=settings.min_agreement,
            artifact_store=settings.artifact_store,
            secrets_key=settings.shared_secrets_key,
        )
        self.jobs = DeriveService(
            self.engine,
            self.models,
            settings.data_dir,
            self.owner,
            JobSettings(
                memory_mb=settings.jobs_memory_mb,
                threads=settings.jobs_threads,
                nice=settings.jobs_nice,
                concurrency=settings.jobs_concurrency,
                max_unpacked_bytes=settings.unpack_max_bytes,
            ),
        )
        #: every command to a device goes out through this: sealed for that device (wire.signing)
        self.commands = CommandSender(self.models.key, settings.command_ttl_s)
        #: artifacts damaged in the store (marked, announced, repaired); listeners get each new mark
        self.integrity = ArtifactIntegrity(
            self.engine,
            self.models.store,
            self.metrics,
            refresh_s=MARKS_REFRESH_S if self.models.store.shared else None,
        )
        self.webhook_sender = WebhookSender(
            self.engine,
            SenderSettings(
                concurrency=settings.webhook_concurrency,
                timeout_s=settings.webhook_timeout_s,
                max_attempts=settings.webhook_max_attempts,
                retry_base_s=settings.webhook_retry_base_s,
                retry_max_s=settings.webhook_retry_max_s,
            ),
        )
        self.notifier = Notifier(self.engine, wake=self.webhook_sender.wake)
        self.triggers = Triggers(self.engine, self.notifier, settings.public_url, settings.notify_offline_after_s)
        #: the bridge to the broker, made in start() (None without broker_url)
        self.bridge: MqttBridge | None = None
        #: device traffic over NATS's own protocol (ingest = nats), made in start()
        self.nats_ingest: NatsIngest | None = None
        #: ingest = nats: state messages arrive over NATS and over MQTT; the first copy of each is handled
        self._states: StateDedup | None = None
        #: the broker's dynamic-security administrator when broker_auth is dynsec (it publishes through the bridge)
        self.broker_admin: DynsecAdmin | None = None
        if settings.broker_url and settings.broker_auth == "dynsec":
            self.broker_admin = DynsecAdmin(
                self._publish, connected=lambda: self.bridge is not None and self.bridge.connected
            )
        self.delivery = DeliveryService(
            self.engine,
            self.models.store,
            self.models.key,
            self.metrics,
            commands=self.commands,
            integrity=self.integrity,
            is_online=lambda device_id: self.registry.status(device_id) == "online",
            on_target_change=[lambda target: self.rollouts.on_target_change(target)],  # the engine is made next
            on_finish=self.triggers.deployment_finished,
            grant_artifact=(
                self.broker_admin.grant_artifact
                if self.broker_admin is not None and settings.broker_artifact_acl != "fleet"
                else None
            ),
            owner=self.owner,
        )
        self.metrics.watch_targets(self.delivery.state_counts)
        self.rollouts = RolloutEngine(
            self.engine, self.delivery, on_transition=self.triggers.rollout_transition, owner=self.owner
        )
        if self.keeper is not None:
            self.keeper.on_lost.append(self.delivery.lost)
        self.health = HealthRollupJob(self.engine)
        #: client certificates for devices (mutual TLS with the broker), when device_certificates is on
        self.pki: DevicePki | None = None
        if settings.device_certificates:
            self.pki = DevicePki(
                self.engine,
                pki_broker.authority(settings, self.engine),
                pki_broker.crl_path(settings),
                timedelta(hours=settings.device_cert_hours),
                settings.broker_reload_command,
                reload_broker=embedded_broker.reload if embedded_broker is not None else None,
            )
        self.handler = DeviceTrafficHandler(
            self.registry,
            self.writer,
            self.metrics,
            max_payload=settings.max_control_payload,
            telemetry_rate_per_s=settings.telemetry_rate_per_s,
            telemetry_burst=settings.telemetry_burst,
            control_rate_per_s=settings.control_rate_per_s,
            control_burst=settings.control_burst,
            max_clock_skew_s=settings.max_clock_skew_s,
            max_age_s=settings.telemetry_retention_days * 86400,
            on_deployment_event=self.delivery.on_event,
            on_chunk_request=self.delivery.on_chunk_request,
            on_birth=self.delivery.device_online,
            knows_deployment=self.delivery.knows,
            on_cert_request=self._certificate_requested if self.pki is not None else None,
            on_ack=self._acknowledged if self.pki is not None else None,
            unknown_hold_s=settings.effective_unknown_hold_s,
        )
        self.enrollment = EnrollmentService(
            self.engine,
            lambda: self.settings.device_broker_url or self.settings.broker_url,
            self.models.key.public_pem,
            settings.broker_ca_file,
            self.broker_admin,
            self._barred_changed,
            drain=lambda: self.writer.flush(10),
        )
        self.scheduler = BackgroundScheduler(
            timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
        )
        self.started = False

    # ------------------------------------------------------------ life --

    def start(self) -> None:
        """Migrate the schema, load the registry, start writer, MQTT and scheduled jobs."""
        s = self.settings
        migrate(self.engine)
        if self.keeper is not None:
            self.keeper.start()
        self._load_registry()
        self.enrollment.load()
        self.integrity.load()
        if self.pki is not None:
            self.pki.publish_crl()  # from the database: what the last run revoked, valid for a week again
        self.models.start()
        self.jobs.start()
        self.writer.start()
        self.notifier.reload()
        self.webhook_sender.start()  # deliveries left pending by the last run go out now
        if s.broker_url:
            fields = parse_broker_url(s.broker_url)
            if s.mqtt_username:
                fields["username"] = s.mqtt_username
            if s.mqtt_password:
                fields["password"] = s.mqtt_password
            if fields.get("tls") and s.broker_ca_file is not None:
                fields["ca_file"] = str(s.broker_ca_file)
            # Only device state, telemetry and events come in, each at most max_control_payload: an MQTT 5 broker is
            # told so and discards anything larger instead of sending it (a 100 MB publish never reaches us).
            config = MqttConfig(
                **fields,
                keepalive_s=s.mqtt_keepalive_s,
                protocol=s.mqtt_protocol,
                reconnect_max_s=5.0,
                max_packet_size=s.max_control_payload + RECEIVE_OVERHEAD,
                # a replica's session ends with its connection: the broker stops handing it a share of the device
                # traffic as soon as it dies, instead of queueing that share for a session nobody resumes
                persistent_session=not s.replica,
            )
            device_filters = self.handler.subscriptions(s.mqtt_shared_group)
            subscriptions = list(device_filters)
            over_nats: list[tuple[str, int]] = []
            if s.ingest == "nats":
                # Telemetry and events (the shared filters) come over NATS in a queue group. State comes both ways,
                # to every replica: over NATS, and over MQTT, where retained births arrive on subscribing and those
                # sent while this controller was away wait in its persistent session. The second copy of a state is
                # dropped. A birth may be handled after the telemetry it allows (another subscription, another
                # nats-py task): the handler holds that telemetry for it (unknown_hold_s, controller/mqtt/held.py).
                by_group = self.handler.subscriptions(s.nats_queue_group)
                over_nats = list(by_group)
                subscriptions = [f for f in by_group if not f[0].startswith("$share/")]
                self._states = StateDedup()
            if self.broker_admin is not None:
                subscriptions.append((dynsec.RESPONSE_TOPIC, 1))
            admin = self.broker_admin
            on_reconnect = [self._check_broker_limit]
            if s.ingest == "nats":  # a persistent session of an earlier MQTT-ingest run must not deliver them too
                stale = [f for f in device_filters if f not in subscriptions]
                on_reconnect.append(lambda: self._drop_subscriptions(stale))
            if admin is not None:
                fleet_wide = s.broker_artifact_acl == "fleet"
                on_reconnect += [admin.forget_grants, lambda: admin.set_fleet_artifact_access(fleet_wide)]
            on_reconnect.append(self.delivery.reconnected)  # last: artifact grants are forgotten before it re-grants
            self.bridge = MqttBridge(
                config,
                s.mqtt_client_id,
                self._on_message,
                subscriptions,
                on_connection_change=lambda up: self.metrics.mqtt_connected.set(1 if up else 0),
                on_oversize=self._oversize,
                on_reconnect=on_reconnect,
            )
            self.bridge.start()
            self.delivery.attach(self.bridge)
            if s.ingest == "nats" and s.nats_url:
                # into the MQTT loop's thread, where the handler and delivery expect device traffic
                handoff = Handoff(self.bridge.call_soon, self._on_message)
                self.nats_ingest = NatsIngest(
                    [u.strip() for u in s.nats_url.split(",") if u.strip()],
                    ingest_subscriptions(over_nats),
                    handoff.put,
                    name=s.mqtt_client_id,
                    user=s.nats_user,
                    password=s.nats_password,
                    on_connection_change=lambda up: self.metrics.nats_connected.set(1 if up else 0),
                )
                self.nats_ingest.start()
        else:
            log.warning("no broker_url: the controller serves its API but hears no devices")
        # jobs over the whole fleet run on the replica holding their lease (job:<id>); the per-process ones
        # (this replica's memory: last-seen, the delivery's flush and timeouts) run everywhere
        self.scheduler.add_job(
            self._leased("presence-sweep", self.sweep), "interval", seconds=s.sweep_interval_s, id="presence-sweep"
        )
        self.scheduler.add_job(
            self._leased("telemetry-retention", self.apply_retention), "interval", hours=1, id="telemetry-retention"
        )
        self.scheduler.add_job(self.flush_last_seen, "interval", seconds=5, id="last-seen")
        self.scheduler.add_job(self.delivery.flush, "interval", seconds=1, id="delivery-flush")
        self.scheduler.add_job(self.delivery.check_timeouts, "interval", seconds=2, id="delivery-timeouts")
        self.scheduler.add_job(self.delivery.nudge, "interval", seconds=2, id="delivery-nudge")
        if self.handler.held is not None:
            self.scheduler.add_job(self._expire_held, "interval", seconds=1, id="held-traffic")
        self.scheduler.add_job(
            self._leased("health-rollup", self.health.run), "interval", seconds=s.health_interval_s, id="health-rollup"
        )
        if s.notify_offline_after_s > 0:
            every = max(1.0, min(15.0, s.notify_offline_after_s / 4))
            self.scheduler.add_job(
                self._leased("notify-offline", self.triggers.check_devices),
                "interval",
                seconds=every,
                id="notify-offline",
            )
        if self.pki is not None:  # a CRL expires; a broker holding an expired one refuses every device
            interval = CRL_REFRESH.total_seconds()
            self.scheduler.add_job(
                self._leased("device-crl", self.pki.publish_crl), "interval", seconds=interval, id="device-crl"
            )
        if self.keeper is not None:
            self.scheduler.add_job(self.delivery.drive, "interval", seconds=1, id="delivery-drive")
        self.scheduler.add_job(self.jobs.drive, "interval", seconds=1, id="derive-drive", next_run_time=utcnow())
        self.rollouts.resume_all()
        self.scheduler.add_job(self.rollouts.step_all, "interval", seconds=s.rollout_step_s, id="rollouts")
        self.scheduler.start()
        self.started = True

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        self.scheduler.shutdown(wait=False)
        self.delivery.stop()
        if self.nats_ingest is not None:
            self.nats_ingest.stop()
        if self.keeper is not None:
            self.keeper.stop()  # the other replicas take this one's work over at once
        if self.bridge is not None:
            self.bridge.stop()
        self.delivery.flush()  # what devices reported while the connection was closing
        self.flush_last_seen()
        self.writer.stop()
        self.webhook_sender.stop()
        self.jobs.stop()
        self.models.stop()
        self.engine.dispose()

    # ------------------------------------------------------------ jobs --

    def sweep(self) -> list[str]:
        """Mark offline the devices whose silence outlasted their limit (a will the broker never sent)."""
        bridge = self.bridge
        if bridge is None or bridge.connected_since is None:
            return []
        now = time.time()
        if self.owner.clustered:  # a device's telemetry is spread over the replicas: what the others heard counts
            t = table(Device).c
            with self.engine.connect() as conn:
                rows = conn.execute(select(t.id, t.last_seen).where(t.status == "online")).all()
            for device_id, last_seen in rows:
                self.registry.learned(device_id, last_seen.timestamp())
        lapsed = self.registry.lapsed(now, bridge.connected_since)
        for device_id in lapsed:
            log.info("device %s silent beyond its keepalive: marked offline", device_id)
            self.writer.put(Offline(device_id, "lapsed", now))
        return lapsed

    def flush_last_seen(self) -> None:
        """Write when devices were last heard (kept in memory between flushes; cheap at any rate)."""
        seen = self.registry.take_seen()
        if seen:
            self.writer.put(LastSeen(seen))

    def apply_retention(self) -> int:
        """Delete telemetry and events older than the retention period."""
        cutoff = utcnow() - timedelta(days=self.settings.telemetry_retention_days)
        with self.engine.begin() as conn:
            n = conn.execute(delete(table(TelemetryRecord)).where(table(TelemetryRecord).c.received_at < cutoff))
            m = conn.execute(delete(table(DeviceEvent)).where(table(DeviceEvent).c.received_at < cutoff))
        removed = (n.rowcount or 0) + (m.rowcount or 0)
        if removed:
            log.info("retention: removed %d telemetry rows and events older than %s", removed, cutoff)
        pruned = self.health.prune() + self.webhook_sender.prune(timedelta(days=self.settings.webhook_log_days))
        if pruned:
            log.info("retention: removed %d old health buckets and webhook deliveries", pruned)
        return removed

    # --------------------------------------------------------- helpers --

    def _leased(self, job_id: str, job: Callable[[], object]) -> Callable[[], None]:
        """``job`` run only while this process holds the lease ``job:<job_id>`` (always, for one controller)."""

        def run() -> None:
            if self.owner.drive(f"job:{job_id}") is not None:
                job()

        run.__name__ = f"leased_{job_id}"
        return run

    def _leases_by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name in self.owner.held():
            kind = name.split(":", 1)[0]
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def _publish(self, topic: str, payload: bytes) -> int:
        """Publish through the bridge (QoS 1) once start() made it; 0 before."""
        return self.bridge.publish(topic, payload, qos=1) if self.bridge is not None else 0

    def _on_message(self, topic: str, payload: bytes) -> None:
        states = self._states
        if states is not None and topic.endswith("/state") and not states.fresh(topic, payload):
            return  # ingest = nats: this state already came the other way (NATS or MQTT)
        if topic == dynsec.RESPONSE_TOPIC:
            if self.broker_admin is not None:
                self.broker_admin.on_response(payload)
            return
        self.handler(topic, payload)

    def _expire_held(self) -> None:
        """Drop what waited too long for its device's birth, on the MQTT loop (where the handler runs)."""
        if self.bridge is not None:
            self.bridge.call_soon(self.handler.expire_held)
        else:
            self.handler.expire_held()

    def _drop_subscriptions(self, filters: list[tuple[str, int]]) -> None:
        transport = self.bridge.transport if self.bridge is not None else None
        if transport is not None:
            for filter_, _ in filters:
                transport.unsubscribe(filter_)

    def _oversize(self, topic: str, size: int) -> None:
        """A message over our limit that a 3.1.1 broker delivered anyway: dropped unread, counted."""
        parsed = topics.parse_device(topic)
        source = parsed.device_id if parsed is not None else topic[:200]
        channel = parsed.channel.value if parsed is not None else "unknown"
        self.handler.drops.drop(source, channel, "too_large", f"{size} bytes, dropped before reading it")

    def _check_broker_limit(self) -> None:
        """Chunk frames larger than the broker accepts would never arrive: say so at once, not per deployment."""
        bridge = self.bridge
        limit = bridge.transport.server_max_packet if bridge is not None and bridge.transport is not None else None
        needed = self.settings.chunk_size + frames.HEADER_SIZE + RECEIVE_OVERHEAD
        if limit is not None and limit < needed:
            log.error(
                "the broker accepts packets of at most %d bytes; chunks of chunk_size %d need %d: deployments"
                " will not arrive. Raise the broker's max_packet_size or lower chunk_size",
                limit,
                self.settings.chunk_size,
                needed,
            )

    def _barred_changed(self, revoked: frozenset[str], forgotten: frozenset[str]) -> None:
        newly = revoked - self.handler.revoked
        self.handler.revoked = revoked
        self.handler.forgotten = forgotten
        for device_id in newly:
            self.registry.offline(device_id)
            if self.pki is not None and self.started:
                self.pki.revoke_device(device_id)  # its certificates go into the CRL, the broker reloads it

    def _certificate_requested(self, device_id: str, request: CertificateRequest) -> None:
        """A device proved its current key and asks for a new certificate (MQTT thread): issue and send it."""
        assert self.pki is not None
        try:
            issued = self.pki.renew(device_id, request, time.time())
        except PkiError as exc:
            self.handler.drops.drop(device_id, "events", "cert_refused", str(exc))
            return
        command = InstallCertificate(
            ts=time.time(), command_id=f"cert-{issued.serial}", cert_pem=issued.cert_pem, serial=issued.serial
        )
        self.commands.send(device_id, command)

    def _acknowledged(self, device_id: str, ack: CommandAck) -> None:
        if self.pki is not None and ack.ok and ack.command_id.startswith("cert-"):
            self.pki.installed(device_id, ack.command_id.removeprefix("cert-"))

    def _load_registry(self) -> None:
        t = table(Device).c
        with self.engine.connect() as conn:
            rows = conn.execute(select(t.id, t.status, t.last_seen, t.keepalive_s, t.telemetry_interval_s)).all()
        self.registry.load((r[0], r[1], r[2].timestamp(), r[3], r[4]) for r in rows)

    def _written(self, telemetry: int, events: int) -> None:
        if telemetry:
            self.metrics.telemetry_ingested.inc(telemetry)
        if events:
            self.metrics.events_ingested.inc(events)
