"""What every pipeline offers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from agent.inference.session import InputError, ModelLoadError
from wire.manifest import RunSpec


class PipelineError(ModelLoadError):
    """A bundle cannot be turned into a pipeline (missing file, graph that does not fit the task)."""


class Pipeline(Protocol):
    spec: RunSpec

    def run(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Results for a batch of records, in order; a bad record yields ``{"error": ...}``."""
        ...

    def stream(self, record: dict[str, Any]) -> Iterator[str]:
        """Generation only: yield text pieces as tokens are produced."""
        ...

    def warmup(self) -> None:
        """One small inference so the first real request does not pay for lazy initialisation."""
        ...

    def close(self) -> None: ...


__all__ = ["InputError", "Pipeline", "PipelineError"]
