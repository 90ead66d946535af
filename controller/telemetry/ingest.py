"""The single writer of device traffic: batches births, wills, telemetry and events into transactions.

MQTT callbacks validate and hand over; this thread writes. One writer keeps
SQLite free of lock contention and turns thousands of small inserts into a
few large ones. Ordering within a device is preserved.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, and_, bindparam, case, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.sql.expression import Executable

from controller.db.bulk import BulkInsert
from controller.db.models import Device, DeviceEvent, TelemetryRecord, table
from controller.db.types import from_epoch
from controller.telemetry import fast
from controller.telemetry.fast import FastTelemetry
from wire.messages import AgentEvent, ChunkRequest, CommandAck, DeploymentEvent, DeviceOnline, Telemetry

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Birth:
    device_id: str
    msg: DeviceOnline
    at: float


@dataclass(slots=True)
class Offline:
    device_id: str
    reason: str
    at: float


@dataclass(slots=True)
class TelemetryIn:
    device_id: str
    #: validated (``controller.telemetry.fast.decode``): its optional parts are tested by truth, not ``is None``
    msg: Telemetry | FastTelemetry
    at: float
    #: set when the device's timestamp was too far off the controller's clock: stored at ``at`` instead
    clock_skew_s: float | None = None


@dataclass(slots=True)
class EventIn:
    device_id: str
    msg: AgentEvent | CommandAck | DeploymentEvent
    at: float
    clock_skew_s: float | None = None


@dataclass(slots=True)
class LastSeen:
    """When devices were last heard from (flushed periodically, not per message)."""

    seen: dict[str, float]


Op = Birth | Offline | TelemetryIn | EventIn | LastSeen


TELEMETRY_COLUMNS = (
    "device_id",
    "received_at",
    "ts",
    "seq",
    "interval_s",
    "cpu_percent",
    "rss_bytes",
    "inference_count",
    "inference_errors",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "model",
    "model_version",
    "variant",
    "data",
)
EVENT_COLUMNS = ("device_id", "received_at", "ts", "seq", "type", "kind", "message", "data")

#: the largest value of an INTEGER column on every supported database (PostgreSQL: 32 bits)
INT32_MAX = 2**31 - 1
#: the largest value of a BIGINT column
INT64_MAX = 2**63 - 1


def out_of_range(msg: object) -> str | None:
    """Why a message the protocol accepts cannot be stored (a number beyond its column), or None.

    The wire schema bounds counts below only; a value the database cannot hold would fail the
    whole batch it is written in, with every other device's rows.
    """
    checks: list[tuple[str, int, int]] = []
    if isinstance(msg, FastTelemetry | Telemetry):
        checks += [("seq", msg.seq, INT32_MAX), ("rss_bytes", msg.rss_bytes, INT64_MAX)]
        inference, model = msg.inference, msg.model  # None or UNSET when left out: both false
        if inference:
            checks += [("inference.count", inference.count, INT32_MAX)]
            checks += [("inference.errors", inference.errors, INT32_MAX)]
        if model:
            checks.append(("model.version", model.version, INT32_MAX))
    elif isinstance(msg, AgentEvent | CommandAck):
        checks.append(("seq", msg.seq, INT32_MAX))
    elif isinstance(msg, DeploymentEvent):
        checks += [("seq", msg.seq, INT32_MAX), ("chunks_have", msg.chunks_have, INT32_MAX)]
        checks += [("chunks_total", msg.chunks_total, INT32_MAX), ("contiguous", msg.contiguous, INT32_MAX)]
        if msg.installed is not None:
            checks.append(("installed.version", msg.installed.version, INT32_MAX))
    elif isinstance(msg, ChunkRequest):
        checks.append(("seq", msg.seq, INT32_MAX))
        checks += [("ranges", max(max(a, b) for a, b in msg.ranges), INT32_MAX)]
    elif isinstance(msg, DeviceOnline):
        checks += [(f"installed.{i}.version", m.version, INT32_MAX) for i, m in enumerate(msg.installed)]
    for name, value, limit in checks:
        if value > limit:
            return f"{name} = {value} is beyond {limit}"
    return None


def _stored(op: TelemetryIn | EventIn) -> tuple[float, str]:
    """The time to store (the device's, or the receive time when its clock is far off) and the data column:
    the validated message re-serialized (unknown fields a device added are not stored), with the skew if any."""
    msg = op.msg
    if op.clock_skew_s is None:
        if isinstance(msg, FastTelemetry | Telemetry):
            return msg.ts, fast.to_json(msg)
        return msg.ts, msg.model_dump_json(exclude_none=True)
    obj = (
        fast.to_dict(msg)
        if isinstance(msg, FastTelemetry | Telemetry)
        else msg.model_dump(mode="json", exclude_none=True)
    )
    data = {**obj, "clock_skew_s": round(op.clock_skew_s, 3)}
    return op.at, json.dumps(data)


def telemetry_row(op: TelemetryIn, dt: Callable[[float], Any]) -> tuple[Any, ...]:
    """Column values (TELEMETRY_COLUMNS order); ``dt`` converts epoch seconds for the dialect."""
    msg = op.msg
    ts, data = _stored(op)
    # optional parts left out are None (pydantic) or UNSET (msgspec): both false
    inf: Any = msg.inference
    lat: Any = inf.latency if inf else None
    model: Any = msg.model
    return (
        op.device_id,
        dt(op.at),
        dt(ts),
        msg.seq,
        msg.interval_s,
        msg.cpu_percent,
        msg.rss_bytes,
        inf.count if inf else 0,
        inf.errors if inf else 0,
        lat.p50_ms if lat else None,
        lat.p95_ms if lat else None,
        lat.p99_ms if lat else None,
        model.model if model else None,
        model.version if model else None,
        model.variant[:64] if model else None,  # the column is 64 long, the wire allows 128
        data,
    )


def event_row(op: EventIn, dt: Callable[[float], Any]) -> tuple[Any, ...]:
    msg = op.msg
    if isinstance(msg, CommandAck):
        kind, message = msg.command_id, msg.detail
    elif isinstance(msg, DeploymentEvent):
        kind, message = msg.state.value, msg.reason or f"deployment {msg.deployment_id}"
    else:
        kind, message = msg.kind, msg.message
    ts, data = _stored(op)
    return (op.device_id, dt(op.at), dt(ts), msg.seq, msg.type, kind[:64], message, data)


class IngestWriter:
    """A thread that drains a bounded queue of ops into the database in batches."""

    def __init__(
        self,
        engine: Engine,
        *,
        batch_size: int = 2000,
        flush_interval_s: float = 0.2,
        queue_max: int = 200_000,
        on_written: Callable[[int, int], None] | None = None,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.queue_max = queue_max
        self._on_written = on_written
        self._on_dropped = on_dropped
        self._queue: deque[Op] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._enqueued = 0
        self._done = 0
        self._done_cv = threading.Condition()
        self._flush_requested = False
        self.batches = 0
        self.failed_batches = 0
        #: messages refused because the queue was full (also counted through ``on_dropped``)
        self.refused = 0
        self._refused_logged = -1e9
        self._telemetry_insert = BulkInsert(engine, table(TelemetryRecord), TELEMETRY_COLUMNS)
        self._event_insert = BulkInsert(engine, table(DeviceEvent), EVENT_COLUMNS)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)
        self._thread.start()

    def put(self, op: Op) -> bool:
        """Queue an op; False (counted) when the queue is full."""
        if len(self._queue) >= self.queue_max:
            if self._on_dropped is not None:
                self._on_dropped(1)
            self.refused += 1
            now = time.monotonic()
            if now - self._refused_logged >= 10:  # reported, not silent; once per 10 s at most
                self._refused_logged = now
                log.error("ingest queue full (%d): refused received messages (%d so far)", self.queue_max, self.refused)
            return False
        self._queue.append(op)
        self._enqueued += 1
        if len(self._queue) == 1 or len(self._queue) == self.batch_size:
            self._wake.set()
        return True

    @property
    def depth(self) -> int:
        return len(self._queue)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued before this call is written (or dropped after a failure)."""
        target = self._enqueued
        self._flush_requested = True
        self._wake.set()
        deadline = time.monotonic() + timeout
        with self._done_cv:
            while self._done < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._done_cv.wait(remaining)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ --

    def _run(self) -> None:
        while not self._stop:
            if not self._queue:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            # Linger (at most flush_interval_s) so a burst becomes one transaction, not hundreds.
            deadline = time.monotonic() + self.flush_interval_s
            while len(self._queue) < self.batch_size and not self._flush_requested and not self._stop:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.wait(remaining)
                self._wake.clear()
            self._flush_requested = False
            batch: list[Op] = []
            q = self._queue
            while q and len(batch) < self.batch_size:
                batch.append(q.popleft())
            self._write_with_retry(batch)
            with self._done_cv:
                self._done += len(batch)
                self._done_cv.notify_all()

    def _write_with_retry(self, batch: list[Op]) -> None:
        attempt = 0
        outage_since: float | None = None
        pause = 0.2
        while attempt < 3:
            try:
                n_tel, n_evt = self._write(batch)
            except (OperationalError, InterfaceError) as exc:
                # The database is unreachable (restarted, network cut): no row is at fault, so keep the batch and
                # retry until it is back (or the writer stops). Messages keep queueing meanwhile, up to queue_max;
                # past it put() refuses and counts them (slmfleet_ingest_dropped_total).
                if self._stop:
                    log.error("database unreachable at stop: %d received messages not written", len(batch))
                    break
                if outage_since is None:
                    outage_since = time.monotonic()
                    log.warning("database unreachable, holding %d received messages: %s", len(batch), exc)
                time.sleep(pause)
                pause = min(2.0, pause * 2)
                continue
            except Exception:
                attempt += 1
                log.exception("writing %d received messages failed (attempt %d of 3)", len(batch), attempt)
                time.sleep(0.2 * attempt)
                continue
            if outage_since is not None:
                log.warning(
                    "database back after %.1f s: wrote the held messages (%d queued)",
                    time.monotonic() - outage_since,
                    len(self._queue),
                )
            self.batches += 1
            if self._on_written is not None:
                self._on_written(n_tel, n_evt)
            return
        self.failed_batches += 1
        # One bad row must not cost every other device its data: write what can be written, one by one.
        lost = len(batch) if len(batch) == 1 else self._write_each(batch)
        if lost and self._on_dropped is not None:
            self._on_dropped(lost)

    def _write_each(self, batch: list[Op]) -> int:
        """Write ``batch`` op by op (after the batch failed); returns how many could not be written."""
        lost = written = 0
        for i, op in enumerate(batch):
            if lost >= 3 and written == 0:  # not one bad row: the database itself is failing
                log.error("the database refuses every write: dropped %d received messages", len(batch) - i)
                return lost + len(batch) - i
            try:
                n_tel, n_evt = self._write([op])
            except Exception as exc:
                lost += 1
                log.warning("dropped a received %s of %s: %s", type(op).__name__, getattr(op, "device_id", "?"), exc)
                continue
            written += 1
            if self._on_written is not None:
                self._on_written(n_tel, n_evt)
        return lost

    def _write(self, batch: list[Op]) -> tuple[int, int]:
        devices: dict[str, dict[str, Any]] = {}  # id -> column values (births and status changes)
        seen: dict[str, float] = {}
        telemetry: list[tuple[Any, ...]] = []
        events: list[tuple[Any, ...]] = []
        birth_labels: dict[str, dict[str, str]] = {}
        dt = self._telemetry_insert.datetime
        for op in batch:
            if isinstance(op, TelemetryIn):
                telemetry.append(telemetry_row(op, dt))
            elif isinstance(op, EventIn):
                events.append(event_row(op, dt))
            elif isinstance(op, LastSeen):
                seen.update(op.seen)
            elif isinstance(op, Birth):
                m = op.msg
                at = from_epoch(op.at)
                devices[op.device_id] = {
                    "status": "online",
                    "agent_version": m.agent_version,
                    "hardware": m.hardware.model_dump(mode="json", exclude_none=True),
                    "installed": [i.model_dump(mode="json") for i in m.installed],
                    "capabilities": list(m.capabilities),
                    "keepalive_s": m.keepalive_s,
                    "telemetry_interval_s": m.telemetry_interval_s,
                    "last_seen": at,
                    "status_changed_at": at,
                    "offline_reason": None,
                    "connection": m.connection,
                }
                birth_labels[op.device_id] = dict(m.labels)
                seen.pop(op.device_id, None)
            else:  # Offline
                values = devices.setdefault(op.device_id, {})
                values.update(status="offline", status_changed_at=from_epoch(op.at), offline_reason=op.reason[:32])
        with self.engine.begin() as conn:
            if devices:
                existing = set(
                    conn.execute(select(table(Device).c.id).where(table(Device).c.id.in_(list(devices)))).scalars()
                )
                for device_id, values in devices.items():
                    if device_id in existing:
                        where = table(Device).c.id == device_id
                        conn.execute(update(table(Device)).where(where).values(**_kept(values)))
                    elif "agent_version" in values:  # only a birth registers a device
                        row = Device(id=device_id, labels=birth_labels.get(device_id, {}), **values)
                        conn.execute(_register(conn.dialect.name, row.model_dump(), _kept(values)))
            self._telemetry_insert.execute(conn, telemetry)
            self._event_insert.execute(conn, events)
            # devices with a birth or status change in this batch got last_seen with it; an empty executemany
            # would fail the whole batch
            last_seen = [{"b_id": k, "b_seen": from_epoch(v)} for k, v in seen.items() if k not in devices]
            if last_seen:
                devices_table = table(Device)
                conn.execute(
                    update(devices_table)
                    .where(devices_table.c.id == bindparam("b_id"))
                    .values(last_seen=bindparam("b_seen")),
                    last_seen,
                )
        return len(telemetry), len(events)


def _register(dialect: str, row: dict[str, Any], birth: dict[str, Any]) -> Executable:
    """The INSERT of a device's first row. Replicas each handle every birth: another one may register the
    device between this batch's SELECT and its INSERT, so on a conflict the row takes this birth's values (as
    an UPDATE of a known device would) instead of the batch failing and being retried (INSERT ... ON CONFLICT,
    SQLite and PostgreSQL; a plain INSERT elsewhere)."""
    devices = table(Device)
    if dialect == "postgresql":
        return pg_insert(devices).values(**row).on_conflict_do_update(index_elements=[devices.c.id], set_=birth)
    if dialect == "sqlite":
        return sqlite_insert(devices).values(**row).on_conflict_do_update(index_elements=[devices.c.id], set_=birth)
    return insert(devices).values(**row)


def _kept(values: dict[str, Any]) -> dict[str, Any]:
    """A birth's column values, except that a birth on the connection the device is already online on (a
    model switch, a changed interval, the retained birth re-read after a controller restart) keeps the
    time the device came online: "online since" is the connection's, not the last birth's."""
    connection = values.get("connection")
    if values.get("status") != "online" or connection is None:
        return values
    devices = table(Device)
    same = and_(devices.c.status == "online", devices.c.connection == connection)
    return {**values, "status_changed_at": case((same, devices.c.status_changed_at), else_=values["status_changed_at"])}
