"""The health job: sums telemetry rows it has not seen yet into per-minute and per-hour buckets per model
version and variant, and notes devices' latest trouble (inference errors, agent error events).

It reads by id from where it stopped (a cursor row written in the same transaction as the sums), so a
crash or restart neither loses nor double-counts a row. Telemetry has one writer (the ingest thread),
so ids are committed in order and a row is never skipped. Buckets are keyed by the controller's receipt
time, the clock the gates and charts use; a spool flushed after an outage lands when it arrived.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, case, delete, func, insert, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError

from controller.db.models import DeviceEvent, DeviceHealth, HealthCursor, HealthRollup, TelemetryRecord, table
from controller.db.types import from_epoch, utcnow
from controller.health.aggregate import Health

log = logging.getLogger(__name__)

#: bucket sizes: a minute (charts up to 6 h), 15 minutes (a day), an hour (a week), 6 hours (months); a chart
#: reads the coarsest that still gives it enough points, so a page reads a few hundred rows per variant
RESOLUTIONS = (60, 900, 3600, 21600)
#: how long each resolution's buckets are kept
KEEP = {60: timedelta(days=2), 900: timedelta(days=14), 3600: timedelta(days=60), 21600: timedelta(days=400)}
TELEMETRY_CURSOR = "telemetry"
EVENTS_CURSOR = "events"

Key = tuple[str, int, int, datetime, str]  # model, version, resolution, bucket start, variant


class _Raced(Exception):
    """Another health job moved the cursor first."""


def bucket_start(at: datetime, resolution_s: int) -> datetime:
    epoch = at.timestamp()
    return from_epoch(epoch - epoch % resolution_s)


class HealthRollupJob:
    """``run`` is called by the scheduler; it catches up in batches within a time budget per call."""

    def __init__(
        self, engine: Engine, *, batch: int = 5000, budget_s: float = 1.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.engine = engine
        self.batch = batch
        self.budget_s = budget_s
        self.clock = clock

    def run(self) -> int:
        """Sum what arrived since the last call; returns the telemetry rows read."""
        started = time.monotonic()
        total = 0
        while True:
            n = self._telemetry_batch()
            total += n
            if n < self.batch or time.monotonic() - started > self.budget_s:
                break
        self._error_events()
        return total

    # ------------------------------------------------------------ cursor --

    @staticmethod
    def _cursor(conn: Connection, name: str) -> int:
        c = table(HealthCursor).c
        value = conn.execute(select(c.last_id).where(c.name == name)).scalar()
        if value is None:  # the migration writes the rows; a database without them gets them here
            conn.execute(insert(table(HealthCursor)).values(name=name, last_id=0))
            return 0
        return int(value)

    @staticmethod
    def _claim(conn: Connection, name: str, seen: int, last_id: int) -> None:
        """Move the cursor from ``seen`` to ``last_id`` before writing, or give up (_Raced) when another job (a
        second controller on the same database, a test calling ``run``) moved it meanwhile: that one counted
        these rows. Claiming after the reads keeps the write lock (on SQLite, the database's) short."""
        c = table(HealthCursor).c
        moved = conn.execute(
            update(table(HealthCursor)).where(c.name == name, c.last_id == seen).values(last_id=last_id)
        )
        if moved.rowcount != 1:
            raise _Raced(name)

    # --------------------------------------------------------- telemetry --

    def _telemetry_batch(self) -> int:
        try:
            return self._sum_batch()
        except (_Raced, OperationalError) as exc:  # OperationalError: SQLite's stale snapshot after a race
            log.info("health: another job summed the same telemetry first (%s); this batch is dropped", exc)
            return 0

    def _sum_batch(self) -> int:
        tel = table(TelemetryRecord).c
        with self.engine.begin() as conn:
            after = self._cursor(conn, TELEMETRY_CURSOR)
            rows = conn.execute(
                select(
                    tel.id,
                    tel.device_id,
                    tel.received_at,
                    tel.model,
                    tel.model_version,
                    tel.variant,
                    tel.inference_count,
                    tel.inference_errors,
                    # only what is counted: a row serving no model is skipped below, its JSON not parsed
                    case((tel.model.is_not(None), tel.data["inference"]), else_=None).label("inference"),
                )
                .where(tel.id > after)
                .order_by(tel.id)
                .limit(self.batch)
            ).all()
            if not rows:
                return 0
            sums: dict[Key, Health] = defaultdict(Health)
            trouble: dict[str, tuple[datetime, str]] = {}
            for r in rows:
                if r.inference_errors:
                    n = r.inference_errors
                    trouble[r.device_id] = (
                        r.received_at,
                        f"{n} inference error{'s' if n != 1 else ''} in one report ({r.inference_count} ok)",
                    )
                if r.model is None or r.model_version is None:
                    continue  # serving nothing: no version to count it for
                inference = r.inference if isinstance(r.inference, dict) else None
                finest = RESOLUTIONS[0]
                key = (r.model, r.model_version, finest, bucket_start(r.received_at, finest), r.variant or "")
                sums[key].add_report(r.inference_count or 0, r.inference_errors or 0, inference)
            for (model, version, _, start_at, variant), minute in list(sums.items()):
                for resolution in RESOLUTIONS[1:]:  # the coarser buckets are sums of the finest
                    sums[(model, version, resolution, bucket_start(start_at, resolution), variant)].merge(minute)
            existing = self._existing(conn, list(sums))
            self._claim(conn, TELEMETRY_CURSOR, after, rows[-1].id)
            self._merge(conn, sums, existing)
            self._note_trouble(conn, trouble)
        return len(rows)

    @staticmethod
    def _existing(conn: Connection, keys: list[Key]) -> dict[Key, Any]:
        """The stored buckets among ``keys``."""
        h = table(HealthRollup)
        c = h.c
        existing: dict[Key, Any] = {}
        for start in range(0, len(keys), 200):  # bounded IN lists
            chunk = keys[start : start + 200]
            for found in conn.execute(
                select(h).where(tuple_(c.model, c.model_version, c.resolution_s, c.bucket_start, c.variant).in_(chunk))
            ):
                key = (found.model, found.model_version, found.resolution_s, found.bucket_start, found.variant)
                existing[key] = found
        return existing

    @staticmethod
    def _merge(conn: Connection, sums: dict[Key, Health], existing: dict[Key, Any]) -> None:
        """Add ``sums`` to the stored buckets (``existing``, read in the same transaction)."""
        h = table(HealthRollup)
        c = h.c
        new_rows: list[dict[str, Any]] = []
        for key, health in sums.items():
            row: Any = existing.get(key)
            if row is None:
                model, version, resolution, start_at, variant = key
                new_rows.append(
                    {
                        "model": model[:128],
                        "model_version": version,
                        "resolution_s": resolution,
                        "bucket_start": start_at,
                        "variant": variant[:64],
                        **health.columns(),
                    }
                )
                continue
            merged = Health.from_columns(row)
            merged.merge(health)
            conn.execute(update(h).where(c.id == row.id).values(**merged.columns()))
        if new_rows:
            conn.execute(insert(h), new_rows)

    # ------------------------------------------------------------ trouble --

    def _note_trouble(self, conn: Connection, trouble: dict[str, tuple[datetime, str]]) -> None:
        """Each device's latest trouble, one row per device (upsert on both dialects)."""
        if not trouble:
            return
        rows = [{"device_id": d, "last_error_at": at, "last_error": msg[:512]} for d, (at, msg) in trouble.items()]
        t = table(DeviceHealth)
        dialect_insert: Any = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(conn.dialect.name)
        if dialect_insert is None:  # pragma: no cover - the two supported databases have an upsert
            conn.execute(delete(t).where(t.c.device_id.in_(list(trouble))))
            conn.execute(insert(t), rows)
            return
        stmt = dialect_insert(t)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[t.c.device_id],
                set_={"last_error_at": stmt.excluded.last_error_at, "last_error": stmt.excluded.last_error},
            ),
            rows,
        )

    def _error_events(self) -> None:
        try:
            self._events_once()
        except (_Raced, OperationalError) as exc:
            log.info("health: another job read the same events first (%s)", exc)

    def _events_once(self) -> None:
        """Agent error events (a model that would not load, ...) since the last call."""
        e = table(DeviceEvent).c
        with self.engine.begin() as conn:
            after = self._cursor(conn, EVENTS_CURSOR)
            newest = conn.execute(select(func.max(e.id))).scalar()
            if newest is None or newest <= after:
                return
            rows = conn.execute(
                select(e.device_id, e.received_at, e.message)
                .where(e.id > after, e.id <= newest, e.type == "agent", e.kind == "error")
                .order_by(e.id)
            ).all()
            self._claim(conn, EVENTS_CURSOR, after, int(newest))
            self._note_trouble(conn, {r.device_id: (r.received_at, r.message or "agent error") for r in rows})

    # ---------------------------------------------------------- retention --

    def prune(self, now: datetime | None = None) -> int:
        """Delete buckets older than their resolution's keep time, and trouble older than a week."""
        now = now or utcnow()
        c = table(HealthRollup).c
        with self.engine.begin() as conn:
            removed = conn.execute(
                delete(table(HealthRollup)).where(
                    or_(*(and_(c.resolution_s == r, c.bucket_start < now - keep) for r, keep in KEEP.items()))
                )
            ).rowcount
            removed += conn.execute(
                delete(table(DeviceHealth)).where(table(DeviceHealth).c.last_error_at < now - timedelta(days=7))
            ).rowcount
        return int(removed or 0)
