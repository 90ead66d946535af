"""Ingest through a 3-node NATS cluster: ``python -m benchmarks ingest --broker nats-cluster --replicas 3``.

A 3-node NATS cluster (MQTT + JetStream, ``benchmarks/nats_cluster.py``); one publisher process per node, each
sending the births of its share of the devices and then its share of the telemetry (QoS 1, as fast as its node
acknowledges); controller replicas (``slmfleet up`` processes, ``ingest = "nats"``, one queue group) on one
PostgreSQL database. Measured with 1 replica and with ``--replicas`` replicas: telemetry rows stored per second,
the replicas' CPU (user + system, from /proc) per stored message, and after the drain the messages lost and
stored twice (both must be 0). On a 2-core machine three replicas cannot store three times as much; CPU per
message is the figure that says what a replica's core carries.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from benchmarks.common import JsonProc, postgres_database, wait_for
from benchmarks.nats_cluster import NatsCluster, nats_binary
from controller.broker.embedded import free_port

DEVICES = 10_000


def _start_replica(root: Path, index: int, cluster: NatsCluster, url: str) -> tuple[Any, str]:
    port = free_port()
    env = dict(os.environ)
    env.update(
        SLMFLEET_INGEST="nats",
        SLMFLEET_NATS_URL=cluster.nats_urls,
        SLMFLEET_DATABASE_URL=url,
        SLMFLEET_MQTT_PROTOCOL="3.1.1",
        SLMFLEET_MQTT_CLIENT_ID=f"bench-replica-{index}",
        SLMFLEET_LOG_LEVEL="WARNING",
    )
    log = open(root / f"replica-{index}.log", "ab")  # noqa: SIM115 - the child keeps it
    data = root / f"replica-{index}"
    args = ["-m", "slmfleet", "up", "--data-dir", str(data), "--port", str(port), "--broker", cluster.mqtt_urls]
    proc = psutil.Popen([sys.executable, *args], stdout=log, stderr=log, env=env)
    log.close()
    api = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"replica {index} exited: see {root / f'replica-{index}.log'}")
        try:
            return bool(httpx.get(api + "/api/v1/health", timeout=2).json()["broker"]["connected"])
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    wait_for(up, 120, interval=0.2)
    # the NATS subscriptions follow the MQTT connection; wait for them to be in place
    wait_for(lambda: "slmfleet_nats_connected 1.0" in httpx.get(api + "/metrics", timeout=5).text, 60, interval=0.2)
    return proc, api


def _cpu(procs: list[Any]) -> float:
    total = 0.0
    for proc in procs:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


def _quiet(procs: list[Any], timeout: float = 300.0) -> float:
    """Wait until the replicas idle (under 0.1 core each over 2 s: every birth handled); returns their cores."""
    deadline = time.monotonic() + timeout
    rate = 0.0
    while time.monotonic() < deadline:
        before = _cpu(procs)
        time.sleep(2.0)
        rate = (_cpu(procs) - before) / 2.0
        if rate <= 0.1 * len(procs):
            return rate
    return rate


def _progress(engine: Engine, total: int, stall_s: float = 30.0, timeout: float = 900.0) -> float:
    """Until ``total`` rows are stored, or none more for ``stall_s`` (then some were lost); the time it ended."""
    deadline = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = _count(engine)[0]
        if count >= total:
            return time.time()
        if count != last:
            last, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > stall_s:
            return time.time() - stall_s
        time.sleep(0.1)
    return time.time()


def _drops(apis: list[str]) -> dict[str, float]:
    """Messages the replicas dropped, by reason (slmfleet_invalid_payloads)."""
    out: dict[str, float] = {}
    for api in apis:
        for line in httpx.get(api + "/metrics", timeout=10).text.splitlines():
            if line.startswith("slmfleet_invalid_payloads_total{"):
                reason = line.split('reason="', 1)[1].split('"', 1)[0]
                out[reason] = out.get(reason, 0) + float(line.rsplit(" ", 1)[1])
    return out


def _count(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        row = conn.execute(text("SELECT COUNT(*), COUNT(DISTINCT (device_id, seq, ts)) FROM telemetry")).one()
    return int(row[0]), int(row[1])


def _run(cluster: NatsCluster, replicas: int, n: int, devices: int, root: Path) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    with postgres_database("slmfleet_bench_nats") as (url, why):
        if url is None:
            return {"replicas": replicas, "skipped": why}
        procs: list[Any] = []
        apis: list[str] = []
        engine = create_engine(url)
        try:
            for i in range(replicas):  # one after the other: the first migrates the database
                proc, api = _start_replica(root, i, cluster, url)
                procs.append(proc)
                apis.append(api)
            per = n // len(cluster.nodes)
            pubs = [
                JsonProc(
                    "benchmarks.tools.publish",
                    node.mqtt_port,
                    per,
                    devices // len(cluster.nodes),
                    "all",
                    f"b{k}",
                    stdin=True,
                )
                for k, node in enumerate(cluster.nodes)
            ]
            for pub in pubs:
                pub.read()  # births sent
            # every replica knows every device (its own registry: a replica that missed a birth drops the telemetry)
            want = devices // len(cluster.nodes) * len(cluster.nodes)
            wait_for(lambda: all(_registry_size(api) >= want for api in apis), 300, 0.5)
            _quiet(procs)
            cpu0, clock_start = _cpu(procs), time.time()
            for pub in pubs:
                pub.send()
            total = per * len(pubs)
            done_at = _progress(engine, total)
            cpu1 = _cpu(procs)
            clock_end = time.time()
            timings = [pub.read() for pub in pubs]
            for pub in pubs:
                pub.wait()
            starts = [t["start"] for t in timings]
            # what the replicas spend idle (their scheduled jobs), over 4 s after the drain; a late duplicate shows
            before = _cpu(procs)
            time.sleep(4.0)
            idle = (_cpu(procs) - before) / 4.0
            stored, distinct = _count(engine)
            seconds = done_at - min(starts)
            return {
                "replicas": replicas,
                "messages": total,
                "stored_msgs_per_s": round(total / seconds),
                "seconds": round(seconds, 2),
                # the publishers' side: every message acknowledged by its node (QoS 1)
                "published_msgs_per_s": round(total / (max(t["acked"] for t in timings) - min(starts))),
                "controller_cpu_us_per_msg": round((cpu1 - cpu0) / total * 1e6, 1),
                # without what the replicas spend idle over the same time (their scheduled jobs)
                "controller_cpu_us_per_msg_less_idle": round(
                    max(0.0, cpu1 - cpu0 - idle * (clock_end - clock_start)) / total * 1e6, 1
                ),
                "idle_cpu_cores": round(idle, 3),
                "lost": total - distinct,
                "duplicates": stored - distinct,
                "dropped_by_reason": _drops(apis),
            }
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(20)
                except psutil.TimeoutExpired:
                    proc.kill()
            engine.dispose()


def _registry_size(api: str) -> int:
    counts = httpx.get(api + "/api/v1/health", timeout=10).json()["devices"]
    return int(sum(counts.values()))


def run(quick: bool = False, replicas: int = 3) -> dict[str, Any]:
    if nats_binary() is None:
        return {"error": "nats-server not found on PATH"}
    n = 15_000 if quick else 60_000
    devices = 3_000 if quick else DEVICES
    with tempfile.TemporaryDirectory(prefix="slmfleet-bench-nats-") as tmp, NatsCluster(Path(tmp) / "nats") as cluster:
        one = _run(cluster, 1, n, devices, Path(tmp) / "r1")
        many = _run(cluster, replicas, n, devices, Path(tmp) / f"r{replicas}")
    return {
        "broker": "nats-cluster (3 nodes, MQTT 3.1.1 + JetStream R3)",
        "database": "postgresql",
        "devices": devices,
        "qos": 1,
        "publishers": "one process per node",
        "runs": [one, many],
    }
