"""Events into the database, in the caller's transaction: an event is stored with the change it reports,
or not at all, and its deliveries wait there for the sender."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, event, select
from sqlmodel import Session

from controller.db.models import NotificationEvent, Webhook, WebhookDelivery, table
from controller.db.types import utcnow
from controller.notify import events

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subscriber:
    webhook_id: int
    patterns: tuple[str, ...]


class Notifier:
    """Knows which webhooks want what (cached, reloaded when they change) and writes events for them."""

    def __init__(self, engine: Engine, wake: Callable[[], None] = lambda: None) -> None:
        self.engine = engine
        self._subscribers: tuple[Subscriber, ...] | None = None
        self._lock = threading.Lock()
        #: called after a transaction with new deliveries commits (the sender sends at once)
        self.wake = wake

    def reload(self) -> None:
        """Read the enabled webhooks again (after one was added, changed or removed)."""
        w = table(Webhook).c
        with self.engine.connect() as conn:
            rows = conn.execute(select(w.id, w.events).where(w.enabled.is_(True))).all()
        with self._lock:
            self._subscribers = tuple(Subscriber(r.id, tuple(r.events or [events.ALL])) for r in rows)

    def subscribers(self, event_type: str) -> list[int]:
        if self._subscribers is None:
            self.reload()
        assert self._subscribers is not None
        return [s.webhook_id for s in self._subscribers if events.matches(list(s.patterns), event_type)]

    def wants(self, event_type: str) -> bool:
        return bool(self.subscribers(event_type))

    def emit(
        self,
        session: Session,
        event_type: str,
        data: dict[str, Any],
        *,
        at: datetime | None = None,
        only: int | None = None,
    ) -> str | None:
        """Add the event and a delivery per interested webhook to ``session`` (committed by the caller).

        Returns the event's id, or None when no webhook wants it (nothing is written then). ``only``
        sends to that one webhook whatever its patterns (the test event).
        """
        webhook_ids = [only] if only is not None else self.subscribers(event_type)
        if not webhook_ids:
            return None
        at = at or utcnow()
        event_id = events.new_id()
        text = events.body(event_id, event_type, data, at)
        session.add(NotificationEvent(id=event_id, type=event_type, body=text, created_at=at))
        for webhook_id in webhook_ids:
            session.add(
                WebhookDelivery(
                    webhook_id=webhook_id, event_id=event_id, event_type=event_type, next_attempt_at=at, created_at=at
                )
            )
        event.listen(session, "after_commit", self._committed, once=True)
        log.info("notify: %s %s for %d webhooks", event_type, event_id, len(webhook_ids))
        return event_id

    def _committed(self, _session: Any) -> None:
        try:
            self.wake()
        except Exception:  # the sender polls anyway: a failed wake-up only delays a delivery
            log.exception("notify: waking the sender failed")
