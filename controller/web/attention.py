"""What needs an operator on the fleet page: rollouts that stopped or wait, failed deployments, devices
offline or in trouble, versions with errors. A few bounded queries (each with its own LIMIT and the total
counted by a window function), whatever the fleet size."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select

from controller.db.models import Deployment, DeploymentTarget, Device, DeviceHealth, Rollout, table
from controller.db.types import utcnow
from controller.health.series import RECENT, recent_by_version
from controller.rollouts.plan import RolloutCreate
from controller.rollouts.windows import next_opening

#: how long finished trouble (an aborted rollout, a failed deployment) stays on the fleet page
RECENT_TROUBLE = timedelta(hours=24)
#: an error rate above this, over the last minutes, puts a model version on the fleet page
ERROR_RATE = 0.01
WAITING = ("paused", "awaiting_approval", "waiting_window", "aborting")
SHOWN = 5


@dataclass
class Attention:
    rollouts: list[dict[str, Any]] = field(default_factory=list)
    deployments: list[dict[str, Any]] = field(default_factory=list)
    deployments_total: int = 0
    offline: list[dict[str, Any]] = field(default_factory=list)
    offline_total: int = 0
    erroring: list[dict[str, Any]] = field(default_factory=list)
    erroring_total: int = 0
    versions: list[dict[str, Any]] = field(default_factory=list)
    window_min: int = int(RECENT.total_seconds() // 60)

    @property
    def empty(self) -> bool:
        return not (self.rollouts or self.deployments or self.offline or self.erroring or self.versions)


def attention(conn: Connection, now: datetime | None = None) -> Attention:
    now = now or utcnow()
    since = now - RECENT_TROUBLE
    out = Attention()
    r = table(Rollout).c
    for row in conn.execute(
        select(
            r.id, r.model_name, r.version_number, r.state, r.reason, r.wave_index, r.state_since, r.finished_at, r.spec
        )
        .where(or_(r.state.in_(WAITING), and_(r.state == "aborted", r.finished_at >= since)))
        .order_by(r.state_since.desc())
        .limit(20)
    ):
        item = dict(row._mapping)
        spec = item.pop("spec")
        if item["state"] == "waiting_window":
            item["window_opens_at"] = next_opening(RolloutCreate.model_validate(spec).windows, now)
        out.rollouts.append(item)
    d, t = table(Deployment).c, table(DeploymentTarget).c
    bad = (  # failed, rolled back or cancelled: what made the deployment end as failed
        select(func.count()).where(t.deployment_id == d.id, t.state != "active").scalar_subquery().label("bad")
    )
    devices = select(func.count()).where(t.deployment_id == d.id).scalar_subquery().label("devices")
    rows = conn.execute(
        select(
            d.id,
            d.model_name,
            d.version_number,
            d.rollout_id,
            d.rollout_wave,
            d.finished_at,
            bad,
            devices,
            func.count().over().label("total"),
        )
        .where(d.status == "failed", d.finished_at >= since)
        .order_by(d.finished_at.desc())
        .limit(SHOWN)
    ).all()
    out.deployments = [dict(x._mapping) for x in rows]
    out.deployments_total = rows[0].total if rows else 0
    dev = table(Device).c
    rows = conn.execute(
        select(dev.id, dev.status_changed_at, dev.offline_reason, dev.last_seen, func.count().over().label("total"))
        .where(dev.status == "offline", dev.revoked_at.is_(None))
        .order_by(dev.status_changed_at.desc())
        .limit(SHOWN)
    ).all()
    out.offline = [dict(x._mapping) for x in rows]
    out.offline_total = rows[0].total if rows else 0
    h = table(DeviceHealth).c
    rows = conn.execute(
        select(h.device_id, h.last_error_at, h.last_error, func.count().over().label("total"))
        .join_from(table(DeviceHealth), table(Device), h.device_id == dev.id)
        .where(h.last_error_at >= now - RECENT, dev.revoked_at.is_(None))
        .order_by(h.last_error_at.desc())
        .limit(SHOWN)
    ).all()
    out.erroring = [dict(x._mapping) for x in rows]
    out.erroring_total = rows[0].total if rows else 0
    for v in recent_by_version(conn, now=now):
        rate = v.summary["error_rate"]
        if rate is not None and rate > ERROR_RATE:
            out.versions.append({"model": v.model, "version": v.version, **v.summary})
    return out
