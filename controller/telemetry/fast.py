"""Telemetry payloads validated by msgspec on the controller's ingest path (issue 16), under the wire contract's
own rules.

``wire.messages.Telemetry`` (pydantic) is the contract; validating a typical payload with it was the largest
single cost of a stored message (about 14 us, against about 5 us here). The structs below state the same
fields, bounds and defaults (the same constants), strictly typed; ``decode`` tries them first and hands
anything they refuse to pydantic, which then accepts it (a value given in a looser form pydantic converts,
such as ``"5"`` for a count, or an explicit ``null``) or refuses it with its usual reason. So what is accepted,
and why something is refused, is pydantic's; ``tests/contracts/test_fast_telemetry.py`` checks that both
accept the same payloads with the same values.

A field a payload leaves out, or gives as null, is ``UNSET`` here, not None, so that ``msgspec.json`` writes
the same object as ``model_dump_json(exclude_none=True)``: callers test optional parts by truth
(``if msg.inference:``), which holds for both kinds. An explicit null goes through pydantic (it is None there).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from wire import codec
from wire.messages import (
    MAX_BYTES,
    MAX_CPU_PERCENT,
    MAX_LATENCY_MS,
    MAX_METRIC,
    MAX_RATE,
    MAX_TEMPERATURE_C,
    MAX_TS,
    MAX_UPTIME_S,
    MIN_TEMPERATURE_C,
    Telemetry,
)
from wire.topics import DeviceChannel

Name = Annotated[str, Meta(min_length=1, max_length=128)]
Count = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Latency = Annotated[float, Meta(ge=0, le=MAX_LATENCY_MS)]
Rate = Annotated[float, Meta(ge=0, le=MAX_RATE)]
Bytes = Annotated[int, Meta(ge=0, le=MAX_BYTES)]
Metric = Annotated[float, Meta(ge=-MAX_METRIC, le=MAX_METRIC)]
Uptime = Annotated[float, Meta(ge=0, le=MAX_UPTIME_S)]


class _Struct(Struct, frozen=True, kw_only=True):
    """Unknown fields are ignored (msgspec's default), as the contract's ``extra="ignore"``."""


class ModelRef(_Struct, frozen=True, kw_only=True):
    model: Name
    version: Annotated[int, Meta(ge=1)]
    variant: Name


class LatencySummary(_Struct, frozen=True, kw_only=True):
    p50_ms: Latency
    p95_ms: Latency
    p99_ms: Latency
    mean_ms: Latency
    max_ms: Latency
    buckets: Annotated[list[tuple[Count, Count]], Meta(max_length=256)] = []


class DriftStats(_Struct, frozen=True, kw_only=True):
    label_counts: Annotated[dict[Name, Count], Meta(max_length=256)] = {}
    score_hist: Annotated[list[Count], Meta(max_length=64)] = []
    score_edges: Annotated[list[Metric], Meta(max_length=65)] = []


class InferenceStats(_Struct, frozen=True, kw_only=True):
    count: Count
    errors: Count = 0
    drops: Count = 0
    queue_depth: Count = 0
    throughput_per_s: Rate = 0.0
    latency: LatencySummary | UnsetType = UNSET
    tokens: Count = 0
    tokens_per_s: Rate | UnsetType = UNSET
    drift: DriftStats | UnsetType = UNSET


class FastTelemetry(_Struct, frozen=True, kw_only=True):
    """``wire.messages.Telemetry``, field for field and in its order (the JSON written keeps it)."""

    v: Literal[1] = 1
    ts: Annotated[float, Meta(ge=0, le=MAX_TS)]
    type: Literal["telemetry"] = "telemetry"
    seq: Count
    interval_s: Annotated[float, Meta(gt=0, le=86400)]
    uptime_s: Uptime
    cpu_percent: Annotated[float, Meta(ge=0, le=MAX_CPU_PERCENT)]
    rss_bytes: Bytes
    temperature_c: Annotated[float, Meta(ge=MIN_TEMPERATURE_C, le=MAX_TEMPERATURE_C)] | UnsetType = UNSET
    model: ModelRef | UnsetType = UNSET
    inference: InferenceStats | UnsetType = UNSET
    spool_depth: Count = 0
    spool_dropped: Count = 0
    serving_s: Uptime | UnsetType = UNSET
    model_rss_bytes: Bytes | UnsetType = UNSET


_decoder = msgspec.json.Decoder(FastTelemetry)
_encoder = msgspec.json.Encoder()


def decode(payload: bytes, max_size: int) -> FastTelemetry | Telemetry:
    """A telemetry payload validated: a ``FastTelemetry``, or pydantic's ``Telemetry`` for what only pydantic
    takes; raises ``codec.PayloadError`` (pydantic's reason) for what the contract refuses."""
    if 0 < len(payload) <= max_size:
        try:
            return _decoder.decode(payload)
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass
    msg: Telemetry = codec.decode(DeviceChannel.TELEMETRY, payload, max_size)
    return msg


def to_json(msg: FastTelemetry | Telemetry) -> str:
    """The message as stored: what ``model_dump_json(exclude_none=True)`` writes."""
    if isinstance(msg, FastTelemetry):
        return _encoder.encode(msg).decode()
    return msg.model_dump_json(exclude_none=True)


def to_dict(msg: FastTelemetry | Telemetry) -> dict[str, Any]:
    """The message as a JSON object (``model_dump(mode="json", exclude_none=True)``)."""
    if isinstance(msg, FastTelemetry):
        out: dict[str, Any] = msgspec.json.decode(_encoder.encode(msg))  # rare (a skewed clock): lists, as JSON
        return out
    return msg.model_dump(mode="json", exclude_none=True)


def replace(msg: FastTelemetry | Telemetry, **changes: Any) -> FastTelemetry | Telemetry:
    """A copy with ``changes`` (already valid values)."""
    if isinstance(msg, FastTelemetry):
        return msgspec.structs.replace(msg, **changes)
    return msg.model_copy(update=changes)
