"""Leases on both databases: taking, renewing, expiry by the database's clock, fencing tokens, and the keeper."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlmodel import Session, select

from controller.cluster import leases, replicas
from controller.cluster.keeper import LeaseKeeper, SoleOwner
from controller.cluster.leases import StaleLease
from controller.db.engine import migrate
from controller.db.models import AuditEntry
from tests.postgres import DIALECTS, migrated_engine


@pytest.fixture(params=DIALECTS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    with migrated_engine(request.param, tmp_path, "slmfleet_leases") as engine:
        yield engine


def expire(engine: Engine, name: str) -> None:
    """Move a lease's expiry into the past (as if its TTL went by), on the database's own clock."""
    with engine.begin() as conn:
        conn.execute(
            text(f"UPDATE cluster_lease SET expires_at = {leases.now_sql(engine)} - 1 WHERE name = :n"), {"n": name}
        )


def test_first_acquisition_gets_token_one_and_others_are_refused(db: Engine) -> None:
    got = leases.acquire(db, "rollout:r1", "A", 30)
    assert got is not None and got.token == 1 and got.previous is None
    assert leases.acquire(db, "rollout:r1", "B", 30) is None
    again = leases.acquire(db, "rollout:r1", "A", 30)  # mine: a renewal, same token
    assert again is not None and again.token == 1
    (row,) = leases.all_leases(db, "rollout:")
    assert row.holder == "A" and row.token == 1 and row.live and 29 < row.expires_at - row.now <= 30


def test_expired_lease_is_taken_with_the_next_token(db: Engine) -> None:
    assert leases.acquire(db, "job:sweep", "A", 30) is not None
    expire(db, "job:sweep")
    got = leases.acquire(db, "job:sweep", "B", 30)
    assert got is not None and got.token == 2 and got.previous == "A" and got.previous_token == 1
    expire(db, "job:sweep")
    back = leases.acquire(db, "job:sweep", "A", 30)
    assert back is not None and back.token == 3 and back.previous == "B"


def test_expiry_follows_the_database_clock(db: Engine) -> None:
    assert leases.acquire(db, "job:x", "A", 0.3) is not None
    assert leases.acquire(db, "job:x", "B", 30) is None
    with db.connect() as conn:  # wait on the database's clock, not ours
        start = leases.db_now(conn)
        deadline = start + 10
        while leases.db_now(conn) < start + 0.35 and leases.db_now(conn) < deadline:
            conn.execute(text("SELECT 1"))
    got = leases.acquire(db, "job:x", "B", 30)
    assert got is not None and got.token == 2


def test_renew_by_the_holder_only_and_not_after_a_takeover(db: Engine) -> None:
    got = leases.acquire(db, "deployment:d", "A", 30)
    assert got is not None
    assert leases.renew(db, "deployment:d", "A", got.token, 30)
    assert not leases.renew(db, "deployment:d", "B", got.token, 30)  # not the holder
    assert not leases.renew(db, "deployment:d", "A", got.token + 1, 30)  # not its token
    expire(db, "deployment:d")
    assert not leases.renew(db, "deployment:d", "A", got.token, 30)  # expired: gone, even if nobody took it
    taken = leases.acquire(db, "deployment:d", "B", 30)
    assert taken is not None and taken.token == got.token + 1
    assert not leases.renew(db, "deployment:d", "A", got.token, 30)


def test_release_lets_another_take_at_once(db: Engine) -> None:
    got = leases.acquire(db, "rollout:r", "A", 30)
    assert got is not None
    assert not leases.release(db, "rollout:r", "B", got.token)
    assert leases.release(db, "rollout:r", "A", got.token)
    taken = leases.acquire(db, "rollout:r", "B", 30)
    assert taken is not None and taken.token == 2 and taken.previous is None  # released: a handover, not a takeover


def test_fence_refuses_a_stale_token_inside_the_write_transaction(db: Engine) -> None:
    got = leases.acquire(db, "rollout:r", "A", 30)
    assert got is not None
    with db.begin() as conn:
        leases.fence(conn, "rollout:r", "A", got.token)  # current: passes
    expire(db, "rollout:r")
    assert leases.acquire(db, "rollout:r", "B", 30) is not None
    with pytest.raises(StaleLease, match="stale"), db.begin() as conn:
        leases.fence(conn, "rollout:r", "A", got.token)
    with pytest.raises(StaleLease), db.begin() as conn:
        leases.fence(conn, "rollout:never", "A", 1)


def test_keeper_renews_audits_a_takeover_and_stops_driving_past_its_deadline(db: Engine) -> None:
    now = [1000.0]
    a = LeaseKeeper(db, "A", 6.0, clock=lambda: now[0])
    b = LeaseKeeper(db, "B", 6.0, clock=lambda: now[0])
    a.start()
    b.start()
    try:
        assert a.drive("rollout:r") == 1
        assert b.drive("rollout:r") is None
        now[0] += 3.0
        a.renew_all()  # renewed: its deadline moves on
        now[0] += 3.0
        assert a.holds("rollout:r") == 1
        # A cannot renew any more (as if cut off): past ttl - margin it stops driving on its own
        now[0] += 6.0
        assert a.holds("rollout:r") is None
        expire(db, "rollout:r")
        assert b.drive("rollout:r") == 2
        with Session(db) as session:
            entry = session.exec(select(AuditEntry).where(AuditEntry.action == "cluster.takeover")).one()
        assert entry.detail["from"] == "A" and entry.detail["to"] == "B" and entry.detail["token"] == 2
        assert "replica B took rollout" in entry.detail["message"]
        with pytest.raises(StaleLease), db.begin() as conn:
            a.fence(conn, "rollout:r")
        with db.begin() as conn:
            b.fence(conn, "rollout:r")
        assert {r.id for r in replicas.all_replicas(db)} == {"A", "B"}
    finally:
        a.stop()
        b.stop()
    assert replicas.all_replicas(db) == []
    assert all(not row.live for row in leases.all_leases(db))


def test_fair_share_leaves_work_to_other_live_replicas(db: Engine) -> None:
    a = LeaseKeeper(db, "A", 30.0)
    b = LeaseKeeper(db, "B", 30.0)
    a.start()
    b.start()
    try:
        a.renew_all()  # counts the live replicas: 2
        taken = [n for n in ("rollout:1", "rollout:2", "rollout:3", "rollout:4") if a.drive(n, ("rollout", 4))]
        assert taken == ["rollout:1", "rollout:2"]
        assert [n for n in ("rollout:3", "rollout:4") if b.drive(n, ("rollout", 4))] == ["rollout:3", "rollout:4"]
    finally:
        a.stop()
        b.stop()


def test_sole_owner_drives_everything_without_the_database() -> None:
    owner = SoleOwner()
    assert owner.drive("rollout:x") == 0 and owner.holds("job:y") == 0 and owner.held() == {}


def test_a_schema_newer_than_this_version_is_left_alone(db: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """A rolling upgrade: a newer replica migrated the database; an older one (re)started then runs on it."""
    with db.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    migrate(db)  # no "Can't locate revision": a warning, and the schema is not touched
    assert "newer than this controller knows" in caplog.text
    with db.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "9999_from_the_future"
    assert leases.acquire(db, "job:x", "old-replica", 30) is not None
