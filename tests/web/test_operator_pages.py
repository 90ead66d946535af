"""The pages an operator works from: deployments (list, per-device detail, the deploy form), uploading a model
version, fleet health per version, what needs attention, notifications. Through the app, with real sessions,
CSRF tokens, a real broker and device peers where something is deployed."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlmodel import Session

from controller.broker.embedded import EmbeddedBroker
from controller.db.models import AuditEntry, Deployment, Device, ImportJob, Rollout, WebhookDelivery, table
from controller.health.series import version_series
from tests.conftest import LiveController
from tests.health.support import latencies, report, store
from tests.helpers import wait_until
from tests.notify.receiver import Receiver
from tests.notify.test_webhooks import verified
from tests.registry.tiny_models import anomaly_model
from tests.rollouts.autopeer import AutoPeer
from tests.web.support import add_users, csrf_token, login
from tests.web.test_pages import rows


def audit(ctl: LiveController, action: str) -> list[AuditEntry]:
    with Session(ctl.runtime.engine) as session:
        return list(session.exec(select(AuditEntry).where(AuditEntry.action == action)).scalars())  # type: ignore[call-overload]


# ------------------------------------------------------------ deployments --


def test_deployments_list_and_detail_show_every_device(web: LiveController, seeded: dict[str, Any]) -> None:
    c = web.client
    login(c, "vera")
    listing = c.get("/deployments")
    assert listing.status_code == 200 and "text/html" in listing.headers["content-type"]
    with web.runtime.engine.connect() as conn:
        made = conn.execute(select(table(Deployment).c.id)).scalars().all()
    assert len(rows(listing.text, "deployment-table")) == len(made) == 15  # the seeded rollouts' waves
    assert len(rows(c.get("/deployments", params={"status": "failed"}).text, "deployment-table")) == sum(
        1 for r in rows(listing.text, "deployment-table") if "status-failed" in r
    )
    big = seeded["big_deployment"]
    page = c.get(f"/deployments/{big}")
    assert page.status_code == 200
    with web.runtime.engine.connect() as conn:
        t = table(Deployment).c
        assert conn.execute(select(t.status).where(t.id == big)).scalar() == "running"
    targets = rows(page.text, "targets")
    states = [re.search(r'data-state="([a-z_]+)"', r).group(1) for r in targets]  # type: ignore[union-attr]
    assert "failed" in states and "downloading" in states and "active" in states
    assert states.index("failed") < states.index("active")  # failed devices first
    downloading = next(r for r in targets if 'data-state="downloading"' in r)
    assert re.search(r'data-testid="percent">\d+\.\d%', downloading)
    only_failed = c.get(f"/deployments/{big}", params={"state": "failed"})
    assert all('data-state="failed"' in r for r in rows(only_failed.text, "targets"))
    live = c.get(f"/deployments/{big}/live")
    assert live.status_code == 200 and "data-final" not in live.text.split(">", 1)[0]
    assert 'data-testid="deployment-actions"' not in page.text  # a viewer: no buttons (and a rollout's wave)
    assert c.get("/deployments/nope").status_code == 404
    assert c.get("/deployments/new").status_code == 403  # a viewer cannot deploy
    assert c.get("/deployments", params={"status": "weird"}).status_code == 422


@pytest.fixture
def site(private_broker: EmbeddedBroker, make_controller: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A controller on a broker with the dashboard's users and three device peers that serve nothing yet."""
    ctl = make_controller(private_broker, chunk_size=65536, rollout_step_s=0.2)
    add_users(ctl.runtime.engine)
    key = ctl.client.get("/api/v1/signing-key").json()["public_key_pem"]
    peers = [AutoPeer(private_broker.port, f"pump-{i}", key, labels={"site": "oslo"}) for i in range(3)]
    wait_until(lambda: ctl.client.get("/api/v1/devices").json()["total"] == 3, 15, what="the peers registered")
    model, _ = anomaly_model(tmp_path / "pump.onnx")
    try:
        yield {"ctl": ctl, "peers": peers, "model": model}
    finally:
        for p in peers:
            p.close()


def upload(c: TestClient, files: list[tuple[str, tuple[str, bytes]]], **fields: str) -> Any:
    token = csrf_token(c.get("/models/upload").text)
    return c.post("/models/upload", data={"csrf_token": token, **fields}, files=files, follow_redirects=False)


def test_an_operator_uploads_a_version_and_deploys_it_from_the_dashboard(site: dict[str, Any]) -> None:
    ctl: LiveController = site["ctl"]
    c = TestClient(ctl.client.app)
    login(c, "olivia")
    options = json.dumps({"anomaly": {"threshold": 0.0, "higher_is_anomalous": False, "output": "scores"}})
    sent = upload(
        c,
        [("file", ("pump.onnx", site["model"].read_bytes()))],
        model="pump",
        task="anomaly",
        description="from the browser",
        options=options,
        variant_fp32="1",
    )
    assert sent.status_code == 303, sent.text
    job_url = sent.headers["location"]
    assert job_url.startswith("/imports/")
    done = wait_until(
        lambda: 'data-testid="import-done"' in (t := c.get(job_url + "/live").text) and t, 120, what="import done"
    )
    assert "pump v1 is registered" in done and "/deployments/new?ref=pump%401" in done
    version = ctl.client.get("/api/v1/models/pump/versions/1").json()
    assert [v["variant"] for v in version["variants"]] == ["fp32"] and version["description"] == "from the browser"
    (entry,) = audit(ctl, "model.version.import")
    assert entry.actor == "olivia" and entry.detail["via"] == "dashboard" and entry.detail["files"] == ["pump.onnx"]

    # the deploy form validates as the API does, says which field is wrong, and writes nothing then
    form = c.get("/deployments/new", params={"ref": "pump@1"})
    assert form.status_code == 200 and 'value="pump@1" selected' in form.text
    token = csrf_token(form.text)
    for fields, where, status in (
        ({"selector": "site=oslo=x"}, "selector term", 422),
        ({"selector": "site=nowhere"}, "no device matches", 409),
        ({"devices": "pump-0 ghost-9"}, "unknown devices: ghost-9", 404),
        ({"selector": "site=oslo", "devices": "pump-0"}, "one of them", 422),
        ({"selector": "site=oslo", "timeout_s": "-1"}, "seconds above 0", 422),
        ({"selector": "site=oslo", "variant": "int4"}, "has no int4 variant", 404),
    ):
        r = c.post("/deployments", data={"csrf_token": token, "ref": "pump@1", "activate": "1", **fields})
        assert r.status_code == status and where in r.text, (fields, r.status_code, r.text[-2000:])
    assert ctl.client.get("/api/v1/deployments").json() == []
    assert c.post("/deployments", data={"ref": "pump@1", "selector": "site=oslo"}).status_code == 403  # no token

    created = c.post(
        "/deployments",
        data={
            "csrf_token": token,
            "ref": "pump@1",
            "variant": "auto",
            "selector": "site=oslo",
            "timeout_s": "120",
            "activate": "1",
        },
        follow_redirects=False,
    )
    assert created.status_code == 303, created.text
    deployment_id = created.headers["location"].split("/deployments/")[1].split("?")[0]
    wait_until(lambda: all(p.serving is not None and p.serving.version == 1 for p in site["peers"]), 60)
    page = wait_until(
        lambda: "3 of 3 devices active (100%)" in (t := c.get(f"/deployments/{deployment_id}").text) and t, 30
    )
    assert all('data-state="active"' in r and "100.0%" in r for r in rows(page, "targets"))
    (made,) = audit(ctl, "deployment.create")
    assert made.actor == "olivia" and made.target == deployment_id and made.detail["via"] == "dashboard"
    assert made.detail["selector"] == "site=oslo"
    # the fleet page's recent changes link to the deployment and to the import
    home = c.get("/").text
    assert f'<a href="/deployments/{deployment_id}" data-testid="audit-deployment">{deployment_id[:8]}</a>' in home
    assert 'class="badge status-active">v1</span>' in home

    # a rollback from the page: the same service call, audited
    detail = c.get(f"/deployments/{deployment_id}").text
    rolled = c.post(
        f"/deployments/{deployment_id}/rollback", data={"csrf_token": csrf_token(detail)}, follow_redirects=False
    )
    assert rolled.status_code == 303
    assert [a.detail for a in audit(ctl, "deployment.rollback")] == [
        {"devices": 0, "via": "dashboard"}
    ]  # nothing before


def test_uploads_are_checked_like_the_api_and_failed_imports_are_marked(site: dict[str, Any]) -> None:
    ctl: LiveController = site["ctl"]
    c = TestClient(ctl.client.app)
    login(c, "olivia")
    onnx_file = [("file", ("pump.onnx", site["model"].read_bytes()))]
    for fields, where in (
        ({"model": "bad name!"}, "a model name"),
        ({"model": "pump", "options": "{not json"}, "not JSON"),
        ({"model": "pump", "options": "[1, 2]"}, "a JSON object"),
        ({"model": "pump", "options": '{"colour": "red"}'}, "options: colour"),
    ):
        r = upload(c, onnx_file, **fields)
        assert r.status_code == 422 and where in r.text, (fields, r.text[-1500:])
    with Session(ctl.runtime.engine) as session:
        assert session.exec(select(ImportJob)).all() == []  # type: ignore[call-overload]
    staging = ctl.runtime.models.staging
    assert list(staging.iterdir()) == []  # what the refused uploads sent is gone
    forged = c.post(
        "/models/upload", data={"model": "pump", "csrf_token": "guessed"}, files=onnx_file, follow_redirects=False
    )
    assert forged.status_code == 403 and list(staging.iterdir()) == []
    viewer = TestClient(ctl.client.app)
    login(viewer, "vera")
    assert viewer.get("/models/upload").status_code == 403
    # a file that is no model: the import fails, its page says why, the audit view marks it failed
    sent = upload(c, [("file", ("pump.onnx", b"this is not an onnx model"))], model="pump", task="anomaly")
    assert sent.status_code == 303
    failed = wait_until(
        lambda: 'data-testid="import-error"' in (t := c.get(sent.headers["location"] + "/live").text) and t, 60
    )
    assert "The import failed:" in failed
    home = c.get("/").text
    assert 'data-testid="import-failed">import failed</span>' in home


# ----------------------------------------------------------------- health --


def test_health_pages_show_each_version_from_the_buckets(web: LiveController) -> None:
    engine = web.runtime.engine
    rng = random.Random(9)
    now = datetime.now(UTC)
    store(
        engine,
        [
            ("a", report(("clf", 1, "int8"), latencies(rng, 200, 10.0), labels=["ok"] * 190 + ["spam"] * 10), now),
            ("b", report(("clf", 2, "int8"), latencies(rng, 100, 40.0), errors=10, scores=[0.9] * 100), now),
            ("c", report(("clf", 2, "int8"), latencies(rng, 100, 40.0), scores=[0.2] * 100), now - timedelta(hours=3)),
        ],
    )
    web.runtime.health.run()
    c = web.client
    login(c, "vera")
    listing = c.get("/health").text
    v2 = next(r for r in rows(listing, "health-table") if 'data-version="clf@2"' in r)
    assert "9.09%" in v2 and "bad-text" in v2  # 10 errors in 110 attempts in the last minutes
    page = c.get("/health/clf/2", params={"range": "6h"})
    assert page.status_code == 200
    assert 'data-testid="health-error-rate">4.76%' in page.text  # 10 of 210 over the 6 h
    assert 'data-chart="scores"' in page.text and 'data-chart="labels"' not in page.text  # it sent no labels
    data = c.get("/health/clf/2/series.json", params={"range": "6h"}).json()
    with engine.connect() as conn:
        expected = version_series(conn, "clf", 2, 6 * 3600)
    assert data["summary"] == expected["summary"] and data["t"][-5:] == expected["t"][-5:]
    assert data["summary"]["score_psi"] > 0.25  # its scores moved from 0.2 to 0.9
    embedded = page.text.split('<script type="application/json" id="health-data">', 1)[1].split("</script>", 1)[0]
    assert json.loads(embedded)["summary"]["inferences"] == 200
    assert c.get("/health/clf/2", params={"range": "2y"}).status_code == 422
    empty = c.get("/health/other/7").text
    assert 'data-testid="health-empty"' in empty


# -------------------------------------------------------------- attention --


def test_the_fleet_page_says_what_needs_attention(web: LiveController, seeded: dict[str, Any]) -> None:
    engine = web.runtime.engine
    now = datetime.now(UTC)
    with engine.begin() as conn:
        r = table(Rollout).c
        ids = [x for (x,) in conn.execute(select(r.id).where(r.id != seeded["big_rollout"]).order_by(r.id))]
        spec = conn.execute(select(r.spec).where(r.id == ids[0])).scalar_one()
        conn.execute(
            update(table(Rollout))
            .where(r.id == ids[0])
            .values(state="waiting_window", spec={**spec, "windows": [{"cron": "0 3 * * *", "duration_s": 3600}]})
        )
        conn.execute(update(table(Rollout)).where(r.id == ids[1]).values(state="awaiting_approval"))
        conn.execute(update(table(Rollout)).where(r.id == ids[2]).values(state="aborted", finished_at=now))
    c = web.client
    login(c, "olivia")
    home = c.get("/").text
    section = home.split('data-testid="attention"', 1)[1]
    assert f'data-rollout="{seeded["big_rollout"]}"' in section and "is paused since" in section
    assert f'data-rollout="{ids[1]}"' in section and "waits for an operator to approve" in section
    waiting = section.split(f'data-rollout="{ids[0]}"', 1)[1].split("</li>", 1)[0]
    assert "waits for a maintenance window, which opens" in waiting and "03:00:00 UTC)" in waiting
    assert f'data-rollout="{ids[2]}"' in section and "was aborted" in section
    offline = section.split('data-testid="attention-offline"', 1)[1].split("</ul>", 1)[0]
    with engine.connect() as conn:
        d = table(Device).c
        n_offline = conn.execute(select(d.id).where(d.status == "offline")).all()
    assert f"{len(n_offline)}, the latest 5" in section and offline.count("<li>") == 5
    erroring = section.split('data-testid="attention-erroring"', 1)[1].split("</ul>", 1)[0]
    assert "inference error in one report" in erroring  # from the seeded telemetry, via the health job
    assert 'data-testid="all-clear"' not in home


def test_a_quiet_fleet_is_all_clear(web: LiveController) -> None:
    login(web.client, "vera")
    home = web.client.get("/").text
    assert 'data-testid="all-clear"' in home and 'data-testid="attention"' not in home


# ---------------------------------------------------------- notifications --


def test_an_admin_manages_webhooks_and_reads_the_log_on_the_dashboard(web: LiveController) -> None:
    receiver = Receiver(script=[500]).start()
    try:
        c = web.client
        login(c, "adam")
        page = c.get("/webhooks")
        assert page.status_code == 200 and "Nothing sent yet." in page.text
        token = csrf_token(page.text)
        bad = c.post("/webhooks", data={"csrf_token": token, "name": "pager", "url": "gopher://x"})
        assert bad.status_code == 422 and "http(s)://host" in bad.text
        made = c.post(
            "/webhooks",
            data={
                "csrf_token": token,
                "name": "pager",
                "url": receiver.url,
                "event_rollout.aborting": "1",
                "event_deployment.failed": "1",
            },
        )
        assert made.status_code == 201, made.text
        secret = re.search(r'value="(whsec_[^"]+)" data-testid="webhook-secret"', made.text).group(1)  # type: ignore[union-attr]
        listing = c.get("/webhooks").text
        assert secret not in listing and "rollout.aborting, deployment.failed" in listing
        (hook,) = c.get("/api/v1/webhooks", headers=web.auth).json()
        detail = c.get(f"/webhooks/{hook['id']}").text
        sent = c.post(f"/webhooks/{hook['id']}/test", data={"csrf_token": csrf_token(detail)}, follow_redirects=False)
        assert sent.status_code == 303
        got = wait_until(lambda: [r for r in receiver.requests("ping") if r.status == 200], 30, what="the ping")
        verified(secret, got[0])
        log = wait_until(lambda: 'data-status="delivered"' in (t := c.get(f"/webhooks/{hook['id']}").text) and t, 10)
        assert "HTTP 200" in log
        with Session(web.runtime.engine) as session:
            (delivery,) = session.exec(select(WebhookDelivery)).scalars()  # type: ignore[call-overload]
        body_page = c.get(f"/webhook-deliveries/{delivery.id}").text
        assert "a test event from slmfleet" in body_page and "HTTP 500" in body_page  # both attempts listed
        disabled = c.post(f"/webhooks/{hook['id']}/disable", data={"csrf_token": token}, follow_redirects=False)
        assert disabled.status_code == 303
        assert c.get("/api/v1/webhooks", headers=web.auth).json()[0]["enabled"] is False
        actions = [(a.actor, a.action, a.detail.get("via")) for a in audit(web, "webhook.create")]
        assert actions == [("adam", "webhook.create", "dashboard")]
        operator = TestClient(web.client.app)
        login(operator, "olivia")
        assert operator.get("/webhooks").status_code == 403
        assert operator.post(f"/webhooks/{hook['id']}/delete", data={"csrf_token": token}).status_code == 403
        removed = c.post(f"/webhooks/{hook['id']}/delete", data={"csrf_token": token}, follow_redirects=False)
        assert removed.status_code == 303 and c.get("/api/v1/webhooks", headers=web.auth).json() == []
    finally:
        receiver.stop()
