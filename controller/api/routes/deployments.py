"""Deployments: one model version to a set of devices, with per-device status."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, status
from sqlmodel import Session, col, select

from controller import audit
from controller.api import ids
from controller.api.deps import OperatorDep, RuntimeDep, SessionDep, ViewerDep
from controller.api.openapi import errors
from controller.api.schemas import ActionResult, DeploymentCreate, DeploymentPublic, TargetPublic
from controller.db.models import Deployment, DeploymentTarget
from controller.delivery.service import DeploymentError, DeploymentRequest
from controller.delivery.targets import Target
from controller.runtime import ControllerRuntime
from wire.messages import ShadowSpec

router = APIRouter(prefix="/api/v1/deployments", tags=["deployments"])


def _dt(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts else None


def _from_live(t: Target) -> TargetPublic:
    return TargetPublic(
        device_id=t.device_id,
        artifact_id=t.artifact_id,
        variant=t.variant,
        state=t.state,
        progress=t.progress,
        percent=round(100 * t.progress, 1),
        chunks_have=t.chunks_have,
        chunks_total=t.chunks_total,
        reason=t.reason,
        metrics=t.metrics,
        previous=t.previous,
        started_at=_dt(t.started_at),
        updated_at=_dt(t.updated_at),
        finished_at=_dt(t.finished_at),
    )


def _from_row(r: DeploymentTarget) -> TargetPublic:
    return TargetPublic(
        device_id=r.device_id,
        artifact_id=r.artifact_id,
        variant=r.variant,
        state=r.state,
        progress=r.progress,
        percent=round(100 * r.progress, 1),
        chunks_have=r.chunks_have,
        chunks_total=r.chunks_total,
        reason=r.reason,
        metrics=r.metrics,
        previous=r.previous,
        started_at=r.started_at,
        updated_at=r.updated_at,
        finished_at=r.finished_at,
    )


def render(runtime: ControllerRuntime, session: Session, dep: Deployment) -> DeploymentPublic:
    live = runtime.delivery.targets(dep.id)
    if live:
        targets = [_from_live(t) for t in sorted(live, key=lambda t: t.device_id)]
    else:
        rows = session.exec(
            select(DeploymentTarget)
            .where(DeploymentTarget.deployment_id == dep.id)
            .order_by(col(DeploymentTarget.device_id))
        ).all()
        targets = [_from_row(r) for r in rows]
    counts: dict[str, int] = {}
    for t in targets:
        counts[t.state] = counts.get(t.state, 0) + 1
    return DeploymentPublic(
        id=dep.id,
        model=dep.model_name,
        version=dep.version_number,
        variant_rule=dep.variant_rule,
        selector=dep.selector,
        device_ids=dep.device_ids,
        status=runtime.delivery.live_status(dep.id) or dep.status,
        activate=dep.activate,
        timeout_s=dep.timeout_s,
        rollout_id=dep.rollout_id,
        created_at=dep.created_at,
        created_by=dep.created_by,
        finished_at=dep.finished_at,
        counts=counts,
        targets=targets,
    )


def start_deployment(runtime: ControllerRuntime, body: DeploymentCreate, actor: str) -> tuple[str, dict[str, Any]]:
    """Create a deployment from the API's request body (the REST route and the dashboard's form both call
    this); returns its id and the audit entry's detail. Raises DeploymentError."""
    target = body.target
    devices = (target.devices if target else None) or body.devices
    selector = (target.selector if target else None) or body.selector
    if runtime.bridge is None:
        raise DeploymentError("the controller has no broker connection", status.HTTP_503_SERVICE_UNAVAILABLE)
    request = DeploymentRequest(
        model=body.model,
        version=body.version,
        variant=body.variant,
        device_ids=devices,
        selector=selector,
        activate=body.activate,
        timeout_s=body.timeout_s,
        shadow=None if body.shadow is None else ShadowSpec(**body.shadow.model_dump()),
    )
    deployment_id = runtime.delivery.create(request, actor)
    detail = {
        "model": body.model,
        "version": body.version,
        "variant": body.variant,
        "selector": selector,
        "devices": (devices or [])[:50],
    }
    return deployment_id, detail


def deployment_action(runtime: ControllerRuntime, deployment_id: str, action: str, actor: str) -> int:
    """cancel, rollback or commit; returns how many devices were told. Raises DeploymentError."""
    if action == "cancel":
        return runtime.delivery.cancel(deployment_id, actor)
    if action == "rollback":
        return runtime.delivery.rollback(deployment_id, actor)
    return runtime.delivery.commit(deployment_id)


def _get(session: Session, deployment_id: str) -> Deployment:
    """The deployment with this id, or the only one whose id starts with it (as the CLI prints them)."""
    return ids.resolve(session, Deployment, deployment_id, "deployment")


@router.post("", response_model=DeploymentPublic, status_code=status.HTTP_201_CREATED, responses=errors(404, 409, 503))
def create_deployment(
    body: DeploymentCreate, runtime: RuntimeDep, session: SessionDep, who: OperatorDep
) -> DeploymentPublic:
    """Send a model version to devices (ids or a label selector); the variant is chosen per device unless given."""
    try:
        deployment_id, detail = start_deployment(runtime, body, who.name)
    except DeploymentError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    audit.record(session, who.name, "deployment.create", deployment_id, detail)
    session.commit()
    return render(runtime, session, _get(session, deployment_id))


@router.get("", response_model=list[DeploymentPublic])
def list_deployments(
    runtime: RuntimeDep,
    session: SessionDep,
    _: ViewerDep,
    status_: Annotated[Literal["running", "completed", "failed", "cancelled"] | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[DeploymentPublic]:
    stmt = select(Deployment).order_by(col(Deployment.created_at).desc()).limit(limit)
    if status_ is not None:
        stmt = stmt.where(Deployment.status == status_)
    return [render(runtime, session, d) for d in session.exec(stmt).all()]


@router.get("/{deployment_id}", response_model=DeploymentPublic)
def get_deployment(deployment_id: str, runtime: RuntimeDep, session: SessionDep, _: ViewerDep) -> DeploymentPublic:
    return render(runtime, session, _get(session, deployment_id))


def _action(runtime: ControllerRuntime, session: Session, deployment_id: str, action: str, actor: str) -> ActionResult:
    deployment_id = _get(session, deployment_id).id
    try:
        n = deployment_action(runtime, deployment_id, action, actor)
    except DeploymentError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    audit.record(session, actor, f"deployment.{action}", deployment_id, {"devices": n})
    session.commit()
    return ActionResult(deployment=deployment_id, action=action, devices=n)


@router.post("/{deployment_id}/cancel", response_model=ActionResult, responses=errors(409))
def cancel(deployment_id: str, runtime: RuntimeDep, session: SessionDep, who: OperatorDep) -> ActionResult:
    """Stop it on devices that have not switched yet (they keep their model)."""
    return _action(runtime, session, deployment_id, "cancel", who.name)


@router.post("/{deployment_id}/rollback", response_model=ActionResult, responses=errors(409))
def rollback(deployment_id: str, runtime: RuntimeDep, session: SessionDep, who: OperatorDep) -> ActionResult:
    """Return every device it touched to the model it had before (signed rollback commands)."""
    return _action(runtime, session, deployment_id, "rollback", who.name)


@router.post("/{deployment_id}/commit", response_model=ActionResult, responses=errors(409))
def commit(deployment_id: str, runtime: RuntimeDep, session: SessionDep, who: OperatorDep) -> ActionResult:
    """Confirm the new model on the devices that switched (they may free the previous slot)."""
    return _action(runtime, session, deployment_id, "commit", who.name)
