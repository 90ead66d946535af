"""One bucket of fleet health: counts, a latency histogram in the agents' shared buckets, label counts and a
score histogram, added up from telemetry and merged with other buckets exactly."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from wire.histogram import quantile_from_buckets

#: labels kept per bucket (the wire message carries at most 256 per report); the rest count as OTHER
MAX_LABELS = 256
OTHER = "(other)"


@dataclass
class Health:
    reports: int = 0
    inferences: int = 0
    errors: int = 0
    drops: int = 0
    buckets: Counter[int] = field(default_factory=Counter)
    max_ms: float = 0.0
    #: p50 and p95 weighted by inferences, for reports that carry no histogram (a fallback, not exact)
    p50_sum: float = 0.0
    p95_sum: float = 0.0
    weight: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    score_edges: list[float] | None = None
    score_counts: list[int] = field(default_factory=list)
    #: score histograms whose edges differ from the first one seen (not mergeable, counted to say so)
    score_mismatches: int = 0

    # ------------------------------------------------------------- adding --

    def add_report(self, count: int, errors: int, inference: dict[str, Any] | None) -> None:
        """One telemetry message (``inference`` is its ``inference`` object, or None)."""
        self.reports += 1
        self.inferences += count
        self.errors += errors
        if not inference:
            return
        self.drops += int(inference.get("drops") or 0)
        latency = inference.get("latency") or {}
        pairs = latency.get("buckets") or []
        if pairs:
            for index, n in pairs:
                self.buckets[int(index)] += int(n)
            self.max_ms = max(self.max_ms, float(latency.get("max_ms") or 0.0))
        elif latency and count:
            self.p50_sum += float(latency.get("p50_ms") or 0.0) * count
            self.p95_sum += float(latency.get("p95_ms") or 0.0) * count
            self.weight += count
        drift = inference.get("drift") or {}
        self._add_labels(drift.get("label_counts") or {})
        self._add_scores(drift.get("score_edges") or [], drift.get("score_hist") or [])

    def _add_labels(self, counts: dict[str, int]) -> None:
        for label, n in counts.items():
            key = str(label)
            if key in self.labels or len(self.labels) < MAX_LABELS - 1:
                self.labels[key] += int(n)
            else:
                self.labels[OTHER] += int(n)

    def _add_scores(self, edges: list[float], counts: list[int]) -> None:
        if not counts or len(edges) != len(counts) + 1:
            return
        if self.score_edges is None:
            self.score_edges = [float(e) for e in edges]
            self.score_counts = [0] * len(counts)
        elif edges != self.score_edges and (  # the same edges (the agents' constant) are equal floats: fast
            len(edges) != len(self.score_edges)
            or any(not math.isclose(a, b, abs_tol=1e-9) for a, b in zip(edges, self.score_edges, strict=True))
        ):
            self.score_mismatches += 1
            return
        self.score_counts = [a + int(b) for a, b in zip(self.score_counts, counts, strict=True)]

    def merge(self, other: Health) -> None:
        self.reports += other.reports
        self.inferences += other.inferences
        self.errors += other.errors
        self.drops += other.drops
        self.buckets.update(other.buckets)
        self.max_ms = max(self.max_ms, other.max_ms)
        self.p50_sum += other.p50_sum
        self.p95_sum += other.p95_sum
        self.weight += other.weight
        self._add_labels(dict(other.labels))
        if other.score_edges is not None:
            self._add_scores(other.score_edges, other.score_counts)
        self.score_mismatches += other.score_mismatches

    # ---------------------------------------------------------- as stored --

    def columns(self) -> dict[str, Any]:
        """The values of a ``health_rollup`` row (without its key)."""
        return {
            "reports": self.reports,
            "inferences": self.inferences,
            "errors": self.errors,
            "drops": self.drops,
            "latency": {
                "buckets": {str(k): v for k, v in sorted(self.buckets.items()) if v},
                "max_ms": self.max_ms,
                "p50_sum": self.p50_sum,
                "p95_sum": self.p95_sum,
                "weight": self.weight,
            },
            "labels": dict(self.labels),
            "scores": {"edges": self.score_edges, "counts": self.score_counts} if self.score_edges else {},
        }

    @classmethod
    def from_columns(cls, row: Any) -> Health:
        """A ``health_rollup`` row (anything with its column attributes) back into a Health."""
        latency = row.latency or {}
        scores = row.scores or {}
        return cls(
            reports=row.reports,
            inferences=row.inferences,
            errors=row.errors,
            drops=row.drops,
            buckets=Counter({int(k): int(v) for k, v in (latency.get("buckets") or {}).items()}),
            max_ms=float(latency.get("max_ms") or 0.0),
            p50_sum=float(latency.get("p50_sum") or 0.0),
            p95_sum=float(latency.get("p95_sum") or 0.0),
            weight=int(latency.get("weight") or 0),
            labels=Counter({str(k): int(v) for k, v in (row.labels or {}).items()}),
            score_edges=[float(e) for e in scores["edges"]] if scores.get("edges") else None,
            score_counts=[int(c) for c in scores.get("counts") or []],
        )

    # ------------------------------------------------------------ reading --

    @property
    def error_rate(self) -> float | None:
        """Errors per inference attempt, as the rollout gates count it."""
        attempts = self.inferences + self.errors
        return self.errors / attempts if attempts else None

    def latency_quantile(self, q: float) -> float | None:
        """Fleet latency quantile: exact from the merged buckets, else the inference-weighted mean of the
        devices' own percentiles (reports without a histogram)."""
        if sum(self.buckets.values()):
            return quantile_from_buckets(self.buckets.items(), q, self.max_ms or None)
        if self.weight:
            return (self.p50_sum if q <= 0.5 else self.p95_sum) / self.weight
        return None

    def score_quantile(self, q: float) -> float | None:
        """The ``q`` quantile of the scores, interpolated inside a histogram bin."""
        if self.score_edges is None:
            return None
        total = sum(self.score_counts)
        if not total:
            return None
        rank, seen = q * total, 0
        for i, n in enumerate(self.score_counts):
            if n and seen + n >= rank:
                lo, hi = self.score_edges[i], self.score_edges[i + 1]
                return lo + (hi - lo) * (rank - seen) / n
            seen += n
        return self.score_edges[-1]


def psi(expected: list[float], actual: list[float], floor: float = 1e-4) -> float | None:
    """Population stability index of two distributions over the same bins (counts or shares).

    0 is no change; by the usual reading below 0.1 is stable, 0.1-0.25 a moderate shift, above 0.25 a
    large one. Empty bins are floored so a bin that appears or vanishes counts without dividing by zero.
    """
    e_total, a_total = sum(expected), sum(actual)
    if e_total <= 0 or a_total <= 0:
        return None
    value = 0.0
    for e, a in zip(expected, actual, strict=True):
        pe, pa = max(e / e_total, floor), max(a / a_total, floor)
        value += (pa - pe) * math.log(pa / pe)
    return value
