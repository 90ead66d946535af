"""Spools for the outbox: SQLite on disk for devices, a list in memory for virtual fleets."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Collection

from agent.core.outbox import SpoolEntry


class MemorySpool:
    """A bounded in-memory spool (lost on restart); the simulator's choice."""

    def __init__(self, max_messages: int = 10_000, max_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, SpoolEntry] = OrderedDict()
        self._bytes = 0
        self._next = 1
        self.dropped = 0

    def append(self, topic: str, payload: bytes, qos: int, retain: bool, keep: Collection[int] = ()) -> int:
        entry = SpoolEntry(self._next, topic, payload, qos, retain)
        self._next += 1
        self._entries[entry.id] = entry
        self._bytes += len(payload)
        spared = set(keep)
        while len(self._entries) > self.max_messages or self._bytes > self.max_bytes:
            victim = next((i for i in self._entries if i not in spared), None)
            if victim is None:
                break
            old = self._entries.pop(victim)
            self._bytes -= len(old.payload)
            self.dropped += 1
        return entry.id

    def after(self, last_id: int, limit: int) -> list[SpoolEntry]:
        out = []
        for entry_id, entry in self._entries.items():
            if entry_id > last_id:
                out.append(entry)
                if len(out) >= limit:
                    break
        return out

    def remove(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id, None)
        if entry is not None:
            self._bytes -= len(entry.payload)

    def __len__(self) -> int:
        return len(self._entries)


class SqliteSpool:
    """A bounded spool in an SQLite file, synced on every write so a power loss keeps it.

    The bound is on count and on payload bytes; the oldest entries go first (except those the
    caller asks to ``keep``: messages in flight) and are counted in ``dropped``, which is itself
    persisted.
    """

    def __init__(
        self, path: str | os.PathLike[str], max_messages: int = 10_000, max_bytes: int = 16 * 1024 * 1024
    ) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
            " payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        row = self._db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()
        self.dropped = int(row[0]) if row else 0
        count, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM spool").fetchone()
        self._count, self._bytes = int(count), int(size)

    def append(self, topic: str, payload: bytes, qos: int, retain: bool, keep: Collection[int] = ()) -> int:
        spared = sorted(int(i) for i in keep)
        oldest = "SELECT id, LENGTH(payload) FROM spool"
        if spared:
            oldest += f" WHERE id NOT IN ({','.join('?' * len(spared))})"
        oldest += " ORDER BY id LIMIT 1"
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "INSERT INTO spool (topic, payload, qos, retain) VALUES (?, ?, ?, ?)",
                    (topic, payload, qos, int(retain)),
                )
                self._count += 1
                self._bytes += len(payload)
                dropped = 0
                while self._count > self.max_messages or self._bytes > self.max_bytes:
                    old = self._db.execute(oldest, spared).fetchone()
                    if old is None:
                        break
                    self._db.execute("DELETE FROM spool WHERE id=?", (old[0],))
                    self._count -= 1
                    self._bytes -= int(old[1])
                    dropped += 1
                if dropped:
                    self.dropped += dropped
                    self._db.execute(
                        "INSERT INTO meta (key, value) VALUES ('dropped', ?)"
                        " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                        (self.dropped,),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return int(cur.lastrowid or 0)

    def after(self, last_id: int, limit: int) -> list[SpoolEntry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain FROM spool WHERE id > ? ORDER BY id LIMIT ?",
                (last_id, limit),
            ).fetchall()
        return [SpoolEntry(int(r[0]), r[1], bytes(r[2]), int(r[3]), bool(r[4])) for r in rows]

    def remove(self, entry_id: int) -> None:
        with self._lock:
            cur = self._db.execute("DELETE FROM spool WHERE id=? RETURNING LENGTH(payload)", (entry_id,))
            row = cur.fetchone()
            if row is not None:
                self._count -= 1
                self._bytes -= int(row[0])

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        with self._lock:
            self._db.close()
