"""A worker process: one asyncio loop running a share of the fleet, talking to the runner over a pipe.

Messages from the runner: ``("rollout", t0)`` (the rollout was created at wall-clock ``t0``: arm the
faults scheduled after it) and ``("stop", None)``. Messages to the runner: ``("booted", {...})`` once
every device has been started, ``("status", {...})`` every ``status_interval_s`` (each device's state,
the summed counters, fault events since the last status) and ``("final", {...})`` after the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from agent.deploy.config import DeployConfig
from agent.transport.mqtt import MqttConfig
from simulations.device.behaviour import Behaviours
from simulations.device.net import ChunkHashes
from simulations.device.virtual import DeviceStats, VirtualDevice, WorkerEnv
from simulations.plan import DeviceSpec
from wire import signing
from wire.manifest import SignedManifest

log = logging.getLogger(__name__)


@dataclass
class WorkerConfig:
    """Everything a worker needs (pickled to the spawned process)."""

    index: int
    broker: dict[str, Any]
    public_key_pem: str
    data_dir: str
    devices: list[DeviceSpec]
    behaviours: dict[str, dict[str, Any]] = field(default_factory=dict)
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    deploy: dict[str, float] = field(default_factory=dict)
    telemetry_interval_s: float = 5.0
    keepalive_s: int = 60
    connect_rate: float = 1000.0
    seed: int = 1
    share_chunk_hashes: bool = True
    status_interval_s: float = 1.0
    baseline: tuple[str, int] | None = None
    log_level: str = "WARNING"
    agent_version: str = "sim"


class Worker:
    def __init__(self, config: WorkerConfig, conn: Connection) -> None:
        self.config = config
        self.conn = conn
        self.devices: list[VirtualDevice] = []
        self.fault_events: list[tuple[float, str, str, str]] = []
        self.fault_counts: dict[str, int] = {}
        self.lag_max = 0.0
        self._stop = asyncio.Event()
        self._hashes: ChunkHashes | None = None

    def _env(self, loop: asyncio.AbstractEventLoop) -> WorkerEnv:
        c = self.config
        data_dir = Path(c.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        key_file = data_dir / "controller-key.pem"
        key_file.write_text(c.public_key_pem)
        key = signing.load_public_key(c.public_key_pem.encode())
        self._hashes = ChunkHashes() if c.share_chunk_hashes else None
        import hashlib

        def sha256_hex(data: bytes) -> str:
            return hashlib.sha256(data).hexdigest()

        mqtt = MqttConfig(**c.broker, keepalive_s=c.keepalive_s, session_expiry_s=3600, reconnect_max_s=10.0)
        return WorkerEnv(
            loop=loop,
            mqtt=mqtt,
            key=key,
            key_file=key_file,
            deploy_config=DeployConfig(**c.deploy),  # type: ignore[arg-type]
            behaviours=Behaviours(c.behaviours),
            hash_chunk=self._hashes if self._hashes is not None else sha256_hex,
            manifests={a: SignedManifest.model_validate(m) for a, m in c.manifests.items()},
            telemetry_interval_s=c.telemetry_interval_s,
            keepalive_s=c.keepalive_s,
            data_dir=data_dir,
            agent_version=c.agent_version,
            seed=c.seed,
            baseline=tuple(c.baseline) if c.baseline else None,  # type: ignore[arg-type]
        )

    def _on_fault(self, device: VirtualDevice, kind: str, detail: str) -> None:
        self.fault_counts[kind] = self.fault_counts.get(kind, 0) + 1
        if len(self.fault_events) < 2000:
            self.fault_events.append((time.time(), device.spec.id, kind, detail))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        env = self._env(loop)
        from simulations.device.real import RealOnnxDevice

        for spec in self.config.devices:
            cls = RealOnnxDevice if spec.real_onnx else VirtualDevice
            device = cls(spec, env, self._on_fault)
            self.devices.append(device)
        loop.add_reader(self.conn.fileno(), self._on_pipe)
        lag_task = loop.create_task(self._watch_lag())
        # Boot at the connect rate: a fleet does not power on in one millisecond either.
        started = time.monotonic()
        for i, device in enumerate(self.devices):
            device.arm_start()
            device.boot()
            due = started + (i + 1) / self.config.connect_rate
            if i % 50 == 49:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
        self._send("booted", {"devices": len(self.devices), "boot_s": time.monotonic() - started})
        status_task = loop.create_task(self._status_loop())
        await self._stop.wait()
        status_task.cancel()
        lag_task.cancel()
        await self._shutdown()

    def _on_pipe(self) -> None:
        try:
            kind, body = self.conn.recv()
        except (EOFError, OSError):
            self._stop.set()  # the runner went away
            return
        if kind == "rollout":
            for device in self.devices:
                device.arm_rollout(float(body))
        elif kind == "stop":
            self._stop.set()

    async def _watch_lag(self) -> None:
        """How late the loop runs callbacks: the sign that a worker has more devices than it can drive."""
        while True:
            start = time.monotonic()
            await asyncio.sleep(0.2)
            self.lag_max = max(self.lag_max, time.monotonic() - start - 0.2)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.status_interval_s)
            self._send("status", self.status())

    def status(self) -> dict[str, Any]:
        stats = DeviceStats()
        for device in self.devices:
            for key, value in asdict(device.stats).items():
                setattr(stats, key, getattr(stats, key) + value)
        events, self.fault_events = self.fault_events, []
        lag, self.lag_max = self.lag_max, 0.0
        return {
            "t": time.time(),
            "worker": self.config.index,
            "devices": [d.status() for d in self.devices],
            "baseline_inferences": [d.stats.baseline_inferences for d in self.devices],
            "stats": asdict(stats),
            "fault_counts": dict(self.fault_counts),
            "fault_events": events,
            "hash_hits": self._hashes.hits if self._hashes else 0,
            "hash_misses": self._hashes.misses if self._hashes else 0,
            "loop_lag_s": round(lag, 4),
            "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "cpu_s": sum(os.times()[:2]),
        }

    async def _shutdown(self) -> None:
        stops = [d.shutdown(final=True) for d in self.devices]
        coros = [c for c in stops if c is not None]
        if coros:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*coros, return_exceptions=True), 15)
        for device in self.devices:
            device.count_unsent()
        self._send("final", self.status())

    def _send(self, kind: str, body: Any) -> None:
        try:
            self.conn.send((kind, body))
        except (BrokenPipeError, OSError):
            self._stop.set()


def worker_main(config: WorkerConfig, conn: Connection) -> None:
    """Entry point of a spawned worker process."""
    logging.basicConfig(
        level=config.log_level, stream=sys.stderr, format=f"worker{config.index} %(levelname)s %(name)s: %(message)s"
    )
    # A fleet's worth of reconnect warnings is noise in a simulation; the runner reports the counts.
    logging.getLogger("agent.transport.mqtt").setLevel(logging.ERROR)
    try:
        asyncio.run(Worker(config, conn).run())
    except KeyboardInterrupt:
        pass
    finally:
        conn.close()
