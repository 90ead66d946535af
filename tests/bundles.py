"""Real model bundles for the agent's serving tests, one per pipeline family, built once per session.

Each bundle is described the way a device may find it, so every form ``--model`` accepts is used:

==============  =====================================================  ===========================
family          model                                                  description file
==============  =====================================================  ===========================
classification  tests/registry/tiny_models.text_classifier             manifest.json (Manifest)
embeddings      all-MiniLM-L6-v2 (real weights), int8, zero-shot       manifest.json (SignedManifest)
anomaly         IsolationForest on sensor windows (skl2onnx)           slmfleet.json (RunSpec)
generation      llama-small seed, onnxruntime-genai builder            manifest.json (Manifest)
text2text       t5-small seed (hf_t5), when the exporter exists        slmfleet.json (RunSpec)
==============  =====================================================  ===========================

Bundles live under the session's base temp directory (``tmp_path_factory.getbasetemp()``), so every
test module of a session reuses them; a ``.done`` marker says a bundle is complete.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from wire.manifest import (
    DEFAULT_CHUNK_SIZE,
    Manifest,
    Postprocess,
    Preprocess,
    RunSpec,
    Task,
    describe_files,
)

FAMILIES = ("classification", "embeddings", "anomaly", "generation", "text2text")

ZERO_SHOT = {
    "maintenance": "a machine or pump needs repair or maintenance",
    "weather": "a report about the weather, rain, sun or temperature",
}


def write_manifest(root: Path, spec: RunSpec, model: str, version: int, variant: str) -> Manifest:
    """A manifest of every file in ``root`` (hashes, chunks) for ``spec``."""
    contents = {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        if path.name not in ("manifest.json", "slmfleet.json") or path.parent != root
    }
    files, chunks = describe_files(contents, DEFAULT_CHUNK_SIZE)
    manifest = Manifest(
        model=model,
        version=version,
        variant=variant,
        files=files,
        chunks=chunks,
        created_at=time.time(),
        **spec.model_dump(),
    )
    (root / "manifest.json").write_text(manifest.model_dump_json())
    return manifest


def _done(root: Path) -> bool:
    return (root / ".done").is_file()


def _mark(root: Path) -> Path:
    (root / ".done").write_text("ok")
    return root


def classification_bundle(cache: Path) -> Path:
    """The tiny text classifier (negative/positive) with a Manifest: ``tiny-sentiment`` v3 fp32."""
    from tests.registry.tiny_models import text_classifier
    from wire.manifest import IO, TensorInfo

    root = cache / "classification"
    if _done(root):
        return root
    text_classifier(root)
    (root / "config.json").unlink()
    spec = RunSpec(
        task=Task.TEXT_CLASSIFICATION,
        io=IO(
            inputs=[
                TensorInfo(name="input_ids", dtype="int64", shape=["batch", "seq"]),
                TensorInfo(name="attention_mask", dtype="int64", shape=["batch", "seq"]),
            ],
            outputs=[TensorInfo(name="logits", dtype="float32", shape=["batch", 2])],
        ),
        preprocess=Preprocess(tokenizer="tokenizer.json", max_length=64),
        postprocess=Postprocess(labels=["negative", "positive"], softmax=True),
    )
    write_manifest(root, spec, "tiny-sentiment", 3, "fp32")
    return _mark(root)


def embeddings_bundle(cache: Path) -> Path:
    """all-MiniLM-L6-v2 (real weights), int8, with zero-shot labels, as a SignedManifest."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from benchmarks.seeds.encoders import minilm_checkpoint
    from controller.registry.convert import export_hf
    from controller.registry.convert.quantize_int8 import quantize_int8
    from wire.signing import sign

    root = cache / "embeddings"
    if _done(root):
        return root
    fp32 = export_hf(minilm_checkpoint(), Task.EMBEDDINGS, cache / "minilm-fp32")
    int8 = quantize_int8(fp32, root)
    post = int8.spec.postprocess.model_copy(update={"zero_shot_labels": ZERO_SHOT})
    spec = int8.spec.model_copy(update={"postprocess": post})
    manifest = write_manifest(root, spec, "minilm", 1, "int8")
    signed = sign(manifest, Ed25519PrivateKey.generate())
    (root / "manifest.json").write_text(signed.model_dump_json())
    (cache / "minilm-fp32" / "slmfleet.json").write_text(fp32.spec.model_dump_json())
    return _mark(root)


def minilm_fp32_bundle(cache: Path) -> Path:
    """The fp32 export the int8 embeddings bundle was quantized from (a ``slmfleet.json`` bundle)."""
    embeddings_bundle(cache)
    return cache / "minilm-fp32"


def anomaly_bundle(cache: Path) -> Path:
    """An IsolationForest over 32-value sensor windows, described by a bare RunSpec (slmfleet.json)."""
    from benchmarks.seeds.encoders import build_anomaly_model

    root = cache / "anomaly"
    if _done(root):
        return root
    bundle = build_anomaly_model(root, kind="isolation-forest", n_train=1000)
    (root / "slmfleet.json").write_text(bundle.spec.model_dump_json())
    return _mark(root)


def generation_bundle(cache: Path) -> Path:
    """The llama-small seed built by onnxruntime-genai's model builder, with a Manifest."""
    from benchmarks.seeds import build_seed
    from controller.registry.convert import export_hf

    root = cache / "generation"
    if _done(root):
        return root
    checkpoint = build_seed("llama-small", cache / "llama-checkpoint", max_new_tokens=16)
    bundle = export_hf(checkpoint, Task.TEXT_GENERATION, root, runtime="onnxruntime-genai")
    write_manifest(root, bundle.spec, "tiny-llama", 1, "fp32")
    return _mark(root)


def text2text_bundle(cache: Path) -> Path:
    """The t5-small seed exported with hf_t5, described by a bare RunSpec (slmfleet.json)."""
    from benchmarks.seeds import build_seed
    from controller.registry.convert import export_hf

    root = cache / "text2text"
    if _done(root):
        return root
    checkpoint = build_seed("t5-small", cache / "t5-checkpoint", max_new_tokens=8)
    bundle = export_hf(checkpoint, Task.TEXT2TEXT, root)
    (root / "slmfleet.json").write_text(bundle.spec.model_dump_json())
    return _mark(root)


BUILDERS = {
    "classification": classification_bundle,
    "embeddings": embeddings_bundle,
    "anomaly": anomaly_bundle,
    "generation": generation_bundle,
    "text2text": text2text_bundle,
}


def build(family: str, cache: Path) -> Path:
    """The bundle of ``family`` under ``cache`` (built on first use)."""
    cache.mkdir(parents=True, exist_ok=True)
    return BUILDERS[family](cache)


def describe(root: Path) -> dict[str, object]:
    """The description file of a bundle, parsed (for assertions)."""
    for name in ("manifest.json", "slmfleet.json"):
        if (root / name).is_file():
            return json.loads((root / name).read_text())
    raise FileNotFoundError(root)
