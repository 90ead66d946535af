"""Derive jobs: distill, prune, finetune (and chains of them with quantize) on a version; their progress,
reports and cancellation. The steps run in worker processes (``controller/jobs``)."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path as PathLib
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import TypeAdapter, ValidationError
from sqlmodel import Session, col, select
from starlette.datastructures import UploadFile as StarletteUpload

from controller import audit
from controller.api import ids
from controller.api.deps import OperatorDep, RuntimeDep, SessionDep, ViewerDep
from controller.api.openapi import errors
from controller.api.routes.models import VersionNumber
from controller.api.schemas import DeriveJobPublic, ModelName
from controller.db.models import DeriveJob
from controller.jobs.service import JobError
from controller.jobs.steps import StepSpec

router = APIRouter(prefix="/api/v1", tags=["derive jobs"])

_STEPS = TypeAdapter(list[StepSpec])
_PARAMS = TypeAdapter(dict[str, Any])

SUBMIT_ERRORS = errors(
    404,
    409,
    _422="the steps, their parameters or the data do not fit (the reason says which), or a step that needs data got"
    " none",
)


def job_public(job: DeriveJob) -> DeriveJobPublic:
    return DeriveJobPublic(
        id=job.id,
        model=job.model_name,
        base_version=job.base_version,
        steps=job.steps,
        data_sha256=job.data_sha256,
        status=job.status,
        current_step=job.current_step,
        progress=job.progress,
        message=job.message,
        error=job.error,
        report=job.report,
        produced=job.produced,
        worker_pid=job.worker_pid,
        replica_id=job.replica_id,
        cancel_requested=job.cancel_requested,
        attempts=job.attempts,
        created_by=job.created_by,
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
        url=f"/api/v1/derive-jobs/{job.id}",
    )


def _json(text: str | None, adapter: TypeAdapter[Any], what: str) -> Any:
    try:
        return adapter.validate_json(text or ("{}" if what == "params" else "[]"))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or what}: {e['msg']}" for e in exc.errors()[:5])
        raise HTTPException(422, f"{what} is not valid: {problems}") from None


DATA_HELP = 'the data: JSON lines ({"text": ...}; finetune: with a "label")'
SHA_HELP = "instead of data: the sha256 of a data file an unfinished job keeps"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


def _form_schema(fields: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """The multipart body of a submit route, declared by hand: the route reads the form itself so that every
    refusal is one sentence (a field FastAPI parsed would be refused as a list of field errors)."""
    properties = {
        "data": {"type": "string", "format": "binary", "description": DATA_HELP},
        "data_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": SHA_HELP},
        "target_model": {"type": "string", "pattern": MODEL_NAME_PATTERN, "minLength": 1, "maxLength": 128},
        **fields,
    }
    body = {"type": "object", "properties": properties, "required": required}
    return {"requestBody": {"content": {"multipart/form-data": {"schema": body}}, "required": True}}


async def _read_form(request: Request) -> tuple[dict[str, str], bytes | None]:
    """The form's text fields, and the data file's bytes (a file part, or a text field given for it)."""
    try:
        form = await request.form()
    except Exception as exc:  # starlette: a body that is not a form
        raise HTTPException(422, f"the body is not a form (multipart/form-data): {exc}") from None
    fields: dict[str, str] = {}
    data: bytes | None = None
    for key, value in form.multi_items():
        if key == "data":
            data = await value.read() if isinstance(value, StarletteUpload) else value.encode()
        elif isinstance(value, str):
            fields[key] = value
    return fields, data


def _checked(fields: dict[str, str]) -> tuple[str | None, str | None]:
    sha, target = fields.get("data_sha256") or None, fields.get("target_model") or None
    if sha is not None and re.fullmatch("[0-9a-f]{64}", sha) is None:
        raise HTTPException(422, "data_sha256 is the hex sha256 (64 characters) of a data file a job keeps")
    if target is not None and (len(target) > 128 or re.fullmatch(MODEL_NAME_PATTERN, target) is None):
        raise HTTPException(422, f"target_model {target[:130]!r} is not a model name")
    return sha, target


async def _submit(
    runtime: RuntimeDep,
    who: OperatorDep,
    name: str,
    number: int,
    steps: list[StepSpec],
    fields: dict[str, str],
    data: bytes | None,
) -> DeriveJobPublic:
    data_sha256, target_model = _checked(fields)
    tmp = PathLib(tempfile.mkdtemp(prefix="derive-data-", dir=runtime.models.staging))
    try:
        path: PathLib | None = None
        if data is not None:
            path = tmp / "data.jsonl"
            path.write_bytes(data)
        job_id = await anyio.to_thread.run_sync(
            lambda: runtime.jobs.submit(
                name, number, steps, who.name, data=path, data_sha256=data_sha256, target_model=target_model
            )
        )
    except JobError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with Session(runtime.engine) as session:
        job = session.get(DeriveJob, job_id)
        assert job is not None
        detail = {"job": job_id, "steps": [s["kind"] for s in job.steps], "data_sha256": job.data_sha256}
        audit.record(session, who.name, "model.derive", f"{name}@{number}", detail)
        session.commit()
        return job_public(job)


@router.post(
    "/models/{name}/versions/{number}/derive",
    response_model=DeriveJobPublic,
    status_code=status.HTTP_202_ACCEPTED,
    responses=SUBMIT_ERRORS,
    openapi_extra=_form_schema(
        {"steps": {"type": "string", "description": 'the steps as JSON: [{"kind": "distill", "params": {...}}, ...]'}},
        ["steps"],
    ),
)
async def derive(
    name: ModelName, number: VersionNumber, request: Request, runtime: RuntimeDep, who: OperatorDep
) -> DeriveJobPublic:
    """Queue a chain of steps (distill, prune, finetune, quantize) on a version; each step's output becomes a
    version of its own, with its lineage. 404 no such version; 409 a version imported as ONNX (no checkpoint)."""
    fields, data = await _read_form(request)
    if not fields.get("steps"):
        raise HTTPException(422, 'give the steps: [{"kind": "distill", "params": {"student": "bert-mini"}}, ...]')
    steps = _json(fields["steps"], _STEPS, "steps")
    return await _submit(runtime, who, name, number, steps, fields, data)


def _one_step(kind: str, summary: str) -> None:
    async def route(
        name: ModelName, number: VersionNumber, request: Request, runtime: RuntimeDep, who: OperatorDep
    ) -> DeriveJobPublic:
        fields, data = await _read_form(request)
        step = StepSpec(kind=kind, params=_json(fields.get("params"), _PARAMS, "params"))
        return await _submit(runtime, who, name, number, [step], fields, data)

    route.__name__ = kind
    route.__doc__ = summary
    router.add_api_route(
        f"/models/{{name}}/versions/{{number}}/{kind}",
        route,
        methods=["POST"],
        response_model=DeriveJobPublic,
        status_code=status.HTTP_202_ACCEPTED,
        responses=SUBMIT_ERRORS,
        openapi_extra=_form_schema(
            {"params": {"type": "string", "description": f"the {kind} parameters as a JSON object"}}, []
        ),
    )


_one_step(
    "distill",
    "Queue a distillation: a smaller student (params.student: bert-tiny, bert-mini, bert-small or layers=N,...)"
    " trained to reproduce this version on the data's texts. The result is a new version.",
)
_one_step(
    "prune",
    "Queue structured pruning (params.heads, params.ffn: fractions removed), with a recovery distillation from"
    " the unpruned model when data is given.",
)
_one_step(
    "finetune",
    'Queue fine-tuning on labeled examples ({"text": ..., "label": ...} lines): a classification head (params.'
    "lora_rank: LoRA adapters merged into the weights). An encoder's classifier joins model <name>-finetune"
    " (or target_model).",
)


@router.get("/derive-jobs", response_model=list[DeriveJobPublic])
def list_jobs(
    session: SessionDep,
    _: ViewerDep,
    model: Annotated[str | None, Query(max_length=128)] = None,
    status_: Annotated[str | None, Query(alias="status", max_length=16)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[DeriveJobPublic]:
    query = select(DeriveJob).order_by(col(DeriveJob.created_at).desc()).limit(limit)
    if model is not None:
        query = query.where(DeriveJob.model_name == model)
    if status_ is not None:
        query = query.where(DeriveJob.status == status_)
    return [job_public(j) for j in session.exec(query).all()]


@router.get("/derive-jobs/{job_id}", response_model=DeriveJobPublic)
def get_job(job_id: str, session: SessionDep, _: ViewerDep) -> DeriveJobPublic:
    return job_public(ids.resolve(session, DeriveJob, job_id, "derive job"))


@router.post("/derive-jobs/{job_id}/cancel", response_model=DeriveJobPublic, responses=errors(409))
def cancel_job(job_id: str, session: SessionDep, runtime: RuntimeDep, who: OperatorDep) -> DeriveJobPublic:
    """Cancel a job: its worker stops at the next safe point; the step it was on makes no version."""
    job = ids.resolve(session, DeriveJob, job_id, "derive job")
    try:
        job = runtime.jobs.cancel(job.id)
    except JobError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    audit.record(session, who.name, "model.derive.cancel", job.id)
    session.commit()
    return job_public(job)


__all__ = ["job_public", "router"]
