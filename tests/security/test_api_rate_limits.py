"""The REST API's rate limits, over real HTTP from several loopback addresses: per source address, per API
token and, for enrollment, per source and per enrollment token; 429 with Retry-After, counted in metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import typer

from controller.cli.client import ApiClient
from tests.helpers import metric_value, wait_until
from tests.security.conftest import LiveServer


@contextmanager
def client_from(live: LiveServer, address: str, token: str | None = None) -> Iterator[httpx.Client]:
    """A client whose connections come from ``address`` (any 127.x.y.z is this machine)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(base_url=live.url, headers=headers, transport=transport, timeout=10) as client:
        yield client


def throttled(live: LiveServer, limit: str) -> float:
    return metric_value(
        httpx.get(live.url + "/metrics", timeout=10).text, "slmfleet_api_throttled_total", {"limit": limit}
    )


def test_a_source_over_its_rate_gets_429_with_retry_after_and_others_are_served(
    live_server: Callable[..., LiveServer],
) -> None:
    live = live_server(api_rate_per_s=0.2, api_burst=5)  # a token back every 5 s: none while the test runs
    with client_from(live, "127.0.0.1") as noisy, client_from(live, "127.0.0.2") as other:
        answers = [noisy.get("/api/v1/devices").status_code for _ in range(8)]
        assert answers[:5] == [200] * 5 and set(answers[5:]) == {429}, answers
        refused = noisy.get("/api/v1/health")
        assert refused.status_code == 429 and refused.headers["content-type"] == "application/json"
        assert 1 <= int(refused.headers["Retry-After"]) <= 5
        assert "too many requests from 127.0.0.1" in refused.json()["detail"]
        # another address is not affected
        assert other.get("/api/v1/devices").status_code == 200
        # a refused request takes nothing: the bucket refills at the rate and the client is served again
        wait_until(lambda: noisy.get("/api/v1/health").status_code == 200, 15, 0.2, what="the bucket refilled")
    assert throttled(live, "source") >= 4
    # the dashboard is not behind this limit (its login has a back-off of its own)
    with client_from(live, "127.0.0.1") as noisy:
        assert noisy.get("/login").status_code == 200


def test_one_token_is_limited_across_addresses(live_server: Callable[..., LiveServer]) -> None:
    live = live_server(api_rate_per_s=0.5, api_burst=4)
    token = live.admin_token
    with client_from(live, "127.0.0.3", token) as first, client_from(live, "127.0.0.4", token) as second:
        assert [first.get("/api/v1/tokens").status_code for _ in range(2)] == [200, 200]
        assert [second.get("/api/v1/tokens").status_code for _ in range(2)] == [200, 200]
        refused = second.get("/api/v1/tokens")  # each address made 2 of its 4, the token made all 4 of its 4
        assert refused.status_code == 429 and "with this token" in refused.json()["detail"]
        assert int(refused.headers["Retry-After"]) >= 1
    with client_from(live, "127.0.0.5") as anonymous:
        assert anonymous.get("/api/v1/devices").status_code == 200  # reads without that token still work
    assert throttled(live, "token") == 1


def test_enrollment_is_limited_per_source_and_per_enrollment_token(live_server: Callable[..., LiveServer]) -> None:
    live = live_server(device_broker_url="mqtt://127.0.0.1:1", enroll_rate_per_s=0.2, enroll_burst=3)
    admin = {"Authorization": f"Bearer {live.admin_token}"}
    with client_from(live, "127.0.0.6") as guesser:
        answers = [guesser.post("/api/v1/enroll", json={"token": f"slmfe_guess{i}"}).status_code for i in range(5)]
        assert answers == [401, 401, 401, 429, 429], answers
        # the rest of the API is still open to that address
        assert guesser.get("/api/v1/health").status_code == 200
    assert throttled(live, "enroll_source") == 2

    bound = {"device_id": "pump-1"}
    secret = httpx.post(live.url + "/api/v1/enrollment-tokens", json=bound, headers=admin, timeout=10).json()["token"]
    statuses = []
    for i in range(4):  # one token tried from four addresses, with an id it may not take
        with client_from(live, f"127.0.1.{i + 1}") as device:
            statuses.append(device.post("/api/v1/enroll", json={"token": secret, "device_id": "pump-2"}).status_code)
    assert statuses == [409, 409, 409, 429], statuses
    assert throttled(live, "enroll_token") == 1
    # a good address with a good token is not held back by what others did
    other = httpx.post(live.url + "/api/v1/enrollment-tokens", json={}, headers=admin, timeout=10).json()["token"]
    with client_from(live, "127.0.2.1") as device:
        assert device.post("/api/v1/enroll", json={"token": other}).status_code == 200


def test_the_defaults_let_a_busy_client_through(live_server: Callable[..., LiveServer]) -> None:
    """The dashboard, the CLI, the simulator and the test suite share 127.0.0.1: 300 requests at once pass."""
    live = live_server()
    with client_from(live, "127.0.0.1", live.admin_token) as busy:
        assert {busy.get("/api/v1/devices").status_code for _ in range(300)} == {200}
    assert throttled(live, "source") == throttled(live, "token") == 0


def test_the_cli_waits_out_a_rate_limit_and_prints_field_errors_in_a_line(
    live_server: Callable[..., LiveServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live = live_server(api_rate_per_s=1.0, api_burst=1)
    client = ApiClient(live.url, live.admin_token, tmp_path)
    assert client.request("GET", "/api/v1/devices")["total"] == 0
    assert client.request("GET", "/api/v1/devices")["total"] == 0  # refused once, asked again after Retry-After
    assert "rate-limiting this client: asking again in 1 s" in capsys.readouterr().err
    assert throttled(live, "source") >= 1
    with pytest.raises(typer.Exit):
        client.request("POST", "/api/v1/tokens", json={"name": "bad name!", "role": "boss"})
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: POST /api/v1/tokens: 422: name: String should match pattern"), err
    assert "; role: Input should be 'viewer', 'operator' or 'admin'" in err
