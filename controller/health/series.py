"""Fleet health read back for the dashboard: a version's series over a time range, and every version's
last minutes. A page reads a few hundred bucket rows, never the telemetry table."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select

from controller.db.models import HealthRollup, table
from controller.db.types import from_epoch, utcnow
from controller.health.aggregate import OTHER, Health, psi
from controller.health.rollup import RESOLUTIONS

#: the ranges the page offers (name -> seconds)
RANGES = {"1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
DEFAULT_RANGE = "24h"
#: most points a chart gets (steps are whole multiples of the stored resolution)
MAX_POINTS = 360
#: labels drawn one by one; the others are summed as OTHER
TOP_LABELS = 8
#: the last minutes the fleet page and the version list summarize
RECENT = timedelta(minutes=15)


def resolution_for(range_s: int) -> int:
    """The coarsest stored resolution that gives a chart of ``range_s`` at least 90 points."""
    fitting = [r for r in RESOLUTIONS if range_s / r >= 90]
    return max(fitting) if fitting else RESOLUTIONS[0]


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def version_series(
    conn: Connection, model: str, version: int, range_s: int, now: datetime | None = None
) -> dict[str, Any]:
    """Columns for the charts of one model version over the last ``range_s`` seconds (oldest first).

    Empty steps are None (the charts show a gap, not a zero). Drift is measured against the first quarter
    of the range that has data (the reference): PSI of the label distribution and of the score histogram
    per step, and the reference against the last quarter as two histograms.
    """
    now = now or utcnow()
    resolution = resolution_for(range_s)
    step = resolution * max(1, math.ceil(range_s / resolution / MAX_POINTS))
    end = now.timestamp()
    start = end - range_s
    start -= start % step
    n_steps = max(1, math.ceil((end - start) / step))
    c = table(HealthRollup).c
    rows = conn.execute(
        select(
            c.bucket_start, c.reports, c.inferences, c.errors, c.drops, c.latency, c.labels, c.scores, c.variant
        )
        .where(
            c.model == model,
            c.model_version == version,
            c.resolution_s == resolution,
            c.bucket_start >= from_epoch(start),
        )
        .order_by(c.bucket_start)
    ).all()
    steps: list[Health | None] = [None] * n_steps
    variants: Counter[str] = Counter()
    for row in rows:
        i = int((row.bucket_start.timestamp() - start) // step)
        if not 0 <= i < n_steps:
            continue
        bucket = Health.from_columns(row)
        variants[row.variant] += row.inferences
        current = steps[i]
        if current is None:
            steps[i] = bucket
        else:
            current.merge(bucket)
    filled = [i for i, h in enumerate(steps) if h is not None and h.reports]
    total = Health()
    for some in steps:
        if some is not None:
            total.merge(some)
    names = [name for name, _ in total.labels.most_common() if name != OTHER][:TOP_LABELS]
    reference, recent = Health(), Health()
    if filled:
        span = filled[-1] - filled[0] + 1
        cut_ref, cut_recent = filled[0] + max(1, span // 4), filled[-1] - max(1, span // 4)
        for i in filled:
            part = steps[i]
            assert part is not None
            if i < cut_ref:
                reference.merge(part)
            if i > cut_recent:
                recent.merge(part)
    ref_labels = _label_vector(reference, names)
    out: dict[str, Any] = {
        "model": model,
        "version": version,
        "range_s": range_s,
        "step_s": step,
        "resolution_s": resolution,
        "t": [],
        "reports": [],
        "per_s": [],
        "errors_per_s": [],
        "error_rate": [],
        "p50": [],
        "p95": [],
        "labels": {"names": [*names, OTHER], "shares": [[] for _ in range(len(names) + 1)]},
        "scores": {"q10": [], "q50": [], "q90": []},
        "psi": {"labels": [], "scores": []},
    }
    for i, h in enumerate(steps):
        out["t"].append(int(start + i * step))
        if h is None or not h.reports:
            for key in ("reports", "per_s", "errors_per_s", "error_rate", "p50", "p95"):
                out[key].append(None)
            for series in out["labels"]["shares"]:
                series.append(None)
            for key in ("q10", "q50", "q90"):
                out["scores"][key].append(None)
            out["psi"]["labels"].append(None)
            out["psi"]["scores"].append(None)
            continue
        out["reports"].append(h.reports)
        out["per_s"].append(_r(h.inferences / step))
        out["errors_per_s"].append(_r(h.errors / step))
        out["error_rate"].append(_r(h.error_rate, 5))
        out["p50"].append(_r(h.latency_quantile(0.5), 3))
        out["p95"].append(_r(h.latency_quantile(0.95), 3))
        vector = _label_vector(h, names)
        counted = sum(vector)
        for k, series in enumerate(out["labels"]["shares"]):
            series.append(_r(vector[k] / counted) if counted else None)
        for key, q in (("q10", 0.1), ("q50", 0.5), ("q90", 0.9)):
            out["scores"][key].append(_r(h.score_quantile(q)))
        out["psi"]["labels"].append(_r(psi(ref_labels, vector)) if counted else None)
        out["psi"]["scores"].append(_r(_score_psi(reference, h)))
    out["scores"]["edges"] = total.score_edges or []
    out["scores"]["reference"] = _shares(reference.score_counts) if reference.score_edges else []
    out["scores"]["recent"] = _shares(recent.score_counts) if recent.score_edges else []
    # the rate while devices reported (a version that started ten minutes ago is not averaged over a day)
    out["summary"] = summary_of(total, len(filled) * step)
    out["summary"]["variants"] = [v for v, _ in variants.most_common()]
    out["summary"]["label_psi"] = _r(psi(ref_labels, _label_vector(recent, names)))
    out["summary"]["score_psi"] = _r(_score_psi(reference, recent))
    return out


def _label_vector(h: Health, names: list[str]) -> list[float]:
    """Counts of ``names`` in ``h``, then everything else summed (the OTHER bin)."""
    picked = [float(h.labels.get(n, 0)) for n in names]
    return [*picked, float(sum(h.labels.values()) - sum(picked))]


def _score_psi(reference: Health, h: Health) -> float | None:
    if reference.score_edges is None or h.score_edges is None or len(reference.score_counts) != len(h.score_counts):
        return None
    return psi([float(x) for x in reference.score_counts], [float(x) for x in h.score_counts])


def _shares(counts: list[int]) -> list[float]:
    total = sum(counts)
    return [round(c / total, 5) if total else 0.0 for c in counts]


def summary_of(h: Health, seconds: float) -> dict[str, Any]:
    return {
        "reports": h.reports,
        "inferences": h.inferences,
        "errors": h.errors,
        "drops": h.drops,
        "per_s": _r(h.inferences / seconds) if seconds else None,
        "error_rate": _r(h.error_rate, 5),
        "p50_ms": _r(h.latency_quantile(0.5), 3),
        "p95_ms": _r(h.latency_quantile(0.95), 3),
        "top_labels": [(name, n) for name, n in h.labels.most_common(3)],
    }


@dataclass
class VersionHealth:
    model: str
    version: int
    summary: dict[str, Any]


def recent_by_version(conn: Connection, window: timedelta = RECENT, now: datetime | None = None) -> list[VersionHealth]:
    """Every model version's health over the last ``window`` (minute buckets), busiest first: one query."""
    now = now or utcnow()
    since = now - window
    c = table(HealthRollup).c
    per: dict[tuple[str, int], Health] = defaultdict(Health)
    for row in conn.execute(
        select(
            c.model, c.model_version, c.reports, c.inferences, c.errors, c.drops, c.latency, c.labels, c.scores
        ).where(c.resolution_s == 60, c.bucket_start >= from_epoch(since.timestamp() - since.timestamp() % 60))
    ):
        per[(row.model, row.model_version)].merge(Health.from_columns(row))
    seconds = window.total_seconds()
    items = [VersionHealth(m, v, summary_of(h, seconds)) for (m, v), h in per.items()]
    items.sort(key=lambda x: (-x.summary["inferences"], x.model, -x.version))
    return items
