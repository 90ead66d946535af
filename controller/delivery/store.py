"""The one place that reads and writes deployment targets: their database rows and the in-memory working copy.

The working copy (``Target`` objects, indexed by deployment and by device) is what the delivery decides
on; the rows are the record a restarted controller resumes from. Changes are marked dirty and written in
batches (``flush``, a scheduler job each second, and before a deployment's end is recorded).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, update
from sqlmodel import Session, select

from controller.cluster.leases import StaleLease
from controller.db.models import Deployment, DeploymentTarget, table
from controller.db.types import from_epoch, utcnow
from controller.delivery.targets import Target

log = logging.getLogger(__name__)

#: told when a deployment ends (session, id, status, its targets) before that commits: notifications
FinishListener = Callable[[Session, str, str, list[Target]], None]

#: (deployment, device) pairs remembered as known or unknown to the database (reports of unknown ones are dropped)
KNOWN_MAX = 10_000


@dataclass
class DeploymentInfo:
    """What the delivery keeps about a deployment it follows."""

    timeout_s: float
    max_concurrent: int | None = None
    status: str = "running"
    cancelled: bool = False
    #: rolled back: devices that switch late go back too
    rolled_back: bool = False

    @property
    def withdrawn(self) -> bool:
        return self.cancelled or self.rolled_back

    @classmethod
    def of(cls, dep: Deployment) -> DeploymentInfo:
        return cls(timeout_s=dep.timeout_s, max_concurrent=dep.max_concurrent, status=dep.status)


def _target_of(row: DeploymentTarget, now: float | None) -> Target:
    """A row as a target: resumed to work on (``now`` its update time) or read back to show (``now`` None)."""
    return Target(
        row.deployment_id,
        row.device_id,
        row.artifact_id,
        row.variant,
        state=row.state,
        progress=row.progress,
        chunks_have=row.chunks_have,
        chunks_total=row.chunks_total,
        reason=row.reason,
        previous=row.previous,
        metrics=row.metrics,
        started_at=row.started_at.timestamp(),
        updated_at=row.updated_at.timestamp() if now is None else now,
        finished_at=row.finished_at.timestamp() if now is None and row.finished_at else None,
        queued=row.queued,
        dirty=False,
    )


class TargetStore:
    """Targets in memory and in the database. ``lock`` guards the working copy (several threads use it)."""

    def __init__(self, engine: Engine, clock: Callable[[], float]) -> None:
        self.engine = engine
        self.clock = clock
        self.lock = threading.RLock()
        self._targets: dict[tuple[str, str], Target] = {}
        self._by_deployment: dict[str, dict[str, Target]] = {}
        self._by_device: dict[str, set[str]] = {}
        self._deployments: dict[str, DeploymentInfo] = {}
        self._known: OrderedDict[tuple[str, str], bool] = OrderedDict()
        #: replicas: refuses (StaleLease) a write about a deployment whose lease this replica lost
        self.fence: Callable[[Connection, str], None] | None = None
        #: told of a refused write (the delivery stops following that deployment)
        self.on_stale: Callable[[str, StaleLease], None] | None = None

    # ------------------------------------------------------------ load --

    def resume(self, only: str | None = None) -> Iterator[tuple[Session, Deployment, list[Target]]]:
        """Load every running deployment (or ``only`` that one) and its targets (a restart, or a replica that
        takes a deployment over); yields each within its session."""
        with Session(self.engine) as session:
            query = select(Deployment).where(Deployment.status == "running")
            if only is not None:
                query = query.where(Deployment.id == only)
            for dep in session.exec(query).all():
                rows = session.exec(select(DeploymentTarget).where(DeploymentTarget.deployment_id == dep.id)).all()
                targets = [_target_of(row, self.clock()) for row in rows]
                with self.lock:
                    self._deployments[dep.id] = DeploymentInfo.of(dep)
                    for target in targets:
                        self.add(target)
                yield session, dep, targets

    def insert(self, session: Session, target: Target) -> None:
        """Add a new target's row to ``session`` (committed by the caller, then ``add`` it here)."""
        session.add(
            DeploymentTarget(
                deployment_id=target.deployment_id,
                device_id=target.device_id,
                artifact_id=target.artifact_id,
                variant=target.variant,
                state=target.state,
                reason=target.reason,
                previous=target.previous,
                queued=target.queued,
            )
        )

    def add(self, target: Target) -> None:
        with self.lock:
            self._targets[(target.deployment_id, target.device_id)] = target
            self._by_deployment.setdefault(target.deployment_id, {})[target.device_id] = target
            self._by_device.setdefault(target.device_id, set()).add(target.deployment_id)

    def drop(self, deployment_id: str) -> list[Target]:
        """Stop following a deployment (another replica drives it now): its targets leave the working copy,
        unflushed changes are discarded (the new driver's are the ones that count)."""
        with self.lock:
            self._deployments.pop(deployment_id, None)
            dropped = list(self._by_deployment.pop(deployment_id, {}).values())
            for t in dropped:
                self._targets.pop((deployment_id, t.device_id), None)
                devices = self._by_device.get(t.device_id)
                if devices is not None:
                    devices.discard(deployment_id)
                    if not devices:
                        del self._by_device[t.device_id]
            return dropped

    def read(self, deployment_id: str) -> list[Target]:
        """A deployment's targets as its rows say now, not kept (one another replica drives)."""
        with Session(self.engine) as session:
            rows = session.exec(select(DeploymentTarget).where(DeploymentTarget.deployment_id == deployment_id)).all()
            return [_target_of(row, None) for row in rows]

    def follow(self, deployment_id: str, info: DeploymentInfo) -> DeploymentInfo:
        """Start following a deployment (or keep the info already there); returns the one kept."""
        with self.lock:
            return self._deployments.setdefault(deployment_id, info)

    # ----------------------------------------------------------- reads --

    def get(self, deployment_id: str, device_id: str) -> Target | None:
        return self._targets.get((deployment_id, device_id))

    def info(self, deployment_id: str) -> DeploymentInfo | None:
        return self._deployments.get(deployment_id)

    def of_deployment(self, deployment_id: str) -> list[Target]:
        """The deployment's targets in memory, in the order they were added."""
        with self.lock:
            return list(self._by_deployment.get(deployment_id, {}).values())

    def of_device(self, device_id: str) -> list[Target]:
        with self.lock:
            return [self._targets[(d, device_id)] for d in self._by_device.get(device_id, ())]

    def select(self, keep: Callable[[Target], bool]) -> list[Target]:
        with self.lock:
            return [t for t in self._targets.values() if keep(t)]

    def __len__(self) -> int:
        return len(self._targets)

    def targets(self, deployment_id: str) -> list[Target]:
        """The devices of a deployment; finished ones not in memory (after a restart) are read back."""
        found = self.of_deployment(deployment_id)
        if found:
            return found
        with Session(self.engine) as session:
            rows = session.exec(select(DeploymentTarget).where(DeploymentTarget.deployment_id == deployment_id)).all()
            loaded = [_target_of(row, None) for row in rows]
        with self.lock:
            for target in loaded:
                if (deployment_id, target.device_id) not in self._targets:
                    self.add(target)
            return self.of_deployment(deployment_id)

    def knows(self, device_id: str, deployment_id: str) -> bool:
        """Whether the deployment was sent to this device: in memory, else the database (remembered)."""
        key = (deployment_id, device_id)
        if key in self._targets:
            return True
        with self.lock:
            known = self._known.get(key)
        if known is None:
            with Session(self.engine) as session:
                stmt = select(DeploymentTarget.id).where(
                    DeploymentTarget.deployment_id == deployment_id, DeploymentTarget.device_id == device_id
                )
                known = session.exec(stmt.limit(1)).first() is not None
            with self.lock:
                self._known[key] = known
                while len(self._known) > KNOWN_MAX:
                    self._known.popitem(last=False)
        return known

    def state_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self.lock:
            for t in self._targets.values():
                counts[t.state] = counts.get(t.state, 0) + 1
        return counts

    # ---------------------------------------------------------- writes --

    def finish(self, deployment_id: str, status: str, targets: list[Target], on_finish: FinishListener | None) -> None:
        """Record a deployment's end (its targets flushed first); ``on_finish`` writes in the same transaction."""
        self.flush()
        with Session(self.engine) as session:
            if self.fence is not None:
                self.fence(session.connection(), deployment_id)
            session.execute(
                update(table(Deployment))
                .where(table(Deployment).c.id == deployment_id)
                .values(status=status, finished_at=utcnow())
            )
            if on_finish is not None:
                try:
                    on_finish(session, deployment_id, status, targets)
                except Exception:  # a notification that cannot be written never holds a deployment up
                    log.exception("deployment %s: notifying %s failed", deployment_id[:8], status)
            session.commit()

    def flush(self) -> int:
        """Write changed targets to the database; returns how many. With ``fence`` set (replicas), a deployment's
        rows are written only while this replica's lease token is still current; a stale one's are refused."""
        with self.lock:
            rows = []
            for t in self._targets.values():
                if not t.dirty:
                    continue
                row = t.row()
                row["updated_at"] = from_epoch(row["updated_at"])
                row["finished_at"] = from_epoch(row["finished_at"]) if row["finished_at"] else None
                row["started_at"] = from_epoch(row["started_at"])
                rows.append((t.deployment_id, t.device_id, row))
                t.dirty = False
        if not rows:
            return 0
        tt = table(DeploymentTarget)
        if self.fence is None:
            with self.engine.begin() as conn:
                for deployment_id, device_id, row in rows:
                    conn.execute(
                        update(tt).where(tt.c.deployment_id == deployment_id, tt.c.device_id == device_id).values(**row)
                    )
            return len(rows)
        by_deployment: dict[str, list[tuple[str, dict[str, object]]]] = {}
        for deployment_id, device_id, row in rows:
            by_deployment.setdefault(deployment_id, []).append((device_id, row))
        written = 0
        for deployment_id, changes in by_deployment.items():
            try:
                with self.engine.begin() as conn:
                    self.fence(conn, deployment_id)
                    for device_id, row in changes:
                        conn.execute(
                            update(tt)
                            .where(tt.c.deployment_id == deployment_id, tt.c.device_id == device_id)
                            .values(**row)
                        )
                written += len(changes)
            except StaleLease as exc:
                if self.on_stale is not None:
                    self.on_stale(deployment_id, exc)
        return written
