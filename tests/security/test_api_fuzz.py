"""The REST API fuzzed from its own OpenAPI schema (schemathesis): every answer is one the schema declares.

Each operation gets schema-valid (positive) and schema-invalid (negative) requests as an admin. Every answer
must be declared: its status code, its content type and its body's schema; no answer is a 5xx; and a request
the schema allows is never refused as invalid (422/400). The schema is what clients are generated from.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlmodel import Session

from controller.auth import tokens
from controller.auth.tokens import Role
from controller.broker.embedded import EmbeddedBroker
from tests.security.conftest import LiveServer

#: examples per operation and generation mode (positive: valid by the schema; negative: invalid)
EXAMPLES = int(os.environ.get("SLMFLEET_FUZZ_EXAMPLES", "15"))
#: the whole run stops generating after this long (each operation still gets its first examples)
BUDGET_S = float(os.environ.get("SLMFLEET_FUZZ_BUDGET_S", "90"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    positive_data_acceptance,
]
#: an upload's content (an ONNX graph, an archive, the options inside a JSON string) is checked beyond what a
#: schema can say: a schema-valid upload that is not a model is refused with 422 and one sentence saying why
#: so is a derive job's: its steps and parameters (JSON in form fields), whether a step that needs data got a
#: data file, and the version (imported as ONNX: 409)
CONTENT_CHECKED = {
    "POST /api/v1/models/{name}/versions",
    *(
        f"POST /api/v1/models/{{name}}/versions/{{number}}/{kind}"
        for kind in ("derive", "distill", "prune", "finetune")
    ),
}


@pytest.mark.slow
def test_rest_api_answers_only_what_its_schema_declares(
    private_broker: EmbeddedBroker, live_server: Callable[..., LiveServer]
) -> None:
    live = live_server(private_broker, import_wait_s=2.0, upload_max_bytes=64 * 1024)
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json", timeout=10)
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 25, [op.label for op in operations]
    assert any(op.path == "/api/v1/tokens/{token_id}" for op in operations)

    admin = {"token": live.admin_token}
    failures: dict[tuple[str, str], list[str]] = {}
    calls: dict[str, int] = {}
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + BUDGET_S

    def still_admin() -> None:
        """A fuzzed DELETE /tokens/{id} may revoke the fuzzer's own token: make a new one then."""
        with Session(live.runtime.engine) as session:
            if tokens.lookup(session, admin["token"]) is None:
                admin["token"], _ = tokens.create_token(session, "fuzz-admin", Role.ADMIN)

    def failed(op: Any, check: str, case: Any, response: Any, message: str) -> None:
        found = failures.setdefault((op.label, check), [])
        if len(found) < 2:
            found.append(
                f"{message[:400]}\n  {case.as_curl_command()[:600]}\n  -> {response.status_code} {response.text[:300]}"
            )

    def fuzz(op: Any, mode: GenerationMode) -> None:
        seen = 0
        content_checked = op.label in CONTENT_CHECKED

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            nonlocal seen
            if seen >= 3 and time.monotonic() > deadline:
                return
            seen += 1
            still_admin()
            response = case.call(base_url=live.url, headers={"Authorization": f"Bearer {admin['token']}"}, timeout=30)
            calls[op.label] = calls.get(op.label, 0) + 1
            key = f"{op.label} {response.status_code}"
            statuses[key] = statuses.get(key, 0) + 1
            checks = [c for c in CHECKS if not (content_checked and c is positive_data_acceptance)]
            try:
                case.validate_response(response, checks=checks)
            except FailureGroup as group:
                for failure in group.exceptions:
                    failed(op, type(failure).__name__, case, response, str(getattr(failure, "message", failure)))
            if content_checked and mode is GenerationMode.POSITIVE and response.status_code == 422:
                # refused for its content, never for its shape: a list of field errors would be a schema mismatch
                detail = response.json().get("detail")
                if not isinstance(detail, str):
                    failed(op, "content refusal is a sentence", case, response, f"422 with {detail!r}")

        try:
            run()
        except Unsatisfiable:  # nothing to make invalid (an operation without parameters or body)
            assert mode is GenerationMode.NEGATIVE, op.label

    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(op, mode)

    report = "\n".join(f"{op} [{check}]:\n" + "\n".join(found) for (op, check), found in sorted(failures.items()))
    assert failures == {}, f"{len(failures)} (operation, check) pairs failed:\n{report}"
    assert sum(calls.values()) >= len(operations) * 3, calls
    # the schema was exercised, not only its refusals (random ids mostly find nothing: 404)
    succeeded = {key.rsplit(" ", 1)[0] for key in statuses if key.rsplit(" ", 1)[1].startswith("2")}
    assert len(succeeded) >= len(operations) // 3, sorted(statuses)
    # still healthy and answering after the run
    still_admin()
    health = httpx.get(f"{live.url}/api/v1/health", timeout=10)
    assert health.status_code == 200, health.text
    listed = httpx.get(f"{live.url}/api/v1/tokens", headers={"Authorization": f"Bearer {admin['token']}"}, timeout=10)
    assert listed.status_code == 200


#: what fuzzing found, replayed every time: (method, path template, path, body, status now answered). Numbers and
#: times beyond what the database or datetime holds answered 500; times past year 9999 in UTC now mean "no bound";
#: label filters and selectors the route refused answered a string where the schema said a list of field errors
FOUND: list[tuple[str, str, str, dict[str, Any] | None, int]] = [
    ("GET", "/api/v1/devices", "/api/v1/devices?offset=99999999999999999999", None, 422),
    ("GET", "/api/v1/devices", "/api/v1/devices?offset=9223372036854775808", None, 422),
    ("GET", "/api/v1/devices", "/api/v1/devices?label=nonsense", None, 422),
    ("GET", "/api/v1/devices", "/api/v1/devices?selector=a%3Db%3Dc", None, 422),
    ("GET", "/api/v1/models/{name}/versions/{number}", "/api/v1/models/m1/versions/99999999999999999999", None, 422),
    ("DELETE", "/api/v1/models/{name}/versions/{number}", "/api/v1/models/m1/versions/99999999999999999999", None, 422),
    (
        "GET",
        "/api/v1/devices/{device_id}/telemetry",
        "/api/v1/devices/dev-1/telemetry?until=9999-12-31T23:59:59-23:00",
        None,
        200,
    ),
    (
        "GET",
        "/api/v1/devices/{device_id}/telemetry",
        "/api/v1/devices/dev-1/telemetry?since=0001-01-01T00:00:00%2B14:00",
        None,
        200,
    ),
    (
        "GET",
        "/api/v1/devices/{device_id}/events",
        "/api/v1/devices/dev-1/events?since=9999-12-31T23:59:59-23:00",
        None,
        200,
    ),
    (
        "POST",
        "/api/v1/deployments",
        "/api/v1/deployments",
        {"model": "m1", "version": 10**20, "devices": ["dev-1"]},
        422,
    ),
    ("POST", "/api/v1/rollouts", "/api/v1/rollouts", {"model": "m1", "version": 10**20, "selector": "a"}, 422),
    ("POST", "/api/v1/rollouts", "/api/v1/rollouts", {"model": "m1", "version": 1, "selector": "a=b=c"}, 422),
    (
        "POST",
        "/api/v1/rollouts",
        "/api/v1/rollouts",
        {"model": "m1", "version": 1, "selector": "a", "start_at": "9999-12-31T23:59:59-23:00"},
        404,  # m1 has no version 1: the time no longer stops it
    ),
    ("POST", "/api/v1/deployments", "/api/v1/deployments", {"model": "m1", "version": 1, "selector": "x=y"}, 404),
    ("DELETE", "/api/v1/tokens/{token_id}", f"/api/v1/tokens/{2**63}", None, 422),
]


def test_inputs_the_fuzzing_found_get_declared_answers(
    private_broker: EmbeddedBroker, live_server: Callable[..., LiveServer]
) -> None:
    live = live_server(private_broker)
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json", timeout=10)
    auth = {"Authorization": f"Bearer {live.admin_token}"}
    with httpx.Client(base_url=live.url, headers=auth, timeout=30) as client:
        assert client.post("/api/v1/models", json={"name": "m1", "task": "text-classification"}).status_code == 201
        live.runtime.handler(*_birth("dev-1"))
        assert live.runtime.writer.flush(10)
        assert client.get("/api/v1/devices/dev-1").status_code == 200
        for method, template, path, body, expected in FOUND:
            r = client.request(method, path, json=body)
            assert r.status_code == expected, (method, path, r.text)
            operation = schema[template][method]
            assert str(r.status_code) in operation.responses.status_codes, (method, path, r.status_code)
            operation.validate_response(r)  # the body fits what the schema declares for that status
            if r.status_code >= 400:
                detail = r.json()["detail"]
                assert detail, (method, path)


def _birth(device_id: str) -> tuple[str, bytes]:
    from tests.security import payloads
    from wire import codec, topics

    return topics.state(device_id), codec.encode(payloads.birth())
