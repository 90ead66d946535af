"""Enrollment tokens: random, single use, expiring; only their SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlmodel import Session, col, select

from controller.db.models import EnrollmentToken, table
from controller.db.types import utcnow

TOKEN_PREFIX = "slmfe_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create(
    session: Session,
    created_by: str,
    expires_in: timedelta,
    labels: dict[str, str] | None = None,
    device_id: str | None = None,
    note: str = "",
) -> tuple[str, EnrollmentToken]:
    """A new token (the secret is returned once) and its row, committed."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = EnrollmentToken(
        token_hash=hash_token(secret),
        prefix=secret[:12],
        note=note,
        labels=dict(labels or {}),
        device_id=device_id,
        created_by=created_by,
        expires_at=utcnow() + expires_in,
    )
    session.add(row)
    session.commit()
    session.refresh(row)
    return secret, row


def find(session: Session, secret: str) -> EnrollmentToken | None:
    """The row of ``secret`` whatever its state, or None."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 256:
        return None
    return session.exec(select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_token(secret))).first()


def unusable_reason(row: EnrollmentToken, now: datetime | None = None) -> str | None:
    """Why the token cannot be used (revoked, used, expired), or None."""
    now = now or utcnow()
    if row.revoked_at is not None:
        return "the enrollment token was revoked"
    if row.used_at is not None:
        return f"the enrollment token was already used (by {row.used_by} at {row.used_at.isoformat()})"
    if row.expires_at <= now:
        return f"the enrollment token expired at {row.expires_at.isoformat()}"
    return None


def claim(session: Session, row: EnrollmentToken, device_id: str) -> bool:
    """Mark the token used by ``device_id``; False when another request claimed it first (single use)."""
    t = table(EnrollmentToken).c
    result = session.execute(
        update(table(EnrollmentToken))
        .where(t.id == row.id, t.used_at.is_(None), t.revoked_at.is_(None))
        .values(used_at=utcnow(), used_by=device_id)
    )
    session.commit()
    return (getattr(result, "rowcount", 0) or 0) == 1


def release(session: Session, row: EnrollmentToken) -> None:
    """Undo a claim whose enrollment failed half-way, so the token can be tried again."""
    t = table(EnrollmentToken).c
    session.execute(update(table(EnrollmentToken)).where(t.id == row.id).values(used_at=None, used_by=None))
    session.commit()


def list_all(session: Session) -> list[EnrollmentToken]:
    return list(session.exec(select(EnrollmentToken).order_by(col(EnrollmentToken.id))).all())


def revoke(session: Session, row: EnrollmentToken) -> bool:
    """Revoke a token so nobody can use it (a used one is marked too, for the record); False when it was already."""
    if row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    session.add(row)
    return True


def revoke_bound(session: Session, device_id: str) -> int:
    """Revoke the unused tokens bound to ``device_id`` (it was revoked or forgotten); how many (the caller commits)."""
    t = table(EnrollmentToken).c
    result = session.execute(
        update(table(EnrollmentToken))
        .where(t.device_id == device_id, t.used_at.is_(None), t.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return int(getattr(result, "rowcount", 0) or 0)
