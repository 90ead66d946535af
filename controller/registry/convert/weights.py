"""Where a graph keeps its weights, for the quantizers: Gemm layers made MatMul, and the share quantized.

torch exports GPT-2's ``Conv1D`` (and any ``addmm``) as ``Gemm``, which onnxruntime's dynamic int8 and
``MatMulNBits`` quantizers skip: an int4 GPT-2 export came out with only ``lm_head`` quantized (0.84x the
fp32 size). ``gemm_to_matmul`` rewrites every ``Gemm`` whose weight is a constant as ``MatMul`` (+ ``Add``
for the bias), which computes the same thing and which both quantizers cover. ``weight_fraction`` says
how much of the weights a variant holds quantized, so a variant that skipped layers shows it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def gemm_to_matmul(model: Any) -> int:
    """Rewrite, in place, each ``Gemm`` with a constant weight (alpha 1, transA 0) as ``MatMul`` + ``Add``.

    Returns how many were rewritten. A transposed weight (``transB``) is stored transposed once, so the
    graph does the same work as before. Gemms that scale (alpha, beta != 1) or transpose the input are left.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    rewritten = 0
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = initializers.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) >= 2 else None
        if (
            weight is None
            or attrs.get("transA", 0) != 0
            or float(attrs.get("alpha", 1.0)) != 1.0
            or float(attrs.get("beta", 1.0)) != 1.0
            or len(weight.dims) != 2
        ):
            nodes.append(node)
            continue
        w_name = weight.name
        if attrs.get("transB", 0):
            array = numpy_helper.to_array(weight).T.copy()
            w_name = weight.name + "_transposed" if consumers.get(weight.name, 0) > 1 else weight.name
            replacement = numpy_helper.from_array(array, w_name)
            if w_name == weight.name:
                graph.initializer.remove(weight)
            graph.initializer.append(replacement)
            initializers[w_name] = replacement
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
        onnx.checker.check_model(model, full_check=False)
    return rewritten


def weight_fraction(paths: list[Path]) -> float | None:
    """The share of the weight parameters of ``paths`` (graphs) stored quantized (int8/uint8, or 4-bit in
    ``MatMulNBits``), counting every initializer of at least 16 values (scales and zero points excluded)."""
    import onnx
    from onnx import helper

    quantized = floats = 0
    for path in paths:
        model = onnx.load(str(path), load_external_data=False)
        sizes = {t.name: (int(_numel(t.dims)), t.data_type) for t in model.graph.initializer}
        nbits_inputs: set[str] = set()
        for node in model.graph.node:
            if node.op_type == "MatMulNBits":
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                quantized += int(attrs.get("K", 0)) * int(attrs.get("N", 0))
                nbits_inputs |= set(node.input[1:])
        for name, (count, dtype) in sizes.items():
            if name in nbits_inputs or count < 16:
                continue
            if dtype in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
                quantized += count
            elif dtype in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
                floats += count
    total = quantized + floats
    return quantized / total if total else None


def _numel(dims: Any) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n
