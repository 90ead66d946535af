"""Fast bulk inserts for the ingest hot path: SQL compiled once, values converted once, one executemany.

SQLAlchemy's per-row parameter processing costs more than SQLite's insert
itself at telemetry rates, so the writer converts values the way each
dialect stores them and hands the driver plain tuples (or dicts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Table, insert


def _sqlite_datetime(epoch: float) -> str:
    # The format SQLAlchemy's SQLite DATETIME type writes and parses back.
    return datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def _native_datetime(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class BulkInsert:
    """``INSERT INTO table (columns...)`` for many rows of already converted values."""

    def __init__(self, engine: Engine, table: Table, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        stmt = insert(table).values({c: None for c in self.columns})
        sql = str(stmt.compile(dialect=engine.dialect))
        self.sql = sql.split(" RETURNING ")[0]
        self.positional = engine.dialect.paramstyle in ("qmark", "numeric", "format")
        sqlite = engine.dialect.name == "sqlite"
        #: converts seconds since the epoch to what this dialect's DateTime columns take
        self.datetime: Callable[[float], Any] = _sqlite_datetime if sqlite else _native_datetime

    def execute(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        """Insert ``rows``: tuples in the order of ``columns``."""
        if not rows:
            return
        if self.positional:
            conn.exec_driver_sql(self.sql, rows)
        else:
            cols = self.columns
            conn.exec_driver_sql(self.sql, [dict(zip(cols, r, strict=True)) for r in rows])
