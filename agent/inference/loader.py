"""Loading a model under the device's memory ceiling, into a ``Loaded`` the ModelHost can serve.

The ceiling (``model_max_rss_mib``) is checked twice: before loading, against an estimate (the size of
the ONNX graphs and their external data: the weights must be resident, so this is a lower bound and a
refusal on it is certain), and after loading and one warm-up inference, against what the load measurably
took: the larger of this process's RSS growth and its heap growth (glibc's ``mallinfo2``; RSS alone
misses a model that reuses memory a previous model freed). A model over the ceiling is closed again and
refused with ``ModelTooLarge``; the model already serving (if any) is untouched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from agent.inference.bundle import ModelSource
from agent.inference.host import Loaded, ModelHost
from agent.inference.session import ModelLoadError
from agent.telemetry.system import heap_in_use_bytes, release_file_pages, rss_bytes, trim_heap

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: Back-to-back loads give library pages back at most this often (``release_file_pages``).
RELEASE_INTERVAL_S = 1.0


class ModelTooLarge(ModelLoadError):
    """A model would need more memory than the device allows it; the message says how much and what to do."""

    def __init__(self, message: str, needed_bytes: int, limit_bytes: int) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.limit_bytes = limit_bytes


@dataclass(frozen=True)
class LoadReport:
    """What loading one model cost."""

    estimated_bytes: int
    measured_bytes: int
    seconds: float


def _preload_runtime() -> None:
    """Import the inference libraries first so their own memory is not charged to the model."""
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401
    import tokenizers  # noqa: F401


class ModelLoader:
    """Builds pipelines for ``ModelSource``s, enforcing ``max_rss_bytes`` (0: no ceiling)."""

    def __init__(self, host: ModelHost, max_rss_bytes: int = 0) -> None:
        self.host = host
        self.max_rss_bytes = max_rss_bytes
        self.last_report: LoadReport | None = None
        self._released_at = -RELEASE_INTERVAL_S

    def estimate_bytes(self, source: ModelSource) -> int:
        """A lower bound of the memory ``source`` needs: the bytes of its graphs and external weights."""
        return sum(p.stat().st_size for p in source.graph_files() if p.is_file())

    def load(self, source: ModelSource, *, warmup: bool = True) -> Loaded:
        """Load and warm up ``source`` without serving it; raises ModelLoadError or ModelTooLarge."""
        limit = self.max_rss_bytes
        estimate = self.estimate_bytes(source)
        if limit and estimate > limit:
            raise ModelTooLarge(
                f"model {source.describe()} needs at least {estimate / MIB:.0f} MiB (its weights) but the "
                f"memory ceiling for a model is {limit / MIB:.0f} MiB: deploy a smaller variant (int8, int4) "
                "or raise model_max_rss_mib",
                estimate,
                limit,
            )
        _preload_runtime()
        started = time.perf_counter()
        trim_heap()
        # measured from what the process runs, not what it once mapped (skipped right after a previous load)
        release_file_pages(min_interval_s=RELEASE_INTERVAL_S)
        before, heap_before = rss_bytes(), heap_in_use_bytes()
        loaded = self._build(source)
        try:
            if warmup:
                loaded.pipeline.warmup()
        except Exception as exc:
            self.host.discard(loaded)
            raise ModelLoadError(f"model {source.describe()} failed its warm-up inference: {exc}") from exc
        trim_heap()  # what loading parsed and freed goes back to the system before measuring
        if time.monotonic() - self._released_at >= RELEASE_INTERVAL_S:
            # library code loading mapped and will not run again (see its doc); at most once a second when
            # models load back to back, as each call reads /proc/self/smaps
            release_file_pages()
            self._released_at = time.monotonic()
        measured = max(0, rss_bytes() - before)
        heap_after = heap_in_use_bytes()
        if heap_before is not None and heap_after is not None:
            measured = max(measured, heap_after - heap_before)
        if limit and measured > limit:
            self.host.discard(loaded)
            raise ModelTooLarge(
                f"model {source.describe()} took {measured / MIB:.0f} MiB once loaded, over the memory ceiling "
                f"of {limit / MIB:.0f} MiB for a model: deploy a smaller variant or raise model_max_rss_mib",
                measured,
                limit,
            )
        self.last_report = LoadReport(estimate, measured, time.perf_counter() - started)
        loaded.rss_bytes = measured
        log.info(
            "loaded %s: %.0f MiB resident (weights %.0f MiB) in %.2f s",
            source.describe(),
            measured / MIB,
            estimate / MIB,
            self.last_report.seconds,
        )
        return loaded

    def _build(self, source: ModelSource) -> Loaded:
        if source.spec is None:
            from agent.inference.tensor import TensorPipeline

            pipeline = TensorPipeline(source.path, threads=self.host.threads)
            return Loaded(pipeline, source.ref, source.artifact_id, source.bundle_dir, pipeline.spec)
        return self.host.load(source.spec, source.bundle_dir, source.ref, source.artifact_id)
