"""Logging in and out of the dashboard.

The login form is protected against login CSRF by a double-submit token (a cookie and a hidden field
that must match) because there is no session yet; every later form carries the session's own token.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session

from controller import audit
from controller.auth import users
from controller.web import sessions
from controller.web.deps import UserFormDep, runtime_of
from controller.web.render import page

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)


def _secure(request: Request) -> bool:
    """Cookies are Secure whenever TLS is on: this process serves HTTPS, devices and operators reach it at an https
    public_url (a TLS proxy), or the request came over HTTPS; ``dashboard_secure_cookie`` forces it on."""
    settings = runtime_of(request).settings
    tls = settings.https or (settings.public_url or "").startswith("https://") or request.url.scheme == "https"
    return tls or bool(settings.dashboard_secure_cookie)


def _safe_next(target: str | None) -> str:
    """Only a path on this site: never an open redirect to another host."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _login_form(request: Request, next_: str, error: str = "", name: str = "", status_code: int = 200) -> Response:
    token = secrets.token_urlsafe(32)
    response = page(
        request,
        "login.html",
        {"title": "Log in", "login_token": token, "next": next_, "error": error, "name": name},
        status_code=status_code,
    )
    response.set_cookie(
        sessions.LOGIN_COOKIE,
        token,
        max_age=3600,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        path="/login",
    )
    return response


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/") -> Response:  # noqa: A002 - the query parameter's name
    return _login_form(request, _safe_next(next))


@router.post("/login")
def login(
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    login_token: Annotated[str, Form(max_length=128)] = "",
    next: Annotated[str, Form(max_length=2048)] = "/",  # noqa: A002
) -> Response:
    runtime = runtime_of(request)
    target = _safe_next(next)
    cookie = request.cookies.get(sessions.LOGIN_COOKIE, "")
    if not cookie or not hmac.compare_digest(cookie.encode(), login_token.encode()):
        return _login_form(request, target, "The form expired: please try again.", username, 403)
    backoff: sessions.LoginBackoff = request.app.state.login_backoff
    source = request.client.host if request.client else "unknown"
    wait, scope = backoff.wait(source, username)
    if wait:
        # the password is not even checked: an address that keeps guessing learns nothing while it waits
        runtime.metrics.logins_throttled.labels(scope).inc()
        seconds = math.ceil(wait)
        response = _login_form(
            request,
            target,
            f"Too many failed attempts from your address: try again in {seconds} s.",
            username,
            429,
        )
        response.headers["Retry-After"] = str(seconds)
        return response
    with Session(runtime.engine) as session:
        user = users.authenticate(session, username, password)
        if user is None:
            backoff.failed(source, username)
            log.warning("dashboard: failed login for %r from %s", username[:64], source)
            return _login_form(request, target, "Wrong user name or password.", username, 401)
        backoff.succeeded(source, username)
        secret = sessions.start(session, user, runtime.settings.dashboard_session_hours)
        audit.record(session, user.name, "dashboard.login", user.name)
        session.commit()
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        sessions.COOKIE,
        secret,
        max_age=int(runtime.settings.dashboard_session_hours * 3600),
        httponly=True,
        samesite="lax",
        secure=_secure(request),
        path="/",
    )
    response.delete_cookie(
        sessions.LOGIN_COOKIE, path="/login", httponly=True, samesite="strict", secure=_secure(request)
    )
    return response


@router.post("/logout")
def logout(request: Request, who: UserFormDep) -> Response:
    runtime = runtime_of(request)
    sessions.end(runtime.engine, who.session_id)
    with Session(runtime.engine) as session:
        audit.record(session, who.name, "dashboard.logout", who.name)
        session.commit()
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(sessions.COOKIE, path="/", httponly=True, samesite="lax", secure=_secure(request))
    return response


@router.get("/logout", response_class=HTMLResponse)
def logout_page(request: Request) -> Response:
    """A confirmation with a button: logging out is a POST with the session's token, never a bare link."""
    principal = sessions.lookup(runtime_of(request).engine, request.cookies.get(sessions.COOKIE))
    if principal is None:
        return RedirectResponse("/login", status_code=303)
    request.state.principal = principal
    return page(request, "logout.html", {"title": "Log out"})
