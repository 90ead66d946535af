import random

from wire.histogram import BUCKET_BOUNDS_MS, LatencyHistogram, bucket_index, quantile_from_buckets


def test_quantiles_are_within_one_bucket_of_the_exact_value() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(1.5, 0.8) for _ in range(5000)]
    hist = LatencyHistogram()
    for v in values:
        hist.record(v)
    values.sort()
    for q in (0.5, 0.95, 0.99):
        exact = values[int(q * len(values)) - 1]
        assert abs(hist.quantile(q) - exact) / exact < 0.2, q
    assert hist.max_ms == max(values)
    assert hist.total == 5000


def test_histograms_from_many_devices_merge_exactly() -> None:
    a, b, both = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    for i in range(1, 200):
        a.record(i * 0.5)
        both.record(i * 0.5)
        b.record(i * 3.0)
        both.record(i * 3.0)
    a.merge(b)
    assert a.sparse() == both.sparse()
    assert quantile_from_buckets(a.sparse(), 0.95) == both.quantile(0.95) or a.max_ms == both.max_ms


def test_bucket_edges() -> None:
    assert bucket_index(0) == 0
    assert bucket_index(BUCKET_BOUNDS_MS[10]) == 10
    assert bucket_index(1e12) == len(BUCKET_BOUNDS_MS) - 1
    hist = LatencyHistogram()
    hist.record(float("nan"))
    hist.record(-1)
    assert hist.total == 0
