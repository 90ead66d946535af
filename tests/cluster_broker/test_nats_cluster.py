"""A 3-node NATS cluster (MQTT + JetStream, replicas 3) as the fleet's broker, with real processes.

- An agent given the three nodes' URLs moves to another node when its node is SIGKILLed, and every telemetry
  message it produced is stored exactly once by a controller (``slmfleet up``) whose ingest runs over NATS.
- A retained message and a persistent MQTT session (with a QoS 1 message queued for it) survive the loss of the
  node leading the streams they live in.
- Two ingesters in one queue group share the telemetry (each message reaches one of them) while state messages
  reach both; two controller replicas on one PostgreSQL database store each telemetry message once.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
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

from agent.transport.mqtt import MqttConfig, MqttTransport, first_server, parse_broker_url
from benchmarks.nats_cluster import NatsCluster, NatsNode
from controller.broker.embedded import free_port
from controller.mqtt.nats_ingest import NatsIngest, ingest_subscriptions
from controller.runtime import ControllerRuntime
from controller.settings import ControllerSettings, load_settings
from tests.e2e.fleet import Fleet
from tests.e2e.test_deploy_real_agents import active_version, deploy, deployment, pin_key, register
from tests.helpers import Proc, slmfleet_cmd, wait_until
from tests.postgres import own_database
from wire import topics

pytestmark = pytest.mark.slow


#: How long a client may take to connect, a subscription to be granted or a queued message to arrive after a node
#: was killed. NATS serves an MQTT CONNECT with JetStream API calls (the session record's load and save; on a node's
#: first MQTT client also the $MQTT_ streams' lookups and the deletion and creation of its retained-messages consumer),
#: and a SUBSCRIBE QoS 1 with a consumer's creation. Each call fails after 4 s (mqttJSAPITimeout in nats-server 2.9)
#: while the meta, stream and consumer raft groups the dead node led elect again (election timeout 4-9 s, a round
#: more on a split vote); the server then closes the connection (no CONNACK) or refuses the subscription (0x80) and
#: the client asks again. Two election rounds (18 s), the attempt in flight (up to a few 4-s timeouts) and the one
#: that succeeds on 2 loaded cores: 45 s.
NODE_LOSS_S = 45.0


def client(
    node: NatsNode, client_id: str, *, clean: bool = True, timeout: float = 15.0
) -> tuple[mqtt.Client, list[mqtt.MQTTMessage]]:
    """A paho MQTT 3.1.1 client on one node (NATS speaks 3.1.1), with the messages it receives.

    It connects as our agents do: again after a refused or dropped attempt, a second or two later (the agent's
    backoff is jittered, from 0.5 s: agent/transport/mqtt.py), until ``timeout``. Right after a node loss NATS
    drops a CONNECT whose JetStream calls time out ("unable to connect: timeout for request type ..." in the
    node's log), so one attempt is not enough there (``NODE_LOSS_S``)."""
    received: list[mqtt.MQTTMessage] = []
    lock = threading.Lock()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=clean)
    c.reconnect_delay_set(min_delay=1, max_delay=2)

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with lock:
            received.append(msg)

    c.on_message = on_message
    c.connect_async("127.0.0.1", node.mqtt_port, keepalive=30)
    c.loop_start()
    try:
        wait_until(c.is_connected, timeout, what=f"MQTT client {client_id} connected to {node.name}")
    except AssertionError as exc:
        close(c)
        refusals = [line for line in node.log().splitlines() if f'"{client_id}"' in line and "[ERR]" in line]
        raise AssertionError(f"{exc}; {node.name} logged: {refusals[-5:]}") from None
    return c, received


def subscribe(c: mqtt.Client, filter_: str, timeout: float = 30.0) -> None:
    """Subscribe QoS 1 until the broker grants it: right after a node loss NATS refuses (0x80) the subscriptions
    whose JetStream consumer it cannot create until the streams have a leader again (the agent asks again too)."""
    answers: list[bool] = []
    c.on_subscribe = lambda _c, _u, _mid, codes, _p: answers.append(all(not code.is_failure for code in codes))

    def granted() -> bool:
        answers.clear()
        c.subscribe(filter_, 1)
        wait_until(lambda: answers, 15, what=f"SUBACK for {filter_}")
        return answers[0]

    wait_until(granted, timeout, interval=0.5, what=f"subscription to {filter_} granted")


def close(c: mqtt.Client) -> None:
    c.disconnect()
    c.loop_stop()


def stored_telemetry(db: Path, device_id: str) -> list[int]:
    """The seq of every telemetry row the controller stored for ``device_id`` (duplicates kept)."""
    if not db.is_file():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return [r[0] for r in conn.execute("SELECT seq FROM telemetry WHERE device_id = ?", (device_id,))]
    except sqlite3.OperationalError:  # not migrated yet
        return []
    finally:
        conn.close()


def spooled_telemetry(data_dir: Path, device_id: str) -> list[int]:
    """The seq of the telemetry messages still in an agent's spool (never acknowledged by a broker)."""
    conn = sqlite3.connect(f"file:{data_dir / 'spool.sqlite3'}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute("SELECT payload FROM spool WHERE topic = ?", (topics.telemetry(device_id),)).fetchall()
    finally:
        conn.close()
    return [json.loads(r[0])["seq"] for r in rows]


def spooled_at_least(data_dir: Path, device_id: str, count: int) -> list[int]:
    seqs = spooled_telemetry(data_dir, device_id)
    return seqs if len(seqs) >= count else []


def nats_settings(
    data_dir: Path, broker_url: str, nats_url: str, client_id: str, database_url: str | None = None
) -> ControllerSettings:
    """An in-process controller's settings for ingest over NATS (commands over the nodes' MQTT)."""
    return load_settings(
        data_dir=data_dir,
        database_url=database_url,
        broker_url=broker_url,
        mqtt_protocol="3.1.1",
        mqtt_client_id=client_id,
        ingest="nats",
        nats_url=nats_url,
        ingest_flush_interval_s=0.05,
    )


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop(15)


def start_agent(root: Path, device_id: str, brokers: list[str], interval: float) -> Proc:
    """A real agent (no model: it reports telemetry all the same), given the brokers as repeated --broker."""
    args = ["agent", "--device-id", device_id, "--data-dir", str(root / device_id)]
    for url in brokers:
        args += ["--broker", url]
    args += ["--telemetry-interval", str(interval), "--reconnect-max", "1", "--http-port", "0", "--log-level", "INFO"]
    return Proc(slmfleet_cmd(*args), root / f"{device_id}.log")


def test_an_agent_moves_to_another_node_when_its_node_dies_and_every_telemetry_message_is_stored_once(
    nats_cluster: NatsCluster, tmp_path: Path, procs: list[Proc]
) -> None:
    n1, n2, n3 = nats_cluster.nodes
    port = free_port()
    data = tmp_path / "controller"
    # The controller's MQTT (commands) and NATS (ingest) connections are on n2 and n3: n1 is the agent's node.
    controller = Proc(
        slmfleet_cmd("up", "--data-dir", str(data), "--port", str(port), "--broker", f"{n2.mqtt_url},{n3.mqtt_url}"),
        tmp_path / "controller.log",
        env={
            "SLMFLEET_INGEST": "nats",
            "SLMFLEET_NATS_URL": f"{n2.nats_url},{n3.nats_url}",
            "SLMFLEET_MQTT_PROTOCOL": "3.1.1",
            "SLMFLEET_INGEST_FLUSH_INTERVAL_S": "0.05",
        },
    )
    procs.append(controller)
    api = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: controller.alive() and httpx.get(api + "/api/v1/health", timeout=2).json()["broker"]["connected"],
        60,
        what=f"controller up (log: {controller.log_path})",
    )
    wait_until(lambda: "NATS ingest: subscribed" in controller.log(), 30, what="the controller's NATS ingest")
    nats = httpx.get(api + "/api/v1/health", timeout=5).json()["broker"]["nats"]
    assert nats["connected"] and nats["queue_group"] == "slmfleet-ingest"
    assert nats["server"] in (f"127.0.0.1:{n2.client_port}", f"127.0.0.1:{n3.client_port}")

    device = "nats-agent-1"
    # the list as an operator gives it to every device; this device's id makes it start on n1
    urls = [n.mqtt_url for n in nats_cluster.nodes]
    shift = first_server(device, 3)
    urls = urls[-shift:] + urls[:-shift] if shift else urls
    assert urls[first_server(device, 3)] == n1.mqtt_url
    agent = start_agent(tmp_path, device, urls, 0.2)
    procs.append(agent)
    db = data / "controller.db"
    wait_until(lambda: nats_cluster.node_of_client(device) is n1, 60, what=f"agent on n1 ({agent.log_path})")
    wait_until(lambda: len(stored_telemetry(db, device)) >= 5, 60, what=f"telemetry stored ({controller.log_path})")

    # n1 hangs first: what the agent publishes meanwhile is never acknowledged and waits in its spool; then n1 dies.
    nats_cluster.freeze(n1)
    spooled = set(wait_until(lambda: spooled_at_least(tmp_path / device, device, 5), 30, what="telemetry spooled"))
    nats_cluster.kill(n1)
    killed = time.monotonic()
    # the agent's CONNECT on the next node is served once JetStream has leaders again (``NODE_LOSS_S``)
    moved_to = wait_until(lambda: nats_cluster.node_of_client(device), NODE_LOSS_S, what="the agent on another node")
    moved_s = time.monotonic() - killed
    assert moved_to in (n2, n3)
    assert agent.alive()
    wait_until(lambda: f"connected to broker {moved_to.mqtt_url}" in agent.log(), 30, what="the agent's log")
    before = len(stored_telemetry(db, device))
    wait_until(lambda: len(stored_telemetry(db, device)) >= before + 10, 60, what="telemetry after the move")

    assert agent.stop(15) == 0
    left = spooled_telemetry(tmp_path / device, device)
    produced: set[int] = set()

    def drained() -> bool:
        stored = stored_telemetry(db, device)
        produced.clear()
        produced.update(range(max([*stored, *left]) + 1))
        return set(stored) | set(left) == produced

    try:
        wait_until(drained, 30, what="every telemetry message stored or still spooled")
    except AssertionError:
        missing = sorted(produced - set(stored_telemetry(db, device)) - set(left))
        raise AssertionError(f"telemetry lost: {missing}; spooled {sorted(spooled)}; left {left}") from None
    stored = stored_telemetry(db, device)
    assert len(stored) == len(set(stored)), "a telemetry message was stored twice"
    assert len(produced) >= 15
    assert spooled <= set(stored), "what waited in the spool while n1 hung was sent after the move"
    print(f"agent moved from n1 to {moved_to.name} in {moved_s:.2f} s; {len(stored)} telemetry stored, 0 lost")


def test_a_retained_message_and_a_persistent_session_survive_the_node_leading_their_streams(
    nats_cluster: NatsCluster,
) -> None:
    retained_topic, queued_topic = "slmfleet/v1/test/retained", "slmfleet/v1/test/queued"
    first = nats_cluster.nodes[0]
    publisher, _ = client(first, "pub-1")
    publisher.publish(retained_topic, b"kept", qos=1, retain=True).wait_for_publish(10)
    subscriber, _ = client(nats_cluster.nodes[1], "sess-1", clean=False)
    subscribe(subscriber, queued_topic)
    wait_until(lambda: nats_cluster.stream_leader("$MQTT_sess"), 15, what="the sessions' stream")
    close(subscriber)
    close(publisher)

    leader = nats_cluster.stream_leader("$MQTT_rmsgs")
    assert leader is not None, "retained messages are kept in JetStream"
    nats_cluster.kill(leader)
    alive = [n for n in nats_cluster.nodes if n.alive()]
    # the dead node may have led the meta group too (it creates and deletes the consumers a CONNECT needs)
    wait_until(
        lambda: nats_cluster.meta_leader() and nats_cluster.streams_led(["$MQTT_rmsgs", "$MQTT_sess", "$MQTT_msgs"]),
        30,
        what="meta and stream leaders elected again",
    )

    # A message for the away session, published on a surviving node.
    publisher, _ = client(alive[0], "pub-2", timeout=NODE_LOSS_S)
    publisher.publish(queued_topic, b"while away", qos=1).wait_for_publish(10)
    close(publisher)

    # The watcher's node may serve its first MQTT client now: NATS then sets the account's MQTT state up there.
    watcher, seen = client(alive[-1], "watch-1", timeout=NODE_LOSS_S)
    subscribe(watcher, retained_topic, NODE_LOSS_S)
    wait_until(lambda: seen, 15, what="the retained message after the node loss")
    assert (seen[0].payload, seen[0].retain) == (b"kept", True)
    close(watcher)

    # The session comes back on another node: the broker remembers its subscription and kept the message.
    back, got = client(alive[-1], "sess-1", clean=False, timeout=NODE_LOSS_S)
    wait_until(lambda: got, NODE_LOSS_S, what="the message queued for the persistent session")
    assert [(m.topic, m.payload) for m in got] == [(queued_topic, b"while away")]
    close(back)


def test_the_transport_asks_a_node_again_after_nats_drops_its_connect_and_connects_once_jetstream_is_back(
    nats_cluster: NatsCluster,
) -> None:
    """NATS (2.9) serves an MQTT CONNECT with JetStream calls; when they fail (here no quorum: two of the three
    nodes are down) it logs "unable to connect" and closes the connection without a CONNACK. The transport of the
    agents and the controller takes that as a failed attempt and asks again with backoff, and is connected once
    the cluster has its quorum back: a dropped CONNECT never stops it."""
    n1, n2, n3 = nats_cluster.nodes
    nats_cluster.kill(n1)
    nats_cluster.kill(n2)
    client_id = "retry-1"
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, name="transport-loop", daemon=True)
    runner.start()
    config = MqttConfig(**parse_broker_url(n3.mqtt_url), protocol="3.1.1", reconnect_min_s=0.5, reconnect_max_s=2)
    transport = MqttTransport(config, client_id, loop=loop)
    try:
        loop.call_soon_threadsafe(transport.start)

        def dropped() -> list[str]:
            return [line for line in n3.log().splitlines() if f'"{client_id}" - unable to connect' in line]

        drops = wait_until(lambda: len(dropped()) >= 2 and dropped(), 40, what=f"two CONNECTs dropped by {n3.name}")
        assert not transport.connected and transport.connects == 0, drops
        for node in (n1, n2):
            nats_cluster.restart(node)
        wait_until(lambda: transport.connected, NODE_LOSS_S, what=f"the transport connected to {n3.name} again")
        assert transport.connects == 1 and transport.server_url == n3.mqtt_url
        print(f"{len(dropped())} CONNECTs dropped by {n3.name} without quorum, then connected: {drops[0][-160:]}")
    finally:
        asyncio.run_coroutine_threadsafe(transport.stop(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()


def test_two_ingesters_in_one_queue_group_share_telemetry_and_both_hear_state(nats_cluster: NatsCluster) -> None:
    subs = ingest_subscriptions(
        [
            (topics.all_devices(topics.DeviceChannel.STATE), 1),
            (topics.shared(topics.all_devices(topics.DeviceChannel.TELEMETRY), "replicas"), 1),
        ]
    )
    got: list[list[tuple[str, bytes]]] = [[], []]
    ingesters = []
    for i, node in enumerate(nats_cluster.nodes[1:]):
        ingest = NatsIngest([node.nats_url], subs, lambda t, p, box=got[i]: box.append((t, p)), name=f"ingest-{i}")
        ingest.start()
        ingesters.append(ingest)
    try:
        for ingest in ingesters:
            assert ingest.wait_subscribed(15)
        publisher, _ = client(nats_cluster.nodes[0], "dev-pub")
        state_topic, telemetry_topic = topics.state("qdev-1"), topics.telemetry("qdev-1")
        # queue interest reaches n1 over the routes: wait until a state message gets to both ingesters
        wait_until(
            lambda: (
                publisher.publish(state_topic, b"{}", qos=1).wait_for_publish(5) is None
                and all(any(t == state_topic for t, _ in box) for box in got)
            ),
            15,
            interval=0.2,
            what="state messages reaching both ingesters",
        )
        count = 300
        for seq in range(count):
            publisher.publish(telemetry_topic, str(seq).encode(), qos=1).wait_for_publish(5)
        close(publisher)

        def delivered() -> list[int]:
            return [int(p) for box in got for t, p in list(box) if t == telemetry_topic]

        wait_until(lambda: len(delivered()) >= count, 15, what="every telemetry message delivered")
        seqs = delivered()
        assert sorted(seqs) == list(range(count)), "each message exactly once across the queue group"
        shares = [sum(1 for t, _ in box if t == telemetry_topic) for box in got]
        assert all(share > 0 for share in shares), shares
    finally:
        for ingest in ingesters:
            ingest.stop()


def test_two_controller_replicas_on_one_database_store_each_telemetry_message_once(
    nats_cluster: NatsCluster, tmp_path: Path, procs: list[Proc]
) -> None:
    n1, n2, n3 = nats_cluster.nodes
    with own_database("slmfleet_nats") as url:
        runtimes = []
        try:
            for i, node in enumerate((n2, n3)):
                runtime = ControllerRuntime(
                    nats_settings(tmp_path / f"ctl-{i}", node.mqtt_url, node.nats_url, f"ctl-replica-{i}", url)
                )
                runtime.start()
                runtimes.append(runtime)
            for runtime in runtimes:
                assert runtime.nats_ingest is not None and runtime.nats_ingest.wait_subscribed(15)

            device = "nats-replicated-1"
            agent = start_agent(tmp_path, device, [n1.mqtt_url], 0.1)
            procs.append(agent)
            engine = create_engine(url)

            def stored() -> list[int]:
                with engine.connect() as conn:
                    rows = conn.execute(text("SELECT seq FROM telemetry WHERE device_id = :d"), {"d": device})
                    return [r[0] for r in rows]

            wait_until(lambda: len(stored()) >= 40, 60, what=f"telemetry stored ({agent.log_path})")
            assert agent.stop(15) == 0
            left = spooled_telemetry(tmp_path / device, device)
            wait_until(
                lambda: set(stored()) | set(left) == set(range(max([*stored(), *left]) + 1)),
                30,
                what="every telemetry message stored",
            )
            seqs = stored()
            assert len(seqs) == len(set(seqs)), "a telemetry message was stored by both replicas"
            shares = [r.nats_ingest.shared_received for r in runtimes if r.nats_ingest is not None]
            assert len(shares) == 2 and all(n > 0 for n in shares), f"one replica ingested no telemetry: {shares}"
            engine.dispose()
        finally:
            for runtime in runtimes:
                runtime.stop()


def test_the_controller_moves_to_another_node_when_its_nats_node_dies_and_ingest_goes_on(
    nats_cluster: NatsCluster, tmp_path: Path, procs: list[Proc]
) -> None:
    runtime = ControllerRuntime(
        nats_settings(tmp_path / "ctl", nats_cluster.mqtt_urls, nats_cluster.nats_urls, "ctl-moving")
    )
    runtime.start()
    try:
        ingest = runtime.nats_ingest
        assert ingest is not None and ingest.wait_subscribed(15)
        by_port = {f"127.0.0.1:{n.client_port}": n for n in nats_cluster.nodes}
        doomed = by_port[str(ingest.connected_url)]
        device = "nats-agent-2"
        agent_nodes = [n for n in nats_cluster.nodes if n is not doomed]
        agent = start_agent(tmp_path, device, [n.mqtt_url for n in agent_nodes], 0.2)
        procs.append(agent)
        db = tmp_path / "ctl" / "controller.db"
        wait_until(lambda: len(stored_telemetry(db, device)) >= 5, 60, what=f"telemetry stored ({agent.log_path})")

        nats_cluster.kill(doomed)
        wait_until(
            lambda: ingest.connected and ingest.connected_url in by_port and by_port[ingest.connected_url].alive(),
            30,
            what="the NATS ingest on another node",
        )
        assert runtime.bridge is not None
        wait_until(lambda: runtime.bridge.connected, NODE_LOSS_S, what="the controller's MQTT connection")
        assert nats_cluster.node_of_client(device) in agent_nodes
        after = len(stored_telemetry(db, device))
        wait_until(lambda: len(stored_telemetry(db, device)) >= after + 10, 60, what="telemetry after the move")
        stored = stored_telemetry(db, device)
        assert len(stored) == len(set(stored))
        print(f"telemetry lost while the controller moved: {max(stored) + 1 - len(stored)}")
    finally:
        runtime.stop()


def test_a_deployment_reaches_agents_through_the_cluster_while_a_node_dies(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """Commands and chunk broadcasts go over the nodes' MQTT (QoS 1, kept in JetStream for the subscribers):
    a signed model reaches two agents and is active on both, though one of them lost its node meanwhile."""
    n1, n2, n3 = nats_cluster.nodes
    # the controller reads NATS on n2 or n3 and its MQTT client id starts it on n3; nats-edge-a starts on n1
    assert first_server("slmfleet-controller", 3) == 2 and first_server("nats-edge-a", 3) == 0
    nats_url = f"{n2.nats_url},{n3.nats_url}"
    env = {"SLMFLEET_INGEST": "nats", "SLMFLEET_NATS_URL": nats_url, "SLMFLEET_MQTT_PROTOCOL": "3.1.1"}
    fleet = Fleet(tmp_path, nats_cluster.mqtt_urls)
    try:
        ctl = fleet.start_controller(env=env)
        register(ctl, tmp_path, 1)
        key = pin_key(ctl, tmp_path / "controller.pem")
        devices = ["nats-edge-a", "nats-edge-b"]
        for device in devices:
            fleet.start_agent(device, "--signing-key-file", str(key))
        fleet.wait_online(devices, 60)
        assert nats_cluster.node_of_client("nats-edge-a") is n1
        assert nats_cluster.node_of_client("slmfleet-controller") is n3
        dep = deploy(ctl, 1, devices)
        nats_cluster.kill(n1)  # nats-edge-a's node dies during the deployment
        done = wait_until(
            lambda: (d := deployment(ctl, dep))["status"] in ("completed", "failed") and d, 180, what="deployment"
        )
        assert {t["device_id"]: t["state"] for t in done["targets"]} == dict.fromkeys(devices, "active"), done
        wait_until(lambda: all(active_version(ctl, d) == 1 for d in devices), 30, what="version 1 active")
    finally:
        fleet.stop()
