"""The serving engine: one bounded input queue, micro-batches, one inference thread, result sinks.

Every input (files, stdin, MQTT topics, the local HTTP endpoint) submits records here. The inference
thread takes a micro-batch (up to ``max_batch`` records, waiting at most ``max_wait_ms`` after the
first one arrived for more to come), pins the active pipeline with ``ModelHost.acquire()`` for that
batch, runs it, and hands each result to its requester (HTTP) or to the sinks (results file, MQTT).
A model switch therefore never splits a batch or loses a queued record: the running batch finishes
on the old pipeline, the next one runs on the new pipeline.

Waiting for a batch to fill only pays where batching does: pipelines that run one row at a time
(dynamic-int8 encoders, generation, raw tensors) get their records without the added wait.

The queue is bounded. Inputs that cannot wait (MQTT, HTTP) get a refusal when it is full, counted
as a drop; finite inputs (files, stdin) block instead, so a file is never half served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from agent.inference.host import ModelHost
from agent.inference.session import InputError
from agent.telemetry.stats import InferenceCounters
from wire.manifest import Task
from wire.messages import ModelRef
from wire.results import InferenceResult

log = logging.getLogger(__name__)

#: ``reply(result, model)``: called in the inference thread with one record's result.
Reply = Callable[[dict[str, Any], ModelRef | None], None]
#: ``tap(record, result, latency_ms)``: sees every batched record's result (e.g. the deployment's shadow run).
Tap = Callable[[Any, dict[str, Any], float], None]
#: ``on_event(kind, data)`` for streams: kind is "piece" ({"text"}), "done" ({"text", "tokens"}) or "error".
StreamEvent = Callable[[str, dict[str, Any]], None]

#: The error of every record served while no model is loaded.
NO_MODEL = "no model is loaded"
_BATCHING_TASKS = frozenset({Task.TEXT_CLASSIFICATION, Task.EMBEDDINGS, Task.ANOMALY})
_GENERATION_TASKS = frozenset({Task.TEXT_GENERATION, Task.TEXT2TEXT})


class Request:
    """One record waiting for inference."""

    __slots__ = ("record", "source", "reply", "to_sinks", "enqueued")

    def __init__(self, record: Any, source: str, reply: Reply | None = None, to_sinks: bool = True) -> None:
        self.record = record
        self.source = source
        self.reply = reply
        self.to_sinks = to_sinks
        self.enqueued = time.perf_counter()


class StreamRequest:
    """One generation whose text pieces go to ``on_event`` as they are produced (never batched)."""

    __slots__ = ("record", "source", "on_event", "cancelled", "enqueued")

    def __init__(self, record: dict[str, Any], source: str, on_event: StreamEvent) -> None:
        self.record = record
        self.source = source
        self.on_event = on_event
        self.cancelled = threading.Event()
        self.enqueued = time.perf_counter()


Item = Request | StreamRequest


class Sink(Protocol):
    """Where results of records without a reply channel go (results file, MQTT)."""

    def write(self, results: Sequence[InferenceResult]) -> None: ...

    def close(self) -> None: ...


class BoundedQueue:
    """A FIFO with a capacity, all-or-nothing multi-put, and batch takes with a deadline."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.unfinished = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Item, block: bool = False, timeout: float | None = None) -> bool:
        """Append ``item``; False when full (after waiting up to ``timeout`` if ``block``) or closed."""
        with self._cond:
            if block:
                deadline = None if timeout is None else time.monotonic() + timeout
                while len(self._items) >= self.maxsize and not self._closed:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining)
            if self._closed or len(self._items) >= self.maxsize:
                return False
            self._items.append(item)
            self.unfinished += 1
            self._cond.notify_all()
            return True

    def put_many(self, items: Sequence[Item]) -> bool:
        """Append all of ``items`` or none of them (a request of several records is one unit)."""
        with self._cond:
            if self._closed or len(self._items) + len(items) > self.maxsize:
                return False
            self._items.extend(items)
            self.unfinished += len(items)
            self._cond.notify_all()
            return True

    def take_batch(self, max_batch: int, max_wait_s: Callable[[], float]) -> list[Item] | None:
        """Block for the first item, then gather up to ``max_batch`` until ``max_wait_s()`` after it was queued.

        ``max_wait_s`` is asked once the first item is there (the model serving it may have changed while
        the queue was empty). A stream request is only ever taken alone. Returns None once closed and drained.
        """
        with self._cond:
            while not self._items:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._items.popleft()
            batch: list[Item] = [first]
            if isinstance(first, StreamRequest):
                self._cond.notify_all()
                return batch
            deadline = first.enqueued + max_wait_s()
            while len(batch) < max_batch:
                if self._items:
                    if isinstance(self._items[0], StreamRequest):
                        break
                    batch.append(self._items.popleft())
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            self._cond.notify_all()  # room for blocked producers
            return batch

    def done(self, n: int) -> None:
        with self._cond:
            self.unfinished -= n
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until everything queued so far was processed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.unfinished > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def record_id(record: Any) -> str | int | None:
    """The record's own ``id`` (a string or an integer), echoed with its result."""
    if isinstance(record, dict):
        value = record.get("id")
        if isinstance(value, str):
            return value[:256]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class InferenceEngine:
    """The queue and the inference thread. Thread-safe ``submit*``; ``start()`` once, ``stop()`` at the end."""

    def __init__(
        self,
        host: ModelHost,
        counters: InferenceCounters,
        *,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        queue_size: int = 256,
        sinks: Iterable[Sink] = (),
        include_input: bool = False,
    ) -> None:
        self.host = host
        self.counters = counters
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_ms / 1000.0)
        self.queue = BoundedQueue(queue_size)
        self.sinks = list(sinks)
        self.include_input = include_input
        #: called in the inference thread for each record of each batch (must be cheap and not raise)
        self.taps: list[Tap] = []
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._seq = 0
        self.processed = 0
        self.batches = 0
        #: set when the inference thread died of an unexpected error (the watchdog stops then)
        self.failed: BaseException | None = None

    # ------------------------------------------------------------ inputs --

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def depth(self) -> int:
        return len(self.queue)

    def submit(
        self,
        record: Any,
        source: str,
        *,
        reply: Reply | None = None,
        to_sinks: bool = True,
        block: bool = False,
        timeout: float | None = None,
    ) -> bool:
        """Queue one record; False when the queue is full: a counted drop, unless ``block`` (the caller
        waited up to ``timeout`` and may try again)."""
        ok = self.queue.put(Request(record, source, reply, to_sinks), block=block, timeout=timeout)
        if not ok and not block:
            self.counters.record_drop()
        return ok

    def submit_many(self, records: Sequence[Any], source: str, replies: Sequence[Reply]) -> bool:
        """Queue several records as one unit (they can share a batch); False and counted drops when full."""
        items = [Request(r, source, reply, to_sinks=False) for r, reply in zip(records, replies, strict=True)]
        ok = self.queue.put_many(items)
        if not ok:
            self.counters.record_drop(len(items))
        return ok

    def submit_stream(self, record: dict[str, Any], source: str, on_event: StreamEvent) -> StreamRequest | None:
        """Queue a streamed generation; None (a counted drop) when the queue is full."""
        request = StreamRequest(record, source, on_event)
        if not self.queue.put(request):
            self.counters.record_drop()
            return None
        return request

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued record was processed (finite inputs, tests, benchmarks)."""
        return self.queue.wait_idle(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued (within ``timeout``), then stop the thread and close the sinks."""
        self.queue.close()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                log.exception("closing a result sink failed")

    # ---------------------------------------------------------- the thread --

    def _batch_wait(self) -> float:
        """How long a batch may wait to fill: only where the pipeline runs rows together."""
        loaded = self.host.current()
        if loaded is None or self.max_batch == 1:
            return 0.0
        if loaded.spec.task not in _BATCHING_TASKS:
            return 0.0
        if getattr(loaded.pipeline, "max_batch", 2) == 1:
            return 0.0
        return self.max_wait_s

    def _run(self) -> None:
        try:
            while True:
                batch = self.queue.take_batch(self.max_batch, self._batch_wait)
                if batch is None:
                    return
                try:
                    first = batch[0]
                    if isinstance(first, StreamRequest):
                        self._stream(first)
                    else:
                        self._batch([item for item in batch if isinstance(item, Request)])
                finally:
                    self.counters.queue_depth = len(self.queue)
                    self.queue.done(len(batch))
        except BaseException as exc:  # the watchdog must see a dead inference thread
            self.failed = exc
            log.critical("the inference thread failed: %s", exc, exc_info=True)
            raise

    def _batch(self, batch: list[Request]) -> None:
        records = [r.record for r in batch]
        loaded = self.host.acquire()
        ref: ModelRef | None = None
        task: Any = None
        compute_s = 0.0
        if loaded is None:
            # not served, which is not the model's error: counted as drops, so a device that boots (or switches)
            # while inputs arrive does not charge its model's error rate with them
            results: list[dict[str, Any]] = [{"error": NO_MODEL} for _ in batch]
            self.counters.record_drop(len(batch))
        else:
            ref, task = loaded.ref, loaded.spec.task
            started = time.perf_counter()
            try:
                results = loaded.pipeline.run(records)
                if len(results) != len(records):
                    raise RuntimeError(f"the pipeline returned {len(results)} results for {len(records)} records")
            except InputError as exc:  # a single bad record (pipelines raise it only for a batch of one)
                results = [{"error": str(exc)} for _ in records]
            except Exception as exc:
                log.warning("inference failed for a batch of %d: %s", len(records), exc)
                results = [{"error": f"inference failed: {exc}"} for _ in records]
            finally:
                compute_s = time.perf_counter() - started
                self.host.release(loaded)
        done = time.perf_counter()
        now = time.time()
        latencies = [(done - r.enqueued) * 1000.0 for r in batch]
        ok_latencies = [lat for lat, res in zip(latencies, results, strict=True) if "error" not in res]
        errors = len(results) - len(ok_latencies) if loaded is not None else 0
        self.counters.record_many(ok_latencies)
        if errors:
            self.counters.record_error(errors)
        self._observe(task, results, compute_s)
        self.processed += len(batch)
        self.batches += 1
        out: list[InferenceResult] = []
        for request, result, latency in zip(batch, results, latencies, strict=True):
            if request.reply is not None:
                try:
                    request.reply(result, ref)
                except Exception:
                    log.exception("a reply callback failed")
            if request.to_sinks and self.sinks:
                out.append(self._result(request, result, ref, latency, now))
            for tap in self.taps:
                try:
                    tap(request.record, result, latency)
                except Exception:
                    log.exception("an inference tap failed")
        if out:
            for sink in self.sinks:
                try:
                    sink.write(out)
                except Exception as exc:
                    log.warning("result sink %s failed: %s", type(sink).__name__, exc)

    def _result(
        self, request: Request, result: dict[str, Any], ref: ModelRef | None, latency_ms: float, now: float
    ) -> InferenceResult:
        self._seq += 1
        return InferenceResult(
            ts=now,
            seq=self._seq,
            source=request.source,
            id=record_id(request.record),
            model=ref,
            latency_ms=latency_ms,
            result=result,
            input=request.record if self.include_input else None,
        )

    def _observe(self, task: Any, results: list[dict[str, Any]], compute_s: float) -> None:
        """Drift signals and token counts from the results (never the inputs)."""
        counters = self.counters
        if task in _GENERATION_TASKS:
            tokens = sum(int(r.get("tokens", 0)) for r in results if "error" not in r)
            if tokens:
                counters.record_tokens(tokens, compute_s)
            return
        for result in results:
            if "error" in result:
                continue
            if task == Task.ANOMALY:
                counters.record_label("anomaly" if result.get("anomaly") else "normal")
                continue
            label = result.get("label")
            if isinstance(label, str):
                counters.record_label(label)
            score = result.get("score")
            if isinstance(score, float | int) and not isinstance(score, bool):
                counters.record_score(float(score))

    def _stream(self, request: StreamRequest) -> None:
        loaded = self.host.acquire()
        if loaded is None:
            self.counters.record_drop()
            self._emit(request, "error", {"error": NO_MODEL})
            return
        started = time.perf_counter()
        pieces: list[str] = []
        try:
            iterator, generated = counted_stream(loaded.pipeline, request.record)
            try:
                for piece in iterator:
                    pieces.append(piece)
                    self._emit(request, "piece", {"text": piece})
                    if request.cancelled.is_set():
                        break
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
            text = "".join(pieces)
            counted = generated()
            tokens = counted if counted is not None else len(pieces)
            seconds = time.perf_counter() - started
            self.counters.record_tokens(tokens, seconds)
            self.counters.record_many([(time.perf_counter() - request.enqueued) * 1000.0])
            self._emit(request, "done", {"text": text, "tokens": tokens, "cancelled": request.cancelled.is_set()})
        except InputError as exc:
            self.counters.record_error()
            self._emit(request, "error", {"error": str(exc)})
        except Exception as exc:
            log.warning("streamed generation failed: %s", exc)
            self.counters.record_error()
            self._emit(request, "error", {"error": f"inference failed: {exc}"})
        finally:
            self.host.release(loaded)
            self.processed += 1

    @staticmethod
    def _emit(request: StreamRequest, kind: str, data: dict[str, Any]) -> None:
        try:
            request.on_event(kind, data)
        except Exception:
            log.exception("a stream consumer failed")
            request.cancelled.set()


class _CountingTokens:
    """A stand-in for a token-stream pipeline that counts the ids its ``token_ids`` yields.

    ``stream`` yields text pieces, not ids (a piece may hold several tokens, or wait for the next one to
    finish a character). Running the pipeline class's own ``stream`` with this stand-in as ``self``
    keeps its exact decoding and counts every generated id (end-of-sequence included, as ``run``'s
    ``tokens`` does). Everything else is the pipeline's.
    """

    def __init__(self, pipeline: Any) -> None:
        self._pipeline = pipeline
        self.count = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)

    def token_ids(self, prompt_ids: list[int], max_new_tokens: int) -> Iterator[int]:
        for token in self._pipeline.token_ids(prompt_ids, max_new_tokens):
            self.count += 1
            yield token


def counted_stream(pipeline: Any, record: dict[str, Any]) -> tuple[Iterator[str], Callable[[], int | None]]:
    """``pipeline.stream(record)`` and a function giving the number of generated tokens once it ended
    (None where the pipeline does not expose its token loop)."""
    if callable(getattr(pipeline, "token_ids", None)):
        counter = _CountingTokens(pipeline)
        return type(pipeline).stream(counter, record), lambda: counter.count
    return pipeline.stream(record), lambda: None
