"""Who is looking at the dashboard, and the checks every write goes through (role, CSRF token)."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.datastructures import FormData

from controller.runtime import ControllerRuntime
from controller.web import sessions
from controller.web.render import page
from controller.web.sessions import WebPrincipal


class LoginRequired(Exception):
    """No valid session: pages redirect to the login form, fragments answer 401."""


class WebForbidden(Exception):
    """A valid session without the right (role, or the request's CSRF token is missing or wrong)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def runtime_of(request: Request) -> ControllerRuntime:
    runtime: ControllerRuntime = request.app.state.runtime
    return runtime


def _principal(request: Request) -> WebPrincipal:
    found = sessions.lookup(runtime_of(request).engine, request.cookies.get(sessions.COOKIE))
    if found is None:
        raise LoginRequired()
    request.state.principal = found
    return found


def _operator(principal: Annotated[WebPrincipal, Depends(_principal)]) -> WebPrincipal:
    if not principal.can_operate:
        raise WebForbidden(f"this needs the operator role; {principal.name} is a {principal.role.value}")
    return principal


def _admin(principal: Annotated[WebPrincipal, Depends(_principal)]) -> WebPrincipal:
    if not principal.is_admin:
        raise WebForbidden(f"this needs the admin role; {principal.name} is a {principal.role.value}")
    return principal


async def _check_csrf(request: Request, principal: WebPrincipal, message: str) -> WebPrincipal:
    form = await request.form()  # parsed once: Starlette keeps it for the endpoint's own Form fields
    submitted = form.get("csrf_token")
    if not sessions.csrf_ok(principal, submitted if isinstance(submitted, str) else None):
        raise WebForbidden(message)
    return principal


_CSRF_REFUSED = "the form's security token is missing or belongs to another session: reload the page and try again"


async def _operator_with_csrf(request: Request, principal: Annotated[WebPrincipal, Depends(_operator)]) -> WebPrincipal:
    return await _check_csrf(request, principal, _CSRF_REFUSED)


async def _admin_with_csrf(request: Request, principal: Annotated[WebPrincipal, Depends(_admin)]) -> WebPrincipal:
    return await _check_csrf(request, principal, _CSRF_REFUSED)


async def _viewer_with_csrf(request: Request, principal: Annotated[WebPrincipal, Depends(_principal)]) -> WebPrincipal:
    return await _check_csrf(request, principal, "the form's security token is missing or belongs to another session")


async def _form(request: Request) -> FormData:
    return await request.form()


#: the request's form fields (parsed once, so sync endpoints can read them too)
FormDep = Annotated[FormData, Depends(_form)]
#: any logged-in user (pages, fragments)
UserDep = Annotated[WebPrincipal, Depends(_principal)]
#: an operator or admin whose form carries its session's CSRF token (every write)
OperatorFormDep = Annotated[WebPrincipal, Depends(_operator_with_csrf)]
#: any logged-in user whose form carries its session's CSRF token (logout)
UserFormDep = Annotated[WebPrincipal, Depends(_viewer_with_csrf)]
#: an operator, for pages that only lead to a write (the rollout form)
OperatorDep = Annotated[WebPrincipal, Depends(_operator)]
#: an admin (enrollment tokens: pages that show secrets or lead to them)
AdminDep = Annotated[WebPrincipal, Depends(_admin)]
#: an admin whose form carries its session's CSRF token (enrollment tokens, device revocation)
AdminFormDep = Annotated[WebPrincipal, Depends(_admin_with_csrf)]


def _wants_html(request: Request) -> bool:
    return (
        request.method == "GET"
        and "text/html" in request.headers.get("accept", "")
        and request.headers.get("x-slmf-fragment") is None
    )


async def login_required_handler(request: Request, exc: Exception) -> Response:
    if _wants_html(request):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
    return PlainTextResponse("log in first", status_code=401)


async def forbidden_handler(request: Request, exc: Exception) -> HTMLResponse:
    message = exc.message if isinstance(exc, WebForbidden) else "forbidden"
    return page(request, "error.html", {"title": "Not allowed", "message": message}, status_code=403)
