"""The model host: which pipeline serves right now, and the atomic switch to another.

Inference workers take ``host.current()`` once per batch and run the whole
batch on it, so a switch never splits or drops a request: batches already
running finish on the old pipeline, the next batch runs on the new one. The
old pipeline is closed only after the last batch that uses it has finished.

The deployment side loads a candidate with ``load()`` (self-tests run on it
while the active model keeps serving), then calls ``switch()``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.inference.pipelines import Pipeline, load_pipeline
from wire.manifest import RunSpec
from wire.messages import ModelRef

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A pipeline ready to serve, with what it is."""

    pipeline: Pipeline
    ref: ModelRef | None
    artifact_id: str
    bundle_dir: Path
    spec: RunSpec
    loaded_at: float = field(default_factory=time.time)
    #: what loading it cost in memory (RSS after minus before, measured by the loader; 0: not measured)
    rss_bytes: int = 0
    #: when it began to serve (``switch``), None while it does not
    serving_since: float | None = None
    _users: int = 0
    _retired: bool = False


class ModelHost:
    """Thread-safe holder of the active ``Loaded`` pipeline."""

    def __init__(self, threads: int = 0) -> None:
        self.threads = threads
        self._active: Loaded | None = None
        self._lock = threading.Condition()

    def load(self, spec: RunSpec, bundle_dir: Path, ref: ModelRef | None, artifact_id: str = "") -> Loaded:
        """Build a pipeline (does not serve yet). Raises ModelLoadError/PipelineError when it cannot load."""
        pipeline = load_pipeline(spec, bundle_dir, threads=self.threads)
        return Loaded(pipeline, ref, artifact_id, bundle_dir, spec)

    def current(self) -> Loaded | None:
        return self._active

    def acquire(self) -> Loaded | None:
        """The active pipeline, pinned until ``release``: a switch will not close it under a running batch."""
        with self._lock:
            loaded = self._active
            if loaded is not None:
                loaded._users += 1
            return loaded

    def release(self, loaded: Loaded) -> None:
        with self._lock:
            loaded._users -= 1
            if loaded._retired and loaded._users == 0:
                self._close(loaded)
            self._lock.notify_all()

    def switch(self, new: Loaded | None) -> Loaded | None:
        """Make ``new`` the active pipeline; returns the previous one (closed once idle)."""
        if new is not None:
            new.serving_since = time.time()
        with self._lock:
            old, self._active = self._active, new
            if old is not None:
                old._retired = True
                if old._users == 0:
                    self._close(old)
        log.info("serving %s", new.ref if new is not None and new.ref else (new.bundle_dir if new else "nothing"))
        return old

    def discard(self, loaded: Loaded) -> None:
        """Close a candidate that never became active."""
        if loaded is not self._active:
            self._close(loaded)

    @staticmethod
    def _close(loaded: Loaded) -> None:
        try:
            loaded.pipeline.close()
        except Exception:  # closing must never take the agent down
            log.exception("closing a pipeline failed")
