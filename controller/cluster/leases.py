"""Leases in the database: one row per driven thing (``rollout:<id>``, ``deployment:<id>``, ``job:<id>``).

Every statement here is one atomic INSERT/UPDATE that reads the time from the DATABASE's clock, so the
replicas' own clocks never matter; the same SQL runs on SQLite (3.35+: upsert and RETURNING) and PostgreSQL.
A lease is taken when it is free, expired or already mine; each new acquisition increments its fencing
``token``; a holder's writes are fenced by checking, in their own transaction, that the token is still the
lease's (``fence``: on PostgreSQL the lease row is locked until that transaction ends, so a takeover waits
for the write to commit and then sees it).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text

#: the database's clock in epoch seconds
NOW = {
    "postgresql": "EXTRACT(EPOCH FROM clock_timestamp())",
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
}


class StaleLease(Exception):
    """A write refused: the writer's lease was taken over (its token is no longer the lease's)."""


@dataclass(frozen=True)
class LeaseRow:
    name: str
    holder: str
    token: int
    expires_at: float
    acquired_at: float
    #: the database's clock when it was read
    now: float

    @property
    def live(self) -> bool:
        return self.expires_at > self.now

    @property
    def kind(self) -> str:
        return self.name.split(":", 1)[0]


@dataclass(frozen=True)
class Acquired:
    token: int
    #: the holder before, when it was another replica (a takeover); None for a fresh or own lease
    previous: str | None
    previous_token: int | None


def now_sql(bind: Engine | Connection) -> str:
    return NOW["postgresql" if bind.dialect.name == "postgresql" else "sqlite"]


def db_now(conn: Connection) -> float:
    return float(conn.execute(text(f"SELECT {now_sql(conn)}")).scalar_one())


def acquire(engine: Engine, name: str, me: str, ttl_s: float) -> Acquired | None:
    """Take ``name`` for ``ttl_s`` if it is free, expired or mine (a renewal then); None when another holds it."""
    now = now_sql(engine)
    with engine.begin() as conn:
        before = conn.execute(
            text("SELECT holder, token, expires_at FROM cluster_lease WHERE name = :name"), {"name": name}
        ).first()
        row = conn.execute(
            text(
                "INSERT INTO cluster_lease (name, holder, token, expires_at, acquired_at)"
                f" VALUES (:name, :me, 1, {now} + :ttl, {now})"
                " ON CONFLICT (name) DO UPDATE SET"
                f" token = CASE WHEN cluster_lease.holder = :me AND cluster_lease.expires_at > {now}"
                " THEN cluster_lease.token ELSE cluster_lease.token + 1 END,"
                f" acquired_at = CASE WHEN cluster_lease.holder = :me AND cluster_lease.expires_at > {now}"
                f" THEN cluster_lease.acquired_at ELSE {now} END,"
                f" holder = :me, expires_at = {now} + :ttl"
                f" WHERE cluster_lease.holder = :me OR cluster_lease.expires_at <= {now}"
                " RETURNING token"
            ),
            {"name": name, "me": me, "ttl": ttl_s},
        ).first()
    if row is None:
        return None
    token = int(row[0])
    if before is not None and before[0] != me and float(before[2]) > 0:  # 0: released, not taken over
        return Acquired(token, str(before[0]), int(before[1]))
    return Acquired(token, None, None)


def renew(engine: Engine, name: str, me: str, token: int, ttl_s: float) -> bool:
    """Extend my lease by ``ttl_s`` from now; False when it expired or is no longer mine with this token."""
    now = now_sql(engine)
    with engine.begin() as conn:
        result = conn.execute(
            text(
                f"UPDATE cluster_lease SET expires_at = {now} + :ttl"
                f" WHERE name = :name AND holder = :me AND token = :token AND expires_at > {now}"
            ),
            {"name": name, "me": me, "token": token, "ttl": ttl_s},
        )
        return result.rowcount == 1


def release(engine: Engine, name: str, me: str, token: int) -> bool:
    """Give a lease up at once (it stays recorded with its holder and token, expired)."""
    with engine.begin() as conn:
        result = conn.execute(
            text("UPDATE cluster_lease SET expires_at = 0 WHERE name = :name AND holder = :me AND token = :token"),
            {"name": name, "me": me, "token": token},
        )
        return result.rowcount == 1


def fence(conn: Connection, name: str, me: str, token: int) -> None:
    """Raise ``StaleLease`` unless ``token`` is still my lease's, inside the caller's transaction (PostgreSQL:
    the lease row stays locked until it ends, so no takeover slips between this check and the write)."""
    lock = " FOR UPDATE" if conn.dialect.name == "postgresql" else ""
    current = conn.execute(
        text(f"SELECT holder, token FROM cluster_lease WHERE name = :name{lock}"), {"name": name}
    ).first()
    if current is None or current[0] != me or int(current[1]) != token:
        holder = f"{current[0]} (token {current[1]})" if current is not None else "nobody"
        raise StaleLease(f"{name}: my token {token} is stale; the lease is {holder}'s")


def all_leases(engine: Engine, prefix: str = "") -> list[LeaseRow]:
    with engine.connect() as conn:
        now = db_now(conn)
        rows = conn.execute(
            text(
                "SELECT name, holder, token, expires_at, acquired_at FROM cluster_lease"
                " WHERE name LIKE :prefix ORDER BY name"
            ),
            {"prefix": prefix + "%"},
        ).all()
    return [LeaseRow(r[0], r[1], int(r[2]), float(r[3]), float(r[4]), now) for r in rows]
