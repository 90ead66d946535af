"""Thread-safe inference counters that the telemetry loop snapshots and resets each interval."""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Iterable

from wire.histogram import LatencyHistogram
from wire.messages import DriftStats, InferenceStats, LatencySummary

#: Score histogram edges for drift signals (scores are expected in [0, 1]; outside clamps).
SCORE_EDGES: tuple[float, ...] = tuple(i / 20 for i in range(21))
#: Distinct labels kept per interval (the wire message allows 256); the rest are counted as "(other)".
MAX_LABELS = 255
OTHER_LABEL = "(other)"


class InferenceCounters:
    """Collects what the inference workers do; ``snapshot()`` returns and resets one interval.

    Latencies are per record, from the moment it was queued to its result (what an application
    waits), so queueing and micro-batching delays are in them. ``queue_depth`` is a gauge: whoever
    owns the queue sets it, or passes it to ``snapshot``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()
        self.queue_depth = 0
        #: totals since the start (never reset), for health endpoints and tests
        self.total_count = 0
        self.total_errors = 0
        self.total_drops = 0

    def _reset(self) -> None:
        self._hist = LatencyHistogram()
        self._errors = 0
        self._drops = 0
        self._tokens = 0
        self._token_time_s = 0.0
        self._labels: Counter[str] = Counter()
        self._scores = [0] * (len(SCORE_EDGES) - 1)
        self._scored = False

    def record(self, latency_ms: float, n: int = 1) -> None:
        """Record ``n`` inferences that each took ``latency_ms`` (a batch of n shares its latency)."""
        with self._lock:
            for _ in range(n):
                self._hist.record(latency_ms)
            self.total_count += n

    def record_many(self, latencies_ms: Iterable[float]) -> None:
        """Record one inference per latency (a batch whose records waited different times)."""
        with self._lock:
            n = 0
            for value in latencies_ms:
                self._hist.record(value)
                n += 1
            self.total_count += n

    def record_error(self, n: int = 1) -> None:
        with self._lock:
            self._errors += n
            self.total_errors += n

    def record_drop(self, n: int = 1) -> None:
        with self._lock:
            self._drops += n
            self.total_drops += n

    def record_tokens(self, tokens: int, seconds: float) -> None:
        """``tokens`` generated in ``seconds`` of generation time (tokens/s is their ratio per interval)."""
        with self._lock:
            self._tokens += tokens
            self._token_time_s += seconds

    def record_label(self, label: str) -> None:
        key = label[:128] or "(empty)"
        with self._lock:
            if key in self._labels or len(self._labels) < MAX_LABELS:
                self._labels[key] += 1
            else:
                self._labels[OTHER_LABEL] += 1

    def record_score(self, score: float) -> None:
        top = len(self._scores) - 1
        idx = min(top, max(0, int(score * top + 1e-12))) if math.isfinite(score) else top
        with self._lock:
            self._scores[idx] += 1
            self._scored = True

    def snapshot(self, interval_s: float, queue_depth: int | None = None) -> InferenceStats | None:
        """Stats since the previous snapshot, or None if the interval saw no activity at all."""
        if queue_depth is not None:
            self.queue_depth = queue_depth
        with self._lock:
            hist, errors, drops = self._hist, self._errors, self._drops
            tokens, token_time = self._tokens, self._token_time_s
            labels, scores, scored = self._labels, self._scores, self._scored
            self._reset()
        if hist.total == 0 and errors == 0 and drops == 0 and self.queue_depth == 0:
            return None
        latency = None
        if hist.total:
            latency = LatencySummary(
                p50_ms=hist.quantile(0.50),
                p95_ms=hist.quantile(0.95),
                p99_ms=hist.quantile(0.99),
                mean_ms=hist.mean_ms,
                max_ms=hist.max_ms,
                buckets=hist.sparse(),
            )
        drift = None
        if labels or scored:
            drift = DriftStats(
                label_counts=dict(labels.most_common(256)),
                score_hist=scores if scored else [],
                score_edges=list(SCORE_EDGES) if scored else [],
            )
        return InferenceStats(
            count=hist.total,
            errors=errors,
            drops=drops,
            queue_depth=self.queue_depth,
            throughput_per_s=hist.total / interval_s if interval_s > 0 else 0.0,
            latency=latency,
            tokens=tokens,
            tokens_per_s=(tokens / token_time) if token_time > 0 else None,
            drift=drift,
        )
