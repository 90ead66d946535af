"""The model registry: models, versions (uploads), artifacts and their signed manifests."""

from __future__ import annotations

from pathlib import Path as PathLib
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse
from sqlalchemy import func
from sqlmodel import Session, col, select

from controller import audit
from controller.api import ids
from controller.api.deps import OperatorDep, RuntimeDep, SessionDep, ViewerDep
from controller.api.openapi import errors
from controller.api.schemas import (
    ArtifactIntegrityPublic,
    ArtifactSummary,
    FileIntegrity,
    ImportJobPublic,
    ModelCreate,
    ModelDetail,
    ModelName,
    ModelPublic,
    SigningKeyPublic,
    VersionPublic,
)
from controller.db.models import Artifact, Deployment, ImportJob, Model, ModelVersion
from controller.registry.bundles import BundleError, ImportOptions
from controller.registry.intake import queue_import, receive_upload
from controller.registry.upload import UploadError, receive, remove_tree

router = APIRouter(prefix="/api/v1", tags=["models"])


def _inline_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` references resolved in place: the multipart request body below is
    written by hand, and a ``#/$defs/...`` reference would not resolve inside the OpenAPI document."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                target = defs[node["$ref"].rsplit("/", 1)[-1]]
                return walk({**target, **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return dict(walk(schema))


#: the import options as the OpenAPI schema of the ``options`` form field (JSON)
IMPORT_OPTIONS_SCHEMA = _inline_schema(ImportOptions.model_json_schema())

#: a version number; larger numbers overflow the database drivers' integers (a 500 instead of a 404)
VersionNumber = Annotated[int, Path(ge=1, le=2**31 - 1)]


def _model(session: Session, name: str) -> Model:
    model = session.exec(select(Model).where(Model.name == name)).first()
    if model is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model {name!r} not found")
    return model


def _model_public(session: Session, model: Model) -> ModelPublic:
    count, latest = session.exec(
        select(func.count(), func.max(ModelVersion.number)).where(ModelVersion.model_id == model.id)
    ).one()
    return ModelPublic(
        name=model.name,
        task=model.task,
        description=model.description,
        created_at=model.created_at,
        created_by=model.created_by,
        versions=int(count),
        latest_version=latest,
    )


def _summary(artifact: Artifact) -> ArtifactSummary:
    manifest = artifact.signed_manifest["manifest"]
    return ArtifactSummary(
        artifact_id=artifact.id,
        variant=artifact.variant,
        size_bytes=artifact.size_bytes,
        quantization=manifest.get("quantization", {}),
        metrics=artifact.metrics,
        requirements=manifest.get("requirements", {}),
        expires_at=manifest.get("expires_at"),
        manifest_url=f"/api/v1/artifacts/{artifact.id}/manifest",
        corrupt_at=artifact.corrupt_at,
        corrupt_reason=artifact.corrupt_reason,
    )


def _version_public(session: Session, model: Model, version: ModelVersion) -> VersionPublic:
    artifacts = session.exec(select(Artifact).where(Artifact.version_id == version.id)).all()
    order = {"fp32": 0, "fp16": 1, "int8": 2, "int4": 3}
    return VersionPublic(
        model=model.name,
        number=version.number,
        task=model.task,
        source=version.source,
        description=version.description,
        created_at=version.created_at,
        created_by=version.created_by,
        variants=[_summary(a) for a in sorted(artifacts, key=lambda a: (order.get(a.variant, 9), a.variant))],
        refused=version.refused,
        has_checkpoint=version.source_checkpoint is not None,
        lineage=version.lineage,
    )


def _job_public(job: ImportJob) -> ImportJobPublic:
    return ImportJobPublic(
        id=job.id,
        model=job.model_name,
        status=job.status,
        stage=job.stage,
        progress=job.progress,
        message=job.message,
        error=job.error,
        version=job.version_number,
        created_at=job.created_at,
        updated_at=job.updated_at,
        url=f"/api/v1/imports/{job.id}",
    )


@router.post("/models", response_model=ModelPublic, status_code=status.HTTP_201_CREATED, responses=errors(409))
def create_model(body: ModelCreate, session: SessionDep, who: OperatorDep) -> ModelPublic:
    """Create a model; versions are added by uploading to it."""
    if session.exec(select(Model).where(Model.name == body.name)).first() is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"model {body.name!r} already exists")
    model = Model(name=body.name, task=body.task.value, description=body.description, created_by=who.name)
    session.add(model)
    audit.record(session, who.name, "model.create", body.name, {"task": body.task.value})
    session.commit()
    session.refresh(model)
    return _model_public(session, model)


@router.get("/models", response_model=list[ModelPublic])
def list_models(session: SessionDep, _: ViewerDep) -> list[ModelPublic]:
    return [_model_public(session, m) for m in session.exec(select(Model).order_by(col(Model.name))).all()]


@router.get("/models/{name}", response_model=ModelDetail)
def get_model(name: str, session: SessionDep, _: ViewerDep) -> ModelDetail:
    model = _model(session, name)
    versions = session.exec(
        select(ModelVersion).where(ModelVersion.model_id == model.id).order_by(col(ModelVersion.number))
    ).all()
    return ModelDetail(
        **_model_public(session, model).model_dump(),
        version_list=[_version_public(session, model, v) for v in versions],
    )


@router.post(
    "/models/{name}/versions",
    response_model=VersionPublic,
    status_code=status.HTTP_201_CREATED,
    responses={
        202: {"model": ImportJobPublic, "description": "still importing; poll the job"},
        **errors(
            413,
            _422="the request or its options do not fit the schema, or the upload is not a model this registry"
            " imports (not ONNX, no tokenizer for a text task, ...): the reason says what",
        ),
    },
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                                "minItems": 1,
                            },
                            "options": IMPORT_OPTIONS_SCHEMA,
                            "reference": {
                                "type": "string",
                                "format": "binary",
                                "description": "reference cases as JSON lines, one"
                                ' {"input": {...}, "expected": {...}} a line: the same cases as options.reference'
                                " (give one or the other), for files too large for a form field",
                            },
                        },
                        "required": ["file"],
                    },
                    "encoding": {"options": {"contentType": "application/json"}},
                },
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
            "required": True,
        }
    },
)
async def upload_version(
    name: ModelName,
    request: Request,
    runtime: RuntimeDep,
    who: OperatorDep,
    wait: Annotated[float | None, Query(ge=0, le=3600, description="seconds to wait for the import")] = None,
    options: Annotated[
        str | None,
        Query(description="the import options as JSON, as in the multipart 'options' field (for raw-body uploads)"),
    ] = None,
) -> Any:
    """Upload an ONNX model, a bundle (archive or several files) or a Hugging Face checkpoint (archive).

    The upload is streamed to disk (413 beyond the size cap), checked, quantized into the requested
    variants, evaluated against fp32, signed and stored. Answers 201 with the version when that takes
    less than ``wait`` seconds, else 202 with the import job to poll.
    """
    registry = runtime.models
    try:
        received = await receive_upload(registry, request, runtime.settings.upload_max_bytes)
        job_id = await queue_import(
            registry, received, name, received.upload.fields.get("options") or options, who.name
        )
    except (UploadError, BundleError) as exc:
        code = exc.status if isinstance(exc, UploadError) else 422
        raise HTTPException(code, str(exc)) from None
    with Session(runtime.engine) as session:
        detail = {"job": job_id, "files": received.files[:20], "bytes": received.upload.size}
        audit.record(session, who.name, "model.version.import", name, detail)
        session.commit()
    timeout = runtime.settings.import_wait_s if wait is None else wait
    finished = await anyio.to_thread.run_sync(registry.wait, job_id, timeout)
    with Session(runtime.engine) as session:
        job = session.get(ImportJob, job_id)
        assert job is not None
        if not finished or job.status in ("queued", "running"):
            return JSONResponse(
                _job_public(job).model_dump(mode="json"),
                status_code=status.HTTP_202_ACCEPTED,
                headers={"Location": f"/api/v1/imports/{job_id}"},
            )
        if job.status == "failed":
            raise HTTPException(422, job.error or "the import failed")
        model = _model(session, name)
        version = session.exec(
            select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.number == job.version_number)
        ).one()
        return _version_public(session, model, version)


@router.get("/models/{name}/versions/{number}", response_model=VersionPublic)
def get_version(name: str, number: VersionNumber, session: SessionDep, _: ViewerDep) -> VersionPublic:
    model = _model(session, name)
    version = session.exec(
        select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.number == number)
    ).first()
    if version is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model {name!r} has no version {number}")
    return _version_public(session, model, version)


@router.delete("/models/{name}/versions/{number}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(409))
def delete_version(
    name: str, number: VersionNumber, runtime: RuntimeDep, session: SessionDep, who: OperatorDep
) -> Response:
    """Delete a version nothing uses: a version a deployment refers to cannot be deleted (409)."""
    model = _model(session, name)
    version = session.exec(
        select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.number == number)
    ).first()
    if version is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model {name!r} has no version {number}")
    used = session.exec(select(Deployment.id).where(Deployment.version_id == version.id).limit(5)).all()
    if used:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"{name} v{number} is used by deployment(s) {', '.join(d[:12] for d in used)}: it cannot be deleted",
        )
    artifacts = session.exec(select(Artifact).where(Artifact.version_id == version.id)).all()
    for artifact in artifacts:
        session.delete(artifact)
    session.delete(version)
    audit.record(session, who.name, "model.version.delete", f"{name}@{number}")
    session.commit()
    blobs = [f["sha256"] for a in artifacts for f in a.signed_manifest["manifest"]["files"]]
    runtime.models.drop_unreferenced(blobs + ([version.source_checkpoint] if version.source_checkpoint else []))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/imports/{job_id}", response_model=ImportJobPublic)
def get_import(job_id: str, session: SessionDep, _: ViewerDep) -> ImportJobPublic:
    return _job_public(ids.resolve(session, ImportJob, job_id, "import"))


@router.get("/artifacts/{artifact_id}/manifest")
def get_manifest(artifact_id: str, session: SessionDep, _: ViewerDep) -> Response:
    """The signed manifest of an artifact, exactly as devices receive it."""
    return JSONResponse(ids.resolve(session, Artifact, artifact_id, "artifact").signed_manifest)


@router.post(
    "/artifacts/{artifact_id}/repair",
    response_model=ArtifactIntegrityPublic,
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    }
                }
            },
            "required": False,
        }
    },
)
async def repair_artifact(
    artifact_id: str, request: Request, runtime: RuntimeDep, who: OperatorDep
) -> ArtifactIntegrityPublic:
    """Check an artifact's files in the store, after putting in good copies of damaged ones.

    Upload any files (``file`` parts) whose sha256 the artifact's manifest lists: the original model files,
    a backup, a device's slot. Each replaces the store's copy; other files are ignored. Then every file of
    the artifact is hashed: all intact clears the corrupt mark (deployments may use it again), else the
    answer says which files are still missing or damaged. Without files it only checks.
    """
    with Session(runtime.engine) as session:
        if session.get(Artifact, artifact_id) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"artifact {artifact_id!r} not found")
    registry = runtime.models
    staging = registry.new_staging()
    try:
        uploads: list[PathLib] = []
        if request.headers.get("content-type"):
            try:
                upload = await receive(request, staging / "upload", runtime.settings.upload_max_bytes)
            except UploadError as exc:
                raise HTTPException(exc.status, str(exc)) from None
            uploads = [upload.root / p for p in upload.files]
        report = await anyio.to_thread.run_sync(runtime.integrity.repair, artifact_id, uploads, who.name)
    finally:
        remove_tree(staging)
    with Session(runtime.engine) as session:  # the request; the mark's changes have entries of their own
        detail = {"ok": report.ok, "replaced": [f.path for f in report.files if f.replaced], "ignored": report.ignored}
        audit.record(session, who.name, "artifact.check", artifact_id, detail)
        session.commit()
    return ArtifactIntegrityPublic(
        artifact_id=artifact_id,
        ok=report.ok,
        corrupt_reason=report.reason,
        files=[
            FileIntegrity(
                path=f.path, sha256=f.sha256, size=f.size, ok=f.problem is None, problem=f.problem, replaced=f.replaced
            )
            for f in report.files
        ],
        ignored=report.ignored,
    )


@router.get("/signing-key", response_model=SigningKeyPublic, tags=["security"])
def signing_key(runtime: RuntimeDep) -> SigningKeyPublic:
    """The public half of the key that signs manifests; devices pin it at enrollment."""
    key = runtime.models.key
    return SigningKeyPublic(key_id=key.key_id, public_key_pem=key.public_pem)
