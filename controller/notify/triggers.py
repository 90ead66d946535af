"""Where events come from: rollout transitions and finished deployments (inside the transaction that records
them), and a scheduled look at devices offline longer than the set time."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, insert, or_, select
from sqlmodel import Session

from controller.db.models import Deployment, Device, DeviceOfflineNotice, Rollout, table
from controller.db.types import utcnow
from controller.delivery.targets import Target
from controller.notify import events
from controller.notify.events import ROLLOUT_EVENTS, EventType
from controller.notify.outbox import Notifier
from controller.rollouts.plan import RolloutCreate, default_plan
from controller.rollouts.windows import next_opening

log = logging.getLogger(__name__)

#: devices listed in one device.offline or device.online event (the count says how many there were)
MAX_DEVICES = 500
#: failed devices listed in a deployment.failed event
MAX_FAILED = 50
#: a device offline for longer than this before the check first saw it is not announced (turning the
#: notifications on must not page about devices that left months ago)
LOOKBACK = timedelta(hours=24)


class Triggers:
    def __init__(self, engine: Engine, notifier: Notifier, public_url: str | None, offline_after_s: float) -> None:
        self.engine = engine
        self.notifier = notifier
        self.public_url = public_url
        self.offline_after_s = offline_after_s

    def _link(self, path: str) -> dict[str, str]:
        return {"url": f"{self.public_url}{path}"} if self.public_url else {}

    # ---------------------------------------------------------- rollouts --

    def rollout_transition(
        self, session: Session, r: Rollout, from_state: str, event: str, to_state: str, reason: str, actor: str
    ) -> None:
        """Called by the rollout engine before it commits a transition: the event commits with it."""
        kind = ROLLOUT_EVENTS.get(to_state)
        if kind is None or not self.notifier.wants(kind):
            return
        spec = RolloutCreate.model_validate(r.spec)
        data: dict[str, Any] = {
            "rollout": {
                "id": r.id,
                "model": r.model_name,
                "version": r.version_number,
                "selector": r.selector,
                "state": to_state,
                "previous_state": from_state,
                "event": event,
                "wave": r.wave_index + 1,
                "waves": len(spec.waves or default_plan()),
                "devices": len(r.assignment),
                "reason": reason,
                "actor": actor,
                "created_by": r.created_by,
                **self._link(f"/rollouts/{r.id}"),
            }
        }
        if to_state == "waiting_window":
            opens = next_opening(spec.windows, datetime.now(UTC))
            data["rollout"]["window_opens_at"] = events.iso(opens)
        self.notifier.emit(session, kind, data)

    # ------------------------------------------------------- deployments --

    def deployment_finished(self, session: Session, deployment_id: str, status: str, targets: Sequence[Target]) -> None:
        """Called by the delivery service before it commits a deployment's final status."""
        if status != "failed" or not self.notifier.wants(EventType.DEPLOYMENT_FAILED):
            return
        dep = session.get(Deployment, deployment_id)
        if dep is None:
            return
        counts: dict[str, int] = {}
        for t in targets:
            counts[t.state] = counts.get(t.state, 0) + 1
        bad = sorted((t for t in targets if t.state != "active"), key=lambda t: t.device_id)
        self.notifier.emit(
            session,
            EventType.DEPLOYMENT_FAILED,
            {
                "deployment": {
                    "id": dep.id,
                    "model": dep.model_name,
                    "version": dep.version_number,
                    "rollout_id": dep.rollout_id,
                    "wave": None if dep.rollout_wave is None else dep.rollout_wave + 1,
                    "created_by": dep.created_by,
                    "devices": len(targets),
                    "counts": counts,
                    "failed": [
                        {"device_id": t.device_id, "state": t.state, "reason": t.reason[:500]}
                        for t in bad[:MAX_FAILED]
                    ],
                    **self._link(f"/deployments/{dep.id}"),
                }
            },
        )

    # ----------------------------------------------------------- devices --

    def check_devices(self, now: datetime | None = None) -> tuple[int, int]:
        """Announce devices offline longer than ``offline_after_s`` (once per outage) and those back online;
        returns how many of each. Run by the scheduler."""
        if self.offline_after_s <= 0:
            return 0, 0
        now = now or utcnow()
        gone = self._newly_offline(now)
        back = self._back_online(now)
        return gone, back

    def _newly_offline(self, now: datetime) -> int:
        d, n = table(Device).c, table(DeviceOfflineNotice).c
        cutoff = now - timedelta(seconds=self.offline_after_s)
        with Session(self.engine) as session:
            rows = session.execute(
                select(d.id, d.status_changed_at, d.offline_reason, d.labels, d.last_seen)
                .join_from(table(Device), table(DeviceOfflineNotice), n.device_id == d.id, isouter=True)
                .where(
                    d.status == "offline",
                    d.revoked_at.is_(None),
                    d.status_changed_at <= cutoff,
                    d.status_changed_at >= cutoff - LOOKBACK,
                    or_(n.device_id.is_(None), n.offline_since != d.status_changed_at),
                )
                .order_by(d.status_changed_at, d.id)
            ).all()
            if not rows:
                return 0
            ids = [r.id for r in rows]
            session.execute(delete(table(DeviceOfflineNotice)).where(n.device_id.in_(ids)))
            session.execute(
                insert(table(DeviceOfflineNotice)),
                [{"device_id": r.id, "offline_since": r.status_changed_at, "notified_at": now} for r in rows],
            )
            if self.notifier.wants(EventType.DEVICE_OFFLINE):
                self.notifier.emit(
                    session,
                    EventType.DEVICE_OFFLINE,
                    {
                        "offline_after_s": self.offline_after_s,
                        "count": len(rows),
                        "truncated": len(rows) > MAX_DEVICES,
                        "devices": [
                            {
                                "id": r.id,
                                "offline_since": events.iso(r.status_changed_at),
                                "last_seen": events.iso(r.last_seen),
                                "reason": r.offline_reason,
                                "labels": r.labels,
                                **self._link(f"/devices/{r.id}"),
                            }
                            for r in rows[:MAX_DEVICES]
                        ],
                    },
                    at=now,
                )
            session.commit()
        log.info("notify: %d devices offline for more than %.0f s", len(rows), self.offline_after_s)
        return len(rows)

    def _back_online(self, now: datetime) -> int:
        """Devices announced offline that are online again (their notice goes; revoked or forgotten ones go
        silently)."""
        d, n = table(Device).c, table(DeviceOfflineNotice).c
        with Session(self.engine) as session:
            rows = session.execute(
                select(n.device_id, n.offline_since, d.status, d.status_changed_at, d.revoked_at)
                .join_from(table(DeviceOfflineNotice), table(Device), n.device_id == d.id, isouter=True)
                .where(or_(d.status.is_(None), d.status == "online", d.revoked_at.is_not(None)))
            ).all()
            if not rows:
                return 0
            session.execute(delete(table(DeviceOfflineNotice)).where(n.device_id.in_([r.device_id for r in rows])))
            online = [r for r in rows if r.status == "online" and r.revoked_at is None]
            if online and self.notifier.wants(EventType.DEVICE_ONLINE):
                self.notifier.emit(
                    session,
                    EventType.DEVICE_ONLINE,
                    {
                        "count": len(online),
                        "truncated": len(online) > MAX_DEVICES,
                        "devices": [
                            {
                                "id": r.device_id,
                                "online_since": events.iso(r.status_changed_at),
                                "offline_since": events.iso(r.offline_since),
                                **self._link(f"/devices/{r.device_id}"),
                            }
                            for r in online[:MAX_DEVICES]
                        ],
                    },
                    at=now,
                )
            session.commit()
        return len(online)
