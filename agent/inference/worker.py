"""A bounded input queue and the thread that runs the model over it."""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from agent.inference.session import InputError, TensorModel
from agent.telemetry.stats import InferenceCounters

log = logging.getLogger(__name__)

_STOP = object()


class InferenceWorker:
    """Runs ``model`` over records put on a bounded queue; full queue means a counted drop."""

    def __init__(
        self,
        model: TensorModel,
        counters: InferenceCounters,
        *,
        queue_size: int = 256,
        results: IO[str] | None = None,
    ) -> None:
        self.model = model
        self.counters = counters
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._results = results
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self.processed = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, record: Any) -> bool:
        """Queue a record; False (and a counted drop) when the queue is full."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.counters.record_drop()
            return False
        self.counters.queue_depth = self._queue.qsize()
        return True

    def stop(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)

    def join_idle(self, timeout: float) -> bool:
        """Wait until every queued record was processed (for tests and finite inputs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            try:
                if record is _STOP:
                    return
                self._infer(record)
            finally:
                self.counters.queue_depth = self._queue.qsize()
                self._queue.task_done()

    def _infer(self, record: Any) -> None:
        try:
            feeds = self.model.feeds(record)
        except InputError as exc:
            self.counters.record_error()
            log.debug("bad input record: %s", exc)
            return
        start = time.perf_counter()
        try:
            outputs = self.model.run(feeds)
        except Exception as exc:
            self.counters.record_error()
            log.warning("inference failed: %s", exc)
            return
        self.counters.record((time.perf_counter() - start) * 1000.0)
        self.processed += 1
        if self._results is not None:
            line = {name: out.tolist() for name, out in zip(self.model.outputs, outputs, strict=False)}
            self._results.write(json.dumps(line) + "\n")
            self._results.flush()


def read_json_lines(stream: IO[str], sink: Callable[[Any], bool], on_error: Callable[[], None]) -> int:
    """Feed each JSON line of ``stream`` to ``sink``; returns the number of lines read."""
    n = 0
    for line in stream:
        line = line.strip()
        if not line:
            continue
        n += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            on_error()
            continue
        sink(record)
    return n
