"""The simulated model host of a virtual device, and the job runner's clock.

``SimModelOps`` implements the agent's ``ModelOps`` (``agent.deploy.modelops``) without loading anything:
the self-test checks what a real one would find out (a model that crashes on this hardware, a variant that
needs more RAM than the device has, a latency budget) from the scenario's faults and the behaviour model,
and a shadow run reports the agreement the behaviour model gives after the time the samples would take.

``SimJobExecutor`` replaces the deployment driver's worker thread: it runs the jobs one at a time, in order,
on the event loop, each after the time it would take on the simulated device (hashing the files at the
profile's disk speed, loading and warming up the model at its CPU speed).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.deploy.actions import (
    Checkpoint,
    Prepare,
    Serve,
    ShadowReport,
    StartShadow,
    Switch,
    Verify,
)
from agent.deploy.errors import DeployError
from agent.deploy.ids import artifact_id
from agent.deploy.modelops import Report, SelfTestReport
from simulations.device.behaviour import Behaviours, Serving
from wire.manifest import SignedManifest
from wire.messages import ShadowSpec

log = logging.getLogger(__name__)

#: model bytes loaded per second on the reference CPU (parse, allocate, prepack)
LOAD_BYTES_PER_S = 200e6
#: fixed cost of creating a session
LOAD_BASE_S = 0.05


@dataclass
class CrashRule:
    """A ``model_crash`` fault of this device."""

    model: str
    version: int | None
    variants: list[str] | None
    stage: str
    delay_s: float
    reason: str

    def matches(self, signed: SignedManifest | None, stage: str) -> bool:
        if signed is None or stage != self.stage:
            return False
        m = signed.manifest
        return (
            m.model == self.model
            and (self.version is None or m.version == self.version)
            and (self.variants is None or m.variant in self.variants)
        )


class SimModelOps:
    """``ModelOps`` of a simulated device (see the module docstring)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        behaviours: Behaviours,
        *,
        device_id: str,
        profile: str,
        ram_bytes: int,
        cpu_speed: float,
        inference_rate: float,
        rng: np.random.Generator,
        crashes: list[CrashRule],
        on_serve: Callable[[Serving | None], None],
    ) -> None:
        self.loop = loop
        self.behaviours = behaviours
        self.device_id = device_id
        self.profile = profile
        self.ram_bytes = ram_bytes
        self.cpu_speed = cpu_speed
        self.inference_rate = inference_rate
        self.rng = rng
        self.crashes = crashes
        self.on_serve = on_serve
        self._shadow: dict[int, tuple[asyncio.TimerHandle, float, Callable[[float], None]]] = {}
        self.loads = 0

    def crash(self, signed: SignedManifest | None, stage: str) -> CrashRule | None:
        return next((c for c in self.crashes if c.matches(signed, stage)), None)

    def self_test(self, slot: str, signed: SignedManifest, keep: bool) -> SelfTestReport:
        m = signed.manifest
        crash = self.crash(signed, "selftest")
        if crash is not None:
            return SelfTestReport(
                False, f"self-test failed (load): the model does not load: {crash.reason} (profile {self.profile})"
            )
        need = m.requirements.min_ram_bytes
        if need and need > self.ram_bytes:
            return SelfTestReport(
                False,
                f"self-test failed (memory): the {m.variant} variant needs {need >> 20} MiB of RAM, the device has"
                f" {self.ram_bytes >> 20} MiB",
            )
        behaviour = self.behaviours.get(m.model, m.version)
        latency = behaviour.median_ms(m.variant, self.cpu_speed) * float(self.rng.lognormal(0, 0.05))
        if m.budget.max_latency_ms and latency > m.budget.max_latency_ms:
            return SelfTestReport(
                False,
                f"self-test failed (latency): median latency {latency:.1f} ms exceeds the budget of"
                f" {m.budget.max_latency_ms:.1f} ms",
            )
        metrics = {
            "selftest_latency_ms": round(latency, 3),
            "selftest_load_ms": round(load_seconds(signed, self.cpu_speed) * 1000.0, 3),
            "selftest_rss_delta_bytes": float(int(need / 1.25)) if need else 0.0,
        }
        return SelfTestReport(True, "", metrics)

    def load_for_serving(self, slot: str | None, signed: SignedManifest | None) -> Serving | None:
        crash = self.crash(signed, "serve")
        if crash is not None:
            raise DeployError(f"the model crashed while loading: {crash.reason} (profile {self.profile})")
        if slot is None or signed is None:
            return None  # the model served before any slot: a simulated device had none
        m = signed.manifest
        self.loads += 1
        return Serving(m.model, m.version, m.variant, artifact_id(m), int(m.requirements.min_ram_bytes / 1.25))

    def serve(self, handle: Serving | None) -> None:
        self.on_serve(handle)

    def start_shadow(self, token: int, slot: str, signed: SignedManifest, spec: ShadowSpec, report: Report) -> None:
        m = signed.manifest
        behaviour = self.behaviours.get(m.model, m.version)
        sample_rate = self.inference_rate * spec.sample_rate
        needed = spec.min_samples / sample_rate if sample_rate > 0 else math.inf
        duration = min(needed, spec.max_duration_s)
        started = self.loop.time()

        def finish(elapsed: float) -> None:
            self._shadow.pop(token, None)
            samples = int(min(spec.min_samples, self.rng.poisson(max(sample_rate * elapsed, 0.0))))
            metrics: dict[str, float] = {"shadow_samples": float(samples), "shadow_errors": 0.0, "shadow_dropped": 0.0}
            if samples:
                agree = int(self.rng.binomial(samples, behaviour.agreement_of(m.variant)))
                metrics["shadow_agreement"] = round(agree / samples, 6)
                median = behaviour.median_ms(m.variant, self.cpu_speed)
                metrics["shadow_latency_ms_p50"] = round(median, 3)
                metrics["shadow_latency_ms_p95"] = round(median * math.exp(1.645 * behaviour.latency_sigma), 3)
            report(ShadowReport(token, metrics))

        handle = self.loop.call_later(duration, lambda: finish(duration))
        self._shadow[token] = (handle, started, finish)

    def stop_shadow(self, token: int) -> None:
        entry = self._shadow.pop(token, None)
        if entry is not None:
            handle, started, finish = entry
            handle.cancel()
            finish(max(0.0, self.loop.time() - started))  # what was measured until the stop

    def discard(self, slot: str) -> None:
        return None

    def close(self) -> None:
        for handle, _, _ in self._shadow.values():
            handle.cancel()
        self._shadow.clear()


def load_seconds(signed: SignedManifest, cpu_speed: float) -> float:
    return LOAD_BASE_S + signed.manifest.total_size / LOAD_BYTES_PER_S / max(cpu_speed, 1e-6)


class SimJobExecutor(Executor):
    """Runs submitted jobs in order on the event loop, each after ``duration(job)`` seconds."""

    def __init__(self, loop: asyncio.AbstractEventLoop, duration: Callable[[Any], float]) -> None:
        self._loop = loop
        self._duration = duration
        self._queue: deque[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Future[Any]]] = deque()
        self._handle: asyncio.Handle | None = None
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        if self._closed:
            future.cancel()
            return future
        self._queue.append((fn, args, kwargs, future))
        self._kick()
        return future

    def _kick(self) -> None:
        if self._handle is not None or not self._queue or self._closed:
            return
        _fn, args, _kw, _future = self._queue[0]
        delay = self._duration(args[0] if args else None)
        if delay <= 0:
            self._handle = self._loop.call_soon(self._run_head)
        else:
            self._handle = self._loop.call_later(delay, self._run_head)

    def _run_head(self) -> None:
        self._handle = None
        if not self._queue:
            return
        fn, args, kwargs, future = self._queue.popleft()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # the driver's job wrapper already turns failures into results
            log.exception("simulated job failed")
            future.set_exception(exc)
        self._kick()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Power off: jobs not started never run (a job is atomic here, so none is cut in half)."""
        self._closed = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        while self._queue:
            self._queue.popleft()[3].cancel()


def job_seconds(job: Any, *, cpu_speed: float, disk_mbps: float, crash: Callable[[Any], float]) -> float:
    """How long a deployment job takes on the simulated device."""
    if isinstance(job, Checkpoint):
        return 0.0
    if isinstance(job, Prepare):
        return 0.002
    if isinstance(job, Verify):
        size = job.signed.manifest.total_size
        return size / (disk_mbps * 1e6) + load_seconds(job.signed, cpu_speed) + crash(job)
    if isinstance(job, Switch | Serve):
        if job.signed is None:
            return 0.01
        return load_seconds(job.signed, cpu_speed) * (0.3 if isinstance(job, Switch) else 1.0) + crash(job)
    if isinstance(job, StartShadow):
        return 0.01
    return 0.001
