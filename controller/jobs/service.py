"""Derive jobs as the API, the CLI and the dashboard see them: submit, cancel, and the drive loop that starts
(or resumes) each job on a thread of its own, one at a time per ``jobs_concurrency``.

Each job is driven by the process holding its lease ``derive:<id>`` (always this one for a single controller):
a job left ``running`` by a controller that stopped, or by a replica that died, is taken up by the next drive
and resumes from its stored state (``runner.py``).
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from controller.cluster.keeper import Ownership
from controller.db.models import DeriveJob, Model, ModelVersion
from controller.db.types import utcnow
from controller.jobs.limits import WorkerLimits
from controller.jobs.process import Worker
from controller.jobs.runner import NO_CHECKPOINT, Driving, JobRunner, version_ref
from controller.jobs.steps import StepsError, StepSpec, check_steps, needs_data
from controller.registry.service import RegistryService

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")


class JobError(Exception):
    """A request the jobs refuse: ``status`` is the HTTP answer (404, 409, 422), the message the operator's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class JobSettings:
    memory_mb: int
    threads: int
    nice: int
    concurrency: int
    max_unpacked_bytes: int


class DeriveService:
    def __init__(
        self,
        engine: Engine,
        registry: RegistryService,
        data_dir: Path,
        owner: Ownership,
        settings: JobSettings,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.root = data_dir / "jobs"
        self.owner = owner
        self.settings = settings
        self.limits = WorkerLimits(settings.memory_mb, settings.threads, settings.nice)
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._workers: dict[str, Worker] = {}
        self._stopping = threading.Event()

    # ------------------------------------------------------------ requests --

    def submit(
        self,
        model_name: str,
        base_version: int,
        steps: list[StepSpec],
        actor: str,
        *,
        data: Path | None = None,
        data_sha256: str | None = None,
        target_model: str | None = None,
    ) -> str:
        """Queue a job; JobError (404 no such version, 409 no checkpoint to train from, 422 bad steps or data)."""
        try:
            checked = check_steps(steps, data is not None or data_sha256 is not None)
        except StepsError as exc:
            raise JobError(422, str(exc)) from None
        ref = version_ref(model_name, base_version)
        with Session(self.engine) as session:
            model = session.exec(select(Model).where(Model.name == model_name)).first()
            if model is None:
                raise JobError(404, f"model {model_name!r} not found")
            version = session.exec(
                select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.number == base_version)
            ).first()
            if version is None:
                raise JobError(404, f"model {model_name!r} has no version {base_version}")
            if version.source_checkpoint is None:
                raise JobError(409, NO_CHECKPOINT.format(ref=ref))
        if not needs_data(checked):
            data, data_sha256 = None, None
        if data is not None:
            self._check_data(data, checked)
            data_sha256, _size = self.registry.store.put_file(data)
        elif data_sha256 is not None and not self.registry.store.has(data_sha256):
            raise JobError(
                422, f"no data file with sha256 {data_sha256} is kept (they go when their job ends): upload it"
            )
        job_id = uuid.uuid4().hex
        with Session(self.engine) as session:
            session.add(
                DeriveJob(
                    id=job_id,
                    model_name=model_name,
                    base_version=base_version,
                    steps=checked,
                    data_sha256=data_sha256,
                    target_model=target_model,
                    created_by=actor,
                    message=f"queued: {' > '.join(s['kind'] for s in checked)} on {ref}",
                )
            )
            session.commit()
        return job_id

    @staticmethod
    def _check_data(data: Path, steps: list[dict[str, Any]]) -> None:
        """Read the data as the steps will (a bad file is refused now, not minutes into a job)."""
        from controller.registry import shrink

        try:
            if any(s["kind"] == "finetune" for s in steps):
                shrink.read_labeled(data)
            if any(s["kind"] != "finetune" for s in steps):
                shrink.read_texts(data)
        except shrink.ShrinkError as exc:
            raise JobError(422, f"the data file: {exc}") from None

    def cancel(self, job_id: str) -> DeriveJob:
        """Ask a job to stop: a queued one is cancelled at once, a running one by its driver (its worker is sent
        SIGTERM and stops at its next safe point; no version is made of the step it was on)."""
        with Session(self.engine) as session:
            job = session.get(DeriveJob, job_id)
            if job is None:
                raise JobError(404, f"derive job {job_id!r} not found")
            if job.status not in ACTIVE:
                raise JobError(409, f"derive job {job_id[:12]} is {job.status}: there is nothing to cancel")
            job.cancel_requested = True
            if job.status == "queued":
                job.status, job.message, job.finished_at = "cancelled", "cancelled before it started", utcnow()
            job.updated_at = utcnow()
            session.add(job)
            session.commit()
            session.refresh(job)
        with self._lock:
            worker = self._workers.get(job_id)
        if worker is not None:
            worker.terminate()  # at once; the driver notices within half a second anyway
        return job

    # ------------------------------------------------------------- driving --

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with Session(self.engine) as session:
            active = {j for j in session.exec(select(DeriveJob.id).where(col(DeriveJob.status).in_(ACTIVE))).all()}
        for stale in self.root.iterdir():
            if stale.name not in active and not self.owner.clustered:
                shutil.rmtree(stale, ignore_errors=True)  # a finished job's leftovers

    def stop(self) -> None:
        """Stop the workers (they save their state); the jobs stay running and resume at the next start."""
        self._stopping.set()
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.stop(timeout=20)

    def running_here(self) -> list[str]:
        with self._lock:
            return [j for j, t in self._threads.items() if t.is_alive()]

    def drive(self) -> None:
        """Start a driver for each queued or running job nobody here drives, within ``jobs_concurrency``
        (scheduler job, every second)."""
        if self._stopping.is_set():
            return
        with Session(self.engine) as session:
            jobs = session.exec(
                select(DeriveJob.id).where(col(DeriveJob.status).in_(ACTIVE)).order_by(col(DeriveJob.created_at))
            ).all()
        for job_id in jobs:
            with self._lock:
                busy = sum(1 for t in self._threads.values() if t.is_alive())
                if job_id in self._threads and self._threads[job_id].is_alive():
                    continue
            if busy >= self.settings.concurrency:
                return
            if self.owner.drive(f"derive:{job_id}", ("derive", len(jobs))) is None:
                continue
            thread = threading.Thread(target=self._drive, args=(job_id,), name=f"derive-{job_id[:8]}", daemon=True)
            with self._lock:
                self._threads[job_id] = thread
            thread.start()

    def _drive(self, job_id: str) -> None:
        name = f"derive:{job_id}"

        def on_worker(worker: Worker | None) -> None:
            with self._lock:
                if worker is None:
                    self._workers.pop(job_id, None)
                else:
                    self._workers[job_id] = worker

        driving = Driving(
            registry=self.registry,
            engine=self.engine,
            limits=self.limits,
            max_unpacked_bytes=self.settings.max_unpacked_bytes,
            keep_going=lambda: not self._stopping.is_set() and self.owner.holds(name) is not None,
            replica_id=self.owner.replica_id,
            on_worker=on_worker,
        )
        try:
            JobRunner(job_id, self.root / job_id, driving).run()
        finally:
            if not self._stopping.is_set():
                self.owner.release(name)

    def wait_idle(self, timeout: float) -> bool:
        """For tests: True once no job is driven here."""
        threads = list(self._threads.values())
        for t in threads:
            t.join(timeout)
        return not any(t.is_alive() for t in threads)
