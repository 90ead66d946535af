"""Driving one derive job: for each step, its worker process, then the import of its checkpoint as a version.

Each step ends in one all-or-nothing import whose version row names the job and the step
(``ModelVersion.derive_job_id``/``derive_step``): a step whose version exists is done, so a job resumed after a
restart (here or on another replica) skips it, and a version never exists twice nor in part. A step's worker
keeps its state in ``<job dir>/step-<i>/work``, from which the algorithm resumes.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from controller.db.models import Artifact, DeriveJob, Model, ModelVersion
from controller.db.types import utcnow
from controller.jobs.limits import WorkerLimits
from controller.jobs.process import Worker, WorkerState, end_stray
from controller.registry import sources
from controller.registry.bundles import BundleError, ImportOptions
from controller.registry.importer import ImportRequest
from controller.registry.service import RegistryService
from controller.registry.store import BlobMissing
from controller.registry.upload import UploadError

log = logging.getLogger(__name__)

#: workers started for one step (after a crash, or a controller restart) before a crash fails the job
MAX_ATTEMPTS = 5
#: the share of a step's progress its worker accounts for (the rest is the import)
WORKER_SHARE = 0.8

NO_CHECKPOINT = (
    "{ref} was imported as ONNX: there is no Hugging Face checkpoint to train from. Import the model's Hugging"
    " Face checkpoint (a directory with config.json and weights) as a new version and run the job on that"
)


class JobFailed(Exception):
    """The job cannot go on; the message is the operator's."""


class JobCancelled(Exception):
    """The operator cancelled the job; the message says when."""


class Interrupted(Exception):
    """This process stops driving the job (shutting down, or its lease went to another replica); it goes on
    from its stored state when driven again."""


@dataclass
class Driving:
    """What a job's driver asks of its service."""

    registry: RegistryService
    engine: Engine
    limits: WorkerLimits
    max_unpacked_bytes: int
    #: True while this process may go on driving the job (not stopping, lease held)
    keep_going: Callable[[], bool]
    replica_id: str
    #: the worker being run, for the service's stop()
    on_worker: Callable[[Worker | None], None]


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"exited with status {rc}"


def version_ref(model: str, number: int) -> str:
    return f"{model}@{number}"


class JobRunner:
    def __init__(self, job_id: str, job_dir: Path, driving: Driving) -> None:
        self.job_id = job_id
        self.dir = job_dir
        self.d = driving
        self.engine = driving.engine

    # ------------------------------------------------------------ state --

    def job(self) -> DeriveJob:
        with Session(self.engine) as session:
            job = session.get(DeriveJob, self.job_id)
            assert job is not None
            return job

    def update(self, **values: Any) -> None:
        with Session(self.engine) as session:
            job = session.get(DeriveJob, self.job_id)
            if job is None:
                return
            for k, v in values.items():
                setattr(job, k, v)
            job.updated_at = utcnow()
            session.add(job)
            session.commit()

    def finish(self, status: str, message: str = "", error: str | None = None) -> None:
        self.update(status=status, message=message[:1024], error=error, worker_pid=None, finished_at=utcnow())
        shutil.rmtree(self.dir, ignore_errors=True)

    def cancel_requested(self) -> bool:
        with Session(self.engine) as session:
            job = session.get(DeriveJob, self.job_id)
            return job is None or job.cancel_requested

    # ------------------------------------------------------------- run --

    def run(self) -> None:
        job = self.job()
        if job.status not in ("queued", "running"):
            return
        self.update(status="running", replica_id=self.d.replica_id)
        try:
            for index in range(len(job.steps)):
                if self._done(index) is not None:
                    continue
                if self.cancel_requested():
                    raise JobCancelled(f"cancelled before step {index + 1}")
                self._step(index)
            self.finish("succeeded", f"{len(job.steps)} step(s) done: {', '.join(self.job().produced)}")
        except JobCancelled as exc:
            self.finish("cancelled", str(exc))
        except Interrupted as exc:
            log.info("derive %s: %s; it resumes from its stored state", self.job_id[:12], exc)
            self.update(worker_pid=None)
        except JobFailed as exc:
            log.info("derive %s failed: %s", self.job_id[:12], exc)
            self.finish("failed", error=str(exc))
        except Exception as exc:
            log.exception("derive %s failed unexpectedly", self.job_id[:12])
            self.finish("failed", error=f"internal error: {type(exc).__name__}: {exc}")

    def _done(self, index: int) -> ModelVersion | None:
        with Session(self.engine) as session:
            return session.exec(
                select(ModelVersion).where(ModelVersion.derive_job_id == self.job_id, ModelVersion.derive_step == index)
            ).first()

    def _input(self, index: int) -> tuple[str, Model, ModelVersion]:
        """The version step ``index`` starts from: the job's base, or what the previous step produced."""
        job = self.job()
        with Session(self.engine) as session:
            if index == 0:
                model = session.exec(select(Model).where(Model.name == job.model_name)).first()
                if model is None:
                    raise JobFailed(f"model {job.model_name!r} was deleted")
                version = session.exec(
                    select(ModelVersion).where(
                        ModelVersion.model_id == model.id, ModelVersion.number == job.base_version
                    )
                ).first()
                if version is None:
                    raise JobFailed(f"{version_ref(job.model_name, job.base_version)} was deleted")
            else:
                found = self._done(index - 1)
                if found is None:
                    raise JobFailed(f"the version of step {index} is gone")
                version = found
                owner = session.get(Model, version.model_id)
                if owner is None:
                    raise JobFailed(f"the model of step {index}'s version was deleted")
                model = owner
            return version_ref(model.name, version.number), model, version

    def _checkpoint(self, ref: str, version: ModelVersion, dest: Path) -> Path:
        """The source checkpoint of ``version``, unpacked at ``dest`` (kept there across restarts)."""
        if version.source_checkpoint is None:
            raise JobFailed(NO_CHECKPOINT.format(ref=ref))
        done = dest / ".complete"
        if done.exists():
            return Path(done.read_text())
        shutil.rmtree(dest, ignore_errors=True)
        try:
            root = sources.fetch(self.d.registry.store, version.source_checkpoint, dest, self.d.max_unpacked_bytes)
        except BlobMissing:
            raise JobFailed(f"the source checkpoint of {ref} is missing from the artifact store") from None
        except UploadError as exc:
            raise JobFailed(f"the source checkpoint of {ref} cannot be unpacked: {exc}") from None
        done.write_text(str(root))
        return root

    def _data(self) -> Path | None:
        job = self.job()
        if job.data_sha256 is None:
            return None
        path = self.dir / "data.jsonl"
        if not path.exists():
            try:
                blob = self.d.registry.store.read(job.data_sha256)
            except (BlobMissing, FileNotFoundError):
                raise JobFailed(
                    f"the job's data file (sha256 {job.data_sha256[:16]}...) is missing from the artifact store:"
                    " submit the job again with the file"
                ) from None
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(blob)
            tmp.replace(path)
        return path

    def _step(self, index: int) -> None:
        job = self.job()
        step = job.steps[index]
        kind, params = step["kind"], dict(step["params"])
        n = len(job.steps)
        parent, model, version = self._input(index)
        step_dir = self.dir / f"step-{index}"
        step_dir.mkdir(parents=True, exist_ok=True)
        self.update(current_step=index, progress=round(index / n, 3), message=f"step {index + 1}/{n}: {kind}")
        source = self._checkpoint(parent, version, step_dir / "input")
        report: dict[str, Any] = {"step": kind, "settings": params, "data_sha256": None}
        if kind == "quantize":
            checkpoint = source
        else:
            report = self._work(index, n, step_dir, kind, params, source)
            checkpoint = step_dir / "out"
        if self.cancel_requested():  # the import is the last moment a cancel can stop the version
            raise JobCancelled(f"cancelled during step {index + 1} ({kind}), before its import")
        self._import(index, n, kind, params, parent, model, checkpoint, report, step_dir)

    def _work(
        self, index: int, n: int, step_dir: Path, kind: str, params: dict[str, Any], source: Path
    ) -> dict[str, Any]:
        """Run the step's worker until it produced ``step_dir/out``; its report."""
        job = self.job()
        data = self._data()
        if job.worker_pid:
            end_stray(job.worker_pid, step_dir)
        (step_dir / "step.json").write_text(
            json.dumps(
                {
                    "kind": kind,
                    "params": params,
                    "input": str(source),
                    "data": str(data) if data else None,
                    "data_sha256": job.data_sha256,
                    "threads": self.d.limits.threads,
                    "seed": 0,
                }
            )
        )
        while True:
            if not self.d.keep_going():
                raise Interrupted("the controller is stopping or lost the job's lease")
            attempts = self.job().attempts + 1
            worker = Worker(step_dir, self.d.limits)
            note = f"step {index + 1}/{n} {kind}: worker {worker.pid} starting" + (
                f" (attempt {attempts})" if attempts > 1 else ""
            )
            self.update(worker_pid=worker.pid, attempts=attempts, message=note)
            rc, stop_reason = self._watch(worker, index, n, kind)
            state = worker.state
            if rc == 0 and state.report is not None and (step_dir / "out").is_dir():
                self.update(worker_pid=None, attempts=0)
                return state.report
            if stop_reason == "cancel" or (rc == 3 and self.cancel_requested()):
                raise JobCancelled(f"cancelled during step {index + 1} ({kind}); it made no version")
            if stop_reason == "interrupt" or not self.d.keep_going():
                raise Interrupted("the controller is stopping or lost the job's lease")
            if rc == 2:
                raise JobFailed(f"step {index + 1} ({kind}): {state.error or 'refused'}")
            why = describe_exit(rc)
            if rc < 0 and attempts < MAX_ATTEMPTS:
                log.warning("derive %s: worker %s %s; starting it again", self.job_id[:12], worker.pid, why)
                continue
            tail = worker.log_tail()
            raise JobFailed(
                f"step {index + 1} ({kind}): the worker {why}" + (f"; its last output: {tail}" if tail else "")
            )

    def _watch(self, worker: Worker, index: int, n: int, kind: str) -> tuple[int, str | None]:
        """Follow ``worker`` to its end: its progress into the job, a cancel or lost lease into SIGTERM. The exit
        status, and why it was stopped (cancel, interrupt) if it was."""
        seen = (-1.0, "")
        reason: str | None = None

        def tick(state: WorkerState) -> bool:
            nonlocal seen, reason
            if (state.progress, state.message) != seen:
                seen = (state.progress, state.message)
                overall = (index + WORKER_SHARE * state.progress) / n
                self.update(progress=round(overall, 4), message=f"step {index + 1}/{n} {kind}: {state.message}")
            if self.cancel_requested():
                reason = "cancel"
            elif not self.d.keep_going():
                reason = "interrupt"
            return reason is not None

        self.d.on_worker(worker)
        try:
            return worker.watch(tick), reason
        finally:
            self.d.on_worker(None)

    def _import(
        self,
        index: int,
        n: int,
        kind: str,
        params: dict[str, Any],
        parent: str,
        model: Model,
        checkpoint: Path,
        report: dict[str, Any],
        step_dir: Path,
    ) -> None:
        job = self.job()
        target = self._target(model, checkpoint, kind, job)
        summary = {k: v for k, v in report.items() if k not in ("settings", "step")}
        lineage: dict[str, Any] = {
            "parent": parent,
            "teacher": parent if kind in ("distill", "prune") else None,
            "step": kind,
            "settings": report.get("settings") or params,
            "data_sha256": report.get("data_sha256"),
            "job": self.job_id,
            "step_index": index,
            "report": summary,
        }
        options = ImportOptions(
            variants=["fp32", *params["variants"]] if kind == "quantize" else None,
            description=f"{kind} of {parent} (derive job {self.job_id[:12]})",
        )
        request = ImportRequest(self.job_id, target, checkpoint, options, job.created_by, lineage, self.job_id, index)

        def progress(stage: str, fraction: float, message: str) -> None:
            overall = (index + WORKER_SHARE + (1 - WORKER_SHARE) * fraction) / n
            self.update(
                progress=round(overall, 4), message=f"step {index + 1}/{n}: importing: {stage} {message}"[:1024]
            )

        work = step_dir / "import"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            result = self.d.registry.run_import(request, progress, work)
        except (BundleError, UploadError) as exc:
            raise JobFailed(f"step {index + 1} ({kind}): the import of its checkpoint failed: {exc}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        ref = version_ref(target, result.version)
        entry = {"index": index, "kind": kind, "version": ref, **summary, **self._measured(target, ref)}
        job = self.job()
        self.update(
            produced=[*job.produced, ref],
            report=[*job.report, entry],
            progress=round((index + 1) / n, 4),
            message=f"step {index + 1}/{n} {kind}: {ref}",
        )

    def _measured(self, target: str, ref: str) -> dict[str, Any]:
        """Size and latency (the registry's profile: its probe) of the version's variants."""
        number = int(ref.rsplit("@", 1)[1])
        with Session(self.engine) as session:
            rows = session.exec(
                select(Artifact)
                .join(ModelVersion, col(Artifact.version_id) == col(ModelVersion.id))
                .join(Model, col(ModelVersion.model_id) == col(Model.id))
                .where(Model.name == target, ModelVersion.number == number)
            ).all()
        return {
            "variants": {
                a.variant: {
                    "size_bytes": a.size_bytes,
                    "latency_ms_p50": a.metrics.get("latency_ms_p50"),
                    "agreement": a.metrics.get("agreement"),
                }
                for a in rows
            }
        }

    @staticmethod
    def _target(model: Model, checkpoint: Path, kind: str, job: DeriveJob) -> str:
        """The model the step's version joins: the input's, unless the step changed the task (a classifier
        fine-tuned from an encoder): then the job's target model, or ``<model>-<kind>``."""
        from controller.registry.hfconfig import ConfigError, read_model_config, task_from_architectures

        try:
            found = task_from_architectures(read_model_config(checkpoint))
        except ConfigError as exc:
            raise JobFailed(f"the {kind} step wrote a checkpoint whose configuration is unreadable: {exc}") from None
        if found is None or found[0] == model.task:
            return model.name
        return job.target_model or f"{model.name}-{kind}"
