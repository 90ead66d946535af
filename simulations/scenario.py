"""The scenario file: controller, broker, models, fleet, faults, rollout and the expected outcome.

A scenario is YAML validated by the pydantic models below (unknown keys are errors, so a typo is caught
before anything starts). ``load_scenario`` reads one and applies command-line overrides such as a smaller
fleet. See ``simulations/scenarios/`` for complete examples and the README's "Simulator" section.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from simulations.errors import ScenarioError

Amount = Annotated[str, Field(pattern=r"^\d+(\.\d+)?%?$", description='a count ("5") or a share ("10%")')]

DEPLOY_STATES = (
    "idle",
    "downloading",
    "verifying",
    "staged",
    "shadow",
    "activating",
    "active",
    "failed",
    "rolling_back",
    "rolled_back",
    "cancelled",
)


def amount(value: str | int | float, total: int) -> int:
    """A count or a share of ``total`` as a number of devices (a share rounds up, never above ``total``)."""
    text = str(value)
    if text.endswith("%"):
        return min(total, math.ceil(total * float(text[:-1]) / 100.0 - 1e-9))
    return min(total, int(float(text)))


def share(value: str | int | float) -> float:
    """A share ("10%") or a fraction (0.1) as a fraction."""
    text = str(value)
    return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------ infrastructure --


class ControllerSpec(_Strict):
    """Start a controller (``slmfleet up`` in a temporary data directory) or use a running one."""

    url: str | None = Field(None, description="a running controller's REST API; unset: start one")
    token: str | None = Field(None, description="operator token for a running controller")
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="controller settings for a started controller (SLMFLEET_* environment variables)",
    )

    @model_validator(mode="after")
    def _token_with_url(self) -> ControllerSpec:
        if self.url and not self.token:
            raise ValueError("controller.url needs controller.token (an operator token)")
        return self


class BrokerSpec(_Strict):
    url: str | None = Field(
        None,
        description="a running broker (mqtt://host:port), or the nodes of a cluster as a comma-separated list or a"
        " YAML list (devices spread over them and move to another when theirs dies); unset: start a private one",
    )
    engine: Literal["auto", "mosquitto", "amqtt"] = "auto"
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        "auto", description='the devices\' MQTT version ("3.1.1" for NATS; "auto" tries 5 first)'
    )

    @field_validator("url", mode="before")
    @classmethod
    def _nodes(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return ",".join(str(v).strip() for v in value)
        return value


# ---------------------------------------------------------------------- models --


class Behaviour(_Strict):
    """How a model version behaves on the reference CPU (speed 1.0) in fp32; variants and profiles scale it."""

    latency_ms: Annotated[float, Field(gt=0)] = 10.0
    latency_sigma: Annotated[float, Field(ge=0, le=2)] = Field(0.25, description="log-normal spread of latencies")
    error_rate: Annotated[float, Field(ge=0, le=1)] = 0.001
    agreement: Annotated[float, Field(ge=0, le=1)] = Field(
        0.99, description="share of live inputs on which it answers like the model it replaces (shadow mode)"
    )
    accuracy: Annotated[float, Field(ge=0, le=1)] = Field(0.92, description="share of correct answers (drift)")
    rss_factor: Annotated[float, Field(gt=0)] = Field(1.0, description="memory in use relative to its manifest")


class Generator(_Strict):
    """A model built on the spot (``simulations.models``)."""

    kind: Literal["text-classifier"] = "text-classifier"
    size_mb: Annotated[float, Field(gt=0, le=512)] = 1.0
    seed: int = 0
    compute: Annotated[int, Field(ge=1, le=4096)] = Field(
        1,
        description="how many times each inference evaluates the hidden layer (real extra compute: a slower"
        " version whose answers and file size stay the same)",
    )
    missing_words: list[str] = Field(
        default_factory=list,
        description="words whose rows the embedding table lacks: inference on any input holding one of them"
        " fails in onnxruntime (index out of range), a real bug the registry's evaluation set need not hit",
    )


class VersionSpec(_Strict):
    """One version to register: a generated model or files on disk, and how it behaves on devices."""

    key: str | None = Field(None, description="the name the scenario uses for it (default v1, v2, ...)")
    generator: Generator | None = None
    path: Path | None = Field(None, description="a bundle directory or an .onnx file to upload instead")
    variants: list[Literal["fp32", "int8", "int4"]] | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="more ImportOptions for the upload")
    behaviour: Behaviour = Behaviour()

    @model_validator(mode="after")
    def _one_source(self) -> VersionSpec:
        if (self.generator is None) == (self.path is None):
            raise ValueError("give a version either a generator or a path")
        return self


class ModelSpec(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)]
    task: Literal["text-classification"] = "text-classification"
    versions: Annotated[list[VersionSpec], Field(min_length=1)]
    #: latency factor per variant (smaller is faster) and agreement lost by quantization
    variant_latency: dict[str, float] = Field(
        default_factory=lambda: {"fp32": 1.0, "fp16": 0.9, "int8": 0.6, "int4": 0.8}
    )
    variant_agreement_loss: dict[str, float] = Field(
        default_factory=lambda: {"fp32": 0.0, "fp16": 0.001, "int8": 0.004, "int4": 0.015}
    )

    @model_validator(mode="after")
    def _keys(self) -> ModelSpec:
        seen = set()
        for i, version in enumerate(self.versions):
            if version.key is None:
                version.key = f"v{i + 1}"
            if version.key in seen:
                raise ValueError(f"model {self.name}: version key {version.key!r} is used twice")
            seen.add(version.key)
        return self

    def version(self, key: str | int) -> VersionSpec:
        wanted = f"v{key}" if isinstance(key, int) else key
        for version in self.versions:
            if version.key == wanted:
                return version
        raise ScenarioError(f"model {self.name} has no version {key!r} (it has {[v.key for v in self.versions]})")


# ----------------------------------------------------------------------- fleet --


class RamFit(_Strict):
    """RAM just enough for one variant of a registered version and too little for the next larger one."""

    model: str
    version: str | int
    variant: str


class Profile(_Strict):
    """A kind of device and its share of the fleet."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=63)]
    share: Amount = Field("100%", description="share of the fleet (the last profile takes the rest)")
    cpu_speed: Annotated[float, Field(gt=0, le=100)] = Field(1.0, description="relative to the reference CPU")
    cpu_count: Annotated[int, Field(ge=1, le=256)] = 4
    ram_mb: Annotated[float, Field(gt=0)] | None = 2048
    ram_fits: RamFit | None = Field(None, description="derive the RAM from a registered variant instead")
    disk_mb: Annotated[float, Field(gt=0)] = 8192
    disk_mbps: Annotated[float, Field(gt=0)] = Field(200.0, description="read speed for verifying files, MB/s")
    arch: str = "x86_64"
    os: str = "Linux"
    labels: dict[str, str] = Field(default_factory=dict)
    inference_rate: Annotated[float, Field(ge=0, le=10_000)] | None = Field(
        None, description="inferences per second per device (default: the fleet's)"
    )
    real_onnx: Annotated[int, Field(ge=0)] = Field(
        0, description="devices of this profile that run real onnxruntime on real files (slots on disk)"
    )


class Tag(_Strict):
    """Extra labels for some devices (e.g. tier=canary on a share of every profile)."""

    labels: dict[str, str]
    devices: DeviceSelect


class DeviceSelect(_Strict):
    """Which devices: filters (profile, labels, ids), then a share or a count of what matches."""

    profile: str | list[str] | None = None
    labels: dict[str, str] | None = None
    ids: list[str] | None = None
    share: Amount | None = None
    count: Annotated[int, Field(ge=0)] | None = None
    per_profile: bool = Field(False, description="take the share within each profile (at least one of each)")

    @model_validator(mode="after")
    def _share_or_count(self) -> DeviceSelect:
        if self.share is not None and self.count is not None:
            raise ValueError("select devices by share or by count, not both")
        return self


class Installed(_Strict):
    """What the devices run before the scenario starts (installed at the factory, chosen per device)."""

    model: str
    version: str | int = "v1"


class FleetSpec(_Strict):
    devices: Annotated[int, Field(ge=1, le=200_000)]
    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=32)] = "sim"
    processes: Annotated[int, Field(ge=0, le=64)] = Field(0, description="worker processes (0: one per 2,500)")
    devices_per_process: Annotated[int, Field(ge=1)] = 2500
    connect_rate: Annotated[float, Field(gt=0)] = Field(1000.0, description="new connections per second")
    telemetry_interval_s: Annotated[float, Field(ge=0.1, le=3600)] = 5.0
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 60
    inference_rate: Annotated[float, Field(ge=0, le=10_000)] = 5.0
    installed: Installed | None = None
    profiles: Annotated[list[Profile], Field(min_length=1)]
    tags: list[Tag] = Field(default_factory=list)
    share_chunk_hashes: bool = Field(
        True, description="devices of one process share the sha256 of identical broadcast frames (CRC-keyed)"
    )
    deploy: dict[str, float] = Field(
        default_factory=dict, description="agent DeployConfig overrides (chunk_idle_s, request_timeout_s, ...)"
    )
    real_agents: Annotated[int, Field(ge=0, le=200)] = Field(
        0,
        description="devices that run as real agent processes (``slmfleet agent``: real onnxruntime, downloads,"
        " self-tests, data directories) beside the virtual ones, spread over the profiles",
    )

    @model_validator(mode="after")
    def _real_fits(self) -> FleetSpec:
        if self.real_agents > self.devices:
            raise ValueError(f"real_agents ({self.real_agents}) is more than the fleet's {self.devices} devices")
        return self


# ---------------------------------------------------------------------- faults --


class Trigger(_Strict):
    """Fire when a device reaches a deployment state (and, downloading, a share of the chunks)."""

    state: Literal["downloading", "verifying", "staged", "shadow", "activating", "active", "rolling_back"] = (
        "downloading"
    )
    progress: Annotated[float, Field(ge=0, le=1)] = 0.0


class _Fault(_Strict):
    devices: DeviceSelect = Field(default_factory=lambda: DeviceSelect())
    at_s: Annotated[float, Field(ge=0)] | None = Field(
        None, description="seconds after the rollout is created; unset: from the start of the fleet"
    )
    duration_s: Annotated[float, Field(gt=0)] | None = Field(None, description="unset: until the end")


class LatencyFault(_Fault):
    kind: Literal["latency"]
    latency_ms: Annotated[float, Field(ge=0)]
    jitter_ms: Annotated[float, Field(ge=0)] = 0.0


class LossFault(_Fault):
    """Packet loss: TCP hides it as delay (a retransmission timeout per lost packet); frames that arrive
    too late for the broker's queue are dropped (chunk frames only, QoS 1 traffic otherwise arrives)."""

    kind: Literal["loss"]
    rate: Annotated[float, Field(ge=0, le=1)]
    rto_ms: Annotated[float, Field(ge=0)] = 200.0


class BandwidthFault(_Fault):
    kind: Literal["bandwidth"]
    bytes_per_s: Annotated[float, Field(gt=0)]


class DisconnectFault(_Fault):
    kind: Literal["disconnect"]
    duration_s: Annotated[float, Field(gt=0)] = 5.0
    repeat_every_s: Annotated[float, Field(gt=0)] | None = None
    times: Annotated[int, Field(ge=1)] = 1
    when: Trigger | None = None


class PowerLossFault(_Fault):
    """The device loses power (no goodbye; the broker sends its will) and boots from what it persisted."""

    kind: Literal["power_loss"]
    duration_s: Annotated[float, Field(gt=0)] = 3.0
    when: Trigger | None = None
    times: Annotated[int, Field(ge=1)] = 1


class DiskFullFault(_Fault):
    kind: Literal["disk_full"]
    free_mb: Annotated[float, Field(ge=0)] = 0.0


class CorruptFault(_Fault):
    """Chunks corrupted in transit (the device drops them and asks again) or on disk after writing
    (found when the files are verified, then fetched again)."""

    kind: Literal["corrupt_chunks"]
    rate: Annotated[float, Field(ge=0, le=1)]
    where: Literal["transit", "disk"] = "transit"


class ModelCrashFault(_Fault):
    """A model version that crashes on these devices: in the self-test (nothing switched) or once serving."""

    kind: Literal["model_crash"]
    model: str
    version: str | int
    variants: list[str] | None = None
    stage: Literal["selftest", "serve"] = "selftest"
    delay_s: Annotated[float, Field(ge=0)] = Field(0.0, description="time the crash takes to happen")
    reason: str = "simulated crash: the runtime aborted while loading the model"


class ClockSkewFault(_Fault):
    kind: Literal["clock_skew"]
    skew_s: float


Fault = Annotated[
    LatencyFault
    | LossFault
    | BandwidthFault
    | DisconnectFault
    | PowerLossFault
    | DiskFullFault
    | CorruptFault
    | ModelCrashFault
    | ClockSkewFault,
    Field(discriminator="kind"),
]


# ----------------------------------------------------------- rollout and expect --


class DeviceExpectation(_Strict):
    """At least ``min_share`` (and at most ``max_share``) of the selected devices end in this condition."""

    devices: DeviceSelect = Field(default_factory=lambda: DeviceSelect())
    model: str | None = None
    version: str | int | None = None
    variant: str | None = None
    state: str | None = Field(None, description="the deployment state the device ends in")
    min_share: Amount = "100%"
    max_share: Amount | None = None


class Expect(_Strict):
    rollout_state: str | list[str] | None = None
    max_duration_s: Annotated[float, Field(gt=0)] | None = Field(
        None, description="the rollout ends (completed/aborted/paused) this soon after it was created"
    )
    ended_in_wave: Annotated[int, Field(ge=1)] | None = Field(
        None, description="the wave the rollout ends in, counted from 1 (as the CLI and the dashboard show waves)"
    )
    reason_contains: str | None = None
    gate_failed: str | None = Field(None, description="a gate that must have failed (e.g. p95_latency_ratio)")
    devices: list[DeviceExpectation] = Field(default_factory=list)
    controller_agrees: bool = Field(
        True, description="the controller's record of each device's active model matches the device"
    )
    faults_fired: dict[str, Amount] = Field(default_factory=dict, description="kind -> at least this many")
    no_device_stuck: bool = Field(True, description="no device ends mid-deployment (downloading, verifying, ...)")
    telemetry_stored_min: Amount | None = Field(
        None,
        description="at least this share of the telemetry the devices sent is stored by the controller once the"
        ' fleet stopped and the controller drained its queue ("100%": nothing lost)',
    )


class Limits(_Strict):
    max_run_s: Annotated[float, Field(gt=0)] = Field(900.0, description="hard stop of the whole run")
    ready_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    baseline_s: Annotated[float, Field(ge=0)] | None = Field(
        None,
        description="run on the installed model this long before the rollout (default: until every device"
        " reported the gates' min_samples inferences, at most baseline_max_s)",
    )
    baseline_max_s: Annotated[float, Field(ge=0)] = 120.0
    settle_s: Annotated[float, Field(ge=0)] = Field(
        60.0,
        description="after the rollout ends, wait this long at most for devices to finish and the controller to agree",
    )


class Calibration(_Strict):
    """Where a virtual device's numbers come from: ``measured`` or ``assumed`` (the report shows which).

    ``latency``: measured = each variant's median latency the registry measured at import (or a recorded
    profile's), scaled by the profile's ``cpu_speed``; assumed = the version's ``behaviour.latency_ms``
    times ``variant_latency``. ``memory``: measured = the registry's peak RSS of the variant (or a recorded
    profile's), assumed = the same times ``behaviour.rss_factor``. ``download``: the simulated link is
    always assumed (unlimited on loopback unless a bandwidth fault caps it), unless a recorded profile
    gives the real agents' download rate. ``profile``: a YAML written by ``slmfleet simulate
    --record-profile`` (per variant: latency, RSS, download rate measured on real agents).
    """

    latency: Literal["measured", "assumed"] = "assumed"
    memory: Literal["measured", "assumed"] = "assumed"
    download: Literal["measured", "assumed"] = "assumed"
    profile: Path | None = None


class Scenario(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)]
    description: str = ""
    seed: int = 1
    controller: ControllerSpec = Field(default_factory=lambda: ControllerSpec())
    broker: BrokerSpec = Field(default_factory=lambda: BrokerSpec())
    models: list[ModelSpec] = Field(default_factory=list)
    fleet: FleetSpec
    faults: list[Fault] = Field(default_factory=list)
    rollout: dict[str, Any] | None = Field(
        None, description="the body of POST /api/v1/rollouts; version may name a scenario version key (v2)"
    )
    expect: Expect = Field(default_factory=lambda: Expect())
    limits: Limits = Field(default_factory=lambda: Limits())
    calibration: Calibration = Field(default_factory=lambda: Calibration())

    @field_validator("rollout")
    @classmethod
    def _rollout_is_valid(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        from controller.rollouts.plan import RolloutCreate

        body = dict(value)
        if isinstance(body.get("version"), str):
            body["version"] = 1  # a key, resolved once the versions are registered
        RolloutCreate.model_validate(body)
        return value

    @model_validator(mode="after")
    def _references(self) -> Scenario:
        names = {m.name: m for m in self.models}
        profiles = {p.name for p in self.fleet.profiles}
        refs: list[tuple[str, str | int]] = []
        if self.fleet.installed is not None:
            refs.append((self.fleet.installed.model, self.fleet.installed.version))
        if self.rollout is not None and "model" in self.rollout:
            refs.append((self.rollout["model"], self.rollout.get("version", 1)))
        for fault in self.faults:
            if isinstance(fault, ModelCrashFault):
                refs.append((fault.model, fault.version))
        for p in self.fleet.profiles:
            if p.ram_fits is not None:
                refs.append((p.ram_fits.model, p.ram_fits.version))
            if p.ram_fits is None and p.ram_mb is None:
                raise ValueError(f"profile {p.name}: give ram_mb or ram_fits")
        for model, version in refs:
            if model not in names:
                raise ValueError(f"model {model!r} is not among the scenario's models ({sorted(names)})")
            names[model].version(version)
        selects = [t.devices for t in self.fleet.tags] + [f.devices for f in self.faults]
        selects += [e.devices for e in self.expect.devices]
        for sel in selects:
            wanted = [sel.profile] if isinstance(sel.profile, str) else (sel.profile or [])
            unknown = [p for p in wanted if p not in profiles]
            if unknown:
                raise ValueError(f"unknown profile(s) {unknown}; the fleet has {sorted(profiles)}")
        return self

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise ScenarioError(f"model {name!r} is not in the scenario")


Tag.model_rebuild()


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False)[:10]:
        where = ".".join(str(p) for p in err["loc"]) or "scenario"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def parse_scenario(data: dict[str, Any], source: str = "scenario") -> Scenario:
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(f"{source} is not a valid scenario:\n{_describe(exc)}") from None


def load_scenario(path: Path | str, *, devices: int | None = None, overrides: dict[str, Any] | None = None) -> Scenario:
    """Read a scenario file; ``devices`` resizes the fleet (shares stay), ``overrides`` set dotted keys."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: a scenario is a mapping at the top level")
    if devices is not None:
        data.setdefault("fleet", {})["devices"] = devices
    for key, value in (overrides or {}).items():
        _set(data, key, value)
    scenario = parse_scenario(data, str(path))
    for model in scenario.models:
        for version in model.versions:
            if version.path is not None and not version.path.is_absolute():
                version.path = (path.parent / version.path).resolve()
    cal = scenario.calibration
    if cal.download == "measured" and cal.profile is None:
        raise ScenarioError(f"{path}: calibration.download: measured needs calibration.profile (a recorded profile)")
    if cal.profile is not None and not cal.profile.is_absolute():
        cal.profile = (path.parent / cal.profile).resolve()
    if cal.profile is not None and not cal.profile.is_file():
        raise ScenarioError(f"{path}: calibration.profile {cal.profile} does not exist")
    return scenario


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = data
    for part in parts[:-1]:
        is_index = isinstance(node, list) and re.fullmatch(r"\d+", part)
        node = node[int(part)] if is_index else node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list) and re.fullmatch(r"\d+", last):
        node[int(last)] = value
    else:
        node[last] = value


def bundled(name: str) -> Path:
    """A scenario shipped in ``simulations/scenarios`` by file name (with or without .yaml)."""
    root = Path(__file__).resolve().parent / "scenarios"
    path = root / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in root.glob("*.yaml")))
        raise ScenarioError(f"no bundled scenario {name!r} (there are: {known})")
    return path
