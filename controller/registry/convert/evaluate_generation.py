"""Measure a generation variant (int8, int4, another runtime) against its fp32 reference.

Both bundles run through the real device pipelines (``agent.inference.pipelines.load_pipeline``), each in
a fresh interpreter that imports only the device code (``python -m agent.inference.probe``, no torch), so
tokens/s, latency and peak RSS are the model's own and not this process's.

**Token agreement** (``Metrics.agreement``, kind ``token``) is measured under teacher forcing: the
reference decodes greedily from each prompt; the candidate is then fed the reference's tokens, through its
own generation loop, and scored on whether its greedy choice at each position is the reference's token::

    agreement = sum(positions where argmax(candidate | reference's prefix) == reference's token)
                / sum(len(reference's generation))

Each position tests the same context on both sides, so one flipped token does not decide the rest of the
sequence. That matters for telling a working quantization from a broken one: on decoders with small logit
margins (random weights, and any model on text it is unsure about) int4 flips an early token of most
prompts, so free-running agreement gave working int4 variants 0.03 and broken graphs 0.0, which no floor
can tell apart; teacher-forced, the same variants measure 0.6 against 0.0 (``python -m benchmarks floors``).

``Metrics.free_running_agreement`` keeps the other view, the fraction of generated positions produced
before the first divergence when both decode freely::

    free_running_agreement = sum(common_prefix(r, c)) / sum(max(len(r), len(c)))

Identical generations give 1.0 on both; stopping early (an EOS the reference did not produce) counts as a
divergence.

Latency is per generated token (request time / generated tokens, p50 and p95 over requests, prompt
processing included); tokens/s is all generated tokens over all request time. ``tokens_per_second_ratio``
compares the agent's own loop with onnxruntime-genai's on the same graph.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from controller.registry.convert import ConversionError, ExportedBundle
from controller.registry.convert.probe import run_probe
from wire.manifest import Metrics, Runtime, Task

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = 24
DEFAULT_EVAL_NEW_TOKENS = 32


@dataclass
class GenerationRun:
    """What one bundle generated for a list of records, and how fast (measured in its own process)."""

    token_ids: list[list[int]]
    seconds: list[float]
    peak_rss_bytes: int | None = None
    errors: list[str | None] = field(default_factory=list)
    #: its greedy choices when fed the targets it was given (``measure_generation``'s ``targets``)
    forced: list[list[int]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        total = sum(self.seconds)
        return self.tokens / total if total > 0 else 0.0

    def per_token_ms(self) -> list[float]:
        return [1000.0 * s / len(ids) for ids, s in zip(self.token_ids, self.seconds, strict=True) if ids]


def evaluate_generation(
    reference: ExportedBundle,
    candidate: ExportedBundle,
    samples: list[dict[str, Any]] | None = None,
    *,
    max_new_tokens: int | None = DEFAULT_EVAL_NEW_TOKENS,
    threads: int = 0,
) -> Metrics:
    """Token agreement of ``candidate`` with ``reference`` on ``samples`` (``default_prompts`` when None),
    plus the candidate's tokens/s, per-token latency p50/p95, peak RSS and size.

    ``max_new_tokens`` caps every record's generation (None: the records' own or the manifest's value).
    """
    task = reference.spec.task
    if candidate.spec.task != task:
        raise ConversionError(f"cannot compare a {candidate.spec.task.value} candidate with a {task.value} reference")
    if task not in (Task.TEXT_GENERATION, Task.TEXT2TEXT):
        raise ConversionError(f"evaluate_generation handles text-generation and text2text, not {task.value}")
    records = list(samples) if samples is not None else default_prompts(reference)
    if not records:
        raise ConversionError("no evaluation prompts")
    if max_new_tokens is not None:
        records = [
            dict(r, max_new_tokens=min(int(r.get("max_new_tokens", max_new_tokens)), max_new_tokens)) for r in records
        ]
    ref = _reference_run(reference, records, threads)
    same_bundle = Path(candidate.root).resolve() == Path(reference.root).resolve() and candidate.spec == reference.spec
    # The registry measures fp32 against itself: one run is that measurement.
    if same_bundle:
        cand = replace(ref, forced=ref.token_ids)
    else:
        cand = measure_generation(candidate, records, threads=threads, targets=ref.token_ids)
    agreement, compared = forced_token_agreement(ref.token_ids, cand.forced, ref.errors, cand.errors)
    free, _ = token_agreement(ref.token_ids, cand.token_ids, ref.errors, cand.errors)
    per_token = cand.per_token_ms()
    metrics = Metrics(
        agreement=agreement,
        agreement_kind="token",
        free_running_agreement=free,
        eval_samples=compared,
        latency_ms_p50=_percentile(per_token, 50),
        latency_ms_p95=_percentile(per_token, 95),
        tokens_per_s=cand.tokens_per_s,
        peak_rss_bytes=cand.peak_rss_bytes,
        size_bytes=candidate.size_bytes,
    )
    log.info(
        "evaluated %s against %s: token agreement %.3f (free-running %.3f) over %d prompts, %.1f tokens/s"
        " (reference %.1f), p50 %.2f ms/token, peak RSS %s",
        candidate.root,
        reference.root,
        agreement,
        free,
        compared,
        cand.tokens_per_s,
        ref.tokens_per_s,
        metrics.latency_ms_p50 or 0.0,
        cand.peak_rss_bytes,
    )
    return metrics


#: Reference generations by (bundle files, records, threads): a reference's greedy ids are deterministic,
#: and evaluating int8 and int4 against the same fp32 bundle should not generate with it twice.
_REFERENCE_RUNS: dict[tuple[Any, ...], GenerationRun] = {}
_REFERENCE_RUNS_KEPT = 8


def _reference_run(bundle: ExportedBundle, records: list[dict[str, Any]], threads: int) -> GenerationRun:
    files = tuple(
        (str(p), (bundle.root / p).stat().st_size, (bundle.root / p).stat().st_mtime_ns) for p in bundle.files()
    )
    key = (str(Path(bundle.root).resolve()), files, json.dumps(records, sort_keys=True), threads)
    if key not in _REFERENCE_RUNS:
        while len(_REFERENCE_RUNS) >= _REFERENCE_RUNS_KEPT:
            _REFERENCE_RUNS.pop(next(iter(_REFERENCE_RUNS)))  # the oldest: a long-lived controller stays bounded
        _REFERENCE_RUNS[key] = measure_generation(bundle, records, threads=threads)
    return _REFERENCE_RUNS[key]


def forced_token_agreement(
    reference: list[list[int]],
    forced: list[list[int]],
    ref_errors: list[str | None] | None = None,
    cand_errors: list[str | None] | None = None,
) -> tuple[float, int]:
    """(teacher-forced agreement as defined in the module docstring, prompts compared). A prompt both sides
    reject is skipped; one side rejecting counts as a disagreement at every position of the other side's."""

    def same_positions(r: list[int], f: list[int]) -> tuple[int, int]:
        return sum(1 for a, b in zip(r, f, strict=False) if a == b), len(r)

    return _per_prompt(reference, forced, ref_errors, cand_errors, same_positions)


def token_agreement(
    reference: list[list[int]],
    candidate: list[list[int]],
    ref_errors: list[str | None] | None = None,
    cand_errors: list[str | None] | None = None,
) -> tuple[float, int]:
    """(free-running agreement as defined in the module docstring, prompts compared). A prompt both sides
    reject is skipped; one side rejecting counts as full disagreement over the other side's tokens."""

    def common_prefix(r: list[int], c: list[int]) -> tuple[int, int]:
        prefix = 0
        for a, b in zip(r, c, strict=False):
            if a != b:
                break
            prefix += 1
        return prefix, max(len(r), len(c))

    return _per_prompt(reference, candidate, ref_errors, cand_errors, common_prefix)


def _per_prompt(
    reference: list[list[int]],
    candidate: list[list[int]],
    ref_errors: list[str | None] | None,
    cand_errors: list[str | None] | None,
    score: Callable[[list[int], list[int]], tuple[int, int]],
) -> tuple[float, int]:
    """Matched over compared positions summed over prompts (``score`` gives both for one prompt)."""
    matched = positions = compared = 0
    ref_errors = ref_errors or [None] * len(reference)
    cand_errors = cand_errors or [None] * len(candidate)
    for r, c, r_err, c_err in zip(reference, candidate, ref_errors, cand_errors, strict=True):
        if r_err and c_err:
            continue
        compared += 1
        if r_err or c_err:
            positions += max(len(r), len(c), 1)
            continue
        hits, count = score(r, c)
        matched += hits
        positions += count
    if not compared:
        raise ConversionError("every evaluation prompt was rejected by both models: check the prompts")
    return (matched / positions if positions else 1.0), compared


def default_prompts(bundle: ExportedBundle, n: int = DEFAULT_PROMPTS, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` deterministic prompts of 2 to 24 tokens built from the bundle's tokenizer vocabulary.

    Pieces are drawn from the first (most frequent, for BPE and Unigram trainers) part of the
    vocabulary, without special tokens and pieces that do not decode to printable text.
    """
    from tokenizers import Tokenizer

    if bundle.spec.preprocess.tokenizer is None:
        raise ConversionError("the bundle has no tokenizer: pass evaluation prompts explicitly")
    tokenizer = Tokenizer.from_file(str(bundle.root / bundle.spec.preprocess.tokenizer))
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    pieces = []
    for token, token_id in vocab:
        if token in special:
            continue
        text = tokenizer.decode([token_id])
        if text.strip() and text.isprintable() and "\ufffd" not in text:
            pieces.append(token_id)
        if len(pieces) >= 4000:
            break
    if len(pieces) < 20:
        raise ConversionError(f"the tokenizer has too few printable pieces ({len(pieces)}) to build prompts")
    rng = random.Random(seed)
    lengths = (2, 3, 5, 8, 12, 16, 24)
    key = "text" if bundle.spec.task == Task.TEXT2TEXT else "prompt"
    prompts = []
    for i in range(n):
        ids = [rng.choice(pieces) for _ in range(lengths[i % len(lengths)])]
        prompts.append({key: tokenizer.decode(ids).strip() or "hello"})
    return prompts


# ---------------------------------------------------------------------------------------------------------
# Measuring in a process of the bundle's own

def measure_generation(
    bundle: ExportedBundle,
    records: list[dict[str, Any]],
    *,
    threads: int = 0,
    timeout: float = 1800.0,
    targets: list[list[int]] | None = None,
) -> GenerationRun:
    """Generate for every record with ``bundle``'s device pipeline in a fresh interpreter (after a warm-up);
    with ``targets`` (another model's tokens per record), also its teacher-forced choices (``forced``)."""
    job = {
        "spec": bundle.spec.model_dump(mode="json"),
        "root": str(Path(bundle.root).resolve()),
        "records": records,
        "threads": threads,
        "targets": targets,
    }
    report = run_probe("generation", job, timeout)
    return GenerationRun(
        token_ids=report["ids"],
        seconds=report["seconds"],
        peak_rss_bytes=report["peak_rss_bytes"],
        errors=report["errors"],
        forced=report["forced"],
    )


def forced_agreement(
    reference: ExportedBundle, candidate: ExportedBundle, records: list[dict[str, Any]], *, threads: int = 0
) -> float:
    """Teacher-forced token agreement (the module docstring) of ``candidate`` with ``reference`` on ``records``,
    in this process (``evaluate_generation`` measures it in processes of their own)."""
    from agent.inference.pipelines import load_pipeline
    from agent.inference.pipelines.generation import TokenStreamPipeline

    pipes = [load_pipeline(b.spec, b.root, threads=threads) for b in (reference, candidate)]
    try:
        ref_pipe, cand_pipe = pipes
        if not isinstance(ref_pipe, TokenStreamPipeline) or not isinstance(cand_pipe, TokenStreamPipeline):
            raise ConversionError("forced_agreement compares text-generation and text2text bundles")
        targets = [ref_pipe.generate(record).token_ids for record in records]
        forced = [cand_pipe.forced(record, target) for record, target in zip(records, targets, strict=True)]
    finally:
        for pipe in pipes:
            pipe.close()
    return forced_token_agreement(targets, forced)[0]


def tokens_per_second_ratio(
    genai_bundle: ExportedBundle,
    agent_bundle: ExportedBundle | None = None,
    prompts: list[str] | None = None,
    *,
    max_new_tokens: int = 64,
    repeats: int = 3,
    threads: int = 0,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """Tokens/s of the agent's own loop over tokens/s of onnxruntime-genai's loop, on the same model.

    ``genai_bundle`` is an onnxruntime-genai folder; the agent's ``DecoderGenerationPipeline`` runs the
    same graph unless ``agent_bundle`` (e.g. the traced export of the same checkpoint) is given.

    Each side runs in a fresh interpreter with only the device code, one after the other, ``repeats``
    rounds (agent, genai, agent, genai, ...): in one process the two onnxruntime thread pools spin-wait
    against each other on a small CPU (measured ratios of 0.8 to 1.8 for the same graph), and a process
    that ran torch keeps its OpenMP threads spinning too. Each run generates up to ``max_new_tokens``
    for every prompt, from the same prompt ids (tokenization is not timed), after a warm-up.

    Returns ``agent_tokens_per_s`` and ``genai_tokens_per_s`` (all tokens over all time), ``ratio``
    (the median over the rounds of agent / genai tokens/s; the goal is >= 0.9), ``same_tokens`` (both
    generated the same ids) and ``shared_cache_buffer`` (the agent loop wrote the cache in place, as
    onnxruntime-genai does).
    """
    if genai_bundle.spec.runtime != Runtime.ONNXRUNTIME_GENAI:
        raise ConversionError("tokens_per_second_ratio needs an onnxruntime-genai bundle to compare with")
    agent_source = agent_bundle or _plain_spec(genai_bundle)
    texts = prompts or [p["prompt"] for p in default_prompts(genai_bundle, n=6)]
    sides = {"agent": agent_source, "genai": genai_bundle}
    totals = {name: [0, 0.0] for name in sides}
    rounds: list[float] = []
    outputs: dict[str, Any] = {}
    shared = False
    for _ in range(max(1, repeats)):
        rate = {}
        for name, bundle in sides.items():
            job = {
                "side": name,
                "spec": bundle.spec.model_dump(mode="json"),
                "root": str(Path(bundle.root).resolve()),
                "tokenizer_root": str(Path(genai_bundle.root).resolve()),
                "tokenizer_spec": genai_bundle.spec.model_dump(mode="json"),
                "prompts": texts,
                "max_new_tokens": max_new_tokens,
                "threads": threads,
            }
            report = run_probe("ratio", job, timeout)
            totals[name][0] += report["tokens"]
            totals[name][1] += report["seconds"]
            rate[name] = report["tokens"] / report["seconds"]
            outputs[name] = report["ids"]
            shared = shared or bool(report.get("shared_cache_buffer"))
        rounds.append(rate["agent"] / rate["genai"])
    rounds.sort()
    result = {
        "agent_tokens_per_s": totals["agent"][0] / totals["agent"][1],
        "genai_tokens_per_s": totals["genai"][0] / totals["genai"][1],
        "ratio": rounds[len(rounds) // 2],
        "rounds": rounds,
        "same_tokens": outputs["agent"] == outputs["genai"],
        "shared_cache_buffer": shared,
        "agent_graph": str(Path(agent_source.root).resolve()),
    }
    log.info(
        "agent loop %.1f tokens/s, onnxruntime-genai %.1f tokens/s: ratio %.2f",
        result["agent_tokens_per_s"],
        result["genai_tokens_per_s"],
        result["ratio"],
    )
    return result


def _plain_spec(bundle: ExportedBundle) -> ExportedBundle:
    """The bundle as the plain onnxruntime loop sees it (an onnxruntime-genai graph keeps that contract)."""
    if bundle.spec.runtime == Runtime.ONNXRUNTIME:
        return bundle
    return replace(bundle, spec=bundle.spec.model_copy(update={"runtime": Runtime.ONNXRUNTIME}))


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(values, q))
