"""Fencing in the rollout engine: a driver that still believes it holds a rollout (paused between its lease
check and its write: SIGSTOP, a long GC) has that write refused once another replica took the lease over;
the refusal is in the audit log and the rollout's history has only the new driver's steps."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlmodel import Session, select

from controller.cluster.keeper import LeaseKeeper
from controller.db.models import AuditEntry, Model, ModelVersion, Rollout, RolloutTransition
from controller.db.types import utcnow
from controller.rollouts.engine import RolloutEngine, lease_name
from tests.postgres import DIALECTS, migrated_engine


@pytest.fixture(params=DIALECTS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    with migrated_engine(request.param, tmp_path, "slmfleet_fencing") as engine:
        yield engine


class NoDeliveries:
    """The rollout below is baking a wave without deployments: the engine never asks the delivery anything."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"delivery.{name} was not expected")


def baking_rollout(db: Engine) -> str:
    with Session(db) as session:
        model = Model(name="pump", task="anomaly")
        session.add(model)
        session.commit()
        assert model.id is not None
        version = ModelVersion(model_id=model.id, number=1, source="onnx")
        session.add(version)
        session.commit()
        assert version.id is not None
        spec = {"model": "pump", "version": 1, "selector": "fleet=pumps", "waves": [{"until": "100%", "bake_s": 0}]}
        rollout = Rollout(
            id="r" * 32,
            model_name="pump",
            version_number=1,
            version_id=version.id,
            selector="fleet=pumps",
            spec=spec,
            state="baking",
            state_since=utcnow() - timedelta(seconds=60),
            assignment={"d1": 0},
        )
        session.add(rollout)
        session.commit()
        return rollout.id


def expire(db: Engine, name: str) -> None:
    with db.begin() as conn:
        conn.execute(text("UPDATE cluster_lease SET expires_at = 0 WHERE name = :n"), {"n": name})


def test_a_stale_drivers_step_is_refused_and_audited(db: Engine) -> None:
    rollout_id = baking_rollout(db)
    name = lease_name(rollout_id)
    clock_a = [0.0]
    a = LeaseKeeper(db, "A", 6.0, clock=lambda: clock_a[0])
    b = LeaseKeeper(db, "B", 6.0)
    a.start()
    b.start()
    try:
        assert a.drive(name) == 1
        slow = RolloutEngine(db, NoDeliveries(), owner=a)  # type: ignore[arg-type]
        fast = RolloutEngine(db, NoDeliveries(), owner=b)  # type: ignore[arg-type]
        # A stalls (its own clock stands still, so it still believes it drives); its lease expires meanwhile
        expire(db, name)
        assert b.drive(name) == 2
        # A wakes up and steps with token 1: the write is refused, nothing of it is kept
        slow.step_all()
        with Session(db) as session:
            state = session.exec(select(Rollout.state).where(Rollout.id == rollout_id)).one()
            refused = session.exec(select(AuditEntry).where(AuditEntry.action == "cluster.write_refused")).all()
            history = session.exec(select(RolloutTransition).where(RolloutTransition.rollout_id == rollout_id)).all()
        assert state == "baking" and history == []
        assert len(refused) == 1 and refused[0].target == name and "stale" in refused[0].detail["reason"]
        assert a.refused == 1
        # the new driver's step goes through
        fast.step_all()
        with Session(db) as session:
            history = session.exec(select(RolloutTransition).where(RolloutTransition.rollout_id == rollout_id)).all()
            state = session.exec(select(Rollout.state).where(Rollout.id == rollout_id)).one()
        assert [(t.from_state, t.to_state) for t in history][:1] == [("baking", "gating")]
        assert state in ("gating", "completed")
    finally:
        a.stop()
        b.stop()
