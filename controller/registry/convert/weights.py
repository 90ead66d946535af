"""Where a graph keeps its weights, for the quantizers: Gemm layers made MatMul, and the share quantized.

torch exports GPT-2's ``Conv1D`` (and any ``addmm``) as ``Gemm``, which onnxruntime's dynamic int8 and
``MatMulNBits`` quantizers skip: an int4 GPT-2 export came out with only ``lm_head`` quantized (0.84x the
fp32 size). ``gemm_to_matmul`` rewrites every ``Gemm`` whose weight is a constant as ``MatMul`` (+ ``Add``
for the bias), which computes the same thing and which both quantizers cover. ``weight_fraction`` says
how much of the weights a variant holds quantized, so a variant that skipped layers shows it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def gemm_to_matmul(model: Any) -> int:
    """Rewrite, in place, each ``Gemm`` with a constant weight (alpha 1, transA 0) as ``MatMul`` + ``Add``.

    Returns how many were rewritten. Subgraphs are covered too: optimum's merged decoders
    (``decoder_model_merged.onnx``) hold every layer inside the two branches of an ``If``, with the weights
    as initializers of the outer graph. A transposed weight (``transB``) is stored transposed once, in the
    graph that holds it, so the graph does the same work as before. Gemms that scale (alpha, beta != 1) or
    transpose the input are left.
    """
    import onnx

    consumers: dict[str, int] = {}
    for graph in graphs_in(model.graph):
        for node in graph.node:
            for name in node.input:
                consumers[name] = consumers.get(name, 0) + 1
    rewritten = _rewrite_gemms(model.graph, [], consumers)
    if rewritten:
        onnx.checker.check_model(model, full_check=False)
    return rewritten


def _rewrite_gemms(graph: Any, outer: list[Any], consumers: dict[str, int]) -> int:
    """``gemm_to_matmul`` on ``graph`` and its subgraphs; ``outer`` are the enclosing graphs (innermost last)."""
    from onnx import helper, numpy_helper

    scopes = [*outer, graph]
    owners: dict[str, Any] = {}
    for scope in scopes:  # an inner name shadows an outer one, as onnxruntime resolves them
        owners.update({t.name: scope for t in scope.initializer})
    rewritten = inner = 0
    nodes = []
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                inner += _rewrite_gemms(sub, scopes, consumers)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        owner = owners.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) >= 2 else None
        weight = next((t for t in owner.initializer if t.name == node.input[1]), None) if owner else None
        if (
            owner is None
            or weight is None
            or attrs.get("transA", 0) != 0
            or float(attrs.get("alpha", 1.0)) != 1.0
            or float(attrs.get("beta", 1.0)) != 1.0
            or len(weight.dims) != 2
        ):
            nodes.append(node)
            continue
        w_name = weight.name
        if attrs.get("transB", 0):
            shared = consumers.get(weight.name, 0) > 1
            w_name = weight.name + "_transposed" if shared else weight.name
            if not any(t.name == w_name for t in owner.initializer) or not shared:
                replacement = numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), w_name)
                if not shared:
                    owner.initializer.remove(weight)
                owner.initializer.append(replacement)
                owners[w_name] = owner
        has_bias = len(node.input) >= 3 and node.input[2] != ""
        product = node.output[0] + "_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [product], name=(node.name or "gemm") + "_mm"))
        if has_bias:
            nodes.append(
                helper.make_node(
                    "Add", [product, node.input[2]], [node.output[0]], name=(node.name or "gemm") + "_bias"
                )
            )
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
    return rewritten + inner


def graphs_in(graph: Any) -> Iterator[Any]:
    """``graph`` and every subgraph in it (If branches, Loop and Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from graphs_in(attr.g)
            for sub in attr.graphs:
                yield from graphs_in(sub)


def weight_fraction(paths: list[Path]) -> float | None:
    """The share of the weight parameters of ``paths`` (graphs) stored quantized (int8/uint8, or 4-bit in
    ``MatMulNBits``), counting every initializer of at least 16 values (scales and zero points excluded),
    subgraphs included (a merged decoder's layers live in the branches of an ``If``; each weight counts once,
    however many branches use it)."""
    import onnx
    from onnx import helper

    quantized = floats = 0
    for path in paths:
        model = onnx.load(str(path), load_external_data=False)
        sizes: dict[str, tuple[int, int]] = {}
        nbits: dict[str, int] = {}
        for graph in graphs_in(model.graph):
            sizes |= {t.name: (int(_numel(t.dims)), t.data_type) for t in graph.initializer}
            for node in graph.node:
                if node.op_type == "MatMulNBits":
                    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                    nbits[node.input[1]] = int(attrs.get("K", 0)) * int(attrs.get("N", 0))
                    nbits |= {name: 0 for name in node.input[2:] if name not in nbits}
        quantized += sum(nbits.values())
        for name, (count, dtype) in sizes.items():
            if name in nbits or count < 16:
                continue
            if dtype in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
                quantized += count
            elif dtype in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
                floats += count
    total = quantized + floats
    return quantized / total if total else None


def external_locations(path: Path) -> set[str]:
    """The external-data files a graph refers to (relative to its directory), subgraphs and tensor
    attributes included."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations: set[str] = set()
    for graph in graphs_in(model.graph):
        tensors = list(graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                tensors += ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                locations |= {entry.value for entry in tensor.external_data if entry.key == "location"}
    return locations


def _numel(dims: Any) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n
