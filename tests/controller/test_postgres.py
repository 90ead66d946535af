"""The same controller on PostgreSQL. Uses $SLMFLEET_TEST_POSTGRES (default: the local server on
127.0.0.1:5432 as user postgres) and creates a database of its own; skipped, with the reason, when no
server answers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.controller import devices_util as du
from tests.helpers import RawMqtt, wait_until

pytestmark = pytest.mark.postgres

ADMIN_URL = os.environ.get("SLMFLEET_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    try:
        admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        pytest.skip(f"no PostgreSQL at {ADMIN_URL} ({type(exc).__name__}); set SLMFLEET_TEST_POSTGRES to run this")
    name = f"slmfleet_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_controller_on_postgresql(postgres_url: str, private_broker, make_controller) -> None:  # type: ignore[no-untyped-def]
    ctl = make_controller(private_broker, database_url=postgres_url)
    assert ctl.runtime.engine.dialect.name == "postgresql"
    raw = RawMqtt(private_broker.port, "pg-sim")
    try:
        raw.publish(*du.birth("pg-1", labels={"site": "oslo"}))
        raw.publish(*du.birth("pg-2"))
        for seq in range(20):
            raw.publish(*du.telemetry("pg-1", seq))
        wait_until(lambda: len(ctl.client.get("/api/v1/devices/pg-1/telemetry").json()) == 20, 15)
        page = ctl.client.get("/api/v1/devices", params={"selector": "site=oslo"}).json()
        assert [d["id"] for d in page["items"]] == ["pg-1"]
        r = ctl.client.patch("/api/v1/devices/pg-2", json={"labels": {"site": "rome"}}, headers=ctl.auth)
        assert r.status_code == 200 and r.json()["labels"] == {"site": "rome"}
        raw.publish(*du.offline("pg-2"))
        wait_until(lambda: ctl.client.get("/api/v1/devices/pg-2").json()["status"] == "offline", 10)
    finally:
        raw.close()
