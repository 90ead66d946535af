"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.broker.embedded import EmbeddedBroker
from tests.e2e.fleet import Fleet


@pytest.fixture
def fleet(tmp_path: Path, private_broker: EmbeddedBroker) -> Iterator[Fleet]:
    """A controller and agents as real processes (started by the test) on the test's own broker; all stopped after."""
    f = Fleet(tmp_path, private_broker.url)
    yield f
    f.stop()
