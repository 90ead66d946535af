"""The controller's queries against both databases it supports, SQLite and PostgreSQL, after the migrations.

Each test runs twice (``db`` is parametrized); the PostgreSQL run uses $SLMFLEET_TEST_POSTGRES (default: the
local server on 127.0.0.1:5432 as user postgres) in a database of its own, created and dropped, and is skipped
with the reason when no server answers. What differs between the dialects is what is covered: JSON columns and
paths, timezone-aware datetimes, upserts, LIKE prefixes and their escaping, bulk inserts with driver values.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi import HTTPException
from sqlalchemy import Engine, select
from sqlmodel import Session

from controller.api.ids import resolve
from controller.db.bulk import BulkInsert
from controller.db.models import (
    AuditEntry,
    Deployment,
    DeploymentTarget,
    Device,
    Model,
    ModelVersion,
    TelemetryRecord,
    table,
)
from controller.delivery.store import TargetStore
from controller.delivery.targets import Target
from controller.devices.selectors import parse
from controller.rollouts.gates import telemetry_gates
from controller.rollouts.plan import GateSpec
from controller.telemetry.ingest import TELEMETRY_COLUMNS, TelemetryIn, telemetry_row
from controller.web.queries import count_matching, device_page, json_object_size
from tests.postgres import DIALECTS, migrated_engine
from wire.histogram import quantile_from_buckets
from wire.messages import InferenceStats, LatencySummary, ModelRef, Telemetry

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture(params=DIALECTS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated, empty database of the parametrized dialect."""
    with migrated_engine(request.param, tmp_path, "slmfleet_contract") as engine:
        yield engine


def add_deployment(engine: Engine, dep_id: str = "dep0000000000000000000000000001") -> str:
    with Session(engine) as s:
        model = Model(name=f"m-{dep_id[-6:]}", task="text-classification")
        s.add(model)
        s.flush()
        version = ModelVersion(model_id=model.id or 0, number=1, source="upload")
        s.add(version)
        s.flush()
        s.add(
            Deployment(
                id=dep_id,
                model_name=model.name,
                version_number=1,
                version_id=version.id or 0,
                device_ids=["d-1", "d-2"],
                shadow={"gate": {"agree": 0.9}},
                timeout_s=60.0,
            )
        )
        s.commit()
    return dep_id


# ------------------------------------------------------------------------------------------------ targets --


def test_targets_are_inserted_flushed_finished_and_resumed(db: Engine) -> None:
    dep = add_deployment(db)
    store = TargetStore(db, clock=lambda: T0.timestamp() + 100)
    previous = {"artifact": "b" * 64, "slot": "a"}  # written with the row, never changed after
    targets = [Target(dep, f"d-{i}", "a" * 64, "int8", previous=previous, started_at=T0.timestamp()) for i in (1, 2)]
    with Session(db) as s:
        for t in targets:
            store.insert(s, t)
        s.commit()
    for t in targets:
        store.add(t)
    targets[0].update(T0.timestamp() + 5, state="downloading", progress=0.5, metrics={"latency_ms": 1.5})
    assert store.flush() == 2 and store.flush() == 0, "written once, then nothing is dirty"
    assert store.state_counts() == {"downloading": 1, "pending": 1}

    resumed = TargetStore(db, clock=lambda: T0.timestamp() + 200)
    [(_, row, loaded)] = [(s, d, ts) for s, d, ts in resumed.resume()]
    assert row.id == dep and row.shadow == {"gate": {"agree": 0.9}} and row.device_ids == ["d-1", "d-2"]
    by_device = {t.device_id: t for t in loaded}
    one = by_device["d-1"]
    assert (one.state, one.progress, one.metrics, one.previous) == ("downloading", 0.5, {"latency_ms": 1.5}, previous)
    assert one.started_at == pytest.approx(T0.timestamp(), abs=1e-6), "a timezone-aware datetime round trip"
    assert resumed.state_counts() == {"downloading": 1, "pending": 1}
    assert resumed.knows("d-2", dep) and not resumed.knows("d-9", dep)

    one.update(T0.timestamp() + 300, state="active")
    resumed.finish(dep, "succeeded", loaded, None)
    with Session(db) as s:
        finished = s.get(Deployment, dep)
        assert finished is not None and finished.status == "succeeded" and finished.finished_at is not None
        assert finished.finished_at.tzinfo is not None
        target = s.exec(select(DeploymentTarget).where(DeploymentTarget.device_id == "d-1")).scalars().one()  # type: ignore[call-overload]
        assert target.state == "active" and target.finished_at == T0 + timedelta(seconds=300)
    assert list(TargetStore(db, clock=lambda: 0.0).resume()) == [], "a finished deployment is not resumed"
    assert [t.state for t in TargetStore(db, clock=lambda: 0.0).targets(dep) if t.device_id == "d-1"] == ["active"]


# ------------------------------------------------------------------------------------------------- ids --


def test_an_id_prefix_finds_the_only_match_and_escapes_like_wildcards(db: Engine) -> None:
    with Session(db) as s:
        for device_id in ("abc-1", "abd-2", "a%c", "a_c", "x\\y"):
            s.add(Device(id=device_id))
        s.commit()
        assert resolve(s, Device, "abc", "device").id == "abc-1"
        assert resolve(s, Device, "a%", "device").id == "a%c", "% is a character, not a wildcard"
        assert resolve(s, Device, "a_", "device").id == "a_c", "_ is a character, not a wildcard"
        assert resolve(s, Device, "x\\", "device").id == "x\\y"
        with pytest.raises(HTTPException) as ambiguous:
            resolve(s, Device, "ab", "device")
        assert ambiguous.value.status_code == 409 and "abc-1, abd-2" in str(ambiguous.value.detail)
        with pytest.raises(HTTPException) as missing:
            resolve(s, Device, "ABC", "device")
        assert missing.value.status_code == 404, "a prefix is case-sensitive on both databases"


# --------------------------------------------------------------------------------------------- devices --


def test_label_selectors_and_the_id_search_run_in_sql(db: Engine) -> None:
    with Session(db) as s:
        s.add(Device(id="d-oslo", labels={"site": "oslo", "tier": "a"}, status="online"))
        s.add(Device(id="d-rome", labels={"site": "rome"}))
        s.add(Device(id="d_bare", labels={}))
        s.commit()
    with db.connect() as conn:

        def ids(selector: str) -> list[str]:
            return [
                d["id"]
                for d in device_page(conn, status=None, selector=parse(selector), q=None, offset=0, limit=10).items
            ]

        assert ids("site=oslo") == ["d-oslo"]
        assert ids("site!=oslo") == ["d-rome", "d_bare"], "a device without the key matches key!=v"
        assert ids("site in (oslo,rome)") == ["d-oslo", "d-rome"]
        assert ids("site notin (oslo)") == ["d-rome", "d_bare"]
        assert ids("tier") == ["d-oslo"] and ids("!tier") == ["d-rome", "d_bare"]
        assert count_matching(conn, parse("site")) == 2
        page = device_page(conn, status="online", selector=parse(""), q=None, offset=0, limit=10)
        assert page.total == 1 and page.items[0]["labels"] == {"site": "oslo", "tier": "a"}
        found = device_page(conn, status=None, selector=parse(""), q="_", offset=0, limit=10)
        assert [d["id"] for d in found.items] == ["d_bare"], "the search escapes LIKE's _"
        assert page.items[0]["last_seen"].tzinfo is not None
        sizes = dict(conn.execute(select(table(Device).c.id, json_object_size(conn, table(Device).c.labels))).all())
        assert sizes == {"d-oslo": 2, "d-rome": 1, "d_bare": 0}


# ----------------------------------------------------------------------------------------- bulk inserts --


def telemetry_in(device_id: str, at: datetime, version: int, errors: int, bucket: int = 40) -> TelemetryIn:
    latency = LatencySummary(p50_ms=1.0, p95_ms=2.0, p99_ms=3.0, mean_ms=1.2, max_ms=4.0, buckets=[(bucket, 50)])
    msg = Telemetry(
        ts=at.timestamp(),
        seq=0,
        interval_s=10,
        uptime_s=86_400,  # long up: no restart, so no warm-up in these rows
        cpu_percent=3.5,
        rss_bytes=50_000_000,
        inference=InferenceStats(count=50, errors=errors, latency=latency),
        model=ModelRef(model="m", version=version, variant="int8"),
    )
    return TelemetryIn(device_id, msg, at.timestamp())


def test_ingested_telemetry_rows_are_what_the_gates_read(db: Engine) -> None:
    """The ingest's bulk insert hands the driver its own values (datetimes, JSON text); read back through the
    ORM and by the rollout gates they are the same instants and numbers on both databases: each device's
    baseline is its rows on the previous version before its own switch, the candidate's rows after it."""
    bulk = BulkInsert(db, table(TelemetryRecord), TELEMETRY_COLUMNS)
    switched = T0 + timedelta(minutes=10)
    devices = ("d-1", "d-2")
    ops = [telemetry_in(d, T0 + timedelta(minutes=i), 1, 0) for d in devices for i in range(3)]  # before
    ops += [telemetry_in(d, switched + timedelta(minutes=1 + i), 2, 1, bucket=44) for d in devices for i in range(3)]
    with db.begin() as conn:
        bulk.execute(conn, [telemetry_row(op, bulk.datetime) for op in ops])
    with Session(db) as s:
        rows = s.exec(select(TelemetryRecord).order_by(table(TelemetryRecord).c.id)).scalars().all()  # type: ignore[call-overload]
    assert [r.received_at for r in rows[:3]] == [T0 + timedelta(minutes=i) for i in range(3)]
    assert rows[0].ts == T0 and rows[0].data["inference"]["count"] == 50 and rows[6].model_version == 2
    spec = GateSpec(min_samples=100, warmup_s=0)
    results = {r.name: r for r in telemetry_gates(db, spec, "m", 2, dict.fromkeys(devices, switched))}
    errors = results["error_rate"]
    assert errors.samples == 6 * 51 and errors.value == pytest.approx(6 / 306), errors  # the candidate's rows only
    latency = results["p95_latency_ratio"]
    # the same histogram on every row of a side: the paired ratio is exactly the ratio of the two p95s
    before = quantile_from_buckets([(40, 150)], 0.95, None)
    after = quantile_from_buckets([(44, 150)], 0.95, None)
    assert latency.value == pytest.approx(after / before, rel=1e-6), latency
    assert latency.samples == 2 * 150 and latency.status == "fail", latency  # 3 rows of 50 a device after


def test_sqlite_datetime_text_is_what_the_datetime_type_writes() -> None:
    """The writer's cached SQLite datetime text (issue 16) is the text of ``fromtimestamp(...).isoformat``:
    the same rounding of microseconds (half to even, carrying into the next second), any second."""
    import random

    from controller.db.bulk import _sqlite_datetime

    rng = random.Random(16)
    values = [rng.uniform(0, 32_503_680_000.0) for _ in range(20_000)]
    values += [T0.timestamp() + rng.uniform(0, 5) for _ in range(20_000)]  # many in one second: the cache
    values += [k + 0.5e-6 for k in range(200)] + [k + 1.5e-6 for k in range(200)] + [1.9999995, 1.0000005, 0.0]
    values += [k + 0.9999996 for k in range(1_000_000_000, 1_000_000_300)]  # rounds up into the next second
    for v in values:
        want = datetime.fromtimestamp(v, UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
        assert _sqlite_datetime(v) == want, v


# --------------------------------------------------------------------------------------------- audit --


def test_audit_details_keep_nested_json_and_unicode(db: Engine) -> None:
    detail = {"labels": {"site": "zürich"}, "ids": [1, 2], "ok": True, "none": None}
    with Session(db) as s:
        s.add(AuditEntry(actor="admin", action="device.update", target="device:d-1", detail=detail, at=T0))
        s.commit()
    with Session(db) as s:
        entry = s.exec(select(AuditEntry)).scalars().one()  # type: ignore[call-overload]
    assert entry.detail == detail and entry.at == T0
