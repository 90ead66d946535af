"""Dashboard users (admins only): who may log in to the dashboard, with which role."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Response, status
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlmodel import col, select

from controller import audit
from controller.api.deps import AdminDep, SessionDep
from controller.api.openapi import errors
from controller.auth import passwords, users
from controller.auth.tokens import Role
from controller.db.models import WebUser

router = APIRouter(prefix="/api/v1/users", tags=["users"])

UserName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=users.NAME_RE.pattern)]
Password = Annotated[str, StringConstraints(min_length=passwords.MIN_LENGTH, max_length=passwords.MAX_LENGTH)]


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: UserName
    role: Role
    password: Password | None = Field(None, description="omit to have the controller generate one (shown once)")


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role | None = None
    password: Password | None = Field(None, description="a new password; ends the user's open sessions")


class UserPublic(BaseModel):
    name: str
    role: str
    created_at: datetime
    created_by: str
    password_changed_at: datetime
    last_login_at: datetime | None


class UserCreated(UserPublic):
    generated_password: str | None = Field(None, description="only when the controller generated it")


def _public(user: WebUser) -> UserPublic:
    return UserPublic(
        name=user.name,
        role=user.role,
        created_at=user.created_at,
        created_by=user.created_by,
        password_changed_at=user.password_changed_at,
        last_login_at=user.last_login_at,
    )


def _get(session: SessionDep, name: str) -> WebUser:
    user = users.get_user(session, name)
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"user {name!r} not found")
    return user


@router.get("", response_model=list[UserPublic])
def list_users(session: SessionDep, _: AdminDep) -> list[UserPublic]:
    return [_public(u) for u in session.exec(select(WebUser).order_by(col(WebUser.name))).all()]


@router.post("", response_model=UserCreated, status_code=status.HTTP_201_CREATED, responses=errors(409))
def create_user(body: UserCreate, session: SessionDep, who: AdminDep) -> UserCreated:
    """Add a dashboard user; without a password the controller generates one and answers it once."""
    generated = passwords.generate_password() if body.password is None else None
    try:
        user = users.create_user(session, body.name, body.role, body.password or generated or "", who.name)
    except users.UserError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    audit.record(session, who.name, "user.create", body.name, {"role": body.role.value})
    session.commit()
    session.refresh(user)
    return UserCreated(**_public(user).model_dump(), generated_password=generated)


@router.patch("/{name}", response_model=UserPublic)
def update_user(name: str, body: UserUpdate, session: SessionDep, who: AdminDep) -> UserPublic:
    """Change a role or a password (a new password logs the user out everywhere)."""
    user = _get(session, name)
    try:
        if body.role is not None:
            users.set_role(session, user, body.role)
        if body.password is not None:
            users.set_password(session, user, body.password)
    except users.UserError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    changed = {"role": body.role.value} if body.role else {}
    if body.password is not None:
        changed["password"] = "changed"
    audit.record(session, who.name, "user.update", name, changed)
    session.commit()
    session.refresh(user)
    return _public(user)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_user(name: str, session: SessionDep, who: AdminDep) -> Response:
    """Remove a user; their open sessions end at once."""
    user = _get(session, name)
    users.delete_user(session, user)
    audit.record(session, who.name, "user.delete", name)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
