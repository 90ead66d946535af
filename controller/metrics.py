"""Prometheus metrics, one registry per app (so tests can build several apps in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class _DeviceCollector(Collector):
    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("slmfleet_devices", "Known devices by status", labels=["status"])
        for status, n in sorted(self._counts().items()):
            family.add_metric([status], n)
        yield family


class _StateCollector(Collector):
    def __init__(self, name: str, doc: str, counts: Callable[[], dict[str, int]], label: str = "state") -> None:
        self._name, self._doc, self._counts, self._label = name, doc, counts, label

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self._name, self._doc, labels=[self._label])
        for state, n in sorted(self._counts().items()):
            family.add_metric([state], n)
        yield family


class SupervisedBroker(Protocol):
    """What the metrics read of the embedded broker (``controller.broker.embedded.EmbeddedBroker``)."""

    restarts: int

    @property
    def running(self) -> bool: ...


class _BrokerCollector(Collector):
    def __init__(self, broker: SupervisedBroker) -> None:
        self._broker = broker

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily("slmfleet_broker_up", "1 while the embedded broker runs (0: dead or restarting)")
        up.add_metric([], 1 if self._broker.running else 0)
        yield up
        restarts = CounterMetricFamily(
            "slmfleet_broker_restarts", "Times the supervised embedded broker died and was started again"
        )
        restarts.add_metric([], self._broker.restarts)
        yield restarts


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.telemetry_ingested = Counter(
            "slmfleet_telemetry_ingested", "Telemetry messages stored in the database", registry=r
        )
        self.events_ingested = Counter("slmfleet_events_ingested", "Device events stored in the database", registry=r)
        self.invalid_payloads = Counter(
            "slmfleet_invalid_payloads",
            "Received payloads dropped because they failed validation or came from an unknown device",
            ["channel", "reason"],
            registry=r,
        )
        self.ingest_dropped = Counter(
            "slmfleet_ingest_dropped",
            "Valid messages lost because the write queue was full or the database failed",
            registry=r,
        )
        self.telemetry_replays = Counter(
            "slmfleet_telemetry_replays",
            "Telemetry messages received twice (re-sent after a reconnect) and skipped",
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "slmfleet_mqtt_connected", "1 while the controller is connected to the broker", registry=r
        )
        self.nats_connected = Gauge(
            "slmfleet_nats_connected", "1 while the NATS ingest (ingest = nats) is connected", registry=r
        )
        self.ingest_queue = Gauge("slmfleet_ingest_queue_depth", "Received messages waiting to be written", registry=r)
        self.http_writes = Counter("slmfleet_api_writes", "Authenticated write requests", ["action"], registry=r)
        self.api_throttled = Counter(
            "slmfleet_api_throttled",
            "REST API requests answered 429: their source address, API token or enrollment token exceeded its rate",
            ["limit"],
            registry=r,
        )
        self.logins_throttled = Counter(
            "slmfleet_dashboard_logins_throttled",
            "Dashboard logins answered 429 while their source address (for that user, or for all) was backing off",
            ["scope"],
            registry=r,
        )

        self.deployment_transitions = Counter(
            "slmfleet_deployment_transitions", "Deployment state transitions reported by devices", ["state"], registry=r
        )
        self.chunk_requests = Counter("slmfleet_chunk_requests", "Repair requests from devices", registry=r)
        self.chunks_published = Counter(
            "slmfleet_chunks_published", "Artifact chunks published (broadcast or repair)", ["kind"], registry=r
        )
        self.bytes_published = Counter(
            "slmfleet_chunk_bytes_published", "Artifact bytes published, frames included", ["kind"], registry=r
        )
        self.artifact_corruptions = Counter(
            "slmfleet_artifact_corruptions",
            "Artifacts marked corrupt: a file in the controller's store failed its sha256 (nothing is sent from them)",
            registry=r,
        )
        self.chunk_bad_reports = Counter(
            "slmfleet_chunk_bad_reports",
            "Chunks devices received that failed their sha256 (damaged on the way or in the store)",
            registry=r,
        )

    def watch_devices(self, counts: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_DeviceCollector(counts))

    def watch_broker(self, broker: SupervisedBroker) -> None:
        self.registry.register(_BrokerCollector(broker))

    def watch_leases(self, counts: Callable[[], dict[str, int]]) -> None:
        self.registry.register(
            _StateCollector("slmfleet_leases_held", "Leases this replica holds, by kind", counts, label="kind")
        )

    def watch_targets(self, counts: Callable[[], dict[str, int]]) -> None:
        self.registry.register(
            _StateCollector(
                "slmfleet_deployment_targets", "Devices of unfinished and finished deployments by state", counts
            )
        )
