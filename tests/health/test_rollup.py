"""Fleet health: telemetry summed into buckets per model version, exactly (merged histograms), incrementally
(no row lost or counted twice across runs and restarts), and read back as chart series with drift."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from controller.db.engine import make_engine, migrate
from controller.db.models import DeviceEvent, DeviceHealth, HealthRollup, table
from controller.health.aggregate import psi
from controller.health.rollup import HealthRollupJob
from controller.health.series import recent_by_version, version_series
from tests.controller.test_postgres import postgres_url  # noqa: F401 - fixture
from tests.health.support import latencies, report, store
from wire.histogram import LatencyHistogram

NOW = datetime.now(UTC).replace(second=30, microsecond=0)
V1 = ("clf", 1, "int8")
V2 = ("clf", 2, "int8")


def _series(engine: Engine, *args: Any, **kwargs: Any) -> dict[str, Any]:
    with engine.connect() as conn:
        return version_series(conn, *args, **kwargs)


def _recent(engine: Engine, **kwargs: Any) -> Any:
    with engine.connect() as conn:
        return recent_by_version(conn, **kwargs)


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    e = make_engine(f"sqlite:///{tmp_path / 'h.db'}")
    migrate(e)
    return e


def fleet_history(engine: Engine, hours: int = 6, devices: int = 4, seed: int = 3) -> dict[str, Any]:
    """``hours`` of telemetry every 10 minutes from ``devices`` devices on V1, whose outputs drift in the last
    third (more "anomaly", higher scores); returns what was sent, for the expectations."""
    rng = random.Random(seed)
    sent: dict[str, Any] = {"hist": LatencyHistogram(), "count": 0, "errors": 0, "labels": Counter()}
    rows = []
    steps = hours * 6
    for k in range(steps):
        at = NOW - timedelta(minutes=10 * (steps - k))
        drifted = k >= steps * 2 // 3
        for d in range(devices):
            lat = latencies(rng, 40, 12.0)
            labels = ["anomaly" if rng.random() < (0.6 if drifted else 0.1) else "normal" for _ in range(40)]
            scores = [min(0.999, rng.betavariate(5, 2) if drifted else rng.betavariate(2, 5)) for _ in range(40)]
            errors = 2 if d == 0 else 0
            rows.append((f"dev-{d}", report(V1, lat, labels=labels, scores=scores, errors=errors, seq=k), at))
            for v in lat:
                sent["hist"].record(v)
            sent["count"] += 40
            sent["errors"] += errors
            sent["labels"].update(labels)
    store(engine, rows)
    return sent


def test_a_version_series_is_exact_and_shows_drift(engine: Engine) -> None:
    sent = fleet_history(engine)
    job = HealthRollupJob(engine)
    assert job.run() == 6 * 6 * 4
    s = _series(engine, "clf", 1, 6 * 3600, now=NOW)
    assert s["resolution_s"] == 60 and s["step_s"] == 60
    total = s["summary"]
    assert total["inferences"] == sent["count"] and total["errors"] == sent["errors"]
    assert total["error_rate"] == pytest.approx(sent["errors"] / (sent["count"] + sent["errors"]), abs=1e-5)
    # fleet percentiles from merged buckets equal those of every latency put into one histogram
    assert total["p95_ms"] == pytest.approx(sent["hist"].quantile(0.95), rel=1e-3)
    assert total["p50_ms"] == pytest.approx(sent["hist"].quantile(0.5), rel=1e-3)
    filled = [i for i, n in enumerate(s["reports"]) if n]
    assert len(filled) == 36 and all(s["reports"][i] == 4 for i in filled)
    assert all(s["per_s"][i] == pytest.approx(160 / 60, rel=1e-3) for i in filled)
    gaps = [i for i, n in enumerate(s["reports"]) if n is None]
    assert gaps and all(s["p95"][i] is None for i in gaps)  # no data is a gap, not a zero
    names = s["labels"]["names"]
    assert names[:2] == ["normal", "anomaly"] and names[-1] == "(other)"
    anomaly = s["labels"]["shares"][1]
    early, late = [anomaly[i] for i in filled[:12]], [anomaly[i] for i in filled[-12:]]
    assert sum(early) / 12 < 0.25 < 0.45 < sum(late) / 12
    # drift against the first quarter: small before the change, large after
    label_psi = [s["psi"]["labels"][i] for i in filled]
    score_psi = [s["psi"]["scores"][i] for i in filled]
    assert max(label_psi[:20]) < 0.25 < min(label_psi[-10:])
    assert max(score_psi[:20]) < 0.5 < min(score_psi[-10:])
    assert s["summary"]["label_psi"] > 0.25 and s["summary"]["score_psi"] > 0.25
    q50 = [s["scores"]["q50"][i] for i in filled]
    assert max(q50[:20]) < 0.45 < min(q50[-10:])
    assert len(s["scores"]["edges"]) == 21 and sum(s["scores"]["reference"]) == pytest.approx(1, abs=1e-3)
    assert sum(s["scores"]["recent"][10:]) > 0.6  # the last quarter's scores sit high
    # a day's chart reads quarter-hour buckets, a week's hours, a month's 6-hour buckets: the same sums
    for range_s, resolution in ((86400, 900), (7 * 86400, 3600), (30 * 86400, 21600)):
        coarse = _series(engine, "clf", 1, range_s, now=NOW)
        assert coarse["resolution_s"] == resolution
        assert coarse["summary"]["inferences"] == sent["count"]
        assert coarse["summary"]["p95_ms"] == total["p95_ms"]


def test_sums_are_incremental_idempotent_and_survive_a_new_job(engine: Engine) -> None:
    rng = random.Random(1)
    store(engine, [("a", report(V2, latencies(rng, 10, 5.0)), NOW - timedelta(minutes=5))])
    assert HealthRollupJob(engine).run() == 1
    assert HealthRollupJob(engine).run() == 0  # a new job (a restart) resumes from the stored cursor
    store(engine, [("b", report(V2, latencies(rng, 30, 5.0)), NOW - timedelta(minutes=5))])
    job = HealthRollupJob(engine, batch=1)  # several batches in one call
    store(engine, [("c", report(V2, latencies(rng, 5, 5.0), errors=1), NOW - timedelta(minutes=4))])
    assert job.run() == 2
    with engine.connect() as conn:
        c = table(HealthRollup).c
        minutes = conn.execute(select(c.bucket_start, c.inferences, c.errors, c.reports).where(c.resolution_s == 60))
        by_minute = {r.bucket_start: (r.inferences, r.errors, r.reports) for r in minutes}
        coarser = dict(
            conn.execute(
                select(c.resolution_s, func.sum(c.inferences)).where(c.resolution_s > 60).group_by(c.resolution_s)
            ).all()
        )
    assert sorted(by_minute.values()) == [(5, 1, 1), (40, 0, 2)]
    assert coarser == {900: 45, 3600: 45, 21600: 45}
    assert _series(engine, "clf", 2, 3600, now=NOW)["summary"]["inferences"] == 45


def test_reports_without_a_model_or_histogram_still_count_where_they_can(engine: Engine) -> None:
    rng = random.Random(2)
    bare = report(V1, latencies(rng, 20, 8.0))
    inference = bare.inference
    assert inference is not None and inference.latency is not None
    latency = inference.latency.model_copy(update={"buckets": []})  # an agent that sends no histogram
    no_buckets = bare.model_copy(update={"inference": inference.model_copy(update={"latency": latency})})
    store(engine, [("a", no_buckets, NOW), ("b", report(None, latencies(rng, 5, 1.0)), NOW)])
    HealthRollupJob(engine).run()
    summary = _series(engine, "clf", 1, 3600, now=NOW + timedelta(seconds=20))["summary"]
    assert summary["inferences"] == 20  # the device serving nothing is not counted for any version
    assert summary["p95_ms"] == pytest.approx(inference.latency.p95_ms, abs=1e-3)  # the weighted fallback


def test_device_trouble_is_noted_from_errors_and_agent_error_events(engine: Engine) -> None:
    rng = random.Random(4)
    store(engine, [("ok", report(V1, latencies(rng, 5, 1.0)), NOW), ("bad", report(V1, [1.0], errors=3), NOW)])
    with engine.begin() as conn:
        base = {"ts": NOW, "seq": 1, "data": {}, "received_at": NOW}
        conn.execute(
            table(DeviceEvent).insert(),
            [
                {**base, "device_id": "sad", "type": "agent", "kind": "error", "message": "model failed to load"},
                {**base, "device_id": "ok", "type": "agent", "kind": "started", "message": "agent started"},
            ],
        )
    HealthRollupJob(engine).run()
    with engine.connect() as conn:
        c = table(DeviceHealth).c
        trouble = {r.device_id: r.last_error for r in conn.execute(select(c.device_id, c.last_error))}
    assert set(trouble) == {"bad", "sad"}
    assert "3 inference errors" in trouble["bad"] and trouble["sad"] == "model failed to load"


def test_recent_health_of_every_version_in_one_query(engine: Engine) -> None:
    rng = random.Random(5)
    store(
        engine,
        [
            ("a", report(V1, latencies(rng, 100, 10.0)), NOW - timedelta(minutes=2)),
            ("b", report(V2, latencies(rng, 10, 30.0), errors=5), NOW - timedelta(minutes=3)),
            ("c", report(V2, latencies(rng, 10, 30.0)), NOW - timedelta(hours=2)),  # too old for "recent"
        ],
    )
    HealthRollupJob(engine).run()
    items = _recent(engine, now=NOW)
    assert [(x.model, x.version) for x in items] == [("clf", 1), ("clf", 2)]
    assert items[1].summary["inferences"] == 10 and items[1].summary["error_rate"] == pytest.approx(5 / 15, abs=1e-4)
    assert items[1].summary["p50_ms"] > items[0].summary["p50_ms"]


def test_old_buckets_are_pruned(engine: Engine) -> None:
    rng = random.Random(6)
    store(engine, [("a", report(V1, latencies(rng, 5, 1.0)), NOW - timedelta(days=5))])
    job = HealthRollupJob(engine)
    job.run()
    assert job.prune(NOW) == 1  # the minute bucket (kept 2 days); the coarser ones stay
    with engine.connect() as conn:
        assert sorted(conn.execute(select(table(HealthRollup).c.resolution_s)).scalars()) == [900, 3600, 21600]


def test_psi_reads_as_documented() -> None:
    assert psi([50, 50], [50, 50]) == pytest.approx(0)
    assert psi([90, 10], [85, 15]) < 0.1
    assert psi([90, 10], [40, 60]) > 0.25
    assert psi([0, 0], [1, 1]) is None


@pytest.mark.postgres
def test_the_same_on_postgresql(postgres_url: str) -> None:  # noqa: F811 - the fixture
    engine = make_engine(postgres_url)
    migrate(engine)
    try:
        sent = fleet_history(engine, hours=2, devices=2)
        HealthRollupJob(engine).run()
        store(engine, [("dev-9", report(V1, [1.0], errors=4), NOW)])
        HealthRollupJob(engine).run()
        s = _series(engine, "clf", 1, 3 * 3600, now=NOW)
        assert s["summary"]["inferences"] == sent["count"] + 1 and s["summary"]["errors"] == sent["errors"] + 4
        assert s["summary"]["p95_ms"] == pytest.approx(sent["hist"].quantile(0.95), rel=1e-3)
        with engine.connect() as conn:
            assert {r for r in conn.execute(select(table(DeviceHealth).c.device_id)).scalars()} == {"dev-0", "dev-9"}
    finally:
        engine.dispose()


def test_two_jobs_at_once_never_count_a_row_twice(engine: Engine) -> None:
    """Two controllers on one database (or a test calling run beside the scheduler): each row once."""
    import threading

    rng = random.Random(7)
    rows = [(f"d{i}", report(V1, latencies(rng, 10, 3.0)), NOW - timedelta(minutes=i % 30)) for i in range(400)]
    store(engine, rows)
    jobs = [HealthRollupJob(engine, batch=7) for _ in range(3)]
    threads = [threading.Thread(target=lambda j=j: [j.run() for _ in range(30)]) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    HealthRollupJob(engine, budget_s=60).run()  # whatever the races left
    with engine.connect() as conn:
        c = table(HealthRollup).c
        by_resolution = dict(
            conn.execute(select(c.resolution_s, func.sum(c.inferences)).group_by(c.resolution_s)).all()
        )
    assert by_resolution == {60: 4000, 900: 4000, 3600: 4000, 21600: 4000}
