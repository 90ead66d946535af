"""Request dependencies: the runtime, a database session, and who is calling."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from controller.auth import tokens
from controller.auth.tokens import Role
from controller.db.types import utcnow
from controller.runtime import ControllerRuntime


def get_runtime(request: Request) -> ControllerRuntime:
    runtime: ControllerRuntime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[ControllerRuntime, Depends(get_runtime)]


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    with Session(runtime.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="an operator token: Authorization: Bearer slmf_...")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's name and role (``anonymous`` viewer where reads are open)."""

    name: str
    role: Role
    token_id: int | None = None


def _authenticate(session: Session, credentials: HTTPAuthorizationCredentials | None, needed: Role) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "authentication required: send Authorization: Bearer <token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    row = tokens.lookup(session, credentials.credentials)
    if row is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid, expired or revoked token",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    role = Role(row.role)
    if not role.allows(needed):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"this needs the {needed.value} role; the token is {role.value}")
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=1):
        row.last_used_at = now
        session.add(row)
        session.commit()
    return Principal(row.name, role, row.id)


def reader_principal(
    runtime: RuntimeDep,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Anyone where reads are open (a token that is presented is still checked); else a viewer token."""
    if credentials is None and not runtime.settings.require_auth_for_reads:
        return Principal("anonymous", Role.VIEWER)
    return _authenticate(session, credentials, Role.VIEWER)


def operator_principal(
    session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """A token with the operator role or above."""
    return _authenticate(session, credentials, Role.OPERATOR)


def admin_principal(
    session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """A token with the admin role."""
    return _authenticate(session, credentials, Role.ADMIN)


ViewerDep = Annotated[Principal, Depends(reader_principal)]
OperatorDep = Annotated[Principal, Depends(operator_principal)]
AdminDep = Annotated[Principal, Depends(admin_principal)]
