"""Result sinks: a local JSON-lines file, and the device's MQTT results topic (sampled, QoS 0).

Results are written as ``wire.results.InferenceResult``. Nothing here is spooled: results
are data for applications on and near the device, not the control plane, and an offline device keeps
serving its local consumers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from wire import topics
from wire.results import InferenceResult

log = logging.getLogger(__name__)


class FileSink:
    """Appends each result as one JSON line to ``path`` (flushed per batch, so readers see whole lines)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self.written = 0

    def write(self, results: Sequence[InferenceResult]) -> None:
        lines = "".join(r.model_dump_json(exclude_none=True) + "\n" for r in results)
        with self._lock:
            if self._file is None:
                return
            self._file.write(lines)
            self._file.flush()
            self.written += len(results)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class Sampler:
    """Keeps an exact fraction ``rate`` of a stream, spread evenly (deterministic, unlike coin flips)."""

    def __init__(self, rate: float) -> None:
        self.rate = min(max(rate, 0.0), 1.0)
        self._credit = 0.0

    def keep(self) -> bool:
        self._credit += self.rate
        if self._credit >= 1.0 - 1e-9:
            self._credit -= 1.0
            return True
        return False


Publish = Callable[[str, bytes, int, bool], int]


class MqttSink:
    """Publishes a sample of results on ``slmfleet/v1/dev/{id}/results`` at QoS 0.

    ``write`` runs in the inference thread; the publishing happens in the event loop's thread, the
    transport's own. While the broker is unreachable the results are counted in ``unsent`` and dropped.
    """

    def __init__(
        self, device_id: str, publish: Publish, loop: asyncio.AbstractEventLoop, sample_rate: float = 1.0
    ) -> None:
        self.topic = topics.results(device_id)
        self._publish = publish
        self._loop = loop
        self._sampler = Sampler(sample_rate)
        self.published = 0
        self.unsent = 0

    def write(self, results: Sequence[InferenceResult]) -> None:
        payloads = [r.model_dump_json(exclude_none=True).encode() for r in results if self._sampler.keep()]
        if payloads:
            try:
                self._loop.call_soon_threadsafe(self._send, payloads)
            except RuntimeError:  # the loop is closing: the agent is stopping
                self.unsent += len(payloads)

    def _send(self, payloads: list[bytes]) -> None:
        for payload in payloads:
            if self._publish(self.topic, payload, 0, False):
                self.published += 1
            else:
                self.unsent += 1
                log.debug("result not published: the broker is not connected")

    def close(self) -> None:
        """Nothing to release: the transport belongs to the agent."""
