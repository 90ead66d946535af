"""The database goes away under load (issue 16): three controller replicas on a PostgreSQL server of the test's
own, real agents sending telemetry, a rollout baking. The server is SIGKILLed for longer than the lease TTL:
every replica stops driving before its leases end (no split brain); started again, the same replica processes
reconnect, the rollout resumes and completes (every device switched once), its history is one unbroken chain,
and every telemetry message the agents sent is stored (the ingest writer holds, it does not drop)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import create_engine, text

from controller.broker.embedded import EmbeddedBroker
from tests.cluster.harness import Cluster, Replica, start_pumps, start_rollout
from tests.cluster.test_replicas import as_controller, rollout
from tests.e2e.fleet import Fleet
from tests.e2e.test_deploy_real_agents import active_version, pin_key, register
from tests.helpers import wait_until
from tests.postgres_server import PostgresServer, postgres_server
from wire import topics

pytestmark = pytest.mark.slow

TTL_S = 6.0


class TelemetryWatcher:
    """Every telemetry message on the broker (device, seq): what the agents sent."""

    def __init__(self, port: int) -> None:
        self.seen: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="watch-telemetry", protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        wait_until(self.client.is_connected, 10, what="watcher connected")
        self.client.subscribe(topics.telemetry("x").replace("/x/", "/+/"), 1)
        assert subscribed.wait(10)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        device = msg.topic.split("/")[-2]
        with self._lock:
            self.seen.add((device, int(json.loads(msg.payload)["seq"])))

    def sent(self) -> set[tuple[str, int]]:
        with self._lock:
            return set(self.seen)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def pg(requires_mosquitto: None) -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


def drives(replica: Replica) -> list[str]:
    """What the replica says it drives (its health answers 503 while the database is down, with this field)."""
    return list(httpx.get(replica.api + "/api/v1/health", timeout=5).json()["replica"]["drives"])


def lease_ends(engine: Any) -> dict[str, float]:
    """Per holder: the latest moment (local monotonic clock) one of its leases can still be valid in the database."""
    before = time.monotonic()
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT holder, max(expires_at) - EXTRACT(EPOCH FROM clock_timestamp())"
                " FROM cluster_lease GROUP BY holder"
            )
        ).all()
    return {str(h): before + float(left) for h, left in rows if float(left) > 0}


def test_database_killed_under_load_replicas_stop_driving_reconnect_and_lose_nothing(
    pg: PostgresServer, private_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    cluster = Cluster(tmp_path, pg.url, private_broker.url, lease_ttl_s=TTL_S)
    fleet = Fleet(tmp_path / "agents", private_broker.url)
    (tmp_path / "agents").mkdir()
    engine = create_engine(pg.url, pool_pre_ping=True, connect_args={"connect_timeout": 3})
    watcher = TelemetryWatcher(int(private_broker.url.rsplit(":", 1)[1]))
    try:
        first = cluster.start("d1")
        ctl = as_controller(first)
        register(ctl, tmp_path, 1)
        key = pin_key(ctl, tmp_path / "controller.pem")
        for rid in ("d2", "d3"):
            cluster.start(rid)
        pids = {rid: r.proc.pid for rid, r in cluster.replicas.items()}
        fleet.controller = ctl
        devices = ["g0", "g1", "g2"]
        start_pumps(fleet, devices, key, "--telemetry-interval", "0.5")
        rollout_id = start_rollout(ctl, 1, [{"until": "1", "bake_s": 20}, {"until": "100%", "bake_s": 1}])
        name = f"rollout:{rollout_id}"
        wait_until(lambda: rollout(engine, rollout_id)[0] == "baking", 90, interval=0.2, what="wave 1 baking")
        assert any(name in drives(rep) for rep in cluster.replicas.values())

        # --- the database goes away (SIGKILL of the postmaster and its backends) ---
        ends = lease_ends(engine)
        assert ends, "no lease held before the outage"
        engine.dispose()
        pg.kill()
        killed_at = time.monotonic()
        stopped_at: dict[str, float] = {}

        def all_stopped() -> bool:
            for rid, rep in cluster.replicas.items():
                if rid not in stopped_at and not drives(rep):
                    stopped_at[rid] = time.monotonic()
            return len(stopped_at) == len(cluster.replicas)

        wait_until(all_stopped, TTL_S + 10, interval=0.05, what="every replica stops driving")
        for rid, end in ends.items():
            assert stopped_at[rid] <= end, (rid, stopped_at[rid] - end)  # before its leases could expire anywhere
        # down for longer than a lease's life, while the agents keep reporting
        wait_until(lambda: time.monotonic() - killed_at > TTL_S + 2, TTL_S + 5, interval=0.2, what="outage")
        assert all(not drives(rep) for rep in cluster.replicas.values())
        pg.start()
        restarted_at = time.monotonic()

        # --- the same processes reconnect; the rollout resumes and completes ---
        assert {rid: r.proc.pid for rid, r in cluster.replicas.items() if r.proc.alive()} == pids
        wait_until(
            lambda: all(
                httpx.get(r.api + "/api/v1/health", timeout=5).status_code == 200 for r in cluster.replicas.values()
            ),
            30,
            interval=0.2,
            what="every replica's health ok again",
        )
        healthy_s = time.monotonic() - restarted_at
        wait_until(lambda: rollout(engine, rollout_id)[0] == "completed", 120, interval=0.5, what="completed")
        for d in devices:
            assert active_version(ctl, d) == 1, d
        switches = {d: fleet.agents[d].log().count("switched to slot") for d in devices}
        assert switches == dict.fromkeys(devices, 1), switches  # no device switched twice
        with engine.connect() as conn:
            chain = conn.execute(
                text("SELECT from_state, to_state FROM rollout_transition WHERE rollout_id = :i ORDER BY id"),
                {"i": rollout_id},
            ).all()
        assert chain[-1][1] == "completed", chain
        for (_, to_state), (from_state, _) in zip(chain, chain[1:], strict=False):
            assert from_state == to_state, chain  # one driver at a time: no step from a stale state
        assert all(r.proc.pid == pids[rid] and r.proc.alive() for rid, r in cluster.replicas.items())

        # --- telemetry: everything the agents sent is stored, once per (device, seq) ---
        for d in devices:
            assert fleet.agents[d].stop(10) == 0, d
        sent = watcher.sent()
        assert len(sent) >= len(devices) * 20, len(sent)  # several seconds of reports, the outage included

        def stored() -> set[tuple[str, int]]:
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT DISTINCT device_id, seq FROM telemetry")).all()
            return {(str(d), int(s)) for d, s in rows}

        wait_until(lambda: sent <= stored(), 30, interval=0.5, what="every telemetry message stored")
        got = stored()
        assert got == sent, sorted(sent ^ got)[:20]
        with engine.connect() as conn:
            rows = int(conn.execute(text("SELECT count(*) FROM telemetry")).scalar_one())
        assert rows == len(sent)  # stored once each
        print(  # the figures for the README (pytest -s)
            f"outage {restarted_at - killed_at:.1f} s; stopped driving after "
            + ", ".join(f"{rid} {t - killed_at:.1f} s" for rid, t in sorted(stopped_at.items()))
            + "; ahead of lease end "
            + ", ".join(f"{rid} {ends[rid] - stopped_at[rid]:.1f} s" for rid in sorted(ends))
            + f"; healthy {healthy_s:.1f} s after restart; telemetry sent {len(sent)}, stored {rows}"
        )
        for d in devices:
            seqs = sorted(s for dev, s in got if dev == d)
            assert seqs == list(range(len(seqs))), d  # each agent's counter, no gap
        for rep in cluster.replicas.values():
            text_metrics = rep.get("/metrics").text
            dropped = [ln for ln in text_metrics.splitlines() if ln.startswith("slmfleet_ingest_dropped_total")]
            assert dropped and float(dropped[0].split()[-1]) == 0, (rep.id, dropped)
        # the writers held what came in while the database was down (and wrote it after): the outage was real
        assert any("database unreachable, holding" in rep.proc.log() for rep in cluster.replicas.values())
    finally:
        watcher.close()
        engine.dispose()
        fleet.controller = None
        fleet.stop()
        cluster.stop()
