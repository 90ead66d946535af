"""The secrets replicas share through the database (``controller/db/secrets.py``): the manifest signing key and
the controller's own device CA, on SQLite and PostgreSQL. The first replica makes them (or adopts its data
directory's), the others get the same; a data directory holding other ones is refused with what to do."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import Engine, select

from controller.db import secrets
from controller.db.models import SharedSecret, table
from controller.db.secrets import SEALED, SharedSecrets
from controller.errors import ControllerError, SettingsError
from controller.pki.authority import Authority, PkiError
from controller.registry import keys
from controller.settings import load_settings
from tests.postgres import DIALECTS, migrated_engine


@pytest.fixture(params=DIALECTS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    with migrated_engine(request.param, tmp_path, "slmfleet_secrets") as engine:
        yield engine


def test_replicas_starting_at_once_all_sign_with_one_key(db: Engine, tmp_path: Path) -> None:
    start = threading.Barrier(4)
    found: list[str] = []

    def replica(i: int) -> None:
        start.wait(10)
        found.append(keys.load_shared(SharedSecrets(db), tmp_path / f"replica-{i}" / "keys").key_id)

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(found) == 4 and len(set(found)) == 1, found
    assert not (tmp_path / "replica-0" / "keys" / keys.KEY_FILE).exists(), "the secret stays in the database"


def test_an_existing_install_keeps_the_key_its_devices_pin_and_another_key_is_refused(
    db: Engine, tmp_path: Path
) -> None:
    existing = keys.load_or_create(tmp_path / "first" / "keys")  # a single controller before going multi-replica
    shared = SharedSecrets(db)
    assert keys.load_shared(shared, tmp_path / "first" / "keys").key_id == existing.key_id
    assert keys.load_shared(shared, tmp_path / "second" / "keys").key_id == existing.key_id
    keys.load_or_create(tmp_path / "stray" / "keys")  # a replica once started on its own
    with pytest.raises(ControllerError, match="another signing key than the one the replicas share"):
        keys.load_shared(shared, tmp_path / "stray" / "keys")


def test_the_device_ca_is_shared_and_written_where_the_broker_reads_it(db: Engine, tmp_path: Path) -> None:
    shared = SharedSecrets(db)
    a = Authority.load_or_create_shared(shared, tmp_path / "a" / "pki")
    b = Authority.load_or_create_shared(shared, tmp_path / "b" / "pki")
    assert a.cert_pem == b.cert_pem
    assert (tmp_path / "b" / "pki" / "device-ca.pem").read_text() == a.cert_pem
    assert shared.read(secrets.DEVICE_CA_CERT) == a.cert_pem.encode()
    Authority.load_or_create(tmp_path / "stray" / "pki")
    with pytest.raises(PkiError, match="another device CA"):
        Authority.load_or_create_shared(shared, tmp_path / "stray" / "pki")


def test_with_a_shared_secrets_key_the_database_holds_only_ciphertext(db: Engine, tmp_path: Path) -> None:
    fernet_key = Fernet.generate_key().decode()
    key = keys.load_shared(SharedSecrets(db, fernet_key), tmp_path / "a" / "keys")
    with db.connect() as conn:
        stored = conn.execute(select(table(SharedSecret).c.value)).scalar_one()
    assert stored.startswith(SEALED) and b"PRIVATE KEY" not in stored
    assert keys.load_shared(SharedSecrets(db, fernet_key), tmp_path / "b" / "keys").key_id == key.key_id
    with pytest.raises(ControllerError, match="is encrypted: set shared_secrets_key"):
        keys.load_shared(SharedSecrets(db), tmp_path / "c" / "keys")
    with pytest.raises(ControllerError, match="does not decrypt"):
        keys.load_shared(SharedSecrets(db, Fernet.generate_key().decode()), tmp_path / "d" / "keys")
    with pytest.raises(SettingsError, match="shared_secrets_key must be a Fernet key"):
        load_settings(data_dir=tmp_path, shared_secrets_key="not-a-key")
    assert load_settings(data_dir=tmp_path, shared_secrets_key=fernet_key).shared_secrets_key == fernet_key
