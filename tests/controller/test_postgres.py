"""The same controller on PostgreSQL. Uses $SLMFLEET_TEST_POSTGRES (default: the local server on
127.0.0.1:5432 as user postgres) and creates a database of its own; skipped, with the reason, when no
server answers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.controller import devices_util as du
from tests.helpers import RawMqtt, wait_until
from tests.postgres import own_database

pytestmark = pytest.mark.postgres


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with own_database() as url:
        yield url


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
