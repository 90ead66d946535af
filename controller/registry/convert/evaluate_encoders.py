"""Measure a variant (int8, ...) of an encoder or anomaly bundle against its fp32 reference.

Both bundles run through the real device pipelines (``agent.inference.pipelines.load_pipeline``), so what
is measured is what a device will do. Agreement: mean cosine of embeddings, top-1 label agreement for
classification, identical decisions for anomaly models. Latency (single-record calls) and peak RSS of the
candidate come from a fresh subprocess that imports only the device code (``python -m agent.inference.probe``),
so the numbers are the model's and not this process's (which may hold torch and both models).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Literal

from controller.registry.convert import ConversionError, ExportedBundle
from controller.registry.convert.probe import run_probe
from wire.manifest import Metrics, Task

log = logging.getLogger(__name__)

AgreementKind = Literal["cosine", "top1", "exact"]

#: Records per pipeline call when computing agreement.
EVAL_BATCH = 32
#: Generated evaluation set size for text models.
DEFAULT_TEXT_SAMPLES = 240
DEFAULT_WINDOW_SAMPLES = 400

NATURAL_SENTENCES = (
    "The weather was cold and rainy all week, so the farmers delayed the harvest.",
    "Please restart the gateway before installing the new firmware.",
    "I absolutely loved the new update; the battery lasts twice as long now!",
    "This is the worst customer service I have ever experienced.",
    "The temperature sensor in the cold room reported 4.2 degrees at 06:00.",
    "Can you tell me when the next train to the airport leaves?",
    "Stock prices fell sharply after the central bank raised interest rates.",
    "The vibration on pump three has been increasing since Tuesday.",
    "She finished the marathon in under four hours despite the heat.",
    "Our team shipped the release on time, and nobody had to work the weekend.",
    "The package arrived damaged and two items were missing.",
    "Quantum computers may one day break today's public-key cryptography.",
    "ok",
    "Why?",
    "Turn off the lights in the kitchen.",
    "The museum opens at nine, but the guided tours start at ten thirty.",
)


def evaluate_encoder(
    reference: ExportedBundle,
    candidate: ExportedBundle,
    samples: list[dict[str, Any]] | None = None,
    *,
    latency_runs: int = 50,
    threads: int = 0,
    measure_resources: bool = True,
) -> Metrics:
    """Agreement of ``candidate`` with ``reference`` on ``samples`` (generated when None), plus the
    candidate's single-record latency p50/p95, peak RSS and size.

    ``measure_resources=False`` skips the subprocess (latency and RSS stay None).
    """
    from agent.inference.pipelines import load_pipeline

    task = reference.spec.task
    if candidate.spec.task != task:
        raise ConversionError(f"cannot compare a {candidate.spec.task.value} candidate with a {task.value} reference")
    if task not in (Task.TEXT_CLASSIFICATION, Task.EMBEDDINGS, Task.ANOMALY):
        raise ConversionError(f"evaluate_encoder handles classification, embeddings and anomaly, not {task.value}")
    if samples is None:
        samples = default_samples(candidate)
    if not samples:
        raise ConversionError("no evaluation samples")

    ref_pipe = load_pipeline(reference.spec, reference.root, threads=threads)
    try:
        ref_out = _run_all(ref_pipe, samples)
    finally:
        ref_pipe.close()
    if candidate is reference:
        cand_out = ref_out  # measuring the reference itself: it ran once, it agrees with itself
    else:
        cand_pipe = load_pipeline(candidate.spec, candidate.root, threads=threads)
        try:
            cand_out = _run_all(cand_pipe, samples)
        finally:
            cand_pipe.close()
    agreement, kind, compared = _agreement(task, ref_out, cand_out)
    correlation = score_correlation(task, ref_out, cand_out)

    p50 = p95 = None
    peak_rss = None
    if measure_resources:
        probe = probe_candidate(candidate, samples[: max(latency_runs, 1)], threads=threads)
        p50, p95, peak_rss = probe["latency_ms_p50"], probe["latency_ms_p95"], probe["peak_rss_bytes"]
    metrics = Metrics(
        agreement=max(-1.0, min(1.0, agreement)),
        agreement_kind=kind,
        score_correlation=correlation,
        eval_samples=compared,
        latency_ms_p50=p50,
        latency_ms_p95=p95,
        peak_rss_bytes=peak_rss,
        size_bytes=candidate.size_bytes,
    )
    log.info(
        "evaluated %s against %s: %s %.4f (scores correlate %s) over %d samples, p50 %s ms, peak RSS %s",
        candidate.root,
        reference.root,
        kind,
        metrics.agreement,
        correlation,
        compared,
        p50,
        peak_rss,
    )
    return metrics


def _run_all(pipeline: Any, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for start in range(0, len(samples), EVAL_BATCH):
        out.extend(pipeline.run(samples[start : start + EVAL_BATCH]))
    return out


def _agreement(task: Task, ref: list[dict[str, Any]], cand: list[dict[str, Any]]) -> tuple[float, AgreementKind, int]:
    """(agreement, kind, samples compared). A sample only one side rejects counts as a disagreement."""
    import numpy as np

    values: list[float] = []
    for r, c in zip(ref, cand, strict=True):
        if "error" in r and "error" in c:
            continue
        if "error" in r or "error" in c:
            values.append(0.0)
            continue
        if task == Task.EMBEDDINGS:
            a = np.asarray(r["embedding"], dtype=np.float64)
            b = np.asarray(c["embedding"], dtype=np.float64)
            norms = float(np.linalg.norm(a) * np.linalg.norm(b))
            values.append(float(a @ b) / max(norms, 1e-12))
        elif task == Task.TEXT_CLASSIFICATION:
            values.append(float(r["label"] == c["label"]))
        else:
            values.append(float(r["anomaly"] == c["anomaly"]))
    if not values:
        raise ConversionError("every evaluation sample was rejected by both models: check the samples")
    kinds: dict[Task, AgreementKind] = {
        Task.EMBEDDINGS: "cosine",
        Task.TEXT_CLASSIFICATION: "top1",
        Task.ANOMALY: "exact",
    }
    kind = kinds[task]
    return float(np.mean(values)), kind, len(values)


def score_correlation(task: Task, ref: list[dict[str, Any]], cand: list[dict[str, Any]]) -> float | None:
    """How a classifier's logits follow the reference's from one text to the next: Pearson's correlation over
    every sample and class, each class centred on its mean.

    Matching labels alone cannot tell a working variant from one whose output no longer depends on the text:
    when most evaluation texts fall in one class (word salad is "neutral"), a variant that always answers that
    class agrees on most of them. Its logits do not vary, so they correlate 0. None for other tasks (an
    anomaly score is dominated by the window's own size, which any broken graph still sees: measured, the
    anomaly decisions tell broken from working, the scores' correlation does not), and when the reference's
    logits do not vary.
    """
    import numpy as np

    if task != Task.TEXT_CLASSIFICATION:
        return None
    key = "logits"
    pairs = [(r[key], c[key]) for r, c in zip(ref, cand, strict=True) if key in r and key in c]
    if len(pairs) < 2:
        return None
    a = np.asarray([p[0] for p in pairs], dtype=np.float64).reshape(len(pairs), -1)
    b = np.asarray([p[1] for p in pairs], dtype=np.float64).reshape(len(pairs), -1)
    if a.shape != b.shape:
        return 0.0
    a -= a.mean(axis=0)
    b -= b.mean(axis=0)
    norm_a, norm_b = float(np.sqrt((a * a).sum())), float(np.sqrt((b * b).sum()))
    if norm_a == 0.0:
        return None
    if norm_b == 0.0:
        return 0.0
    return max(-1.0, min(1.0, float((a * b).sum()) / (norm_a * norm_b)))


# ---------------------------------------------------------------------------------------------------------
# Evaluation sets


def default_samples(bundle: ExportedBundle, seed: int = 0) -> list[dict[str, Any]]:
    """A deterministic, varied evaluation set for ``bundle``'s task."""
    if bundle.spec.task == Task.ANOMALY:
        assert bundle.spec.anomaly is not None
        return random_windows(bundle.spec.anomaly.n_features, DEFAULT_WINDOW_SAMPLES, seed)
    if bundle.spec.preprocess.tokenizer is None:
        raise ConversionError("the bundle has no tokenizer: pass evaluation samples explicitly")
    words = vocabulary_words(bundle.root / bundle.spec.preprocess.tokenizer)
    return text_samples(words, DEFAULT_TEXT_SAMPLES, seed)


def vocabulary_words(tokenizer_path: Path) -> list[str]:
    """Whole-word entries of a tokenizer's vocabulary (no special tokens, no ``##`` pieces), sorted."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab()
    words = sorted(w for w in vocab if w.isalpha() and len(w) >= 2 and not w.startswith(("[", "<", "##")))
    if len(words) < 20:
        raise ConversionError(f"{tokenizer_path} has too few whole words ({len(words)}) to generate texts")
    return words


def text_samples(words: list[str], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` texts: the natural sentences, then random word sequences from 1 to 160 words long."""
    rng = random.Random(seed)
    lengths = (1, 2, 3, 5, 8, 12, 16, 24, 32, 48, 64, 96, 160)
    texts = list(NATURAL_SENTENCES[:n])
    i = 0
    while len(texts) < n:
        count = lengths[i % len(lengths)]
        i += 1
        picked = [rng.choice(words) for _ in range(count)]
        text = " ".join(picked)
        if count > 4:
            text = text[0].upper() + text[1:] + rng.choice([".", "!", "?"])
        texts.append(text)
    return [{"text": t} for t in texts]


def random_windows(n_features: int, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Sensor-like windows at several levels and noise scales, a fifth of them with a spike or a step."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(n_features)
    windows = []
    for i in range(n):
        level = rng.normal(20.0, 5.0)
        noise = 10.0 ** rng.uniform(-1.5, 0.5)
        window = level + rng.uniform(-0.05, 0.05) * t + rng.normal(0.0, noise, n_features)
        if i % 5 == 0:
            at = int(rng.integers(0, n_features))
            window[at:] += rng.normal(0.0, 8.0) if i % 10 == 0 else 0.0
            window[at] += rng.normal(0.0, 10.0)
        windows.append({"values": [float(v) for v in window]})
    return windows


# ---------------------------------------------------------------------------------------------------------
# Latency and memory, in a process of the candidate's own

def probe_candidate(bundle: ExportedBundle, samples: list[dict[str, Any]], threads: int = 0) -> dict[str, Any]:
    """Load ``bundle`` in a fresh interpreter, time one call per sample, and report p50/p95 and peak RSS."""
    import numpy as np

    job = {
        "spec": bundle.spec.model_dump(mode="json"),
        "root": str(Path(bundle.root).resolve()),
        "samples": samples,
        "threads": threads,
    }
    report = run_probe("latency", job, timeout=600)
    times = report["times_ms"]
    if not times:
        raise ConversionError(f"measuring {bundle.root}: every latency sample was rejected")
    return {
        "latency_ms_p50": float(np.percentile(times, 50)),
        "latency_ms_p95": float(np.percentile(times, 95)),
        "peak_rss_bytes": int(report["peak_rss_bytes"]),
        "runs": len(times),
    }
