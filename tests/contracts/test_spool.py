"""The ``Spool`` protocol (agent/core/outbox.py) against every implementation: ``MemorySpool`` (virtual
fleets) and ``SqliteSpool`` (devices). Order, removal on ack, the bound and what it spares; the SQLite spool
also promises that its entries and its drop count survive a reopen (a crash or a power loss)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.core.outbox import Spool
from agent.telemetry.spool import MemorySpool, SqliteSpool

MakeSpool = Callable[..., Spool]


@pytest.fixture(params=["memory", "sqlite"])
def make_spool(request: pytest.FixtureRequest, tmp_path: Path) -> MakeSpool:
    """A factory: ``make_spool(**bounds)``; each call on the SQLite side reopens the same file."""
    if request.param == "memory":
        return lambda **bounds: MemorySpool(**bounds)
    return lambda **bounds: SqliteSpool(tmp_path / "spool.sqlite3", **bounds)


def test_entries_come_back_in_the_order_they_were_appended(make_spool: MakeSpool) -> None:
    spool = make_spool()
    ids = [spool.append(f"t/{i}", bytes([i]) * 3, 1, i % 2 == 0) for i in range(6)]
    assert ids == sorted(ids) and len(set(ids)) == 6
    got = spool.after(0, 100)
    assert [e.topic for e in got] == [f"t/{i}" for i in range(6)]
    assert [(e.payload, e.qos, e.retain) for e in got[:2]] == [(b"\x00" * 3, 1, True), (b"\x01" * 3, 1, False)]
    assert [e.id for e in spool.after(ids[2], 2)] == ids[3:5], "after() starts past last_id and stops at limit"
    assert len(spool) == 6


def test_a_removed_entry_is_gone_and_removing_it_twice_is_harmless(make_spool: MakeSpool) -> None:
    spool = make_spool()
    ids = [spool.append("t", b"x", 1, False) for _ in range(3)]
    spool.remove(ids[1])
    spool.remove(ids[1])
    spool.remove(10_000)
    assert [e.id for e in spool.after(0, 10)] == [ids[0], ids[2]] and len(spool) == 2


def test_ids_keep_growing_after_removals(make_spool: MakeSpool) -> None:
    spool = make_spool()
    first = spool.append("t", b"a", 1, False)
    spool.remove(first)
    assert spool.append("t", b"b", 1, False) > first, "an id is never reused: the outbox resumes after the last"


def test_over_the_count_bound_the_oldest_go_first_and_are_counted(make_spool: MakeSpool) -> None:
    spool = make_spool(max_messages=3)
    ids = [spool.append("t", bytes([i]), 1, False) for i in range(5)]
    assert [e.id for e in spool.after(0, 10)] == ids[2:] and spool.dropped == 2


def test_over_the_byte_bound_the_oldest_go_first(make_spool: MakeSpool) -> None:
    spool = make_spool(max_bytes=10)
    ids = [spool.append("t", b"abcd", 1, False) for _ in range(4)]
    assert [e.id for e in spool.after(0, 10)] == ids[2:] and spool.dropped == 2


def test_entries_in_flight_are_spared_by_the_bound(make_spool: MakeSpool) -> None:
    spool = make_spool(max_messages=2)
    a = spool.append("t", b"a", 1, False)
    b = spool.append("t", b"b", 1, False)
    c = spool.append("t", b"c", 1, False, keep=[a])
    assert [e.id for e in spool.after(0, 10)] == [a, c] and spool.dropped == 1 and b not in (a, c)
    # all older entries in flight: the new one is the oldest that may go (messages in flight never do)
    spool.append("t", b"d", 1, False, keep=[a, c])
    assert [e.id for e in spool.after(0, 10)] == [a, c] and spool.dropped == 2


def test_the_sqlite_spool_keeps_entries_and_the_drop_count_across_a_reopen(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "s.db", max_messages=2)
    ids = [spool.append("t", bytes([i]), 1, False) for i in range(3)]
    spool.remove(ids[1])
    spool.close()  # what a restart does; a power loss is covered by synchronous=FULL
    again = SqliteSpool(tmp_path / "s.db", max_messages=2)
    assert [e.id for e in again.after(0, 10)] == [ids[2]] and len(again) == 1 and again.dropped == 1
    assert again.append("t", b"new", 1, False) > ids[2]


def test_a_failed_append_leaves_the_sqlite_spool_as_it_was(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "s.db")
    kept = spool.append("t", b"ok", 1, False)
    with pytest.raises(sqlite3.ProgrammingError):
        spool.append("t", b"bad", object(), False)  # type: ignore[arg-type]  # no SQLite type: the insert fails
    assert [e.id for e in spool.after(0, 10)] == [kept]
    assert spool.append("t", b"ok2", 1, False) > kept, "the transaction was rolled back, the spool still writes"
