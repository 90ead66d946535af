"""Gates measured: false aborts of an identical model, detection of regressions, time and samples to decide.

Many rollouts of a model version to a fleet of simulated devices, in simulated time (no broker: the
point is the statistics, not the transport). What is real: each interval's inferences go through the
agent's own ``InferenceCounters`` (its histogram, its snapshot), become the agent's ``Telemetry`` message,
the controller's stored row (``controller.telemetry.ingest.telemetry_row``) and the gates' ``Reading``;
the decision is ``controller.rollouts.gates.judge``, evaluated like the engine does it: after the wave's
bake, at every new telemetry interval, until pass, fail or the deadline (which aborts).

The fleet (seeded): devices differ in speed (log-normal spread, sd 0.5 in log) and traffic (2 to 8
inferences a second); each interval has its own load factor (sd 0.08 in log) and latencies are log-normal
within it (sd 0.35). After an activation or an agent restart the model is slow (x2.5) for 20 s, the
warm-up the gates must skip; a tenth of the devices restart during their baseline. The model's memory
is measured at each load with 2% noise. Devices serve the previous version for 5 minutes before the
rollout. Waves: a canary of 1 device, 10%, 50%, the rest, of 20 devices; each device switches 0 to 20 s
after its wave starts; bake 60 s.

Planted regressions: p95 30% slower (every latency x1.3), 20% more memory, 2% errors (from 0.1%).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import numpy as np

from agent.telemetry.stats import InferenceCounters
from controller.rollouts import evidence
from controller.rollouts.gates import Reading, judge, verdict
from controller.rollouts.plan import GateSpec
from controller.telemetry.ingest import TELEMETRY_COLUMNS, TelemetryIn, telemetry_row
from simulations.device.behaviour import ModelBehaviour, Serving, simulate_interval
from wire.messages import ModelRef, Telemetry

INTERVAL_S = 10.0
BASELINE_S = 300.0
WARMUP_S = 20.0
WARMUP_FACTOR = 2.5
BAKE_S = 60.0
FLEET = 20
WAVES = (1, 2, 7, 10)  # canary, to 10%, to 50%, the rest
MODEL_MIB = 100.0
T0 = datetime(2026, 1, 1, tzinfo=UTC)

#: what the regressions change in the candidate
CASES: dict[str, dict[str, float]] = {
    "identical": {},
    "p95 30% slower": {"slower": 1.3},
    "20% more memory": {"memory": 1.2},
    "2% errors": {"error_rate": 0.02},
}


@dataclass
class Device:
    name: str
    speed: float
    rate: float
    rng: np.random.Generator
    counters: InferenceCounters = field(default_factory=InferenceCounters)
    seq: int = 0
    serving_since: float = 0.0
    model_rss: int = 0

    def activate(self, now: float, memory_factor: float) -> None:
        self.serving_since = now
        self.model_rss = int(MODEL_MIB * 2**20 * memory_factor * self.rng.normal(1.0, 0.02))

    def interval(self, now: float, version: int, behaviour: ModelBehaviour) -> Reading:
        """One telemetry interval ending at ``now``, as the controller stores and the gates read it."""
        warm = now - self.serving_since < WARMUP_S
        simulate_interval(
            self.counters,
            self.rng,
            behaviour,
            Serving("m", version, "fp32", "a", 0),
            interval_s=INTERVAL_S,
            rate=self.rate,
            cpu_speed=self.speed,
            jitter=float(self.rng.lognormal(0.0, 0.08)),
            latency_factor=WARMUP_FACTOR if warm else 1.0,
        )
        msg = Telemetry(
            ts=T0.timestamp() + now,
            seq=self.seq,
            interval_s=INTERVAL_S,
            uptime_s=now + BASELINE_S * 2,
            cpu_percent=10.0,
            rss_bytes=self.model_rss + 60 * 2**20,
            model=ModelRef(model="m", version=version, variant="fp32"),
            inference=self.counters.snapshot(INTERVAL_S),
            serving_s=now - self.serving_since,
            model_rss_bytes=self.model_rss,
        )
        self.seq += 1
        row = telemetry_row(TelemetryIn(self.name, msg, msg.ts), lambda t: datetime.fromtimestamp(t, UTC))
        return Reading.from_row(SimpleNamespace(**dict(zip(TELEMETRY_COLUMNS, row, strict=True))))


@dataclass
class Outcome:
    aborted: bool
    wave: int | None  # where it aborted (0: canary)
    by: str  # the failed gates, "deadline", or ""
    decide_s: list[float]  # per wave judged: seconds from the wave's start to its decision
    samples: list[int]  # per wave judged: inferences the latency gate had read at the decision


def rollout(spec: GateSpec, case: dict[str, float], seed: int, all_waves: bool) -> Outcome:
    """One rollout of version 2 over version 1, wave after wave, judged like the engine judges."""
    rng = np.random.default_rng(seed)
    old = ModelBehaviour(latency_ms=10.0, latency_sigma=0.35, error_rate=0.001)
    new = ModelBehaviour(
        latency_ms=10.0 * case.get("slower", 1.0), latency_sigma=0.35, error_rate=case.get("error_rate", 0.001)
    )
    devices = [
        Device(f"d{i}", float(rng.lognormal(0.0, 0.5)), float(rng.uniform(2.0, 8.0)), np.random.default_rng([seed, i]))
        for i in range(FLEET)
    ]
    readings: dict[str, list[Reading]] = {d.name: [] for d in devices}
    # the previous version, serving for BASELINE_S before the rollout; some agents restart meanwhile
    for d in devices:
        d.activate(-BASELINE_S - 60.0, 1.0)
        restart = float(rng.uniform(-BASELINE_S, 0.0)) if rng.random() < 0.1 else None
        t = -BASELINE_S
        while t < 0:
            t += INTERVAL_S
            if restart is not None and t - INTERVAL_S <= restart < t:
                d.activate(restart, 1.0)
            readings[d.name].append(d.interval(t, 1, old))
    decide_s: list[float] = []
    samples: list[int] = []
    start = 0.0
    placed = 0
    for wave, size in enumerate(WAVES):
        if not all_waves and wave > 1:
            break
        members = devices[placed : placed + size]
        placed += size
        switch = {d.name: start + float(rng.uniform(0.0, 20.0)) for d in members}
        waiting = {d.name for d in members}  # not switched yet
        activated = {name: T0 + timedelta(seconds=s) for name, s in switch.items()}
        t = start
        last_judged = None
        while True:
            t += INTERVAL_S
            for d in members:  # (the other devices report too, but no gate of this wave reads them)
                if d.name in waiting and switch[d.name] < t:
                    waiting.discard(d.name)
                    d.activate(switch[d.name], case.get("memory", 1.0))
                on_new = d.name not in waiting
                readings[d.name].append(d.interval(t, 2 if on_new else 1, new if on_new else old))
            if t - start < BAKE_S:
                continue
            wave_rows = [r for d in members for r in readings[d.name]]
            results = judge(spec, wave_rows, "m", 2, activated)
            last_judged = results
            state = verdict(results)
            if state == "pass":
                break
            if state == "fail" or t - start - BAKE_S > spec.deadline_s:
                latency = next(g for g in results if g.name == "p95_latency_ratio")
                decide_s.append(t - start)
                samples.append(latency.samples)
                failed = [g.name for g in results if g.status == "fail"] or ["deadline"]
                return Outcome(True, wave, ",".join(failed), decide_s, samples)
        assert last_judged is not None
        decide_s.append(t - start)
        samples.append(next(g for g in last_judged if g.name == "p95_latency_ratio").samples)
        start = t
    return Outcome(False, None, "", decide_s, samples)


def _upper(k: int, n: int) -> float:
    """A 95% upper bound on a rate seen k times in n (exact)."""
    return evidence.binomial_bounds(k, n, 0.95).high


def measure(spec: GateSpec, trials: dict[str, int], seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, case in CASES.items():
        n = trials[name]
        outcomes = [rollout(spec, case, seed * 100_000 + i, all_waves=not case) for i in range(n)]
        aborted = [o for o in outcomes if o.aborted]
        entry: dict[str, Any] = {"rollouts": n}
        if not case:
            entry["false_aborts"] = len(aborted)
            entry["false_abort_rate"] = round(len(aborted) / n, 4)
            entry["false_abort_rate_95_upper"] = round(_upper(len(aborted), n), 4)
            entry["false_aborts_by"] = sorted(o.by for o in aborted)
            decide = [s for o in outcomes for s in o.decide_s]
            sampled = [s for o in outcomes for s in o.samples]
        else:
            early = [o for o in aborted if o.wave is not None and o.wave <= 1]
            entry["caught_in_canary_or_first_wave"] = len(early)
            entry["detection_rate"] = round(len(early) / n, 4)
            entry["caught_by"] = {b: sum(1 for o in early if o.by == b) for b in sorted({o.by for o in early})}
            entry["caught_in_canary"] = sum(1 for o in early if o.wave == 0)
            decide = [o.decide_s[-1] for o in early]
            sampled = [o.samples[-1] for o in early]
        if decide:
            entry["decide_s_median"] = statistics.median(decide)
            entry["decide_s_p95"] = float(np.quantile(decide, 0.95))
            entry["latency_samples_median"] = statistics.median(sampled)
        out[name] = entry
    return out


def settings() -> dict[str, GateSpec]:
    defaults = GateSpec()
    return {
        "default": defaults,
        "stricter (confidence 0.99)": defaults.model_copy(update={"confidence": 0.99}),
        "looser (confidence 0.9, min_samples 50)": defaults.model_copy(update={"confidence": 0.9, "min_samples": 50}),
    }


def run(quick: bool = False) -> dict[str, Any]:
    """``quick``: a few rollouts per case (a smoke test); otherwise enough to bound a 1% rate."""
    started = time.time()
    results: dict[str, Any] = {}
    for i, (label, spec) in enumerate(settings().items()):
        if quick:
            trials = {"identical": 4, **dict.fromkeys(list(CASES)[1:], 3)}
        elif label == "default":
            trials = {"identical": 200, **dict.fromkeys(list(CASES)[1:], 60)}
        else:
            trials = {"identical": 60, **dict.fromkeys(list(CASES)[1:], 30)}
        results[label] = {
            "gates": spec.model_dump(exclude={"shadow_agreement_min"}),
            **measure(spec, trials, seed=i + 1),
        }
    return {
        "fleet": {"devices": FLEET, "waves": list(WAVES), "interval_s": INTERVAL_S, "bake_s": BAKE_S},
        "warmup": {"seconds": WARMUP_S, "latency_factor": WARMUP_FACTOR},
        "settings": results,
        "elapsed_s": round(time.time() - started, 1),
    }
