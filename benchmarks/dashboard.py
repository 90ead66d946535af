"""Dashboard pages rendered on the server with 5,000 devices in the database (goal: under 200 ms each).

Each page is requested through the ASGI app (Starlette's TestClient, logged in with a real session), so
the time is routing, authentication, queries and template rendering; the baseline is a trivial JSON
endpoint added to the same app and timed the same way in the same run, so ``net_ms`` is what the page
itself costs. ``queries`` counts SQL statements per request (a page that did one query per row would
show it here).
"""

from __future__ import annotations

import random
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, insert
from sqlmodel import Session

from controller.app import create_app
from controller.auth import users
from controller.auth.tokens import Role
from controller.db.models import (
    Artifact,
    AuditEntry,
    Deployment,
    DeploymentTarget,
    Device,
    DeviceEvent,
    HealthRollup,
    Model,
    ModelVersion,
    Rollout,
    RolloutTransition,
    TelemetryRecord,
    table,
)
from controller.health.aggregate import Health
from controller.health.rollup import HealthRollupJob
from controller.rollouts.plan import WaveSpec, assign
from controller.runtime import ControllerRuntime
from controller.settings import load_settings
from wire.histogram import bucket_index

DEVICES = 5000
GOAL_MS = 200.0
SITES = ("berlin", "paris", "austin", "tokyo", "lagos", "lima", "oslo", "pune")
HARDWARE = (("pi5", "aarch64", 8 * 2**30), ("jetson", "aarch64", 16 * 2**30), ("nuc", "x86_64", 32 * 2**30))
FLEETS = ("pumps", "turbines", "kiosks")
MODELS = (
    ("intent-classifier", "text-classification", ("fp32", "int8", "int4"), 3),
    ("pump-anomaly", "anomaly", ("fp32", "int8"), 2),
    ("helpdesk-gen", "text-generation", ("fp32", "int4"), 2),
)
PASSWORD = "benchmark-password"


def _manifest(model: str, version: int, variant: str, size: int) -> dict[str, Any]:
    method = {"fp32": "none", "fp16": "fp16", "int8": "int8-dynamic", "int4": "int4-weight-only"}[variant]
    return {
        "manifest": {
            "model": model,
            "version": version,
            "variant": variant,
            "quantization": {"method": method},
            "requirements": {"min_ram_bytes": size * 2},
        },
        "signature": "bench",
    }


def _telemetry_row(
    device_id: str, at: datetime, rng: random.Random, model: tuple[str, int, str] | None, interval: float
) -> dict[str, Any]:
    base = {"fp32": 18.0, "int8": 9.0, "int4": 7.0}.get(model[2] if model else "fp32", 12.0)
    p50 = base * rng.uniform(0.85, 1.15)
    count = int(rng.uniform(40, 60) * interval / 10)
    errors = 1 if rng.random() < 0.02 else 0
    normal = int(count * rng.uniform(0.8, 0.95))
    scores = [0] * 20
    for _ in range(count):
        scores[min(19, int(rng.betavariate(2, 6) * 20))] += 1
    return {
        "device_id": device_id,
        "received_at": at,
        "ts": at,
        "seq": 0,
        "interval_s": interval,
        "cpu_percent": rng.uniform(5, 60),
        "rss_bytes": int(rng.uniform(150, 400) * 2**20),
        "inference_count": count,
        "inference_errors": errors,
        "latency_p50_ms": p50,
        "latency_p95_ms": p50 * 1.6,
        "latency_p99_ms": p50 * 2.2,
        "model": model[0] if model else None,
        "model_version": model[1] if model else None,
        "variant": model[2] if model else None,
        "data": {
            "inference": {
                "count": count,
                "errors": errors,
                "throughput_per_s": count / interval,
                "latency": {
                    "p50_ms": p50,
                    "p95_ms": p50 * 1.6,
                    "p99_ms": p50 * 2.2,
                    "mean_ms": p50 * 1.1,
                    "max_ms": p50 * 3,
                    "buckets": [
                        [bucket_index(p50 * 0.8), count // 4],
                        [bucket_index(p50), count // 2],
                        [bucket_index(p50 * 1.6), count - count // 4 - count // 2],
                    ],
                },
                "drift": {
                    "label_counts": {"normal": normal, "anomaly": count - normal},
                    "score_hist": scores,
                    "score_edges": [i / 20 for i in range(21)],
                },
            }
        },
    }


def seed(
    engine: Engine,
    devices: int = DEVICES,
    telemetry_per_device: int = 6,
    chart_points: int = 720,
    rollouts: int = 30,
    seed_value: int = 7,
    health_history: bool = False,
) -> dict[str, Any]:
    """Fill a migrated database with a plausible fleet: devices with labels and models, telemetry, a model
    registry, rollouts (one large one paused in its third wave), an audit log, and the health buckets of the
    telemetry (with ``health_history``, a month of them). Returns what it made."""
    rng = random.Random(seed_value)
    now = datetime.now(UTC)
    with Session(engine) as session:
        version_ids: dict[tuple[str, int], int] = {}
        for name, task, variants, count in MODELS:
            model_row = Model(
                name=name, task=task, description=f"{task} model for the benchmark fleet", created_by="bench"
            )
            session.add(model_row)
            session.flush()
            assert model_row.id is not None
            for number in range(1, count + 1):
                version_row = ModelVersion(
                    model_id=model_row.id,
                    number=number,
                    source="onnx",
                    created_by="bench",
                    created_at=now - timedelta(days=30 - number),
                )
                session.add(version_row)
                session.flush()
                assert version_row.id is not None
                version_ids[(name, number)] = version_row.id
                for variant in variants:
                    size = {"fp32": 90, "int8": 24, "int4": 14}[variant] * 2**20
                    session.add(
                        Artifact(
                            id=uuid.uuid4().hex,
                            version_id=version_row.id,
                            variant=variant,
                            size_bytes=size,
                            signed_manifest=_manifest(name, number, variant, size),
                            metrics={
                                "agreement": 1.0 if variant == "fp32" else rng.uniform(0.96, 0.995),
                                "agreement_kind": "top1",
                                "eval_samples": 256,
                                "latency_ms_p50": size / 2**20 / 5,
                                "latency_ms_p95": size / 2**20 / 4,
                                "peak_rss_bytes": size * 2,
                                "size_bytes": size,
                                **({"tokens_per_s": 2000 / (size / 2**20)} if task == "text-generation" else {}),
                            },
                        )
                    )
        session.commit()
    device_rows: list[dict[str, Any]] = []
    serving: dict[str, tuple[str, int, str] | None] = {}
    for i in range(devices):
        device_id = f"dev-{i:05d}"
        hw, arch, ram = HARDWARE[(i // 3) % len(HARDWARE)]
        fleet = FLEETS[i % len(FLEETS)]
        name = {"pumps": "pump-anomaly", "turbines": "pump-anomaly", "kiosks": "intent-classifier"}[fleet]
        version = 2 if name == "pump-anomaly" else rng.choice((2, 3))
        variant = "fp32" if hw == "nuc" else "int8"
        model = None if rng.random() < 0.03 else (name, version, variant)
        serving[device_id] = model
        online = rng.random() < 0.92
        labels = {"site": SITES[i % len(SITES)], "fleet": fleet, "hw": hw, "tier": "canary" if i % 50 == 0 else "prod"}
        if i % 7 == 0:
            labels["zone"] = f"z{i % 5}"
        device_rows.append(
            {
                "id": device_id,
                "status": "online" if online else "offline",
                "agent_version": "0.1.0",
                "hardware": {"cpu_count": 4, "ram_bytes": ram, "arch": arch, "os": "Linux"},
                "installed": [
                    {"model": model[0], "version": model[1], "variant": model[2], "artifact": "", "active": True}
                ]
                if model
                else [],
                "labels": labels,
                "capabilities": [],
                "keepalive_s": 30,
                "telemetry_interval_s": 10.0,
                "first_seen": now - timedelta(days=40),
                "last_seen": now - timedelta(seconds=rng.uniform(1, 600)),
                "status_changed_at": now - timedelta(hours=rng.uniform(1, 48)),
                "offline_reason": None if online else "will",
            }
        )
    tel_rows: list[dict[str, Any]] = []
    for row in device_rows:
        points = chart_points if row["id"] == "dev-00000" else telemetry_per_device
        for k in range(points):
            at = now - timedelta(seconds=10 * (points - k))
            tel_rows.append(_telemetry_row(row["id"], at, rng, serving[row["id"]], 10.0))
    events = [
        {
            "device_id": f"dev-{i:05d}",
            "received_at": now - timedelta(minutes=i % 90),
            "ts": now,
            "seq": 1,
            "type": "agent",
            "kind": "started",
            "message": "agent started",
            "data": {},
        }
        for i in range(0, devices, 3)
    ]
    if health_history:  # ~85,000 bucket rows: the benchmark's month of history, not every test's; written
        # before the telemetry, which the health job then adds to them
        _seed_health(engine, rng, now)
    with engine.begin() as conn:
        conn.execute(insert(table(Device)), device_rows)
        for start in range(0, len(tel_rows), 5000):
            conn.execute(insert(table(TelemetryRecord)), tel_rows[start : start + 5000])
        conn.execute(insert(table(DeviceEvent)), events)
    big, big_deployment = _seed_rollouts(
        engine, rng, now, {r["id"]: r["labels"] for r in device_rows}, version_ids, rollouts
    )
    HealthRollupJob(engine, budget_s=3600).run()
    entries: list[dict[str, Any]] = [
        {
            "at": now - timedelta(minutes=5 * k),
            "actor": rng.choice(("alice", "bob", "local-admin")),
            "action": "device.labels",
            "target": f"dev-{k % devices:05d}",
            "detail": {"patch": {"room": "b2"}},
        }
        for k in range(500)
    ]
    for minutes, action, detail in (
        (90, "rollout.create", {"via": "dashboard"}),
        (12, "rollout.pause", {"via": "dashboard", "reason": "checking the canary"}),
    ):
        entries.append(
            {
                "at": now - timedelta(minutes=minutes),
                "actor": "alice",
                "action": action,
                "target": big,
                "detail": detail,
            }
        )
    with engine.begin() as conn:
        conn.execute(insert(table(AuditEntry)), entries)
    return {
        "devices": devices,
        "telemetry_rows": len(tel_rows),
        "rollouts": rollouts,
        "big_rollout": big,
        "big_deployment": big_deployment,
        "chart_device": "dev-00000",
    }


def _seed_rollouts(
    engine: Engine,
    rng: random.Random,
    now: datetime,
    labels: dict[str, dict[str, str]],
    version_ids: dict[tuple[str, int], int],
    count: int,
) -> tuple[str, str]:
    waves = [
        WaveSpec.model_validate({"name": name, "until": until, "bake_s": 120})
        for name, until in (("canary", "1%"), ("10%", "10%"), ("50%", "50%"), ("100%", "100%"))
    ]
    spec = {
        "model": "pump-anomaly",
        "version": 2,
        "variant": "auto",
        "selector": "fleet in (pumps,turbines)",
        "waves": [w.model_dump(mode="json") for w in waves],
        "gates": {},
        "shadow": None,
        "start_at": None,
        "windows": [],
        "late_devices": "current",
        "description": "",
    }
    rollouts: list[dict[str, Any]] = []
    transitions: list[dict[str, Any]] = []
    deployments: list[dict[str, Any]] = []
    targets: list[dict[str, Any]] = []
    big = ""
    for k in range(count):
        rid = uuid.uuid4().hex
        large = k == count - 1
        pool = [d for d, lab in labels.items() if lab["fleet"] in ("pumps", "turbines")]
        chosen = pool if large else rng.sample(pool, min(60, len(pool)))
        assignment = assign({d: labels[d] for d in chosen}, waves, rid)
        state = "paused" if large else rng.choice(("completed", "completed", "aborted"))
        wave_index = 2 if large else 3
        created = now - timedelta(hours=count - k)
        finished = None if large else created + timedelta(minutes=40)
        wave_deployments: dict[str, str] = {}
        for w in range(wave_index + 1):
            current = large and w == wave_index
            dep = uuid.uuid4().hex
            wave_deployments[str(w)] = dep
            deployments.append(
                {
                    "id": dep,
                    "model_name": "pump-anomaly",
                    "version_number": 2,
                    "version_id": version_ids[("pump-anomaly", 2)],
                    "variant_rule": "auto",
                    "selector": None,
                    "device_ids": None,
                    "status": "failed" if state == "aborted" else ("running" if current else "completed"),
                    "activate": True,
                    "shadow": None,
                    "timeout_s": 1800.0,
                    "rollout_id": rid,
                    "rollout_wave": w,
                    "max_concurrent": None,
                    "created_at": created,
                    "created_by": f"rollout {rid[:8]}",
                    "finished_at": None if current else (finished or created),
                }
            )
            for device_id, wave in assignment.items():
                if wave != w:
                    continue
                busy = large and w == wave_index
                state_ = rng.choice(("active", "active", "downloading", "failed")) if busy else "active"
                targets.append(
                    {
                        "deployment_id": dep,
                        "device_id": device_id,
                        "artifact_id": None,
                        "variant": "int8",
                        "state": state_,
                        "progress": 1.0 if state_ == "active" else rng.random(),
                        "chunks_have": 0,
                        "chunks_total": 0,
                        "reason": "",
                        "previous": None,
                        "metrics": {},
                        "queued": False,
                        "started_at": created,
                        "updated_at": created,
                        "finished_at": None,
                    }
                )
        rollouts.append(
            {
                "id": rid,
                "model_name": "pump-anomaly",
                "version_number": 2,
                "version_id": version_ids[("pump-anomaly", 2)],
                "selector": spec["selector"],
                "spec": spec,
                "state": state,
                "wave_index": wave_index,
                "state_since": created,
                "paused_from": "baking" if large else None,
                "assignment": assignment,
                "excluded": [],
                "wave_deployments": wave_deployments,
                "gate_results": [
                    {
                        "name": "error_rate",
                        "value": 0.004,
                        "threshold": 0.05,
                        "comparison": "<=",
                        "samples": 4200,
                        "min_samples": 100,
                        "status": "pass",
                        "detail": "",
                    }
                ],
                "reason": "paused by alice" if large else "done",
                "created_at": created,
                "created_by": "alice",
                "finished_at": None if large else created + timedelta(minutes=40),
            }
        )
        for step, (a, b) in enumerate(
            (
                ("", "pending"),
                ("pending", "deploying"),
                ("deploying", "baking"),
                ("baking", "gating"),
                ("gating", "deploying"),
                ("deploying", "baking"),
                ("baking", "gating"),
                ("gating", "deploying"),
                ("deploying", "baking"),
                ("baking", "paused"),
            )
        ):
            transitions.append(
                {
                    "rollout_id": rid,
                    "at": created + timedelta(minutes=step),
                    "from_state": a,
                    "event": "bench",
                    "to_state": b,
                    "wave": min(step // 3, 3),
                    "reason": "seeded",
                    "actor": "system",
                }
            )
        if large:
            big, big_deployment = rid, wave_deployments[str(wave_index)]
    with engine.begin() as conn:
        conn.execute(insert(table(Rollout)), rollouts)
        conn.execute(insert(table(Deployment)), deployments)
        for start in range(0, len(targets), 5000):
            conn.execute(insert(table(DeploymentTarget)), targets[start : start + 5000])
        conn.execute(insert(table(RolloutTransition)), transitions)
    return big, big_deployment


def _seed_health(engine: Engine, rng: random.Random, now: datetime) -> None:
    """Fleet health buckets for every seeded model version and variant, as the health job keeps them: two days
    of minutes, two weeks of quarter hours, two months of hours, a year of 6-hour buckets."""
    rows: list[dict[str, Any]] = []
    edges = [i / 20 for i in range(21)]
    for name, task, variants, count in MODELS:
        labels = ("normal", "anomaly") if task == "anomaly" else ("billing", "outage", "howto", "other", "praise")
        for number in range(1, count + 1):
            for variant in variants:
                for resolution, span in ((60, 2 * 86400), (900, 14 * 86400), (3600, 60 * 86400), (21600, 365 * 86400)):
                    end = now.timestamp() - now.timestamp() % resolution
                    for k in range(span // resolution):
                        h = Health()
                        inferences = int(rng.uniform(0.8, 1.2) * 40 * resolution)
                        h.reports, h.inferences, h.errors = resolution // 10 * 50, inferences, int(inferences * 0.003)
                        p50 = {"fp32": 18.0, "int8": 9.0, "int4": 7.0}[variant]
                        h.buckets[bucket_index(p50 * 0.8)] += inferences // 4
                        h.buckets[bucket_index(p50)] += inferences // 2
                        h.buckets[bucket_index(p50 * 1.7)] += inferences - inferences // 4 - inferences // 2
                        h.max_ms = p50 * 3
                        for label in labels:
                            h.labels[label] = int(inferences * rng.uniform(0.05, 0.4))
                        h.score_edges, h.score_counts = edges, [int(inferences * rng.random() / 20) for _ in range(20)]
                        rows.append(
                            {
                                "model": name,
                                "model_version": number,
                                "variant": variant,
                                "resolution_s": resolution,
                                "bucket_start": datetime.fromtimestamp(end - k * resolution, UTC),
                                **h.columns(),
                            }
                        )
    with engine.begin() as conn:
        for start in range(0, len(rows), 5000):
            conn.execute(insert(table(HealthRollup)), rows[start : start + 5000])


#: the threads that serve requests (AnyIO runs sync endpoints and dependencies in these)
REQUEST_THREADS = "AnyIO worker thread"


@contextmanager
def count_statements(engine: Engine, thread_prefix: str | None = REQUEST_THREADS) -> Iterator[list[str]]:
    """Collect the SQL statements ``engine`` runs inside the block, from request threads only by default
    (the scheduler's jobs run their own queries meanwhile)."""
    seen: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if thread_prefix is None or threading.current_thread().name.startswith(thread_prefix):
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", before)


def login(client: TestClient, name: str, password: str) -> None:
    """Log ``client`` in through the login form (its cookie jar keeps the session)."""
    form = client.get("/login")
    token = form.text.split('name="login_token" value="', 1)[1].split('"', 1)[0]
    r = client.post(
        "/login", data={"username": name, "password": password, "login_token": token}, follow_redirects=False
    )
    if r.status_code != 303:
        raise RuntimeError(f"login failed: {r.status_code} {r.text[:200]}")


def _time(client: TestClient, path: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        r = client.get(path)
        times.append((time.perf_counter() - started) * 1000)
        if r.status_code != 200:
            raise RuntimeError(f"{path}: {r.status_code} {r.text[:300]}")
    return times


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def run(quick: bool = False) -> dict[str, Any]:
    repeats = 10 if quick else 40
    with tempfile.TemporaryDirectory(prefix="slmfleet-bench-dashboard-") as tmp:
        settings = load_settings(data_dir=Path(tmp), rollout_step_s=60)
        runtime = ControllerRuntime(settings)
        app = create_app(settings, runtime)

        @app.get("/bench/ping")
        def ping() -> dict[str, bool]:
            return {"ok": True}

        with TestClient(app) as client:
            started = time.perf_counter()
            seeded = seed(runtime.engine, telemetry_per_device=4 if quick else 12, health_history=True)
            seed_s = time.perf_counter() - started
            with Session(runtime.engine) as session:
                users.create_user(session, "bench", Role.ADMIN, PASSWORD)  # every page, the admins' too
                session.commit()
            login(client, "bench", PASSWORD)
            big = seeded["big_rollout"]
            pages = {
                "overview": "/",
                "devices": "/devices",
                "devices_filtered": "/devices?status=online&selector=site%3Dberlin%2Ctier%21%3Dcanary",
                "devices_page_50": "/devices?page=50",
                "devices_search": "/devices?q=dev-012",
                "device": "/devices/dev-00000",
                "device_series": "/devices/dev-00000/series.json",
                "models": "/models",
                "rollouts": "/rollouts",
                "rollout": f"/rollouts/{big}",
                "rollout_live": f"/rollouts/{big}/live",
                "rollout_new": "/rollouts/new",
                "deployments": "/deployments",
                "deployment": f"/deployments/{seeded['big_deployment']}",
                "deployment_live": f"/deployments/{seeded['big_deployment']}/live",
                "deployment_new": "/deployments/new",
                "health": "/health",
                "health_version_24h": "/health/pump-anomaly/2",
                "health_series_24h": "/health/pump-anomaly/2/series.json",
                "health_series_7d": "/health/pump-anomaly/2/series.json?range=7d",
                "health_series_30d": "/health/intent-classifier/3/series.json?range=30d",
                "webhooks": "/webhooks",
            }
            _time(client, "/bench/ping", 5)  # warm up
            baseline = _time(client, "/bench/ping", repeats * 3)
            base_median = statistics.median(baseline)
            results: dict[str, Any] = {}
            for name, path in pages.items():
                _time(client, path, 2)  # templates compiled, caches warm
                with count_statements(runtime.engine) as statements:
                    client.get(path)
                times = _time(client, path, repeats)
                median = statistics.median(times)
                results[name] = {
                    "median_ms": round(median, 2),
                    "p95_ms": round(_p95(times), 2),
                    "net_median_ms": round(median - base_median, 2),
                    "queries": len(statements),
                }
    worst = max(results.values(), key=lambda r: r["p95_ms"])
    return {
        "devices": seeded["devices"],
        "telemetry_rows": seeded["telemetry_rows"],
        "rollouts": seeded["rollouts"],
        "database": "sqlite (WAL)",
        "repeats": repeats,
        "seed_s": round(seed_s, 2),
        "baseline_trivial_json_median_ms": round(base_median, 3),
        "baseline_trivial_json_p95_ms": round(_p95(baseline), 3),
        "pages": results,
        "worst_p95_ms": worst["p95_ms"],
        "goal_ms": GOAL_MS,
        "all_under_goal": all(r["p95_ms"] < GOAL_MS for r in results.values()),
    }
