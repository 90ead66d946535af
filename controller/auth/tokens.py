"""Operator tokens: random, shown once, stored as SHA-256 (they are high-entropy, so no slow hash is needed)."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from sqlmodel import Session, col, select

from controller.db.models import ApiToken
from controller.db.types import utcnow

TOKEN_PREFIX = "slmf_"


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def create_token(session: Session, name: str, role: Role, expires_at: datetime | None = None) -> tuple[str, ApiToken]:
    """Create a token; returns the secret (shown once) and the stored row."""
    token = new_token()
    row = ApiToken(name=name, role=role.value, token_hash=hash_token(token), prefix=token[:12], expires_at=expires_at)
    session.add(row)
    session.commit()
    session.refresh(row)
    return token, row


def lookup(session: Session, token: str) -> ApiToken | None:
    """The live (not revoked, not expired) row for ``token``, or None."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 256:
        return None
    digest = hash_token(token)
    row = session.exec(select(ApiToken).where(ApiToken.token_hash == digest)).first()
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        return None
    now = utcnow()
    if row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
        return None
    return row


def write_secret_file(path: Path, secret: str) -> None:
    """Write ``secret`` to ``path`` with mode 0600, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    os.chmod(path, 0o600)


def ensure_admin_token(session: Session, path: Path) -> str:
    """The local admin's token from ``path`` if it is still valid there, else a new one written to ``path``."""
    if path.is_file():
        existing = path.read_text().strip()
        if lookup(session, existing) is not None:
            os.chmod(path, 0o600)
            return existing
    token, _ = create_token(session, "local-admin", Role.ADMIN)
    write_secret_file(path, token)
    return token


def list_tokens(session: Session) -> list[ApiToken]:
    """Every token, oldest first (revoked and expired ones too: the list is also a record)."""
    return list(session.exec(select(ApiToken).order_by(col(ApiToken.id))).all())


def revoke(session: Session, row: ApiToken) -> bool:
    """Mark ``row`` revoked (the caller commits); False when it already was. ``lookup`` refuses it from now on."""
    if row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    session.add(row)
    return True
