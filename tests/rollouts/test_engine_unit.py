"""The rollout engine on its own: SQLite in tmp, a fake clock, and an in-memory delivery (no broker, no devices).

The fake stands in for the controller's own delivery boundary (``controller.delivery.port.Deliveries``); the
gates are the real ones, over a database without telemetry (off, or waiting until their deadline).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from controller.db.engine import make_engine, migrate
from controller.db.models import Device, ModelVersion, Rollout, RolloutTransition
from controller.db.models import Model as ModelRow
from controller.delivery.plan import DeploymentRequest
from controller.delivery.targets import BEFORE_SWITCH, Target
from controller.rollouts.engine import RolloutEngine, RolloutError
from controller.rollouts.plan import GateSpec, RolloutCreate, WaveSpec
from tests.helpers import FakeClock

ARTIFACT = "a" * 64
PREVIOUS = {"model": "pump", "version": 0, "artifact": "b" * 64}
GATES_OFF = GateSpec(error_rate_max=None, p95_latency_ratio_max=None, rss_ratio_max=None, shadow_agreement_min=None)


class FakeDelivery:
    """Deployments as lists of targets whose states the test sets; records what the engine asked for."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.deployments: dict[str, list[Target]] = {}
        self.requests: dict[str, DeploymentRequest] = {}
        self.calls: list[tuple[str, str]] = []
        self.listener: Any = None

    def create(self, request: DeploymentRequest, actor: str) -> str:
        deployment_id = f"dep{len(self.deployments)}"
        self.requests[deployment_id] = request
        self.deployments[deployment_id] = []
        self.add_devices(deployment_id, request.device_ids or [])
        return deployment_id

    def targets(self, deployment_id: str) -> list[Target]:
        return list(self.deployments.get(deployment_id, []))

    def add_devices(self, deployment_id: str, device_ids: list[str]) -> list[str]:
        now = self.clock()
        made = [Target(deployment_id, d, ARTIFACT, "fp32", previous=PREVIOUS, started_at=now) for d in device_ids]
        self.deployments[deployment_id].extend(made)
        return device_ids

    def activate(self, deployment_id: str) -> int:
        self.calls.append(("activate", deployment_id))
        return 0

    def commit(self, deployment_id: str) -> int:
        self.calls.append(("commit", deployment_id))
        return len(self.deployments[deployment_id])

    def rollback(self, deployment_id: str, actor: str, reason: str = "") -> int:
        self.calls.append(("rollback", deployment_id))
        for t in self.deployments[deployment_id]:
            if t.state in BEFORE_SWITCH:
                t.update(self.clock(), state="cancelled", reason=reason)
            elif t.state == "active":
                t.update(self.clock(), state="rolling_back", reason=reason)
        return len(self.deployments[deployment_id])

    # the devices' side, as the delivery would report it
    def report(self, deployment_id: str, state: str, devices: list[str] | None = None, reason: str = "") -> None:
        for t in self.deployments[deployment_id]:
            if devices is None or t.device_id in devices:
                t.update(self.clock(), state=state, reason=reason)
                self.listener(t)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'controller.db'}")
    migrate(engine)
    with Session(engine) as session:
        model = ModelRow(name="pump", task="anomaly")
        session.add(model)
        session.commit()
        assert model.id is not None
        session.add(ModelVersion(model_id=model.id, number=1, source="upload"))
        for i in range(4):
            session.add(Device(id=f"dev-{i}", labels={"fleet": "pumps"}))
        session.commit()
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def delivery(clock: FakeClock) -> FakeDelivery:
    return FakeDelivery(clock)


@pytest.fixture
def rollouts(db: Engine, delivery: FakeDelivery, clock: FakeClock) -> RolloutEngine:
    engine = RolloutEngine(db, delivery, clock=clock)
    delivery.listener = engine.on_target_change
    return engine


def create(rollouts: RolloutEngine, *waves: WaveSpec, gates: GateSpec = GATES_OFF) -> str:
    spec = RolloutCreate(model="pump", version=1, selector="fleet=pumps", waves=list(waves), gates=gates)
    return rollouts.create(spec, "tester")


def wave(until: str, **kw: Any) -> WaveSpec:
    return WaveSpec(until=until, bake_s=kw.pop("bake_s", 10), failure_threshold=kw.pop("failure_threshold", "1"), **kw)


def rollout(db: Engine, rollout_id: str) -> Rollout:
    with Session(db) as session:
        r = session.get(Rollout, rollout_id)
        assert r is not None
        return r


def events(db: Engine, rollout_id: str) -> list[str]:
    with Session(db) as session:
        stmt = select(RolloutTransition).where(RolloutTransition.rollout_id == rollout_id)
        return [t.event for t in session.exec(stmt.order_by(RolloutTransition.id)).all()]


def test_waves_advance_through_bake_and_gates_to_completion(db, rollouts, delivery, clock) -> None:  # type: ignore[no-untyped-def]
    rid = create(rollouts, wave("1"), wave("100%"))
    r = rollout(db, rid)
    assert r.state == "deploying" and list(r.wave_deployments) == ["0"]
    canary = r.wave_deployments["0"]
    assert len(delivery.targets(canary)) == 1
    delivery.report(canary, "active")  # the device's switch is judged at once, not at the next scheduled step
    assert rollout(db, rid).state == "baking"
    clock.advance(9)
    assert rollouts.step(rid) == "baking"  # the bake time runs on the engine's clock
    clock.advance(2)
    assert rollouts.step(rid) == "deploying"  # baked, gates (off) passed, next wave started
    r = rollout(db, rid)
    assert r.wave_index == 1
    rest = r.wave_deployments["1"]
    assert len(delivery.targets(rest)) == 3
    assert delivery.requests[rest].device_ids == sorted(d for d, w in r.assignment.items() if w == 1)
    delivery.report(rest, "active")
    clock.advance(11)
    assert rollouts.step(rid) == "completed"
    assert ("commit", canary) in delivery.calls and ("commit", rest) in delivery.calls
    assert events(db, rid) == [
        "create",
        "start",
        "wave_ready",
        "baked",
        "next_wave",
        "wave_ready",
        "baked",
        "last_wave_done",
    ]


def test_pause_holds_the_rollout_and_resume_picks_up_what_happened(db, rollouts, delivery, clock) -> None:  # type: ignore[no-untyped-def]
    rid = create(rollouts, wave("1"), wave("100%"))
    canary = rollout(db, rid).wave_deployments["0"]
    assert rollouts.act(rid, "pause", "op") == "paused"
    delivery.report(canary, "active")
    clock.advance(60)
    assert rollouts.step(rid) == "paused"
    assert rollouts.act(rid, "resume", "op") == "baking"
    with pytest.raises(RolloutError, match="resume"):
        rollouts.act(rid, "resume", "op")


def test_failure_threshold_aborts_and_rolls_every_touched_device_back(db, rollouts, delivery, clock) -> None:  # type: ignore[no-untyped-def]
    rid = create(rollouts, wave("1"), wave("100%", failure_threshold="1"))
    canary = rollout(db, rid).wave_deployments["0"]
    delivery.report(canary, "active")
    clock.advance(11)
    rollouts.step(rid)
    rest = rollout(db, rid).wave_deployments["1"]
    first, *others = [t.device_id for t in delivery.targets(rest)]
    delivery.report(rest, "active", others)
    delivery.report(rest, "failed", [first], reason="self-test failed")
    r = rollout(db, rid)
    assert r.state == "aborting"
    assert "1 of 3 devices failed in wave 2" in r.reason and "self-test failed" in r.reason
    assert ("rollback", canary) in delivery.calls and ("rollback", rest) in delivery.calls
    assert rollouts.step(rid) == "aborting"  # devices still going back
    delivery.report(canary, "rolled_back")
    delivery.report(rest, "rolled_back", others)
    assert rollout(db, rid).state == "aborted"
    assert events(db, rid)[-2:] == ["wave_failed", "rollback_done"]


def test_an_operator_abort_rolls_back(db, rollouts, delivery) -> None:  # type: ignore[no-untyped-def]
    rid = create(rollouts, wave("1"), wave("100%"))
    canary = rollout(db, rid).wave_deployments["0"]
    assert rollouts.act(rid, "abort", "op", "wrong model") == "aborting"
    assert delivery.calls == [("rollback", canary)]
    assert [t.state for t in delivery.targets(canary)] == ["cancelled"]  # it had not switched: cancelled
    assert rollouts.step(rid) == "aborted"


def test_a_wave_that_requires_approval_waits_for_it(db, rollouts, delivery, clock) -> None:  # type: ignore[no-untyped-def]
    rid = create(rollouts, wave("1", require_approval=True), wave("100%"))
    canary = rollout(db, rid).wave_deployments["0"]
    delivery.report(canary, "active")
    clock.advance(11)
    assert rollouts.step(rid) == "awaiting_approval"
    clock.advance(3600)
    assert rollouts.step(rid) == "awaiting_approval"
    assert list(rollout(db, rid).wave_deployments) == ["0"]
    assert rollouts.act(rid, "approve", "op") == "deploying"
    assert list(rollout(db, rid).wave_deployments) == ["0", "1"]


def test_gates_without_samples_fail_at_their_deadline(db, rollouts, delivery, clock) -> None:  # type: ignore[no-untyped-def]
    gates = GateSpec(error_rate_max=0.05, p95_latency_ratio_max=None, rss_ratio_max=None, deadline_s=30)
    rid = create(rollouts, wave("1"), wave("100%"), gates=gates)
    canary = rollout(db, rid).wave_deployments["0"]
    delivery.report(canary, "active")
    clock.advance(11)
    assert rollouts.step(rid) == "gating"
    clock.advance(29)
    assert rollouts.step(rid) == "gating"  # waiting for samples
    clock.advance(2)
    assert rollouts.step(rid) == "aborting"
    assert "without enough evidence after 30s" in rollout(db, rid).reason
    assert ("rollback", canary) in delivery.calls


def test_a_wave_below_its_success_threshold_pauses_for_an_operator(db, rollouts, delivery) -> None:  # type: ignore[no-untyped-def]
    rid = create(rollouts, wave("2", failure_threshold="2"), wave("100%"))
    canary = rollout(db, rid).wave_deployments["0"]
    first, second = [t.device_id for t in delivery.targets(canary)]
    delivery.report(canary, "active", [first])
    delivery.report(canary, "failed", [second], reason="no space")
    r = rollout(db, rid)
    assert r.state == "paused"
    assert "only 1 of 2 devices succeeded" in r.reason
