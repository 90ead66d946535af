"""Every MQTT message, as a frozen pydantic model discriminated by ``type``.

Each message carries the schema version ``v`` and the sender's clock ``ts``
(seconds since the epoch). Readers are tolerant of unknown fields (a newer
sender may add some) and strict about the ones they know.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from agent.protocol.manifest import SignedManifest

SCHEMA_VERSION: Literal[1] = 1

#: Upper bound for one control-plane payload (state, telemetry, events).
MAX_CONTROL_PAYLOAD = 64 * 1024
#: Commands may carry a signed manifest, whose chunk list grows with the model.
MAX_COMMAND_PAYLOAD = 8 * 1024 * 1024

Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]
CommandId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]
DeploymentId = CommandId
ConnectionId = CommandId
ArtifactId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
LabelKey = Annotated[
    str, StringConstraints(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?$")
]
LabelValue = Annotated[str, StringConstraints(max_length=63, pattern=r"^([A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?)?$")]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=64)]
NonNeg = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)


#: Latest timestamp accepted (the year 3000): beyond it a clock is broken, not early.
MAX_TS = 32_503_680_000.0


class _Message(_Frozen):
    v: Literal[1] = SCHEMA_VERSION
    ts: float = Field(ge=0, le=MAX_TS, description="sender's clock, seconds since the epoch")


# ---------------------------------------------------------------- state ----


class HardwareProfile(_Frozen):
    """What the device is: the controller picks variants and budgets from it."""

    cpu_count: Annotated[int, Field(ge=1, le=4096)]
    cpu_model: str | None = None
    ram_bytes: Count
    disk_free_bytes: Count | None = None
    arch: Annotated[str, StringConstraints(max_length=64)]
    os: Annotated[str, StringConstraints(max_length=128)]
    python: str | None = None
    onnxruntime: str | None = None
    providers: Annotated[list[Name], Field(max_length=32)] = []


class InstalledModel(_Frozen):
    """A model the device holds in a slot."""

    model: Name
    version: Annotated[int, Field(ge=1)]
    variant: Name
    artifact: Annotated[str, StringConstraints(max_length=128)] = ""
    slot: str | None = None
    active: bool = True


class DeviceOnline(_Message):
    """Birth message, retained on the state topic."""

    type: Literal["online"] = "online"
    agent_version: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    hardware: HardwareProfile
    installed: Annotated[list[InstalledModel], Field(max_length=16)] = []
    labels: Labels = {}
    keepalive_s: Annotated[int, Field(ge=1, le=65535)]
    telemetry_interval_s: Annotated[float, Field(gt=0, le=86400)]
    capabilities: Annotated[list[Name], Field(max_length=64)] = []
    connection: ConnectionId | None = Field(
        None,
        description="new for each MQTT connection; births repeated on one connection (after a model switch)"
        " carry the same value, so the controller keeps the time the device came online",
    )


class DeviceOffline(_Message):
    """Last will (reason ``will``) or a clean goodbye (``shutdown``), retained."""

    type: Literal["offline"] = "offline"
    reason: Literal["will", "shutdown"] = "will"


StateMessage = Annotated[DeviceOnline | DeviceOffline, Field(discriminator="type")]


# ------------------------------------------------------------ telemetry ----


class ModelRef(_Frozen):
    model: Name
    version: Annotated[int, Field(ge=1)]
    variant: Name


class LatencySummary(_Frozen):
    """Latency over one interval. ``buckets`` holds sparse ``[index, count]`` pairs of
    ``agent.telemetry.histogram.BUCKET_BOUNDS_MS`` so fleets can be aggregated exactly."""

    p50_ms: NonNeg
    p95_ms: NonNeg
    p99_ms: NonNeg
    mean_ms: NonNeg
    max_ms: NonNeg
    buckets: Annotated[list[tuple[Count, Count]], Field(max_length=256)] = []


class DriftStats(_Frozen):
    """Output distribution over one interval; never raw inputs."""

    label_counts: Annotated[dict[Name, Count], Field(max_length=256)] = {}
    score_hist: Annotated[list[Count], Field(max_length=64)] = []
    score_edges: Annotated[list[float], Field(max_length=65)] = []


class InferenceStats(_Frozen):
    count: Count
    errors: Count = 0
    drops: Count = 0
    queue_depth: Count = 0
    throughput_per_s: NonNeg = 0.0
    latency: LatencySummary | None = None
    tokens: Count = 0
    tokens_per_s: NonNeg | None = None
    drift: DriftStats | None = None


class Telemetry(_Message):
    """Periodic aggregate over ``interval_s`` seconds."""

    type: Literal["telemetry"] = "telemetry"
    seq: Count
    interval_s: Annotated[float, Field(gt=0, le=86400)]
    uptime_s: NonNeg
    cpu_percent: NonNeg
    rss_bytes: Count
    temperature_c: float | None = None
    model: ModelRef | None = None
    inference: InferenceStats | None = None
    spool_depth: Count = 0
    spool_dropped: Count = Field(0, description="messages the offline spool's bound has dropped, ever")


# --------------------------------------------------------------- events ----


class AgentEvent(_Message):
    """Something the agent wants the controller to know (start, stop, error)."""

    type: Literal["agent"] = "agent"
    seq: Count
    kind: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    message: Annotated[str, StringConstraints(max_length=4096)] = ""


class CommandAck(_Message):
    """The outcome of a command, matched by ``command_id``."""

    type: Literal["ack"] = "ack"
    seq: Count
    command_id: CommandId
    ok: bool
    detail: Annotated[str, StringConstraints(max_length=4096)] = ""


class DeployState(StrEnum):
    """The agent's deployment state machine."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    SHADOW = "shadow"
    ACTIVATING = "activating"
    ACTIVE = "active"
    FAILED = "failed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    CANCELLED = "cancelled"


class DeploymentEvent(_Message):
    """A deployment's progress on one device: every state transition, and download progress."""

    type: Literal["deployment"] = "deployment"
    seq: Count
    deployment_id: DeploymentId
    artifact_id: ArtifactId
    state: DeployState
    progress: Annotated[float, Field(ge=0, le=1)] = 0.0
    chunks_have: Count = 0
    chunks_total: Count = 0
    contiguous: Count = Field(0, description="leading chunks held: where the device is in the broadcast")
    listening: bool = Field(
        False, description="subscribed to the artifact's broadcast topic: chunks published from now on reach it"
    )
    reason: Annotated[str, StringConstraints(max_length=4096)] = ""
    installed: InstalledModel | None = None
    metrics: Annotated[dict[str, float], Field(max_length=64)] = {}


class ChunkRequest(_Message):
    """A device asks for the chunks it lacks: ``[start, end)`` index ranges, sent to it alone."""

    type: Literal["chunks"] = "chunks"
    seq: Count
    deployment_id: DeploymentId
    artifact_id: ArtifactId
    ranges: Annotated[list[tuple[Count, Count]], Field(min_length=1, max_length=256)]


EventMessage = Annotated[AgentEvent | CommandAck | DeploymentEvent | ChunkRequest, Field(discriminator="type")]


# ------------------------------------------------------------- commands ----


class Ping(_Message):
    type: Literal["ping"] = "ping"
    command_id: CommandId


class Configure(_Message):
    """Change agent settings at run time; fields left out stay as they are."""

    type: Literal["configure"] = "configure"
    command_id: CommandId
    telemetry_interval_s: Annotated[float, Field(ge=0.1, le=86400)] | None = None


class ShadowSpec(_Frozen):
    """Run the staged candidate beside the active model on sampled live inputs before switching."""

    sample_rate: Annotated[float, Field(gt=0, le=1)] = 0.1
    min_samples: Annotated[int, Field(ge=1)] = 50
    max_duration_s: Annotated[float, Field(gt=0)] = 600.0


class Deploy(_Message):
    """Install the artifact the signed manifest describes (download, verify, stage, self-test, switch)."""

    type: Literal["deploy"] = "deploy"
    command_id: CommandId
    deployment_id: DeploymentId
    manifest: SignedManifest
    activate: bool = Field(True, description="switch as soon as the self-test passes; false: wait in STAGED")
    shadow: ShadowSpec | None = None


class RollbackGrant(_Frozen):
    """What a signed rollback allows: this device may install this (older) artifact."""

    device_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    deployment_id: DeploymentId
    artifact_id: ArtifactId
    model: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    version: Annotated[int, Field(ge=1)]
    expires_at: float


class Rollback(_Message):
    """Go back to the artifact the grant names (kept in the other slot, or downloaded from ``manifest``)."""

    type: Literal["rollback"] = "rollback"
    command_id: CommandId
    deployment_id: DeploymentId
    grant: RollbackGrant
    signature: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    manifest: SignedManifest | None = None
    reason: Annotated[str, StringConstraints(max_length=4096)] = ""


class Activate(_Message):
    """Switch to a candidate waiting in STAGED (or in SHADOW)."""

    type: Literal["activate"] = "activate"
    command_id: CommandId
    deployment_id: DeploymentId


class Commit(_Message):
    """The controller confirms the new model: the previous slot may be freed."""

    type: Literal["commit"] = "commit"
    command_id: CommandId
    deployment_id: DeploymentId


class Cancel(_Message):
    """Stop a deployment that has not switched yet; the active model stays."""

    type: Literal["cancel"] = "cancel"
    command_id: CommandId
    deployment_id: DeploymentId


CommandMessage = Annotated[
    Ping | Configure | Deploy | Rollback | Activate | Commit | Cancel, Field(discriminator="type")
]


def extra_fields(model: BaseModel) -> dict[str, Any]:
    """Fields a newer sender added that this schema does not know (kept for logging, never trusted)."""
    return dict(model.model_extra or {})
