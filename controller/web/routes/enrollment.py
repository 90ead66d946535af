"""Enrollment tokens (admins only): create one and see its secret once, list them, revoke an unused one."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session

from controller import audit
from controller.db.models import EnrollmentToken
from controller.enrollment import tokens
from controller.enrollment.schemas import controller_url, enroll_command
from controller.web import enrollment_form
from controller.web.deps import AdminDep, AdminFormDep, FormDep, runtime_of
from controller.web.forms import FormError
from controller.web.render import page

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)
#: the newest tokens the page lists (the CLI and the REST API list them all)
SHOWN = 200
DONE_MESSAGES = {
    "revoked": "Enrollment token revoked: nobody can enroll a device with it now.",
    "already": "That enrollment token was already revoked.",
}


def _token_view(row: EnrollmentToken) -> dict[str, Any]:
    reason = tokens.unusable_reason(row)
    if reason is None:
        state = "usable"
    elif row.revoked_at is not None:
        state = "revoked"
    elif row.used_at is not None:
        state = "used"
    else:
        state = "expired"
    return {"row": row, "usable": reason is None, "state": state, "reason": reason or ""}


def _page(
    request: Request,
    values: dict[str, str],
    errors: dict[str, str] | None = None,
    *,
    created: dict[str, Any] | None = None,
    notice: str = "",
    status_code: int = 200,
) -> Response:
    with Session(runtime_of(request).engine) as session:
        rows = tokens.list_all(session)
    newest = [_token_view(row) for row in reversed(rows[-SHOWN:])]
    return page(
        request,
        "enrollment.html",
        {
            "title": "Enrollment",
            "nav": "enrollment",
            "v": values,
            "errors": errors or {},
            "created": created,
            "notice": notice,
            "items": newest,
            "total": len(rows),
        },
        status_code=status_code,
    )


def _blank(request: Request) -> dict[str, str]:
    return enrollment_form.values_from({}, runtime_of(request).settings.enrollment_token_hours)


@router.get("/enrollment", response_class=HTMLResponse)
def enrollment(
    request: Request,
    who: AdminDep,
    done: Annotated[str, Query(max_length=16)] = "",
    device_id: Annotated[str, Query(max_length=128)] = "",
) -> Response:
    """The page; ``device_id`` fills the form in (a revoked or forgotten device's page links here)."""
    values = {**_blank(request), "device_id": device_id.strip()}
    return _page(request, values, notice=DONE_MESSAGES.get(done, ""))


@router.post("/enrollment", response_class=HTMLResponse)
def create_token(request: Request, who: AdminFormDep, form: FormDep) -> Response:
    """Create a token and answer with its secret, this once: it is not stored, so no later page can show it."""
    runtime = runtime_of(request)
    values = enrollment_form.values_from(form, runtime.settings.enrollment_token_hours)
    try:
        body = enrollment_form.to_request(values)
    except FormError as exc:
        return _page(request, values, exc.errors, status_code=422)
    with Session(runtime.engine) as session:
        secret, row = tokens.create(
            session,
            who.name,
            body.lifetime(runtime.settings.enrollment_token_hours),
            body.labels,
            body.device_id,
            body.note,
        )
        audit.record(
            session,
            who.name,
            "enrollment_token.create",
            row.prefix,
            {
                "id": row.id,
                "labels": body.labels,
                "device_id": body.device_id,
                "expires_at": row.expires_at.isoformat(),
                "via": "dashboard",
            },
        )
        session.commit()
        prefix, expires_at = row.prefix, row.expires_at
    log.info("dashboard: %s created enrollment token %s", who.name, prefix)
    url = controller_url(runtime.settings.public_url, str(request.base_url))
    created = {
        "secret": secret,
        "prefix": prefix,
        "expires_at": expires_at,
        "command": f"slmfleet agent enroll --controller {url} --token {secret}",
        "file_command": enroll_command(url),
    }
    # answered directly, not redirected: a redirect would need the secret in a URL or a stored flash message
    return _page(request, _blank(request), created=created, status_code=201)


@router.post("/enrollment/{token_id}/revoke")
def revoke_token(
    request: Request,
    token_id: Annotated[int, Path(ge=1, le=2**31 - 1)],
    who: AdminFormDep,
) -> Response:
    """Revoke an enrollment token so nobody can use it; revoking twice is harmless."""
    with Session(runtime_of(request).engine) as session:
        row = session.get(EnrollmentToken, token_id)
        if row is None:
            message = f"No enrollment token {token_id}."
            return page(request, "error.html", {"title": "Not found", "message": message}, 404)
        changed = tokens.revoke(session, row)
        audit.record(
            session,
            who.name,
            "enrollment_token.revoke",
            row.prefix,
            {"id": token_id, "already": not changed, "via": "dashboard"},
        )
        session.commit()
    log.info("dashboard: %s revoked enrollment token %s", who.name, token_id)
    return RedirectResponse(f"/enrollment?done={'revoked' if changed else 'already'}", status_code=303)
