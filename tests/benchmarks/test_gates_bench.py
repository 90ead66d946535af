"""The gates benchmark's simulated rollouts (the agent's counters, the controller's rows and gate code)."""

from __future__ import annotations

from benchmarks.gates import rollout
from controller.rollouts.plan import GateSpec


def test_an_identical_model_goes_through_every_wave() -> None:
    outcome = rollout(GateSpec(), {}, seed=11, all_waves=True)
    assert not outcome.aborted, outcome
    assert len(outcome.decide_s) == 4  # canary, 10%, 50%, the rest: each decided on evidence
    assert all(s >= 100 for s in outcome.samples)


def test_regressions_are_caught_in_the_canary_by_their_gate() -> None:
    for case, gate in (({"slower": 1.3}, "p95_latency_ratio"), ({"memory": 1.2}, "rss_ratio")):
        outcome = rollout(GateSpec(), case, seed=12, all_waves=False)
        assert outcome.aborted and outcome.wave == 0 and outcome.by == gate, (case, outcome)
