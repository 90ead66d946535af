"""Secrets every replica must hold the same of, kept in the database (``shared_secret``).

The first replica to need one makes it (or adopts the one its data directory already holds, so an existing
install keeps the key its devices pin); ``INSERT ... ON CONFLICT DO NOTHING`` then a read back means two
replicas starting at once both end with the winner's.

With ``shared_secrets_key`` (a Fernet key, the same on every replica) the values are encrypted (Fernet:
AES-128-CBC with HMAC-SHA256, from ``cryptography``) before they reach the database, so a copy of the database
alone does not give away the signing key. Without it they are stored as they are (PEM): whoever may read the
controller's database may read them, as whoever may read its data directory could before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import Engine, insert, select
from sqlalchemy.dialects import postgresql, sqlite

from controller.db.models import SharedSecret, table
from controller.db.types import utcnow
from controller.errors import ControllerError

_SECRET = table(SharedSecret)
#: what an encrypted value starts with (then a Fernet token)
SEALED = b"fernet:"

#: the Ed25519 key manifests, grants and commands are signed with (PKCS#8 PEM)
SIGNING_KEY = "signing-key"
#: the controller's own device CA: key and certificate (PEM), when device_certificates is on
DEVICE_CA_KEY = "device-ca-key"
DEVICE_CA_CERT = "device-ca-cert"


class SharedSecrets:
    """The ``shared_secret`` table, encrypted with ``key`` when one is given."""

    def __init__(self, engine: Engine, key: str | None = None) -> None:
        self.engine = engine
        self._fernet = Fernet(key.encode()) if key else None

    def _seal(self, value: bytes) -> bytes:
        return SEALED + self._fernet.encrypt(value) if self._fernet is not None else value

    def _open(self, name: str, stored: bytes) -> bytes:
        if not stored.startswith(SEALED):
            return stored
        if self._fernet is None:
            raise ControllerError(
                f"the shared secret {name!r} in the database is encrypted: set shared_secrets_key (or"
                " SLMFLEET_SHARED_SECRETS_KEY) to the key the other replicas use"
            )
        try:
            return self._fernet.decrypt(stored[len(SEALED) :])
        except InvalidToken:
            raise ControllerError(
                f"shared_secrets_key does not decrypt the shared secret {name!r}: every replica needs the same key"
            ) from None

    def read(self, name: str) -> bytes | None:
        with self.engine.connect() as conn:
            value = conn.execute(select(_SECRET.c.value).where(_SECRET.c.name == name)).scalar()
        return self._open(name, bytes(value)) if value is not None else None

    def offer(self, values: dict[str, bytes]) -> dict[str, bytes]:
        """Store ``values`` (all of them, or none if the first name exists already); returns what the database
        holds for each name afterwards (another replica's when it was first)."""
        with self.engine.begin() as conn:
            dialect_insert: Any = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(conn.dialect.name)
            first, *_ = values
            now = utcnow()
            rows = [{"name": n, "value": self._seal(v), "created_at": now} for n, v in values.items()]
            if dialect_insert is None:  # pragma: no cover - the two supported databases have ON CONFLICT
                if conn.execute(select(_SECRET.c.name).where(_SECRET.c.name == first)).first() is None:
                    conn.execute(insert(_SECRET), rows)
            else:
                stmt = dialect_insert(_SECRET).values(rows[0]).on_conflict_do_nothing(index_elements=["name"])
                inserted = conn.execute(stmt.returning(_SECRET.c.name)).first() is not None
                if inserted and rows[1:]:
                    conn.execute(insert(_SECRET), rows[1:])
        held = {n: self.read(n) for n in values}
        return {n: v for n, v in held.items() if v is not None}

    def get_or_make(self, name: str, make: Callable[[], bytes]) -> bytes:
        """The shared secret ``name``; made with ``make`` (and stored) when no replica has made it yet."""
        found = self.read(name)
        if found is not None:
            return found
        return self.offer({name: make()})[name]
