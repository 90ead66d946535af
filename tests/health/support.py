"""Telemetry as devices make it (the agent's own counters), stored as the ingest writer stores it, at any time."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import Engine

from agent.telemetry.stats import InferenceCounters
from controller.db.bulk import BulkInsert
from controller.db.models import TelemetryRecord, table
from controller.telemetry.ingest import TELEMETRY_COLUMNS, TelemetryIn, telemetry_row
from wire.messages import ModelRef, Telemetry


def report(
    model: tuple[str, int, str] | None,
    latencies_ms: Iterable[float],
    *,
    labels: Iterable[str] = (),
    scores: Iterable[float] = (),
    errors: int = 0,
    interval_s: float = 10.0,
    seq: int = 0,
) -> Telemetry:
    """One interval's telemetry message, built by the agent's InferenceCounters."""
    counters = InferenceCounters()
    counters.record_many(latencies_ms)
    for label in labels:
        counters.record_label(label)
    for score in scores:
        counters.record_score(score)
    if errors:
        counters.record_error(errors)
    return Telemetry(
        ts=time.time(),
        seq=seq,
        interval_s=interval_s,
        uptime_s=100,
        cpu_percent=10,
        rss_bytes=100 * 2**20,
        model=ModelRef(model=model[0], version=model[1], variant=model[2]) if model else None,
        inference=counters.snapshot(interval_s),
    )


def store(engine: Engine, rows: list[tuple[str, Telemetry, datetime]]) -> None:
    """Write ``(device, message, received at)`` rows exactly as the ingest writer does."""
    bulk = BulkInsert(engine, table(TelemetryRecord), TELEMETRY_COLUMNS)
    with engine.begin() as conn:
        bulk.execute(conn, [telemetry_row(TelemetryIn(d, msg, at.timestamp()), bulk.datetime) for d, msg, at in rows])


def latencies(rng: random.Random, n: int, median_ms: float) -> list[float]:
    return [rng.lognormvariate(0, 0.4) * median_ms for _ in range(n)]
