"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from agent import __version__
from controller.api.deps import RuntimeDep
from controller.api.schemas import BrokerHealth, EmbeddedBrokerHealth, Health, NatsIngestHealth, ReplicaHealth
from controller.db.types import from_epoch

log = logging.getLogger(__name__)
router = APIRouter()


@router.get(
    "/api/v1/health",
    response_model=Health,
    tags=["health"],
    responses={503: {"model": Health, "description": "the database cannot be reached"}},
)
def health(runtime: RuntimeDep, response: Response) -> Health:
    """Is the controller working: database reachable, broker connected."""
    database = "ok"
    try:
        with runtime.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        log.warning("health: database check failed: %s", exc)
        database = "error"
    bridge = runtime.bridge
    embedded = runtime.embedded_broker
    broker = BrokerHealth(
        url=runtime.settings.broker_url,
        connected=bool(bridge and bridge.connected),
        embedded=EmbeddedBrokerHealth(
            engine=embedded.engine,
            running=embedded.running,
            pid=embedded.pid,
            restarts=embedded.restarts,
            last_exit=embedded.last_exit,
            last_exit_at=from_epoch(embedded.last_exit_at) if embedded.last_exit_at else None,
        )
        if embedded is not None
        else None,
        nats=NatsIngestHealth(
            connected=nats.connected,
            server=nats.connected_url,
            queue_group=runtime.settings.nats_queue_group,
            received=nats.received,
        )
        if (nats := runtime.nats_ingest) is not None
        else None,
    )
    ok = database == "ok" and (broker.connected or bridge is None) and (embedded is None or embedded.running)
    ok = ok and (broker.nats is None or broker.nats.connected)
    if database != "ok":
        response.status_code = 503
    return Health(
        status="ok" if ok else "degraded",
        version=__version__,
        database=database,
        broker=broker,
        devices=runtime.registry.counts(),
        ingest_queue=runtime.writer.depth,
        replica=ReplicaHealth(
            id=runtime.owner.replica_id, clustered=runtime.owner.clustered, drives=sorted(runtime.owner.held())
        ),
    )


@router.get("/metrics", include_in_schema=False)
def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus text format."""
    m = runtime.metrics
    m.mqtt_connected.set(1 if runtime.bridge and runtime.bridge.connected else 0)
    m.ingest_queue.set(runtime.writer.depth)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
