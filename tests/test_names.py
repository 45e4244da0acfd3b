"""Names spa generates are unique against the whole model and each other (spa.names)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphs import Graph, if_model
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.names import Names
from spa.normalize import SplitSharedVectors


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _graphs(sub)


def _assert_valid_and_unique(path) -> None:
    """Full checker, onnxruntime opens it, every node name and every value defined once."""
    onnx.checker.check_model(str(path), full_check=True)
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = onnx.load(str(path))
    nodes, values = collections.Counter(), collections.Counter()
    for graph in _graphs(model.graph):
        initializers = {i.name for i in graph.initializer}
        values.update(initializers)
        values.update(i.name for i in graph.input if i.name not in initializers)
        for node in graph.node:
            nodes.update([node.name] if node.name else [])
            values.update(o for o in node.output if o)
    assert [n for n, k in nodes.items() if k > 1] == []
    assert [v for v, k in values.items() if k > 1] == []


def _unnamed_matmuls(taken: bool) -> onnx.ModelProto:
    """x -> 3 x (MatMul, Relu), every node unnamed (onnx.helper's default) and no biases: the refit
    adds a bias Add after each MatMul. taken: the user already has a node called "_bias" and
    "MatMul_bias" and values called "W1_bias" and "h1_biased"."""
    rng = np.random.default_rng(0)
    dims = [16, 32, 32, 8]
    weights = [
        numpy_helper.from_array(rng.standard_normal((a, b)).astype(np.float32), f"W{i + 1}")
        for i, (a, b) in enumerate(zip(dims, dims[1:]))
    ]
    relu = ["W1_bias", "r2", "y"] if taken else ["r1", "r2", "y"]
    nodes, x = [], "x"
    for i in range(3):
        h = "h1_biased" if taken and i == 0 else f"h{i + 1}"
        name = ("_bias", "MatMul_bias", "")[i] if taken else ""
        nodes += [
            helper.make_node("MatMul", [x, f"W{i + 1}"], [h], name=name),
            helper.make_node("Relu", [h], [relu[i]]),
        ]
        x = relu[i]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 8])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("taken", [False, True])
@pytest.mark.parametrize("calibration", [None, "data"])
def test_unnamed_biasless_matmuls_prune_with_refit(tmp_path, taken, calibration):
    data = (
        np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
        if calibration
        else None
    )
    result = spa.prune(_unnamed_matmuls(taken), tmp_path / "out.onnx", ratio=0.5, calibration=data)
    # the refit added biases
    assert result.method.compensated and result.after.ops.get("Add", 0) >= 2
    _assert_valid_and_unique(tmp_path / "out.onnx")


def test_unnamed_nodes_that_the_surgery_and_normalization_copy(tmp_path):
    """tf2onnx's flatten (an int32 shape Concat cast to int64) twice, all nodes unnamed: normalize
    pushes each Cast into its Concat (new Casts and Concats), and the surgery gives each of the two
    Reshapes that share the first shape its own Concat."""
    g = Graph()
    a = g.op("Relu", g.conv("x", 8, 16))
    t = g.op("Transpose", a, perm=[0, 2, 3, 1])
    batch = g.op(
        "Slice",
        g.op("Cast", g.op("Shape", a), to=TensorProto.INT32),
        g.const(np.array([0], np.int32)),
        g.const(np.array([1], np.int32)),
    )

    def flat_shape() -> str:
        return g.op(
            "Cast",
            g.op("Concat", batch, g.const(np.array([6 * 6 * 16], np.int32)), axis=0),
            to=TensorProto.INT64,
        )

    shared, own = flat_shape(), flat_shape()
    heads = [
        g.op("MatMul", g.op("Reshape", source, shape), g.weight(6 * 6 * 16, 4))
        for source, shape in ((t, shared), (g.op("Neg", t), shared), (g.op("Sigmoid", t), own))
    ]
    g.op("Add", g.op("Add", heads[0], heads[1]), heads[2])
    g.nodes[-1].output[0] = "y"
    for node in g.nodes:
        node.name = ""
    model = g.model({"x": ["n", 8, 6, 6]}, {"y": ["n", 4]})
    result = spa.prune(model, tmp_path / "out.onnx", ratio=0.5, round_to=1, compensate=False)
    assert result.after.macs < result.before.macs
    _assert_valid_and_unique(tmp_path / "out.onnx")


def test_copies_of_a_shared_bias_take_names_no_value_has(tmp_path):
    """Two convs read one bias; another value already has the first name a copy would take."""
    g = Graph()
    bias = g.const(np.zeros(16, np.float32), "b")
    g.op("Conv", "x", g.weight(16, 8, 1, 1), bias)
    g.nodes[-1].output[0] = f"{bias}_1"
    c = g.op("Conv", g.op("Relu", f"{bias}_1"), g.weight(16, 16, 1, 1), bias)
    g.op("Conv", g.op("Relu", c), g.weight(4, 16, 1, 1))
    g.nodes[-1].output[0] = "y"
    model = ir.serde.deserialize_model(g.model({"x": [1, 8, 6, 6]}, {"y": [1, 4, 6, 6]}))
    assert SplitSharedVectors().change(model) == 1
    ir.save(model, tmp_path / "split.onnx")
    _assert_valid_and_unique(tmp_path / "split.onnx")


def test_names_are_collected_from_subgraphs_and_handed_out_once():
    names = Names(ir.serde.deserialize_model(if_model()))
    assert names.fresh("t") == "t_1"  # "t" is the then-branch's output
    assert names.fresh("t") == "t_2"
    assert names.fresh("new") == "new"
    assert names.fresh("new") == "new_1"
