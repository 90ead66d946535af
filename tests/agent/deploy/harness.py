"""Test harness for the agent's deployment side: signed bundles, a controller peer, a device to drive.

Nothing here is a mock: bundles are real files with real hashes and signatures, the device runs the
real DeploymentManager, JobRunner and storage (memory or disk), and the controller peer produces
the real binary chunk frames and answers ChunkRequests the way the controller's repairs do.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core.actions import Publish, Subscribe
from agent.core.core import Unsubscribe
from agent.deploy.config import DeployConfig
from agent.deploy.driver import DeploymentDriver
from agent.deploy.jobs import JobRunner
from agent.deploy.manager import DeploymentManager
from agent.deploy.modelops import HostModelOps, ModelOps
from agent.deploy.record import MemoryRecordStore, PersistedState, RecordStore
from agent.deploy.shadow import ShadowTap
from agent.deploy.storage import SlotStorage
from agent.inference.host import ModelHost
from tests.agent.deploy.fake_ops import SimulatedModelOps
from tests.registry.tiny_models import text_classifier
from wire import chunks as frames
from wire import codec, signing, topics
from wire.manifest import (
    IO,
    Budget,
    Manifest,
    Postprocess,
    Preprocess,
    SignedManifest,
    Task,
    TensorInfo,
    describe_files,
)
from wire.messages import (
    Activate,
    Cancel,
    ChunkRequest,
    CommandAck,
    Commit,
    Deploy,
    DeploymentEvent,
    DeployState,
    Rollback,
    RollbackGrant,
)
from wire.topics import DeviceChannel

DEVICE = "dev-1"
LABELS = ["negative", "positive"]


class Killed(BaseException):
    """A simulated crash or power loss: not an Exception, so nothing in the agent catches it."""


# ----------------------------------------------------------------- bundles --


def classifier_bundle(root: Path, *, shift: float = 0.0) -> dict[str, bytes]:
    """The tiny ONNX text classifier's files; ``shift`` changes its output weights (a new version
    whose model.onnx differs in a few chunks while tokenizer.json is byte-identical)."""
    out = text_classifier(root / f"cls-{shift}")
    if shift:
        model = onnx.load(out / "model.onnx")
        for init in model.graph.initializer:
            if init.name == "w_out":
                array = onnx.numpy_helper.to_array(init) + np.float32(shift)
                init.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), "w_out"))
        onnx.save(model, out / "model.onnx")
    return {"model.onnx": (out / "model.onnx").read_bytes(), "tokenizer.json": (out / "tokenizer.json").read_bytes()}


def make_manifest(
    files: dict[str, bytes],
    *,
    model: str = "tiny-cls",
    version: int = 1,
    variant: str = "fp32",
    chunk_size: int = 1024,
    expires_at: float | None = None,
    budget: Budget | None = None,
) -> Manifest:
    entries, refs = describe_files(dict(files), chunk_size)
    return Manifest(
        model=model,
        version=version,
        variant=variant,
        task=Task.TEXT_CLASSIFICATION,
        io=IO(
            inputs=[
                TensorInfo(name="input_ids", dtype="int64", shape=["batch", "seq"]),
                TensorInfo(name="attention_mask", dtype="int64", shape=["batch", "seq"]),
            ],
            outputs=[TensorInfo(name="logits", dtype="float32", shape=["batch", 2])],
        ),
        preprocess=Preprocess(tokenizer="tokenizer.json", max_length=32),
        postprocess=Postprocess(labels=LABELS),
        files=entries,
        chunk_size=chunk_size,
        chunks=refs,
        budget=budget or Budget(),
        created_at=time.time(),
        expires_at=expires_at,
    )


@dataclass
class Artifact:
    """A signed artifact and its files, as the controller's store holds them."""

    signed: SignedManifest
    files: dict[str, bytes]

    @property
    def manifest(self) -> Manifest:
        return self.signed.manifest

    @property
    def id(self) -> str:
        return self.signed.manifest.artifact_id

    def chunk(self, index: int) -> bytes:
        ref = self.manifest.chunks[index]
        data = list(self.files.values())[ref.file]
        return data[ref.offset : ref.offset + ref.size]

    def frame(self, index: int, *, corrupt: bool = False) -> bytes:
        data = self.chunk(index)
        if corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return frames.encode(self.id, index, data)

    def __len__(self) -> int:
        return len(self.manifest.chunks)


def artifact(files: dict[str, bytes], key: Ed25519PrivateKey, **manifest_fields: Any) -> Artifact:
    return Artifact(signing.sign(make_manifest(files, **manifest_fields), key), files)


def sealed(command: Any, key: Ed25519PrivateKey, device_id: str = DEVICE, *, ttl_s: float = 3600.0) -> bytes:
    """``command``'s wire payload, signed for ``device_id`` the way the controller's CommandSender signs it."""
    return signing.seal_command(command, key, device_id=device_id, now=time.time(), ttl_s=ttl_s)


def deploy(art: Artifact, deployment_id: str = "dep-1", **fields: Any) -> Deploy:
    return Deploy(
        ts=time.time(), command_id=f"{deployment_id}-deploy", deployment_id=deployment_id, manifest=art.signed, **fields
    )


def rollback(
    key: Ed25519PrivateKey,
    deployment_id: str,
    art: Artifact,
    *,
    device_id: str = DEVICE,
    expires_at: float | None = None,
    with_manifest: bool = True,
    grant_deployment: str | None = None,
) -> Rollback:
    grant = RollbackGrant(
        device_id=device_id,
        deployment_id=grant_deployment or deployment_id,
        artifact_id=art.id,
        model=art.manifest.model,
        version=art.manifest.version,
        expires_at=expires_at if expires_at is not None else time.time() + 3600,
    )
    return Rollback(
        ts=time.time(),
        command_id=f"{deployment_id}-rollback",
        deployment_id=deployment_id,
        grant=grant,
        signature=signing.sign_grant(grant, key),
        manifest=art.signed if with_manifest else None,
    )


def activate(deployment_id: str = "dep-1") -> Activate:
    return Activate(ts=time.time(), command_id=f"{deployment_id}-activate", deployment_id=deployment_id)


def commit(deployment_id: str = "dep-1") -> Commit:
    return Commit(ts=time.time(), command_id=f"{deployment_id}-commit", deployment_id=deployment_id)


def cancel(deployment_id: str = "dep-1") -> Cancel:
    return Cancel(ts=time.time(), command_id=f"{deployment_id}-cancel", deployment_id=deployment_id)


# ------------------------------------------------------------------ device --


class CrashingRecords:
    """A record store that crashes right after persisting a transition into a given state (what was
    written stays written, nothing after it happens)."""

    def __init__(self, inner: RecordStore, crash_in: DeployState | None = None) -> None:
        self.inner = inner
        self.crash_in = crash_in
        loaded = inner.load().record
        self._last = (loaded.deployment_id, loaded.state) if loaded is not None else None

    def load(self) -> PersistedState:
        return self.inner.load()

    def save(self, state: PersistedState) -> None:
        self.inner.save(state)
        rec = state.record
        current = (rec.deployment_id, rec.state) if rec is not None else None
        entered = current != self._last
        self._last = current
        if self.crash_in is not None and rec is not None and rec.state == self.crash_in and entered:
            self.crash_in = None
            raise Killed(f"killed in {rec.state.value}")

    def save_manifest(self, signed: SignedManifest) -> None:
        self.inner.save_manifest(signed)

    def load_manifest(self, artifact_id: str) -> SignedManifest | None:
        return self.inner.load_manifest(artifact_id)


@dataclass
class Device:
    """One device's deployment side, driven synchronously with a controllable clock.

    ``restart()`` throws every in-memory object away and builds new ones over the same storage and
    record store, as a process restart would (with a disk storage: a new ModelHost too).
    """

    key: Ed25519PrivateKey
    storage: SlotStorage
    records: RecordStore = field(default_factory=MemoryRecordStore)
    make_ops: Callable[[Device], ModelOps] | None = None
    config: DeployConfig = field(default_factory=DeployConfig)
    device_id: str = DEVICE
    now: float = 1000.0
    published: list[tuple[str, bytes]] = field(default_factory=list)
    subscriptions: set[str] = field(default_factory=set)
    births: int = 0

    def __post_init__(self) -> None:
        self.build()

    def build(self) -> None:
        self.host = ModelHost()
        self.tap = ShadowTap()
        self.ops = self.make_ops(self) if self.make_ops is not None else SimulatedModelOps()
        self.crashing = CrashingRecords(self.records)
        self.manager = DeploymentManager(
            self.device_id, self.storage, self.crashing, self.key.public_key(), self.config
        )
        self.driver = DeploymentDriver(
            self.manager, JobRunner(self.storage, self.ops), threaded=False, clock=lambda: self.now, tap=self.tap
        )
        self.driver.bind(self._birth)

    def use_ops(self, ops: ModelOps) -> None:
        """Swap the model operations (e.g. a simulated model that fails its self-test)."""
        if isinstance(self.ops, SimulatedModelOps) and isinstance(ops, SimulatedModelOps):
            ops.serving = self.ops.serving  # the same device: it still serves what it served
        self.ops = ops
        self.driver.runner.ops = ops

    def _birth(self, now: float) -> Publish:
        self.births += 1
        return Publish(topics.state(self.device_id), b"birth", qos=1, retain=True)

    def take(self, actions: list[Any]) -> list[Any]:
        for action in actions:
            if isinstance(action, Publish):
                self.published.append((action.topic, action.payload))
            elif isinstance(action, Subscribe):
                self.subscriptions.add(action.filter)
            elif isinstance(action, Unsubscribe):
                self.subscriptions.discard(action.filter)
        return actions

    def start(self) -> None:
        self.take(self.driver.start(self.now))
        self.take(self.driver.on_connected(self.now))

    def restart(self, crash_in: DeployState | None = None) -> None:
        self.build()
        self.crashing.crash_in = crash_in
        self.subscriptions.clear()
        self.start()

    def command(self, cmd: Any) -> None:
        self.take(self.driver.on_command(cmd, self.now))

    def chunk(self, frame: bytes, repair: bool = False, art: Artifact | None = None) -> None:
        topic = (
            topics.chunks(self.device_id)
            if repair
            else topics.artifact_chunks(art.id if art else frames.decode(frame).artifact_id)
        )
        self.take(self.driver.on_chunk(topic, frame, self.now))

    def tick(self, dt: float = 0.0) -> DeployState:
        """Let ``dt`` seconds pass (and process results reported by other threads); the state after."""
        self.now += dt
        self.take(self.driver.tick(self.now))
        self.take(self.driver.pump())
        return self.state

    # --------------------------------------------------------------- reads --

    def messages(self) -> list[Any]:
        return [codec.decode(DeviceChannel.EVENTS, p) for t, p in self.published if t == topics.events(self.device_id)]

    def events(self, deployment_id: str | None = None) -> list[DeploymentEvent]:
        return [
            m
            for m in self.messages()
            if isinstance(m, DeploymentEvent) and (deployment_id is None or m.deployment_id == deployment_id)
        ]

    def requests(self) -> list[ChunkRequest]:
        return [m for m in self.messages() if isinstance(m, ChunkRequest)]

    def acks(self) -> list[CommandAck]:
        return [m for m in self.messages() if isinstance(m, CommandAck)]

    def reported_states(self, deployment_id: str | None = None) -> list[DeployState]:
        """The states of the published events, consecutive DOWNLOADING reports (progress) collapsed."""
        out: list[DeployState] = []
        for e in self.events(deployment_id):
            if not (out and out[-1] == e.state == DeployState.DOWNLOADING):
                out.append(e.state)
        return out

    @property
    def state(self) -> DeployState:
        return self.manager.state

    def record_states(self) -> list[DeployState]:
        rec = self.manager.record
        return list(rec.states) if rec is not None else []

    def active_artifact(self) -> str | None:
        slot = self.storage.active_slot()
        meta = self.storage.meta(slot) if slot is not None else None
        return meta.artifact_id if meta is not None else None


def memory_device(key: Ed25519PrivateKey, **kw: Any) -> Device:
    from agent.deploy.memory import MemorySlotStorage

    return Device(key, kw.pop("storage", None) or MemorySlotStorage(keep_data=True), **kw)


def host_ops(device: Device) -> ModelOps:
    """Real model operations on the device's (fresh) ModelHost."""
    return HostModelOps(device.host, device.storage, device.tap)


def deliver(
    device: Device,
    art: Artifact,
    *,
    drop: set[int] | None = None,
    corrupt: set[int] | None = None,
    max_rounds: int = 50,
) -> None:
    """Broadcast every chunk once (leaving out ``drop``, corrupting ``corrupt``), then play the controller's
    repairs: tick the device's clock until it asks, answer every ChunkRequest, until it stops downloading."""
    drop, corrupt = drop or set(), corrupt or set()
    if device.state == DeployState.DOWNLOADING:
        for index in range(len(art)):
            if index not in drop:
                device.chunk(art.frame(index, corrupt=index in corrupt), art=art)
    answered = len(device.requests())
    for _ in range(max_rounds):
        if device.state != DeployState.DOWNLOADING:
            return
        device.tick(device.config.chunk_idle_s)
        for req in device.requests()[answered:]:
            answered += 1
            if req.artifact_id != art.id:
                continue
            for start, end in req.ranges:
                for index in range(start, end):
                    device.chunk(art.frame(index), repair=True)
    raise AssertionError(f"still downloading after {max_rounds} repair rounds: {device.manager.counters}")


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)
