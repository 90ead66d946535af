"""Every MQTT message, as a frozen pydantic model discriminated by ``type``.

Each message carries the schema version ``v`` and the sender's clock ``ts``
(seconds since the epoch). Readers are tolerant of unknown fields (a newer
sender may add some) and strict about the ones they know.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from wire.manifest import SignedManifest

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
DeviceId = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
]
NonNeg = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]

# Physical bounds: what no working device can report. A value beyond them is a broken sensor, a corrupted
# spool or a hostile sender; the message is refused (and counted) instead of storing 1.7e308 % CPU.
#: a day, in milliseconds: no single inference takes longer
MAX_LATENCY_MS = 86_400_000.0
#: 4096 cores, each fully busy (``cpu_percent`` is in percent of one core)
MAX_CPU_PERCENT = 409_600.0
#: a pebibyte: more memory or disk than any edge device has
MAX_BYTES = 2**50
#: a century of uptime
MAX_UPTIME_S = 100 * 365.25 * 86400
#: events, records, tokens, chunks per second
MAX_RATE = 1e9
#: absolute zero to well past where silicon stops working
MIN_TEMPERATURE_C, MAX_TEMPERATURE_C = -273.15, 500.0
#: a metric of a deployment (latency in ms, memory in bytes, agreement, counts)
MAX_METRIC = 1e18
Short = Annotated[str, StringConstraints(max_length=64)]
Latency = Annotated[float, Field(ge=0, le=MAX_LATENCY_MS)]
Rate = Annotated[float, Field(ge=0, le=MAX_RATE)]
Bytes = Annotated[int, Field(ge=0, le=MAX_BYTES)]
Metric = Annotated[float, Field(ge=-MAX_METRIC, le=MAX_METRIC)]


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
    cpu_model: Annotated[str, StringConstraints(max_length=256)] | None = None
    ram_bytes: Bytes
    disk_free_bytes: Bytes | None = None
    arch: Short
    os: Annotated[str, StringConstraints(max_length=128)]
    python: Short | None = None
    onnxruntime: Short | None = None
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
    telemetry_interval_s: Annotated[float, Field(ge=0.1, le=86400)]
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
    ``wire.histogram.BUCKET_BOUNDS_MS`` so fleets can be aggregated exactly."""

    p50_ms: Latency
    p95_ms: Latency
    p99_ms: Latency
    mean_ms: Latency
    max_ms: Latency
    buckets: Annotated[list[tuple[Count, Count]], Field(max_length=256)] = []


class DriftStats(_Frozen):
    """Output distribution over one interval; never raw inputs."""

    label_counts: Annotated[dict[Name, Count], Field(max_length=256)] = {}
    score_hist: Annotated[list[Count], Field(max_length=64)] = []
    score_edges: Annotated[list[Metric], Field(max_length=65)] = []


class InferenceStats(_Frozen):
    count: Count
    errors: Count = 0
    drops: Count = 0
    queue_depth: Count = 0
    throughput_per_s: Rate = 0.0
    latency: LatencySummary | None = None
    tokens: Count = 0
    tokens_per_s: Rate | None = None
    drift: DriftStats | None = None


class Telemetry(_Message):
    """Periodic aggregate over ``interval_s`` seconds."""

    type: Literal["telemetry"] = "telemetry"
    seq: Count
    interval_s: Annotated[float, Field(gt=0, le=86400)]
    uptime_s: Annotated[float, Field(ge=0, le=MAX_UPTIME_S)]
    cpu_percent: Annotated[float, Field(ge=0, le=MAX_CPU_PERCENT, description="percent of one core")]
    rss_bytes: Bytes
    temperature_c: Annotated[float, Field(ge=MIN_TEMPERATURE_C, le=MAX_TEMPERATURE_C)] | None = None
    model: ModelRef | None = None
    inference: InferenceStats | None = None
    spool_depth: Count = 0
    spool_dropped: Count = Field(0, description="messages the offline spool's bound has dropped, ever")
    serving_s: Annotated[float, Field(ge=0, le=MAX_UPTIME_S)] | None = Field(
        None, description="seconds ``model`` has served in this process (since its activation or the agent's start)"
    )
    model_rss_bytes: Bytes | None = Field(
        None, description="what ``model`` itself costs in memory: the agent's RSS after loading it minus before"
    )


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
    sparse: bool = Field(
        False,
        description="holds most of the artifact already (chunks copied from its installed model) and asks for the"
        " few it lacks by ChunkRequest: the broadcast need not wait for it",
    )
    reason: Annotated[str, StringConstraints(max_length=4096)] = ""
    installed: InstalledModel | None = None
    metrics: Annotated[dict[Name, Metric], Field(max_length=64)] = {}


class ChunkRequest(_Message):
    """A device asks for the chunks it lacks: ``[start, end)`` index ranges, sent to it alone."""

    type: Literal["chunks"] = "chunks"
    seq: Count
    deployment_id: DeploymentId
    artifact_id: ArtifactId
    ranges: Annotated[list[tuple[Count, Count]], Field(min_length=1, max_length=256)]
    bad: Annotated[list[Count], Field(max_length=256)] = Field(
        [], description="chunks that arrived and failed their sha256 since the last request (asked for again)"
    )


class CertificateRequest(_Message):
    """A device asks for a new client certificate before its current one expires (mutual TLS).

    ``proof`` is the current key's signature over ``signing.cert_request_bytes`` (device, request, serial,
    time): only the holder of the current certificate's key can renew it, whoever can publish here.
    """

    type: Literal["cert_request"] = "cert_request"
    seq: Count
    csr_pem: Annotated[str, StringConstraints(min_length=1, max_length=8192)]
    serial: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{1,64}$")] = Field(
        description="the current certificate's serial number (hex)"
    )
    proof: Annotated[str, StringConstraints(min_length=1, max_length=1024)]


EventMessage = Annotated[
    AgentEvent | CommandAck | DeploymentEvent | ChunkRequest | CertificateRequest, Field(discriminator="type")
]


# ------------------------------------------------------------- commands ----


class CommandAuth(_Frozen):
    """Whom a command is for and until when, signed by the controller's key (``wire.signing``).

    The signature covers these fields (but ``signature``) and a digest of the whole command, so a genuine
    command cannot be replayed to another device, after it expired, or (``nonce``) twice to the same one.
    """

    device_id: DeviceId
    issued_at: Annotated[float, Field(ge=0, le=MAX_TS)]
    expires_at: Annotated[float, Field(ge=0, le=MAX_TS)]
    nonce: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
    key_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    signature: Annotated[str, StringConstraints(min_length=1, max_length=256)]


class _Command(_Message):
    command_id: CommandId
    auth: CommandAuth | None = Field(
        None, description="the controller's signature binding the command to one device (required by agents)"
    )


class Ping(_Command):
    """Answered with an ack; the only command an agent answers unsigned (it changes nothing)."""

    type: Literal["ping"] = "ping"


class Configure(_Command):
    """Change agent settings at run time; fields left out stay as they are."""

    type: Literal["configure"] = "configure"
    telemetry_interval_s: Annotated[float, Field(ge=0.1, le=86400)] | None = None


class ShadowSpec(_Frozen):
    """Run the staged candidate beside the active model on sampled live inputs before switching."""

    sample_rate: Annotated[float, Field(gt=0, le=1)] = 0.1
    min_samples: Annotated[int, Field(ge=1)] = 50
    max_duration_s: Annotated[float, Field(gt=0)] = 600.0


class Deploy(_Command):
    """Install the artifact the signed manifest describes (download, verify, stage, self-test, switch)."""

    type: Literal["deploy"] = "deploy"
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


class Rollback(_Command):
    """Go back to the artifact the grant names (kept in the other slot, or downloaded from ``manifest``)."""

    type: Literal["rollback"] = "rollback"
    deployment_id: DeploymentId
    grant: RollbackGrant
    signature: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    manifest: SignedManifest | None = None
    reason: Annotated[str, StringConstraints(max_length=4096)] = ""


class Activate(_Command):
    """Switch to a candidate waiting in STAGED (or in SHADOW)."""

    type: Literal["activate"] = "activate"
    deployment_id: DeploymentId


class Commit(_Command):
    """The controller confirms the new model: the previous slot may be freed."""

    type: Literal["commit"] = "commit"
    deployment_id: DeploymentId


class Cancel(_Command):
    """Stop a deployment that has not switched yet; the active model stays."""

    type: Literal["cancel"] = "cancel"
    deployment_id: DeploymentId


class InstallCertificate(_Command):
    """The device's renewed client certificate (for the key of its last CertificateRequest), PEM with its chain."""

    type: Literal["certificate"] = "certificate"
    cert_pem: Annotated[str, StringConstraints(min_length=1, max_length=32768)]
    serial: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{1,64}$")]


CommandMessage = Annotated[
    Ping | Configure | Deploy | Rollback | Activate | Commit | Cancel | InstallCertificate,
    Field(discriminator="type"),
]


def extra_fields(model: BaseModel) -> dict[str, Any]:
    """Fields a newer sender added that this schema does not know (kept for logging, never trusted)."""
    return dict(model.model_extra or {})
