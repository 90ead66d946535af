"""Model deltas: the bytes a device must fetch for an update when it already holds the previous artifact.

``python -m benchmarks delta [--quick]``. DistilBERT at its real size (about 67M parameters, random weights,
seeded; ``bert-small`` with ``--quick``) is built locally, exported to ONNX and quantized to int8 exactly as
the registry does (``export_hf``, ``quantize_int8``), then changed the ways real updates change a model:

* ``requantized``: the same fp32 export quantized to int8 again (base: the first int8);
* ``head_finetune``: only the classification head's tensors changed (fp32 and int8 against v1's);
* ``full_finetune``: every tensor changed;
* ``new_tokenizer``: the same weights with another tokenizer (another vocabulary of the same size);
* ``int8_after_fp32``: the int8 variant of the version whose fp32 the device holds.

Each case reports the artifact's bytes and what the device receives (absolute and % of the artifact):

* ``missing``: chunks of the new manifest whose sha256 no chunk of the installed manifest has (256 KiB
  fixed, content-addressed chunks): what a device copies from its installed slot is never fetched;
* ``broadcast_before``: what the broadcast sent a device before deltas (every chunk from index 0 once any
  chunk was missing: a device's held chunks were skipped on its disk, not on the link);
* ``broadcast_after``: now the broadcast starts at the first chunk the slowest device lacks
  (``Broadcast.next_index``: the tail from there), unless the agent goes sparse (``agent/deploy/delta.py``:
  few missing chunks, scattered) and asks for exactly its missing chunks (``missing``); ``sparse`` says
  which;
* ``zstd_patch``: for comparison, what a binary delta would ship: a zstd patch-from of each changed file
  against the installed one (``pyzstd``, in the ``dev`` extra; None without it).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.deploy.config import DeployConfig
from agent.deploy.delta import sparse_is_better
from wire.manifest import DEFAULT_CHUNK_SIZE, ChunkRef, describe_files

#: the agent goes sparse (requests exactly its missing chunks) when it lacks at most this share
SPARSE_FRACTION = DeployConfig().sparse_fraction


def bundle_chunks(root: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[dict[str, bytes], list[ChunkRef]]:
    """The bundle's files (as the importer lists them: sorted relative paths) and their chunk list."""
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "slmfleet.json")
    files = {p: (root / p).read_bytes() for p in paths}
    return files, describe_files(files, chunk_size)[1]


def fetch_bytes(base: list[ChunkRef], target: list[ChunkRef]) -> dict[str, int]:
    """What a device holding ``base`` must receive of ``target``: exact missing chunks, and the broadcast."""
    held = {(c.sha256, c.size) for c in base}
    missing = [c for c in target if (c.sha256, c.size) not in held]
    total = sum(c.size for c in target)
    first = missing[0].index if missing else len(target)
    tail = sum(c.size for c in target[first:])
    held_flags = [(c.sha256, c.size) in held for c in target]
    sparse = any(held_flags) and sparse_is_better([c.size for c in target], held_flags, SPARSE_FRACTION)
    return {
        "artifact_bytes": total,
        "chunks": len(target),
        "missing_chunks": len(missing),
        "missing_bytes": sum(c.size for c in missing),
        "first_missing_chunk": first,
        "tail_bytes": tail,
        "broadcast_before_bytes": total if missing else 0,
        "broadcast_after_bytes": sum(c.size for c in missing) if sparse else tail,
        "sparse": sparse,
    }


def zstd_patch_bytes(base: dict[str, bytes], target: dict[str, bytes]) -> int | None:
    """Bytes of zstd patch-from deltas (``zstd --patch-from``: the installed file as a prefix, long-distance
    matching, a window over both) of each changed file against the installed file of the same path; None
    without the ``pyzstd`` package (the ``dev`` extra)."""
    try:
        import pyzstd
    except ImportError:
        return None
    total = 0
    for path, data in target.items():
        old = base.get(path)
        if old == data:
            continue
        if old is None:
            total += len(pyzstd.compress(data, 3))
            continue
        options = {
            pyzstd.CParameter.compressionLevel: 3,
            pyzstd.CParameter.windowLog: min((len(old) + len(data)).bit_length(), 31),
            pyzstd.CParameter.enableLongDistanceMatching: 1,
        }
        total += len(pyzstd.compress(data, options, pyzstd.ZstdDict(old, is_raw=True).as_prefix))
    return total


def _percent(part: int | None, whole: int) -> float | None:
    return None if part is None else round(100.0 * part / whole, 2)


def _case(base_dir: Path, target_dir: Path) -> dict[str, Any]:
    base_files, base_chunks = bundle_chunks(base_dir)
    target_files, target_chunks = bundle_chunks(target_dir)
    out: dict[str, Any] = fetch_bytes(base_chunks, target_chunks)
    started = time.perf_counter()
    out["zstd_patch_bytes"] = zstd_patch_bytes(base_files, target_files)
    if out["zstd_patch_bytes"] is not None:
        out["zstd_patch_s"] = round(time.perf_counter() - started, 2)
    out["changed_files"] = sorted(p for p, d in target_files.items() if base_files.get(p) != d)
    total = out["artifact_bytes"]
    for key in ("missing", "tail", "broadcast_before", "broadcast_after", "zstd_patch"):
        out[f"{key}_pct"] = _percent(out[f"{key}_bytes"], total)
    return out


def _perturbed_checkpoint(src: Path, out: Path, prefixes: tuple[str, ...] | None, seed: int) -> Path:
    """A copy of checkpoint ``src`` whose tensors named with ``prefixes`` (all when None) moved a little, as a
    fine-tune moves them (seeded noise of 1% of each tensor's spread)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    shutil.copytree(src, out)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if prefixes is None or name.startswith(prefixes):
                spread = float(tensor.std()) if tensor.numel() > 1 else 1.0
                tensor.add_(0.01 * spread * torch.randn(tensor.shape, generator=generator))
    model.save_pretrained(out)
    return out


def _new_tokenizer(src: Path, out: Path, seed: int) -> Path:
    from benchmarks.seeds.encoders import bert_tokenizer

    shutil.copytree(src, out)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).unlink(missing_ok=True)
    bert_tokenizer(8000, seed, 512).save_pretrained(out)
    return out


def run(quick: bool = False) -> dict[str, Any]:
    from benchmarks.seeds import build_seed
    from controller.registry.convert import export_hf
    from controller.registry.convert.quantize_int8 import quantize_int8
    from wire.manifest import Task

    family = "bert-small" if quick else "distilbert"
    head = ("pre_classifier", "classifier")
    results: dict[str, Any] = {"model": family, "chunk_kib": DEFAULT_CHUNK_SIZE // 1024, "cases": {}}
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="slmfleet-bench-delta-") as tmp:
        root = Path(tmp)

        def export(checkpoint: Path, name: str) -> tuple[Path, Path]:
            started = time.perf_counter()
            fp32 = export_hf(checkpoint, Task.TEXT_CLASSIFICATION, root / f"{name}-fp32")
            int8 = quantize_int8(fp32, root / f"{name}-int8")
            timings[name] = round(time.perf_counter() - started, 1)
            return fp32.root, int8.root

        v1 = build_seed(family, root / "v1-checkpoint", task="text-classification", seed=0)
        v1_fp32, v1_int8 = export(v1, "v1")
        again = quantize_int8(export_hf(v1, Task.TEXT_CLASSIFICATION, root / "again-fp32"), root / "again-int8")
        head_fp32, head_int8 = export(_perturbed_checkpoint(v1, root / "head-checkpoint", head, 1), "head")
        full_fp32, full_int8 = export(_perturbed_checkpoint(v1, root / "full-checkpoint", None, 2), "full")
        tok_fp32, tok_int8 = export(_new_tokenizer(v1, root / "tok-checkpoint", 7), "tok")
        cases = {
            "requantized_int8": (v1_int8, again.root),
            "head_finetune_fp32": (v1_fp32, head_fp32),
            "head_finetune_int8": (v1_int8, head_int8),
            "full_finetune_fp32": (v1_fp32, full_fp32),
            "full_finetune_int8": (v1_int8, full_int8),
            "new_tokenizer_fp32": (v1_fp32, tok_fp32),
            "new_tokenizer_int8": (v1_int8, tok_int8),
            "int8_after_fp32": (v1_fp32, v1_int8),
        }
        for name, (base, target) in cases.items():
            results["cases"][name] = _case(base, target)
        results["export_s"] = timings
    head_case = results["cases"]["head_finetune_int8"], results["cases"]["head_finetune_fp32"]
    results["goal_head_finetune_pct"] = 5.0
    results["head_finetune_worst_after_pct"] = max(c["broadcast_after_pct"] for c in head_case)
    return results
