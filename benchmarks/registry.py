"""The model registry on every seed family: import + quantize + validate time through the registry's Importer
(in process, default variants and agreement floors), and the size and latency ratios int8/fp32 and int4/fp32
measured in the same run.

Latencies come from the metrics the registry stores: the evaluators measure every variant in a fresh
interpreter of its own that imports only the device code (single-record calls for encoders; milliseconds per
generated token, prompt included, for generation). Seeds are built first and not timed as part of the import.
Random weights give real sizes and speeds, not real quality; MiniLM (real weights) is evaluated on natural
sentences supplied with the import, every seed on the set the registry generates from its tokenizer.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from controller.db.engine import make_engine, migrate
from controller.db.models import Artifact, ModelVersion
from controller.registry.bundles import ImportOptions
from controller.registry.importer import ImportRequest
from controller.registry.service import RegistryService

log = logging.getLogger(__name__)

#: (family, task) in the order of the README's table
FAMILIES: tuple[tuple[str, str], ...] = (
    ("bert-tiny", "text-classification"),
    ("bert-mini", "text-classification"),
    ("bert-small", "text-classification"),
    ("bert-medium", "text-classification"),
    ("distilbert", "text-classification"),
    ("mobilebert", "text-classification"),
    ("minilm", "embeddings"),
    ("t5-small", "text2text"),
    ("gpt-neo-125m", "text-generation"),
    ("gpt-j-small", "text-generation"),
    ("phi-small", "text-generation"),
    ("llama-small", "text-generation"),
)
QUICK = ("bert-tiny", "minilm", "llama-small")
#: MiniLM's evaluation sentences (the cosine figure is measured on a few hundred)
MINILM_SENTENCES = 300


def _checkpoint(name: str, root: Path) -> Path:
    from benchmarks.seeds import ENCODER_SEEDS, build_seed
    from benchmarks.seeds.encoders import minilm_checkpoint

    if name == "minilm":
        return minilm_checkpoint()
    options = {"task": "text-classification"} if name in ENCODER_SEEDS else {}
    return build_seed(name, root / name, **options)


def _parameters(checkpoint: Path) -> int:
    """Parameters stored in the checkpoint (tied weights once)."""
    from safetensors import safe_open

    total = 0
    for path in checkpoint.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                total += math.prod(f.get_slice(key).get_shape())
    return total


def _stage_seconds(marks: list[tuple[str, float]], end: float) -> dict[str, float]:
    """Seconds spent in each reported stage (until the next one began)."""
    out: dict[str, float] = {}
    for (stage, at), (_, until) in zip(marks, [*marks[1:], ("end", end)], strict=True):
        out[stage] = round(out.get(stage, 0.0) + until - at, 2)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _import(service: RegistryService, name: str, task: str, checkpoint: Path, work: Path) -> dict[str, Any]:
    options: dict[str, Any] = {"task": task}
    if name == "minilm":
        from benchmarks.seeds.sentences import text_records

        options["eval_set"] = text_records(MINILM_SENTENCES)
    marks: list[tuple[str, float]] = []

    def progress(stage: str, fraction: float, message: str) -> None:
        marks.append((stage, time.perf_counter()))

    request = ImportRequest(uuid.uuid4().hex, name, checkpoint, ImportOptions(**options), "benchmark")
    started = time.perf_counter()
    result = service.importer.run(request, progress, work)
    seconds = time.perf_counter() - started
    stages = _stage_seconds(marks, time.perf_counter())

    with Session(service.engine) as session:
        # A registry of its own per family: the version just registered is the only one.
        (version_id,) = session.exec(select(ModelVersion.id)).all()
        artifacts = {a.variant: a for a in session.exec(select(Artifact).where(Artifact.version_id == version_id))}
    variants: dict[str, dict[str, Any]] = {}
    for variant, artifact in artifacts.items():
        manifest = artifact.signed_manifest["manifest"]
        m = manifest["metrics"]
        variants[variant] = {
            "size_bytes": artifact.size_bytes,
            "quantization": manifest["quantization"]["method"],
            "agreement": round(m["agreement"], 4) if m.get("agreement") is not None else None,
            "agreement_kind": m.get("agreement_kind"),
            "eval_samples": m.get("eval_samples"),
            "latency_ms_p50": round(m["latency_ms_p50"], 3) if m.get("latency_ms_p50") is not None else None,
            "latency_ms_p95": round(m["latency_ms_p95"], 3) if m.get("latency_ms_p95") is not None else None,
            "tokens_per_s": round(m["tokens_per_s"], 1) if m.get("tokens_per_s") is not None else None,
            "peak_rss_mib": round(m["peak_rss_bytes"] / 2**20, 1) if m.get("peak_rss_bytes") else None,
        }
    fp32 = variants["fp32"]
    figures: dict[str, Any] = {
        "task": task,
        "runtime": artifacts["fp32"].signed_manifest["manifest"]["runtime"],
        "parameters": _parameters(checkpoint),
        "fp32_size_mib": round(fp32["size_bytes"] / 2**20, 1),
        "import_s": round(seconds, 1),
        "stages_s": stages,
        "refused": [{"variant": r["variant"], "reason": r["reason"]} for r in result.refused],
    }
    for variant in ("int8", "int4"):
        v = variants.get(variant)
        if v is None:
            continue
        figures[f"{variant}_size_ratio"] = _ratio(v["size_bytes"], fp32["size_bytes"])
        figures[f"{variant}_latency_ratio"] = _ratio(v["latency_ms_p50"], fp32["latency_ms_p50"])
        if v["tokens_per_s"] is not None:
            figures[f"{variant}_tokens_per_s_ratio"] = _ratio(v["tokens_per_s"], fp32["tokens_per_s"])
        figures[f"{variant}_agreement"] = v["agreement"]
    figures["variants"] = variants
    return figures


def run(quick: bool = False) -> dict[str, Any]:
    import onnxruntime

    load = os.getloadavg()  # the figures are noisy on a shared machine: keep how busy it was
    names = QUICK if quick else tuple(name for name, _ in FAMILIES)
    tasks = dict(FAMILIES)
    families: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="slmfleet-bench-registry-") as tmp:
        root = Path(tmp)
        for name in names:
            build_started = time.perf_counter()
            checkpoint = _checkpoint(name, root / "seeds")
            build_s = time.perf_counter() - build_started
            # A registry of its own per family: each import is version 1 on an empty store.
            data = root / "registry" / name
            data.mkdir(parents=True)
            engine = make_engine(f"sqlite:///{data / 'registry.db'}")
            migrate(engine)
            service = RegistryService(
                engine, data, chunk_size=256 * 1024, validity_days=365, max_unpacked_bytes=8 * 1024**3
            )
            service.start()
            try:
                figures = _import(service, name, tasks[name], checkpoint, data / "work")
            finally:
                service.stop()
                engine.dispose()
            figures["seed_build_s"] = round(build_s, 1)
            families[name] = figures
            log.warning("registry benchmark: %s imported in %.1f s", name, figures["import_s"])
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in load],
            "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
        },
        "families": families,
        "total_import_s": round(sum(f["import_s"] for f in families.values()), 1),
    }
