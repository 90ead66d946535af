"""``DeliveryService`` without a broker: SQLite in tmp, a fake clock, and an in-memory transport that records
every publish (and acknowledges it at once) on its own asyncio loop, as the MQTT bridge's loop would.

The fake replaces the controller's own I/O boundary (``controller.delivery.link.Transport``); what goes
over it is checked as the devices would see it: command payloads are opened with the controller's public
key for their device, chunk frames are decoded. The broker-backed suites (test_delivery.py, tests/e2e)
check the same behaviours end to end.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from controller.db.engine import make_engine, migrate
from controller.db.models import Artifact, Deployment, Device, ModelVersion
from controller.db.models import Model as ModelRow
from controller.delivery.service import DeliveryService, DeploymentRequest
from controller.delivery.targets import Target
from controller.delivery.transfer import TransferSettings
from controller.metrics import Metrics
from controller.registry.keys import SigningKey, load_or_create
from controller.registry.store import ContentStore
from tests.agent.deploy.harness import make_manifest
from tests.helpers import FakeClock, wait_until
from wire import chunks as frames
from wire import signing, topics
from wire.messages import ChunkRequest, DeploymentEvent, DeployState

CHUNK = 1024
DEVICES = ["dev-a", "dev-b", "dev-c"]
PREVIOUS = {"model": "old-cls", "version": 3, "artifact": "b" * 64, "active": True}


class FakeTransport:
    """Publishes into a list; acknowledges each tracked publish on its loop, like a broker that keeps up."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-mqtt", daemon=True)
        self.thread.start()

    @property
    def connected(self) -> bool:
        return True

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        self.published.append((topic, payload))
        return 1

    def publish_tracked(self, topic: str, payload: bytes, on_ack: Callable[[], None], qos: int = 1) -> bool:
        self.published.append((topic, payload))
        self.loop.call_soon_threadsafe(on_ack)
        return True

    def call_soon(self, fn: Callable[..., object], *args: object) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the loop (where the bridge delivers device messages) and return its result."""
        done: Future[Any] = Future()

        def call() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as exc:
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(call)
        return done.result(timeout=10)

    def close(self) -> None:
        async def drain() -> None:  # the transfers, stopped by the service, end on the loop
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(drain(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    # what the devices would read

    def frames(self, topic: str) -> list[int]:
        return [frames.decode(p).index for t, p in list(self.published) if t == topic]

    def commands(self, key: SigningKey, device_id: str) -> list[dict[str, Any]]:
        out = []
        for topic, payload in list(self.published):
            if topic == topics.cmd(device_id):
                obj = json.loads(payload)
                signing.open_command(obj, key.private.public_key(), device_id=device_id, now=time.time())
                out.append(obj)
        return out


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.db: Engine = make_engine(f"sqlite:///{tmp_path / 'controller.db'}")
        migrate(self.db)
        self.store = ContentStore(tmp_path / "store")
        self.key = load_or_create(tmp_path / "keys")
        self.clock = FakeClock()
        self.transport = FakeTransport()
        self.changes: list[tuple[str, str]] = []
        self.finished: list[tuple[str, str]] = []
        files = {"model.onnx": bytes(range(256)) * 40, "tokenizer.json": b'{"vocab": {}}'}
        self.signed = signing.sign(make_manifest(files, chunk_size=CHUNK), self.key.private)
        self.artifact_id = self.signed.manifest.artifact_id
        self.chunks = len(self.signed.manifest.chunks)
        for data in files.values():
            self.store.put_bytes(data)
        with Session(self.db) as session:
            model = ModelRow(name="tiny-cls", task="text-classification")
            session.add(model)
            session.commit()
            assert model.id is not None
            version = ModelVersion(model_id=model.id, number=1, source="upload")
            session.add(version)
            session.commit()
            assert version.id is not None
            session.add(
                Artifact(
                    id=self.artifact_id,
                    version_id=version.id,
                    variant="fp32",
                    signed_manifest=self.signed.model_dump(mode="json"),
                )
            )
            for device_id in DEVICES:
                session.add(Device(id=device_id, installed=[PREVIOUS]))
            session.commit()
        self.service = DeliveryService(
            self.db,
            self.store,
            self.key,
            Metrics(),
            TransferSettings(),  # the broadcast waits (up to start_grace_s) for every device to listen
            clock=self.clock,
            on_target_change=[lambda t: self.changes.append((t.device_id, t.state))],
            on_finish=lambda session, dep, status, targets: self.finished.append((dep, status)),
        )
        self.service.attach(self.transport)

    def deploy(self, **kw: Any) -> str:
        request = DeploymentRequest(model="tiny-cls", version=1, device_ids=kw.pop("device_ids", DEVICES), **kw)
        return self.service.create(request, "tester")

    def report(self, deployment_id: str, device_id: str, state: DeployState, **kw: Any) -> None:
        event = DeploymentEvent(
            ts=self.clock(), seq=1, deployment_id=deployment_id, artifact_id=self.artifact_id, state=state, **kw
        )
        self.transport.run(self.service.on_event, device_id, event)

    def target(self, deployment_id: str, device_id: str) -> Target:
        return next(t for t in self.service.targets(deployment_id) if t.device_id == device_id)

    def status(self, deployment_id: str) -> str:
        self.service.flush()
        with Session(self.db) as session:
            dep = session.get(Deployment, deployment_id)
            assert dep is not None
            return dep.status

    def command_types(self, device_id: str) -> list[str]:
        return [c["type"] for c in self.transport.commands(self.key, device_id)]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    made = Setup(tmp_path)
    yield made
    made.service.stop()
    made.transport.close()
    made.db.dispose()


def test_every_device_gets_its_signed_deploy_and_one_broadcast_serves_them_all(setup: Setup) -> None:
    dep = setup.deploy()
    for device_id in DEVICES:
        assert setup.command_types(device_id) == ["deploy"]
    for device_id in DEVICES:
        setup.report(dep, device_id, DeployState.DOWNLOADING, chunks_total=setup.chunks, listening=True)
    topic = topics.artifact_chunks(setup.artifact_id)
    wait_until(lambda: len(setup.transport.frames(topic)) >= setup.chunks, 10)
    assert sorted(setup.transport.frames(topic)) == list(range(setup.chunks))  # once each, not once per device
    for device_id in DEVICES:
        setup.report(dep, device_id, DeployState.VERIFYING, chunks_total=setup.chunks, chunks_have=setup.chunks)
        setup.report(dep, device_id, DeployState.ACTIVE)
    assert setup.status(dep) == "completed"
    assert setup.finished == [(dep, "completed")]
    assert ("dev-a", "active") in setup.changes
    assert setup.target(dep, "dev-a").progress == 1.0
    assert setup.service.commit(dep) == 3
    assert setup.command_types("dev-b") == ["deploy", "commit"]


def test_a_repair_sends_the_asked_chunks_to_that_device_alone(setup: Setup) -> None:
    dep = setup.deploy(device_ids=["dev-a"])
    request = ChunkRequest(ts=setup.clock(), seq=2, deployment_id=dep, artifact_id=setup.artifact_id, ranges=[(2, 4)])
    setup.transport.run(setup.service.on_chunk_request, "dev-a", request)
    wait_until(lambda: len(setup.transport.frames(topics.chunks("dev-a"))) >= 2, 10)
    assert sorted(setup.transport.frames(topics.chunks("dev-a"))) == [2, 3]
    assert setup.transport.frames(topics.chunks("dev-b")) == []
    stranger = request.model_copy(update={"deployment_id": "f" * 32})
    setup.transport.run(setup.service.on_chunk_request, "dev-a", stranger)  # not one of ours: nothing sent
    assert sorted(setup.transport.frames(topics.chunks("dev-a"))) == [2, 3]


def test_a_device_that_exceeds_the_timeout_fails_and_is_told_to_stop(setup: Setup) -> None:
    dep = setup.deploy(timeout_s=60)
    setup.report(dep, "dev-a", DeployState.DOWNLOADING)
    setup.clock.advance(59)
    assert setup.service.check_timeouts() == []
    setup.clock.advance(2)
    expired = setup.service.check_timeouts()
    assert sorted(t.device_id for t in expired) == DEVICES
    target = setup.target(dep, "dev-a")
    assert target.state == "failed" and target.reason == "timed out after 60s in state downloading"
    cancel = setup.transport.commands(setup.key, "dev-a")[-1]
    assert cancel["type"] == "cancel" and cancel["command_id"].endswith("-timeout")
    assert setup.status(dep) == "failed"
    # the device switched after all: the truth wins
    setup.report(dep, "dev-a", DeployState.ACTIVE)
    assert setup.target(dep, "dev-a").state == "active"
    # but a late progress report of a device given up on does not revive it
    setup.report(dep, "dev-b", DeployState.DOWNLOADING)
    assert setup.target(dep, "dev-b").state == "failed"


def test_a_reported_failure_ends_the_deployment_as_failed(setup: Setup) -> None:
    dep = setup.deploy()
    setup.report(dep, "dev-a", DeployState.FAILED, reason="self-test failed")
    assert setup.target(dep, "dev-a").reason == "self-test failed"
    assert ("dev-a", "failed") in setup.changes
    assert setup.status(dep) == "running"
    for device_id in ("dev-b", "dev-c"):
        setup.report(dep, device_id, DeployState.ACTIVE)
    assert setup.status(dep) == "failed"
    assert setup.finished == [(dep, "failed")]


def test_cancel_stops_devices_before_the_switch_and_sends_back_one_that_switched_anyway(setup: Setup) -> None:
    dep = setup.deploy()
    setup.report(dep, "dev-a", DeployState.ACTIVE)
    setup.report(dep, "dev-b", DeployState.STAGED)
    assert setup.service.cancel(dep, "op") == 2  # dev-a already switched: a cancel does not reach it
    assert setup.command_types("dev-b") == ["deploy", "cancel"]
    assert setup.target(dep, "dev-b").reason == "cancelled by op"
    setup.report(dep, "dev-b", DeployState.SHADOW)  # in flight when the cancel went out: ignored
    assert setup.target(dep, "dev-b").state == "cancelled"
    setup.report(dep, "dev-c", DeployState.ACTIVE)  # the switch crossed the cancel on the wire
    target = setup.target(dep, "dev-c")
    assert target.state == "rolling_back" and target.started_at == setup.clock()
    rollback = setup.transport.commands(setup.key, "dev-c")[-1]
    assert rollback["type"] == "rollback" and rollback["grant"]["artifact_id"] == PREVIOUS["artifact"]
    setup.report(dep, "dev-c", DeployState.ROLLED_BACK)
    assert setup.status(dep) == "cancelled"


def test_rollback_cancels_before_the_switch_and_grants_the_previous_model_after_it(setup: Setup) -> None:
    dep = setup.deploy()
    setup.report(dep, "dev-a", DeployState.ACTIVE)
    setup.report(dep, "dev-b", DeployState.DOWNLOADING)
    setup.report(dep, "dev-c", DeployState.FAILED, reason="no space")
    assert setup.service.rollback(dep, "op") == 2
    assert setup.target(dep, "dev-a").state == "rolling_back"
    assert setup.target(dep, "dev-b").state == "cancelled"
    assert setup.command_types("dev-a")[-1] == "rollback"
    assert setup.command_types("dev-c") == ["deploy"]  # failed: it kept its model, nothing to send
    setup.service.device_online("dev-a")  # a device born again gets the rollback it may have missed
    assert setup.command_types("dev-a")[-2:] == ["rollback", "rollback"]


def test_max_concurrent_queues_devices_until_a_slot_frees(setup: Setup) -> None:
    dep = setup.deploy(max_concurrent=1)
    sent = {d: setup.command_types(d) for d in DEVICES}
    assert sorted(sent.values()) == [[], [], ["deploy"]]
    first = next(d for d, types in sent.items() if types)
    setup.clock.advance(3600 * 2)  # queued devices do not time out
    setup.report(dep, first, DeployState.ACTIVE)
    assert sum(1 for d in DEVICES if setup.command_types(d) == ["deploy"]) == 2
