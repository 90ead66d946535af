"""A fixed-bucket latency histogram whose buckets are part of the wire contract.

Buckets are geometric (ratio 2**0.25, about 19% wide) from 0.01 ms to about
10 minutes, so percentiles are within half a bucket and histograms from many
devices add up exactly on the controller.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable

_RATIO = 2**0.25
_FIRST_MS = 0.01
#: Upper bounds (ms) of each bucket; a value lands in the first bucket whose bound is >= it.
BUCKET_BOUNDS_MS: tuple[float, ...] = tuple(_FIRST_MS * _RATIO**i for i in range(104))


def bucket_index(value_ms: float) -> int:
    """Index of the bucket holding ``value_ms`` (the last bucket holds everything larger)."""
    i = bisect.bisect_left(BUCKET_BOUNDS_MS, value_ms)
    return min(i, len(BUCKET_BOUNDS_MS) - 1)


def bucket_range(index: int) -> tuple[float, float]:
    lo = 0.0 if index == 0 else BUCKET_BOUNDS_MS[index - 1]
    return lo, BUCKET_BOUNDS_MS[index]


def quantile_from_buckets(buckets: Iterable[tuple[int, int]], q: float, max_ms: float | None = None) -> float:
    """The ``q`` quantile (0..1) of sparse ``(index, count)`` buckets, interpolated inside the bucket."""
    pairs = sorted((i, c) for i, c in buckets if c > 0)
    total = sum(c for _, c in pairs)
    if total == 0:
        return 0.0
    rank = q * total
    seen = 0
    for index, count in pairs:
        if seen + count >= rank:
            lo, hi = bucket_range(index)
            if max_ms is not None:
                hi = min(hi, max_ms)
                lo = min(lo, hi)
            frac = (rank - seen) / count
            return lo + (hi - lo) * frac
        seen += count
    lo, hi = bucket_range(pairs[-1][0])
    return hi if max_ms is None else min(hi, max_ms)


class LatencyHistogram:
    """Counts of latencies in the shared buckets, plus exact sum, min and max. Not thread-safe."""

    __slots__ = ("counts", "total", "sum_ms", "max_ms")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.sum_ms = 0.0
        self.max_ms = 0.0

    def record(self, value_ms: float) -> None:
        if not math.isfinite(value_ms) or value_ms < 0:
            return
        i = bucket_index(value_ms)
        self.counts[i] = self.counts.get(i, 0) + 1
        self.total += 1
        self.sum_ms += value_ms
        if value_ms > self.max_ms:
            self.max_ms = value_ms

    def merge(self, other: LatencyHistogram) -> None:
        for i, c in other.counts.items():
            self.counts[i] = self.counts.get(i, 0) + c
        self.total += other.total
        self.sum_ms += other.sum_ms
        self.max_ms = max(self.max_ms, other.max_ms)

    def quantile(self, q: float) -> float:
        return quantile_from_buckets(self.counts.items(), q, self.max_ms)

    @property
    def mean_ms(self) -> float:
        return self.sum_ms / self.total if self.total else 0.0

    def sparse(self) -> list[tuple[int, int]]:
        return sorted(self.counts.items())
