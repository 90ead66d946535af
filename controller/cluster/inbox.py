"""Messages for a deployment another replica drives: a device's report or chunk request that reached this
replica through the shared subscription, or an operator's action served here. Stored in ``cluster_message``; the
driver takes them in order (``take``) and deletes what it handled, so none is lost when a replica dies."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, delete, insert, select

from controller.db.models import ClusterMessage, table
from controller.db.types import utcnow

EVENT = "event"
CHUNKS = "chunks"
OP = "op"


@dataclass(frozen=True)
class Message:
    id: int
    deployment_id: str
    device_id: str
    kind: str
    payload: dict[str, Any]


def put(engine: Engine, deployment_id: str, device_id: str, kind: str, payload: dict[str, Any], sender: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(table(ClusterMessage)).values(
                deployment_id=deployment_id,
                device_id=device_id,
                kind=kind,
                payload=payload,
                sender=sender,
                at=utcnow(),
            )
        )


def waiting(engine: Engine) -> list[str]:
    """Deployments with messages waiting for their driver."""
    t = table(ClusterMessage).c
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(select(t.deployment_id).distinct()).all()]


def take(engine: Engine, deployment_ids: Collection[str], limit: int = 500) -> list[Message]:
    """The oldest waiting messages of these deployments, in the order they came."""
    if not deployment_ids:
        return []
    t = table(ClusterMessage).c
    with engine.connect() as conn:
        rows = conn.execute(
            select(t.id, t.deployment_id, t.device_id, t.kind, t.payload)
            .where(t.deployment_id.in_(list(deployment_ids)))
            .order_by(t.id)
            .limit(limit)
        ).all()
    return [Message(int(r[0]), r[1], r[2], r[3], dict(r[4])) for r in rows]


def done(engine: Engine, ids: Collection[int]) -> None:
    if ids:
        with engine.begin() as conn:
            conn.execute(delete(table(ClusterMessage)).where(table(ClusterMessage).c.id.in_(list(ids))))
