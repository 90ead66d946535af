"""Smoke test of ``python -m benchmarks security``: quick mode (20 enrolled devices, 50 messages each, three
alternating trials on an anonymous and on a dynamic-security mosquitto). Every enrollment must give
credentials the broker accepts, every message must arrive on both brokers and no publish may be refused;
the figures are only checked for sanity (machines are noisy: no absolute times, no tight ratios)."""

from __future__ import annotations

import pytest

from benchmarks import security
from controller.broker import dynsec
from controller.broker.embedded import mosquitto_binary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        mosquitto_binary() is None or dynsec.plugin_path() is None,
        reason="the security benchmark needs mosquitto and its dynamic security plugin",
    ),
]


def test_quick_security_bench_delivers_every_message_on_both_brokers() -> None:
    result = security.run(quick=True)
    n, m = result["devices"], result["messages_per_device"]
    assert (n, m) == (20, 50), result
    assert result["enrollments_done"] == result["enrollments"] == n, result
    assert result["enroll_per_s"] > 0 and result["enroll_p50_ms"] > 0, result
    assert result["enroll_p95_ms"] >= result["enroll_p50_ms"], result
    assert result["messages_per_trial"] == n * m, result
    assert result["sent"] == 2 * security.TRIALS * n * m, result
    assert result["received"] == result["sent"], result
    assert result["lost"] == 0 and result["refused"] == 0, result
    assert result["anonymous_msgs_per_s"] > 0 and result["acl_msgs_per_s"] > 0, result
    assert len(result["anonymous_msgs_per_s_trials"]) == len(result["acl_msgs_per_s_trials"]) == security.TRIALS
    assert result["acl_vs_anonymous_ratio"] > 0, result
    assert result["broker_cpu_s_anonymous"] >= 0 and result["broker_cpu_s_acl"] >= 0, result
