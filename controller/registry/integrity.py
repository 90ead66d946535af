"""Artifacts damaged in the controller's store: marked, announced, and repaired from a good copy.

The delivery checks every chunk against the signed manifest before sending it
(``controller.delivery.transfer.ChunkSource``). When one fails, the artifact
(and every other artifact listing the same file) is marked corrupt here: an
``artifact.corrupt`` audit entry (actor ``controller``), the counter
``slmfleet_artifact_corruptions_total``, an error in the log, and the
``listeners`` called (alerting hooks). Nothing is sent from a marked artifact
and no new deployment may use it until ``repair`` (``POST
/api/v1/artifacts/{id}/repair``, ``slmfleet model repair``) has put good copies
of its files in the store (any file whose sha256 is one the manifest lists: the
original upload, a backup, a device's slot) and hashed every file again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from controller import audit
from controller.db.models import Artifact, Model, ModelVersion
from controller.db.types import utcnow
from controller.metrics import Metrics
from controller.registry.store import ArtifactStore, sha256_file

log = logging.getLogger(__name__)

#: who the audit log names for what the controller finds by itself
CONTROLLER_ACTOR = "controller"


@dataclass(frozen=True)
class Corruption:
    """An artifact found damaged: what listeners (alerts, webhooks) are told."""

    artifact_id: str
    model: str
    version: int
    variant: str
    reason: str


@dataclass
class FileCheck:
    path: str
    sha256: str
    size: int
    problem: str | None = None
    replaced: bool = False


@dataclass
class IntegrityReport:
    artifact_id: str
    ok: bool
    files: list[FileCheck] = field(default_factory=list)
    reason: str | None = None
    ignored: list[str] = field(default_factory=list)


class ArtifactIntegrity:
    def __init__(self, engine: Engine, store: ArtifactStore, metrics: Metrics, refresh_s: float | None = None) -> None:
        """``refresh_s``: re-read the marks from the database at most this often (several replicas share them:
        one marks, another repairs); None: only this process changes them (a single controller)."""
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.refresh_s = refresh_s
        self._loaded_at = 0.0
        self.listeners: list[Callable[[Corruption], None]] = []
        #: called with an artifact id once a repair verified it again
        self.on_repaired: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._corrupt: dict[str, str] = {}

    def load(self) -> list[str]:
        """Read the marks from the database (at start; then every ``refresh_s`` with replicas); returns the
        artifacts whose mark went away (another replica repaired them)."""
        self._loaded_at = time.monotonic()
        with Session(self.engine) as session:
            rows = session.exec(select(Artifact).where(col(Artifact.corrupt_at).is_not(None))).all()
            marks = {a.id: a.corrupt_reason or "damaged in the store" for a in rows}
        with self._lock:
            cleared = [a for a in self._corrupt if a not in marks]
            self._corrupt = marks
        return cleared

    def corrupt_reason(self, artifact_id: str) -> str | None:
        """Why the artifact is marked corrupt, or None when it is not."""
        if self.refresh_s is not None and time.monotonic() - self._loaded_at >= self.refresh_s:
            for repaired in self.load():  # by another replica: its chunks are checked again before they are sent
                for callback in list(self.on_repaired):
                    callback(repaired)
        with self._lock:
            return self._corrupt.get(artifact_id)

    # ------------------------------------------------------------ marking --

    def mark_corrupt(self, artifact_id: str, reason: str, blob: str | None = None, **detail: Any) -> list[Corruption]:
        """Mark ``artifact_id`` and every artifact that lists ``blob`` corrupt; returns those newly marked."""
        marked: list[Corruption] = []
        with Session(self.engine) as session:
            artifacts = [a for a in [session.get(Artifact, artifact_id)] if a is not None]
            if blob is not None:
                artifacts += [
                    a
                    for a in session.exec(select(Artifact)).all()
                    if a.id != artifact_id and any(f["sha256"] == blob for f in a.signed_manifest["manifest"]["files"])
                ]
            for artifact in artifacts:
                if artifact.corrupt_at is not None:
                    continue
                shared = artifact.id != artifact_id
                why = f"shares a damaged file with {artifact_id[:12]}: {reason}" if shared else reason
                artifact.corrupt_at, artifact.corrupt_reason = utcnow(), why[:1024]
                session.add(artifact)
                info = self._describe(session, artifact)
                audit.record(
                    session,
                    CONTROLLER_ACTOR,
                    "artifact.corrupt",
                    artifact.id,
                    {**info, "reason": why, "blob": blob, **detail},
                )
                marked.append(Corruption(artifact.id, info["model"], info["version"], info["variant"], why))
            session.commit()
        with self._lock:
            for c in marked:
                self._corrupt[c.artifact_id] = c.reason
        for c in marked:
            self.metrics.artifact_corruptions.inc()
            log.error(
                "artifact %s (%s v%d %s) is corrupt in the controller's store: %s; repair it with"
                " 'slmfleet model repair %s FILE...'",
                c.artifact_id[:12],
                c.model,
                c.version,
                c.variant,
                c.reason,
                c.artifact_id,
            )
            for listener in list(self.listeners):
                try:
                    listener(c)
                except Exception:
                    log.exception("artifact corruption listener failed")
        return marked

    @staticmethod
    def _describe(session: Session, artifact: Artifact) -> dict[str, Any]:
        version = session.get(ModelVersion, artifact.version_id)
        model = session.get(Model, version.model_id) if version is not None else None
        return {
            "model": model.name if model is not None else "?",
            "version": version.number if version is not None else 0,
            "variant": artifact.variant,
        }

    # ------------------------------------------------------------ checking --

    def verify(self, artifact_id: str, actor: str = CONTROLLER_ACTOR) -> IntegrityReport:
        """Hash every file of the artifact in the store; mark it corrupt or clear the mark accordingly."""
        return self.repair(artifact_id, [], actor)

    def repair(self, artifact_id: str, candidates: list[Path], actor: str) -> IntegrityReport:
        """Put each candidate file whose sha256 the manifest lists into the store (over a damaged copy), then
        hash every file of the artifact. Clears the mark when all are intact; marks it when one is not."""
        with Session(self.engine) as session:
            artifact = session.get(Artifact, artifact_id)
            if artifact is None:
                raise KeyError(artifact_id)
            files = artifact.signed_manifest["manifest"]["files"]
        wanted = {f["sha256"]: f for f in files}
        replaced: set[str] = set()
        ignored: list[str] = []
        for path in candidates:
            sha = sha256_file(path)
            if sha not in wanted:
                ignored.append(path.name)
                continue
            if sha not in replaced and self.store.check(sha, int(wanted[sha]["size"])) is not None:
                self.store.put_file(path, replace=True)
                replaced.add(sha)
        checks = [
            FileCheck(f["path"], f["sha256"], int(f["size"]), self.store.check(f["sha256"], int(f["size"])))
            for f in files
        ]
        for c in checks:
            c.replaced = c.sha256 in replaced
        bad = [c for c in checks if c.problem is not None]
        report = IntegrityReport(artifact_id, ok=not bad, files=checks, ignored=ignored)
        if bad:
            first = bad[0]
            reason = f"{first.path}: {first.problem}" + (f" (and {len(bad) - 1} more files)" if len(bad) > 1 else "")
            self.mark_corrupt(artifact_id, reason, blob=first.sha256, found_by=actor)
            report.reason = self.corrupt_reason(artifact_id)
        else:
            self._clear(artifact_id, actor, sorted(c.path for c in checks if c.replaced))
        if replaced:  # other artifacts listing a replaced file may be whole again
            for other in self._marked_sharing(replaced):
                if other != artifact_id and all(
                    self.store.check(f["sha256"], int(f["size"])) is None for f in self._files(other)
                ):
                    self._clear(other, actor, [])
        return report

    def _files(self, artifact_id: str) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            artifact = session.get(Artifact, artifact_id)
            return list(artifact.signed_manifest["manifest"]["files"]) if artifact is not None else []

    def _marked_sharing(self, blobs: set[str]) -> list[str]:
        with self._lock:
            marked = list(self._corrupt)
        return [a for a in marked if any(f["sha256"] in blobs for f in self._files(a))]

    def _clear(self, artifact_id: str, actor: str, replaced: list[str]) -> None:
        with self._lock:
            was = self._corrupt.pop(artifact_id, None)
        with Session(self.engine) as session:
            artifact = session.get(Artifact, artifact_id)
            if artifact is not None and (artifact.corrupt_at is not None or was is not None):
                artifact.corrupt_at, artifact.corrupt_reason = None, None
                session.add(artifact)
                audit.record(session, actor, "artifact.repair", artifact_id, {"replaced": replaced, "verified": True})
                session.commit()
                log.info("artifact %s verified intact again; deliveries may use it", artifact_id[:12])
                for callback in list(self.on_repaired):
                    callback(artifact_id)
