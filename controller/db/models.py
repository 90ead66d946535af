"""Tables. Each entity also has its API shapes in ``controller.api.schemas``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlmodel import Field, SQLModel

from controller.db.types import UTCDateTime, utcnow


class Device(SQLModel, table=True):
    """A device the controller has heard from."""

    id: str = Field(sa_column=Column(String(128), primary_key=True))
    status: str = Field(default="offline", max_length=16, index=True)
    agent_version: str | None = Field(default=None, max_length=64)
    hardware: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    installed: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    capabilities: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    keepalive_s: int = 30
    telemetry_interval_s: float = 10.0
    first_seen: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    last_seen: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    status_changed_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    offline_reason: str | None = Field(default=None, max_length=32)
    #: the MQTT connection the last birth came from: a birth repeated on it (a model switch) keeps the status time
    connection: str | None = Field(default=None, max_length=64)
    enrolled_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    revoked_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))


class ForgottenDevice(SQLModel, table=True):
    """A device an operator forgot: what it still sends is dropped, and its id stays taken until an admin enrolls
    it again with a token bound to it (created after this)."""

    __tablename__ = "forgotten_device"

    device_id: str = Field(sa_column=Column(String(128), primary_key=True))
    forgotten_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    forgotten_by: str = Field(default="", max_length=128)
    was_enrolled: bool = False


class TelemetryRecord(SQLModel, table=True):
    """One telemetry message; the scalar columns are for queries, ``data`` keeps the whole message."""

    __tablename__ = "telemetry"
    __table_args__ = (Index("ix_telemetry_device_received", "device_id", "received_at"),)

    # BIGINT on PostgreSQL; SQLite only autoincrements an INTEGER PRIMARY KEY.
    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    )
    device_id: str = Field(sa_column=Column(String(128), nullable=False))
    received_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    ts: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    seq: int = 0
    interval_s: float = 0.0
    cpu_percent: float = 0.0
    rss_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    inference_count: int = 0
    inference_errors: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    model: str | None = Field(default=None, max_length=128)
    model_version: int | None = None
    variant: str | None = Field(default=None, max_length=64)
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class DeviceEvent(SQLModel, table=True):
    """An event a device reported (agent lifecycle, command acks, deployment progress)."""

    __tablename__ = "device_event"
    __table_args__ = (Index("ix_device_event_device_received", "device_id", "received_at"),)

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(sa_column=Column(String(128), nullable=False))
    received_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    ts: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    seq: int = 0
    type: str = Field(max_length=32)
    kind: str | None = Field(default=None, max_length=64)
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class ApiToken(SQLModel, table=True):
    """An operator's bearer token; only its SHA-256 is stored."""

    __tablename__ = "api_token"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128, index=True)
    role: str = Field(max_length=16)
    token_hash: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    prefix: str = Field(max_length=16)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    expires_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    revoked_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    last_used_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))


class EnrollmentToken(SQLModel, table=True):
    """A single-use secret a device exchanges for its identity and broker credentials; only its SHA-256 is kept."""

    __tablename__ = "enrollment_token"

    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    prefix: str = Field(max_length=16)
    note: str = Field(default="", max_length=256)
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    device_id: str | None = Field(default=None, max_length=128)
    created_by: str = Field(max_length=128)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    expires_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    revoked_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    used_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    used_by: str | None = Field(default=None, max_length=128)


class DeviceCertificate(SQLModel, table=True):
    """A client certificate the controller issued to a device (mutual TLS with the broker)."""

    __tablename__ = "device_certificate"

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(max_length=128, index=True)
    serial: str = Field(sa_column=Column(String(64), unique=True, nullable=False))  # lower-case hex
    cert_pem: str
    not_before: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    not_after: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    issued_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    #: how it was issued: enrollment or renewal
    via: str = Field(default="enrollment", max_length=16)
    revoked_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    #: revoked (the device was) or superseded (a renewal replaced it)
    revoke_reason: str | None = Field(default=None, max_length=16)


class AuditEntry(SQLModel, table=True):
    """Who changed what, when: every write through the API lands here."""

    __tablename__ = "audit_log"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False, index=True))
    actor: str = Field(max_length=128)
    action: str = Field(max_length=64)
    target: str = Field(max_length=256, index=True)  # the dashboard shows a rollout's or device's entries
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class Model(SQLModel, table=True):
    """A named model (e.g. ``intent-classifier``); its versions are immutable."""

    __tablename__ = "model"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=Column(String(128), unique=True, nullable=False))
    task: str = Field(max_length=32)
    description: str = ""
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    created_by: str = Field(default="", max_length=128)


class ModelVersion(SQLModel, table=True):
    """An immutable version of a model; ``number`` only grows per model."""

    __tablename__ = "model_version"
    __table_args__ = (UniqueConstraint("model_id", "number", name="uq_model_version_number"),)

    id: int | None = Field(default=None, primary_key=True)
    model_id: int = Field(foreign_key="model.id", index=True)
    number: int
    source: str = Field(max_length=16)
    description: str = ""
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    created_by: str = Field(default="", max_length=128)
    options: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    refused: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    #: sha256 of the Hugging Face checkpoint it was made from (a tar in the content store; never shipped to
    #: devices): what a distill, prune or finetune job starts from. None for versions imported as ONNX
    source_checkpoint: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    #: how a derived version was made: parent (model@version), teacher, step kind, settings, data sha256, job
    #: id, step index, the step's report. None for uploaded versions
    lineage: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    #: the derive job (and its step) that produced it: a resumed job skips the steps already registered
    derive_job_id: str | None = Field(default=None, sa_column=Column(String(32), nullable=True, index=True))
    derive_step: int | None = None


class Artifact(SQLModel, table=True):
    """One variant of a version: a signed manifest and the files it lists (in the content store)."""

    __tablename__ = "artifact"
    __table_args__ = (UniqueConstraint("version_id", "variant", name="uq_artifact_variant"),)

    id: str = Field(sa_column=Column(String(64), primary_key=True))
    version_id: int = Field(foreign_key="model_version.id", index=True)
    variant: str = Field(max_length=32)
    size_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    signed_manifest: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    #: set when the store's copy failed its hashes: nothing is sent from it until a repair verifies it again
    corrupt_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    corrupt_reason: str | None = Field(default=None, max_length=1024)


class ArtifactBlob(SQLModel, table=True):
    """A file of the database artifact store (``artifact_store = "database"``): its sha256, size and how it is cut.

    Its bytes are ``pieces`` rows of ``artifact_blob_piece``, each ``piece_size`` bytes (the last one shorter):
    the delivery's chunk size when the importer stored it, so reading one chunk reads one indexed row."""

    __tablename__ = "artifact_blob"

    sha256: str = Field(sa_column=Column(String(64), primary_key=True))
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    piece_size: int = Field(sa_column=Column(Integer, nullable=False))
    pieces: int = Field(sa_column=Column(Integer, nullable=False))
    #: when it was stored or last stored again (an import of the same content): garbage collection spares recent ones
    stored_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))


class ArtifactBlobPiece(SQLModel, table=True):
    """Piece ``idx`` of a blob of the database artifact store (bytea on PostgreSQL, BLOB on SQLite)."""

    __tablename__ = "artifact_blob_piece"

    sha256: str = Field(sa_column=Column(String(64), primary_key=True))
    idx: int = Field(sa_column=Column(Integer, primary_key=True, autoincrement=False))
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class SharedSecret(SQLModel, table=True):
    """A secret every replica must hold the same of (the manifest signing key, the device CA), when the artifacts
    are shared (``artifact_store`` not local): made once by the first replica, read by the others."""

    __tablename__ = "shared_secret"

    name: str = Field(sa_column=Column(String(64), primary_key=True))
    value: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))


class ImportJob(SQLModel, table=True):
    """An upload being turned into a version: stage and progress for the CLI and the dashboard."""

    __tablename__ = "import_job"

    id: str = Field(sa_column=Column(String(32), primary_key=True))
    model_name: str = Field(max_length=128, index=True)
    status: str = Field(default="queued", max_length=16)
    stage: str = Field(default="queued", max_length=64)
    progress: float = 0.0
    message: str = ""
    error: str | None = None
    version_number: int | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    updated_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    created_by: str = Field(default="", max_length=128)


class DeriveJob(SQLModel, table=True):
    """A chain of distill / prune / finetune / quantize steps on a version, run by a worker process
    (``controller/jobs``); each step's output is imported as a version of its own, with its lineage."""

    __tablename__ = "derive_job"

    id: str = Field(sa_column=Column(String(32), primary_key=True))
    model_name: str = Field(max_length=128, index=True)
    base_version: int
    #: [{"kind": "distill" | "prune" | "finetune" | "quantize", "params": {...}}, ...]
    steps: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    #: the operator's data file (JSON lines), a blob of the content store while the job is not finished
    data_sha256: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    #: where produced versions go when the step's task is not the base model's (a classifier from an encoder)
    target_model: str | None = Field(default=None, max_length=128)
    status: str = Field(default="queued", max_length=16, index=True)
    current_step: int = 0
    progress: float = 0.0
    message: str = Field(default="", max_length=1024)
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    #: per step: the algorithm's report (settings, quality, params) and the version's size and latency
    report: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    #: "model@number" of each version produced so far, in step order
    produced: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    worker_pid: int | None = None
    replica_id: str | None = Field(default=None, max_length=128)
    cancel_requested: bool = False
    attempts: int = 0
    created_by: str = Field(default="", max_length=128)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    updated_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    finished_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))


class Deployment(SQLModel, table=True):
    """A model version sent to a set of devices (the mechanism rollouts drive)."""

    __tablename__ = "deployment"

    id: str = Field(sa_column=Column(String(32), primary_key=True))
    model_name: str = Field(max_length=128, index=True)
    version_number: int
    version_id: int = Field(foreign_key="model_version.id", index=True)
    variant_rule: str = Field(default="auto", max_length=32)
    selector: str | None = None
    device_ids: list[str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    status: str = Field(default="running", max_length=16, index=True)
    activate: bool = True
    shadow: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    timeout_s: float = 3600.0
    rollout_id: str | None = Field(default=None, max_length=32, index=True)
    rollout_wave: int | None = None
    max_concurrent: int | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    created_by: str = Field(default="", max_length=128)
    finished_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))


class DeploymentTarget(SQLModel, table=True):
    """One device of a deployment: which artifact it gets and how far it is."""

    __tablename__ = "deployment_target"
    __table_args__ = (UniqueConstraint("deployment_id", "device_id", name="uq_deployment_device"),)

    id: int | None = Field(default=None, primary_key=True)
    deployment_id: str = Field(foreign_key="deployment.id", index=True, max_length=32)
    device_id: str = Field(max_length=128, index=True)
    artifact_id: str | None = Field(default=None, max_length=64)
    variant: str | None = Field(default=None, max_length=32)
    state: str = Field(default="pending", max_length=16)
    progress: float = 0.0
    chunks_have: int = 0
    chunks_total: int = 0
    reason: str = ""
    previous: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    queued: bool = False
    started_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    updated_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    finished_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))


class Rollout(SQLModel, table=True):
    """A version rolled out to a label selector in waves: a persisted state machine."""

    __tablename__ = "rollout"

    id: str = Field(sa_column=Column(String(32), primary_key=True))
    model_name: str = Field(max_length=128, index=True)
    version_number: int
    version_id: int = Field(foreign_key="model_version.id", index=True)
    selector: str
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    state: str = Field(default="pending", max_length=32, index=True)
    wave_index: int = 0
    state_since: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    paused_from: str | None = Field(default=None, max_length=32)
    assignment: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    excluded: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    wave_deployments: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    gate_results: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    reason: str = ""
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    created_by: str = Field(default="", max_length=128)
    finished_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))


class RolloutTransition(SQLModel, table=True):
    """The audit log of a rollout: every transition with its reason and who caused it."""

    __tablename__ = "rollout_transition"

    id: int | None = Field(default=None, primary_key=True)
    rollout_id: str = Field(foreign_key="rollout.id", index=True, max_length=32)
    at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    from_state: str = Field(max_length=32)
    event: str = Field(max_length=32)
    to_state: str = Field(max_length=32)
    wave: int = 0
    reason: str = ""
    actor: str = Field(default="system", max_length=128)


class WebUser(SQLModel, table=True):
    """A person who logs in to the dashboard; only a salted scrypt hash of the password is stored."""

    __tablename__ = "web_user"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    role: str = Field(max_length=16)
    password_hash: str = Field(max_length=256)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    created_by: str = Field(default="", max_length=128)
    password_changed_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    last_login_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))


class WebSession(SQLModel, table=True):
    """A dashboard login: the cookie holds a random secret, the table its SHA-256 and the CSRF token."""

    __tablename__ = "web_session"

    id: str = Field(sa_column=Column(String(64), primary_key=True))
    user_id: int = Field(foreign_key="web_user.id", index=True)
    csrf_token: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    expires_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False, index=True))
    last_seen_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))


class HealthRollup(SQLModel, table=True):
    """What the devices serving one model version reported in one time bucket, summed over the fleet.

    Built from the telemetry rows by a scheduled job (``controller.health.rollup``); the latency and score
    histograms use the buckets shared with the agents, so merged buckets give exact fleet percentiles.
    """

    __tablename__ = "health_rollup"
    __table_args__ = (
        # one row per bucket; its order serves the charts (a version's buckets in a time range)
        UniqueConstraint(
            "model", "model_version", "resolution_s", "bucket_start", "variant", name="uq_health_rollup_bucket"
        ),
        # the fleet page: every version's last minutes
        Index("ix_health_rollup_recent", "resolution_s", "bucket_start"),
    )

    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    )
    resolution_s: int
    bucket_start: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    model: str = Field(max_length=128)
    model_version: int
    variant: str = Field(max_length=64)
    reports: int = 0
    inferences: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    errors: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    drops: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    #: {"buckets": {index: count}, "max_ms": x, "p50_sum": s, "p95_sum": s, "weight": n} (sums: rows without buckets)
    latency: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    #: {label: count}
    labels: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    #: {"edges": [...], "counts": [...]}
    scores: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class HealthCursor(SQLModel, table=True):
    """How far the health job has read a table (the highest id it has summed)."""

    __tablename__ = "health_cursor"

    name: str = Field(sa_column=Column(String(32), primary_key=True))
    last_id: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))


class DeviceHealth(SQLModel, table=True):
    """A device's most recent trouble (inference errors, an agent error event), for the fleet page."""

    __tablename__ = "device_health"

    device_id: str = Field(sa_column=Column(String(128), primary_key=True))
    last_error_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False, index=True))
    last_error: str = Field(default="", max_length=512)


class Webhook(SQLModel, table=True):
    """A URL told about events (rollout state changes, failed deployments, devices offline), signed."""

    __tablename__ = "webhook"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=Column(String(128), unique=True, nullable=False))
    url: str = Field(max_length=2048)
    #: ``whsec_`` + base64: the controller must sign with it, so it is kept (shown once, never listed)
    secret: str = Field(max_length=128)
    events: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    enabled: bool = True
    description: str = Field(default="", max_length=1024)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    created_by: str = Field(default="", max_length=128)
    updated_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))


class NotificationEvent(SQLModel, table=True):
    """One event, with the exact JSON body every webhook it goes to receives (and is signed over)."""

    __tablename__ = "notification_event"

    id: str = Field(sa_column=Column(String(40), primary_key=True))
    type: str = Field(max_length=64, index=True)
    body: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False, index=True))


class WebhookDelivery(SQLModel, table=True):
    """One event to one webhook: pending until a 2xx answer, retried with backoff, failed after the last try."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (Index("ix_webhook_delivery_due", "status", "next_attempt_at"),)

    id: int | None = Field(default=None, primary_key=True)
    webhook_id: int = Field(
        sa_column=Column(Integer, ForeignKey("webhook.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    event_id: str = Field(
        sa_column=Column(String(40), ForeignKey("notification_event.id", ondelete="CASCADE"), nullable=False)
    )
    event_type: str = Field(max_length=64)
    status: str = Field(default="pending", max_length=16)
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    last_attempt_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    delivered_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    last_status: int | None = None
    last_error: str = Field(default="", max_length=1024)
    #: the last attempts: [{"at", "status", "error", "ms"}], newest last, a few kept
    history: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))


class DeviceOfflineNotice(SQLModel, table=True):
    """A device the webhooks were told is offline (so they are told once per outage, and when it is back)."""

    __tablename__ = "device_offline_notice"

    device_id: str = Field(sa_column=Column(String(128), primary_key=True))
    offline_since: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    notified_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))


def table(model: type[SQLModel]) -> Table:
    """The Core table of a SQLModel class (for bulk statements that bypass the ORM)."""
    return model.__table__  # type: ignore[attr-defined]


class Lease(SQLModel, table=True):
    """Who drives a thing (a rollout, a deployment, a periodic job) among the controller replicas
    (``controller.cluster.leases``). Times are the database's clock in epoch seconds, so replicas' clocks never
    matter; ``token`` grows by one at every new acquisition and fences a stale holder's writes."""

    __tablename__ = "cluster_lease"

    name: str = Field(sa_column=Column(String(200), primary_key=True))
    holder: str = Field(sa_column=Column(String(128), nullable=False))
    token: int = Field(sa_column=Column(BigInteger, nullable=False))
    expires_at: float = Field(sa_column=Column(Double, nullable=False))
    acquired_at: float = Field(sa_column=Column(Double, nullable=False))


class Replica(SQLModel, table=True):
    """A controller process of a cluster, heard from every few seconds (``controller.cluster.replicas``)."""

    __tablename__ = "cluster_replica"

    id: str = Field(sa_column=Column(String(128), primary_key=True))
    host: str = Field(default="", max_length=256)
    pid: int = 0
    url: str = Field(default="", max_length=512)
    version: str = Field(default="", max_length=64)
    #: database clock, epoch seconds
    started_at: float = Field(sa_column=Column(Double, nullable=False))
    heartbeat_at: float = Field(sa_column=Column(Double, nullable=False))


class ClusterMessage(SQLModel, table=True):
    """A device's report, or an operation, for a deployment another replica drives: the driver takes it from here
    (``controller.cluster.inbox``) so nothing that reached the wrong replica is lost."""

    __tablename__ = "cluster_message"
    __table_args__ = (Index("ix_cluster_message_deployment", "deployment_id", "id"),)

    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    )
    deployment_id: str = Field(sa_column=Column(String(64), nullable=False))
    device_id: str = Field(default="", sa_column=Column(String(128), nullable=False))
    kind: str = Field(max_length=16)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    sender: str = Field(default="", max_length=128)
    at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
