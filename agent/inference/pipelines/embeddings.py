"""Sentence embeddings on the device, and zero-shot labels by cosine to embedded label descriptions."""

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

#: Texts per onnxruntime call.
MAX_BATCH = 32


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class EmbeddingPipeline:
    """``{"text": str}`` -> ``{"embedding": [float]}`` (+ ``label``/``score`` with zero-shot labels).

    With ``preprocess.pooling == "none"`` the graph's output is already one vector per text; ``mean`` and
    ``cls`` pool a ``[batch, seq, hidden]`` output here. ``postprocess.normalize`` L2-normalises (a no-op up
    to rounding when the graph already did).
    """

    def __init__(self, spec: RunSpec, root: Path, threads: int = 0) -> None:
        self.spec = spec
        self.root = Path(root)
        self.session = load_session(self.root / spec.entrypoint, threads)
        self.max_batch = 1 if rows_interact(self.root / spec.entrypoint) else MAX_BATCH
        inputs = [i.name for i in self.session.get_inputs()]
        self.encoder = text_encoder(spec, self.root, inputs)
        outputs = {o.name: o for o in self.session.get_outputs()}
        wanted = spec.io.outputs[0].name if spec.io.outputs else None
        if wanted is not None and wanted not in outputs:
            raise PipelineError(f"the manifest names output {wanted!r}, the graph has {sorted(outputs)}")
        self.output = wanted or next(iter(outputs))
        rank = len(outputs[self.output].shape or [])
        pooling = spec.preprocess.pooling
        if (pooling == "none" and rank not in (0, 2)) or (pooling != "none" and rank not in (0, 3)):
            raise PipelineError(f"output {self.output!r} has rank {rank}, which does not fit pooling {pooling!r}")
        self.zero_shot_labels = list(spec.postprocess.zero_shot_labels)
        self.label_vectors: np.ndarray | None = None
        if self.zero_shot_labels:
            # Embed the descriptions once: each request then costs one dot product per label.
            descriptions = [spec.postprocess.zero_shot_labels[k] for k in self.zero_shot_labels]
            self.label_vectors = l2_normalize(self._embed(descriptions))

    def _pool(self, output: np.ndarray, mask: np.ndarray) -> np.ndarray:
        pooling = self.spec.preprocess.pooling
        if pooling == "none":
            return output
        if pooling == "cls":
            return output[:, 0]
        if pooling == "max":
            # sentence-transformers' max pooling: padding positions never win
            masked = np.where(mask[..., None] > 0, output, np.finfo(output.dtype).min)
            return masked.max(axis=1)
        if pooling == "lasttoken":
            last = np.maximum(mask.sum(axis=1) - 1, 0)
            return output[np.arange(output.shape[0]), last]
        weights = mask[..., None].astype(output.dtype)
        return (output * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)

    def _embed(self, texts: list[str]) -> np.ndarray:
        return self._embed_checked([TextRecord(t, True) for t in texts])[0]

    def _embed_checked(self, records: list[TextRecord]) -> tuple[np.ndarray, dict[int, str]]:
        feeds, errors = self.encoder.encode_checked(records)
        vectors: np.ndarray | None = None
        for rows, batch in length_batches(feeds, self.max_batch):
            output = np.asarray(self.session.run([self.output], batch)[0], dtype=np.float32)
            pooled = self._pool(output, batch["attention_mask"])
            if vectors is None:
                vectors = np.empty((len(records), pooled.shape[-1]), dtype=np.float32)
            vectors[rows] = pooled
        assert vectors is not None  # texts is never empty here
        return (l2_normalize(vectors) if self.spec.postprocess.normalize else vectors), errors

    def _infer(self, records: list[TextRecord]) -> list[dict[str, Any]]:
        vectors, errors = self._embed_checked(records)
        results: list[dict[str, Any]] = [{"embedding": v.tolist()} for v in vectors]
        for result, record in zip(results, records, strict=True):
            if record.truncated:
                result["truncated"] = True
        if self.label_vectors is not None:
            cosines = l2_normalize(vectors) @ self.label_vectors.T
            for result, row in zip(results, cosines, strict=True):
                best = int(np.argmax(row))
                result["label"] = self.zero_shot_labels[best]
                result["score"] = float(row[best])
        for row_index, error in errors.items():
            results[row_index] = {"error": error}
        return results

    def run(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One result per record, in order; see ``agent.inference.pipelines`` for the formats."""
        return run_batched(records, text_record, self._infer)

    def stream(self, record: dict[str, Any]) -> Iterator[str]:
        raise InputError("streaming is for text generation; an embedding model answers with run()")

    def warmup(self) -> None:
        self.run([{"text": "warm up"}])

    def close(self) -> None:
        self.session = None
