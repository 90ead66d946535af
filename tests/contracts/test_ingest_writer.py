"""The ingest writer's bulk path on both databases (issue 16): one executemany on SQLite, one COPY per table
on PostgreSQL. Same rows either way: values, instants, JSON, NULLs; and on PostgreSQL, whose columns hold
their lengths, one row the database refuses costs only itself."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlmodel import Session

from controller.db.models import DeviceEvent, TelemetryRecord
from controller.telemetry.ingest import EventIn, IngestWriter, TelemetryIn
from tests.contracts.test_database import db
from wire.messages import AgentEvent, CommandAck, DeviceOnline, InferenceStats, LatencySummary, ModelRef, Telemetry

__all__ = ["db"]  # the database suite's fixture: a migrated, empty database of each dialect


def _telemetry(seq: int, ts: float, *, model: bool = True) -> Telemetry:
    latency = LatencySummary(p50_ms=1.5, p95_ms=2.5, p99_ms=3.5, mean_ms=1.7, max_ms=4.0, buckets=[(40, 9), (41, 1)])
    return Telemetry(
        ts=ts,
        seq=seq,
        interval_s=10,
        uptime_s=60,
        cpu_percent=12.25,
        rss_bytes=3 * 2**32,  # beyond 32 bits
        inference=InferenceStats(count=10, errors=1, latency=latency) if model else None,
        model=ModelRef(model="m", version=3, variant="v" * 100) if model else None,  # the column keeps 64
    )


def _write(engine: Engine, ops: list[Any]) -> IngestWriter:
    writer = IngestWriter(engine, flush_interval_s=0.05)
    for op in ops:
        assert writer.put(op)
    writer.start()
    try:
        assert writer.flush(30)
    finally:
        writer.stop()
    return writer


def test_telemetry_and_events_are_stored_as_received(db: Engine) -> None:
    now = time.time()
    ops: list[TelemetryIn | EventIn] = [
        TelemetryIn("dev-1", _telemetry(1, now - 1.000001), now),
        TelemetryIn("dev-1", _telemetry(2, now + 3600, model=False), now + 0.5, clock_skew_s=3599.5),  # skewed
        EventIn("dev-2", AgentEvent(ts=now, seq=4, kind="started", message="tab\tnew\nline \\ back"), now),
        EventIn("dev-2", CommandAck(ts=now, seq=5, command_id="c-1", ok=True, detail=""), now),
    ]
    writer = _write(db, ops)
    assert writer.failed_batches == 0 and writer.batches == 1
    with Session(db) as s:
        rows = s.exec(select(TelemetryRecord).order_by(TelemetryRecord.seq)).scalars().all()
        events = s.exec(select(DeviceEvent).order_by(DeviceEvent.seq)).scalars().all()
    assert [r.seq for r in rows] == [1, 2]
    first, skewed = rows
    assert first.device_id == "dev-1" and first.rss_bytes == 3 * 2**32 and first.cpu_percent == 12.25
    assert abs(first.ts.timestamp() - (now - 1.000001)) < 2e-6 and abs(first.received_at.timestamp() - now) < 2e-6
    assert (first.model, first.model_version, first.variant) == ("m", 3, "v" * 64)
    assert (first.latency_p50_ms, first.latency_p95_ms, first.latency_p99_ms) == (1.5, 2.5, 3.5)
    assert first.inference_count == 10 and first.inference_errors == 1
    assert first.data["inference"]["latency"]["buckets"] == [[40, 9], [41, 1]] and "clock_skew_s" not in first.data
    # a clock far off: stored at the receive time, the skew in the data
    assert abs(skewed.ts.timestamp() - (now + 0.5)) < 2e-6 and skewed.data["clock_skew_s"] == 3599.5
    assert skewed.model is None and skewed.latency_p95_ms is None and skewed.inference_count == 0
    assert [(e.type, e.kind, e.message) for e in events] == [
        ("agent", "started", "tab\tnew\nline \\ back"),
        ("ack", "c-1", ""),
    ]


def test_one_row_the_database_refuses_costs_only_itself(db: Engine) -> None:
    if db.dialect.name != "postgresql":
        pytest.skip("SQLite does not hold a VARCHAR to its length")
    now = time.time()
    ops: list[TelemetryIn | EventIn] = [TelemetryIn(f"dev-{i}", _telemetry(i, now), now) for i in range(5)]
    ops.insert(2, TelemetryIn("d" * 200, _telemetry(99, now), now))  # device_id is VARCHAR(128)
    dropped: list[int] = []
    writer = IngestWriter(db, flush_interval_s=0.05, on_dropped=dropped.append)
    for op in ops:
        writer.put(op)
    writer.start()
    try:
        assert writer.flush(30)
    finally:
        writer.stop()
    assert writer.failed_batches == 1 and dropped == [1]
    with Session(db) as s:
        stored = s.exec(select(TelemetryRecord.device_id).order_by(TelemetryRecord.seq)).scalars().all()
    assert stored == [f"dev-{i}" for i in range(5)]


def test_a_full_queue_refuses_and_reports_it(db: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """Past queue_max the writer refuses a message: counted (on_dropped, ``refused``) and logged, never silent."""
    dropped: list[int] = []
    writer = IngestWriter(db, queue_max=3, on_dropped=dropped.append)  # not started: the queue only fills
    now = time.time()
    accepted = [writer.put(TelemetryIn("dev-q", _telemetry(i, now), now)) for i in range(5)]
    assert accepted == [True, True, True, False, False]
    assert dropped == [1, 1] and writer.refused == 2
    assert "ingest queue full (3)" in caplog.text


@pytest.mark.postgres
def test_the_writer_holds_its_batch_while_the_database_is_down() -> None:
    """PostgreSQL killed (a server of this test's own): the writer keeps the batch and what comes after, retries,
    and writes all of it once the server is back; nothing is dropped."""
    from controller.db.engine import make_engine, migrate
    from tests.postgres_server import postgres_server

    with postgres_server() as pg:
        engine = make_engine(pg.url)
        try:
            migrate(engine)
            dropped: list[int] = []
            writer = IngestWriter(engine, flush_interval_s=0.05, on_dropped=dropped.append)
            writer.start()
            now = time.time()
            assert writer.put(TelemetryIn("dev-o", _telemetry(0, now), now))
            assert writer.flush(30)
            pg.kill()
            for seq in range(1, 50):
                assert writer.put(TelemetryIn("dev-o", _telemetry(seq, now), now))
            assert not writer.flush(3)  # held, not dropped: the database is down
            pg.start()
            assert writer.flush(60)
            writer.stop()
            with Session(engine) as s:
                seqs = s.exec(select(TelemetryRecord.seq).order_by(TelemetryRecord.seq)).scalars().all()
            assert seqs == list(range(50)) and dropped == [] and writer.failed_batches == 0
        finally:
            engine.dispose()


def test_a_birth_whose_device_another_replica_just_registered_updates_it(
    db: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Replicas each write every birth: another one may insert the device's row between this batch's SELECT of
    the known devices and its INSERT (here: just before the INSERT, on its connection). The INSERT then updates
    the row (ON CONFLICT) instead of failing the batch (a UniqueViolation, the batch retried)."""
    from sqlalchemy import event, insert

    from controller.db.models import Device, table
    from controller.telemetry.ingest import Birth
    from tests.controller.devices_util import HW

    raced = []

    def other_replica_first(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not raced and " ".join(statement.split()).startswith("INSERT INTO device ("):
            raced.append(statement)  # before the nested execute: it comes through here too
            row = Device(id="dev-raced", status="offline", agent_version="0.0.1", hardware={}, labels={"a": "b"})
            conn.execute(insert(table(Device)).values(**row.model_dump()))

    event.listen(db, "before_cursor_execute", other_replica_first)
    now = time.time()
    birth = DeviceOnline(ts=now, agent_version="0.2.0", hardware=HW, keepalive_s=30, telemetry_interval_s=10)
    try:
        writer = _write(db, [Birth("dev-raced", birth, now), TelemetryIn("dev-raced", _telemetry(0, now), now)])
    finally:
        event.remove(db, "before_cursor_execute", other_replica_first)
    assert raced, "the race was not set up"
    assert writer.batches == 1 and writer.failed_batches == 0
    assert "failed" not in caplog.text, caplog.text
    with Session(db) as s:
        device = s.get(Device, "dev-raced")
        assert device is not None
        assert (device.status, device.agent_version, device.labels) == ("online", "0.2.0", {"a": "b"})
        assert device.hardware["cpu_count"] == HW.cpu_count
        assert s.exec(select(TelemetryRecord.seq)).scalars().all() == [0]
