"""SHADOW: the candidate runs beside the active model on sampled live inputs, and the agreement is measured.

The inference worker calls ``ShadowTap.offer(record, active_result, active_latency_ms)`` after every
record the active model answered (the latency is optional; with it the report compares both models).
That call never blocks and never raises: when no shadow run is on it returns at once; during one it
samples the record and queues it for the shadow thread, dropping it when the queue is full, so live
inference never waits for the candidate.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.inference.pipelines.base import Pipeline
from agent.telemetry.system import rss_bytes
from wire.manifest import Task
from wire.messages import ShadowSpec

log = logging.getLogger(__name__)

_STOP = object()


def _cosine(a: list[float], b: list[float]) -> float | None:
    if len(a) != len(b) or not a:
        return None
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else None


def agreement(task: Task, active: dict[str, Any], candidate: dict[str, Any]) -> float | None:
    """How much the candidate agrees with the active model on one input (0..1; cosine may go to -1).

    Same label (classification), cosine of the embeddings, same anomaly decision, or the share of
    generated tokens that match position by position. None when the two cannot be compared.
    """
    if "error" in active or "error" in candidate:
        return None
    if task == Task.TEXT_CLASSIFICATION:
        return float(active.get("label") == candidate.get("label"))
    if task == Task.EMBEDDINGS:
        a, b = active.get("embedding"), candidate.get("embedding")
        return _cosine(a, b) if isinstance(a, list) and isinstance(b, list) else None
    if task == Task.ANOMALY:
        return float(active.get("anomaly") == candidate.get("anomaly"))
    a_tokens = str(active.get("text", "")).split()
    b_tokens = str(candidate.get("text", "")).split()
    longest = max(len(a_tokens), len(b_tokens))
    if longest == 0:
        return 1.0
    return sum(x == y for x, y in zip(a_tokens, b_tokens, strict=False)) / longest


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class ShadowSession:
    """One shadow run: a thread that answers sampled records with the candidate and compares."""

    def __init__(
        self,
        pipeline: Pipeline,
        task: Task,
        spec: ShadowSpec,
        on_done: Callable[[dict[str, float], str], None],
        *,
        queue_size: int = 64,
        sample: Callable[[], float] = random.random,
    ) -> None:
        self.pipeline = pipeline
        self.task = task
        self.spec = spec
        self._on_done = on_done
        self._sample = sample
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._done = False
        self.offered = 0
        self.dropped = 0
        self.errors = 0
        self.agreements: list[float] = []
        self.latencies_ms: list[float] = []
        self.active_latencies_ms: list[float] = []
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def done(self) -> bool:
        return self._done

    def offer(self, record: Any, active_result: Any, active_latency_ms: float | None = None) -> None:
        if self._done or not isinstance(active_result, dict) or "error" in active_result:
            return
        if self._sample() >= self.spec.sample_rate:
            return
        self.offered += 1
        try:
            self._queue.put_nowait((record, active_result, active_latency_ms))
        except queue.Full:
            self.dropped += 1

    def stop(self) -> None:
        """End the run now and report what was measured (the max duration passed, or the switch comes)."""
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            self._finish()  # the thread is busy; report now, it stops at its next look

    def _run(self) -> None:
        while not self._done:
            item = self._queue.get()
            if item is _STOP:
                break
            record, active_result, active_latency_ms = item
            if active_latency_ms is not None:
                self.active_latencies_ms.append(float(active_latency_ms))
            start = time.perf_counter()
            try:
                result = self.pipeline.run([record])[0]
            except Exception as exc:  # the candidate's failure is data, not a crash of the agent
                result = {"error": str(exc)}
            self.latencies_ms.append((time.perf_counter() - start) * 1000.0)
            score = agreement(self.task, active_result, result)
            if score is None:
                self.errors += 1
            else:
                self.agreements.append(score)
            if len(self.agreements) + self.errors >= self.spec.min_samples:
                break
        self._finish()

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {
            "shadow_samples": float(len(self.agreements)),
            "shadow_errors": float(self.errors),
            "shadow_dropped": float(self.dropped),
            "shadow_rss_bytes": float(rss_bytes()),
        }
        if self.agreements:
            out["shadow_agreement"] = round(statistics.fmean(self.agreements), 6)
        if self.latencies_ms:
            out["shadow_latency_ms_p50"] = round(_percentile(self.latencies_ms, 0.5), 3)
            out["shadow_latency_ms_p95"] = round(_percentile(self.latencies_ms, 0.95), 3)
        if self.active_latencies_ms:
            out["active_latency_ms_p50"] = round(_percentile(self.active_latencies_ms, 0.5), 3)
            out["active_latency_ms_p95"] = round(_percentile(self.active_latencies_ms, 0.95), 3)
        return out

    def _finish(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        metrics = self.metrics()
        attempts = len(self.agreements) + self.errors
        error = ""
        if attempts >= 4 and self.errors * 2 > attempts:
            error = f"the candidate failed on {self.errors} of {attempts} sampled live inputs"
        log.info("shadow run done: %s%s", metrics, f" ({error})" if error else "")
        self._on_done(metrics, error)


class ShadowTap:
    """The stable hook handed to the inference worker; a shadow session plugs into it while it runs."""

    def __init__(self) -> None:
        self._session: ShadowSession | None = None

    def offer(self, record: Any, active_result: Any, active_latency_ms: float | None = None) -> None:
        """Offer one live record, the active model's result and its latency (cheap; never raises)."""
        session = self._session
        if session is None:
            return
        try:
            session.offer(record, active_result, active_latency_ms)
        except Exception:  # pragma: no cover - must never reach the inference worker
            log.exception("shadow offer failed")

    @property
    def running(self) -> bool:
        session = self._session
        return session is not None and not session.done

    def begin(self, session: ShadowSession) -> None:
        old, self._session = self._session, session
        if old is not None:
            old.stop()
        session.start()

    def end(self) -> ShadowSession | None:
        session, self._session = self._session, None
        if session is not None:
            session.stop()
        return session
