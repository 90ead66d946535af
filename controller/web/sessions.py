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
from dataclasses import dataclass
from datetime import timedelta

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


class LoginThrottle:
    """After ``limit`` failed logins for a name within ``window_s``, refuse that name until the window passes.

    In memory and per process: it slows guessing down without letting anyone lock a user out for long.
    """

    def __init__(self, limit: int = 5, window_s: float = 300.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, name: str, now: float) -> list[float]:
        kept = [t for t in self._failures.get(name, []) if now - t < self.window_s]
        if kept:
            self._failures[name] = kept
        else:
            self._failures.pop(name, None)
        return kept

    def blocked_for(self, name: str) -> float:
        """Seconds until ``name`` may try again (0: now)."""
        now = time.monotonic()
        with self._lock:
            recent = self._recent(name.lower(), now)
            if len(recent) < self.limit:
                return 0.0
            return max(0.0, self.window_s - (now - recent[-self.limit]))

    def failed(self, name: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) > 10_000:  # bounded: forget the oldest names first
                for key in list(self._failures)[:1000]:
                    del self._failures[key]
            self._failures.setdefault(name.lower(), []).append(now)

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name.lower(), None)
