"""Dashboard users: people who log in with a name and a password, each with a role."""

from __future__ import annotations

import re
from pathlib import Path

from sqlmodel import Session, col, delete, select

from controller.auth import passwords
from controller.auth.tokens import Role, write_secret_file
from controller.db.models import WebSession, WebUser
from controller.db.types import utcnow

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
#: the user ``slmfleet up`` creates on a new controller
INITIAL_ADMIN = "admin"
ADMIN_PASSWORD_FILE = "admin-password"


class UserError(ValueError):
    """A user that cannot be created or changed; ``status`` is the HTTP answer."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise UserError(f"user name {name!r}: use 1 to 64 letters, digits, '.', '_', '@' or '-'")
    return name


def get_user(session: Session, name: str) -> WebUser | None:
    return session.exec(select(WebUser).where(WebUser.name == name)).first()


def create_user(session: Session, name: str, role: Role, password: str, created_by: str = "") -> WebUser:
    """Add a user (the caller commits); refuses a taken name or a weak password."""
    check_name(name)
    try:
        passwords.check_policy(password)
    except passwords.PasswordError as exc:
        raise UserError(str(exc)) from None
    if get_user(session, name) is not None:
        raise UserError(f"user {name!r} already exists", 409)
    user = WebUser(name=name, role=role.value, password_hash=passwords.hash_password(password), created_by=created_by)
    session.add(user)
    session.flush()
    return user


def set_password(session: Session, user: WebUser, password: str) -> None:
    """Change a password and end every session of the user (the caller commits)."""
    try:
        passwords.check_policy(password)
    except passwords.PasswordError as exc:
        raise UserError(str(exc)) from None
    user.password_hash = passwords.hash_password(password)
    user.password_changed_at = utcnow()
    session.add(user)
    end_sessions(session, user)


def set_role(session: Session, user: WebUser, role: Role) -> None:
    """Change a role; open sessions see it on their next request (the caller commits)."""
    user.role = role.value
    session.add(user)


def delete_user(session: Session, user: WebUser) -> None:
    """Remove a user and their sessions (the caller commits); the audit log keeps their name."""
    end_sessions(session, user)
    session.delete(user)


def end_sessions(session: Session, user: WebUser) -> None:
    session.exec(delete(WebSession).where(col(WebSession.user_id) == user.id))


def authenticate(session: Session, name: str, password: str) -> WebUser | None:
    """The user when the password is right, else None (as slow either way)."""
    user = get_user(session, name) if NAME_RE.match(name) else None
    if user is None:
        passwords.burn_time(password)
        return None
    if not passwords.verify_password(password, user.password_hash):
        return None
    if passwords.needs_rehash(user.password_hash):
        user.password_hash = passwords.hash_password(password)
    user.last_login_at = utcnow()
    session.add(user)
    session.commit()
    session.refresh(user)
    return user


def ensure_initial_admin(session: Session, path: Path) -> bool:
    """Create the ``admin`` user with a random password written to ``path`` (mode 0600) if there is none.

    An existing ``admin`` keeps its password (an operator may have changed it); returns True when
    a new user was created.
    """
    if get_user(session, INITIAL_ADMIN) is not None:
        return False
    password = passwords.generate_password()
    create_user(session, INITIAL_ADMIN, Role.ADMIN, password, created_by="slmfleet up")
    session.commit()
    write_secret_file(path, password)
    return True
