"""End to end over a real mosquitto: the agent's core and deployment driver, real disk slots, real ONNX models.

The device side is wired exactly as ``agent/runtime/service.py`` wires it (see ``agent.deploy.driver``):
an MqttTransport on an asyncio loop, AgentCore with the DeploymentDriver as its deployments hook, durable
publishes through the outbox and an SQLite spool, jobs in the driver's worker thread. The test plays
the controller over a plain paho client: it signs bundles with its own Ed25519 key, sends commands,
broadcasts chunk frames (leaving some out) and answers the device's ChunkRequests on its repair topic.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core import AgentCore, CoreConfig, Publish, Subscribe, TelemetrySample, Unsubscribe
from agent.core.guard import CommandGuard
from agent.core.outbox import Outbox
from agent.deploy.config import DeployConfig
from agent.deploy.driver import DeploymentDriver
from agent.inference.host import ModelHost
from agent.runtime.nonces import DiskNonceStore
from agent.telemetry.spool import SqliteSpool
from agent.transport.mqtt import MqttConfig, MqttTransport, parse_broker_url
from controller.broker.embedded import EmbeddedBroker
from tests.agent.deploy.harness import Artifact, activate, deploy, rollback, sealed
from tests.helpers import LoopThread, RawMqtt, wait_until
from wire import codec, signing, topics
from wire.messages import (
    ChunkRequest,
    DeploymentEvent,
    DeployState,
    DeviceOnline,
    HardwareProfile,
)
from wire.topics import DeviceChannel

S = DeployState
DEVICE = "edge-7"
HW = HardwareProfile(cpu_count=2, ram_bytes=2**30, arch="x86_64", os="Linux")


class LiveAgent:
    """The agent's network side, wired as the service wires it, on an asyncio loop in a thread."""

    def __init__(self, loop: LoopThread, broker_url: str, data_dir: Path, key_file: Path) -> None:
        self.loop = loop
        self.host = ModelHost()
        self._stopped = False
        loop.call(self._build, broker_url, data_dir, key_file)

    def _build(self, broker_url: str, data_dir: Path, key_file: Path) -> None:
        now = time.time()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.spool = SqliteSpool(data_dir / "spool.sqlite3")
        self.outbox = Outbox(self.spool)
        self.deploy = DeploymentDriver.open(
            DEVICE,
            data_dir,
            self.host,
            key_file,
            post=self.loop.loop.call_soon_threadsafe,
            emit=self._execute,
            config=DeployConfig(chunk_idle_s=0.3, progress_interval_s=0.2, request_timeout_s=2.0),
        )
        self.core = AgentCore(
            CoreConfig(device_id=DEVICE, agent_version="test", telemetry_interval_s=3600),
            HW,
            lambda dt: TelemetrySample(cpu_percent=0.0, rss_bytes=0),
            started_at=now,
            deployments=self.deploy,
            guard=CommandGuard(DEVICE, self.deploy.manager.key, DiskNonceStore(data_dir)),
        )
        fields = parse_broker_url(broker_url)
        self.transport = MqttTransport(
            MqttConfig(**fields, keepalive_s=10, reconnect_max_s=1),
            DEVICE,
            will=self.core.will(now),
            loop=self.loop.loop,
        )
        self.transport.on_connect = lambda: self._execute(self.core.on_connected(time.time()))
        self.transport.on_message = lambda t, p: self._execute(self.core.on_message(t, p, time.time()))
        self.transport.on_published = self._published
        self._execute(self.deploy.start(time.time()))
        self.transport.start()
        self._tick()

    def _execute(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Subscribe):
                self.transport.subscribe(action.filter, action.qos)
            elif isinstance(action, Unsubscribe):
                self.transport.unsubscribe(action.filter)
            elif isinstance(action, Publish):
                if action.durable:
                    self.outbox.add(action)
                else:
                    self.transport.publish(action.topic, action.payload, action.qos, action.retain)
        if self.transport.connected:
            self.outbox.pump(self.transport.publish)

    def _published(self, mid: int) -> None:
        if self.outbox.acked(mid):
            self.outbox.pump(self.transport.publish)

    def _tick(self) -> None:
        if self._stopped:
            return
        self._execute(self.core.tick(time.time()))
        self.loop.loop.call_later(0.05, self._tick)

    def stop(self) -> None:
        def halt() -> None:
            self._stopped = True
            self.transport.abort()  # like a crash: no goodbye

        self.loop.call(halt)
        self.deploy.close()
        self.loop.call(self.spool.close)


class ControllerSim:
    """Plays the controller's delivery: commands, one broadcast per artifact, repairs on request."""

    def __init__(self, port: int, artifacts: list[Artifact], drop: set[int], key: Ed25519PrivateKey) -> None:
        self.key = key
        self.artifacts = {a.id: a for a in artifacts}
        self.drop = drop
        self.events: list[DeploymentEvent] = []
        self.births: list[DeviceOnline] = []
        self.requests: list[ChunkRequest] = []
        self.repaired = 0
        self._downloading: dict[str, int] = {}
        self._lock = threading.Lock()
        self.mqtt = RawMqtt(port, "controller-sim")
        self.mqtt.client.on_message = self._on_message
        self.mqtt.subscribe(topics.events(DEVICE))
        self.mqtt.subscribe(topics.state(DEVICE))

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic == topics.state(DEVICE):
            state = codec.decode(DeviceChannel.STATE, msg.payload)
            if isinstance(state, DeviceOnline):
                with self._lock:
                    self.births.append(state)
            return
        event = codec.decode(DeviceChannel.EVENTS, msg.payload)
        if isinstance(event, ChunkRequest):
            self.requests.append(event)
            art = self.artifacts[event.artifact_id]
            for start, end in event.ranges:
                for index in range(start, end):
                    client.publish(topics.chunks(DEVICE), art.frame(index), qos=1)
                    self.repaired += 1
        elif isinstance(event, DeploymentEvent):
            with self._lock:
                self.events.append(event)
            if event.state == S.DOWNLOADING:
                seen = self._downloading[event.deployment_id] = self._downloading.get(event.deployment_id, 0) + 1
                if seen == 2:  # the progress report after the device subscribed to the broadcast
                    threading.Thread(target=self._broadcast, args=(self.artifacts[event.artifact_id],)).start()

    def _broadcast(self, art: Artifact) -> None:
        for index in range(len(art)):
            if index not in self.drop:
                self.mqtt.client.publish(topics.artifact_chunks(art.id), art.frame(index), qos=1)

    def send(self, command: Any) -> None:
        """Sealed for the device, as the controller's CommandSender does (a fresh nonce each time)."""
        self.mqtt.publish(topics.cmd(DEVICE), sealed(command, self.key, DEVICE))

    def state_of(self, deployment_id: str) -> DeployState | None:
        with self._lock:
            mine = [e for e in self.events if e.deployment_id == deployment_id]
        return mine[-1].state if mine else None

    def wait_state(self, deployment_id: str, state: DeployState, timeout: float = 30.0) -> DeploymentEvent:
        try:
            wait_until(lambda: self.state_of(deployment_id) == state, timeout, what=f"{deployment_id} {state.value}")
        except AssertionError as exc:
            seen = [(e.deployment_id, e.state.value, e.reason) for e in self.events]
            raise AssertionError(f"{exc}; events: {seen}") from None
        with self._lock:
            return [e for e in self.events if e.deployment_id == deployment_id][-1]

    def installed(self) -> list[tuple[int, str, bool]]:
        with self._lock:
            birth = self.births[-1] if self.births else None
        return [(m.version, m.artifact, m.active) for m in birth.installed] if birth else []


@pytest.mark.slow
def test_deploy_stage_activate_and_roll_back_over_mqtt(
    private_broker: EmbeddedBroker, tmp_path: Path, key: Ed25519PrivateKey, v1: Artifact, v2: Artifact
) -> None:
    key_file = tmp_path / "controller.pub"
    key_file.write_text(signing.public_key_pem(key.public_key()))
    controller = ControllerSim(private_broker.port, [v1, v2], drop={1, 3}, key=key)
    loop = LoopThread()
    agent = LiveAgent(loop, private_broker.url, tmp_path / "agent", key_file)
    try:
        wait_until(lambda: controller.births, 15, what="the agent's birth message")
        assert controller.installed() == []

        # 1. the first model: broadcast with gaps, repaired on request, self-tested, switched
        controller.send(deploy(v1, "dep-1"))
        done = controller.wait_state("dep-1", S.ACTIVE)
        assert done.installed is not None and done.installed.artifact == v1.id
        assert controller.repaired >= 2 and controller.requests, "the dropped chunks came through repairs"
        counters = agent.deploy.manager.counters
        assert counters["chunks_received"] == len(v1) and counters["chunks_broadcast"] >= 1
        assert counters["chunks_repaired"] >= 2
        current = agent.host.current()
        assert current is not None and current.artifact_id == v1.id
        assert current.pipeline.run([{"text": "awful broken"}])[0]["label"] == "negative"
        wait_until(lambda: controller.installed() == [(1, v1.id, True)], 10, what="a birth reporting v1 active")

        # 2. the next version waits in STAGED (the old model keeps serving) until Activate
        controller.send(deploy(v2, "dep-2", activate=False))
        staged = controller.wait_state("dep-2", S.STAGED)
        assert staged.metrics["selftest_latency_ms"] > 0
        assert agent.host.current().artifact_id == v1.id  # type: ignore[union-attr]
        controller.send(activate("dep-2"))
        controller.wait_state("dep-2", S.ACTIVE)
        assert agent.host.current().artifact_id == v2.id  # type: ignore[union-attr]
        wait_until(
            lambda: controller.installed() == [(2, v2.id, True), (1, v1.id, False)],
            10,
            what="a birth reporting v2 active and v1 kept",
        )
        assert agent.deploy.manager.counters["copied"] == 4, "v2 shares 4 of its 5 chunks with v1"

        # 3. a signed rollback goes back to the kept slot
        controller.send(rollback(key, "dep-2", v1, device_id=DEVICE, with_manifest=False))
        controller.wait_state("dep-2", S.ROLLED_BACK)
        assert agent.host.current().artifact_id == v1.id  # type: ignore[union-attr]
        wait_until(lambda: controller.installed()[:1] == [(1, v1.id, True)], 10, what="a birth reporting v1")
        states = [e.state for e in controller.events if e.deployment_id == "dep-2"]
        assert states[-2:] == [S.ROLLING_BACK, S.ROLLED_BACK]
    finally:
        agent.stop()

    # 4. after a restart the agent serves and reports the true active model (read from disk)
    births = len(controller.births)
    agent = LiveAgent(loop, private_broker.url, tmp_path / "agent", key_file)
    try:
        wait_until(lambda: len(controller.births) > births, 15, what="the birth after the restart")
        assert controller.installed()[0] == (1, v1.id, True)
        wait_until(lambda: agent.host.current() is not None, 15, what="the active slot served after the restart")
        assert agent.host.current().artifact_id == v1.id  # type: ignore[union-attr]
        controller.send(deploy(v2, "dep-2"))  # a replay of an old command: answered, not redone
        wait_until(lambda: len([e for e in controller.events if e.deployment_id == "dep-2"]) > len(states), 10)
        assert controller.state_of("dep-2") == S.ROLLED_BACK and agent.host.current().artifact_id == v1.id  # type: ignore[union-attr]
    finally:
        agent.stop()
        loop.close()
        controller.mqtt.close()
