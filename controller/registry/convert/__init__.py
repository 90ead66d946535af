"""Turning checkpoints into ONNX bundles, quantizing them, and measuring variants against fp32.

Needs the ``convert`` extra (torch, transformers, onnx) for Hugging Face
exports and int4 quantization; everything is imported lazily so the
controller runs without it. Never touches the network.

The pieces and who calls them:

* ``export_hf(checkpoint_dir, task, out_dir)`` -> ExportedBundle (fp32 reference)
  - encoders (classification, embeddings): ``hf_encoders``
  - decoders (text-generation) and T5 (text2text): ``hf_decoders``, ``hf_t5``
* ``quantize(bundle, method, out_dir)`` -> ExportedBundle of the variant
  - ``int8-dynamic`` (per-channel, every family): ``quantize_int8``
  - ``int4-weight-only`` (decoders): ``quantize_int4``
* ``evaluate(reference, candidate, samples)`` -> ``wire.manifest.Metrics``
  - encoders and anomaly: ``evaluate_encoders``; generation: ``evaluate_generation``
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wire.manifest import Metrics, Quantization, RunSpec, Task


class ConversionError(Exception):
    """A checkpoint or bundle cannot be converted; the message says why and what to do."""


@dataclass
class ExportedBundle:
    """A directory of files plus how to run them."""

    root: Path
    spec: RunSpec
    quantization: Quantization = field(default_factory=Quantization)
    #: model-card facts worth keeping in the manifest (architecture, parameter count, source)
    extra: dict[str, Any] = field(default_factory=dict)
    #: the files the device needs (relative paths); None: every file under ``root``
    keep: list[str] | None = None

    def files(self) -> list[Path]:
        """The bundle's files (those in ``keep``, when set) that exist, relative to ``root``, sorted."""
        if self.keep is not None:
            return sorted(Path(p) for p in self.keep if (self.root / p).is_file())
        return sorted(p.relative_to(self.root) for p in self.root.rglob("*") if p.is_file())

    @property
    def size_bytes(self) -> int:
        return sum((self.root / p).stat().st_size for p in self.files())


def export_hf(checkpoint_dir: Path, task: Task, out_dir: Path, **options: Any) -> ExportedBundle:
    """Export a local Hugging Face checkpoint directory to an fp32 ONNX bundle for ``task``."""
    if task in (Task.TEXT_CLASSIFICATION, Task.EMBEDDINGS):
        from controller.registry.convert.hf_encoders import export_encoder

        return export_encoder(checkpoint_dir, task, out_dir, **options)
    if task == Task.TEXT_GENERATION:
        from controller.registry.convert.hf_decoders import export_decoder

        return export_decoder(checkpoint_dir, out_dir, **options)
    if task == Task.TEXT2TEXT:
        from controller.registry.convert.hf_t5 import export_t5

        return export_t5(checkpoint_dir, out_dir, **options)
    raise ConversionError(f"no Hugging Face export for task {task.value}; anomaly models are imported as ONNX")


def quantize(bundle: ExportedBundle, method: str, out_dir: Path, **options: Any) -> ExportedBundle:
    """A quantized copy of ``bundle`` in ``out_dir``."""
    if method == "int8-dynamic" and bundle.spec.runtime == "onnxruntime-genai" and bundle.extra.get("checkpoint"):
        # the model builder's own 8-bit graph is faster and closer to fp32 than dynamic int8 on its graph
        from controller.registry.convert.quantize_int4 import quantize_genai

        return quantize_genai(bundle, "int8", out_dir, **options)
    if method == "int8-dynamic":
        from controller.registry.convert.quantize_int8 import quantize_int8

        return quantize_int8(bundle, out_dir, **options)
    if method == "int4-weight-only":
        from controller.registry.convert.quantize_int4 import quantize_int4

        return quantize_int4(bundle, out_dir, **options)
    raise ConversionError(f"unknown quantization {method!r}: use int8-dynamic or int4-weight-only")


def evaluate(
    reference: ExportedBundle, candidate: ExportedBundle, samples: list[dict[str, Any]] | None = None
) -> Metrics:
    """Agreement of ``candidate`` with ``reference`` on ``samples`` (generated when None), plus latency and memory."""
    if reference.spec.task in (Task.TEXT_GENERATION, Task.TEXT2TEXT):
        from controller.registry.convert.evaluate_generation import evaluate_generation

        return evaluate_generation(reference, candidate, samples)
    from controller.registry.convert.evaluate_encoders import evaluate_encoder

    return evaluate_encoder(reference, candidate, samples)
