"""The replica registry: which controller processes share the database, for the API, the dashboard and the
fair share of work (a replica silent for longer than its lease TTL x 3 counts as gone)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from sqlalchemy import Engine, text

from controller.cluster.leases import db_now, now_sql


@dataclass(frozen=True)
class ReplicaInfo:
    id: str
    host: str
    pid: int
    url: str
    version: str
    started_at: float
    heartbeat_at: float
    now: float

    def alive(self, stale_after_s: float) -> bool:
        return self.now - self.heartbeat_at <= stale_after_s


def register(engine: Engine, replica_id: str, url: str, version: str) -> None:
    """Record this process (replacing an earlier run with the same id)."""
    now = now_sql(engine)
    params = {"id": replica_id, "host": socket.gethostname()[:256], "pid": os.getpid(), "url": url, "version": version}
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM cluster_replica WHERE id = :id"), {"id": replica_id})
        conn.execute(
            text(
                "INSERT INTO cluster_replica (id, host, pid, url, version, started_at, heartbeat_at)"
                f" VALUES (:id, :host, :pid, :url, :version, {now}, {now})"
            ),
            params,
        )


def heartbeat(engine: Engine, replica_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(f"UPDATE cluster_replica SET heartbeat_at = {now_sql(engine)} WHERE id = :id"), {"id": replica_id}
        )


def unregister(engine: Engine, replica_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM cluster_replica WHERE id = :id"), {"id": replica_id})


def all_replicas(engine: Engine) -> list[ReplicaInfo]:
    with engine.connect() as conn:
        now = db_now(conn)
        rows = conn.execute(
            text("SELECT id, host, pid, url, version, started_at, heartbeat_at FROM cluster_replica ORDER BY id")
        ).all()
    return [ReplicaInfo(r[0], r[1], int(r[2]), r[3], r[4], float(r[5]), float(r[6]), now) for r in rows]
