"""Notifications (admins): webhooks, the events each gets, test events, and the delivery log."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlmodel import Session

from controller import audit
from controller.notify import webhooks
from controller.notify.errors import NotifyError
from controller.notify.events import ALL, DESCRIPTIONS, EventType
from controller.notify.webhooks import WebhookCreate, WebhookUpdate
from controller.web.deps import AdminDep, AdminFormDep, FormDep, runtime_of
from controller.web.render import page

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)
PER_PAGE = 50
FIELDS = ("name", "url", "description", "secret")
ACTIONS = ("enable", "disable", "test", "rotate", "delete")
DONE_MESSAGES = {
    "enable": "Enabled: it gets events again (and what waited for it).",
    "disable": "Disabled: it gets no events; pending deliveries wait until it is enabled.",
    "test": "A ping event is on its way: see the log below.",
    "retry": "Queued again: it is sent now, with a fresh set of attempts.",
}
WebhookId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def _events_of(form: Any) -> list[str]:
    chosen = [t.value for t in EventType if t is not EventType.PING and form.get(f"event_{t.value}")]
    return chosen or [ALL]


def _list_page(
    request: Request,
    values: dict[str, Any],
    errors: dict[str, str] | None = None,
    *,
    created: dict[str, Any] | None = None,
    notice: str = "",
    status_code: int = 200,
) -> Response:
    with Session(runtime_of(request).engine) as session:
        items = webhooks.listing(session)
        recent, _ = webhooks.deliveries(session.connection(), limit=15)
    return page(
        request,
        "webhooks.html",
        {
            "title": "Notifications",
            "nav": "webhooks",
            "items": items,
            "recent": recent,
            "v": values,
            "errors": errors or {},
            "created": created,
            "notice": notice,
            "event_types": [(t.value, DESCRIPTIONS[t]) for t in EventType if t is not EventType.PING],
        },
        status_code=status_code,
    )


def _blank() -> dict[str, Any]:
    return {**dict.fromkeys(FIELDS, ""), "events": []}


@router.get("/webhooks", response_class=HTMLResponse)
def webhooks_page(request: Request, who: AdminDep, done: Annotated[str, Query(max_length=16)] = "") -> Response:
    notice = "Webhook removed, with its pending deliveries and log." if done == "delete" else ""
    return _list_page(request, _blank(), notice=notice)


@router.post("/webhooks", response_class=HTMLResponse)
def create_webhook(request: Request, who: AdminFormDep, form: FormDep) -> Response:
    """The same checks and service call as ``POST /api/v1/webhooks``; the secret is answered once, here."""
    values: dict[str, Any] = {k: str(form.get(k, "")).strip() for k in FIELDS}
    values["events"] = _events_of(form)
    try:
        body = WebhookCreate.model_validate({**values, "secret": values["secret"] or None})
    except ValidationError as exc:
        errors: dict[str, str] = {}
        for e in exc.errors():
            field = str(e["loc"][0]) if e["loc"] else "form"
            errors.setdefault(
                field if field in (*FIELDS, "events") else "form", str(e["msg"]).removeprefix("Value error, ")
            )
        return _list_page(request, values, errors, status_code=422)
    runtime = runtime_of(request)
    with Session(runtime.engine) as session:
        try:
            row, secret = webhooks.create(session, body, who.name)
        except NotifyError as exc:
            return _list_page(request, values, {"name": str(exc)}, status_code=exc.status)
        detail = {"id": row.id, "url": body.url, "events": body.events, "via": "dashboard"}
        audit.record(session, who.name, "webhook.create", body.name, detail)
        session.commit()
        created = {"id": row.id, "name": row.name, "secret": secret, "generated": not values["secret"]}
    runtime.notifier.reload()
    log.info("dashboard: %s added webhook %s", who.name, body.name)
    return _list_page(request, _blank(), created=created, status_code=201)


@router.get("/webhooks/{webhook_id}", response_class=HTMLResponse)
def webhook_page(
    request: Request,
    webhook_id: WebhookId,
    who: AdminDep,
    status: Annotated[Literal["", "pending", "delivered", "failed"], Query()] = "",
    page_: Annotated[int, Query(alias="page", ge=1, le=1_000_000)] = 1,
    done: Annotated[str, Query(max_length=16)] = "",
) -> Response:
    return _detail(request, webhook_id, status, page_, notice=DONE_MESSAGES.get(done, ""))


def _detail(
    request: Request,
    webhook_id: int,
    status: str = "",
    page_: int = 1,
    *,
    notice: str = "",
    error: str = "",
    secret: str = "",
    status_code: int = 200,
) -> Response:
    with Session(runtime_of(request).engine) as session:
        try:
            hook = webhooks.one(session, webhook_id)
        except NotifyError as exc:
            return page(request, "error.html", {"title": "Not found", "message": str(exc)}, exc.status)
        items, total = webhooks.deliveries(
            session.connection(),
            webhook_id=webhook_id,
            status=status or None,
            limit=PER_PAGE,
            offset=(page_ - 1) * PER_PAGE,
        )
    return page(
        request,
        "webhook.html",
        {
            "title": f"Webhook {hook.name}",
            "nav": "webhooks",
            "w": hook,
            "items": items,
            "total": total,
            "status": status,
            "page": page_,
            "per_page": PER_PAGE,
            "notice": notice,
            "error": error,
            "secret": secret,
        },
        status_code=status_code,
    )


@router.post("/webhooks/{webhook_id}/{action}")
def act(request: Request, webhook_id: WebhookId, action: str, who: AdminFormDep) -> Response:
    """enable, disable, test, rotate (the secret) or delete, as the REST API does them."""
    if action not in ACTIONS:
        return page(request, "error.html", {"title": "Not found", "message": f"No action {action!r}."}, 404)
    runtime = runtime_of(request)
    secret = ""
    with Session(runtime.engine) as session:
        try:
            row = webhooks.get(session, webhook_id)
            name = row.name
            if action == "delete":
                session.delete(row)
                detail: dict[str, Any] = {"id": webhook_id}
            elif action == "test":
                detail = {"id": webhook_id, "event": webhooks.send_test(session, runtime.notifier, row, who.name)}
            else:
                change = (
                    WebhookUpdate(enabled=action == "enable")
                    if action != "rotate"
                    else WebhookUpdate(rotate_secret=True)
                )
                secret = webhooks.update(session, row, change) or ""
                detail = {"id": webhook_id, **change.model_dump(exclude_unset=True)}
        except NotifyError as exc:
            return _detail(request, webhook_id, error=str(exc), status_code=exc.status)
        audit.record(
            session,
            who.name,
            f"webhook.{'update' if action in ('enable', 'disable', 'rotate') else action}",
            name,
            {**detail, "via": "dashboard"},
        )
        session.commit()
    runtime.notifier.reload()
    log.info("dashboard: %s did %s on webhook %s", who.name, action, name)
    if action == "delete":
        return RedirectResponse("/webhooks?done=delete", status_code=303)
    if action == "rotate":  # answered directly: the new secret is shown this once
        return _detail(
            request, webhook_id, notice="New secret made: the old one no longer signs anything.", secret=secret
        )
    return RedirectResponse(f"/webhooks/{webhook_id}?done={action}", status_code=303)


@router.post("/webhook-deliveries/{delivery_id}/retry")
def retry(request: Request, delivery_id: WebhookId, who: AdminFormDep) -> Response:
    """Send a delivery again now (``POST /api/v1/webhook-deliveries/{id}/retry``)."""
    runtime = runtime_of(request)
    with Session(runtime.engine) as session:
        try:
            row = webhooks.redeliver(session, delivery_id)
        except NotifyError as exc:
            return page(request, "error.html", {"title": "Not possible", "message": str(exc)}, exc.status)
        webhook_id = row.webhook_id
        audit.record(
            session, who.name, "webhook.redeliver", str(delivery_id), {"event": row.event_id, "via": "dashboard"}
        )
        session.commit()
    runtime.notifier.wake()
    return RedirectResponse(f"/webhooks/{webhook_id}?done=retry", status_code=303)


@router.get("/webhook-deliveries/{delivery_id}", response_class=HTMLResponse)
def delivery_page(request: Request, delivery_id: WebhookId, who: AdminDep) -> Response:
    """One delivery: the body the receiver gets, its headers' event and id, and the last attempts."""
    with runtime_of(request).engine.connect() as conn:
        try:
            found = webhooks.delivery(conn, delivery_id)
        except NotifyError as exc:
            return page(request, "error.html", {"title": "Not found", "message": str(exc)}, exc.status)
    return page(
        request,
        "webhook_delivery.html",
        {
            "title": f"Delivery {delivery_id}",
            "nav": "webhooks",
            "x": found,
            "body": json.dumps(found.body, indent=2, sort_keys=True),
        },
    )
