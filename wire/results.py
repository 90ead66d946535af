"""Inference results on ``slmfleet/v1/dev/{id}/results`` (and in the agent's local JSON-lines sink).

Kept apart from ``messages`` because results are data for applications, not control-plane traffic:
QoS 0, optionally sampled, never spooled, and their ``result`` is the task's own dict (see
``agent.inference.pipelines`` for the formats). ``input`` is present only when the operator opted
in (``results_include_input``): raw inputs never leave the device otherwise.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from wire.messages import MAX_TS, SCHEMA_VERSION, ModelRef


class InferenceResult(BaseModel):
    """One record's result."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    v: Literal[1] = SCHEMA_VERSION
    type: Literal["result"] = "result"
    ts: float = Field(ge=0, le=MAX_TS, description="when the result was produced, seconds since the epoch")
    seq: Annotated[int, Field(ge=0)] = Field(description="per-agent result counter (gaps: sampled out or unsent)")
    source: Annotated[str, StringConstraints(max_length=256)] = Field(
        description="where the record came from: file:PATH, stdin, mqtt:TOPIC"
    )
    id: str | int | None = Field(None, description="the record's own 'id' field, echoed for correlation")
    model: ModelRef | None = None
    latency_ms: Annotated[float, Field(ge=0)] = 0.0
    result: dict[str, Any]
    input: Any = None
