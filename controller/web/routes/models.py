"""The model registry: versions, variants, sizes, agreement, latency, and who serves them; uploading a version
(operators) and following its import."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session

from controller import audit
from controller.db.models import ImportJob
from controller.registry.bundles import BundleError
from controller.registry.intake import queue_import, receive_upload
from controller.registry.upload import UploadError
from controller.web import queries, sessions, upload_form
from controller.web.deps import OperatorDep, UserDep, runtime_of
from controller.web.forms import FormError
from controller.web.render import page

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)


@router.get("/models", response_class=HTMLResponse)
def models(request: Request, who: UserDep) -> Response:
    with runtime_of(request).engine.connect() as conn:
        listing = queries.models_overview(conn)
    return page(request, "models.html", {"title": "Models", "nav": "models", "models": listing})


def _upload_page(
    request: Request, values: dict[str, object], errors: dict[str, str], status_code: int = 200
) -> Response:
    with runtime_of(request).engine.connect() as conn:
        names = [(m["name"], m["task"]) for m in queries.models_overview(conn)]
    return page(
        request,
        "model_upload.html",
        {
            "title": "Upload a model version",
            "nav": "models",
            "v": values,
            "errors": errors,
            "models": names,
            "tasks": upload_form.TASKS,
            "variants": upload_form.VARIANTS,
            "max_bytes": runtime_of(request).settings.upload_max_bytes,
        },
        status_code=status_code,
    )


@router.get("/models/upload", response_class=HTMLResponse)
def upload_page(request: Request, who: OperatorDep, model: Annotated[str, Query(max_length=128)] = "") -> Response:
    return _upload_page(request, {**upload_form.values_from({}), "model": model}, {})


@router.post("/models/upload")
async def upload(request: Request, who: OperatorDep) -> Response:
    """The same streaming, checks and import job as ``POST /api/v1/models/{name}/versions``.

    The body is streamed to disk before its CSRF token (a form field) can be read; a request without the
    session's token is refused and what it uploaded removed before anything is imported.
    """
    runtime = runtime_of(request)
    try:
        received = await receive_upload(runtime.models, request, runtime.settings.upload_max_bytes)
    except UploadError as exc:
        message = "choose the model file(s) to upload" if str(exc).startswith("file name ''") else str(exc)
        return _upload_page(request, upload_form.values_from({}), {"file": message}, exc.status)
    fields = received.upload.fields
    if not sessions.csrf_ok(who, fields.get("csrf_token")):
        received.discard()
        message = "the form's security token is missing or belongs to another session: reload the page and try again"
        return page(request, "error.html", {"title": "Not allowed", "message": message}, 403)
    values = upload_form.values_from(fields)
    try:
        options = upload_form.options_json(values)
        job_id = await queue_import(runtime.models, received, values["model"], options, who.name)
    except FormError as exc:
        received.discard()
        return _upload_page(request, values, exc.errors, 422)
    except (UploadError, BundleError) as exc:
        field = "options" if str(exc).startswith("options") else "file"
        return _upload_page(request, values, {field: str(exc)}, exc.status if isinstance(exc, UploadError) else 422)
    with Session(runtime.engine) as session:
        detail = {"job": job_id, "files": received.files[:20], "bytes": received.upload.size, "via": "dashboard"}
        audit.record(session, who.name, "model.version.import", values["model"], detail)
        session.commit()
    log.info("dashboard: %s uploaded a version of %s (import %s)", who.name, values["model"], job_id[:8])
    return RedirectResponse(f"/imports/{job_id}", status_code=303)


def _job(request: Request, job_id: str) -> ImportJob | None:
    with Session(runtime_of(request).engine) as session:
        return session.get(ImportJob, job_id[:32])


@router.get("/imports/{job_id}", response_class=HTMLResponse)
def import_page(request: Request, job_id: str, who: UserDep) -> Response:
    job = _job(request, job_id)
    if job is None:
        return page(request, "error.html", {"title": "Not found", "message": f"No import {job_id!r}."}, 404)
    return page(request, "import.html", {"title": f"Import of {job.model_name}", "nav": "models", "job": job})


@router.get("/imports/{job_id}/live", response_class=HTMLResponse)
def import_live(request: Request, job_id: str, who: UserDep) -> Response:
    """The import's stage and progress, polled by dashboard.js until it has finished."""
    job = _job(request, job_id)
    if job is None:
        return page(request, "error_fragment.html", {"message": f"No import {job_id!r}."}, 404)
    return page(request, "import_live.html", {"job": job})
