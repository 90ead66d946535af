"""Gates: how the new model behaves on a wave's devices, judged like for like, with a stated confidence.

* error rate: errors / (inferences + errors) on the new version since each device switched, pooled over
  the wave, with an exact one-sided binomial bound on each side;
* latency: each device against itself on the model version it served just before (never rows without a
  model, never the candidate, never the warm-up after an activation or a restart), as a ratio of p95s
  (histograms merged exactly) or, for generation, of seconds per token; the wave's ratio is the geometric
  mean of the devices' ratios, with a bootstrap interval (``evidence.paired_ratio``);
* memory: what the model itself costs on each device (the agent's own measure at load,
  ``model_rss_bytes``; whole-process RSS only from agents that do not report it), paired the same way;
* shadow agreement: the candidate against the active model on live inputs, before anything switched.

Each gate passes once its bound is within the threshold, fails once its other bound is beyond it, and
waits for evidence in between; the engine fails a gate still waiting at its deadline.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import numpy as np
from sqlalchemy import Engine, select

from controller.db.models import TelemetryRecord, table
from controller.rollouts import evidence
from controller.rollouts.plan import GateSpec
from wire.histogram import BUCKET_BOUNDS_MS

Status = Literal["pass", "fail", "waiting", "off"]
#: how far back before its switch a device's previous-version telemetry is taken
BASELINE_WINDOW = timedelta(hours=1)
#: telemetry intervals a device needs on each side for the ratio gates (the bootstrap resamples them)
MIN_INTERVALS = 3
#: a model's memory cost below this is taken as this: differences of a few MiB are the measure's noise
RSS_FLOOR_BYTES = 16 * 2**20
_BUCKETS = len(BUCKET_BOUNDS_MS)


@dataclass
class GateResult:
    name: str
    #: the estimate (a ratio for the paired gates, a rate for errors, the agreement for shadow)
    value: float | None
    threshold: float | None
    comparison: Literal["<=", ">="]
    samples: int
    min_samples: int
    status: Status
    detail: str = ""
    #: one-sided bounds of the estimate at ``confidence``: the gate decides when the threshold is outside
    low: float | None = None
    high: float | None = None
    confidence: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Reading:
    """One telemetry message as the gates read it."""

    device_id: str
    at: datetime
    model: str | None
    version: int | None
    interval_s: float
    count: int
    errors: int
    buckets: tuple[tuple[int, int], ...]
    tokens: int
    token_s: float
    rss_bytes: int | None
    model_rss_bytes: int | None
    serving_s: float | None
    uptime_s: float | None

    @classmethod
    def from_row(cls, row: Any) -> Reading:
        data = row.data if isinstance(row.data, dict) else json.loads(row.data)
        inference = data.get("inference") or {}
        latency = inference.get("latency") or {}
        tokens = int(inference.get("tokens") or 0)
        rate = inference.get("tokens_per_s")
        at = row.received_at
        return cls(
            device_id=row.device_id,
            at=at.replace(tzinfo=None) if at.tzinfo is not None else at,
            model=row.model,
            version=row.model_version,
            interval_s=float(data.get("interval_s") or 0.0),
            count=row.inference_count or 0,
            errors=row.inference_errors or 0,
            buckets=tuple((int(i), int(c)) for i, c in latency.get("buckets", [])),
            tokens=tokens,
            token_s=tokens / rate if tokens and rate else 0.0,
            rss_bytes=row.rss_bytes,
            model_rss_bytes=data.get("model_rss_bytes"),
            serving_s=data.get("serving_s"),
            uptime_s=data.get("uptime_s"),
        )

    def is_model(self, model: str | None, version: int | None) -> bool:
        return self.model == model and self.version == version

    def warming(self, warmup_s: float, activated: datetime | None = None) -> bool:
        """Whether this interval overlaps the warm-up: the first ``warmup_s`` seconds the model served in
        this process (after its activation or the agent's restart)."""
        if self.serving_s is not None:
            return self.serving_s - self.interval_s < warmup_s
        if self.uptime_s is not None and self.uptime_s - self.interval_s < warmup_s:
            return True  # an agent that does not say how long its model serves: a restart at least
        started = self.at - timedelta(seconds=self.interval_s)
        return activated is not None and started < activated + timedelta(seconds=warmup_s)


def _naive(t: datetime) -> datetime:
    return t.replace(tzinfo=None) if t.tzinfo is not None else t


@dataclass
class Pair:
    """One device: the candidate's readings after its switch and its previous version's before."""

    device_id: str
    after: list[Reading]
    before: list[Reading]
    previous: tuple[str, int] | None


def pairs_for(
    readings: Iterable[Reading], model: str, version: int, activated: dict[str, datetime], warmup_s: float
) -> list[Pair]:
    """Split each activated device's readings into like-for-like sides (see the module's docstring)."""
    by_device: dict[str, list[Reading]] = {d: [] for d in activated}
    for r in readings:
        if r.device_id in by_device:
            by_device[r.device_id].append(r)
    out = []
    for device_id, rows in by_device.items():
        switched = _naive(activated[device_id])
        rows.sort(key=lambda r: r.at)
        after = [r for r in rows if r.at >= switched and r.is_model(model, version)]
        earlier = [r for r in rows if r.at < switched and r.model is not None and not r.is_model(model, version)]
        previous = (earlier[-1].model, earlier[-1].version) if earlier else None
        before = [
            r
            for r in earlier
            if previous is not None
            and r.is_model(*previous)
            and r.at >= switched - BASELINE_WINDOW
            and not r.warming(warmup_s)
        ]
        out.append(Pair(device_id, after, before, previous))  # type: ignore[arg-type]
    return out


def _histograms(rows: list[Reading]) -> evidence.Side:
    """The readings' histograms as a matrix over the buckets any of them uses (the others stay empty)."""
    columns = np.array(sorted({i for r in rows for i, _ in r.buckets if 0 <= i < _BUCKETS}), dtype=int)
    where = {int(b): j for j, b in enumerate(columns)}
    matrix = np.zeros((len(rows), len(columns)))
    for i, r in enumerate(rows):
        for index, count in r.buckets:
            if index in where:
                matrix[i, where[index]] += count
    return evidence.Side(matrix, sum(r.count for r in rows), columns)


def _per_token(rows: list[Reading]) -> evidence.Side:
    return evidence.Side(np.array([[r.token_s, r.tokens] for r in rows], dtype=float), sum(r.count for r in rows))


def _memory(rows: list[Reading], own: bool) -> evidence.Side:
    values = [float((r.model_rss_bytes if own else r.rss_bytes) or 0) for r in rows]
    return evidence.Side(np.array(values).reshape(-1, 1), len(rows))


def _result(
    name: str, spec: GateSpec, threshold: float | None, estimate: evidence.Estimate | None, samples: int, **kw: Any
) -> GateResult:
    comparison: Literal["<=", ">="] = kw.pop("comparison", "<=")
    min_samples = kw.pop("min_samples", spec.min_samples)
    detail = kw.pop("detail", "")
    if threshold is None:
        return GateResult(
            name, estimate.value if estimate else None, None, comparison, samples, min_samples, "off", detail
        )
    if estimate is None:
        return GateResult(name, None, threshold, comparison, samples, min_samples, "waiting", detail)
    return GateResult(
        name,
        estimate.value,
        threshold,
        comparison,
        samples,
        min_samples,
        estimate.decide(threshold, comparison),
        detail,
        estimate.low,
        estimate.high,
        estimate.confidence,
    )


def error_gate(spec: GateSpec, pairs: list[Pair]) -> GateResult:
    errors = sum(r.errors for p in pairs for r in p.after)
    total = errors + sum(r.count for p in pairs for r in p.after)
    estimate = evidence.binomial_bounds(errors, total, spec.confidence) if total >= spec.min_samples else None
    detail = f"{errors} errors in {total} inferences" + ("" if estimate else f" (need {spec.min_samples})")
    return _result("error_rate", spec, spec.error_rate_max, estimate, total, detail=detail)


def latency_gate(spec: GateSpec, pairs: list[Pair], warmup_s: float, activated: dict[str, datetime]) -> GateResult:
    """p95 (or seconds per token, for generation) after over before, per device, combined over the wave."""
    ready: list[tuple[evidence.Side, evidence.Side]] = []
    generation = False
    no_baseline = growing = 0
    samples = 0
    for p in pairs:
        switched = _naive(activated[p.device_id])
        after = [r for r in p.after if (r.buckets or r.tokens) and not r.warming(warmup_s, switched)]
        before = [r for r in p.before if r.buckets or r.tokens]
        if sum(r.count for r in before) < spec.min_samples or len(before) < MIN_INTERVALS:
            no_baseline += 1
            continue
        if sum(r.count for r in after) < spec.min_samples or len(after) < MIN_INTERVALS:
            growing += 1
            continue
        per_token = all(r.tokens and r.token_s > 0 for r in before + after)
        generation = generation or per_token
        side = _per_token if per_token else _histograms
        ready.append((side(before), side(after)))
        samples += min(ready[-1][0].samples, ready[-1][1].samples)
    what = "seconds per token" if generation else "p95"
    if spec.p95_latency_ratio_max is not None and no_baseline == len(pairs) and pairs:
        # the baseline is in the past and cannot grow: waiting for it would only run into the deadline
        return GateResult(
            "p95_latency_ratio",
            None,
            spec.p95_latency_ratio_max,
            "<=",
            0,
            spec.min_samples,
            "off",
            f"no baseline: no device served a previous version for {spec.min_samples} inferences in the hour before",
        )
    if growing or not ready:
        estimate = None
    else:
        statistic = evidence.per_token_of if generation else evidence.p95_of
        estimate = evidence.paired_ratio(ready, statistic, spec.confidence)
    detail = f"{what} after/before on {len(ready)} devices"
    if growing:
        detail += f"; {growing} still gathering {spec.min_samples} inferences after warm-up"
    if no_baseline:
        detail += f"; {no_baseline} without a baseline (not judged)"
    return _result("p95_latency_ratio", spec, spec.p95_latency_ratio_max, estimate, samples, detail=detail)


def memory_gate(spec: GateSpec, pairs: list[Pair], warmup_s: float, activated: dict[str, datetime]) -> GateResult:
    """What the model costs on each device, new over previous, combined over the wave."""
    ready: list[tuple[evidence.Side, evidence.Side]] = []
    no_baseline = growing = 0
    own_all = True
    for p in pairs:
        after = [r for r in p.after if not r.warming(warmup_s, _naive(activated[p.device_id]))]
        before = p.before
        if len(before) < MIN_INTERVALS:
            no_baseline += 1
            continue
        if len(after) < MIN_INTERVALS:
            growing += 1
            continue
        own = all(r.model_rss_bytes is not None for r in before + after)
        own_all = own_all and own
        ready.append((_memory(before, own), _memory(after, own)))
    if spec.rss_ratio_max is not None and no_baseline == len(pairs) and pairs:
        return GateResult(
            "rss_ratio",
            None,
            spec.rss_ratio_max,
            "<=",
            0,
            MIN_INTERVALS,
            "off",
            "no baseline: no device reported its previous version in the hour before",
        )
    estimate = (
        None
        if growing or not ready
        else evidence.paired_ratio(ready, evidence.mean_of, spec.confidence, floor=RSS_FLOOR_BYTES)
    )
    measure = "the model's own memory" if own_all else "process RSS (an agent without a per-model measure)"
    detail = f"{measure}, after/before on {len(ready)} devices"
    if growing:
        detail += f"; {growing} still gathering {MIN_INTERVALS} reports after warm-up"
    return _result(
        "rss_ratio",
        spec,
        spec.rss_ratio_max,
        estimate,
        sum(s.samples for _, s in ready),
        min_samples=MIN_INTERVALS,
        detail=detail,
    )


def judge(
    spec: GateSpec, readings: Iterable[Reading], model: str, version: int, activated: dict[str, datetime]
) -> list[GateResult]:
    """The telemetry gates for the devices in ``activated`` (device -> switch time), from their readings."""
    pairs = pairs_for(readings, model, version, activated, spec.warmup_s)
    return [
        error_gate(spec, pairs),
        latency_gate(spec, pairs, spec.warmup_s, activated),
        memory_gate(spec, pairs, spec.warmup_s, activated),
    ]


def telemetry_gates(
    engine: Engine, spec: GateSpec, model: str, version: int, activated: dict[str, datetime]
) -> list[GateResult]:
    """``judge`` on what the database holds for the devices in ``activated``."""
    readings: list[Reading] = []
    if activated:
        t = table(TelemetryRecord)
        since = min(activated.values()) - BASELINE_WINDOW
        cols = (
            t.c.device_id,
            t.c.received_at,
            t.c.inference_count,
            t.c.inference_errors,
            t.c.rss_bytes,
            t.c.data,
            t.c.model,
            t.c.model_version,
        )
        with engine.connect() as conn:
            rows = conn.execute(select(*cols).where(t.c.device_id.in_(list(activated)), t.c.received_at >= since))
            readings = [Reading.from_row(row) for row in rows]
    return judge(spec, readings, model, version, activated)


def shadow_gate(spec: GateSpec, metrics: dict[str, dict[str, float]]) -> GateResult:
    """Agreement of the candidates with the active models, weighted by each device's shadow samples."""
    samples = 0
    weighted = 0.0
    for m in metrics.values():
        n = int(m.get("shadow_samples", 0))
        if n and "shadow_agreement" in m:
            samples += n
            weighted += m["shadow_agreement"] * n
    value = weighted / samples if samples else None
    threshold = spec.shadow_agreement_min
    detail = f"{len(metrics)} devices in shadow"
    if threshold is None or samples < spec.min_samples or value is None:
        status: Status = "off" if threshold is None else "waiting"
        return GateResult("shadow_agreement", value, threshold, ">=", samples, spec.min_samples, status, detail)
    status = "pass" if value >= threshold else "fail"
    return GateResult("shadow_agreement", value, threshold, ">=", samples, spec.min_samples, status, detail)


def passed_reason(wave_index: int) -> str:
    """The audit log's reason when a wave's gates pass (``passed_waves`` reads it back)."""
    return f"gates passed for wave {wave_index + 1}"


_PASSED = re.compile(r"^gates passed for wave (\d+)")


def passed_waves(transitions: Iterable[tuple[str, str]]) -> set[int]:
    """Indexes of the waves whose gates passed, from the audit log's ``(from_state, reason)`` pairs.

    A device has succeeded in a rollout once it serves the new version and its wave's gates passed: a
    wave moved on by an operator (``advance``) skipped its gates, and its devices are only "active"."""
    out = set()
    for from_state, reason in transitions:
        match = _PASSED.match(reason or "") if from_state == "gating" else None
        if match:
            out.add(int(match.group(1)) - 1)
    return out


def verdict(results: list[GateResult]) -> Status:
    statuses = {r.status for r in results}
    if "fail" in statuses:
        return "fail"
    if "waiting" in statuses:
        return "waiting"
    return "pass"
