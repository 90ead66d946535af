"""Fast bulk inserts for the ingest hot path: SQL compiled once, values converted once, one statement.

SQLAlchemy's per-row parameter processing costs more than SQLite's insert
itself at telemetry rates, so the writer converts values the way each
dialect stores them and hands the driver plain tuples: one executemany on
SQLite, one ``COPY ... FROM STDIN`` on PostgreSQL through psycopg (its rows
are encoded in C and the server parses no statement per row; an
executemany there cost the writer about three times as much CPU per row).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Table, insert

#: "YYYY-MM-DD HH:MM:SS" by whole second since the epoch (a batch's rows fall in a few seconds)
_SECONDS: dict[int, str] = {}


def _sqlite_datetime(epoch: float) -> str:
    """The format SQLAlchemy's SQLite DATETIME type writes and parses back, as
    ``datetime.fromtimestamp(epoch, UTC).isoformat(" ", "microseconds")`` without the timezone gives it (the
    same rounding: half to even, on the fraction as ``fromtimestamp`` splits it), the seconds' text cached:
    a third of the CPU."""
    frac, whole = math.modf(epoch)
    micros = round(frac * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1.0, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1.0, micros + 1_000_000
    second = int(whole)
    text = _SECONDS.get(second)
    if text is None:
        if len(_SECONDS) >= 4096:
            _SECONDS.clear()
        text = _SECONDS[second] = datetime.fromtimestamp(second, UTC).replace(tzinfo=None).isoformat(" ")
    return f"{text}.{micros:06d}"


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
        preparer = engine.dialect.identifier_preparer
        #: ``COPY`` on PostgreSQL with psycopg (3); None elsewhere
        self.copy_sql: str | None = None
        if engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg":
            names = ", ".join(preparer.quote(c) for c in self.columns)
            self.copy_sql = f"COPY {preparer.format_table(table)} ({names}) FROM STDIN"
        sqlite = engine.dialect.name == "sqlite"
        #: converts seconds since the epoch to what this dialect's DateTime columns take
        self.datetime: Callable[[float], Any] = _sqlite_datetime if sqlite else _native_datetime

    def execute(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        """Insert ``rows``: tuples in the order of ``columns``."""
        if not rows:
            return
        if self.copy_sql is not None:
            # the connection's own transaction: the rows commit (or roll back) with the rest of the batch
            with conn.connection.driver_connection.cursor() as cur, cur.copy(self.copy_sql) as copy:  # type: ignore[union-attr]
                for row in rows:
                    copy.write_row(row)
            return
        if self.positional:
            conn.exec_driver_sql(self.sql, rows)
        else:
            cols = self.columns
            conn.exec_driver_sql(self.sql, [dict(zip(cols, r, strict=True)) for r in rows])
