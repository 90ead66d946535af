"""Secrets every replica must hold the same of, kept in the database (``shared_secret``).

The first replica to need one makes it (or adopts the one its data directory already holds, so an existing
install keeps the key its devices pin); ``INSERT ... ON CONFLICT DO NOTHING`` then a read back means two
replicas starting at once both end with the winner's. They are stored as they are (PEM, unencrypted): whoever
may read the controller's database may read them, as whoever may read its data directory could before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, insert, select
from sqlalchemy.dialects import postgresql, sqlite

from controller.db.models import SharedSecret, table
from controller.db.types import utcnow

_SECRET = table(SharedSecret)

#: the Ed25519 key manifests, grants and commands are signed with (PKCS#8 PEM)
SIGNING_KEY = "signing-key"
#: the controller's own device CA: key and certificate (PEM), when device_certificates is on
DEVICE_CA_KEY = "device-ca-key"
DEVICE_CA_CERT = "device-ca-cert"


def read(engine: Engine, name: str) -> bytes | None:
    with engine.connect() as conn:
        value = conn.execute(select(_SECRET.c.value).where(_SECRET.c.name == name)).scalar()
    return bytes(value) if value is not None else None


def offer(engine: Engine, values: dict[str, bytes]) -> dict[str, bytes]:
    """Store ``values`` (all of them, or none if the first name exists already); returns what the database holds
    for each name afterwards (another replica's when it was first)."""
    with engine.begin() as conn:
        dialect_insert: Any = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(conn.dialect.name)
        first, *_ = values
        now = utcnow()
        rows = [{"name": n, "value": v, "created_at": now} for n, v in values.items()]
        if dialect_insert is None:  # pragma: no cover - the two supported databases have ON CONFLICT
            if conn.execute(select(_SECRET.c.name).where(_SECRET.c.name == first)).first() is None:
                conn.execute(insert(_SECRET), rows)
        else:
            stmt = dialect_insert(_SECRET).values(rows[0]).on_conflict_do_nothing(index_elements=["name"])
            inserted = conn.execute(stmt.returning(_SECRET.c.name)).first() is not None
            if inserted and rows[1:]:
                conn.execute(insert(_SECRET), rows[1:])
    held = {n: read(engine, n) for n in values}
    return {n: v for n, v in held.items() if v is not None}


def get_or_make(engine: Engine, name: str, make: Callable[[], bytes]) -> bytes:
    """The shared secret ``name``; made with ``make`` (and stored) when no replica has made it yet."""
    found = read(engine, name)
    if found is not None:
        return found
    return offer(engine, {name: make()})[name]
