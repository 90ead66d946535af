"""``GET /api/v1/cluster``: the controller replicas sharing the database and the leases (who drives what)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from controller.api.deps import RuntimeDep, ViewerDep
from controller.cluster import leases, replicas

router = APIRouter(tags=["health"])


class ReplicaOut(BaseModel):
    id: str
    host: str
    pid: int
    url: str
    version: str
    started_at: float
    heartbeat_at: float
    alive: bool
    #: this one is the replica that answered
    me: bool


class LeaseOut(BaseModel):
    name: str
    kind: str
    holder: str
    token: int
    acquired_at: float
    expires_at: float
    #: seconds left before it expires (negative: expired; the next replica to ask takes it)
    expires_in_s: float
    live: bool


class ClusterOut(BaseModel):
    #: false: one controller drives everything (no leases are kept)
    clustered: bool
    replica: str
    lease_ttl_s: float
    replicas: list[ReplicaOut]
    leases: list[LeaseOut]


@router.get("/api/v1/cluster", response_model=ClusterOut)
def cluster(runtime: RuntimeDep, _: ViewerDep) -> ClusterOut:
    """The replicas (heard from within 3 lease TTLs: alive) and every lease with its holder, token and expiry.
    Times are the database's clock, in epoch seconds."""
    me = runtime.owner.replica_id
    ttl = runtime.settings.lease_ttl_s
    return ClusterOut(
        clustered=runtime.owner.clustered,
        replica=me,
        lease_ttl_s=ttl,
        replicas=[
            ReplicaOut(
                id=r.id,
                host=r.host,
                pid=r.pid,
                url=r.url,
                version=r.version,
                started_at=r.started_at,
                heartbeat_at=r.heartbeat_at,
                alive=r.alive(ttl * 3),
                me=r.id == me,
            )
            for r in replicas.all_replicas(runtime.engine)
        ],
        leases=[
            LeaseOut(
                name=row.name,
                kind=row.kind,
                holder=row.holder,
                token=row.token,
                acquired_at=row.acquired_at,
                expires_at=row.expires_at,
                expires_in_s=round(row.expires_at - row.now, 3),
                live=row.live,
            )
            for row in leases.all_leases(runtime.engine)
        ],
    )
