"""Model size figures: parameters, MACs, FLOPs, file size, op counts.

MACs count Conv, ConvTranspose, Gemm and MatMul (attention matmuls too), their integer forms
(ConvInteger, QLinearConv, MatMulInteger, QLinearMatMul), and the input and recurrent matrix
products of LSTM, GRU and RNN at every step; bias excluded; FLOPs = 2 x MACs. Parameters are the
elements of floating-point initializers and of 8- and 4-bit integer ones (quantized weights).
"""

from __future__ import annotations

import collections
import dataclasses
import math

import onnx_ir as ir

from spa.graph import is_default_domain
from spa.shapes import concrete_shapes

_WEIGHT_TYPES = {
    ir.DataType.FLOAT,
    ir.DataType.FLOAT16,
    ir.DataType.BFLOAT16,
    ir.DataType.DOUBLE,
    ir.DataType.INT8,
    ir.DataType.UINT8,
    ir.DataType.INT4,
    ir.DataType.UINT4,
}
# Where the data and the weight are: the float ops and their integer (quantized) forms.
_CONVS = {"Conv": (0, 1), "ConvTranspose": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}
_MATMULS = {"MatMul", "MatMulInteger", "QLinearMatMul"}


@dataclasses.dataclass
class Counts:
    params: int
    macs: int
    ops: dict[str, int]
    file_bytes: int | None = None

    @property
    def flops(self) -> int:
        return 2 * self.macs


def count(model: ir.Model, input_shapes: dict[str, list[int]] | None = None, shapes=None) -> Counts:
    """Figures of `model`; `shapes` (value -> shape) stands in for shape inference, and for the
    initializers' own shapes when it has them (an estimate of a planned pruning)."""
    shapes = shapes if shapes is not None else concrete_shapes(model, input_shapes or {})
    params = sum(
        math.prod(shapes.get(v, v.const_value.shape))
        for v in model.graph.initializers.values()
        if v.const_value is not None and v.const_value.dtype in _WEIGHT_TYPES
    )
    macs = sum(node_macs(node, shapes) for node in model.graph)
    ops = collections.Counter(node.op_type for node in model.graph)
    return Counts(params=params, macs=macs, ops=dict(sorted(ops.items())))


def node_macs(node: ir.Node, shapes: dict[ir.Value, tuple[int, ...]]) -> int:
    """Multiply-accumulates of one node, 0 for ops that do not multiply matrices."""
    if not is_default_domain(node):
        return 0
    op = node.op_type
    out = shapes.get(node.outputs[0]) if node.outputs else None
    if op in _CONVS:
        data, weight = _CONVS[op]
        w = shapes.get(node.inputs[weight]) if len(node.inputs) > weight else None
        x = shapes.get(node.inputs[data])
        if w is None or out is None or x is None or len(w) < 3:
            return 0
        kernel = math.prod(w[2:])
        if op != "ConvTranspose":  # each output element reads in/groups channels x kernel
            return math.prod(out) * w[1] * kernel
        # each input element writes out/groups channels x kernel
        return math.prod(x) * w[1] * kernel
    if op == "Gemm":
        a = shapes.get(node.inputs[0])
        if a is None or out is None or len(a) != 2:
            return 0
        k = a[0] if node.attributes.get_int("transA", 0) else a[1]
        return math.prod(out) * k
    if op in _MATMULS:
        a = shapes.get(node.inputs[0])
        if a is None or out is None or not a:
            return 0
        return math.prod(out) * a[-1]
    if op in ("LSTM", "GRU", "RNN"):
        x, w, r = (shapes.get(v) if v is not None else None for v in node.inputs[:3])
        if x is None or w is None or r is None or len(x) != 3:
            return 0
        return x[0] * x[1] * (math.prod(w) + math.prod(r))  # steps x batch, whatever the layout
    return 0
