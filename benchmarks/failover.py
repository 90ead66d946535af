"""``python -m benchmarks failover``: three controller replicas (``slmfleet up --replica``) on one PostgreSQL
database and one mosquitto, real agents; a rollout runs; the replica driving it is SIGKILLed while a wave bakes.

Reported per round: seconds from the SIGKILL to the next rollout step (a new transition written by another
replica; goal < 10 s with the default lease_ttl_s 6), and to the lease takeover; then, once the rollout
completed: duplicates (devices that switched to the new version more than once) and losses (devices not on it).
The killed replica is restarted before the next round. PostgreSQL: $SLMFLEET_TEST_POSTGRES (default the local
server as user postgres), in a database of its own, dropped at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from benchmarks.common import start_broker, wait_for
from benchmarks.delivery import BIG_MODEL_OPTIONS, big_model
from controller.broker.embedded import free_port

ADMIN_URL = os.environ.get("SLMFLEET_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
NO_GATES = {"error_rate_max": None, "p95_latency_ratio_max": None, "rss_ratio_max": None, "shadow_agreement_min": None}
LEASE_TTL_S = 6.0


class Child:
    """A ``python -m slmfleet ...`` child with its output in a log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "slmfleet", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.alive():
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")


class Replicas:
    def __init__(self, root: Path, database_url: str, broker_url: str) -> None:
        self.root, self.database_url, self.broker_url = root, database_url, broker_url
        self.procs: dict[str, Child] = {}
        self.apis: dict[str, str] = {}

    def start(self, rid: str) -> str:
        data = self.root / rid
        port = free_port()
        env = {
            "SLMFLEET_DATABASE_URL": self.database_url,
            "SLMFLEET_MQTT_CLIENT_ID": f"slmfleet-{rid}",
            "SLMFLEET_MQTT_SHARED_GROUP": "controllers",
            "SLMFLEET_LEASE_TTL_S": str(LEASE_TTL_S),
            "SLMFLEET_ARTIFACT_STORE": "database",  # every replica serves what any one imported
        }
        args = ["up", "--replica", "--replica-id", rid, "--data-dir", str(data), "--broker", self.broker_url]
        child = Child([*args, "--port", str(port)], self.root / f"{rid}.log", env)
        self.procs[rid], self.apis[rid] = child, f"http://127.0.0.1:{port}"

        def up() -> bool:
            if not child.alive():
                raise RuntimeError(f"replica {rid} exited:\n{child.text()[-3000:]}")
            try:
                return bool(httpx.get(self.apis[rid] + "/api/v1/health", timeout=2).json()["broker"]["connected"])
            except (httpx.HTTPError, ValueError):
                return False

        wait_for(up, 90, 0.2)
        return self.apis[rid]

    def client(self, rid: str) -> httpx.Client:
        token = (self.root / rid / "admin-token").read_text().strip()
        return httpx.Client(base_url=self.apis[rid], headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def stop(self) -> None:
        for child in self.procs.values():
            child.stop()


def lease_holder(engine: Engine, name: str) -> tuple[str, int] | None:
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT holder, token FROM cluster_lease"
                " WHERE name = :n AND expires_at > EXTRACT(EPOCH FROM clock_timestamp())"
            ),
            {"n": name},
        ).first()
    return (str(row[0]), int(row[1])) if row else None


def rollout_row(engine: Engine, rollout_id: str) -> tuple[str, int]:
    with engine.connect() as conn:
        state = conn.execute(text("SELECT state FROM rollout WHERE id = :i"), {"i": rollout_id}).scalar_one()
        n = conn.execute(
            text("SELECT count(*) FROM rollout_transition WHERE rollout_id = :i"), {"i": rollout_id}
        ).scalar_one()
    return str(state), int(n)


def run(quick: bool = False) -> dict[str, Any]:
    rounds = 1 if quick else 3
    n_devices = 3 if quick else 6
    try:
        admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        return {"error": f"no PostgreSQL at {ADMIN_URL} ({type(exc).__name__}); set SLMFLEET_TEST_POSTGRES"}
    name = f"slmfleet_failover_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    root = Path(tempfile.mkdtemp(prefix="slmfleet-failover-"))
    broker = start_broker(root / "broker")
    replicas = Replicas(root, url, broker.url)
    agents: dict[str, Child] = {}
    engine = create_engine(url)
    ok = False
    try:
        replicas.start("f1")
        with replicas.client("f1") as c:
            for seed in range(1, rounds + 2):  # devices take only newer versions: one more per round
                model = big_model(root / f"m{seed}.onnx", 64 * 1024, seed=seed)
                r = c.post(
                    "/api/v1/models/pump/versions",
                    files=[("file", (model.name, model.read_bytes()))],
                    data={"options": json.dumps(BIG_MODEL_OPTIONS)},
                )
                if r.status_code != 201:
                    raise RuntimeError(f"registering: {r.status_code} {r.text[:2000]}")
            key = root / "signing-key.pem"
            key.write_text(c.get("/api/v1/signing-key").json()["public_key_pem"])
        for rid in ("f2", "f3"):
            replicas.start(rid)
        devices = [f"fo{i}" for i in range(n_devices)]
        for d in devices:
            agents[d] = Child(
                [
                    "agent",
                    "--broker",
                    broker.url,
                    "--device-id",
                    d,
                    "--data-dir",
                    str(root / d),
                    "--reconnect-max",
                    "1",
                    "--signing-key-file",
                    str(key),
                    "--label=fleet=pumps",
                ],
                root / f"{d}.log",
            )

        def online() -> bool:
            with replicas.client("f1") as c:
                page = c.get("/api/v1/devices", params={"limit": 1000}).json()
            return {x["id"] for x in page["items"] if x["status"] == "online"} >= set(devices)

        wait_for(online, 90, 0.5)
        results: list[dict[str, Any]] = []
        for index in range(rounds):
            results.append(one_round(engine, replicas, agents, devices, index + 2))
        steps_s = [r["to_next_step_s"] for r in results]
        ok = True
        return {
            "replicas": 3,
            "devices": n_devices,
            "lease_ttl_s": LEASE_TTL_S,
            "rounds": results,
            "to_next_step_s_max": max(steps_s),
            "to_next_step_s_median": statistics.median(steps_s),
            "goal_s": 10.0,
            "duplicates": sum(r["duplicates"] for r in results),
            "losses": sum(r["losses"] for r in results),
        }
    finally:
        for child in agents.values():
            child.stop()
        replicas.stop()
        broker.stop()
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        if ok:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"failover: logs kept in {root}", file=sys.stderr)


def one_round(
    engine: Engine, replicas: Replicas, agents: dict[str, Child], devices: list[str], version: int
) -> dict[str, Any]:
    """A rollout to ``version``; its driver is killed while the first wave bakes, and restarted at the end."""
    switches_before = {d: agents[d].text().count("switched to slot") for d in devices}
    live = next(rid for rid, p in replicas.procs.items() if p.alive())
    spec = {
        "model": "pump",
        "version": version,
        "variant": "fp32",
        "selector": "fleet=pumps",
        "waves": [{"until": "1", "bake_s": 3}, {"until": "100%", "bake_s": 1}],
        "gates": NO_GATES,
    }
    with replicas.client(live) as c:
        r = c.post("/api/v1/rollouts", json=spec)
    if r.status_code != 201:
        raise RuntimeError(f"rollout: {r.status_code} {r.text[:2000]}")
    rollout_id = r.json()["id"]
    lease = f"rollout:{rollout_id}"
    wait_for(lambda: rollout_row(engine, rollout_id)[0] == "baking", 120, 0.05)
    driver = lease_holder(engine, lease)
    assert driver is not None
    steps = rollout_row(engine, rollout_id)[1]
    killed = time.time()
    replicas.procs[driver[0]].kill()
    taken = wait_for(lambda: (h := lease_holder(engine, lease)) is not None and h[0] != driver[0], 60, 0.02)
    stepped = wait_for(lambda: rollout_row(engine, rollout_id)[1] > steps, 60, 0.02)
    wait_for(lambda: rollout_row(engine, rollout_id)[0] in ("completed", "aborted"), 300, 0.2)
    state = rollout_row(engine, rollout_id)[0]
    survivor = next(rid for rid, p in replicas.procs.items() if p.alive())
    with replicas.client(survivor) as c:
        on_version = set()
        for d in devices:
            installed = c.get(f"/api/v1/devices/{d}").json().get("installed", [])
            if any(m.get("active") and m.get("version") == version for m in installed):
                on_version.add(d)
    switched = {d: agents[d].text().count("switched to slot") - switches_before[d] for d in devices}
    replicas.procs[driver[0]].stop()
    replicas.start(driver[0])  # back for the next round
    return {
        "killed": driver[0],
        "state": state,
        "to_takeover_s": round(taken - killed, 2),
        "to_next_step_s": round(stepped - killed, 2),
        "duplicates": sum(1 for n in switched.values() if n > 1),
        "losses": len(devices) - len(on_version),
    }
