"""Managing webhooks and reading their delivery log: the code behind the REST routes, the CLI (through the
REST API) and the dashboard's Notifications page alike."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from sqlalchemy import Connection, func, select
from sqlmodel import Session

from controller.db.models import NotificationEvent, Webhook, WebhookDelivery, table
from controller.db.types import utcnow
from controller.notify import events, signing
from controller.notify.errors import NotifyError
from controller.notify.events import EventType
from controller.notify.outbox import Notifier

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$"
WebhookName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=NAME_PATTERN)]
STATUSES = ("pending", "delivered", "failed")
#: what the schema says of these fields, stricter than the validators (whatever the schema admits is accepted);
#: the validators keep their own messages, which say what to do
URL_PATTERN = r"^https?://[A-Za-z0-9._~-]+(:[0-9]{1,5})?([/?][^#]*)?$"
#: ``whsec_`` + base64 of 24 to 62 bytes
SECRET_PATTERN = r"^whsec_([A-Za-z0-9+/]{4}){8,20}([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
WebhookUrl = Annotated[str, StringConstraints(max_length=2048), Field(json_schema_extra={"pattern": URL_PATTERN})]
WebhookSecret = Annotated[str, Field(json_schema_extra={"pattern": SECRET_PATTERN})]
EventPattern = Annotated[
    str, StringConstraints(max_length=64), Field(json_schema_extra={"pattern": events.SCHEMA_PATTERN})
]


def check_url(value: str) -> str:
    value = value.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"a webhook URL is http(s)://host[:port]/path, not {value[:200]!r}")
    if parts.fragment:
        raise ValueError("a webhook URL has no #fragment")
    if len(value) > 2048:
        raise ValueError("a webhook URL has at most 2048 characters")
    return value


class _Fields(BaseModel):
    @field_validator("url", check_fields=False)
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return None if v is None else check_url(v)

    @field_validator("events", check_fields=False)
    @classmethod
    def _events(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else events.check_patterns(v)

    @field_validator("secret", check_fields=False)
    @classmethod
    def _secret(cls, v: str | None) -> str | None:
        if v is not None:
            signing.key_of(v)
        return v


class WebhookCreate(_Fields):
    model_config = ConfigDict(extra="forbid")

    name: WebhookName = Field(description="what it is for (unique), e.g. ops-pager")
    url: WebhookUrl = Field(description="where events are POSTed: http(s)://host[:port]/path")
    events: list[EventPattern] = Field(
        default_factory=lambda: [events.ALL],
        max_length=32,
        description="event types or patterns (rollout.*, deployment.failed, device.offline, *); default: all",
    )
    secret: WebhookSecret | None = Field(
        None, description="whsec_ + base64 of 24-64 random bytes; omit to have one generated (answered once)"
    )
    description: Annotated[str, StringConstraints(max_length=1024)] = ""
    enabled: bool = True


class WebhookUpdate(_Fields):
    model_config = ConfigDict(extra="forbid")

    url: WebhookUrl | None = None
    events: list[EventPattern] | None = Field(None, max_length=32)
    description: Annotated[str, StringConstraints(max_length=1024)] | None = None
    enabled: bool | None = None
    secret: WebhookSecret | None = Field(None, description="a new secret (whsec_...)")
    rotate_secret: bool = Field(False, description="generate a new secret (answered once)")


class WebhookPublic(BaseModel):
    """A webhook without its secret, with how its deliveries are doing."""

    id: int
    name: str
    url: str
    events: list[str]
    enabled: bool
    description: str
    created_at: datetime
    created_by: str
    updated_at: datetime
    pending: int = Field(description="deliveries waiting (a first try or a retry)")
    failed: int = Field(description="deliveries that failed for good (kept for webhook_log_days)")
    delivered: int
    last_attempt_at: datetime | None
    last_status: int | None = Field(description="HTTP status of the newest attempt (None: no answer)")


class WebhookCreated(WebhookPublic):
    secret: str = Field(description="the signing secret: answered once, keep it on the receiver")


class DeliveryPublic(BaseModel):
    id: int
    webhook_id: int
    webhook: str
    event_id: str
    event_type: str
    status: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None = Field(description="when it is tried next (pending only)")
    last_attempt_at: datetime | None
    delivered_at: datetime | None
    last_status: int | None
    last_error: str
    history: list[dict[str, Any]] = Field(description="the last attempts: at (Unix s), status, error, ms")


class DeliveryDetail(DeliveryPublic):
    body: dict[str, Any] = Field(description="the JSON body the receiver gets")


class EventTypePublic(BaseModel):
    type: str
    description: str


def event_types() -> list[EventTypePublic]:
    return [EventTypePublic(type=t.value, description=events.DESCRIPTIONS[t]) for t in EventType]


# ------------------------------------------------------------------ rows --


def get(session: Session, webhook_id: int) -> Webhook:
    row = session.get(Webhook, webhook_id)
    if row is None:
        raise NotifyError(f"webhook {webhook_id} not found", 404)
    return row


def create(session: Session, body: WebhookCreate, actor: str) -> tuple[Webhook, str]:
    """Add a webhook (committed by the caller); returns it and its secret."""
    if session.execute(select(table(Webhook).c.id).where(table(Webhook).c.name == body.name)).first():
        raise NotifyError(f"a webhook named {body.name!r} exists: choose another name or change that one", 409)
    secret = body.secret or signing.new_secret()
    row = Webhook(
        name=body.name,
        url=body.url,
        secret=secret,
        events=body.events,
        enabled=body.enabled,
        description=body.description,
        created_by=actor,
    )
    session.add(row)
    session.flush()
    return row, secret


def update(session: Session, row: Webhook, body: WebhookUpdate) -> str | None:
    """Apply a change (committed by the caller); returns the new secret when there is one."""
    changes = body.model_dump(exclude_unset=True, exclude={"rotate_secret", "secret"})
    for key, value in changes.items():
        if value is not None:
            setattr(row, key, value)
    secret = None
    if body.rotate_secret:
        secret = signing.new_secret()
    elif body.secret is not None:
        secret = body.secret
    if secret is not None:
        row.secret = secret
    row.updated_at = utcnow()
    session.add(row)
    return secret


def summaries(conn: Connection, webhook_ids: list[int] | None = None) -> dict[int, dict[str, Any]]:
    """Per webhook: deliveries by status and the newest attempt, in two grouped queries."""
    d = table(WebhookDelivery).c
    out: dict[int, dict[str, Any]] = {}
    counts = select(d.webhook_id, d.status, func.count().label("n")).group_by(d.webhook_id, d.status)
    if webhook_ids is not None:
        counts = counts.where(d.webhook_id.in_(webhook_ids))
    for r in conn.execute(counts):
        out.setdefault(r.webhook_id, {})[r.status] = r.n
    newest = select(d.webhook_id, func.max(d.last_attempt_at).label("at")).group_by(d.webhook_id)
    if webhook_ids is not None:
        newest = newest.where(d.webhook_id.in_(webhook_ids))
    latest = {r.webhook_id: r.at for r in conn.execute(newest) if r.at is not None}
    if latest:
        for r in conn.execute(
            select(d.webhook_id, d.last_status, d.last_attempt_at).where(
                d.webhook_id.in_(list(latest)), d.last_attempt_at.in_(list(latest.values()))
            )
        ):
            if latest.get(r.webhook_id) == r.last_attempt_at:
                out.setdefault(r.webhook_id, {})["last"] = (r.last_attempt_at, r.last_status)
    return out


def public(row: Webhook, summary: dict[str, Any] | None = None) -> WebhookPublic:
    assert row.id is not None
    s = summary or {}
    last_at, last_status = s.get("last", (None, None))
    return WebhookPublic(
        id=row.id,
        name=row.name,
        url=row.url,
        events=list(row.events),
        enabled=row.enabled,
        description=row.description,
        created_at=row.created_at,
        created_by=row.created_by,
        updated_at=row.updated_at,
        pending=s.get("pending", 0),
        failed=s.get("failed", 0),
        delivered=s.get("delivered", 0),
        last_attempt_at=last_at,
        last_status=last_status,
    )


def listing(session: Session) -> list[WebhookPublic]:
    rows = session.execute(select(Webhook).order_by(table(Webhook).c.name)).scalars().all()
    stats = summaries(session.connection())
    return [public(r, stats.get(r.id or 0)) for r in rows]


def one(session: Session, webhook_id: int) -> WebhookPublic:
    row = get(session, webhook_id)
    return public(row, summaries(session.connection(), [webhook_id]).get(webhook_id))


# ---------------------------------------------------------- deliveries --


def _log_select() -> Any:
    d, w = table(WebhookDelivery).c, table(Webhook).c
    return select(
        d.id,
        d.webhook_id,
        w.name.label("webhook"),
        d.event_id,
        d.event_type,
        d.status,
        d.attempts,
        d.created_at,
        d.next_attempt_at,
        d.last_attempt_at,
        d.delivered_at,
        d.last_status,
        d.last_error,
        d.history,
    ).join_from(table(WebhookDelivery), table(Webhook), d.webhook_id == w.id)


def _delivery_public(r: Any) -> DeliveryPublic:
    item = dict(r._mapping)
    if item["status"] != "pending":
        item["next_attempt_at"] = None
    return DeliveryPublic(**item)


def deliveries(
    conn: Connection,
    *,
    webhook_id: int | None = None,
    status: str | None = None,
    event_type: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[DeliveryPublic], int]:
    """The delivery log, newest first, and how many match."""
    d = table(WebhookDelivery).c
    where = []
    if webhook_id is not None:
        where.append(d.webhook_id == webhook_id)
    if status:
        where.append(d.status == status)
    if event_type:
        where.append(d.event_type == event_type)
    total = conn.execute(select(func.count()).select_from(table(WebhookDelivery)).where(*where)).scalar_one()
    newest_first = _log_select().where(*where).order_by(d.created_at.desc(), d.id.desc())
    rows = conn.execute(newest_first.offset(offset).limit(limit))
    return [_delivery_public(r) for r in rows], int(total)


def delivery(conn: Connection, delivery_id: int) -> DeliveryDetail:
    """One delivery with the body its receiver gets."""
    r = conn.execute(_log_select().where(table(WebhookDelivery).c.id == delivery_id)).first()
    if r is None:
        raise NotifyError(f"delivery {delivery_id} not found", 404)
    found = _delivery_public(r)
    e = table(NotificationEvent).c
    text = conn.execute(select(e.body).where(e.id == found.event_id)).scalar() or "{}"
    return DeliveryDetail(**found.model_dump(), body=json.loads(text))


def redeliver(session: Session, delivery_id: int) -> WebhookDelivery:
    """Send a delivery again now, with a fresh set of attempts (a failed one, or a pending one sooner)."""
    row = session.get(WebhookDelivery, delivery_id)
    if row is None:
        raise NotifyError(f"delivery {delivery_id} not found", 404)
    if row.status == "delivered":
        raise NotifyError(f"delivery {delivery_id} was delivered already; send a test event instead", 409)
    row.status, row.attempts, row.next_attempt_at = "pending", 0, utcnow()
    session.add(row)
    return row


def send_test(session: Session, notifier: Notifier, row: Webhook, actor: str) -> str:
    """A ping event to this webhook alone, whatever its event patterns (it must be enabled)."""
    if not row.enabled:
        raise NotifyError(f"webhook {row.name!r} is disabled: enable it to send it anything", 409)
    event_id = notifier.emit(
        session,
        EventType.PING,
        {"webhook": {"id": row.id, "name": row.name}, "requested_by": actor, "message": "a test event from slmfleet"},
        only=row.id,
    )
    assert event_id is not None
    return event_id
