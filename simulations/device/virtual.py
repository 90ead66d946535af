"""One virtual device: the real agent core and deployment state machine on simulated hardware and network.

The wiring is the agent service's (``agent/runtime/service.py``): ``AgentCore`` with a ``DeploymentDriver``
as its deployments hook, durable publishes through the ``Outbox`` and a spool, an ``MqttTransport`` of its
own on the worker's event loop. What is simulated: the hardware (``MemorySlotStorage`` slots, the
``SimModelOps`` model host, job durations from the profile), inference (``simulations.device.behaviour``)
and the trouble the scenario schedules (``fault_started`` / ``fault_ended``).

What survives a power loss is what a device keeps on disk: the slots and the active pointer (the
storage), the deployment record, the nonces of the commands it accepted, and the spool. Everything
else is built again by ``boot``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.core import AgentCore, CoreAction, CoreConfig, Publish, TelemetrySample
from agent.core.guard import CommandGuard, MemoryNonceStore
from agent.core.outbox import Outbox
from agent.core.shell import CoreShell
from agent.deploy.config import DeployConfig
from agent.deploy.driver import DeploymentDriver
from agent.deploy.jobs import JobRunner
from agent.deploy.manager import DeploymentManager
from agent.deploy.memory import MemorySlotStorage
from agent.deploy.record import MemoryRecordStore
from agent.telemetry.spool import MemorySpool
from agent.telemetry.stats import InferenceCounters
from agent.transport.mqtt import MqttConfig
from simulations.device.behaviour import BASE_RSS, Behaviours, Serving, rss_of, simulate_interval
from simulations.device.modelops import CrashRule, SimJobExecutor, SimModelOps, job_seconds
from simulations.device.net import DelayLine, SimTransport, TokenBucket
from simulations.plan import MIB, DeviceSpec
from wire import topics
from wire.manifest import SignedManifest
from wire.messages import DeployState, HardwareProfile, ModelRef

log = logging.getLogger(__name__)

S = DeployState
STATE_CODES = {state.value: i for i, state in enumerate(S)}
#: frames: 48-byte header, chunk index at bytes 8..12
_HEADER = 48
_CHUNK_TOPIC_PREFIX = topics.ARTIFACT_PREFIX + "/"


@dataclass
class WorkerEnv:
    """What every device of a worker process shares."""

    loop: asyncio.AbstractEventLoop
    mqtt: MqttConfig
    key: Ed25519PublicKey
    key_file: Path
    deploy_config: DeployConfig
    behaviours: Behaviours
    hash_chunk: Any
    manifests: dict[str, SignedManifest]
    telemetry_interval_s: float
    keepalive_s: int
    data_dir: Path
    agent_version: str = "sim"
    fleet_start: float = field(default_factory=time.time)
    t0: float | None = None
    seed: int = 1
    #: the (model, version) installed before the rollout: inferences on it are the gates' baseline
    baseline: tuple[str, int] | None = None


@dataclass
class DeviceStats:
    connects: int = 0
    #: connections made to another broker node than the last one (a cluster node died or refused)
    node_moves: int = 0
    disconnects: int = 0
    power_losses: int = 0
    boots: int = 0
    bytes_in: int = 0
    chunk_frames: int = 0
    frames_lost: int = 0
    frames_corrupted: int = 0
    disk_corruptions: int = 0
    telemetry: int = 0
    #: telemetry still in the spool (never acknowledged by a broker) when the device stopped for good
    telemetry_unsent: int = 0
    acked: int = 0
    inferences: int = 0
    #: inferences reported on the model installed before the rollout (the gates' baseline)
    baseline_inferences: int = 0


class VirtualDevice:
    """A simulated device running the agent's core (see the module docstring)."""

    def __init__(self, spec: DeviceSpec, env: WorkerEnv, on_fault: Any = None) -> None:
        self.spec = spec
        self.env = env
        self.loop = env.loop
        self.on_fault = on_fault or (lambda device, kind, detail: None)
        self.stats = DeviceStats()
        #: the broker node of the last connection (a move to another node is counted in ``stats.node_moves``)
        self.last_server: str | None = None
        seed = zlib.crc32(f"{env.seed}:{spec.id}".encode())
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        # --- the "disk": survives a power loss
        self.storage = MemorySlotStorage(capacity_bytes=spec.disk_bytes)
        self.records = MemoryRecordStore()
        self.nonces = MemoryNonceStore()
        self.spool = MemorySpool()
        if spec.installed_artifact is not None:
            self._factory_install(env.manifests[spec.installed_artifact])
        # --- faults
        self.active: dict[int, dict[str, Any]] = {}
        self.skew = 0.0
        self._armed: dict[int, int] = {}  # fault id -> firings left (trigger-based)
        self._fired: dict[int, int] = {}
        self._timers: list[asyncio.TimerHandle] = []
        # --- running parts, built by boot()
        self.powered = False
        self.core: AgentCore | None = None
        self.driver: DeploymentDriver | None = None
        self.ops: SimModelOps | None = None
        self.outbox: Outbox | None = None
        #: the agent's action interpreter over ``transport`` and ``outbox`` (built with the outbox in boot())
        self.shell: CoreShell | None = None
        self.transport: SimTransport | None = None
        self.serving: Serving | None = None
        self._serving_since = 0.0
        self.counters = InferenceCounters()
        self._last_total = 0
        self._tick_handle: asyncio.TimerHandle | None = None
        self._tick_at = 0.0
        self._inbound = DelayLine(self.loop, self._deliver)
        self._outbound = DelayLine(self.loop, self._execute_now)
        self._reconnect_handle: asyncio.TimerHandle | None = None
        self._boot_handle: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ clock --

    def now(self) -> float:
        """The device's clock (skewed by a clock_skew fault)."""
        return time.time() + self.skew

    # ---------------------------------------------------------- install --

    def _factory_install(self, signed: SignedManifest) -> None:
        """The version shipped with the device: a complete, verified slot that the pointer names."""
        self.storage.begin("a", signed)
        for ref in signed.manifest.chunks:
            self.storage.write_chunk("a", ref, b"")  # memory slots keep a bit per chunk, not the bytes
        self.storage.mark_ready("a")
        self.storage.set_active("a")

    def _active_ref(self) -> ModelRef | None:
        slot = self.storage.active_slot()
        meta = self.storage.meta(slot) if slot is not None else None
        if meta is None:
            return None
        m = meta.manifest
        return ModelRef(model=m.model, version=m.version, variant=m.variant)

    # ------------------------------------------------------------- boot --

    def hardware(self) -> HardwareProfile:
        capacity = getattr(self.storage, "capacity_bytes", None)
        free = capacity if capacity is not None else self.spec.disk_bytes
        return HardwareProfile(
            cpu_count=self.spec.cpu_count,
            cpu_model=f"simulated {self.spec.profile} (speed {self.spec.cpu_speed:g})",
            ram_bytes=self.spec.ram_bytes,
            disk_free_bytes=max(0, free),
            arch=self.spec.arch,
            os=self.spec.os,
            providers=["CPUExecutionProvider"],
        )

    def _make_driver(self) -> DeploymentDriver:
        crashes = [
            CrashRule(f["model"], f.get("version_number"), f.get("variants"), f["stage"], f["delay_s"], f["reason"])
            for f in self.active.values()
            if f["kind"] == "model_crash"
        ]
        self.ops = SimModelOps(
            self.loop,
            self.env.behaviours,
            device_id=self.spec.id,
            profile=self.spec.profile,
            ram_bytes=self.spec.ram_bytes,
            cpu_speed=self.spec.cpu_speed,
            inference_rate=self.spec.inference_rate,
            rng=self.np_rng,
            crashes=crashes,
            on_serve=self._on_serve,
        )
        ops = self.ops

        def crash_delay(job: Any) -> float:
            stage = "selftest" if type(job).__name__ == "Verify" else "serve"
            rule = ops.crash(getattr(job, "signed", None), stage)
            return rule.delay_s if rule is not None else 0.0

        executor = SimJobExecutor(
            self.loop,
            lambda job: job_seconds(
                job,
                cpu_speed=self.spec.cpu_speed * self.spec.speed_jitter,
                disk_mbps=self.spec.disk_mbps,
                crash=crash_delay,
            ),
        )
        manager = DeploymentManager(
            self.spec.id,
            self.storage,
            self.records,
            self.env.key,
            self.env.deploy_config,
            hash_chunk=self.env.hash_chunk,
        )
        return DeploymentDriver(
            manager,
            JobRunner(self.storage, ops),
            post=self.loop.call_soon,
            emit=self._execute,
            clock=self.now,
            executor=executor,
        )

    def boot(self) -> None:
        """Power on: build the agent from what was persisted, resume, connect."""
        self._boot_handle = None
        self.powered = True
        self.stats.boots += 1
        now = self.now()
        self.driver = self._make_driver()
        interval = self.env.telemetry_interval_s
        config = CoreConfig(
            device_id=self.spec.id,
            agent_version=self.env.agent_version,
            keepalive_s=self.env.keepalive_s,
            telemetry_interval_s=interval,
            labels=dict(self.spec.labels),
            capabilities=["deploy", "shadow", "simulated"],
        )
        # A random phase keeps a fleet that boots together from reporting in lockstep.
        started = now - self.rng.uniform(0.0, interval)
        guard = CommandGuard(self.spec.id, self.env.key, self.nonces)
        self.core = AgentCore(
            config, self.hardware(), self._sample, started_at=started, deployments=self.driver, guard=guard
        )
        self.outbox = Outbox(self.spool)
        self.shell = CoreShell(self.outbox, lambda: self.transport, on_publish=self._count_publish)
        self._connect()
        self._execute(self.driver.start(now))
        self._schedule_tick()

    def _connect(self) -> None:
        assert self.core is not None
        bw = self._bandwidth()
        transport = self.transport = SimTransport(
            self.env.mqtt,
            self.spec.id,
            will=self.core.will(self.now()),
            loop=self.loop,
            name=self.spec.id,
            on_connect=self._on_connect,
            on_message=self._on_message,
            on_published=self._on_published,
            bucket=TokenBucket(bw) if bw else None,
        )
        transport.start()

    def shutdown(self, final: bool = True) -> Any:
        """Stop for good; returns the transport's stop coroutine (a clean goodbye) or None."""
        self._cancel_timers()
        transport = self.transport
        coro = None
        if transport is not None and self.core is not None and final and transport.connected:
            goodbye = self.core.goodbye(self.now())
            coro = transport.stop((goodbye.topic, goodbye.payload, goodbye.qos, goodbye.retain), timeout=3.0)
        elif transport is not None:
            transport.abort()
        if self.driver is not None:
            self.driver.close()
        if self.ops is not None:
            self.ops.close()
        self.powered = False
        return coro

    def _cancel_timers(self) -> None:
        for handle in (self._tick_handle, self._reconnect_handle, self._boot_handle, *self._timers):
            if handle is not None:
                handle.cancel()
        self._tick_handle = self._reconnect_handle = self._boot_handle = None
        self._timers.clear()
        self._inbound.clear()
        self._outbound.clear()

    # -------------------------------------------------------- transport --

    def _on_connect(self) -> None:
        if self.core is None:
            return
        self.stats.connects += 1
        server = self.transport.server_url if self.transport is not None else None
        if self.last_server is not None and server != self.last_server:
            self.stats.node_moves += 1
        self.last_server = server
        self._execute(self.core.on_connected(self.now()), pump=False)
        self.loop.call_soon(self._pump)  # after paho re-sent what was in flight: keeps the order

    def _on_published(self, mid: int) -> None:
        if self.transport is not None and self.shell is not None and self.shell.acked(mid):
            self.stats.acked += 1

    def _pump(self) -> None:
        if self.shell is not None:
            self.shell.pump()

    def _on_message(self, topic: str, payload: bytes) -> None:
        if not self.powered:
            return
        self.stats.bytes_in += len(payload)
        if self.transport is not None:
            self.transport.account(len(payload))
        chunk = topic.startswith(_CHUNK_TOPIC_PREFIX) or topic.endswith("/chunks")
        delay = 0.0
        if self.active:
            loss = self._max("loss", "rate")
            if chunk:
                self.stats.chunk_frames += 1
                if loss and self.rng.random() < loss:
                    self.stats.frames_lost += 1
                    return
                rate = self._max("corrupt_chunks", "rate", where="transit")
                if rate and self.rng.random() < rate and len(payload) > _HEADER:
                    at = _HEADER + self.rng.randrange(len(payload) - _HEADER)
                    payload = payload[:at] + bytes([payload[at] ^ 0xFF]) + payload[at + 1 :]
                    self.stats.frames_corrupted += 1
            elif loss and self.rng.random() < loss:
                delay += self._max("loss", "rto_ms") / 1000.0
            delay += self._latency()
        elif chunk:
            self.stats.chunk_frames += 1
        if delay > 0:
            self._inbound.put(delay, (topic, payload, chunk))
        else:
            self._deliver((topic, payload, chunk))

    def _deliver(self, item: tuple[str, bytes, bool]) -> None:
        topic, payload, chunk = item
        if not self.powered or self.core is None:
            return
        self._execute(self.core.on_message(topic, payload, self.now()))
        if chunk and self.active:
            rate = self._max("corrupt_chunks", "rate", where="disk")
            if rate and self.rng.random() < rate:
                self._corrupt_on_disk(payload)
        if self._armed:
            self.check_triggers()
        self._schedule_tick()

    def _corrupt_on_disk(self, payload: bytes) -> None:
        assert self.driver is not None
        rec = self.driver.manager.record
        if rec is None or rec.target_slot is None or len(payload) < _HEADER:
            return
        index = int.from_bytes(payload[8:12], "big")
        bitmap = self.driver.manager.bitmap
        corrupt = getattr(self.storage, "corrupt", None)
        if (
            corrupt is not None
            and bitmap is not None
            and bitmap.has(index)
            and rec.target_slot != self.storage.active_slot()
        ):
            corrupt(rec.target_slot, index)
            self.stats.disk_corruptions += 1

    # ------------------------------------------------------------ acting --

    def _execute(self, actions: list[CoreAction], pump: bool = True) -> None:
        if not actions:
            return
        delay = self._latency() if self.active else 0.0
        if delay > 0 or len(self._outbound):
            self._outbound.put(delay, (actions, pump))
        else:
            self._execute_now((actions, pump))

    def _execute_now(self, item: tuple[list[CoreAction], bool]) -> None:
        actions, pump = item
        if self.powered and self.shell is not None:
            self.shell.execute(actions, pump)

    def count_unsent(self) -> None:
        """At the end of the run: the telemetry the spool still holds was counted as sent but never left."""
        entries = self.spool.after(0, len(self.spool) + 1)
        self.stats.telemetry_unsent = sum(1 for e in entries if e.topic.endswith("/telemetry"))

    def _count_publish(self, action: Publish) -> None:
        if action.topic.endswith("/telemetry"):
            self.stats.telemetry += 1

    def _schedule_tick(self) -> None:
        if not self.powered or self.core is None:
            return
        delay = max(0.01, self.core.next_wakeup() - self.now())
        when = self.loop.time() + delay
        if self._tick_handle is not None:
            if when >= self._tick_at - 0.005:
                return
            self._tick_handle.cancel()
        self._tick_at = when
        self._tick_handle = self.loop.call_at(when, self._tick)

    def _tick(self) -> None:
        self._tick_handle = None
        if not self.powered or self.core is None:
            return
        self._execute(self.core.tick(self.now()))
        if self._armed:
            self.check_triggers()
        self._schedule_tick()

    # --------------------------------------------------------- inference --

    def _on_serve(self, serving: Serving | None) -> None:
        self.serving = serving
        self._serving_since = self.now()

    def _simulated(self) -> bool:
        """True when inference is simulated (a real-onnxruntime device runs it in a thread instead)."""
        return True

    def _sample(self, interval_s: float) -> TelemetrySample:
        serving = self.serving
        busy = 0.0
        behaviour = self.env.behaviours.get(serving.model, serving.version) if serving is not None else None
        if serving is not None and behaviour is not None and self._simulated():
            busy = simulate_interval(
                self.counters,
                self.np_rng,
                behaviour,
                serving,
                interval_s=interval_s,
                rate=self.spec.inference_rate,
                cpu_speed=self.spec.cpu_speed,
                jitter=self.spec.speed_jitter,
                latency_factor=self._latency_factor(),
            )
        total = self.counters.total_count + self.counters.total_errors
        made = max(0, total - self._last_total)
        self._last_total = total
        self.stats.inferences += made
        if serving is not None and (serving.model, serving.version) == self.env.baseline:
            self.stats.baseline_inferences += made
        ref = ModelRef(model=serving.model, version=serving.version, variant=serving.variant) if serving else None
        cpu = min(100.0, 2.0 + 100.0 * busy / self.spec.cpu_count)
        rss = rss_of(serving, behaviour, self.np_rng)
        return TelemetrySample(
            cpu_percent=round(cpu + self.rng.uniform(0, 1.5), 2),
            rss_bytes=rss,
            serving_s=self.now() - self._serving_since if serving is not None else None,
            model_rss_bytes=max(0, rss - BASE_RSS) if serving is not None else None,
            temperature_c=round(45.0 + 20.0 * busy + self.rng.uniform(-1, 1), 1),
            model=ref,
            inference=self.counters.snapshot(interval_s),
            spool_depth=len(self.spool),
            spool_dropped=self.spool.dropped,
        )

    def _latency_factor(self) -> float:
        return 1.0

    # ------------------------------------------------------------ faults --

    def _max(self, kind: str, key: str, **match: Any) -> float:
        best = 0.0
        for f in self.active.values():
            if f["kind"] == kind and all(f.get(k) == v for k, v in match.items()):
                best = max(best, float(f.get(key) or 0.0))
        return best

    def _latency(self) -> float:
        total = 0.0
        for f in self.active.values():
            if f["kind"] == "latency":
                jitter = f.get("jitter_ms") or 0.0
                total += (f["latency_ms"] + (self.rng.uniform(-jitter, jitter) if jitter else 0.0)) / 1000.0
        return max(0.0, total)

    def _bandwidth(self) -> float | None:
        caps = [f["bytes_per_s"] for f in self.active.values() if f["kind"] == "bandwidth"]
        return min(caps) if caps else None

    def arm_start(self) -> None:
        """Faults without ``at_s``: on from the start (or armed, for a trigger)."""
        for f in self.spec.faults:
            if f["at_s"] is not None:
                continue
            if f.get("when"):
                self._armed[f["id"]] = f.get("times") or 1
            else:
                self.fire(f)

    def arm_rollout(self, t0: float) -> None:
        """Faults with ``at_s``: that many seconds after the rollout was created (``t0``, wall clock)."""
        for f in self.spec.faults:
            if f["at_s"] is None:
                continue
            delay = t0 + f["at_s"] - time.time()
            if f.get("when"):
                self._later(delay, lambda f=f: self._arm_trigger(f["id"], f))
            else:
                self._later(delay, lambda f=f: self.fire(f))

    def _arm_trigger(self, fid: int, f: dict[str, Any]) -> None:
        self._armed[fid] = f.get("times") or 1

    def _later(self, delay: float, fn: Any) -> None:
        self._timers.append(self.loop.call_later(max(0.0, delay), fn))

    def check_triggers(self) -> None:
        if self.driver is None:
            return
        manager = self.driver.manager
        state = manager.state.value
        for fid in list(self._armed):
            f = next(x for x in self.spec.faults if x["id"] == fid)
            when = f["when"]
            if state != when["state"]:
                continue
            if state == S.DOWNLOADING.value:
                bitmap = manager.bitmap
                if bitmap is None or bitmap.total == 0 or bitmap.count / bitmap.total < when["progress"]:
                    continue
            left = self._armed[fid] - 1
            if left <= 0:
                del self._armed[fid]
            else:
                self._armed[fid] = left
            self.loop.call_soon(self.fire, f)

    def fire(self, f: dict[str, Any]) -> None:
        """A fault starts on this device now."""
        fid, kind = f["id"], f["kind"]
        self._fired[fid] = self._fired.get(fid, 0) + 1
        state = self.driver.manager.state.value if self.driver is not None else "off"
        if not f.get("calibration"):  # a measured link speed (calibration.download) is no fault
            self.on_fault(self, kind, f"in state {state}")
        if kind == "power_loss":
            if self.powered:
                self.power_loss(f["duration_s"])
            return
        if kind == "disconnect":
            self.disconnect(f["duration_s"])
            repeat = f.get("repeat_every_s")
            if repeat and self._fired[fid] < (f.get("times") or 1):
                self._later(repeat, lambda: self.fire(f))
            return
        self.active[fid] = f
        self._applied(f, True)
        if f.get("duration_s"):
            self._later(f["duration_s"], lambda: self.end(f))

    def end(self, f: dict[str, Any]) -> None:
        if self.active.pop(f["id"], None) is not None:
            self._applied(f, False)

    def _applied(self, f: dict[str, Any], on: bool) -> None:
        kind = f["kind"]
        if kind == "clock_skew":
            self.skew = sum(x["skew_s"] for x in self.active.values() if x["kind"] == "clock_skew")
            self._schedule_tick()
        elif kind == "bandwidth" and self.transport is not None:
            bw = self._bandwidth()
            self.transport.bucket = TokenBucket(bw) if bw else None
        elif kind == "disk_full":
            fulls = [x for x in self.active.values() if x["kind"] == "disk_full"]
            if fulls:
                slot = self.storage.active_slot()
                meta = self.storage.meta(slot) if slot is not None else None
                used = meta.manifest.total_size if meta is not None else 0
                self.storage.capacity_bytes = used + int(min(x["free_mb"] for x in fulls) * MIB)
            else:
                self.storage.capacity_bytes = self.spec.disk_bytes
            if self.core is not None:
                self.core.hardware = self.hardware()
                if self.powered:
                    self._execute([self.core.birth(self.now())])
        elif kind == "model_crash" and self.ops is not None:
            self.ops.crashes = [
                CrashRule(x["model"], x.get("version_number"), x.get("variants"), x["stage"], x["delay_s"], x["reason"])
                for x in self.active.values()
                if x["kind"] == "model_crash"
            ]

    def power_loss(self, down_s: float) -> None:
        """Power cut: no goodbye (the broker sends the will), RAM lost, the disk kept; boots after ``down_s``."""
        self.stats.power_losses += 1
        transport = self.transport
        if transport is not None:
            transport.abort()
        self.transport = None
        self._spill_outbound()
        if self.driver is not None:
            self.driver.close()
        if self.ops is not None:
            self.ops.close()
        for handle in (self._tick_handle, self._reconnect_handle):
            if handle is not None:
                handle.cancel()
        self._tick_handle = self._reconnect_handle = None
        self._inbound.clear()
        self._outbound.clear()
        self.powered = False
        self.core = self.driver = self.ops = None
        self.outbox = self.shell = None
        self.serving = None
        self.counters = InferenceCounters()
        self._last_total = 0
        self._boot_handle = self.loop.call_later(down_s, self.boot)

    def _spill_outbound(self) -> None:
        """The link or the power goes while actions wait out the simulated latency: what the real agent
        had put in its outbox (durable publishes, spooled on disk) survives and goes again later; the rest
        (telemetry sent directly, subscriptions, which the next connection makes again) is lost."""
        outbox = self.outbox
        for actions, _pump in self._outbound.take_all():
            for action in actions:
                if outbox is not None and isinstance(action, Publish) and action.durable:
                    outbox.add(action)

    def disconnect(self, down_s: float) -> None:
        """The link drops (the broker sends the will); the agent keeps running and reconnects after ``down_s``."""
        if not self.powered:
            return
        self.stats.disconnects += 1
        if self.transport is not None:
            self.transport.abort()
        self.transport = None
        self._inbound.clear()
        self._spill_outbound()
        if self._reconnect_handle is not None:
            self._reconnect_handle.cancel()
        self._reconnect_handle = self.loop.call_later(down_s, self._reconnect)

    def _reconnect(self) -> None:
        self._reconnect_handle = None
        if not self.powered or self.outbox is None:
            return
        self.outbox.restart()  # a new client session: everything still spooled goes again
        self._connect()

    # ------------------------------------------------------------ status --

    @property
    def connected(self) -> bool:
        return self.transport is not None and self.transport.connected

    def status(self) -> tuple[Any, ...]:
        """(state code, progress, model version, variant, deployment id, connected) for the runner."""
        state, progress, dep = 0, 0.0, ""
        if self.driver is not None:
            manager = self.driver.manager
            rec = manager.record
            state = STATE_CODES[manager.state.value]
            if rec is not None:
                dep = rec.deployment_id
                if manager.state == S.DOWNLOADING and manager.bitmap is not None and manager.bitmap.total:
                    progress = manager.bitmap.count / manager.bitmap.total
                elif manager.state not in (S.FAILED, S.CANCELLED, S.IDLE):
                    progress = 1.0
        else:
            rec = self.records.load().record
            if rec is not None:
                state, dep = STATE_CODES[rec.state.value], rec.deployment_id
        ref = self._active_ref()
        return (
            state,
            round(progress, 3),
            ref.version if ref else 0,
            ref.variant if ref else "",
            dep,
            1 if self.connected else (0 if self.powered else -1),
            ref.model if ref else "",
        )
