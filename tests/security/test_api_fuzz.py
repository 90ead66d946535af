"""The REST API fuzzed from its own OpenAPI schema (schemathesis): no answer is a 5xx, and it still answers after."""

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
from sqlmodel import Session

from controller.auth import tokens
from controller.auth.tokens import Role
from controller.broker.embedded import EmbeddedBroker
from tests.security.conftest import LiveServer

#: examples per operation and generation mode (positive: valid by the schema; negative: invalid)
EXAMPLES = int(os.environ.get("SLMFLEET_FUZZ_EXAMPLES", "15"))
#: the whole run stops generating after this long (each operation still gets its first examples)
BUDGET_S = float(os.environ.get("SLMFLEET_FUZZ_BUDGET_S", "60"))


@pytest.mark.slow
def test_rest_api_has_no_server_errors(private_broker: EmbeddedBroker, live_server: Callable[..., LiveServer]) -> None:
    live = live_server(private_broker, import_wait_s=2.0, upload_max_bytes=64 * 1024)
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json", timeout=10)
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 25, [op.label for op in operations]
    assert any(op.path == "/api/v1/tokens/{token_id}" for op in operations)

    admin = {"token": live.admin_token}
    failures: list[str] = []
    calls: dict[str, int] = {}
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + BUDGET_S

    def still_admin() -> None:
        """A fuzzed DELETE /tokens/{id} may revoke the fuzzer's own token: make a new one then."""
        with Session(live.runtime.engine) as session:
            if tokens.lookup(session, admin["token"]) is None:
                admin["token"], _ = tokens.create_token(session, "fuzz-admin", Role.ADMIN)

    def fuzz(op: Any, mode: GenerationMode) -> None:
        seen = 0

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
            statuses[f"{op.label} {response.status_code}"] = statuses.get(f"{op.label} {response.status_code}", 0) + 1
            if response.status_code >= 500:
                failures.append(f"{response.status_code} {op.label}: {case.as_curl_command()}\n{response.text[:300]}")

        try:
            run()
        except Unsatisfiable:  # nothing to make invalid (an operation without parameters or body)
            assert mode is GenerationMode.NEGATIVE, op.label

    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(op, mode)

    assert failures == [], f"{len(failures)} server errors:\n" + "\n".join(failures[:20])
    assert sum(calls.values()) >= len(operations) * 3, calls
    # still healthy and answering after the run
    still_admin()
    health = httpx.get(f"{live.url}/api/v1/health", timeout=10)
    assert health.status_code == 200, health.text
    listed = httpx.get(f"{live.url}/api/v1/tokens", headers={"Authorization": f"Bearer {admin['token']}"}, timeout=10)
    assert listed.status_code == 200


#: what the fuzzing found answering 500 (numbers and times beyond what the database or datetime holds),
#: replayed every time: each now answers 4xx
FOUND: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/api/v1/devices?offset=99999999999999999999", None),
    ("GET", "/api/v1/devices?offset=9223372036854775808", None),
    ("GET", "/api/v1/models/m1/versions/99999999999999999999", None),
    ("DELETE", "/api/v1/models/m1/versions/99999999999999999999", None),
    ("GET", "/api/v1/devices/dev-1/telemetry?until=9999-12-31T23:59:59-23:00", None),
    ("GET", "/api/v1/devices/dev-1/telemetry?since=0001-01-01T00:00:00%2B14:00", None),
    ("GET", "/api/v1/devices/dev-1/events?since=9999-12-31T23:59:59-23:00", None),
    ("POST", "/api/v1/deployments", {"model": "m1", "version": 10**20, "devices": ["dev-1"]}),
    ("POST", "/api/v1/rollouts", {"model": "m1", "version": 10**20, "selector": "a"}),
    (
        "POST",
        "/api/v1/rollouts",
        {"model": "m1", "version": 1, "selector": "a", "start_at": "9999-12-31T23:59:59-23:00"},
    ),
    ("DELETE", f"/api/v1/tokens/{2**63}", None),
]


def test_inputs_the_fuzzing_found_are_refused_not_server_errors(
    private_broker: EmbeddedBroker, live_server: Callable[..., LiveServer]
) -> None:
    live = live_server(private_broker)
    auth = {"Authorization": f"Bearer {live.admin_token}"}
    with httpx.Client(base_url=live.url, headers=auth, timeout=30) as client:
        assert client.post("/api/v1/models", json={"name": "m1", "task": "text-classification"}).status_code == 201
        live.runtime.handler(*_birth("dev-1"))
        assert live.runtime.writer.flush(10)
        assert client.get("/api/v1/devices/dev-1").status_code == 200
        answers = {(m, p): client.request(m, p, json=body).status_code for m, p, body in FOUND}
    assert all(400 <= code < 500 for code in answers.values()), answers


def _birth(device_id: str) -> tuple[str, bytes]:
    from agent.protocol import codec, topics
    from tests.security import payloads

    return topics.state(device_id), codec.encode(payloads.birth())
