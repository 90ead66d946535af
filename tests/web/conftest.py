"""Fixtures for the dashboard tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from benchmarks.dashboard import seed
from tests.conftest import LiveController
from tests.web.support import add_users


@pytest.fixture
def web(make_controller: Callable[..., LiveController]) -> LiveController:
    """A controller without a broker (pages and forms only), with the users olivia, vera and adam."""
    ctl = make_controller(None)
    add_users(ctl.runtime.engine)
    return ctl


@pytest.fixture
def seeded(web: LiveController) -> dict[str, Any]:
    """A small fleet in the database: 120 devices with labels, models and telemetry, 4 rollouts."""
    return seed(web.runtime.engine, devices=120, telemetry_per_device=3, chart_points=60, rollouts=4)


@pytest.fixture
def browserless_client(web: LiveController) -> Iterator[Callable[[], TestClient]]:
    """Extra clients on the same app, each with its own cookie jar (another person, another session)."""
    made: list[TestClient] = []

    def make() -> TestClient:
        client = TestClient(web.client.app)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
