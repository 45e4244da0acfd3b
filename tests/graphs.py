"""A small builder for op-level test graphs with random weights."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Graph:
    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def const(self, array, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, *shape: int) -> str:
        return self.const(self.rng.standard_normal(shape).astype(np.float32) * 0.5, "w")

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outs, name=self.name(op_type + "_"), **attrs)
        )
        return outs[0] if outputs == 1 else outs

    def conv(
        self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = True
    ) -> str:
        ins = [x, self.weight(cout, cin // group, k, k)] + (
            [self.const(self.rng.standard_normal(cout).astype(np.float32))] if bias else []
        )
        return self.op("Conv", *ins, pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [
            r.uniform(0.5, 1.5, c),
            r.standard_normal(c),
            r.standard_normal(c) * 0.1,
            r.uniform(0.5, 2, c),
        ]
        return self.op("BatchNormalization", x, *[self.const(p.astype(np.float32)) for p in params])

    def gemm(self, x: str, k: int, n: int) -> str:
        return self.op(
            "Gemm",
            x,
            self.weight(n, k),
            self.const(self.rng.standard_normal(n).astype(np.float32)),
            transB=1,
        )

    def model(
        self, inputs: dict[str, list], outputs: dict[str, list], opset: int = 17
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "test",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        onnx.checker.check_model(model, full_check=True)
        return model


def if_model() -> onnx.ModelProto:
    """conv -> If(both branches read the conv output) -> conv; and a second, plain conv chain."""
    g = Graph()
    a = g.op("Relu", g.conv("x", 3, 16))
    then_graph = helper.make_graph(
        [helper.make_node("Relu", [a], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", 1, None)],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", [a], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", 1, None)],
    )
    g.nodes.append(
        helper.make_node(
            "If", ["cond"], ["branch"], then_branch=then_graph, else_branch=else_graph, name="if"
        )
    )
    b = g.conv("branch", 16, 4)
    c = g.conv(g.op("Relu", g.conv("x", 3, 16)), 16, 4)
    g.op("Add", b, c)
    g.nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        g.nodes,
        "m",
        [
            helper.make_tensor_value_info("x", 1, [1, 3, 6, 6]),
            helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", 1, [1, 4, 6, 6])],
        g.inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
