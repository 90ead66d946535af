"""The gates' statistics on readings made here: like-for-like sides and decisions with a stated confidence."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pytest

from controller.rollouts import evidence
from controller.rollouts.gates import GateResult, Reading, judge, pairs_for
from controller.rollouts.plan import GateSpec
from wire.histogram import LatencyHistogram

T0 = datetime(2026, 1, 1, 12, 0, 0)
SWITCH = T0 + timedelta(minutes=30)
SPEC = GateSpec(min_samples=200, warmup_s=20, confidence=0.95)


def reading(
    device: str,
    at: datetime,
    version: int | None,
    rng: np.random.Generator,
    *,
    median_ms: float = 10.0,
    n: int = 60,
    errors: int = 0,
    memory: int = 100 * 2**20,
    serving_s: float | None = 1000.0,
    tokens: int = 0,
    interval_s: float = 10.0,
) -> Reading:
    hist = LatencyHistogram()
    for value in rng.lognormal(np.log(median_ms), 0.3, n):
        hist.record(float(value))
    return Reading(
        device_id=device,
        at=at,
        model=None if version is None else "m",
        version=version,
        interval_s=interval_s,
        count=n,
        errors=errors,
        buckets=tuple(hist.sparse()),
        tokens=tokens,
        token_s=tokens * median_ms / 1000.0 if tokens else 0.0,
        rss_bytes=memory + 60 * 2**20,
        model_rss_bytes=memory if version is not None else None,
        serving_s=serving_s,
        uptime_s=5000.0,
    )


def fleet(
    devices: int,
    intervals: int,
    *,
    slower: float = 1.0,
    memory: float = 1.0,
    error_every: int = 0,
    n: int = 60,
    seed: int = 1,
    tokens: int = 0,
) -> tuple[list[Reading], dict[str, datetime]]:
    """Devices on v1 for ``intervals`` intervals, then on v2 (``slower`` and ``memory`` times v1)."""
    rng = np.random.default_rng(seed)
    out: list[Reading] = []
    activated = {}
    for d in range(devices):
        name = f"d{d}"
        speed = float(rng.lognormal(0, 0.4))  # devices differ; each is compared with itself
        activated[name] = SWITCH
        for i in range(intervals):
            at = SWITCH - timedelta(seconds=10 * (intervals - i))
            out.append(reading(name, at, 1, rng, median_ms=10 * speed, n=n, tokens=tokens))
        for i in range(intervals):
            at = SWITCH + timedelta(seconds=10 * (i + 1) + 30)
            errors = n // error_every if error_every else 0
            out.append(
                reading(
                    name,
                    at,
                    2,
                    rng,
                    median_ms=10 * speed * slower,
                    n=n,
                    errors=errors,
                    memory=int(100 * 2**20 * memory),
                    serving_s=40.0 + 10 * i,
                    tokens=tokens,
                )
            )
    return out, activated


def gates(readings: list[Reading], activated: dict[str, datetime], spec: GateSpec = SPEC) -> dict[str, GateResult]:
    return {g.name: g for g in judge(spec, readings, "m", 2, activated)}


@pytest.mark.parametrize(
    ("case", "kw", "expected"),
    [
        ("identical", {}, {"error_rate": "pass", "p95_latency_ratio": "pass", "rss_ratio": "pass"}),
        ("30% slower", {"slower": 1.3}, {"p95_latency_ratio": "fail", "rss_ratio": "pass"}),
        ("3x slower", {"slower": 3.0}, {"p95_latency_ratio": "fail"}),
        ("20% more memory", {"memory": 1.2}, {"rss_ratio": "fail", "p95_latency_ratio": "pass"}),
        ("2% errors", {"error_every": 50}, {"error_rate": "fail"}),
        ("generation, 30% slower per token", {"slower": 1.3, "tokens": 400}, {"p95_latency_ratio": "fail"}),
        ("generation, identical", {"tokens": 400}, {"p95_latency_ratio": "pass"}),
    ],
)
def test_decisions(case: str, kw: dict, expected: dict[str, str]) -> None:
    readings, activated = fleet(4, 30, **kw)
    results = gates(readings, activated)
    assert {name: results[name].status for name in expected} == expected, case
    for name in expected:
        g = results[name]
        assert g.low is not None and g.high is not None and g.low <= g.value <= g.high, g  # type: ignore[operator]
        assert g.confidence == SPEC.confidence


def test_few_samples_wait_for_evidence() -> None:
    # a baseline of 5 intervals, 2 intervals of 60 after the switch: below min_samples (200)
    readings, activated = fleet(2, 5)
    readings = [r for r in readings if r.version == 1 or (r.serving_s or 0) < 60]
    results = gates(readings, activated)
    assert results["p95_latency_ratio"].status == "waiting"
    assert "still gathering" in results["p95_latency_ratio"].detail
    assert results["error_rate"].status == "waiting"


def test_a_difference_near_the_threshold_waits_rather_than_guesses() -> None:
    # 20% slower against a threshold of 1.2 with little data: neither bound is clear of it
    readings, activated = fleet(1, 5, slower=1.2)
    result = gates(readings, activated, GateSpec(min_samples=200, warmup_s=20, p95_latency_ratio_max=1.2))
    assert result["p95_latency_ratio"].status == "waiting"
    assert result["p95_latency_ratio"].low < 1.2 < result["p95_latency_ratio"].high  # type: ignore[operator]


def test_the_baseline_is_the_previous_version_only_without_warm_up() -> None:
    rng = np.random.default_rng(3)
    rows = [
        # no model at all: small and fast, never a baseline
        reading("a", SWITCH - timedelta(minutes=20), None, rng, median_ms=1.0, memory=0),
        # an older version, then v1's warm-up, then v1 settled
        reading("a", SWITCH - timedelta(minutes=15), 0, rng, median_ms=1.0),
        reading("a", SWITCH - timedelta(minutes=10), 1, rng, median_ms=50.0, serving_s=5.0),
        *[reading("a", SWITCH - timedelta(seconds=s), 1, rng) for s in (30, 20, 10)],
        # the candidate before this device's switch (another rollout's try): not the baseline either
        reading("a", SWITCH - timedelta(seconds=5), 2, rng, median_ms=1.0),
        reading("a", SWITCH + timedelta(seconds=10), 2, rng, serving_s=10.0),  # warm-up after the switch
        reading("a", SWITCH + timedelta(seconds=40), 2, rng, serving_s=40.0),
    ]
    [pair] = pairs_for(rows, "m", 2, {"a": SWITCH}, warmup_s=20)
    assert pair.previous == ("m", 1)
    assert [r.at for r in pair.before] == [SWITCH - timedelta(seconds=s) for s in (30, 20, 10)]
    assert [r.serving_s for r in pair.after] == [10.0, 40.0]
    g = gates(rows, {"a": SWITCH}, GateSpec(min_samples=60, warmup_s=20))
    # the warm-up reading after the switch is not judged: only one interval is left, the gate waits for more
    assert g["p95_latency_ratio"].status == "waiting"


def test_a_restart_is_warm_up_too_for_agents_that_do_not_report_serving_time() -> None:
    rng = np.random.default_rng(4)
    old = reading("a", SWITCH - timedelta(seconds=30), 1, rng, serving_s=None)
    restarted = Reading(**{**old.__dict__, "uptime_s": 15.0})
    assert restarted.warming(20) and not old.warming(20)
    after = reading("a", SWITCH + timedelta(seconds=20), 2, rng, serving_s=None)
    assert after.warming(20, SWITCH) and not after.warming(5, SWITCH)


def test_memory_compares_the_models_own_cost_not_the_process() -> None:
    # the case: v1 99.6 MiB, v2 100.1 MiB on each device, and a period without model at 50 MiB
    rng = np.random.default_rng(5)
    rows = [reading("a", SWITCH - timedelta(minutes=30) + timedelta(seconds=10 * i), None, rng) for i in range(20)]
    rows += [reading("a", SWITCH - timedelta(seconds=10 * (i + 1)), 1, rng, memory=int(39.6 * 2**20)) for i in range(5)]
    rows += [reading("a", SWITCH + timedelta(seconds=40 + 10 * i), 2, rng, memory=int(40.1 * 2**20)) for i in range(5)]
    result = gates(rows, {"a": SWITCH}, GateSpec(min_samples=60, warmup_s=20))["rss_ratio"]
    assert result.status == "pass" and result.value == pytest.approx(40.1 / 39.6, rel=1e-3)
    assert "the model's own memory" in result.detail


def test_devices_without_a_previous_model_switch_the_ratio_gates_off() -> None:
    rng = np.random.default_rng(6)
    rows = [reading("a", SWITCH + timedelta(seconds=40 + 10 * i), 2, rng, n=100) for i in range(5)]
    g = gates(rows, {"a": SWITCH}, GateSpec(min_samples=100, warmup_s=20))
    assert g["p95_latency_ratio"].status == "off" and "no baseline" in g["p95_latency_ratio"].detail
    assert g["rss_ratio"].status == "off"


@pytest.mark.parametrize(
    ("errors", "total", "threshold", "expected"),
    [
        (0, 1000, 0.01, "pass"),
        (30, 1000, 0.01, "fail"),
        (10, 1000, 0.01, "waiting"),
        (1, 20, 0.01, "waiting"),  # 1 in 20 is 18% likely at a rate of 1%: no evidence yet
        (3, 100, 0.01, "waiting"),  # 8% likely: a normal-approximation bound would fail this
        (0, 500, 0.01, "pass"),
    ],
)
def test_error_rate_bounds(errors: int, total: int, threshold: float, expected: str) -> None:
    estimate = evidence.binomial_bounds(errors, total, 0.95)
    assert estimate.low <= errors / total <= estimate.high
    assert estimate.decide(threshold) == expected


def test_the_same_telemetry_gives_the_same_decision() -> None:
    readings, activated = fleet(3, 10, slower=1.15)
    first, second = gates(readings, activated), gates(readings, activated)
    assert first["p95_latency_ratio"] == second["p95_latency_ratio"]


def test_histogram_quantile_matches_the_agents() -> None:
    rng = np.random.default_rng(7)
    hist = LatencyHistogram()
    for value in rng.lognormal(2.0, 0.5, 5000):
        hist.record(float(value))
    counts = np.zeros((1, 104))
    for index, count in hist.sparse():
        counts[0, index] = count
    from wire.histogram import quantile_from_buckets

    assert evidence.histogram_quantile(counts, 0.95)[0] == pytest.approx(quantile_from_buckets(hist.sparse(), 0.95))
