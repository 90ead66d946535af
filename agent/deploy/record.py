"""The persisted record of the current deployment, and where it is kept.

The record is written (atomically and durably) before every side effect of a transition, so a restarted
agent knows exactly which step it was in. The signed manifest of the current deployment is kept next to
it, one file per artifact (written once, before the record that names it; the last few are kept), so
the record itself stays small enough to rewrite with every progress report.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.deploy.fsutil import atomic_write
from agent.deploy.ids import artifact_id
from wire.manifest import SignedManifest
from wire.messages import DeployState, ShadowSpec

log = logging.getLogger(__name__)

RECORD_FORMAT = 1


class DeploymentRecord(BaseModel):
    """Everything needed to resume one deployment after a crash."""

    model_config = ConfigDict(extra="ignore", validate_assignment=False)

    deployment_id: str
    artifact_id: str
    kind: Literal["deploy", "rollback"] = "deploy"
    state: DeployState = DeployState.IDLE
    target_slot: str | None = Field(default=None, description="the slot the artifact is written to")
    previous_slot: str | None = Field(default=None, description="the slot serving before the switch (None: none)")
    previous_artifact: str = ""
    restore_slot: str | None = Field(default=None, description="where ROLLING_BACK goes")
    restore_outcome: Literal["rolled_back", "failed"] = "rolled_back"
    activate: bool = True
    shadow: ShadowSpec | None = None
    shadow_done: bool = False
    allow_version: int | None = Field(default=None, description="an older version a signed rollback allows")
    committed: bool = False
    reason: str = ""
    attempts: dict[str, int] = Field(default_factory=dict)
    starts: int = Field(default=0, description="agent starts in this state without progress (crash-loop guard)")
    metrics: dict[str, float] = Field(default_factory=dict)
    states: list[DeployState] = Field(default_factory=list, description="states visited, oldest first")
    created_at: float = 0.0
    updated_at: float = 0.0


class SeenDeployment(BaseModel):
    """The outcome of an earlier deployment, to answer a repeated command without redoing it."""

    artifact_id: str
    state: DeployState
    reason: str = ""


class PersistedState(BaseModel):
    """The whole persisted state of the deployment side: the current record, the history and the event seq."""

    format: int = RECORD_FORMAT
    seq: int = 0
    record: DeploymentRecord | None = None
    seen: dict[str, SeenDeployment] = Field(default_factory=dict)


class RecordStore(Protocol):
    """Durable storage of the PersistedState and of the current deployment's signed manifest."""

    def load(self) -> PersistedState: ...

    def save(self, state: PersistedState) -> None: ...

    def save_manifest(self, signed: SignedManifest) -> None: ...

    def load_manifest(self, artifact_id: str) -> SignedManifest | None: ...


#: manifests kept: the current deployment's and the one before (a crash between the two writes)
KEEP_MANIFESTS = 2


class MemoryRecordStore:
    """In memory, for unit tests and simulated fleets. ``saves`` counts writes."""

    def __init__(self) -> None:
        self._state = PersistedState().model_dump_json()
        self._manifests: dict[str, SignedManifest] = {}
        self.saves = 0

    def load(self) -> PersistedState:
        return PersistedState.model_validate_json(self._state)

    def save(self, state: PersistedState) -> None:
        self._state = state.model_dump_json()
        self.saves += 1

    def save_manifest(self, signed: SignedManifest) -> None:
        key = artifact_id(signed.manifest)
        self._manifests.pop(key, None)
        self._manifests[key] = signed
        while len(self._manifests) > KEEP_MANIFESTS:
            del self._manifests[next(iter(self._manifests))]

    def load_manifest(self, artifact_id: str) -> SignedManifest | None:
        return self._manifests.get(artifact_id)


class DiskRecordStore:
    """``record.json`` and ``manifests/<artifact>.json`` in ``root``, each written atomically and durably."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifests = root / "manifests"
        self.manifests.mkdir(parents=True, exist_ok=True)
        self.record_path = root / "record.json"

    def load(self) -> PersistedState:
        try:
            text = self.record_path.read_bytes()
        except FileNotFoundError:
            return PersistedState()
        try:
            return PersistedState.model_validate_json(text)
        except ValidationError as exc:
            # atomic_write never leaves a torn file; this is corruption by something else. Starting
            # empty keeps the agent serving its active model (the pointer file is separate).
            log.error("deployment record %s is unreadable (%s); starting without one", self.record_path, exc)
            return PersistedState()

    def save(self, state: PersistedState) -> None:
        atomic_write(self.record_path, state.model_dump_json().encode())

    def save_manifest(self, signed: SignedManifest) -> None:
        current = self.manifests / f"{artifact_id(signed.manifest)}.json"
        atomic_write(current, signed.model_dump_json().encode())
        others = sorted(
            (p for p in self.manifests.glob("*.json") if p != current),
            key=lambda p: p.stat().st_mtime_ns,
            reverse=True,
        )
        for old in others[KEEP_MANIFESTS - 1 :]:
            old.unlink(missing_ok=True)

    def load_manifest(self, artifact: str) -> SignedManifest | None:
        if len(artifact) != 64 or any(c not in "0123456789abcdef" for c in artifact):
            return None
        try:
            signed = SignedManifest.model_validate_json((self.manifests / f"{artifact}.json").read_bytes())
        except (FileNotFoundError, ValidationError, json.JSONDecodeError):
            return None
        return signed if artifact_id(signed.manifest) == artifact else None
