"""Measure a bundle with the device's own pipeline, in a process of its own: ``python -m agent.inference.probe``.

The controller's importer (``controller.registry.convert.evaluate_encoders`` and ``evaluate_generation``)
runs this module in a fresh interpreter so the latency, tokens/s and peak memory it reports are the
model's and the device code's only (no torch, no controller, no other model in the process)::

    python -m agent.inference.probe KIND JOB.json

``KIND`` is ``latency`` (one timed call per sample of an encoder or anomaly bundle), ``generation``
(generate for every record, then teacher-forced choices) or ``ratio`` (the agent's loop or
onnxruntime-genai's on the same prompts). ``JOB.json`` holds the bundle's ``spec`` and ``root`` and what
the kind needs; the last line printed is the JSON report. Imports only ``agent.inference`` and ``wire``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.inference.pipelines import load_pipeline
from agent.inference.pipelines.generation import TokenStreamPipeline
from agent.inference.session import InputError
from wire.manifest import RunSpec

__all__ = ["main", "measure_generation", "measure_latency", "measure_ratio", "peak_rss_bytes"]


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM on Linux, else getrusage's maximum)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_latency(job: dict[str, Any]) -> dict[str, Any]:
    """One timed call per sample after a warm-up; samples the pipeline refuses are skipped."""
    pipe = load_pipeline(RunSpec.model_validate(job["spec"]), job["root"], threads=job["threads"])
    pipe.warmup()
    times = []
    for record in job["samples"]:
        start = time.perf_counter()
        try:
            pipe.run([record])
        except ValueError:
            continue
        times.append((time.perf_counter() - start) * 1000.0)
    return {"times_ms": times, "peak_rss_bytes": peak_rss_bytes()}


def measure_generation(job: dict[str, Any]) -> dict[str, Any]:
    """Generated ids and seconds per record, peak memory, then (with ``targets``) teacher-forced choices."""
    pipe = load_pipeline(RunSpec.model_validate(job["spec"]), job["root"], threads=job["threads"])
    if not isinstance(pipe, TokenStreamPipeline):
        return {"error": f"{job['root']} is not a generation bundle"}
    pipe.warmup()
    ids: list[list[int]] = []
    seconds: list[float] = []
    errors: list[str | None] = []
    for record in job["records"]:
        try:
            out = pipe.generate(record)
        except InputError as exc:
            ids.append([])
            seconds.append(0.0)
            errors.append(str(exc))
            continue
        ids.append(out.token_ids)
        seconds.append(out.seconds)
        errors.append(None)
    peak = peak_rss_bytes()
    # teacher forcing after the timed runs and the memory reading: it loads another loop for genai bundles
    forced = [
        [] if error else pipe.forced(record, target)
        for record, target, error in zip(job["records"], job.get("targets") or [], errors)  # noqa: B905
    ]
    return {"ids": ids, "seconds": seconds, "errors": errors, "peak_rss_bytes": peak, "forced": forced}


def measure_ratio(job: dict[str, Any]) -> dict[str, Any]:
    """Tokens and seconds of one side (``agent``: the plain loop; ``genai``: onnxruntime-genai's) on ``prompts``."""
    from agent.inference.pipelines.genai import GenaiGenerationPipeline
    from agent.inference.pipelines.generation import DecoderGenerationPipeline, encode_prompt, load_tokenizer

    spec = RunSpec.model_validate(job["spec"])
    pipe: GenaiGenerationPipeline | DecoderGenerationPipeline
    if job["side"] == "genai":
        pipe = GenaiGenerationPipeline(spec, job["root"], threads=job["threads"])
        if pipe.fallback is not None:
            return {"error": "onnxruntime-genai is not installed: there is no genai loop to compare with"}
    else:
        pipe = DecoderGenerationPipeline(spec, job["root"], threads=job["threads"])
    # Both sides start from the genai bundle's tokenizer: the same ids, whatever graph runs them.
    tok_spec = RunSpec.model_validate(job["tokenizer_spec"])
    assert tok_spec.generation is not None, "the tokenizer's spec is a generation spec"
    tokenizer = load_tokenizer(tok_spec, Path(job["tokenizer_root"]))
    encoded = [encode_prompt(tokenizer, t, tok_spec.generation.bos_token_id) for t in job["prompts"]]
    list(pipe.token_ids(encoded[0], 4))  # first-run allocations are not the loop's cost
    ids, seconds = [], 0.0
    for prompt in encoded:
        started = time.perf_counter()
        ids.append(list(pipe.token_ids(prompt, job["max_new_tokens"])))
        seconds += time.perf_counter() - started
    shared = isinstance(pipe, DecoderGenerationPipeline) and job["side"] == "agent" and pipe.decoder.share_buffer
    return {"ids": ids, "tokens": sum(map(len, ids)), "seconds": seconds, "shared_cache_buffer": shared}


KINDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "latency": measure_latency,
    "generation": measure_generation,
    "ratio": measure_ratio,
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in KINDS:
        print(f"usage: python -m agent.inference.probe {{{','.join(KINDS)}}} JOB.json", file=sys.stderr)  # noqa: T201
        return 2
    with open(args[1]) as f:
        job = json.load(f)
    print(json.dumps(KINDS[args[0]](job)))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
