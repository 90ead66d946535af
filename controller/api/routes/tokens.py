"""Operator API tokens (admins only): create (the secret is answered once), list, revoke.

Only a token's SHA-256 is stored (``controller.auth.tokens``); a revoked or expired token is refused
by the next request that presents it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Response, status
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlmodel import Session

from controller import audit
from controller.api.deps import AdminDep, SessionDep
from controller.auth import tokens
from controller.auth.tokens import Role
from controller.db.models import ApiToken
from controller.db.types import utcnow

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"])

TOKEN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$"
TokenName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=TOKEN_NAME_PATTERN)]
#: a database id: bounded so a huge number is a 422, not an overflow in the database driver
TokenId = Annotated[int, Path(ge=1, le=2**31 - 1, description="the token's id (from the list)")]


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: TokenName = Field(description="who or what uses it (shown in the audit log as the actor)")
    role: Role
    expires_in_days: float | None = Field(
        None, gt=0, le=3650, description="the token stops working this long after creation; omit: never"
    )


class TokenPublic(BaseModel):
    """A token without its secret: ``prefix`` is enough to recognise it."""

    id: int
    name: str
    role: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None = Field(description="to the minute")
    revoked_at: datetime | None
    active: bool = Field(description="neither revoked nor expired")


class TokenCreated(TokenPublic):
    token: str = Field(description="the secret: shown this once, only its hash is kept")


def _public(row: ApiToken) -> TokenPublic:
    assert row.id is not None
    now = utcnow()
    return TokenPublic(
        id=row.id,
        name=row.name,
        role=row.role,
        prefix=row.prefix,
        created_at=row.created_at,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
        active=row.revoked_at is None and (row.expires_at is None or row.expires_at > now),
    )


def _get(session: Session, token_id: int) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"token {token_id} not found")
    return row


@router.get("", response_model=list[TokenPublic])
def list_tokens(session: SessionDep, _: AdminDep) -> list[TokenPublic]:
    """Every token, revoked and expired ones included; never a secret."""
    return [_public(row) for row in tokens.list_tokens(session)]


@router.post("", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def create_token(body: TokenCreate, session: SessionDep, who: AdminDep) -> TokenCreated:
    """Create a token; the answer carries the secret, which cannot be read again."""
    expires_at = None if body.expires_in_days is None else utcnow() + timedelta(days=body.expires_in_days)
    secret, row = tokens.create_token(session, body.name, body.role, expires_at)
    audit.record(
        session,
        who.name,
        "token.create",
        body.name,
        {
            "id": row.id,
            "role": body.role.value,
            "prefix": row.prefix,
            "expires_at": None if expires_at is None else expires_at.isoformat(),
        },
    )
    session.commit()
    session.refresh(row)
    return TokenCreated(**_public(row).model_dump(), token=secret)


@router.delete("/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_token(token_id: TokenId, session: SessionDep, who: AdminDep) -> Response:
    """Revoke a token: the next request with it is refused (401). Revoking twice is harmless."""
    row = _get(session, token_id)
    changed = tokens.revoke(session, row)
    audit.record(
        session, who.name, "token.revoke", row.name, {"id": token_id, "prefix": row.prefix, "already": not changed}
    )
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
