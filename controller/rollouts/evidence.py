"""Decisions with stated confidence: pass, fail or "not enough evidence yet".

Ratio gates (latency, memory) are paired: each device is compared with itself, before and after, as
log ratios; the wave's estimate is the mean log ratio over its devices. The interval comes from a
two-level bootstrap (devices, then each device's telemetry intervals on each side), so it holds both
the device-to-device spread and the noise within a device, including intervals that differ (load, time
of day). The error rate is pooled over the wave with exact binomial (Clopper-Pearson) bounds. Both sides are one-sided
bounds at the gate's confidence: the gate passes once the upper bound is within the threshold, fails
once the lower bound is beyond it, and waits while the threshold lies inside the interval.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from wire.histogram import BUCKET_BOUNDS_MS

Decision = Literal["pass", "fail", "waiting"]
#: bootstrap replicates: the bounds' own sampling error is about 1% of the interval's width at 2,000
REPLICATES = 2000
#: a fixed seed, so the same telemetry always gives the same decision
SEED = 20261207

_UPPER = np.array(BUCKET_BOUNDS_MS)
_LOWER = np.concatenate(([0.0], _UPPER[:-1]))


@dataclass(frozen=True)
class Estimate:
    """An estimate with a one-sided bound on each side at ``confidence`` (both from the same test)."""

    value: float
    low: float
    high: float
    confidence: float

    def decide(self, threshold: float, comparison: Literal["<=", ">="] = "<=") -> Decision:
        if comparison == "<=":
            if self.high <= threshold:
                return "pass"
            return "fail" if self.low > threshold else "waiting"
        if self.low >= threshold:
            return "pass"
        return "fail" if self.high < threshold else "waiting"


def _binomial_cdf(x: int, n: int, p: float) -> float:
    """P(X <= x) for X ~ Binomial(n, p), summed in log space (exact; fine for millions of trials)."""
    if x < 0:
        return 0.0
    if x >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    k = np.arange(x)
    steps = np.log(n - k) - np.log(k + 1) + math.log(p) - math.log1p(-p)
    logs = n * math.log1p(-p) + np.concatenate(([0.0], np.cumsum(steps)))
    top = logs.max()
    return float(min(1.0, math.exp(top) * np.exp(logs - top).sum()))


def _solve(f: Callable[[float], float], target: float) -> float:
    """The p in [0, 1] where the decreasing ``f`` crosses ``target`` (bisection to 2**-50)."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def binomial_bounds(errors: int, total: int, confidence: float) -> Estimate:
    """The error rate with exact one-sided (Clopper-Pearson) bounds: a few errors in few trials prove little,
    which a normal approximation (or Wilson's) overstates at rates near 0."""
    if total <= 0:
        return Estimate(math.nan, 0.0, 1.0, confidence)
    alpha = 1.0 - confidence
    # low: the rate at which this many errors or more happen only alpha of the time (P(X >= errors) = alpha,
    # i.e. P(X <= errors - 1) = confidence); high: the rate at which this few happen only alpha of the time
    low = 0.0 if errors == 0 else _solve(lambda p: _binomial_cdf(errors - 1, total, p), confidence)
    high = 1.0 if errors >= total else _solve(lambda p: _binomial_cdf(errors, total, p), alpha)
    return Estimate(errors / total, low, high, confidence)


# ------------------------------------------------------------- per-row statistics --


def histogram_quantile(histograms: np.ndarray, q: float, columns: np.ndarray | None = None) -> np.ndarray:
    """The ``q`` quantile of each row of ``histograms`` (counts over the shared latency buckets, (B, 104),
    or over the buckets ``columns`` only), interpolated inside the bucket like the agent's
    ``wire.histogram.quantile_from_buckets``."""
    lower, upper = (_LOWER, _UPPER) if columns is None else (_LOWER[columns], _UPPER[columns])
    cumulative = np.cumsum(histograms, axis=1)
    total = cumulative[:, -1]
    rank = q * total
    index = np.argmax(cumulative >= rank[:, None], axis=1)
    rows = np.arange(histograms.shape[0])
    below = np.where(index > 0, cumulative[rows, np.maximum(index - 1, 0)], 0.0)
    count = np.maximum(histograms[rows, index], 1e-12)
    frac = np.clip((rank - below) / count, 0.0, 1.0)
    return lower[index] + (upper[index] - lower[index]) * frac


@dataclass(frozen=True)
class Side:
    """One device's intervals on one side (before or after), as the statistic reads them."""

    #: (k, c) latency histograms over the buckets ``columns``, or (k, 2) [per-token seconds, tokens], or
    #: (k, 1) memory
    rows: np.ndarray
    samples: int
    columns: np.ndarray | None = None

    @property
    def intervals(self) -> int:
        return int(self.rows.shape[0])


def p95_of(weights: np.ndarray, side: Side) -> np.ndarray:
    return histogram_quantile(weights @ side.rows, 0.95, side.columns)


def per_token_of(weights: np.ndarray, side: Side) -> np.ndarray:
    """Seconds per generated token: total generation time over total tokens."""
    return (weights @ side.rows[:, 0]) / np.maximum(weights @ side.rows[:, 1], 1e-12)


def mean_of(weights: np.ndarray, side: Side) -> np.ndarray:
    return (weights @ side.rows[:, 0]) / np.maximum(weights.sum(axis=1), 1e-12)


def _resample_weights(rng: np.random.Generator, k: int, replicates: int) -> np.ndarray:
    """How often each of ``k`` intervals is drawn in each replicate (k draws with replacement): (B, k)."""
    drawn = rng.integers(0, k, size=(replicates, k)) + k * np.arange(replicates)[:, None]
    return np.bincount(drawn.ravel(), minlength=replicates * k).reshape(replicates, k).astype(float)


#: a side's bootstrap, kept while the side is unchanged: a baseline does not grow during a wave, and the
#: engine judges the same wave every second (about 16 KB an entry at 2,000 replicates)
_SIDES: OrderedDict[bytes, np.ndarray] = OrderedDict()
SIDES_KEPT = 2048


def _side_logs(
    side: Side, statistic: Callable[[np.ndarray, Side], np.ndarray], replicates: int, floor: float
) -> np.ndarray:
    """log(statistic) of the side itself, then of ``replicates`` resamples of its intervals: (1 + B,).

    Seeded by the side's own content, so the same intervals always give the same replicates."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (side.rows, side.columns if side.columns is not None else np.empty(0)):
        digest.update(np.ascontiguousarray(part).tobytes())
        digest.update(str(part.shape).encode())
    digest.update(f"{statistic.__name__}:{replicates}:{floor}".encode())
    key = digest.digest()
    cached = _SIDES.get(key)
    if cached is not None:
        _SIDES.move_to_end(key)
        return cached
    rng = np.random.default_rng([SEED, int.from_bytes(key[:8], "little")])
    k = side.intervals
    weights = np.vstack([np.ones((1, k)), _resample_weights(rng, k, replicates)])
    logs = np.log(np.maximum(statistic(weights, side), max(floor, 1e-12)))
    _SIDES[key] = logs
    while len(_SIDES) > SIDES_KEPT:
        _SIDES.popitem(last=False)
    return logs


def paired_ratio(
    pairs: Sequence[tuple[Side, Side]],
    statistic: Callable[[np.ndarray, Side], np.ndarray],
    confidence: float,
    replicates: int = REPLICATES,
    floor: float = 0.0,
) -> Estimate:
    """The wave's after/before ratio: geometric mean over devices of each device's own ratio.

    ``pairs`` holds (before, after) per device. ``floor`` is the smallest value a side is taken to have
    (a memory cost below the measurement's resolution is not a ratio worth judging).
    """
    if not pairs:
        raise ValueError("no device with both sides")
    rng = np.random.default_rng(SEED)
    point = np.empty(len(pairs))
    boot = np.empty((len(pairs), replicates))
    for d, (before, after) in enumerate(pairs):
        logs = [_side_logs(side, statistic, replicates, floor) for side in (before, after)]
        diff = logs[1] - logs[0]
        point[d], boot[d] = diff[0], diff[1:]
    n = len(pairs)
    if n == 1:
        means = boot[0]
    else:  # devices resampled too: a fleet whose devices disagree gets a wide interval
        picks = rng.integers(0, n, size=(replicates, n))
        means = boot[picks, np.arange(replicates)[:, None]].mean(axis=1)
    low, high = np.quantile(means, [1 - confidence, confidence])
    return Estimate(math.exp(point.mean()), math.exp(low), math.exp(high), confidence)
