"""Rollouts: waves, gates, schedules; pause, resume, abort, approve, advance."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, Field
from sqlmodel import Session, col, select

from controller import audit
from controller.api import ids
from controller.api.deps import OperatorDep, RuntimeDep, SessionDep, ViewerDep
from controller.api.openapi import errors
from controller.db.models import Rollout, RolloutTransition
from controller.rollouts import gates
from controller.rollouts.engine import RolloutError
from controller.rollouts.plan import RolloutCreate, default_plan, wave_sizes
from controller.runtime import ControllerRuntime

router = APIRouter(prefix="/api/v1/rollouts", tags=["rollouts"])


class WavePublic(BaseModel):
    index: int
    name: str | None
    until: str
    devices: int
    deployment_id: str | None
    counts: dict[str, int]
    succeeded: int = Field(description="devices serving the new version whose wave's gates passed")
    max_concurrent: int | None
    success_threshold: float
    failure_threshold: str
    bake_s: float
    require_approval: bool
    status: Literal["waiting", "current", "done"]


class TransitionPublic(BaseModel):
    at: datetime
    from_state: str
    event: str
    to_state: str
    wave: int
    reason: str
    actor: str


class RolloutPublic(BaseModel):
    id: str
    model: str
    version: int
    selector: str
    state: str
    wave_index: int
    state_since: datetime
    reason: str
    paused_from: str | None
    devices: int
    waves: list[WavePublic]
    gates: list[dict[str, Any]]
    gate_spec: dict[str, Any]
    shadow: dict[str, Any] | None
    windows: list[dict[str, Any]]
    start_at: datetime | None
    late_devices: str
    created_at: datetime
    created_by: str
    finished_at: datetime | None
    transitions: list[TransitionPublic]


class ActionBody(BaseModel):
    reason: Annotated[str, Query(max_length=1000)] = ""


def render(runtime: ControllerRuntime, session: Session, r: Rollout) -> RolloutPublic:
    spec = RolloutCreate.model_validate(r.spec)
    waves = spec.waves or default_plan()
    sizes = wave_sizes(waves, len(r.assignment))
    transitions = session.exec(
        select(RolloutTransition).where(RolloutTransition.rollout_id == r.id).order_by(col(RolloutTransition.id))
    ).all()
    passed = gates.passed_waves((t.from_state, t.reason) for t in transitions)
    wave_list = []
    for i, w in enumerate(waves):
        dep = r.wave_deployments.get(str(i))
        counts: dict[str, int] = {}
        if dep:
            for t in runtime.delivery.targets(dep):
                counts[t.state] = counts.get(t.state, 0) + 1
        status_ = "done" if i < r.wave_index else ("current" if i == r.wave_index else "waiting")
        wave_list.append(
            WavePublic(
                index=i,
                name=w.name,
                until=w.until,
                devices=sum(1 for x in r.assignment.values() if x == i) or sizes[i],
                deployment_id=dep,
                counts=counts,
                succeeded=counts.get("active", 0) if i in passed else 0,
                max_concurrent=w.max_concurrent,
                success_threshold=w.success_threshold,
                failure_threshold=w.failure_threshold,
                bake_s=w.bake_s,
                require_approval=w.require_approval,
                status=status_,
            )
        )
    return RolloutPublic(
        id=r.id,
        model=r.model_name,
        version=r.version_number,
        selector=r.selector,
        state=r.state,
        wave_index=r.wave_index,
        state_since=r.state_since,
        reason=r.reason,
        paused_from=r.paused_from,
        devices=len(r.assignment),
        waves=wave_list,
        gates=r.gate_results,
        gate_spec=spec.gates.model_dump(),
        shadow=spec.shadow.model_dump() if spec.shadow else None,
        windows=[w.model_dump() for w in spec.windows],
        start_at=spec.start_at,
        late_devices=spec.late_devices,
        created_at=r.created_at,
        created_by=r.created_by,
        finished_at=r.finished_at,
        transitions=[
            TransitionPublic(
                at=t.at,
                from_state=t.from_state,
                event=t.event,
                to_state=t.to_state,
                wave=t.wave,
                reason=t.reason,
                actor=t.actor,
            )
            for t in transitions
        ],
    )


def _get(session: Session, rollout_id: str) -> Rollout:
    """The rollout with this id, or the only one whose id starts with it (as the CLI prints them)."""
    return ids.resolve(session, Rollout, rollout_id, "rollout")


@router.post("", response_model=RolloutPublic, status_code=status.HTTP_201_CREATED, responses=errors(404, 409, 503))
def create_rollout(body: RolloutCreate, runtime: RuntimeDep, session: SessionDep, who: OperatorDep) -> RolloutPublic:
    """Roll a model version out to the devices a label selector matches, in waves (default: canary, 10%, 50%, 100%)."""
    if body.start_at is not None:
        try:
            body.start_at.astimezone(UTC)
        except OverflowError:  # 9999-12-31T23:59-23:00 is past the year 9999 in UTC: as good as never
            body = body.model_copy(update={"start_at": datetime.max.replace(tzinfo=UTC)})
    if runtime.bridge is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the controller has no broker connection")
    try:
        rollout_id = runtime.rollouts.create(body, who.name)
    except RolloutError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    audit.record(session, who.name, "rollout.create", rollout_id, body.model_dump(mode="json", exclude={"waves"}))
    session.commit()
    session.expire_all()
    return render(runtime, session, _get(session, rollout_id))


@router.get("", response_model=list[RolloutPublic])
def list_rollouts(
    runtime: RuntimeDep, session: SessionDep, _: ViewerDep, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> list[RolloutPublic]:
    rows = session.exec(select(Rollout).order_by(col(Rollout.created_at).desc()).limit(limit)).all()
    return [render(runtime, session, r) for r in rows]


@router.get("/{rollout_id}", response_model=RolloutPublic)
def get_rollout(rollout_id: str, runtime: RuntimeDep, session: SessionDep, _: ViewerDep) -> RolloutPublic:
    return render(runtime, session, _get(session, rollout_id))


def _act(
    runtime: ControllerRuntime, session: Session, rollout_id: str, action: str, actor: str, body: ActionBody | None
) -> RolloutPublic:
    rollout_id = _get(session, rollout_id).id
    reason = body.reason if body else ""
    try:
        runtime.rollouts.act(rollout_id, action, actor, reason)
    except RolloutError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    audit.record(session, actor, f"rollout.{action}", rollout_id, {"reason": reason} if reason else {})
    session.commit()
    session.expire_all()
    return render(runtime, session, _get(session, rollout_id))


@router.post("/{rollout_id}/pause", response_model=RolloutPublic, responses=errors(409))
def pause(
    rollout_id: str, runtime: RuntimeDep, session: SessionDep, who: OperatorDep, body: ActionBody | None = None
) -> RolloutPublic:
    return _act(runtime, session, rollout_id, "pause", who.name, body)


@router.post("/{rollout_id}/resume", response_model=RolloutPublic, responses=errors(409))
def resume(
    rollout_id: str, runtime: RuntimeDep, session: SessionDep, who: OperatorDep, body: ActionBody | None = None
) -> RolloutPublic:
    return _act(runtime, session, rollout_id, "resume", who.name, body)


@router.post("/{rollout_id}/abort", response_model=RolloutPublic, responses=errors(409))
def abort(
    rollout_id: str, runtime: RuntimeDep, session: SessionDep, who: OperatorDep, body: ActionBody | None = None
) -> RolloutPublic:
    """Stop and send every device the rollout touched back to its previous model."""
    return _act(runtime, session, rollout_id, "abort", who.name, body)


@router.post("/{rollout_id}/approve", response_model=RolloutPublic, responses=errors(409))
def approve(
    rollout_id: str, runtime: RuntimeDep, session: SessionDep, who: OperatorDep, body: ActionBody | None = None
) -> RolloutPublic:
    return _act(runtime, session, rollout_id, "approve", who.name, body)


@router.post("/{rollout_id}/advance", response_model=RolloutPublic, responses=errors(409))
def advance(
    rollout_id: str, runtime: RuntimeDep, session: SessionDep, who: OperatorDep, body: ActionBody | None = None
) -> RolloutPublic:
    """Start the next wave now, skipping the rest of the bake and the gates."""
    return _act(runtime, session, rollout_id, "advance", who.name, body)
