"""Small questions every stage asks of an onnx-ir graph: is a node a standard ONNX op, which
opset does the model use, a new constant value."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

DEFAULT_DOMAINS = ("", "ai.onnx")


def is_default_domain(node: ir.Node) -> bool:
    """A standard ONNX op (whose op_type alone says what it does)."""
    return node.domain in DEFAULT_DOMAINS


def opset_version(model: ir.Model, default: int | None = 1) -> int | None:
    """The default domain's opset, under either of its names."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", default))


QUANTIZED_OPS = (
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
)


def quantized_ops(model: ir.Model) -> list[str]:
    """The quantization ops in the main graph (QDQ pairs, integer convs and matmuls), sorted."""
    return sorted(
        {n.op_type for n in model.graph if is_default_domain(n) and n.op_type in QUANTIZED_OPS}
    )


def constant(name: str, array: np.ndarray) -> ir.Value:
    """A value that holds `array` (to register as an initializer)."""
    return ir.val(
        name,
        ir.DataType.from_numpy(array.dtype),
        array.shape,
        const_value=ir.tensor(array, name=name),
    )
