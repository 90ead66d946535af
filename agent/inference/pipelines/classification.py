"""Text classification on the device: tokenize, run the graph, softmax, name the labels."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from agent.inference.pipelines.base import PipelineError
from agent.inference.pipelines.tokenize import (
    TextRecord,
    length_batches,
    rows_interact,
    run_batched,
    text_encoder,
    text_record,
)
from agent.inference.session import InputError, load_session
from wire.manifest import RunSpec

log = logging.getLogger(__name__)

#: Texts per onnxruntime call; larger batches gain little on small CPUs and cost memory.
MAX_BATCH = 32


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class ClassificationPipeline:
    """``{"text": str}`` -> ``{"label", "score", "scores"}`` over a ``logits [batch, n_labels]`` graph."""

    def __init__(self, spec: RunSpec, root: Path, threads: int = 0) -> None:
        self.spec = spec
        self.root = Path(root)
        self.session = load_session(self.root / spec.entrypoint, threads)
        self.max_batch = 1 if rows_interact(self.root / spec.entrypoint) else MAX_BATCH
        inputs = [i.name for i in self.session.get_inputs()]
        self.encoder = text_encoder(spec, self.root, inputs)
        outputs = {o.name: o for o in self.session.get_outputs()}
        # The layout says "logits"; a graph with another single output name is still usable.
        self.output = "logits" if "logits" in outputs else next(iter(outputs))
        width = outputs[self.output].shape[-1] if outputs[self.output].shape else None
        labels = list(spec.postprocess.labels)
        if isinstance(width, int):
            if labels and len(labels) != width:
                raise PipelineError(f"the manifest names {len(labels)} labels but the graph scores {width} classes")
            labels = labels or [f"LABEL_{i}" for i in range(width)]
        self.labels = labels

    def _label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else f"LABEL_{index}"

    def _infer(self, records: list[TextRecord]) -> list[dict[str, Any]]:
        feeds, errors = self.encoder.encode_checked(records)
        results: list[dict[str, Any]] = [{} for _ in records]
        for rows, batch in length_batches(feeds, self.max_batch):
            logits = np.asarray(self.session.run([self.output], batch)[0], dtype=np.float32)
            scores = softmax(logits) if self.spec.postprocess.softmax else logits
            for row, row_logits, row_scores in zip(rows, logits, scores, strict=True):
                best = int(np.argmax(row_scores))
                results[int(row)] = {
                    "label": self._label(best),
                    "score": float(row_scores[best]),
                    "scores": {self._label(i): float(p) for i, p in enumerate(row_scores)},
                    # the graph's own output, to compare with the framework the model came from
                    "logits": [float(x) for x in row_logits],
                }
                if records[int(row)].truncated:
                    results[int(row)]["truncated"] = True
        for row, error in errors.items():
            results[row] = {"error": error}
        return results

    def run(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One result per record, in order; see ``agent.inference.pipelines`` for the formats."""
        return run_batched(records, text_record, self._infer)

    def stream(self, record: dict[str, Any]) -> Iterator[str]:
        raise InputError("streaming is for text generation; a classification model answers with run()")

    def warmup(self) -> None:
        self.run([{"text": "warm up"}])

    def close(self) -> None:
        self.session = None
