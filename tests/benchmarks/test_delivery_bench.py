"""Smoke test of ``python -m benchmarks delivery``: quick mode (5 real agents in one process, a 2 MB
artifact, ``slmfleet up`` and mosquitto as processes). Every device must get every chunk from the one
broadcast (no repairs) and the controller must send about the artifact's bytes once, not once per device."""

from __future__ import annotations

import pytest

from benchmarks import delivery
from controller.broker.embedded import mosquitto_binary

pytestmark = pytest.mark.slow


@pytest.mark.skipif(mosquitto_binary() is None, reason="the delivery benchmark needs mosquitto")
def test_quick_delivery_loses_no_chunk_and_sends_the_artifact_once() -> None:
    result = delivery.run(quick=True)
    assert result["deployment_status"] == "completed", result
    assert result["agents"] == 5 and result["artifact_bytes"] >= 2 * 1024 * 1024, result
    assert result["baseline_subscribers_complete"] == 5, result
    assert result["slmfleet_all_verified_s"] is not None, result
    assert result["chunks_lost"] == 0, result
    assert result["controller_bytes_ratio"] < 2, result
