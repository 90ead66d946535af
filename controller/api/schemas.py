"""Request and response shapes of the REST API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.protocol.messages import LabelKey, LabelValue


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


class BrokerHealth(BaseModel):
    url: str | None
    connected: bool


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    version: str
    database: Literal["ok", "error"]
    broker: BrokerHealth
    devices: dict[str, int]
    ingest_queue: int
