"""Deployments: list, detail with every device's state, percent and reason, the deploy form, cancel and roll back."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session

from controller import audit
from controller.api.routes.deployments import deployment_action, start_deployment
from controller.delivery.service import DeploymentError
from controller.web import deployment_form, queries
from controller.web.deployment_view import deployment_detail, deployment_page
from controller.web.deps import FormDep, OperatorDep, OperatorFormDep, UserDep, runtime_of
from controller.web.forms import FormError
from controller.web.render import page

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)
PER_PAGE = 25
DEVICES_PER_PAGE = 100
STATES = (
    "pending",
    "downloading",
    "verifying",
    "staged",
    "shadow",
    "activating",
    "active",
    "failed",
    "rolling_back",
    "rolled_back",
    "cancelled",
)
ACTIONS = ("cancel", "rollback")
DONE_MESSAGES = {
    "created": "Deployment created: the devices download, verify and switch.",
    "cancel": "Cancelled on every device that had not switched yet (they keep their model).",
    "rollback": "Rolling back: every device it touched goes back to its previous model.",
}


@router.get("/deployments", response_class=HTMLResponse)
def deployments(
    request: Request,
    who: UserDep,
    status: Annotated[Literal["", "running", "completed", "failed", "cancelled"], Query()] = "",
    page_: Annotated[int, Query(alias="page", ge=1, le=1_000_000)] = 1,
) -> Response:
    with runtime_of(request).engine.connect() as conn:
        items, total = deployment_page(conn, status=status or None, offset=(page_ - 1) * PER_PAGE, limit=PER_PAGE)
    return page(
        request,
        "deployments.html",
        {
            "title": "Deployments",
            "nav": "deployments",
            "items": items,
            "total": total,
            "status": status,
            "page": page_,
            "per_page": PER_PAGE,
        },
    )


def _form_page(request: Request, values: dict[str, str], errors: dict[str, str], status_code: int = 200) -> Response:
    with runtime_of(request).engine.connect() as conn:
        values, offered = queries.version_form(conn, values)
    return page(
        request,
        "deployment_new.html",
        {"title": "New deployment", "nav": "deployments", "v": values, "errors": errors, **offered},
        status_code=status_code,
    )


@router.get("/deployments/new", response_class=HTMLResponse)
def new_deployment(request: Request, who: OperatorDep) -> Response:
    given = {k: v for k, v in request.query_params.items() if k in deployment_form.DEFAULTS}
    return _form_page(request, deployment_form.values_from(given, submitted=False), {})


@router.post("/deployments")
def create_deployment(request: Request, who: OperatorFormDep, form: FormDep) -> Response:
    """The same validation and service call as ``POST /api/v1/deployments``."""
    values = deployment_form.values_from(form, submitted=True)
    try:
        body = deployment_form.to_request(values)
    except FormError as exc:
        return _form_page(request, values, exc.errors, 422)
    runtime = runtime_of(request)
    try:
        deployment_id, detail = start_deployment(runtime, body, who.name)
    except DeploymentError as exc:
        return _form_page(request, values, {_field_of(str(exc), exc.status): str(exc)}, exc.status)
    with Session(runtime.engine) as session:
        audit.record(session, who.name, "deployment.create", deployment_id, {**detail, "via": "dashboard"})
        session.commit()
    log.info("dashboard: %s deployed %s v%d as %s", who.name, body.model, body.version, deployment_id[:8])
    return RedirectResponse(f"/deployments/{deployment_id}?done=created", status_code=303)


def _field_of(message: str, status: int) -> str:
    """Which field a refusal of the delivery service is about."""
    if "devices:" in message:
        return "devices"
    if "selector" in message:
        return "selector"
    if "variant" in message:
        return "variant"
    return "ref" if status == 404 else "form"


def _detail_context(request: Request, deployment_id: str, state: str, page_: int) -> dict[str, object] | None:
    runtime = runtime_of(request)
    with runtime.engine.connect() as conn:
        detail = deployment_detail(
            conn,
            deployment_id,
            state=state or None,
            offset=(page_ - 1) * DEVICES_PER_PAGE,
            limit=DEVICES_PER_PAGE,
        )
    if detail is None:
        return None
    # the delivery service knows a finished status before its row is flushed
    detail.deployment["status"] = runtime.delivery.live_status(deployment_id) or detail.deployment["status"]
    return {
        "title": f"Deployment {deployment_id[:8]}",
        "nav": "deployments",
        "d": detail.deployment,
        "detail": detail,
        "state": state,
        "states": STATES,
        "page": page_,
        "per_page": DEVICES_PER_PAGE,
    }


StateFilter = Annotated[str, Query(max_length=16, pattern="^[a-z_]*$")]
Page = Annotated[int, Query(alias="page", ge=1, le=1_000_000)]


@router.get("/deployments/{deployment_id}", response_class=HTMLResponse)
def deployment(
    request: Request,
    deployment_id: str,
    who: UserDep,
    state: StateFilter = "",
    page_: Page = 1,
    done: Annotated[str, Query(max_length=16)] = "",
) -> Response:
    context = _detail_context(request, deployment_id, state, page_)
    if context is None:
        return page(request, "error.html", {"title": "Not found", "message": f"No deployment {deployment_id!r}."}, 404)
    return page(request, "deployment.html", {**context, "notice": DONE_MESSAGES.get(done, "")})


@router.get("/deployments/{deployment_id}/live", response_class=HTMLResponse)
def deployment_live(
    request: Request, deployment_id: str, who: UserDep, state: StateFilter = "", page_: Page = 1
) -> Response:
    """The part of the detail page that changes, polled by dashboard.js while the deployment runs."""
    context = _detail_context(request, deployment_id, state, page_)
    if context is None:
        return page(request, "error_fragment.html", {"message": f"No deployment {deployment_id!r}."}, 404)
    return page(request, "deployment_live.html", context)


@router.post("/deployments/{deployment_id}/{action}")
def act(request: Request, deployment_id: str, action: str, who: OperatorFormDep) -> Response:
    """Cancel or roll back, as ``POST /api/v1/deployments/{id}/cancel|rollback`` does."""
    runtime = runtime_of(request)
    if action not in ACTIONS:
        return page(request, "error.html", {"title": "Not found", "message": f"No action {action!r}."}, 404)
    context = _detail_context(request, deployment_id, "", 1)
    if context is None:
        return page(request, "error.html", {"title": "Not found", "message": f"No deployment {deployment_id!r}."}, 404)
    try:
        n = deployment_action(runtime, deployment_id, action, who.name)
    except DeploymentError as exc:
        return page(request, "deployment.html", {**context, "error": str(exc)}, exc.status)
    with Session(runtime.engine) as session:
        audit.record(session, who.name, f"deployment.{action}", deployment_id, {"devices": n, "via": "dashboard"})
        session.commit()
    log.info("dashboard: %s did %s on deployment %s (%d devices)", who.name, action, deployment_id[:8], n)
    return RedirectResponse(f"/deployments/{deployment_id}?done={action}", status_code=303)
