"""Deployments as the dashboard shows them: a paginated list with device states counted in SQL, and one
deployment with its devices (state, percent, reason), filtered and paginated in SQL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, case, func, select, true

from controller.db.models import Deployment, DeploymentTarget, table

#: device states that end a device's part in a deployment
DONE = frozenset({"active", "failed", "rolled_back", "cancelled"})
BAD = frozenset({"failed", "rolled_back"})
DEPLOYMENT_COLUMNS = (
    "id",
    "model_name",
    "version_number",
    "variant_rule",
    "selector",
    "device_ids",
    "status",
    "activate",
    "timeout_s",
    "rollout_id",
    "rollout_wave",
    "created_at",
    "created_by",
    "finished_at",
)


def _no_devices() -> dict[str, Any]:
    return {"states": {}, "devices": 0, "download": None, "done": 0, "active": 0, "bad": 0}


def _counts(conn: Connection, deployment_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Per deployment: devices by state and the mean download progress, in one grouped query."""
    if not deployment_ids:
        return {}
    t = table(DeploymentTarget).c
    out: dict[str, dict[str, Any]] = {}
    for dep, state, n, mean in conn.execute(
        select(t.deployment_id, t.state, func.count(), func.avg(t.progress))
        .where(t.deployment_id.in_(deployment_ids))
        .group_by(t.deployment_id, t.state)
    ):
        item = out.setdefault(dep, {"states": {}, "devices": 0, "download": None})
        item["states"][state] = n
        item["devices"] += n
        if state == "downloading":
            item["download"] = float(mean or 0.0)
    for item in out.values():
        states = item["states"]
        item["done"] = sum(n for s, n in states.items() if s in DONE)
        item["active"] = states.get("active", 0)
        item["bad"] = sum(n for s, n in states.items() if s in BAD)
    return out


def deployment_page(
    conn: Connection, *, status: str | None, offset: int, limit: int
) -> tuple[list[dict[str, Any]], int]:
    """Deployments newest first with their device counts: three statements whatever the size."""
    d = table(Deployment).c
    where = d.status == status if status else true()
    total = conn.execute(select(func.count()).select_from(table(Deployment)).where(where)).scalar_one()
    rows = conn.execute(
        select(*(d[c] for c in DEPLOYMENT_COLUMNS))
        .where(where)
        .order_by(d.created_at.desc(), d.id)
        .offset(offset)
        .limit(limit)
    ).all()
    counts = _counts(conn, [r.id for r in rows])
    items = []
    for r in rows:
        item = dict(r._mapping)
        item["counts"] = counts.get(r.id) or _no_devices()
        items.append(item)
    return items, int(total)


@dataclass
class DeploymentDetail:
    deployment: dict[str, Any]
    counts: dict[str, Any]
    targets: list[dict[str, Any]]
    matching: int

    @property
    def final(self) -> bool:
        return self.deployment["status"] != "running"


def deployment_detail(
    conn: Connection, deployment_id: str, *, state: str | None, offset: int, limit: int
) -> DeploymentDetail | None:
    d, t = table(Deployment).c, table(DeploymentTarget).c
    row = conn.execute(select(*(d[c] for c in DEPLOYMENT_COLUMNS)).where(d.id == deployment_id)).first()
    if row is None:
        return None
    counts = _counts(conn, [deployment_id]).get(deployment_id) or _no_devices()
    where = [t.deployment_id == deployment_id]
    if state:
        where.append(t.state == state)
    matching = counts["states"].get(state, 0) if state else counts["devices"]
    # failed devices first: they are what an operator opens the page for
    bad_first = case((t.state.in_(list(BAD)), 0), else_=1)
    targets = [
        dict(r._mapping)
        for r in conn.execute(
            select(
                t.device_id,
                t.variant,
                t.state,
                t.progress,
                t.chunks_have,
                t.chunks_total,
                t.reason,
                t.queued,
                t.started_at,
                t.updated_at,
                t.finished_at,
            )
            .where(*where)
            .order_by(bad_first, t.device_id)
            .offset(offset)
            .limit(limit)
        )
    ]
    return DeploymentDetail(dict(row._mapping), counts, targets, int(matching))
