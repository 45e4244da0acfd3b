"""Run one ONNX node on numpy arrays, with onnx's reference evaluator.

Normalization uses it to fold constant subgraphs; the analysis uses it to move tensors of channel
labels through data-movement ops, so that every op's exact semantics come from one implementation.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator


def run_node(node: ir.Node, inputs: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """Evaluate `node` (default domain) on `inputs`; None stands for an omitted optional input."""
    proto = ir.serde.serialize_node(node)
    names = [f"in{i}" if x is not None else "" for i, x in enumerate(inputs)]
    del proto.input[:]
    proto.input.extend(names)
    outs = [f"out{i}" if o.name else "" for i, o in enumerate(node.outputs)]
    del proto.output[:]
    proto.output.extend(outs)
    graph = onnx.helper.make_graph(
        [proto],
        "node",
        [_value_info(n, x) for n, x in zip(names, inputs) if x is not None],
        [
            onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None)
            for n in outs
            if n
        ],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    feeds = {n: x for n, x in zip(names, inputs) if x is not None}
    results = ReferenceEvaluator(model).run(None, feeds)
    return [np.asarray(r) for r in results]


def _value_info(name: str, array: np.ndarray) -> onnx.ValueInfoProto:
    dtype = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    return onnx.helper.make_tensor_value_info(name, dtype, array.shape)
