"""The OpenAPI document declares what the routes answer, and its patterns are the ones the routes accept."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from apscheduler.triggers.cron import CronTrigger
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.app import create_app
from controller.devices import selectors
from controller.rollouts.plan import CRON_PATTERN
from controller.settings import load_settings


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    app = create_app(load_settings(data_dir=tmp_path_factory.mktemp("ctl")))
    body: dict[str, Any] = TestClient(app).get("/openapi.json").json()  # no lifespan: nothing started
    return body


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, ops in document["paths"].items() for method, op in ops.items()]


def test_every_operation_declares_its_refusals_with_a_real_error_model(document: dict[str, Any]) -> None:
    writes = {"POST", "PATCH", "DELETE"}
    for method, path, op in _operations(document):
        responses = op["responses"]
        assert "429" in responses and "Retry-After" in responses["429"]["headers"], (method, path)
        if method in writes and path != "/api/v1/enroll":  # enroll: the enrollment token in the body is the key
            assert {"401", "403"} <= set(responses), (method, path, sorted(responses))
        if "{" in path:
            assert "404" in responses, (method, path)
        # an id given by a prefix that several ids start with is answered 409 (controller/api/ids.py)
        if re.search(r"\{(deployment_id|rollout_id|job_id|artifact_id)\}", path):
            assert "409" in responses, (method, path, sorted(responses))
        for code, response in responses.items():
            if code.startswith(("4", "5")) and not (path == "/api/v1/health" and code == "503"):
                ref = response["content"]["application/json"]["schema"]["$ref"]
                expected = "ValidationFailed" if code == "422" else "ApiError"
                assert ref == f"#/components/schemas/{expected}", (method, path, code, ref)
    detail = document["components"]["schemas"]["ValidationFailed"]["properties"]["detail"]
    assert {branch.get("type") for branch in detail["anyOf"]} == {"array", "string"}
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_constrained_label_keys_are_constrained_in_the_document(document: dict[str, Any]) -> None:
    text = json.dumps(document)
    assert "patternProperties" not in text  # it lets keys that match no pattern through
    labels = document["components"]["schemas"]["DevicePatch"]["properties"]["labels"]
    assert labels["propertyNames"]["pattern"].startswith("^[A-Za-z0-9]")
    assert labels["additionalProperties"]["anyOf"][0]["type"] == "string"


def test_state_refusals_are_not_422(document: dict[str, Any]) -> None:
    """A valid request the fleet's state refuses is 404 or 409; 422 means the request breaks the schema."""
    create = document["paths"]["/api/v1/deployments"]["post"]["responses"]
    assert {"404", "409", "503"} <= set(create)
    body = document["components"]["schemas"]["DeploymentCreate"]
    assert [branch["required"] for branch in body["oneOf"]] == [["target"], ["devices"], ["selector"]]


@given(st.from_regex(selectors.SCHEMA_PATTERN, fullmatch=True).filter(lambda s: len(s) <= 4096))
@settings(max_examples=200, deadline=None)
def test_every_selector_the_schema_allows_parses(text: str) -> None:
    selectors.parse(text)


@given(st.from_regex(selectors.LABEL_FILTER_PATTERN, fullmatch=True))
@settings(max_examples=200, deadline=None)
def test_every_label_filter_the_schema_allows_parses(text: str) -> None:
    assert len(selectors.parse(text).terms) == 1


@given(st.from_regex(CRON_PATTERN, fullmatch=True))
@settings(max_examples=200, deadline=None)
def test_every_cron_the_schema_allows_is_a_crontab(text: str) -> None:
    CronTrigger.from_crontab(text)


def test_the_patterns_in_the_document_are_the_parsers(document: dict[str, Any]) -> None:
    params = {p["name"]: p for p in document["paths"]["/api/v1/devices"]["get"]["parameters"]}
    selector = params["selector"]["schema"]["anyOf"][0]
    assert selector["pattern"] == selectors.SCHEMA_PATTERN
    assert params["label"]["schema"]["anyOf"][0]["items"]["pattern"] == selectors.LABEL_FILTER_PATTERN
    for good in ("site=berlin,tier!=canary,gpu,!legacy,zone in (a,b)", "a notin (x, y)", ""):
        selectors.parse(good)
        assert re.fullmatch(selectors.SCHEMA_PATTERN, good), good
