"""Smoke test of ``python -m benchmarks hardening --quick``: the shipped broker hangs up on the oversized
publish and the baseline (no cap, a client reading everything) takes it; the command and chunk figures are
there. Only sanity is checked (machines are noisy: no absolute times, no tight ratios)."""

from __future__ import annotations

import pytest

from benchmarks import hardening
from controller.broker.embedded import mosquitto_binary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_binary() is None, reason="the hardening benchmark needs mosquitto"),
]


def test_quick_hardening_bench() -> None:
    result = hardening.run(quick=True)
    assert (
        result["oversize_shipped"]["broker_hung_up"] and not result["oversize_baseline_uncapped_311"]["broker_hung_up"]
    )
    assert result["oversize_shipped"]["growth_mib"] < result["oversize_baseline_uncapped_311"]["growth_mib"], result
    commands, chunks = result["commands"], result["chunk_check"]
    assert commands["seal_ms"] > 0 and commands["admit_ms"] > 0 and commands["deploy_payload_kib"] > 100
    assert chunks["first_send_us"] > 0 and chunks["repeat_send_us"] > 0 and chunks["unchecked_us"] > 0
