"""Rollouts: list, detail with live progress, the creation form, and the operator actions."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session

from controller import audit
from controller.devices import selectors
from controller.rollouts.engine import RolloutError
from controller.web import forms, queries
from controller.web.deps import FormDep, OperatorDep, OperatorFormDep, UserDep, runtime_of
from controller.web.render import page
from controller.web.rollout_view import ACTIONS, rollout_view

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)
PER_PAGE = 25
DONE_MESSAGES = {
    "created": "Rollout created.",
    "approve": "Approved: the next wave starts.",
    "pause": "Paused.",
    "resume": "Resumed.",
    "advance": "Advanced to the next wave.",
    "abort": "Aborting: every touched device goes back to its previous model.",
}


@router.get("/rollouts", response_class=HTMLResponse)
def rollouts(
    request: Request,
    who: UserDep,
    show: Annotated[str, Query(pattern="^(all|active)$")] = "all",
    page_: Annotated[int, Query(alias="page", ge=1, le=1_000_000)] = 1,
) -> Response:
    with runtime_of(request).engine.connect() as conn:
        items, total = queries.rollout_page(
            conn, active_only=show == "active", offset=(page_ - 1) * PER_PAGE, limit=PER_PAGE
        )
    return page(
        request,
        "rollouts.html",
        {
            "title": "Rollouts",
            "nav": "rollouts",
            "items": items,
            "total": total,
            "show": show,
            "page": page_,
            "per_page": PER_PAGE,
        },
    )


def _form_page(request: Request, values: dict[str, str], errors: dict[str, str], status_code: int = 200) -> Response:
    with runtime_of(request).engine.connect() as conn:
        values, offered = queries.version_form(conn, values)
        matching = None
        if values["selector"] and "selector" not in errors:
            try:
                matching = queries.count_matching(conn, selectors.parse(values["selector"]))
            except selectors.SelectorError:
                matching = None
    return page(
        request,
        "rollout_new.html",
        {"title": "New rollout", "nav": "rollouts", "v": values, "errors": errors, "matching": matching, **offered},
        status_code=status_code,
    )


@router.get("/rollouts/new", response_class=HTMLResponse)
def new_rollout(request: Request, who: OperatorDep) -> Response:
    values = forms.values_from({k: v for k, v in request.query_params.items() if k in forms.DEFAULTS})
    return _form_page(request, values, {})


@router.post("/rollouts")
def create_rollout(request: Request, who: OperatorFormDep, form: FormDep) -> Response:
    values = forms.values_from(form)
    try:
        body = forms.to_rollout(values)
    except forms.FormError as exc:
        return _form_page(request, values, exc.errors, 422)
    runtime = runtime_of(request)
    if runtime.bridge is None:
        return _form_page(request, values, {"form": "the controller has no broker connection"}, 503)
    try:
        rollout_id = runtime.rollouts.create(body, who.name)
    except RolloutError as exc:
        field = exc.field or ("selector" if "selector" in str(exc) or "no device" in str(exc) else "ref")
        return _form_page(request, values, {field: str(exc)}, exc.status)
    with Session(runtime.engine) as session:
        audit.record(
            session,
            who.name,
            "rollout.create",
            rollout_id,
            {**body.model_dump(mode="json", exclude={"waves"}), "via": "dashboard"},
        )
        session.commit()
    log.info("dashboard: %s created rollout %s", who.name, rollout_id[:8])
    return RedirectResponse(f"/rollouts/{rollout_id}?done=created", status_code=303)


@router.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
def rollout(
    request: Request, rollout_id: str, who: UserDep, done: Annotated[str, Query(max_length=16)] = ""
) -> Response:
    with runtime_of(request).engine.connect() as conn:
        view = rollout_view(conn, rollout_id)
    if view is None:
        return page(request, "error.html", {"title": "Not found", "message": f"No rollout {rollout_id!r}."}, 404)
    return page(
        request,
        "rollout.html",
        {
            "title": f"Rollout {rollout_id[:8]}",
            "nav": "rollouts",
            "view": view,
            "r": view.rollout,
            "notice": DONE_MESSAGES.get(done, ""),
            "all_actions": ACTIONS,
        },
    )


@router.get("/rollouts/{rollout_id}/live", response_class=HTMLResponse)
def rollout_live(request: Request, rollout_id: str, who: UserDep) -> Response:
    """The part of the detail page that changes, polled by dashboard.js."""
    with runtime_of(request).engine.connect() as conn:
        view = rollout_view(conn, rollout_id)
    if view is None:
        return page(request, "error_fragment.html", {"message": f"No rollout {rollout_id!r}."}, 404)
    return page(request, "rollout_live.html", {"view": view, "r": view.rollout})


@router.post("/rollouts/{rollout_id}/{action}")
def act(
    request: Request,
    rollout_id: str,
    action: str,
    who: OperatorFormDep,
    reason: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    """pause, resume, abort, approve or advance, as the operator who pressed the button."""
    runtime = runtime_of(request)
    if action not in ACTIONS:
        return page(request, "error.html", {"title": "Not found", "message": f"No action {action!r}."}, 404)
    reason = reason.strip()
    try:
        runtime.rollouts.act(rollout_id, action, who.name, reason)
    except RolloutError as exc:
        with runtime.engine.connect() as conn:
            view = rollout_view(conn, rollout_id)
        if view is None:
            return page(request, "error.html", {"title": "Not found", "message": str(exc)}, 404)
        return page(
            request,
            "rollout.html",
            {
                "title": f"Rollout {rollout_id[:8]}",
                "nav": "rollouts",
                "view": view,
                "r": view.rollout,
                "error": str(exc),
                "all_actions": ACTIONS,
            },
            status_code=exc.status,
        )
    with Session(runtime.engine) as session:
        detail = {"reason": reason, "via": "dashboard"} if reason else {"via": "dashboard"}
        audit.record(session, who.name, f"rollout.{action}", rollout_id, detail)
        session.commit()
    log.info("dashboard: %s did %s on rollout %s", who.name, action, rollout_id[:8])
    return RedirectResponse(f"/rollouts/{rollout_id}?done={action}", status_code=303)
