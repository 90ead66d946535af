"""The dashboard's forms and pages (not in the OpenAPI schema, so not reached by schemathesis) fuzzed with
hypothesis: random and boundary text in every form field, query parameter and path segment, as an admin
with a valid session and CSRF token. No answer is a 5xx, nothing half-written stays behind, and the
dashboard still answers afterwards."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlmodel import Session, select

from benchmarks.dashboard import seed
from controller.broker.embedded import EmbeddedBroker
from controller.db.models import Deployment, EnrollmentToken, Rollout, Webhook
from controller.web import forms
from controller.web.deployment_form import FIELDS as DEPLOYMENT_FIELDS
from controller.web.enrollment_form import FIELDS as ENROLLMENT_FIELDS
from tests.conftest import LiveController
from tests.registry.tiny_models import anomaly_model
from tests.web.support import add_users, csrf_token, login

pytestmark = pytest.mark.slow

#: examples per target (the whole file stays well under a minute)
EXAMPLES = int(os.environ.get("SLMFLEET_FUZZ_EXAMPLES", "60"))

#: text an operator could type or an attacker could send: numbers at and past their bounds, selectors,
#: label lists, markup, control characters, very long strings
BOUNDARY = [
    "",
    " ",
    "0",
    "-1",
    "1e309",
    "nan",
    "inf",
    "-inf",
    "9" * 40,
    "0.0000001",
    "100%",
    "101%",
    "-5%",
    "%",
    "1%, 10%, 50%, 100%",
    "100%, 1%",
    ",,,",
    "a=b, c=d",
    "a==b",
    "=x",
    "tier in (canary,beta)",
    "!fleet",
    "x" * 5000,
    "<script>alert(1)</script>",
    "\x00",
    "\ud7ff\ue000",
    "2026-13-45T25:61:00",
    "2999-01-01T00:00:00Z",
    "../../etc/passwd",
    "model@9999999999999999999",
    "intent-classifier@1",
    "fuzz-pump@1",
    "pump-anomaly@2",
    "dev-00001",
    "fleet=kiosks",
    "site=lab",
]
text = st.one_of(st.sampled_from(BOUNDARY), st.text(max_size=200))
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)


def form_of(fields: tuple[str, ...] | list[str]) -> st.SearchStrategy[dict[str, str]]:
    """Some of the form's fields (each may be missing), each any text; plus, at times, an unknown field."""
    return st.dictionaries(st.sampled_from([*fields, "unknown_field"]), text, max_size=len(fields) + 1)


@pytest.fixture
def admin(
    private_broker: EmbeddedBroker, make_controller: Callable[..., LiveController], tmp_path: Path
) -> tuple[LiveController, TestClient]:
    ctl = make_controller(private_broker)
    add_users(ctl.runtime.engine)
    seed(ctl.runtime.engine, devices=40, telemetry_per_device=1, chart_points=10, rollouts=3)
    # a real, deployable model (the seeded registry's manifests are placeholders for page rendering)
    path, threshold = anomaly_model(tmp_path / "m.onnx")
    options = {"task": "anomaly", "anomaly": {"threshold": threshold, "higher_is_anomalous": False, "output": "scores"}}
    r = ctl.client.post(
        "/api/v1/models/fuzz-pump/versions",
        files=[("file", ("m.onnx", path.read_bytes()))],
        data={"options": json.dumps(options)},
        headers=ctl.auth,
    )
    assert r.status_code == 201, r.text
    client = TestClient(ctl.client.app)
    assert login(client, "adam").status_code == 303
    return ctl, client


def no_server_error(r: Any, what: str) -> None:
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:500]}"


def test_dashboard_forms_and_pages_have_no_server_errors(admin: tuple[LiveController, TestClient]) -> None:
    ctl, client = admin
    token = csrf_token(client.get("/enrollment").text)
    outcomes: dict[str, set[int]] = {"rollout": set(), "enrollment": set()}

    @SETTINGS
    @example(values={**forms.DEFAULTS, "ref": "fuzz-pump@1", "selector": "fleet=kiosks", "waves": "10%, 100%"})
    @given(values=form_of(list(forms.DEFAULTS)))
    def rollout_form(values: dict[str, str]) -> None:
        r = client.post("/rollouts", data={**values, "csrf_token": token}, follow_redirects=False)
        no_server_error(r, f"POST /rollouts {values!r}")
        outcomes["rollout"].add(r.status_code)
        # a refused form creates nothing; an accepted one answers with a redirect to it
        assert r.status_code in (303, 400, 404, 409, 422), (r.status_code, values)

    @SETTINGS
    @example(values={"labels": "site=lab", "expires_in_hours": "1"})
    @given(values=form_of(ENROLLMENT_FIELDS))
    def enrollment_form(values: dict[str, str]) -> None:
        with Session(ctl.runtime.engine) as session:
            before = len(session.exec(select(EnrollmentToken)).all())
        r = client.post("/enrollment", data={**values, "csrf_token": token}, follow_redirects=False)
        no_server_error(r, f"POST /enrollment {values!r}")
        outcomes["enrollment"].add(r.status_code)
        assert r.status_code in (201, 422), (r.status_code, values)
        with Session(ctl.runtime.engine) as session:
            after = len(session.exec(select(EnrollmentToken)).all())
        assert after == before + (1 if r.status_code == 201 else 0)

    @SETTINGS
    @given(segment=text, reason=text, action=st.sampled_from(["pause", "resume", "abort", "approve", "advance", "x"]))
    def paths(segment: str, reason: str, action: str) -> None:
        from urllib.parse import quote

        seg = quote(segment, safe="") or "x"
        for method, path, data in (
            ("GET", f"/devices/{seg}", None),
            ("GET", f"/devices/{seg}/series.json", None),
            ("GET", f"/rollouts/{seg}", None),
            ("GET", f"/rollouts/{seg}/live", None),
            ("POST", f"/rollouts/{seg}/{action}", {"reason": reason, "csrf_token": token}),
            ("POST", f"/devices/{seg}/revoke", {"reason": reason, "csrf_token": token}),
            ("POST", f"/enrollment/{seg}/revoke", {"csrf_token": token}),
        ):
            r = client.request(method, path, data=data, follow_redirects=False)
            no_server_error(r, f"{method} {path}")

    @SETTINGS
    @given(
        params=st.dictionaries(
            st.sampled_from(["status", "selector", "q", "page", "show", "points", "done"]), text, max_size=4
        )
    )
    def queries(params: dict[str, str]) -> None:
        for path in ("/", "/devices", "/rollouts", "/models", "/enrollment", "/selector/count", "/rollouts/new"):
            r = client.get(path, params=params, follow_redirects=False)
            no_server_error(r, f"GET {path} {params!r}")

    outcomes.update({"deploy": set(), "webhook": set(), "upload": set()})

    @SETTINGS
    @example(values={"ref": "fuzz-pump@1", "selector": "fleet=kiosks", "timeout_s": "60", "activate": "1"})
    @given(values=form_of(list(DEPLOYMENT_FIELDS)))
    def deployment_form(values: dict[str, str]) -> None:
        with Session(ctl.runtime.engine) as session:
            before = len(session.exec(select(Deployment)).all())
        r = client.post("/deployments", data={**values, "csrf_token": token}, follow_redirects=False)
        no_server_error(r, f"POST /deployments {values!r}")
        outcomes["deploy"].add(r.status_code)
        assert r.status_code in (303, 404, 409, 422), (r.status_code, values)
        with Session(ctl.runtime.engine) as session:
            after = len(session.exec(select(Deployment)).all())
        assert after == before + (1 if r.status_code == 303 else 0)

    @SETTINGS
    @example(values={"name": "pager", "url": "http://127.0.0.1:9/hook", "event_rollout.aborting": "1"})
    @given(values=form_of(["name", "url", "description", "secret", "event_rollout.aborting", "event_device.offline"]))
    def webhook_form(values: dict[str, str]) -> None:
        with Session(ctl.runtime.engine) as session:
            before = len(session.exec(select(Webhook)).all())
        r = client.post("/webhooks", data={**values, "csrf_token": token}, follow_redirects=False)
        no_server_error(r, f"POST /webhooks {values!r}")
        outcomes["webhook"].add(r.status_code)
        assert r.status_code in (201, 409, 422), (r.status_code, values)
        with Session(ctl.runtime.engine) as session:
            after = len(session.exec(select(Webhook)).all())
        assert after == before + (1 if r.status_code == 201 else 0)

    @settings(SETTINGS, max_examples=max(5, EXAMPLES // 4))
    @example(values={"model": "fuzz-upload", "task": "anomaly"}, name="m.onnx")
    @given(values=form_of(["model", "task", "description", "options", "variant_int8"]), name=text)
    def upload_form(values: dict[str, str], name: str) -> None:
        files = [("file", (name[:100] or "m.onnx", b"not a model"))]
        r = client.post("/models/upload", data={**values, "csrf_token": token}, files=files, follow_redirects=False)
        no_server_error(r, f"POST /models/upload {values!r} {name!r}")
        outcomes["upload"].add(r.status_code)
        assert r.status_code in (303, 413, 422), (r.status_code, values, name)

    @SETTINGS
    @given(segment=text, other=text, action=st.sampled_from(["cancel", "rollback", "test", "delete", "enable", "x"]))
    def new_paths(segment: str, other: str, action: str) -> None:
        from urllib.parse import quote

        seg, seg2 = quote(segment, safe="") or "x", quote(other, safe="") or "1"
        for method, path, data in (
            ("GET", f"/deployments/{seg}", None),
            ("GET", f"/deployments/{seg}/live", None),
            ("POST", f"/deployments/{seg}/{action}", {"csrf_token": token}),
            ("GET", f"/health/{seg}/{seg2}", None),
            ("GET", f"/health/{seg}/1/series.json", None),
            ("GET", f"/imports/{seg}", None),
            ("GET", f"/imports/{seg}/live", None),
            ("GET", f"/webhooks/{seg}", None),
            ("POST", f"/webhooks/{seg}/{action}", {"csrf_token": token}),
            ("GET", f"/webhook-deliveries/{seg}", None),
            ("POST", f"/webhook-deliveries/{seg}/retry", {"csrf_token": token}),
        ):
            r = client.request(method, path, data=data, follow_redirects=False)
            no_server_error(r, f"{method} {path}")

    @SETTINGS
    @given(
        params=st.dictionaries(
            st.sampled_from(["status", "state", "page", "range", "done", "ref", "model", "selector"]), text, max_size=4
        )
    )
    def new_queries(params: dict[str, str]) -> None:
        for path in (
            "/deployments",
            "/deployments/new",
            "/health",
            "/health/pump-anomaly/2",
            "/health/pump-anomaly/2/series.json",
            "/webhooks",
            "/models/upload",
        ):
            r = client.get(path, params=params, follow_redirects=False)
            no_server_error(r, f"GET {path} {params!r}")

    for target in (
        rollout_form,
        enrollment_form,
        paths,
        queries,
        deployment_form,
        webhook_form,
        upload_form,
        new_paths,
        new_queries,
    ):
        target()
    # both sides of each form were reached: accepted (a rollout created, a token shown) and refused
    assert {303, 422} <= outcomes["rollout"] and {201, 422} <= outcomes["enrollment"], outcomes
    assert {303, 422} <= outcomes["deploy"] and {201, 422} <= outcomes["webhook"], outcomes
    assert {303, 422} <= outcomes["upload"], outcomes

    # still serving, and the fuzzing left no rollout half-made (each one created has its waves)
    assert client.get("/").status_code == 200
    with Session(ctl.runtime.engine) as session:
        for rollout in session.exec(select(Rollout)).all():
            assert rollout.spec.get("waves"), rollout.id
