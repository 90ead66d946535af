"""Raw-tensor serving: a bare ``.onnx`` given with ``--model``, fed records that map input names to arrays.

This is the skeleton's mode, kept for graphs that come without a bundle (no tokenizer, no manifest):
``{"x": [[1, 2, 3, 4]]}`` (or ``{"inputs": {"x": ...}}``) -> ``{"y": [[...]]}``, one onnxruntime call per
record since records may carry batches of their own shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.inference.session import InputError, TensorModel
from wire.manifest import IO, RunSpec, TensorInfo

log = logging.getLogger(__name__)


def raw_spec(model: TensorModel) -> RunSpec:
    """A RunSpec describing a bare graph's inputs and outputs.

    There is no task for raw tensors, so ``task`` is None: the spec is built without validation
    (``model_construct``); code that branches on the task checks ``is_raw(spec)`` first.
    """
    io = IO(
        inputs=[TensorInfo(name=s.name, dtype=str(s.dtype), shape=list(s.shape)) for s in model.inputs],
        outputs=[TensorInfo(name=name, dtype="", shape=[]) for name in model.outputs],
    )
    return RunSpec.model_construct(task=None, io=io, entrypoint=Path(model.path).name)  # type: ignore[arg-type]


def is_raw(spec: RunSpec) -> bool:
    """True for the spec of a bare graph served in raw-tensor mode."""
    return spec.task is None


class TensorPipeline:
    """The ``Pipeline`` interface over a bare graph: one result ``{output name: nested list}`` per record."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        self.model = TensorModel(path, threads=threads)
        self.spec = raw_spec(self.model)
        self.max_batch = 1

    def _one(self, record: Any) -> dict[str, Any]:
        feeds = self.model.feeds(record)
        outputs = self.model.run(feeds)
        return {name: out.tolist() for name, out in zip(self.model.outputs, outputs, strict=False)}

    def run(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One result per record, in order; a bad record alone raises InputError, in a batch it becomes
        ``{"error": ...}`` (the contract of every pipeline)."""
        if len(records) == 1:
            return [self._one(records[0])]
        results: list[dict[str, Any]] = []
        for record in records:
            try:
                results.append(self._one(record))
            except InputError as exc:
                results.append({"error": str(exc)})
        return results

    def stream(self, record: dict[str, Any]) -> Iterator[str]:
        raise InputError("streaming is for text generation; a raw ONNX graph answers with run()")

    def warmup(self) -> None:
        """Nothing to warm up with: the graph's input shapes are the caller's."""

    def close(self) -> None:
        self.model.session = None
