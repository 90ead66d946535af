"""int4 weight-only quantization of generation bundles, and the genai builder's int8/int4 variants.

* onnxruntime bundles (traced decoders, T5): every ``.onnx`` goes through onnxruntime's
  ``MatMulNBitsQuantizer`` (4 bits, blocks of 32, symmetric): each MatMul with a constant weight
  becomes a ``MatMulNBits``. The embedding ``Gather`` stays fp32 (unless ``quantize_gather``), so an
  int4 file can be larger than the int8 one; only generation gets faster.
* onnxruntime-genai bundles: the model builder quantizes while it builds, so the variant is built
  again from the checkpoint (``ExportedBundle.extra["checkpoint"]``) with ``-p int4``; a genai folder
  uploaded without its checkpoint gets the MatMulNBits pass above (onnxruntime-genai runs it too).
  ``quantize_genai(bundle, "int8", out)`` builds the builder's int8 (8-bit MatMulNBits). The generic
  ``quantize_int8`` (dynamic, MatMulInteger) also works on the builder's graphs; the builder's int8
  measured faster and closer to fp32 on the llama-small and phi-small seeds.

``accuracy_level`` 4 (int8 activations inside ``MatMulNBits``) is the builder's CPU default and the
fastest on CPUs; 0 keeps fp32 activations.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from controller.registry.convert import ConversionError, ExportedBundle
from controller.registry.convert.weights import external_locations, gemm_to_matmul, graphs_in, weight_fraction
from wire.manifest import Quantization, Runtime

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 4
#: Protobuf cannot hold 2 GiB in one message: bigger graphs keep their weights in external data.
_PROTOBUF_LIMIT = 2**31 - 1


def quantize_int4(bundle: ExportedBundle, out_dir: Path, **options: Any) -> ExportedBundle:
    """An int4 weight-only copy of ``bundle`` in ``out_dir``.

    Options: ``block_size`` (32), ``accuracy_level`` (4), ``symmetric`` (True), ``quantize_gather``
    (False: also int4 the embedding Gather, smaller files, needs opset 21), ``nodes_to_exclude``.
    onnxruntime-genai bundles accept ``block_size`` and ``accuracy_level`` only.
    """
    if bundle.quantization.method != "none":
        raise ConversionError(
            f"bundle {bundle.root} is already quantized ({bundle.quantization.method}): quantize the fp32 export"
        )
    if bundle.spec.runtime == Runtime.ONNXRUNTIME_GENAI and _checkpoint_of(bundle) is not None:
        return quantize_genai(bundle, "int4", out_dir, **options)
    # An uploaded onnxruntime-genai folder has no checkpoint to build from: its graph is quantized in
    # place like any other (MatMulNBits runs in onnxruntime-genai as well), genai_config.json is kept.
    return _quantize_graphs(bundle, Path(out_dir), **options)


def quantize_genai(bundle: ExportedBundle, precision: str, out_dir: Path, **options: Any) -> ExportedBundle:
    """Build an onnxruntime-genai bundle again at ``precision`` ("int4" or "int8") from its checkpoint."""
    from controller.registry.convert.hf_decoders import build_genai

    if bundle.spec.runtime != Runtime.ONNXRUNTIME_GENAI:
        raise ConversionError("quantize_genai is for onnxruntime-genai bundles; use quantize_int8 or quantize_int4")
    if precision not in ("int4", "int8"):
        raise ConversionError(f"unknown genai precision {precision!r}: use int4 or int8")
    checkpoint = _checkpoint_of(bundle)
    if checkpoint is None:
        raise ConversionError(
            f"the onnxruntime-genai bundle {bundle.root} does not name its checkpoint (extra['checkpoint']) or it "
            "is gone: the builder quantizes while it builds, so it needs the checkpoint again"
        )
    block_size = int(options.pop("block_size", DEFAULT_BLOCK_SIZE))
    accuracy_level = int(options.pop("accuracy_level", DEFAULT_ACCURACY_LEVEL))
    if options:
        raise ConversionError(f"unknown options for a genai {precision} build: {sorted(options)}")
    started = time.perf_counter()
    built = build_genai(
        checkpoint,
        Path(out_dir),
        precision,
        max_new_tokens=bundle.spec.generation.max_new_tokens if bundle.spec.generation else None,
        extra_options={"block_size": block_size, "accuracy_level": accuracy_level},
    )
    extra = dict(bundle.extra) | built.extra
    extra |= {"quantize_seconds": round(time.perf_counter() - started, 3), "fp32_size_bytes": bundle.size_bytes}
    quantization = built.quantization.model_copy(update={"block_size": block_size})
    return replace(built, quantization=quantization, extra=extra)


def _checkpoint_of(bundle: ExportedBundle) -> Path | None:
    """The checkpoint a bundle was exported from, if the bundle says and it is still there."""
    checkpoint = bundle.extra.get("checkpoint")
    return Path(checkpoint) if checkpoint and Path(checkpoint).is_dir() else None


def _quantize_graphs(bundle: ExportedBundle, out: Path, **options: Any) -> ExportedBundle:
    import onnx
    import onnxruntime
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    block_size = int(options.pop("block_size", DEFAULT_BLOCK_SIZE))
    accuracy_level = int(options.pop("accuracy_level", DEFAULT_ACCURACY_LEVEL))
    symmetric = bool(options.pop("symmetric", True))
    quantize_gather = bool(options.pop("quantize_gather", False))
    nodes_to_exclude = list(options.pop("nodes_to_exclude", None) or [])
    if options:
        raise ConversionError(f"unknown int4 options {sorted(options)}")
    src = Path(bundle.root)
    if out.resolve() == src.resolve():
        raise ConversionError("quantize_int4 needs an out_dir other than the bundle's own directory")
    graphs = [p for p in bundle.files() if p.suffix == ".onnx"]
    if not graphs:
        raise ConversionError(f"bundle {src} has no .onnx file to quantize")
    out.mkdir(parents=True, exist_ok=True)
    external: set[str] = set()
    for rel in graphs:
        external |= {(rel.parent / loc).as_posix() for loc in external_locations(src / rel)}
    for rel in bundle.files():
        # The fp32 external data is not needed by the quantized graphs, which hold their weights.
        if rel.suffix == ".onnx" or rel.as_posix() in external:
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, out / rel)

    started = time.perf_counter()
    op_types = ("MatMul", "Gather") if quantize_gather else ("MatMul",)
    for rel in graphs:
        model = onnx.load(str(src / rel))
        # Gemm layers (GPT-2's Conv1D) are invisible to MatMulNBits: as MatMul they are covered
        gemm_to_matmul(model)
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=4,
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level,
            nodes_to_exclude=nodes_to_exclude,
            op_types_to_quantize=op_types,
        )
        quantizer.process()
        quantized = quantizer.model.model
        replaced = sum(1 for g in graphs_in(quantized.graph) for node in g.node if node.op_type == "MatMulNBits")
        if not replaced:
            log.warning("int4: nothing in %s was quantized (no MatMul with a constant 2-D weight)", rel)
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        big = quantized.ByteSize() >= _PROTOBUF_LIMIT
        if big:
            onnx.save(quantized, str(target), save_as_external_data=True, location=target.name + ".data")
        else:
            onnx.save(quantized, str(target))
        log.info("int4: %s: %d MatMul -> MatMulNBits, %d bytes", rel, replaced, target.stat().st_size)
    seconds = time.perf_counter() - started

    quantization = Quantization(
        method="int4-weight-only",
        block_size=block_size,
        tool=f"onnxruntime {onnxruntime.__version__} MatMulNBitsQuantizer (accuracy_level {accuracy_level})",
        weight_fraction=weight_fraction([out / rel for rel in graphs]),
    )
    extra = dict(bundle.extra)
    extra |= {
        "quantize_seconds": round(seconds, 3),
        "fp32_size_bytes": bundle.size_bytes,
        "int4_accuracy_level": accuracy_level,
        "int4_symmetric": symmetric,
        "int4_gather": quantize_gather,
    }
    spec = bundle.spec
    return replace(bundle, root=out, spec=spec, quantization=quantization, extra=extra)
