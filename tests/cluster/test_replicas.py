"""Three controller replicas (real processes) on one PostgreSQL database and one mosquitto with shared
subscriptions, real agents: killing the replica that drives a rollout and its deployment hands both over
within 10 s, every device ends on the new model exactly once, and the audit log shows the handover."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from controller.broker.embedded import EmbeddedBroker
from tests.cluster.harness import Cluster, holder, start_pumps, start_rollout
from tests.controller import devices_util as du
from tests.e2e.fleet import ControllerProc, Fleet
from tests.e2e.test_deploy_faults import BIG_BYTES, deploy, ended, register_anomaly, register_big
from tests.e2e.test_deploy_real_agents import active_version, pin_key, register
from tests.helpers import RawMqtt, wait_until
from tests.postgres import own_database

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path: Path, private_broker: EmbeddedBroker, requires_mosquitto: None) -> Iterator[Cluster]:
    with own_database("slmfleet_cluster") as url:
        c = Cluster(tmp_path, url, private_broker.url)
        try:
            yield c
        finally:
            c.stop()


def as_controller(replica: object) -> ControllerProc:
    return ControllerProc(replica.proc, replica.api, replica.data_dir)  # type: ignore[attr-defined]


def test_killing_the_rollout_driver_hands_the_rollout_and_its_deployment_over(
    cluster: Cluster, private_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    first = cluster.start("r1")
    ctl = as_controller(first)
    register(ctl, tmp_path, 1)
    register(ctl, tmp_path, 2)
    key = pin_key(ctl, tmp_path / "controller.pem")
    for rid in ("r2", "r3"):
        cluster.start(rid)
    clustered = first.cluster()
    assert clustered["clustered"] and {r["id"] for r in clustered["replicas"]} == {"r1", "r2", "r3"}

    fleet = Fleet(tmp_path / "agents", private_broker.url)
    (tmp_path / "agents").mkdir()
    fleet.controller = ctl
    devices = ["c0", "c1", "c2", "c3"]
    try:
        start_pumps(fleet, devices, key)
        rollout_id = start_rollout(ctl, 2, [{"until": "1", "bake_s": 8}, {"until": "100%", "bake_s": 2}])
        engine = create_engine(cluster.database_url)
        try:
            name = f"rollout:{rollout_id}"
            driver = wait_until(lambda: holder(engine, name), 20, what="a replica drives the rollout")
            # wait for the canary wave to bake, then kill whoever drives the rollout (and its deployment)
            wait_until(lambda: rollout(engine, rollout_id)[0] == "baking", 90, interval=0.2, what="wave 1 baking")
            driver = holder(engine, name)
            assert driver is not None
            transitions_before = count_transitions(engine, rollout_id)
            killed_at = time.monotonic()
            cluster.replicas[driver[0]].proc.kill()

            new = wait_until(
                lambda: (h := holder(engine, name)) is not None and h[0] != driver[0] and h,
                15,
                interval=0.1,
                what="another replica takes the rollout",
            )
            wait_until(
                lambda: count_transitions(engine, rollout_id) > transitions_before,
                15,
                interval=0.1,
                what="the next rollout step after the kill",
            )
            handover_s = time.monotonic() - killed_at
            assert handover_s < 10 + 2, handover_s  # goal < 10 s; slack for a loaded 2-core machine
            assert new[1] == driver[1] + 1  # a new acquisition: the next fencing token

            wait_until(lambda: rollout(engine, rollout_id)[0] == "completed", 180, interval=0.5, what="completed")
            live = as_controller(cluster.any_alive())
            for d in devices:
                assert active_version(live, d) == 2, d
            with engine.connect() as conn:
                takeovers = conn.execute(
                    text("SELECT detail FROM audit_log WHERE action = 'cluster.takeover' AND target = :t"), {"t": name}
                ).all()
            messages = [str(dict(row[0])["message"]) if not isinstance(row[0], str) else row[0] for row in takeovers]
            assert any(f"from {driver[0]}" in m for m in messages), messages
            # no device installs twice: one switch to version 2 per device in the agents' own logs
            switches = Counter({d: fleet.agents[d].log().count("switched to slot") for d in devices})
            assert all(n == 1 for n in switches.values()), switches
        finally:
            engine.dispose()
    finally:
        fleet.controller = None
        fleet.stop()


def rollout(engine: object, rollout_id: str) -> tuple[str, int]:
    with engine.connect() as conn:  # type: ignore[attr-defined]
        row = conn.execute(text("SELECT state, wave_index FROM rollout WHERE id = :i"), {"i": rollout_id}).one()
    return str(row[0]), int(row[1])


def count_transitions(engine: object, rollout_id: str) -> int:
    with engine.connect() as conn:  # type: ignore[attr-defined]
        return int(
            conn.execute(
                text("SELECT count(*) FROM rollout_transition WHERE rollout_id = :i"), {"i": rollout_id}
            ).scalar_one()
        )


def test_a_stopped_driver_is_replaced_and_its_late_writes_never_interleave(
    cluster: Cluster, private_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """SIGSTOP the driver past its lease, let another replica take over and drive, SIGCONT: the rollout's
    history stays one chain (each step starts where the last ended), and the woken replica drives nothing of it."""
    first = cluster.start("s1")
    ctl = as_controller(first)
    register(ctl, tmp_path, 1)
    key = pin_key(ctl, tmp_path / "controller.pem")
    cluster.start("s2")
    fleet = Fleet(tmp_path / "agents", private_broker.url)
    (tmp_path / "agents").mkdir()
    fleet.controller = ctl
    devices = ["p0", "p1"]
    engine = create_engine(cluster.database_url)
    stopped = None
    try:
        start_pumps(fleet, devices, key)
        rollout_id = start_rollout(ctl, 1, [{"until": "1", "bake_s": 20}, {"until": "100%", "bake_s": 1}])
        name = f"rollout:{rollout_id}"
        wait_until(lambda: rollout(engine, rollout_id)[0] == "baking", 90, interval=0.2, what="wave 1 baking")
        driver = holder(engine, name)
        assert driver is not None
        stopped = cluster.replicas[driver[0]].proc
        os.kill(stopped.pid, signal.SIGSTOP)
        new = wait_until(
            lambda: (h := holder(engine, name)) is not None and h[0] != driver[0] and h,
            20,
            interval=0.1,
            what="another replica takes the rollout from the stopped one",
        )
        assert new[1] > driver[1]
        os.kill(stopped.pid, signal.SIGCONT)
        stopped = None
        wait_until(lambda: rollout(engine, rollout_id)[0] == "completed", 180, interval=0.5, what="completed")
        with engine.connect() as conn:
            chain = conn.execute(
                text("SELECT from_state, to_state FROM rollout_transition WHERE rollout_id = :i ORDER BY id"),
                {"i": rollout_id},
            ).all()
        for (_, to_state), (from_state, _) in zip(chain, chain[1:], strict=False):
            assert from_state == to_state, chain  # one driver at a time: no step from a stale state
        assert holder(engine, name) is None or holder(engine, name)[0] != driver[0]  # type: ignore[index]
        woken = cluster.replicas[driver[0]].proc.log()
        assert f"{driver[0]} lost {name}" in woken, woken[-3000:]  # it noticed and stopped driving on its own
    finally:
        if stopped is not None:
            os.kill(stopped.pid, signal.SIGCONT)
        engine.dispose()
        fleet.controller = None
        fleet.stop()


def test_killing_the_broadcast_driver_mid_transfer_finishes_every_device_once(
    cluster: Cluster, private_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """A deployment whose chunks are on the wire when its driver dies: another replica takes the deployment,
    repairs what the devices miss, and every device ends on the new model, switched exactly once."""
    cluster.env["SLMFLEET_CHUNK_SIZE"] = "4096"
    first = cluster.start("b1")
    ctl = as_controller(first)
    v1 = register_anomaly(ctl, tmp_path, 1)
    v2 = register_big(ctl, tmp_path, BIG_BYTES, seed=5)
    key = pin_key(ctl, tmp_path / "controller.pem")
    for rid in ("b2", "b3"):
        cluster.start(rid)
    fleet = Fleet(tmp_path / "agents", private_broker.url)
    (tmp_path / "agents").mkdir()
    fleet.controller = ctl
    devices = ["t0", "t1", "t2"]
    engine = create_engine(cluster.database_url)
    try:
        for d in devices:
            fleet.start_agent(d, "--signing-key-file", str(key))
        fleet.wait_online(devices, 60)
        assert ended(ctl, deploy(ctl, v1, devices), 120)["status"] == "completed"
        dep = deploy(ctl, v2, devices)
        name = f"deployment:{dep}"
        driver = wait_until(lambda: holder(engine, name), 20, what="a replica drives the deployment")
        assert driver[0] == "b1"  # the replica that created it

        def mid_transfer() -> bool:
            with engine.connect() as conn:
                rows = conn.execute(
                    text("SELECT state, chunks_have, chunks_total FROM deployment_target WHERE deployment_id = :d"),
                    {"d": dep},
                ).all()
            return any(r[0] == "downloading" and 0 < r[1] < r[2] for r in rows)

        wait_until(mid_transfer, 60, interval=0.02, what="chunks on the wire")
        killed_at = time.monotonic()
        cluster.replicas["b1"].proc.kill()
        new = wait_until(
            lambda: (h := holder(engine, name)) is not None and h[0] != "b1" and h, 15, interval=0.1, what="takeover"
        )
        assert time.monotonic() - killed_at < 12 and new[1] == driver[1] + 1
        live = as_controller(cluster.replicas[new[0]])
        done = ended(live, dep, 180)
        assert done["status"] == "completed", done
        for d in devices:
            wait_until(lambda d=d: active_version(live, d) == v2, 30, what=f"{d} on version {v2}")  # type: ignore[misc]
        switches = {d: fleet.agents[d].log().count("switched to slot") for d in devices}
        assert switches == dict.fromkeys(devices, 2), switches  # v1, then v2: never twice the same
        for d in devices:
            assert "Traceback" not in fleet.agents[d].log(), d
    finally:
        engine.dispose()
        fleet.controller = None
        fleet.stop()


def test_a_rolling_restart_hands_work_over_without_waiting_for_leases(cluster: Cluster) -> None:
    """One replica at a time: SIGTERM releases its leases (another replica takes its jobs at its next run, not a
    lease TTL later), and started again it rejoins the cluster."""
    cluster.start("u1")
    cluster.start("u2")
    engine = create_engine(cluster.database_url)
    try:
        name = "job:presence-sweep"  # runs every 5 s: taken at once after a release
        owner = wait_until(lambda: holder(engine, name), 20, what="the sweep has a driver")
        other = "u2" if owner[0] == "u1" else "u1"
        stopped_at = time.monotonic()
        assert cluster.replicas[owner[0]].proc.stop(20) == 0
        assert holder(engine, name) is None  # released on the way out, not left to expire
        moved = wait_until(lambda: (h := holder(engine, name)) is not None and h[0] == other and h, 15, interval=0.1)
        assert time.monotonic() - stopped_at < 5 + cluster.lease_ttl_s  # one sweep interval, not a TTL on top
        assert moved[1] == owner[1] + 1
        with engine.connect() as conn:
            takeovers = conn.execute(text("SELECT count(*) FROM audit_log WHERE action = 'cluster.takeover'")).scalar()
        assert takeovers == 0  # a handover after a release is not a takeover
        assert f"replica       {other} (lease TTL 6 s" in cluster.replicas[other].proc.log()  # the banner says so
        back = cluster.start(owner[0])
        assert {r["id"]: r["alive"] for r in back.cluster()["replicas"]} == {"u1": True, "u2": True}
    finally:
        engine.dispose()


def test_a_rollout_survives_its_driver_killed_in_several_states_and_an_approval_on_another_replica(
    cluster: Cluster, private_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Kill the driver while a wave deploys, while the rollout awaits approval, and while the next wave deploys
    (each killed replica comes back); approve through a replica that does not drive it: the rollout completes,
    every device is on the new version, switched once, and each handover is audited."""
    first = cluster.start("k1")
    ctl = as_controller(first)
    register(ctl, tmp_path, 1)
    key = pin_key(ctl, tmp_path / "controller.pem")
    for rid in ("k2", "k3"):
        cluster.start(rid)
    fleet = Fleet(tmp_path / "agents", private_broker.url)
    (tmp_path / "agents").mkdir()
    fleet.controller = ctl
    devices = ["s0", "s1", "s2"]
    engine = create_engine(cluster.database_url)
    try:
        start_pumps(fleet, devices, key)
        rollout_id = start_rollout(
            ctl, 1, [{"until": "1", "bake_s": 2, "require_approval": True}, {"until": "100%", "bake_s": 2}]
        )
        name = f"rollout:{rollout_id}"

        def kill_driver_in(state: str, wave: int) -> str:
            wait_until(lambda: rollout(engine, rollout_id) == (state, wave), 120, interval=0.02, what=state)
            driver = holder(engine, name)
            assert driver is not None
            cluster.replicas[driver[0]].proc.kill()
            wait_until(
                lambda: (h := holder(engine, name)) is not None and h[0] != driver[0], 15, interval=0.1, what="takeover"
            )
            cluster.start(driver[0])  # back, as a restarted replica
            return driver[0]

        killed = [kill_driver_in("deploying", 0), kill_driver_in("awaiting_approval", 0)]
        driver = holder(engine, name)
        assert driver is not None
        elsewhere = next(rep for rid, rep in cluster.replicas.items() if rid != driver[0] and rep.proc.alive())
        r = httpx.post(
            f"{elsewhere.api}/api/v1/rollouts/{rollout_id}/approve",
            headers={"Authorization": f"Bearer {elsewhere.token}"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        killed.append(kill_driver_in("deploying", 1))
        wait_until(lambda: rollout(engine, rollout_id)[0] == "completed", 180, interval=0.5, what="completed")
        live = as_controller(cluster.any_alive())
        for d in devices:
            assert active_version(live, d) == 1, d
        switches = {d: fleet.agents[d].log().count("switched to slot") for d in devices}
        assert switches == dict.fromkeys(devices, 1), switches
        with engine.connect() as conn:
            handed = conn.execute(
                text("SELECT detail FROM audit_log WHERE action = 'cluster.takeover' AND target = :t"), {"t": name}
            ).all()
        sources = [dict(row[0])["from"] if not isinstance(row[0], str) else row[0] for row in handed]
        assert all(k in sources for k in killed) and len(sources) >= 3, (killed, sources)  # every handover audited
    finally:
        engine.dispose()
        fleet.controller = None
        fleet.stop()


def test_a_rolling_upgrade_keeps_old_replicas_serving_on_the_newer_schema(
    cluster: Cluster, private_broker: EmbeddedBroker
) -> None:
    """A rolling upgrade, one replica at a time: the first replica of the next version migrates the database (here
    its migration is applied as it would be: additive, as ours are within a version, a nullable column on the
    device and telemetry tables, a new table, its revision). A replica still on this version goes on ingesting and
    serving on that schema; another one (re)started mid-upgrade runs on it without migrating, and takes the jobs
    over when the first stops for its own upgrade."""
    cluster.start("g2")
    engine = create_engine(cluster.database_url)
    raw = RawMqtt(private_broker.port, "upgrade-device")

    def telemetry_rows(device: str) -> int:
        with engine.connect() as conn:
            return int(
                conn.execute(text("SELECT count(*) FROM telemetry WHERE device_id = :d"), {"d": device}).one()[0]
            )

    def report(device: str, seqs: range) -> None:
        raw.publish(*du.birth(device))
        for seq in seqs:
            raw.publish(*du.telemetry(device, seq))

    try:
        report("up-before", range(3))
        wait_until(lambda: telemetry_rows("up-before") == 3, 30, what="telemetry before the upgrade")
        with engine.begin() as conn:  # the next version's first replica migrates
            conn.execute(text("ALTER TABLE device ADD COLUMN firmware_channel VARCHAR(32)"))
            conn.execute(text("ALTER TABLE telemetry ADD COLUMN energy_mwh DOUBLE PRECISION"))
            conn.execute(text("CREATE TABLE device_note (id SERIAL PRIMARY KEY, device_id VARCHAR(128), body TEXT)"))
            conn.execute(text("UPDATE alembic_version SET version_num = '9999_next_release'"))
        # the running old replica goes on: a device new since the migration is registered, its telemetry stored
        report("up-during", range(5))
        wait_until(lambda: telemetry_rows("up-during") == 5, 30, what="telemetry on the newer schema")
        # an old replica started mid-upgrade runs on the newer schema without touching it
        g1 = cluster.start("g1")
        assert "newer than this controller knows" in g1.proc.log()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "9999_next_release"
        for replica in cluster.replicas.values():
            headers = {"Authorization": f"Bearer {replica.token}"}
            assert replica.get("/api/v1/devices/up-during", headers=headers).status_code == 200
        # and drives: g2 goes down for its own upgrade, g1 takes its jobs and ingests alone
        assert cluster.replicas["g2"].proc.stop(20) == 0
        wait_until(
            lambda: (h := holder(engine, "job:presence-sweep")) is not None and h[0] == "g1",
            20,
            what="the presence sweep driven by the old replica started on the newer schema",
        )
        report("up-after", range(4))
        wait_until(lambda: telemetry_rows("up-after") == 4, 30, what="telemetry through that replica alone")
        assert "Traceback" not in g1.proc.log()
    finally:
        raw.close()
        engine.dispose()
