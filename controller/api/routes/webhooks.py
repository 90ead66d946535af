"""Webhooks (admins only): add, list, change, remove, send a test event, and read or replay the delivery log."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Response, status
from sqlmodel import Session

from controller import audit
from controller.api.deps import AdminDep, RuntimeDep, SessionDep
from controller.api.openapi import errors
from controller.notify import webhooks
from controller.notify.errors import NotifyError
from controller.notify.webhooks import (
    DeliveryDetail,
    DeliveryPublic,
    EventTypePublic,
    WebhookCreate,
    WebhookCreated,
    WebhookPublic,
    WebhookUpdate,
)
from controller.runtime import ControllerRuntime

router = APIRouter(prefix="/api/v1", tags=["webhooks"])

WebhookId = Annotated[int, Path(ge=1, le=2**31 - 1, description="the webhook's id (from the list)")]
DeliveryId = Annotated[int, Path(ge=1, le=2**31 - 1, description="the delivery's id (from the log)")]
StatusFilter = Annotated[Literal["pending", "delivered", "failed"] | None, Query(alias="status")]


def _refused(exc: NotifyError) -> HTTPException:
    return HTTPException(exc.status, str(exc))


def _get(session: Session, webhook_id: int) -> webhooks.Webhook:
    try:
        return webhooks.get(session, webhook_id)
    except NotifyError as exc:
        raise _refused(exc) from None


def _changed(runtime: ControllerRuntime) -> None:
    runtime.notifier.reload()


@router.get("/webhook-events", response_model=list[EventTypePublic])
def list_event_types(_: AdminDep) -> list[EventTypePublic]:
    """The events a webhook can ask for."""
    return webhooks.event_types()


@router.get("/webhooks", response_model=list[WebhookPublic])
def list_webhooks(session: SessionDep, _: AdminDep) -> list[WebhookPublic]:
    """Every webhook with its deliveries by status; never a secret."""
    return webhooks.listing(session)


@router.post("/webhooks", response_model=WebhookCreated, status_code=status.HTTP_201_CREATED, responses=errors(409))
def create_webhook(body: WebhookCreate, runtime: RuntimeDep, session: SessionDep, who: AdminDep) -> WebhookCreated:
    """Add a webhook; the answer carries its signing secret, which is not shown again."""
    try:
        row, secret = webhooks.create(session, body, who.name)
    except NotifyError as exc:
        raise _refused(exc) from None
    audit.record(
        session, who.name, "webhook.create", body.name, {"id": row.id, "url": body.url, "events": body.events}
    )
    session.commit()
    session.refresh(row)
    _changed(runtime)
    return WebhookCreated(**webhooks.public(row).model_dump(), secret=secret)


@router.get("/webhooks/{webhook_id}", response_model=WebhookPublic, responses=errors(404))
def get_webhook(webhook_id: WebhookId, session: SessionDep, _: AdminDep) -> WebhookPublic:
    try:
        return webhooks.one(session, webhook_id)
    except NotifyError as exc:
        raise _refused(exc) from None


@router.patch("/webhooks/{webhook_id}", response_model=WebhookPublic | WebhookCreated, responses=errors(404))
def update_webhook(
    webhook_id: WebhookId, body: WebhookUpdate, runtime: RuntimeDep, session: SessionDep, who: AdminDep
) -> WebhookPublic | WebhookCreated:
    """Change the URL, events, description or enabled; ``rotate_secret`` answers a new secret, once."""
    row = _get(session, webhook_id)
    secret = webhooks.update(session, row, body)
    detail = body.model_dump(exclude_unset=True, exclude={"secret"})
    if body.secret is not None:
        detail["secret"] = "replaced"
    audit.record(session, who.name, "webhook.update", row.name, {"id": webhook_id, **detail})
    session.commit()
    session.refresh(row)
    _changed(runtime)
    current = webhooks.one(session, webhook_id)
    return WebhookCreated(**current.model_dump(), secret=secret) if secret and body.rotate_secret else current


@router.delete("/webhooks/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404))
def delete_webhook(webhook_id: WebhookId, runtime: RuntimeDep, session: SessionDep, who: AdminDep) -> Response:
    """Remove a webhook with its pending deliveries and its log."""
    row = _get(session, webhook_id)
    name = row.name
    session.delete(row)
    audit.record(session, who.name, "webhook.delete", name, {"id": webhook_id})
    session.commit()
    _changed(runtime)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/webhooks/{webhook_id}/test",
    response_model=DeliveryPublic,
    status_code=status.HTTP_202_ACCEPTED,
    responses=errors(404, 409),
)
def test_webhook(webhook_id: WebhookId, runtime: RuntimeDep, session: SessionDep, who: AdminDep) -> DeliveryPublic:
    """Queue a ``ping`` event to this webhook; follow it in the delivery log."""
    row = _get(session, webhook_id)
    try:
        event_id = webhooks.send_test(session, runtime.notifier, row, who.name)
    except NotifyError as exc:
        raise _refused(exc) from None
    audit.record(session, who.name, "webhook.test", row.name, {"id": webhook_id, "event": event_id})
    session.commit()
    items, _ = webhooks.deliveries(session.connection(), webhook_id=webhook_id, limit=1)
    return items[0]


@router.get("/webhooks/{webhook_id}/deliveries", response_model=list[DeliveryPublic], responses=errors(404))
def webhook_deliveries(
    webhook_id: WebhookId,
    session: SessionDep,
    _: AdminDep,
    status_: StatusFilter = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[DeliveryPublic]:
    """One webhook's delivery log, newest first."""
    _get(session, webhook_id)
    items, _total = webhooks.deliveries(
        session.connection(), webhook_id=webhook_id, status=status_, limit=limit, offset=offset
    )
    return items


@router.get("/webhook-deliveries", response_model=list[DeliveryPublic])
def all_deliveries(
    session: SessionDep,
    _: AdminDep,
    status_: StatusFilter = None,
    event: Annotated[str | None, Query(max_length=64, description="an event type, e.g. rollout.aborting")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[DeliveryPublic]:
    """Every webhook's delivery log, newest first."""
    items, _total = webhooks.deliveries(
        session.connection(), status=status_, event_type=event, limit=limit, offset=offset
    )
    return items


@router.get("/webhook-deliveries/{delivery_id}", response_model=DeliveryDetail, responses=errors(404))
def get_delivery(delivery_id: DeliveryId, session: SessionDep, _: AdminDep) -> DeliveryDetail:
    """One delivery, with the body its receiver gets and its last attempts."""
    try:
        return webhooks.delivery(session.connection(), delivery_id)
    except NotifyError as exc:
        raise _refused(exc) from None


@router.post("/webhook-deliveries/{delivery_id}/retry", response_model=DeliveryPublic, responses=errors(404, 409))
def retry_delivery(delivery_id: DeliveryId, runtime: RuntimeDep, session: SessionDep, who: AdminDep) -> DeliveryPublic:
    """Send a failed (or still pending) delivery again now, with a fresh set of attempts."""
    try:
        row = webhooks.redeliver(session, delivery_id)
    except NotifyError as exc:
        raise _refused(exc) from None
    audit.record(session, who.name, "webhook.redeliver", str(delivery_id), {"event": row.event_id})
    session.commit()
    runtime.notifier.wake()
    return webhooks.delivery(session.connection(), delivery_id)
