"""Request and response shapes of the REST API."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from controller.devices.selectors import SCHEMA_PATTERN as SELECTOR_PATTERN
from wire.manifest import Task
from wire.messages import LabelKey, LabelValue


class DevicePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    status: Literal["online", "offline"]
    agent_version: str | None
    hardware: dict[str, Any]
    installed: list[dict[str, Any]]
    labels: dict[str, str]
    capabilities: list[str]
    keepalive_s: int
    telemetry_interval_s: float
    first_seen: datetime
    last_seen: datetime
    status_changed_at: datetime
    offline_reason: str | None
    enrolled_at: datetime | None = None
    revoked_at: datetime | None = Field(None, description="set: the device was revoked and is ignored")


class DevicePage(BaseModel):
    items: list[DevicePublic]
    total: int
    limit: int
    offset: int


class DevicePatch(BaseModel):
    """Labels as a JSON merge patch: a value sets the label, ``null`` removes it."""

    model_config = ConfigDict(extra="forbid")

    labels: dict[LabelKey, LabelValue | None] = Field(
        ..., max_length=64, description="labels to set; null removes a label", examples=[{"site": "berlin"}]
    )


class DeviceConfigure(BaseModel):
    """Agent settings to change at run time (sent as a Configure command signed for the device)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    telemetry_interval_s: float | None = Field(None, ge=0.1, le=86400, description="seconds between telemetry messages")


class CommandSent(BaseModel):
    command_id: str
    expires_at: datetime = Field(description="the device refuses the command after this (e.g. queued while offline)")


class TelemetryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    device_id: str
    received_at: datetime
    ts: datetime
    seq: int
    interval_s: float
    cpu_percent: float
    rss_bytes: int
    inference_count: int
    inference_errors: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    model: str | None
    model_version: int | None
    variant: str | None
    data: dict[str, Any]


class EventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    device_id: str
    received_at: datetime
    ts: datetime
    seq: int
    type: str
    kind: str | None
    message: str
    data: dict[str, Any]


class EmbeddedBrokerHealth(BaseModel):
    """The broker ``slmfleet up`` started and supervises."""

    engine: str | None
    running: bool
    pid: int | None
    restarts: int = Field(description="times it died and was started again")
    last_exit: str | None = Field(None, description="how it last died, e.g. 'killed by SIGKILL'")
    last_exit_at: datetime | None = None


class NatsIngestHealth(BaseModel):
    """ingest = nats: the controller's NATS connection (telemetry and events in a queue group)."""

    connected: bool
    server: str | None = Field(None, description="the NATS server it is connected to (host:port)")
    queue_group: str
    received: int = Field(description="messages received from NATS since the start")


class BrokerHealth(BaseModel):
    url: str | None
    connected: bool
    embedded: EmbeddedBrokerHealth | None = None
    nats: NatsIngestHealth | None = None


class ReplicaHealth(BaseModel):
    """This replica of a cluster: its id and the leases it holds (what it drives)."""

    id: str
    clustered: bool
    drives: list[str]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    version: str
    database: Literal["ok", "error"]
    broker: BrokerHealth
    devices: dict[str, int]
    ingest_queue: int
    replica: ReplicaHealth | None = None


# ------------------------------------------------------------------ models --

ModelName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class ModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ModelName
    task: Task
    description: Annotated[str, StringConstraints(max_length=4096)] = ""


class ModelPublic(BaseModel):
    name: str
    task: str
    description: str
    created_at: datetime
    created_by: str
    versions: int
    latest_version: int | None


class ArtifactSummary(BaseModel):
    artifact_id: str
    variant: str
    size_bytes: int
    quantization: dict[str, Any]
    metrics: dict[str, Any]
    requirements: dict[str, Any]
    expires_at: float | None
    manifest_url: str
    corrupt_at: datetime | None = Field(
        None, description="set: a file failed its sha256 in the controller's store; not deployable until repaired"
    )
    corrupt_reason: str | None = None


class FileIntegrity(BaseModel):
    path: str
    sha256: str
    size: int
    ok: bool
    problem: str | None = None
    replaced: bool = Field(False, description="an uploaded copy replaced the store's")


class ArtifactIntegrityPublic(BaseModel):
    artifact_id: str
    ok: bool = Field(description="every file of the artifact is in the store and matches its sha256")
    corrupt_reason: str | None = None
    files: list[FileIntegrity]
    ignored: list[str] = Field([], description="uploaded files whose sha256 is none of the artifact's (not stored)")


class VersionPublic(BaseModel):
    model: str
    number: int
    task: str
    source: str
    description: str
    created_at: datetime
    created_by: str
    variants: list[ArtifactSummary]
    refused: list[dict[str, Any]]
    #: whether its Hugging Face checkpoint is kept (distill, prune and finetune jobs start from it)
    has_checkpoint: bool = False
    #: how a derived version was made: parent (model@version), teacher, step, settings, data_sha256, job
    lineage: dict[str, Any] | None = None


class ModelDetail(ModelPublic):
    version_list: list[VersionPublic]


class ImportJobPublic(BaseModel):
    id: str
    model: str
    status: Literal["queued", "running", "succeeded", "failed"]
    stage: str
    progress: float
    message: str
    error: str | None
    version: int | None
    created_at: datetime
    updated_at: datetime
    url: str


class SigningKeyPublic(BaseModel):
    algorithm: Literal["ed25519"] = "ed25519"
    key_id: str
    public_key_pem: str


# ------------------------------------------------------------- deployments --


def _exactly_one_of(*names: str) -> Callable[[dict[str, Any]], None]:
    """The schema says what the route checks: exactly one of ``names`` is given (and not null)."""

    def extra(schema: dict[str, Any]) -> None:
        schema["oneOf"] = [{"required": [n], "properties": {n: {"not": {"type": "null"}}}} for n in names]

    return extra


DeviceIds = Annotated[
    list[Annotated[str, StringConstraints(min_length=1, max_length=128)]], Field(min_length=1, max_length=100_000)
]
#: a label selector: the grammar is in the schema, and the route names the term that breaks it
SelectorText = Annotated[
    str, StringConstraints(min_length=1, max_length=4096), Field(json_schema_extra={"pattern": SELECTOR_PATTERN})
]


class DeploymentTargetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_exactly_one_of("devices", "selector"))

    devices: DeviceIds | None = None
    selector: SelectorText | None = None


class ShadowCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sample_rate: Annotated[float, Field(gt=0, le=1)] = 0.1
    min_samples: Annotated[int, Field(ge=1)] = 50
    max_duration_s: Annotated[float, Field(gt=0)] = 600.0


class DeploymentCreate(BaseModel):
    """What to deploy where: a model version (a variant, or ``auto`` per device) to devices or a selector."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_exactly_one_of("target", "devices", "selector"))

    model: ModelName
    version: Annotated[int, Field(ge=1, le=2**31 - 1)]  # beyond: the database driver overflows (a 500)
    variant: Annotated[str, StringConstraints(min_length=1, max_length=32)] = "auto"
    target: DeploymentTargetSpec | None = None
    devices: DeviceIds | None = Field(None, description="shorthand for target.devices")
    selector: SelectorText | None = Field(None, description="shorthand for target.selector")
    activate: bool = True
    shadow: ShadowCreate | None = None
    timeout_s: Annotated[float, Field(gt=0, le=30 * 86400)] = 3600.0


class TargetPublic(BaseModel):
    device_id: str
    artifact_id: str | None
    variant: str | None
    state: str
    progress: float
    percent: float
    chunks_have: int
    chunks_total: int
    reason: str
    metrics: dict[str, Any]
    previous: dict[str, Any] | None
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class DeploymentPublic(BaseModel):
    id: str
    model: str
    version: int
    variant_rule: str
    selector: str | None
    device_ids: list[str] | None
    status: str
    activate: bool
    timeout_s: float
    rollout_id: str | None
    created_at: datetime
    created_by: str
    finished_at: datetime | None
    counts: dict[str, int]
    targets: list[TargetPublic]


class ActionResult(BaseModel):
    deployment: str
    action: str
    devices: int


# ------------------------------------------------------------- derive jobs --


class DeriveJobPublic(BaseModel):
    id: str
    model: str
    base_version: int
    steps: list[dict[str, Any]]
    data_sha256: str | None
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    current_step: int
    progress: float
    message: str
    error: str | None
    report: list[dict[str, Any]]
    produced: list[str]
    worker_pid: int | None
    replica_id: str | None
    cancel_requested: bool
    #: worker processes started for the current step (a worker killed by a signal is started again)
    attempts: int
    created_by: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    url: str
