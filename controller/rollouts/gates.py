"""Gates: how the new model behaves on a wave's devices, against thresholds, with minimum samples.

* error rate: errors / (inferences + errors) on the new version since each device switched;
* p95 latency relative to the same devices on their previous version (histograms merged exactly);
* memory (mean RSS) relative to the same devices before;
* shadow agreement: the candidate against the active model on live inputs, before anything switched.

A gate with too few samples waits; the engine fails it at its deadline.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Engine, select

from controller.db.models import TelemetryRecord, table
from controller.rollouts.plan import GateSpec
from wire.histogram import quantile_from_buckets

Status = Literal["pass", "fail", "waiting", "off"]
#: how far back before a wave started its devices' previous-version telemetry is taken
BASELINE_WINDOW = timedelta(hours=1)
#: telemetry messages (per side) the memory gate needs: RSS is one value per message
RSS_MIN_MESSAGES = 3


@dataclass
class GateResult:
    name: str
    value: float | None
    threshold: float | None
    comparison: Literal["<=", ">="]
    samples: int
    min_samples: int
    status: Status
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Side:
    count: int = 0
    errors: int = 0
    buckets: dict[int, int] | None = None
    max_ms: float = 0.0
    rss_sum: float = 0.0
    rss_n: int = 0

    def add(self, row: Any) -> None:
        self.count += row.inference_count or 0
        self.errors += row.inference_errors or 0
        data = row.data if isinstance(row.data, dict) else json.loads(row.data)
        latency = (data.get("inference") or {}).get("latency") or {}
        if self.buckets is None:
            self.buckets = {}
        for index, count in latency.get("buckets", []):
            self.buckets[index] = self.buckets.get(index, 0) + count
        self.max_ms = max(self.max_ms, float(latency.get("max_ms", 0.0)))
        if row.rss_bytes:
            self.rss_sum += row.rss_bytes
            self.rss_n += 1

    def p95(self) -> float | None:
        if not self.buckets or not sum(self.buckets.values()):
            return None
        return quantile_from_buckets(self.buckets.items(), 0.95, self.max_ms or None)

    @property
    def rss(self) -> float | None:
        return self.rss_sum / self.rss_n if self.rss_n else None


def _judge(
    name: str,
    value: float | None,
    threshold: float | None,
    comparison: Literal["<=", ">="],
    samples: int,
    min_samples: int,
    detail: str = "",
) -> GateResult:
    if threshold is None:
        return GateResult(name, value, None, comparison, samples, min_samples, "off", detail)
    if samples < min_samples or value is None:
        return GateResult(
            name,
            value,
            threshold,
            comparison,
            samples,
            min_samples,
            "waiting",
            detail or f"{samples} of {min_samples} samples",
        )
    ok = value <= threshold if comparison == "<=" else value >= threshold
    return GateResult(name, value, threshold, comparison, samples, min_samples, "pass" if ok else "fail", detail)


def telemetry_gates(
    engine: Engine,
    spec: GateSpec,
    model: str,
    version: int,
    activated: dict[str, datetime],
    wave_started: datetime,
) -> list[GateResult]:
    """Error rate, p95 latency ratio and memory ratio for the devices in ``activated`` (device -> switch time)."""
    new, old = _Side(), _Side()
    if activated:
        t = table(TelemetryRecord)
        since = min(activated.values())
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
            rows = conn.execute(select(*cols).where(t.c.device_id.in_(list(activated)), t.c.received_at >= since)).all()
            base = conn.execute(
                select(*cols).where(
                    t.c.device_id.in_(list(activated)),
                    t.c.received_at < wave_started,
                    t.c.received_at >= wave_started - BASELINE_WINDOW,
                )
            ).all()
        for row in rows:
            if row.model == model and row.model_version == version and row.received_at >= activated[row.device_id]:
                new.add(row)
        for row in base:
            if not (row.model == model and row.model_version == version):
                old.add(row)
    results = []
    total = new.count + new.errors
    rate = new.errors / total if total else None
    results.append(
        _judge(
            "error_rate",
            rate,
            spec.error_rate_max,
            "<=",
            total,
            spec.min_samples,
            f"{new.errors} errors in {total} inferences",
        )
    )
    p95_new, p95_old = new.p95(), old.p95()
    if spec.p95_latency_ratio_max is not None and old.count < spec.min_samples:
        # the baseline is in the past and cannot grow: waiting for it would only run into the deadline
        results.append(
            GateResult(
                "p95_latency_ratio",
                None,
                spec.p95_latency_ratio_max,
                "<=",
                new.count,
                spec.min_samples,
                "off",
                f"no baseline: {old.count} inferences on the previous version in the hour before",
            )
        )
    else:
        ratio = p95_new / p95_old if p95_new is not None and p95_old else None
        detail = f"p95 {p95_new:.2f} ms now, {p95_old:.2f} ms before" if ratio is not None else ""
        results.append(
            _judge(
                "p95_latency_ratio",
                ratio,
                spec.p95_latency_ratio_max,
                "<=",
                min(new.count, old.count),
                spec.min_samples,
                detail,
            )
        )
    if spec.rss_ratio_max is not None and old.rss_n < RSS_MIN_MESSAGES:
        results.append(
            GateResult(
                "rss_ratio",
                None,
                spec.rss_ratio_max,
                "<=",
                new.rss_n,
                RSS_MIN_MESSAGES,
                "off",
                f"no baseline: {old.rss_n} telemetry messages from before the wave",
            )
        )
    else:
        new_rss, old_rss = new.rss, old.rss
        rss_ratio = new_rss / old_rss if new_rss is not None and old_rss else None
        detail = f"{new_rss / 2**20:.0f} MiB now, {old_rss / 2**20:.0f} MiB before" if new_rss and old_rss else ""
        results.append(
            _judge(
                "rss_ratio", rss_ratio, spec.rss_ratio_max, "<=", min(new.rss_n, old.rss_n), RSS_MIN_MESSAGES, detail
            )
        )
    return results


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
    return _judge(
        "shadow_agreement",
        value,
        spec.shadow_agreement_min,
        ">=",
        samples,
        spec.min_samples,
        f"{len(metrics)} devices in shadow",
    )


def verdict(results: list[GateResult]) -> Status:
    statuses = {r.status for r in results}
    if "fail" in statuses:
        return "fail"
    if "waiting" in statuses:
        return "waiting"
    return "pass"
