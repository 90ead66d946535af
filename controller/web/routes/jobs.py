"""Derive jobs on the dashboard: the list, a job's page (live progress, cancel), and the form that starts one
from a model version."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session, col, select
from starlette.datastructures import UploadFile

from controller import audit
from controller.db.models import DeriveJob
from controller.jobs.service import JobError
from controller.jobs.steps import StepSpec
from controller.web.deps import FormDep, OperatorDep, OperatorFormDep, UserDep, runtime_of
from controller.web.render import page

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)

#: the form's fields per step kind, with how each is read (empty: the step's default)
FIELDS: dict[str, dict[str, type]] = {
    "distill": {"student": str, "epochs": int},
    "prune": {"heads": float, "ffn": float},
    "finetune": {"lora_rank": int, "epochs": int},
}


def _jobs(request: Request, **where: Any) -> list[DeriveJob]:
    with Session(runtime_of(request).engine) as session:
        query = select(DeriveJob).order_by(col(DeriveJob.created_at).desc()).limit(100)
        for k, v in where.items():
            query = query.where(getattr(DeriveJob, k) == v)
        return list(session.exec(query).all())


def _job(request: Request, job_id: str) -> DeriveJob | None:
    with Session(runtime_of(request).engine) as session:
        return session.get(DeriveJob, job_id[:32])


@router.get("/jobs", response_class=HTMLResponse)
def jobs(request: Request, who: UserDep) -> Response:
    return page(request, "jobs.html", {"title": "Derive jobs", "nav": "models", "jobs": _jobs(request)})


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str, who: UserDep) -> Response:
    job = _job(request, job_id)
    if job is None:
        return page(request, "error.html", {"title": "Not found", "message": f"No derive job {job_id!r}."}, 404)
    return page(request, "job.html", {"title": f"Derive job {job.id[:8]}", "nav": "models", "job": job})


@router.get("/jobs/{job_id}/live", response_class=HTMLResponse)
def job_live(request: Request, job_id: str, who: UserDep) -> Response:
    """The job's status, progress and report, polled by dashboard.js until it has ended."""
    job = _job(request, job_id)
    if job is None:
        return page(request, "error_fragment.html", {"message": f"No derive job {job_id!r}."}, 404)
    return page(request, "job_live.html", {"job": job})


@router.post("/jobs/{job_id}/cancel")
def cancel(request: Request, job_id: str, who: OperatorFormDep) -> Response:
    runtime = runtime_of(request)
    try:
        job = runtime.jobs.cancel(job_id[:32])
    except JobError as exc:
        return page(request, "error.html", {"title": "Cannot cancel", "message": str(exc)}, exc.status)
    with Session(runtime.engine) as session:
        audit.record(session, who.name, "model.derive.cancel", job.id, {"via": "dashboard"})
        session.commit()
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


def _form_page(
    request: Request, name: str, number: int, values: dict[str, str], error: str | None, status_code: int = 200
) -> Response:
    context = {
        "title": f"Derive from {name} v{number}",
        "nav": "models",
        "name": name,
        "number": number,
        "v": values,
        "error": error,
        "jobs": _jobs(request, model_name=name),
    }
    return page(request, "model_derive.html", context, status_code=status_code)


@router.get("/models/{name}/{number}/derive", response_class=HTMLResponse)
def derive_form(request: Request, name: str, number: int, who: OperatorDep) -> Response:
    return _form_page(request, name, number, {"kind": "distill", "student": "bert-mini"}, None)


@router.post("/models/{name}/{number}/derive")
async def derive(request: Request, name: str, number: int, who: OperatorFormDep, form: FormDep) -> Response:
    """The same checks and service call as ``POST /api/v1/models/{name}/versions/{number}/{kind}``."""
    runtime = runtime_of(request)
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    kind = values.get("kind", "")
    if kind not in FIELDS:
        return _form_page(request, name, number, values, "choose distill, prune or finetune", 422)
    params: dict[str, Any] = {}
    for field, read in FIELDS[kind].items():
        text = values.get(field, "").strip()
        if text:
            try:
                params[field] = read(text)
            except ValueError:
                return _form_page(request, name, number, values, f"{field}: {text!r} is not a number", 422)
    upload = form.get("data")
    tmp = Path(tempfile.mkdtemp(prefix="derive-data-", dir=runtime.models.staging))
    try:
        data: Path | None = None
        if isinstance(upload, UploadFile) and upload.filename:
            data = tmp / "data.jsonl"
            data.write_bytes(await upload.read())
        if kind == "prune":
            params["recover"] = data is not None
        try:
            job_id = runtime.jobs.submit(name, number, [StepSpec(kind=kind, params=params)], who.name, data=data)
        except JobError as exc:
            return _form_page(request, name, number, values, str(exc), exc.status)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with Session(runtime.engine) as session:
        audit.record(session, who.name, "model.derive", f"{name}@{number}", {"job": job_id, "via": "dashboard"})
        session.commit()
    log.info("dashboard: %s started a %s job on %s@%d (%s)", who.name, kind, name, number, job_id[:8])
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)
