"""The registry as the API and the CLI see it: import jobs on a worker thread, lookups, the signing key."""

from __future__ import annotations

import logging
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from controller.db.models import Artifact, DeriveJob, ImportJob, Model, ModelVersion
from controller.db.secrets import SharedSecrets
from controller.db.types import utcnow
from controller.registry import keys
from controller.registry.bundles import BundleError, ImportOptions
from controller.registry.dbstore import DatabaseStore
from controller.registry.importer import Importer, ImportRequest, ImportResult, Progress
from controller.registry.store import SHARED_GRACE_S, ArtifactStore, ContentStore
from controller.registry.upload import UploadError, remove_tree
from wire.manifest import SignedManifest

log = logging.getLogger(__name__)

#: with a shared store, an import job silent this long at a replica's start-up is taken for one whose replica died
IMPORT_SILENCE_S = 3600.0


def open_store(spec: str, engine: Engine, local_root: Path, piece_size: int) -> ArtifactStore:
    """The artifact store the ``artifact_store`` setting names: local (``local_root``), database, or a shared
    directory (its path)."""
    if spec == "local":
        return ContentStore(local_root)
    if spec == "database":
        return DatabaseStore(engine, piece_size)
    return ContentStore(Path(spec), shared=True)


class RegistryService:
    def __init__(
        self,
        engine: Engine,
        data_dir: Path,
        *,
        chunk_size: int,
        validity_days: float,
        max_unpacked_bytes: int,
        floors: dict[str, float] | None = None,
        artifact_store: str = "local",
        secrets_key: str | None = None,
    ) -> None:
        """``artifact_store``: local, database or the path of a directory every replica mounts (settings);
        ``secrets_key``: the Fernet key of the secrets replicas share (shared_secrets_key)."""
        self.engine = engine
        self.root = data_dir / "registry"
        self.store = open_store(artifact_store, engine, self.root / "store", chunk_size)
        self.staging = self.root / "staging"  # per replica: uploads being unpacked and converted
        # every replica signs with the same key, from the database, once the artifacts are shared
        shared = SharedSecrets(engine, secrets_key)
        load = keys.load_or_create if artifact_store == "local" else lambda d: keys.load_shared(shared, d)
        self.key = load(data_dir / "keys")
        self.importer = Importer(
            engine,
            self.store,
            self.key,
            chunk_size=chunk_size,
            validity_days=validity_days,
            max_unpacked_bytes=max_unpacked_bytes,
            floors=floors,
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="import")
        self._futures: dict[str, Future[None]] = {}
        self._staging: dict[str, Path] = {}
        self._lock = threading.Lock()
        #: imports running outside the import thread (derive jobs' steps, run_import)
        self._outside = 0

    # ------------------------------------------------------------ life --

    def start(self) -> None:
        """Clean up after a crash: interrupted jobs fail, staging and stray blobs go. With a shared store, jobs
        that made progress in the last IMPORT_SILENCE_S may be another replica's, running: left alone."""
        recent = utcnow() - timedelta(seconds=IMPORT_SILENCE_S)
        with Session(self.engine) as session:
            for job in session.exec(select(ImportJob).where(ImportJob.status.in_(("queued", "running")))).all():  # type: ignore[attr-defined]
                if self.store.shared and job.updated_at > recent:
                    continue
                job.status, job.error, job.updated_at = "failed", "the controller stopped during the import", utcnow()
                session.add(job)
            session.commit()
        remove_tree(self.staging)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.store.clean_tmp()
        log.info("artifact store: %s", self.store.kind if self.store.kind != "local" else self.root / "store")
        removed = self.collect_garbage()
        if removed:
            log.info("registry: removed %d blobs no artifact refers to (left by an interrupted import)", removed)

    def stop(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    def collect_garbage(self) -> int:
        """Delete blobs that no manifest lists. Only safe while no import runs (start-up); in a shared store only
        blobs older than SHARED_GRACE_S (younger ones may belong to another replica's import in progress)."""
        referenced = self._referenced()
        removed = 0
        for sha in self.store.list_blobs(SHARED_GRACE_S if self.store.shared else 0.0):
            if sha not in referenced and self.store.delete(sha):
                removed += 1
        return removed

    def _referenced(self) -> set[str]:
        referenced: set[str] = set()
        with Session(self.engine) as session:
            for signed in session.exec(select(Artifact.signed_manifest)).all():
                referenced.update(f["sha256"] for f in signed["manifest"]["files"])
            # kept beside the artifacts: source checkpoints, and the data of derive jobs not finished
            referenced.update(
                sha for sha in session.exec(select(ModelVersion.source_checkpoint)).all() if sha is not None
            )
            unfinished = select(DeriveJob.data_sha256).where(col(DeriveJob.status).in_(("queued", "running")))
            referenced.update(sha for sha in session.exec(unfinished).all() if sha is not None)
        return referenced

    def drop_unreferenced(self, candidates: list[str]) -> int:
        """Delete the blobs among ``candidates`` that no artifact lists any more.

        Skipped while an import runs (it may have stored the same blob and not committed yet): the
        next start-up's garbage collection removes them then. In a shared store another replica's import may
        have too: only blobs older than SHARED_GRACE_S go.
        """
        with self._lock:
            if self._outside or any(not f.done() for f in self._futures.values()):
                return 0
        if self.store.shared:
            candidates = list(set(candidates) & set(self.store.list_blobs(SHARED_GRACE_S)))
        removed = 0
        for sha in set(candidates) - self._referenced():
            if self.store.delete(sha):
                removed += 1
        return removed

    # ---------------------------------------------------------- imports --

    def new_staging(self) -> Path:
        path = self.staging / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def prepare(self, staging: Path, files: list[str]) -> Path:
        """Unpack an uploaded archive (safely) under ``staging``; returns the bundle root."""
        return self.importer.bundle_root(staging / "upload", files, staging / "work")

    def submit(self, model_name: str, staging: Path, bundle_root: Path, options: ImportOptions, actor: str) -> str:
        """Queue the import of ``bundle_root``; ``staging`` is removed when it is done."""
        job_id = uuid.uuid4().hex
        with Session(self.engine) as session:
            session.add(ImportJob(id=job_id, model_name=model_name, created_by=actor))
            session.commit()
        request = ImportRequest(job_id, model_name, bundle_root, options, actor)
        self._staging[job_id] = staging
        with self._lock:
            self._futures[job_id] = self._executor.submit(self._run, request)
        return job_id

    def run_import(self, request: ImportRequest, progress: Progress, work: Path) -> ImportResult:
        """Import on the caller's thread (a derive job's step): the same all-or-nothing import as an upload's."""
        with self._lock:
            self._outside += 1
        try:
            return self.importer.run(request, progress, work)
        finally:
            with self._lock:
                self._outside -= 1

    def wait(self, job_id: str, timeout: float) -> bool:
        """Wait up to ``timeout`` for a job; True when it has finished."""
        with self._lock:
            future = self._futures.get(job_id)
        if future is None:
            return True
        try:
            future.result(timeout)
        except TimeoutError:
            return False
        except Exception:  # the job records its own failure
            return True
        return True

    def _update(self, job_id: str, **values: Any) -> None:
        with Session(self.engine) as session:
            job = session.get(ImportJob, job_id)
            if job is None:
                return
            for k, v in values.items():
                setattr(job, k, v)
            job.updated_at = utcnow()
            session.add(job)
            session.commit()

    def _run(self, request: ImportRequest) -> None:
        job_id = request.job_id
        self._update(job_id, status="running", stage="starting")
        staging = self._staging.pop(job_id)
        work = staging / "work"

        def progress(stage: str, fraction: float, message: str) -> None:
            log.info("import %s (%s): %s %s", job_id[:8], request.model_name, stage, message)
            self._update(job_id, stage=stage, progress=round(fraction, 3), message=message)

        try:
            result = self.importer.run(request, progress, work)
        except (BundleError, UploadError) as exc:
            self._update(job_id, status="failed", stage="failed", error=str(exc))
        except Exception as exc:
            log.exception("import %s failed unexpectedly", job_id)
            self._update(job_id, status="failed", stage="failed", error=f"internal error: {type(exc).__name__}: {exc}")
        else:
            note = "; ".join(f"{r['variant']} refused: {r['reason']}" for r in result.refused)
            self._update(
                job_id,
                status="succeeded",
                stage="done",
                progress=1.0,
                version_number=result.version,
                message=note or f"variants: {', '.join(result.variants)}",
            )
        finally:
            remove_tree(staging)

    # ---------------------------------------------------------- lookups --

    def signed_manifest(self, artifact_id: str) -> SignedManifest | None:
        with Session(self.engine) as session:
            artifact = session.get(Artifact, artifact_id)
            return SignedManifest.model_validate(artifact.signed_manifest) if artifact else None

    def version_artifacts(
        self, session: Session, model: Model, number: int
    ) -> tuple[ModelVersion, list[Artifact]] | None:
        version = session.exec(
            select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.number == number)
        ).first()
        if version is None:
            return None
        artifacts = session.exec(select(Artifact).where(Artifact.version_id == version.id)).all()
        return version, list(artifacts)
