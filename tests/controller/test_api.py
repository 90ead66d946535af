"""REST API: auth, validation, filters, pagination."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from sqlmodel import Session, select

from controller.auth.tokens import Role
from controller.db.models import AuditEntry
from tests.controller import devices_util as du
from tests.helpers import RawMqtt, wait_until


@pytest.fixture
def fleet(controller):  # type: ignore[no-untyped-def]
    """Twelve devices with labels; dev-00..03 offline."""
    raw = RawMqtt(controller.broker.port, "fleet-sim")
    for i in range(12):
        labels = {"site": "berlin" if i % 2 else "paris", "tier": "canary" if i < 3 else "main"}
        raw.publish(*du.birth(f"dev-{i:02d}", labels=labels))
    for i in range(4):
        raw.publish(*du.offline(f"dev-{i:02d}"))
    wait_until(lambda: controller.client.get("/api/v1/devices", params={"status": "offline"}).json()["total"] == 4, 10)
    yield controller
    raw.close()


def test_health_reports_database_and_broker(controller) -> None:  # type: ignore[no-untyped-def]
    body = controller.client.get("/api/v1/health").json()
    assert body["status"] == "ok" and body["database"] == "ok" and body["broker"]["connected"] is True


def test_list_filters_and_paginates(fleet) -> None:  # type: ignore[no-untyped-def]
    c = fleet.client
    page = c.get("/api/v1/devices", params={"limit": 5, "offset": 5}).json()
    assert page["total"] == 12 and [d["id"] for d in page["items"]] == [f"dev-{i:02d}" for i in range(5, 10)]
    online = c.get("/api/v1/devices", params={"status": "online"}).json()
    assert online["total"] == 8 and all(d["status"] == "online" for d in online["items"])
    berlin_main = c.get("/api/v1/devices", params={"selector": "site=berlin,tier!=canary"}).json()
    assert [d["id"] for d in berlin_main["items"]] == ["dev-03", "dev-05", "dev-07", "dev-09", "dev-11"]
    by_label = c.get("/api/v1/devices", params=[("label", "site=paris"), ("label", "tier=canary")]).json()
    assert [d["id"] for d in by_label["items"]] == ["dev-00", "dev-02"]
    assert c.get("/api/v1/devices", params={"q": "dev-1"}).json()["total"] == 2
    paged = c.get("/api/v1/devices", params={"selector": "site=berlin", "limit": 2, "offset": 4}).json()
    assert paged["total"] == 6 and [d["id"] for d in paged["items"]] == ["dev-09", "dev-11"]


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"status": "sleeping"}, "status"),
        ({"limit": 0}, "limit"),
        ({"limit": 5000}, "limit"),
        ({"selector": "a=b=c"}, "selector term"),
        ({"label": "nonsense"}, "KEY=VALUE"),
    ],
)
def test_bad_queries_get_422_saying_what_is_wrong(fleet, params: dict, needle: str) -> None:  # type: ignore[no-untyped-def]
    r = fleet.client.get("/api/v1/devices", params=params)
    assert r.status_code == 422
    assert needle in r.text


def test_writes_need_a_token_with_the_right_role(fleet) -> None:  # type: ignore[no-untyped-def]
    c = fleet.client
    body = {"labels": {"zone": "a"}}
    r = c.patch("/api/v1/devices/dev-05", json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert (
        c.patch("/api/v1/devices/dev-05", json=body, headers={"Authorization": "Bearer slmf_nope"}).status_code == 401
    )
    assert c.patch("/api/v1/devices/dev-05", json=body, headers={"Authorization": "Basic abc"}).status_code == 401
    viewer = {"Authorization": f"Bearer {fleet.token_for(Role.VIEWER)}"}
    r = c.patch("/api/v1/devices/dev-05", json=body, headers=viewer)
    assert r.status_code == 403 and "operator" in r.json()["detail"]
    assert c.delete("/api/v1/devices/dev-05").status_code == 401
    operator = {"Authorization": f"Bearer {fleet.token_for(Role.OPERATOR, 'alice')}"}
    r = c.patch("/api/v1/devices/dev-05", json=body, headers=operator)
    assert r.status_code == 200 and r.json()["labels"]["zone"] == "a"
    with Session(fleet.runtime.engine) as s:
        entry = s.exec(select(AuditEntry).where(AuditEntry.target == "dev-05")).one()
    assert entry.actor == "alice" and entry.action == "device.labels"


def test_label_patch_merges_and_null_removes(fleet) -> None:  # type: ignore[no-untyped-def]
    c, h = fleet.client, fleet.auth
    r = c.patch("/api/v1/devices/dev-07", json={"labels": {"tier": None, "rack": "r1"}}, headers=h)
    assert r.json()["labels"] == {"site": "berlin", "rack": "r1"}
    assert c.get("/api/v1/devices/dev-07").json()["labels"] == {"site": "berlin", "rack": "r1"}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"labels": {"bad key!": "x"}}, "labels"),
        ({"labels": {"ok": "spaces are not allowed"}}, "labels"),
        ({"labels": {"k": "v" * 64}}, "labels"),
        ({"labels": "site=berlin"}, "labels"),
        ({"labels": {"a": "b"}, "status": "online"}, "status"),
        ({}, "labels"),
    ],
)
def test_invalid_bodies_get_422_naming_the_field(fleet, body: dict, needle: str) -> None:  # type: ignore[no-untyped-def]
    r = fleet.client.patch("/api/v1/devices/dev-07", json=body, headers=fleet.auth)
    assert r.status_code == 422, r.text
    assert needle in r.text
    assert (
        fleet.client.patch(
            "/api/v1/devices/dev-07", content=b"{nope", headers={**fleet.auth, "Content-Type": "application/json"}
        ).status_code
        == 422
    )


def test_unknown_device_is_404(fleet) -> None:  # type: ignore[no-untyped-def]
    assert fleet.client.get("/api/v1/devices/nope").status_code == 404
    r = fleet.client.patch("/api/v1/devices/nope", json={"labels": {}}, headers=fleet.auth)
    assert r.status_code == 404 and "nope" in r.json()["detail"]


def test_telemetry_since_filters_by_arrival_time(controller) -> None:  # type: ignore[no-untyped-def]
    raw = RawMqtt(controller.broker.port, "tel-sim")
    try:
        raw.publish(*du.birth("dev-t"))
        wait_until(lambda: controller.client.get("/api/v1/devices/dev-t").status_code == 200, 10)
        for seq in range(3):
            raw.publish(*du.telemetry("dev-t", seq))
        wait_until(lambda: len(controller.client.get("/api/v1/devices/dev-t/telemetry").json()) == 3, 10)
        cut = time.time()
        time_marker = datetime.fromtimestamp(cut, UTC).isoformat()
        wait_until(lambda: time.time() > cut + 0.01, 2)
        for seq in range(3, 5):
            raw.publish(*du.telemetry("dev-t", seq))
        wait_until(lambda: len(controller.client.get("/api/v1/devices/dev-t/telemetry").json()) == 5, 10)
        iso = controller.client.get("/api/v1/devices/dev-t/telemetry", params={"since": time_marker}).json()
        epoch = controller.client.get("/api/v1/devices/dev-t/telemetry", params={"since": cut}).json()
        assert [t["seq"] for t in iso] == [3, 4] == [t["seq"] for t in epoch]
        assert (
            controller.client.get("/api/v1/devices/dev-t/telemetry", params={"since": "yesterday-ish"}).status_code
            == 422
        )
        assert len(controller.client.get("/api/v1/devices/dev-t/telemetry", params={"limit": 2}).json()) == 2
    finally:
        raw.close()


def test_delete_forgets_a_device(fleet) -> None:  # type: ignore[no-untyped-def]
    assert fleet.client.delete("/api/v1/devices/dev-11", headers=fleet.auth).status_code == 204
    assert fleet.client.get("/api/v1/devices/dev-11").status_code == 404
    assert fleet.client.get("/api/v1/devices").json()["total"] == 11


def test_reads_can_require_a_token(private_broker, make_controller) -> None:  # type: ignore[no-untyped-def]
    ctl = make_controller(private_broker, require_auth_for_reads=True)
    assert ctl.client.get("/api/v1/devices").status_code == 401
    viewer = {"Authorization": f"Bearer {ctl.token_for(Role.VIEWER)}"}
    assert ctl.client.get("/api/v1/devices", headers=viewer).status_code == 200
