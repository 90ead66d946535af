"""Dynamic int8 quantization of every ONNX graph in a bundle (weights int8 per channel, activations at run time).

Works on any bundle layout: the encoders' ``model.onnx`` as well as the generation bundles'
``decoder.onnx`` / ``encoder.onnx``, with or without external data. Files that are not graphs (tokenizer,
configs) are copied; the fp32 external-data files are not, since the quantized graphs no longer need them.
Each quantized graph keeps its weights in an external-data file of its own (``model.onnx`` +
``model.onnx.data``), which onnxruntime memory-maps on the device.

Per-channel weights are not optional: on MiniLM per-tensor int8 drops the mean cosine to fp32 from 0.992
to 0.965. ``quant_pre_process`` and ORT's transformer optimizer are deliberately not used:
both fail on transformers-5 graphs.
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
from wire.manifest import Quantization

log = logging.getLogger(__name__)

#: Protobuf cannot serialise a single message of 2 GiB or more: larger graphs keep their weights outside.
_PROTOBUF_LIMIT = 2**31 - 1
#: Op types whose presence shows that quantize_dynamic found something to quantize.
_QUANTIZED_OPS = frozenset(
    {"MatMulInteger", "DynamicQuantizeLinear", "ConvInteger", "DynamicQuantizeMatMul", "DequantizeLinear"}
)


def quantize_int8(bundle: ExportedBundle, out_dir: Path, **options: Any) -> ExportedBundle:
    """An int8-dynamic copy of ``bundle`` in ``out_dir`` (every ``.onnx`` quantized, other files copied).

    Options: ``per_channel`` (True; False only to reproduce the per-tensor baseline), ``reduce_range``
    (False; 7-bit weights for CPUs without VNNI where u8s8 products can saturate), ``op_types_to_quantize``
    and ``nodes_to_exclude`` (passed through to onnxruntime).
    """
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    per_channel = bool(options.pop("per_channel", True))
    reduce_range = bool(options.pop("reduce_range", False))
    op_types = options.pop("op_types_to_quantize", None)
    nodes_to_exclude = options.pop("nodes_to_exclude", None)
    if options:
        raise ConversionError(f"unknown int8 options {sorted(options)}")
    if bundle.quantization.method != "none":
        raise ConversionError(
            f"bundle {bundle.root} is already quantized ({bundle.quantization.method}): quantize the fp32 export"
        )
    src = Path(bundle.root)
    out = Path(out_dir)
    if out.resolve() == src.resolve():
        raise ConversionError("quantize_int8 needs an out_dir other than the bundle's own directory")
    graphs = sorted(p for p in bundle.files() if p.suffix == ".onnx")
    if not graphs:
        raise ConversionError(f"bundle {src} has no .onnx file to quantize")
    out.mkdir(parents=True, exist_ok=True)

    external = set()
    for rel in graphs:
        external |= {(rel.parent / loc).as_posix() for loc in external_locations(src / rel)}
    for rel in bundle.files():
        if rel.suffix == ".onnx" or rel.as_posix() in external:
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, out / rel)

    started = time.perf_counter()
    quantized_any = False
    for rel in graphs:
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        big = _weights_bytes(src / rel) >= _PROTOBUF_LIMIT // 2
        source: Any = src / rel
        if not big:
            import onnx

            # Gemm layers (GPT-2's Conv1D) are invisible to quantize_dynamic: as MatMul they are covered
            model = onnx.load(str(src / rel))
            if gemm_to_matmul(model):
                source = model
        quantize_dynamic(
            source,
            target,
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=op_types,
            nodes_to_exclude=nodes_to_exclude,
            # The weights go to external data (``<graph>.data``, signed and hashed like every file of the
            # bundle): onnxruntime maps that file instead of copying it into its heap, so a Gather over the
            # word embeddings keeps only the rows it reads resident (agent.inference.mapped; MiniLM: -12 MiB).
            use_external_data_format=True,
            # optimum's merged decoders keep every layer inside the branches of an If (weights in the outer
            # graph): without this the int8 variant of a merged decoder quantized none of them
            extra_options={"EnableSubgraph": True},
        )
        if _has_quantized_ops(target):
            quantized_any = True
        else:
            log.info("int8: nothing in %s was quantized (no MatMul/Gather/Conv with constant weights)", rel)
        log.info("int8: %s %d -> %d bytes", rel, _weights_bytes(src / rel), _weights_bytes(target))
    seconds = time.perf_counter() - started
    if not quantized_any:
        # A copy named int8 would only be a bigger fp32 (the quantizer adds metadata): refuse it.
        raise ConversionError(
            "int8 quantizes nothing in this model: it has no MatMul, Gather or Conv with"
            " constant weights (tree ensembles, for example); keep the fp32 variant"
        )

    quantization = Quantization(
        method="int8-dynamic",
        per_channel=per_channel,
        tool=f"onnxruntime {onnxruntime.__version__}",
        weight_fraction=weight_fraction([out / rel for rel in graphs]),
    )
    extra = dict(bundle.extra)
    extra.update(
        {"quantize_seconds": round(seconds, 3), "reduce_range": reduce_range, "fp32_size_bytes": bundle.size_bytes}
    )
    keep = bundle.keep
    if keep is not None:
        # The device's files: the graphs, their new external data, and what was copied (not the fp32 weights).
        written = {(rel.parent / loc).as_posix() for rel in graphs for loc in external_locations(out / rel)}
        keep = sorted({p for p in keep if p not in external} | {rel.as_posix() for rel in graphs} | written)
    return replace(bundle, root=out, quantization=quantization, extra=extra, keep=keep)


def _weights_bytes(path: Path) -> int:
    """Bytes of a graph file plus its external data."""
    return path.stat().st_size + sum(
        (path.parent / loc).stat().st_size for loc in external_locations(path) if (path.parent / loc).is_file()
    )


def _has_quantized_ops(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(node.op_type in _QUANTIZED_OPS for graph in graphs_in(model.graph) for node in graph.node)
