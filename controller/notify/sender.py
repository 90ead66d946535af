"""The sender: a thread that picks due deliveries from the database and posts them on a small pool.

Bounded on purpose: at most ``concurrency`` requests in flight and one per webhook (a slow or dead receiver
holds one worker for at most ``timeout_s`` and never the others), at most 1 KiB of an answer read, and
nothing queued in memory: what waits, waits in ``webhook_delivery``. A 2xx answer delivers; anything else
(an error status, a refused connection, a timeout, a redirect) is retried after a delay that grows
4x per attempt up to ``retry_max_s`` (with jitter; a ``Retry-After`` within that is honoured), and the
delivery fails after ``max_attempts``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from sqlalchemy import Engine, and_, delete, exists, select, update

from agent import __version__
from controller.db.models import NotificationEvent, Webhook, WebhookDelivery, table
from controller.db.types import from_epoch, utcnow
from controller.notify import signing

log = logging.getLogger(__name__)

#: bytes of a receiver's answer kept in the log
ANSWER_BYTES = 1024
#: attempts kept in a delivery's history
HISTORY = 10


@dataclass(frozen=True)
class SenderSettings:
    concurrency: int = 4
    timeout_s: float = 10.0
    max_attempts: int = 10
    retry_base_s: float = 10.0
    retry_max_s: float = 3600.0
    poll_s: float = 1.0


def retry_delay(attempts: int, settings: SenderSettings, retry_after: float | None = None) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: base * 4^(n-1), capped, +-20% jitter."""
    delay = min(settings.retry_base_s * 4 ** max(0, attempts - 1), settings.retry_max_s)
    delay *= random.uniform(0.8, 1.2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, settings.retry_max_s))
    return delay


def _retry_after(value: str | None, now: float) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None


@dataclass
class Outcome:
    ok: bool
    status: int | None
    error: str
    ms: float
    retry_after: float | None = None


class WebhookSender:
    def __init__(
        self,
        engine: Engine,
        settings: SenderSettings | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.settings = settings or SenderSettings()
        self.clock = clock
        self._client = httpx.Client(
            transport=transport,
            timeout=self.settings.timeout_s,
            follow_redirects=False,
            headers={"User-Agent": f"slmfleet-webhooks/{__version__}"},
            limits=httpx.Limits(max_connections=self.settings.concurrency * 2, max_keepalive_connections=8),
        )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._in_flight: dict[int, int] = {}  # delivery id -> webhook id
        self.sent = 0
        self.failed_attempts = 0

    # ------------------------------------------------------------ life --

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="webhook")
        self._thread = threading.Thread(target=self._run, name="webhook-sender", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop taking deliveries; requests in flight end within ``timeout_s`` and are recorded, or sent again
        after the next start (receivers drop repeats by ``webhook-id``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    def wake(self) -> None:
        self._wake.set()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    # ------------------------------------------------------------ loop --

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._dispatch()
            except Exception:
                log.exception("webhooks: picking due deliveries failed")
            self._wake.wait(self.settings.poll_s)
            self._wake.clear()

    def _dispatch(self) -> None:
        with self._lock:
            free = self.settings.concurrency - len(self._in_flight)
            busy_hooks = set(self._in_flight.values())
            busy = set(self._in_flight)
        if free <= 0:
            return
        d, w = table(WebhookDelivery).c, table(Webhook).c
        now = from_epoch(self.clock())
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(d.id, d.webhook_id)
                .join_from(table(WebhookDelivery), table(Webhook), d.webhook_id == w.id)
                .where(d.status == "pending", d.next_attempt_at <= now, w.enabled.is_(True))
                .order_by(d.next_attempt_at, d.id)
                .limit(free + len(busy) + 4 * self.settings.concurrency)
            ).all()
        picked: list[tuple[int, int]] = []
        for row in rows:
            if len(picked) >= free:
                break
            if row.id in busy or row.webhook_id in busy_hooks:
                continue  # one request per webhook at a time: a slow receiver does not take every worker
            busy_hooks.add(row.webhook_id)
            picked.append((row.id, row.webhook_id))
        if not picked:
            return
        assert self._pool is not None
        with self._lock:
            for delivery_id, webhook_id in picked:
                self._in_flight[delivery_id] = webhook_id
        for delivery_id, _ in picked:
            self._pool.submit(self._deliver, delivery_id)

    # --------------------------------------------------------- deliver --

    def _deliver(self, delivery_id: int) -> None:
        try:
            self._deliver_once(delivery_id)
        except Exception:
            log.exception("webhooks: delivery %s failed unexpectedly", delivery_id)
        finally:
            with self._lock:
                self._in_flight.pop(delivery_id, None)
            self._wake.set()  # a worker is free, and that webhook may have more waiting

    def _deliver_once(self, delivery_id: int) -> None:
        d, w, e = table(WebhookDelivery).c, table(Webhook).c, table(NotificationEvent).c
        with self.engine.connect() as conn:
            row = conn.execute(
                select(d.id, d.attempts, d.history, d.status, d.event_id, e.type, e.body, w.url, w.secret, w.name)
                .join_from(table(WebhookDelivery), table(NotificationEvent), d.event_id == e.id)
                .join(table(Webhook), d.webhook_id == w.id)
                .where(d.id == delivery_id)
            ).first()
        if row is None or row.status != "pending":
            return  # deleted with its webhook, or handled meanwhile
        attempt = row.attempts + 1
        outcome = self.post(row.url, row.secret, row.event_id, row.type, row.body, delivery_id, attempt)
        now = self.clock()
        values: dict[str, Any] = {
            "attempts": attempt,
            "last_attempt_at": from_epoch(now),
            "last_status": outcome.status,
            "last_error": outcome.error[:1024],
            "history": [
                *(row.history or [])[-(HISTORY - 1) :],
                {"at": round(now, 3), "status": outcome.status, "error": outcome.error[:200], "ms": outcome.ms},
            ],
        }
        if outcome.ok:
            values.update(status="delivered", delivered_at=from_epoch(now))
            self.sent += 1
            log.info("webhooks: %s delivered to %s (attempt %d)", row.type, row.name, attempt)
        else:
            self.failed_attempts += 1
            if attempt >= self.settings.max_attempts:
                values["status"] = "failed"
                log.warning(
                    "webhooks: %s to %s failed for good after %d attempts: %s",
                    row.type,
                    row.name,
                    attempt,
                    outcome.error,
                )
            else:
                delay = retry_delay(attempt, self.settings, outcome.retry_after)
                values["next_attempt_at"] = from_epoch(now + delay)
                log.info(
                    "webhooks: %s to %s failed (attempt %d: %s); next try in %.0f s",
                    row.type,
                    row.name,
                    attempt,
                    outcome.error,
                    delay,
                )
        with self.engine.begin() as conn:
            conn.execute(
                update(table(WebhookDelivery))
                .where(d.id == delivery_id, d.status == "pending", d.attempts == row.attempts)
                .values(**values)
            )

    def post(
        self, url: str, secret: str, event_id: str, event_type: str, body: str, delivery_id: int, attempt: int
    ) -> Outcome:
        """One signed POST; the outcome, never an exception."""
        timestamp = int(self.clock())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signing.sign(secret, event_id, timestamp, body),
            "X-Slmfleet-Event": event_type,
            "X-Slmfleet-Delivery": str(delivery_id),
            "X-Slmfleet-Attempt": str(attempt),
        }
        started = time.monotonic()
        try:
            with self._client.stream("POST", url, content=body.encode(), headers=headers) as response:
                answer = b""
                for chunk in response.iter_bytes():
                    answer += chunk
                    if len(answer) >= ANSWER_BYTES:
                        break
                ms = round((time.monotonic() - started) * 1000, 1)
                if 200 <= response.status_code < 300:
                    return Outcome(True, response.status_code, "", ms)
                text = answer[:ANSWER_BYTES].decode("utf-8", "replace").strip()
                if response.is_redirect:
                    text = f"redirect to {response.headers.get('location', '?')} (not followed)"
                return Outcome(
                    False,
                    response.status_code,
                    f"HTTP {response.status_code}{': ' + text if text else ''}",
                    ms,
                    _retry_after(response.headers.get("retry-after"), self.clock()),
                )
        except httpx.TimeoutException:
            return Outcome(False, None, f"no answer within {self.settings.timeout_s:g} s", _ms(started))
        except httpx.HTTPError as exc:
            return Outcome(False, None, f"{type(exc).__name__}: {exc}"[:1024], _ms(started))

    # --------------------------------------------------------- retention --

    def prune(self, keep: timedelta, now: datetime | None = None) -> int:
        """Delete finished deliveries older than ``keep`` and events no delivery refers to any more."""
        cutoff = (now or utcnow()) - keep
        d, e = table(WebhookDelivery).c, table(NotificationEvent).c
        with self.engine.begin() as conn:
            n = conn.execute(
                delete(table(WebhookDelivery)).where(d.status.in_(("delivered", "failed")), d.created_at < cutoff)
            ).rowcount
            m = conn.execute(
                delete(table(NotificationEvent)).where(
                    e.created_at < cutoff,
                    ~exists().where(and_(d.event_id == e.id)),
                )
            ).rowcount
        return int((n or 0) + (m or 0))


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
