"""The latency and accuracy model of simulated inference: what a model version does on a device profile.

A version's behaviour (``simulations.scenario.Behaviour``) is given for the reference CPU in fp32; the
variant scales its latency and loses a little agreement, the device's CPU speed (and a fixed per-device
variation) scales the latency again. Inferences of one telemetry interval are drawn at once: a Poisson
count, log-normal latencies, binomial errors. They go into the agent's own ``InferenceCounters``, so the
telemetry the controller's gates read is built by the agent's code from simulated measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.telemetry.stats import InferenceCounters

#: RSS of the agent process besides the model (what the registry's probe measures without a model)
BASE_RSS = 60 * 1024 * 1024
#: labels the simulated classifier answers
LABELS = ("negative", "positive")


@dataclass(frozen=True)
class ModelBehaviour:
    latency_ms: float = 10.0
    latency_sigma: float = 0.25
    error_rate: float = 0.001
    agreement: float = 0.99
    accuracy: float = 0.92
    rss_factor: float = 1.0
    variant_latency: dict[str, float] = field(default_factory=dict)
    variant_agreement_loss: dict[str, float] = field(default_factory=dict)
    #: measured median latency per variant on the reference CPU (calibration.latency: measured)
    variant_ms: dict[str, float] = field(default_factory=dict)
    #: measured process RSS per variant (calibration.memory: measured, from a recorded profile)
    variant_rss: dict[str, int] = field(default_factory=dict)

    def median_ms(self, variant: str, cpu_speed: float, jitter: float = 1.0) -> float:
        base = self.variant_ms.get(variant) or self.latency_ms * self.variant_latency.get(variant, 1.0)
        return base * jitter / max(cpu_speed, 1e-6)

    def agreement_of(self, variant: str) -> float:
        return max(0.0, min(1.0, self.agreement - self.variant_agreement_loss.get(variant, 0.0)))


class Behaviours:
    """Behaviour per (model, version number); unknown versions behave like the defaults."""

    def __init__(self, table: dict[str, dict[str, Any]] | None = None) -> None:
        #: "model@version" -> ModelBehaviour fields
        self._table = {k: ModelBehaviour(**v) for k, v in (table or {}).items()}
        self._default = ModelBehaviour()

    def get(self, model: str, version: int) -> ModelBehaviour:
        return self._table.get(f"{model}@{version}", self._default)


@dataclass
class Serving:
    """What a simulated device serves right now."""

    model: str
    version: int
    variant: str
    artifact_id: str
    manifest_rss: int


def simulate_interval(
    counters: InferenceCounters,
    rng: np.random.Generator,
    behaviour: ModelBehaviour,
    serving: Serving,
    *,
    interval_s: float,
    rate: float,
    cpu_speed: float,
    jitter: float,
    latency_factor: float = 1.0,
) -> float:
    """Record one interval of inferences into ``counters``; returns the CPU busy share (0..1)."""
    if rate <= 0 or interval_s <= 0:
        return 0.0
    n = int(rng.poisson(rate * interval_s))
    median = behaviour.median_ms(serving.variant, cpu_speed, jitter) * latency_factor
    if n:
        errors = int(rng.binomial(n, min(1.0, behaviour.error_rate)))
        ok = n - errors
        if ok:
            latencies = rng.lognormal(math.log(median), behaviour.latency_sigma, ok)
            counters.record_many(latencies.tolist())
            # Drift signals: the label mix of what was answered (a sample of it, as the agent records all).
            positives = int(rng.binomial(min(ok, 32), 0.5 * behaviour.accuracy + 0.5 * (1 - behaviour.accuracy)))
            for _ in range(positives):
                counters.record_label(LABELS[1])
            for _ in range(min(ok, 32) - positives):
                counters.record_label(LABELS[0])
        if errors:
            counters.record_error(errors)
    return min(1.0, rate * median / 1000.0)


def rss_of(serving: Serving | None, behaviour: ModelBehaviour | None, rng: np.random.Generator) -> int:
    """The process RSS the device reports: the manifest's measured need (min_ram / 1.25), scaled."""
    if serving is None or behaviour is None:
        return BASE_RSS
    measured = behaviour.variant_rss.get(serving.variant)
    if measured:
        return int(measured * float(rng.normal(1.0, 0.01)))
    return int(serving.manifest_rss * behaviour.rss_factor * float(rng.normal(1.0, 0.01)))
