"""The delivery on two replicas sharing one database (SQLite here; PostgreSQL in test_replicas.py), each with its
own in-memory transport: reports reaching the replica that does not drive a deployment get to its driver through
the database, an overtaken report is ignored, a takeover re-sends the unfinished devices' commands, the old
driver's flush is refused, and an operation served by the non-driver is carried out by the driver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from controller.cluster import inbox
from controller.cluster.keeper import LeaseKeeper
from controller.db.models import AuditEntry, DeploymentTarget
from controller.delivery.service import DeliveryService, DeploymentRequest
from controller.delivery.transfer import TransferSettings
from controller.metrics import Metrics
from tests.delivery.test_service_unit import DEVICES, FakeTransport, Setup
from tests.helpers import wait_until
from wire.messages import DeploymentEvent, DeployState


class Replica:
    def __init__(self, setup: Setup, replica_id: str) -> None:
        self.keeper = LeaseKeeper(setup.db, replica_id, 30.0)
        self.keeper.start()
        self.transport = FakeTransport()
        self.service = DeliveryService(
            setup.db, setup.store, setup.key, Metrics(), TransferSettings(), clock=setup.clock, owner=self.keeper
        )
        self.keeper.on_lost.append(self.service.lost)
        self.service.attach(self.transport)

    def close(self) -> None:
        self.service.stop()
        self.keeper.stop()
        self.transport.close()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Setup, Replica, Replica]]:
    setup = Setup(tmp_path)
    a, b = Replica(setup, "A"), Replica(setup, "B")
    yield setup, a, b
    a.close()
    b.close()
    setup.service.stop()
    setup.transport.close()
    setup.db.dispose()


def report(setup: Setup, replica: Replica, dep: str, device: str, state: DeployState, ts: float) -> None:
    event = DeploymentEvent(ts=ts, seq=1, deployment_id=dep, artifact_id=setup.artifact_id, state=state)
    replica.transport.run(replica.service.on_event, device, event)


def state_in(replica: Replica, dep: str, device: str) -> str:
    return next(t.state for t in replica.service.targets(dep) if t.device_id == device)


def test_two_replicas_share_one_deployment_through_the_database(pair: tuple[Setup, Replica, Replica]) -> None:
    setup, a, b = pair
    dep = a.service.create(DeploymentRequest(model="tiny-cls", version=1, device_ids=DEVICES), "tester")
    assert a.keeper.holds(f"deployment:{dep}") == 1
    assert all(t == "deploy" for d in DEVICES for t in [c["type"] for c in a.transport.commands(setup.key, d)])
    t0 = setup.clock()

    # a report that reached B (which does not drive it) waits in the database, then A applies it
    report(setup, b, dep, "dev-a", DeployState.VERIFYING, t0 + 1)
    assert [m.device_id for m in inbox.take(setup.db, [dep])] == ["dev-a"]
    assert b.transport.published == []
    a.service.drive()
    wait_until(lambda: state_in(a, dep, "dev-a") == "verifying", 10, what="A applied the forwarded report")
    a.service.drive()  # deletes what it handled
    assert inbox.take(setup.db, [dep]) == []

    # dev-b's ACTIVE came straight to A; its older DOWNLOADING came the long way through B: ignored
    report(setup, a, dep, "dev-b", DeployState.ACTIVE, t0 + 5)
    report(setup, b, dep, "dev-b", DeployState.DOWNLOADING, t0 + 2)
    wait_until(lambda: (a.service.drive(), inbox.take(setup.db, [dep]))[1] == [], 10, what="handled")
    assert state_in(a, dep, "dev-b") == "active"

    a.service.flush()  # its last flush (every second) before it is cut off
    # A stops renewing (cut off); B takes the deployment over and sends the unfinished devices their command again
    with setup.db.begin() as conn:
        conn.execute(text("UPDATE cluster_lease SET expires_at = 1 WHERE name = :n"), {"n": f"deployment:{dep}"})
    b.service.drive()
    assert b.keeper.holds(f"deployment:{dep}") == 2
    wait_until(lambda: {c["type"] for c in b.transport.commands(setup.key, "dev-c")} == {"deploy"}, 10, what="resent")
    assert b.transport.commands(setup.key, "dev-b") == []  # active: nothing to send again
    with Session(setup.db) as session:
        takeover = session.exec(select(AuditEntry).where(AuditEntry.action == "cluster.takeover")).one()
    assert takeover.detail["from"] == "A" and takeover.detail["to"] == "B"

    # A, stale, still has a change to flush: refused, audited, and A lets the deployment go
    report(setup, a, dep, "dev-c", DeployState.FAILED, t0 + 6)
    a.service.flush()
    with Session(setup.db) as session:
        refused = session.exec(select(AuditEntry).where(AuditEntry.action == "cluster.write_refused")).all()
        row = session.exec(
            select(DeploymentTarget).where(DeploymentTarget.deployment_id == dep, DeploymentTarget.device_id == "dev-c")
        ).one()
    assert len(refused) == 1 and row.state != "failed"
    assert a.service.targets_store.info(dep) is None

    # an operator's cancel served by A (not the driver) is carried out by B
    assert a.service.cancel(dep, "operator") == 0
    b.service.drive()
    wait_until(lambda: "cancel" in [c["type"] for c in b.transport.commands(setup.key, "dev-c")], 10, what="cancel")
    assert "cancel" not in [c["type"] for c in a.transport.commands(setup.key, "dev-c")]
