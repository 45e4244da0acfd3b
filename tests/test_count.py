"""The counter against numbers worked out by hand, and the estimate of a plan against the
surgery."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import Graph

import spa
from spa import analysis, apply, count, io, normalize, plan, score


def counts(model) -> count.Counts:
    m = ir.serde.deserialize_model(model)
    normalize.normalize(m)
    return count.count(m)


def test_conv_macs_and_params():
    g = Graph()
    g.op("Conv", "x", g.weight(4, 3, 3, 3), g.const(np.zeros(4, np.float32)), pads=[1, 1, 1, 1])
    g.nodes[-1].output[0] = "y"
    c = counts(g.model({"x": [1, 3, 8, 8]}, {"y": [1, 4, 8, 8]}))
    assert c.macs == 4 * 8 * 8 * 3 * 3 * 3  # output elements x (in/groups) x kernel = 6912
    assert c.flops == 2 * 6912
    assert c.params == 4 * 3 * 3 * 3 + 4


def test_grouped_strided_conv_and_conv_transpose():
    g = Graph()
    # (1,8,4,4)
    h = g.op("Conv", "x", g.weight(8, 2, 3, 3), group=4, strides=[2, 2], pads=[1, 1, 1, 1])
    g.op("ConvTranspose", h, g.weight(8, 3, 2, 2), strides=[2, 2])  # (1,3,8,8)
    g.nodes[-1].output[0] = "y"
    c = counts(g.model({"x": [1, 8, 8, 8]}, {"y": [1, 3, 8, 8]}))
    conv = (8 * 4 * 4) * 2 * 9  # 2304
    transposed = (8 * 4 * 4) * 3 * 4  # each input element writes out/groups x kernel: 1536
    assert c.macs == conv + transposed


@pytest.mark.parametrize("op,gates", [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_recurrent_macs_count_every_step(op, gates):
    """Per step and batch row: gates x hidden x (input + hidden), both directions."""
    g = Graph()
    steps, batch, size, hidden = 5, 2, 6, 4
    g.op(
        op,
        "x",
        g.weight(2, gates * hidden, size),
        g.weight(2, gates * hidden, hidden),
        hidden_size=hidden,
        direction="bidirectional",
    )
    g.nodes[-1].output[0] = "y"
    c = counts(g.model({"x": [steps, batch, size]}, {"y": [steps, 2, batch, hidden]}))
    assert c.macs == steps * batch * 2 * gates * hidden * (size + hidden)


def test_gemm_and_batched_matmul():
    g = Graph()
    g.op("Gemm", "x", g.weight(6, 5), transB=1)  # (2,5) x (5,6)
    g.nodes[-1].output[0] = "h"
    g.op("MatMul", "a", "b")
    g.nodes[-1].output[0] = "y"
    c = counts(
        g.model({"x": [2, 5], "a": [3, 4, 7], "b": [3, 7, 2]}, {"h": [2, 6], "y": [3, 4, 2]})
    )
    assert c.macs == 2 * 6 * 5 + 3 * 4 * 2 * 7
    assert c.params == 30


def test_symbolic_batch_counts_as_one():
    g = Graph()
    g.op("Conv", "x", g.weight(4, 3, 1, 1))
    g.nodes[-1].output[0] = "y"
    c = counts(g.model({"x": ["N", 3, 2, 2]}, {"y": ["N", 4, 2, 2]}))
    assert c.macs == 4 * 2 * 2 * 3


@pytest.mark.parametrize("name", ["mobilenetv2_dynamo", "shufflenet_legacy", "densenet_legacy"])
def test_estimate_of_a_plan_equals_the_counts_after_surgery(name):
    m = io.load(f"models/torch/{name}.onnx")
    normalize.normalize(m)
    a = analysis.analyze(m)
    p = plan.make_plan(a, score.score(a), 0.4, 8)
    estimate = count.count(m, shapes=apply.pruned_shapes(a, p.removed))
    apply.apply(a, p.removed)
    real = count.count(m)
    assert (estimate.macs, estimate.params) == (real.macs, real.params)


def _quantized_conv() -> onnx.ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear -> Conv whose int8 weight is dequantized: the QDQ
    form onnxruntime's static quantization writes; and the same conv as a ConvInteger."""
    h = onnx.helper
    w = onnx.numpy_helper.from_array(np.ones((8, 3, 3, 3), np.int8), "w_q")
    scale, zero = (
        onnx.numpy_helper.from_array(np.float32(0.1), "s"),
        onnx.numpy_helper.from_array(np.int8(0), "z"),
    )
    nodes = [
        h.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        h.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        h.make_node("DequantizeLinear", ["w_q", "s", "z"], ["w"]),
        h.make_node("Conv", ["xd", "w"], ["y"], pads=[1, 1, 1, 1]),
        h.make_node("ConvInteger", ["xq", "w_q"], ["yi"], pads=[1, 1, 1, 1]),
    ]
    graph = h.make_graph(
        nodes,
        "q",
        [h.make_tensor_value_info("x", 1, [1, 3, 8, 8])],
        [
            h.make_tensor_value_info("y", 1, [1, 8, 8, 8]),
            h.make_tensor_value_info("yi", onnx.TensorProto.INT32, [1, 8, 8, 8]),
        ],
        [w, scale, zero],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])


def test_quantized_weights_count_as_params_and_integer_convs_as_macs():
    counts = count.count(ir.serde.deserialize_model(_quantized_conv()))
    assert counts.params >= 8 * 3 * 3 * 3
    assert counts.macs == 2 * 8 * 8 * 8 * 3 * 3 * 3  # the Conv and the ConvInteger


def test_a_quantized_model_is_refused_with_the_order_that_works():
    with pytest.raises(
        spa.SpaError,
        match="quantized .*ConvInteger.*DequantizeLinear.*Prune the float model, then quantize",
    ):
        spa.prune(_quantized_conv())
