"""Task pipelines: text in, results out, built from a manifest's RunSpec (no code per model).

``load_pipeline(spec, bundle_dir)`` picks the pipeline for ``spec.task`` (and
``spec.runtime``). Every pipeline takes a batch of JSON-like records and
returns one result dict per record, in order:

================== ================================== ==============================================
task               record                             result
================== ================================== ==============================================
text-classification {"text": str}                      {"label": str, "score": float, "scores": {label: p}}
embeddings         {"text": str}                      {"embedding": [float]} (+ "label", "score" with zero-shot labels)
text-generation    {"prompt": str, "max_new_tokens"?}  {"text": str, "tokens": int}
text2text          {"text": str, "max_new_tokens"?}    {"text": str, "tokens": int}
anomaly            {"values": [float]}                {"score": float, "anomaly": bool}
================== ================================== ==============================================

A record that does not fit raises ``InputError`` for that record only when
run singly; in a batch, ``run`` returns ``{"error": "..."}`` in its place.
"""

from __future__ import annotations

from pathlib import Path

from agent.inference.pipelines.base import Pipeline, PipelineError
from wire.manifest import RunSpec, Runtime, Task


def load_pipeline(spec: RunSpec, bundle_dir: str | Path, *, threads: int = 0) -> Pipeline:
    """Build the pipeline for ``spec`` over the files in ``bundle_dir``."""
    root = Path(bundle_dir)
    if spec.task == Task.TEXT_CLASSIFICATION:
        from agent.inference.pipelines.classification import ClassificationPipeline

        return ClassificationPipeline(spec, root, threads=threads)
    if spec.task == Task.EMBEDDINGS:
        from agent.inference.pipelines.embeddings import EmbeddingPipeline

        return EmbeddingPipeline(spec, root, threads=threads)
    if spec.task == Task.ANOMALY:
        from agent.inference.pipelines.anomaly import AnomalyPipeline

        return AnomalyPipeline(spec, root, threads=threads)
    if spec.task == Task.TEXT_GENERATION:
        if spec.runtime == Runtime.ONNXRUNTIME_GENAI:
            from agent.inference.pipelines.genai import GenaiGenerationPipeline

            return GenaiGenerationPipeline(spec, root, threads=threads)
        from agent.inference.pipelines.generation import DecoderGenerationPipeline

        return DecoderGenerationPipeline(spec, root, threads=threads)
    if spec.task == Task.TEXT2TEXT:
        from agent.inference.pipelines.text2text import Text2TextPipeline

        return Text2TextPipeline(spec, root, threads=threads)
    raise PipelineError(f"no pipeline for task {spec.task!r}")


__all__ = ["Pipeline", "PipelineError", "load_pipeline"]
