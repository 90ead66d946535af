"""The self-test of a candidate in the inactive slot: warm-up inference, output sanity, latency budget.

The sample input comes from the RunSpec alone (a short text, or a zero window for anomaly models), so
any bundle the registry accepts can be tested on the device without test data shipped with it.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

from agent.deploy.errors import SelfTestError
from agent.inference.pipelines.base import Pipeline
from wire.manifest import Budget, RunSpec, Task

SAMPLE_TEXT = "the pump on the north line is running fine this morning"


def sample_record(spec: RunSpec) -> dict[str, Any]:
    """One input record the pipeline for ``spec`` must accept."""
    if spec.task == Task.ANOMALY:
        assert spec.anomaly is not None  # the manifest validator guarantees it
        return {"values": [0.0] * spec.anomaly.n_features}
    if spec.task == Task.TEXT_GENERATION:
        return {"prompt": SAMPLE_TEXT, "max_new_tokens": 4}
    if spec.task == Task.TEXT2TEXT:
        return {"text": SAMPLE_TEXT, "max_new_tokens": 4}
    return {"text": SAMPLE_TEXT}


def _finite(value: Any) -> bool:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    if isinstance(value, int | float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return True


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_result(spec: RunSpec, result: Any) -> str | None:
    """What is wrong with one result of the pipeline for ``spec`` (None: nothing)."""
    if not isinstance(result, dict):
        return f"the output is a {type(result).__name__}, not a result object"
    if "error" in result:
        return f"the model answered the sample input with an error: {result['error']}"
    if not _finite(result):
        return "the output holds NaN or infinite numbers"
    task = spec.task
    if task == Task.TEXT_CLASSIFICATION:
        if not isinstance(result.get("label"), str) or not _number(result.get("score")):
            return "a classification result needs a label and a score"
        if spec.postprocess.softmax and not 0.0 <= result["score"] <= 1.0 + 1e-6:
            return f"the softmax score {result['score']} is not a probability"
    elif task == Task.EMBEDDINGS:
        embedding = result.get("embedding")
        if not isinstance(embedding, list) or not embedding or not all(_number(v) for v in embedding):
            return "an embeddings result needs a non-empty list of numbers"
        if not any(v != 0 for v in embedding):
            return "the embedding is all zeros"
    elif task in (Task.TEXT_GENERATION, Task.TEXT2TEXT):
        if not isinstance(result.get("text"), str):
            return "a generation result needs a text"
    elif task == Task.ANOMALY and (not _number(result.get("score")) or not isinstance(result.get("anomaly"), bool)):
        return "an anomaly result needs a score and an anomaly decision"
    return None


def run_self_test(pipeline: Pipeline, spec: RunSpec, budget: Budget, runs: int = 3) -> dict[str, float]:
    """Warm up, run the sample ``runs`` times, check every output and the latency budget.

    Returns metrics; raises SelfTestError. The latency is the median of the runs so that one
    scheduling hiccup on a busy device does not fail a good model.
    """
    try:
        pipeline.warmup()
    except Exception as exc:
        raise SelfTestError("warmup", f"the warm-up inference failed: {exc}") from exc
    sample = sample_record(spec)
    latencies: list[float] = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        try:
            results = pipeline.run([sample])
        except Exception as exc:
            raise SelfTestError("inference", f"inference on the sample input failed: {exc}") from exc
        latencies.append((time.perf_counter() - start) * 1000.0)
        if len(results) != 1:
            raise SelfTestError("output", f"one input gave {len(results)} results")
        problem = check_result(spec, results[0])
        if problem is not None:
            raise SelfTestError("output", problem)
    latency = statistics.median(latencies)
    if budget.max_latency_ms and latency > budget.max_latency_ms:
        raise SelfTestError(
            "latency", f"median latency {latency:.1f} ms exceeds the budget of {budget.max_latency_ms:.1f} ms"
        )
    return {"selftest_latency_ms": round(latency, 3)}
