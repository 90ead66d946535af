"""What a replica says about the cluster: /api/v1/cluster, /health, /metrics and the dashboard's replica table
(an in-process replica on SQLite; the multi-process tests are in test_replicas.py)."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import text

from controller.cluster import leases
from tests.conftest import LiveController
from tests.helpers import metric_value, wait_until
from tests.web.support import add_users, login


def test_a_replica_lists_itself_its_leases_and_what_it_drives(make_controller: Callable[..., LiveController]) -> None:
    ctl = make_controller(None, replica=True, replica_id="rep-a", lease_ttl_s=30)
    runtime = ctl.runtime
    # a leased periodic job runs on the replica holding its lease: this one, the only one
    wait_until(lambda: "job:presence-sweep" in runtime.owner.held(), 10, what="the sweep's lease taken")
    body = ctl.client.get("/api/v1/cluster", headers=ctl.auth).json()
    assert body["clustered"] and body["replica"] == "rep-a"
    assert [(r["id"], r["alive"], r["me"]) for r in body["replicas"]] == [("rep-a", True, True)]
    sweep = next(lease for lease in body["leases"] if lease["name"] == "job:presence-sweep")
    assert sweep["holder"] == "rep-a" and sweep["token"] == 1 and sweep["live"] and 0 < sweep["expires_in_s"] <= 30

    health = ctl.client.get("/api/v1/health").json()
    assert health["replica"]["id"] == "rep-a" and "job:presence-sweep" in health["replica"]["drives"]
    metrics = ctl.client.get("/metrics").text
    assert metric_value(metrics, "slmfleet_leases_held", {"kind": "job"}) >= 1

    # another replica's lease (taken in the database directly) shows in the table, not in what this one drives
    assert leases.acquire(runtime.engine, "rollout:" + "f" * 32, "rep-b", 30) is not None
    body = ctl.client.get("/api/v1/cluster", headers=ctl.auth).json()
    assert ("rollout:" + "f" * 32, "rep-b") in [(lease["name"], lease["holder"]) for lease in body["leases"]]
    assert not any(d.startswith("rollout:") for d in ctl.client.get("/api/v1/health").json()["replica"]["drives"])

    add_users(runtime.engine, ("vera",))
    assert login(ctl.client, "vera").status_code == 303
    page = ctl.client.get("/").text
    assert 'data-testid="cluster"' in page and 'data-replica="rep-a"' in page
    assert "job:presence-swe" in page


def test_one_controller_keeps_no_leases(make_controller: Callable[..., LiveController]) -> None:
    ctl = make_controller(None)
    body = ctl.client.get("/api/v1/cluster", headers=ctl.auth).json()
    assert not body["clustered"] and body["replicas"] == [] and body["leases"] == []
    with ctl.runtime.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM cluster_lease")).scalar_one() == 0
    assert ctl.client.get("/api/v1/health").json()["replica"] == {"id": "solo", "clustered": False, "drives": []}
