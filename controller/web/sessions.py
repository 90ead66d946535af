"""Dashboard sessions: a random secret in an HttpOnly cookie, its SHA-256 and a CSRF token in the database.

Server-side sessions (rather than signed cookies) so that logging out, a password change or a
removed user ends a session at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from sqlalchemy import Engine, delete, select, update
from sqlmodel import Session

from controller.auth.tokens import Role
from controller.db.models import WebSession, WebUser, table
from controller.db.types import utcnow

COOKIE = "slmf_session"
LOGIN_COOKIE = "slmf_login"
#: how often a session's last_seen_at is written (reads would otherwise write on every page)
TOUCH_EVERY = timedelta(minutes=1)


@dataclass(frozen=True)
class WebPrincipal:
    """Who is looking at the dashboard."""

    name: str
    role: Role
    user_id: int
    session_id: str
    csrf_token: str

    @property
    def can_operate(self) -> bool:
        return self.role.allows(Role.OPERATOR)

    @property
    def is_admin(self) -> bool:
        return self.role.allows(Role.ADMIN)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def start(session: Session, user: WebUser, hours: float) -> str:
    """A new session for ``user``; returns the cookie's secret (only its hash is stored)."""
    secret = secrets.token_urlsafe(32)
    now = utcnow()
    assert user.id is not None
    session.add(
        WebSession(
            id=_digest(secret),
            user_id=user.id,
            csrf_token=secrets.token_urlsafe(32),
            created_at=now,
            expires_at=now + timedelta(hours=hours),
            last_seen_at=now,
        )
    )
    # expired sessions of anyone go when someone logs in: no scheduler job needed for a rare event
    session.execute(delete(table(WebSession)).where(table(WebSession).c.expires_at < now))
    session.commit()
    return secret


def lookup(engine: Engine, secret: str | None) -> WebPrincipal | None:
    """The live session for a cookie's secret, with its user's current role; None if there is none."""
    if not secret or len(secret) > 128:
        return None
    sid = _digest(secret)
    s, u = table(WebSession).c, table(WebUser).c
    now = utcnow()
    with engine.connect() as conn:
        row = conn.execute(
            select(s.id, s.csrf_token, s.expires_at, s.last_seen_at, u.id.label("uid"), u.name, u.role)
            .join_from(table(WebSession), table(WebUser), s.user_id == u.id)
            .where(s.id == sid)
        ).first()
        if row is None or row.expires_at <= now or not hmac.compare_digest(row.id, sid):
            return None
        if now - row.last_seen_at > TOUCH_EVERY:
            conn.execute(update(table(WebSession)).where(s.id == sid).values(last_seen_at=now))
            conn.commit()
    return WebPrincipal(row.name, Role(row.role), row.uid, sid, row.csrf_token)


def end(engine: Engine, session_id: str) -> None:
    """Log out: the session row goes, so the cookie is worthless even if it was copied."""
    with engine.begin() as conn:
        conn.execute(delete(table(WebSession)).where(table(WebSession).c.id == session_id))


def csrf_ok(principal: WebPrincipal, submitted: str | None) -> bool:
    """The synchronizer-token check: the form must carry this session's own token."""
    return bool(submitted) and hmac.compare_digest(principal.csrf_token.encode(), (submitted or "").encode())


class LoginBackoff:
    """Failed logins slow down the address they come from, never the account: nobody can lock a user out.

    Two records, each (failures, time of the last): per (source address, user name), and per source address
    over every name (one address trying many names). Past its free failures, each failure doubles the wait
    before that address may try again (that name, or any name), up to ``max_s``. A success clears the pair; a
    record is forgotten ``forget_s`` after its last failure. The right password from an address that did not
    fail is never held up. In memory and per process, bounded to ``max_keys`` records of each kind.
    """

    def __init__(
        self,
        *,
        pair_free: int = 3,
        source_free: int = 10,
        base_s: float = 1.0,
        max_s: float = 300.0,
        forget_s: float = 900.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pair_free, self.source_free = pair_free, source_free
        self.base_s, self.max_s, self.forget_s = base_s, max_s, forget_s
        self.max_keys = max_keys
        self._clock = clock
        self._pairs: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        self._sources: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _delay(self, record: tuple[int, float] | None, free: int, now: float) -> float:
        if record is None:
            return 0.0
        failures, last = record
        if failures <= free:
            return 0.0
        return max(0.0, last + min(self.max_s, self.base_s * 2 ** (failures - free - 1)) - now)

    def wait(self, source: str, name: str) -> tuple[float, str]:
        """Seconds ``source`` must wait before it may try ``name`` (0: now), and why: "user" or "source"."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            pair = self._delay(self._pairs.get((source, name.lower())), self.pair_free, now)
            other = self._delay(self._sources.get(source), self.source_free, now)
        return (pair, "user") if pair >= other else (other, "source")

    def failed(self, source: str, name: str) -> None:
        now = self._clock()
        with self._lock:
            _count(self._pairs, (source, name.lower()), now, self.max_keys)
            _count(self._sources, source, now, self.max_keys)

    def succeeded(self, source: str, name: str) -> None:
        with self._lock:
            self._pairs.pop((source, name.lower()), None)

    def _expire(self, now: float) -> None:
        _forget_older(self._pairs, now - self.forget_s)
        _forget_older(self._sources, now - self.forget_s)


K = TypeVar("K")


def _count(table: OrderedDict[K, tuple[int, float]], key: K, now: float, max_keys: int) -> None:
    """One more failure for ``key``, now; the record moves to the end (the table stays in failure order)."""
    failures, _ = table.pop(key, (0, now))
    table[key] = (failures + 1, now)
    while len(table) > max_keys:
        table.popitem(last=False)


def _forget_older(table: OrderedDict[K, tuple[int, float]], cutoff: float) -> None:
    while table:
        key, (_, last) = next(iter(table.items()))
        if last >= cutoff:
            return
        del table[key]
