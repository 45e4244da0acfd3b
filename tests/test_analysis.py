"""The analysis as a whole: which channels it lets go, and that every run-time read of a channel
count either follows the pruning exactly or pins those channels."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import Graph
from onnx import TensorProto, helper
from pins import unexplained

import spa


def _channel_count_reader(g: Graph, h: str, how: str) -> str:
    """A float tensor computed at run time from h's channel count (16), as exporters write it."""
    as_float = lambda v: g.op("Cast", v, to=TensorProto.FLOAT)  # noqa: E731
    if how == "size":
        return as_float(g.op("Size", h))
    if how == "shape_start_end":  # torch dynamo's x.size(1)
        return as_float(g.op("Shape", h, start=1, end=2))
    if how == "reduceprod_shape":
        return as_float(g.op("ReduceProd", g.op("Shape", h), keepdims=0))
    if how == "reducesum_constantofshape":
        ones = g.op(
            "ConstantOfShape",
            g.op("Shape", h),
            value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
        )
        return g.op("ReduceSum", ones, keepdims=0)
    if how == "gather_shape":
        return as_float(g.op("Gather", g.op("Shape", h), g.const(np.array(1, np.int64))))
    if how == "range_size":  # arithmetic on a shape vector that ends up as data
        count = g.op("Gather", g.op("Shape", h), g.const(np.array(1, np.int64)))
        steps = g.op("Range", g.const(np.array(0, np.int64)), count, g.const(np.array(1, np.int64)))
        return as_float(g.op("ReduceSum", steps, keepdims=0))
    if how == "shape_arithmetic":
        count = g.op("Gather", g.op("Shape", h), g.const(np.array(1, np.int64)))
        return as_float(
            g.op(
                "Add",
                g.op("Mul", count, g.const(np.array(3, np.int64))),
                g.const(np.array(1, np.int64)),
            )
        )
    raise ValueError(how)


READERS = [
    "size",
    "shape_start_end",
    "reduceprod_shape",
    "reducesum_constantofshape",
    "gather_shape",
    "range_size",
    "shape_arithmetic",
]


def _divided_by_channel_count(how: str, batch) -> onnx.ModelProto:
    """Conv 8->16, Relu, h / f(h) where f reads h's channel count at run time, then a Conv."""
    g = Graph()
    h = g.op("Relu", g.conv("x", 8, 16))
    scaled = g.op("Div", h, _channel_count_reader(g, h, how))
    g.conv(scaled, 16, 4)
    g.nodes[-1].output[0] = "y"
    return g.model({"x": [batch, 8, 6, 6]}, {"y": [batch, 4, 6, 6]})


@pytest.mark.parametrize("batch", [1, "N"], ids=["static", "dynamic"])
@pytest.mark.parametrize("how", READERS)
def test_a_channel_count_read_at_run_time_never_silently_changes(how, batch):
    model = _divided_by_channel_count(how, batch)
    error, removed = spa.zero_channel_check(model, ratio=0.5)
    assert error <= 1e-5, f"removing all-zero channels changed the outputs by {error}"
    result = spa.prune(model, ratio=0.5, round_to=1, importance="l2")
    # then exact; else the removed weights were live
    nothing_removed = len(result.plan.removed) == 0
    assert result.verdict.deviation.exact is (True if nothing_removed else None)


@pytest.mark.parametrize("how", ["size", "shape_start_end"])
def test_pinned_channel_counts_say_why(how):
    analysis = spa.analyze(_divided_by_channel_count(how, "N"))
    assert any("channel count" in b.reason for b in analysis.barriers), [
        b.reason for b in analysis.barriers
    ]


def test_a_fill_sized_by_the_channels_carries_them_into_its_sum():
    """ConstantOfShape(Shape(h)) holds h's channels; summing it over them is a statistic of theirs
    (the channels stay, listed among the normalizations)."""
    analysis = spa.analyze(_divided_by_channel_count("reducesum_constantofshape", "N"))
    assert [(n.op, n.channels) for n in analysis.normalizations] == [("ReduceSum", 16)]


def test_a_shape_that_only_feeds_a_following_reshape_still_prunes():
    """Reshape(h, Shape(h)) follows the pruning by itself: nothing pinned."""
    g = Graph()
    h = g.op("Relu", g.conv("x", 8, 16))
    same = g.op("Reshape", g.op("Neg", h), g.op("Shape", h))
    g.conv(same, 16, 4)
    g.nodes[-1].output[0] = "y"
    model = g.model({"x": ["N", 8, 6, 6]}, {"y": ["N", 4, 6, 6]})
    assert [grp.width for grp in spa.analyze(model).groups] == [16]
    error, removed = spa.zero_channel_check(model, ratio=0.5)
    assert removed and error <= 1e-5


def test_a_reshape_of_another_tensor_by_a_channel_count_pins_it():
    """Reshape(t, [Shape(h)[1], -1]) with t unlabelled: h's channel count reshapes t."""
    g = Graph()
    h = g.op("Relu", g.conv("x", 8, 16))
    count = g.op("Shape", h, start=1, end=2)  # not folded: the batch is dynamic
    shape = g.op("Concat", count, g.const(np.array([-1], np.int64)), axis=0)
    table = g.op("Reshape", g.const(np.arange(96, dtype=np.float32).reshape(1, 96)), shape)
    row_maxima = g.op("ReduceMax", table, axes=[1], keepdims=0)  # 16 rows of 6, or 8 rows of 12
    g.op(
        "Add",
        g.op("ReduceSum", row_maxima, keepdims=0),
        g.op("ReduceSum", g.conv(h, 16, 4), keepdims=0),
    )
    g.nodes[-1].output[0] = "y"
    model = g.model({"x": ["N", 8, 6, 6]}, {"y": []})
    error, _ = spa.zero_channel_check(model, ratio=0.5)
    assert error <= 1e-5


def test_a_channel_count_on_an_axis_without_channels_pins_it():
    """Reshape(x2, [N, 4, Shape(h)[1], -1]): x2's own channels stay on axis 1 and follow, but axis 2
    is sized by h's channel count."""
    g = Graph()
    h = g.op("Relu", g.conv("x", 8, 16))
    x2 = g.conv("x", 8, 4, k=1)
    shape = g.op(
        "Concat",
        g.op("Shape", x2, start=0, end=2),
        g.op("Shape", h, start=1, end=2),
        g.const(np.array([-1], np.int64)),
        axis=0,
    )
    grid = g.op("Reshape", x2, shape)  # [N, 4, 16, 1], or [N, 4, 8, 2] with 8 channels of h
    g.op(
        "ReduceSum",
        g.op("ReduceMax", grid, axes=[3], keepdims=0),
        g.const(np.array([2], np.int64)),
        keepdims=0,
    )
    g.nodes[-1].output[0] = "y2"
    g.conv(h, 16, 4)
    g.nodes[-1].output[0] = "y"
    model = g.model({"x": ["N", 8, 4, 4]}, {"y": ["N", 4, 4, 4], "y2": ["N", 4]})
    error, _ = spa.zero_channel_check(model, ratio=0.5)
    assert error <= 1e-5


def test_verification_refuses_a_model_whose_zero_channels_moved_the_outputs(monkeypatch, tmp_path):
    """The safety net under the analysis: with the pinning switched off, the all-zero channels
    that a run-time Size reads are removed, the outputs move, and nothing is written."""
    from spa.analysis import Propagation
    from spa.errors import SpaError

    model = _divided_by_channel_count("size", "N")
    zeroed = _zero_upper_half(model)
    monkeypatch.setattr(Propagation, "_pin_channel_count_reads", lambda self: None)
    out = tmp_path / "pruned.onnx"
    with pytest.raises(SpaError, match="all zero, yet the outputs moved"):
        spa.prune(zeroed, out, ratio=0.5, round_to=1, importance="l2")
    assert not out.exists()
    monkeypatch.undo()
    result = spa.prune(zeroed, out, ratio=0.5, round_to=1, importance="l2")
    assert result.verdict.deviation.exact and result.verdict.deviation.relative_error <= 1e-6


def _zero_upper_half(model: onnx.ModelProto) -> onnx.ModelProto:
    """Zero channels 8-15 of the first conv (weights and bias) and the next conv's columns."""
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    inits = {i.name: i for i in model.graph.initializer}
    for name, axis in ((convs[0].input[1], 0), (convs[0].input[2], 0), (convs[1].input[1], 1)):
        array = numpy_helper.to_array(inits[name]).copy()
        np.moveaxis(array, axis, 0)[8:] = 0
        inits[name].CopyFrom(numpy_helper.from_array(array, name))
    return model


def test_the_cli_reports_how_far_the_outputs_moved(tmp_path, capsys):
    import json

    from spa.cli import main

    source, out, report = tmp_path / "m.onnx", tmp_path / "p.onnx", tmp_path / "r.json"
    onnx.save(_zero_upper_half(_divided_by_channel_count("gather_shape", "N")), source)
    assert (
        main(
            [
                "prune",
                str(source),
                str(out),
                "--importance",
                "l2",
                "--round-to",
                "1",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    assert "outputs moved by" in capsys.readouterr().out
    deviation = json.loads(report.read_text())["verify"]["deviation"]
    assert (
        deviation["exact"] is True
        and deviation["relative_error"] <= 1e-6
        and not deviation["likely_broken"]
    )


def test_a_shape_read_of_a_value_of_unknown_shape_is_analyzed():
    """Shape(custom_op(h)): nothing is known of the custom op's output, so there is no channel axis
    to pin through it (found by the fuzzer: the analysis crashed on the unknown rank)."""
    g = Graph()
    h = g.op("Relu", g.conv("x", 8, 16))
    g.nodes.append(helper.make_node("Foo", [h], ["opaque"], domain="test.custom", name="foo"))
    g.op("Cast", g.op("Shape", "opaque"), to=TensorProto.FLOAT)
    g.nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        g.nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        g.inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("test.custom", 1)]
    )
    analysis = spa.analyze(model)
    assert any(b.op == "test.custom::Foo" for b in analysis.barriers)


@pytest.mark.parametrize("how", ["input", "max"])
def test_channels_an_op_keeps_are_listed_with_the_reason(how):
    """Every channel that stays says why: here a residual add with a graph input (it cannot lose
    channels) or a max taken across the channels, and the graph's output."""
    g = Graph()
    h = g.op("Relu", g.conv("x", 8, 16))
    kept = g.op("Add", h, "skip") if how == "input" else g.op("ReduceMax", h, axes=[1])
    g.conv(kept, 16 if how == "input" else 1, 4)
    g.nodes[-1].output[0] = "y"
    inputs = (
        {"x": ["N", 8, 6, 6], "skip": ["N", 16, 6, 6]} if how == "input" else {"x": [1, 8, 6, 6]}
    )
    analysis = spa.analyze(g.model(inputs, {"y": [inputs["x"][0], 4, 6, 6]}))
    assert not analysis.groups  # h's channels stay; y's are the graph's output
    reason = {"input": "does not follow them", "max": "works across them"}[how]
    assert [(k.op, reason in k.reason) for k in analysis.kept] == [
        ("Add" if how == "input" else "ReduceMax", True),
        ("Conv", False),  # y's channels: "they reach the graph output 'y'"
    ]


def test_channels_beside_a_graph_input_say_why():
    """A cache: a layer's heads concatenated after a graph input's along the sequence axis stay, and
    the Concat says why."""
    g = Graph()
    new = g.op(
        "Transpose",
        g.op("Reshape", g.op("MatMul", "x", g.weight(8, 16)), g.const(np.array([0, 0, 4, 4]))),
        perm=[0, 2, 1, 3],
    )
    cache = g.op("Transpose", g.op("Concat", "past", new, axis=2), perm=[0, 2, 1, 3])
    g.op("MatMul", g.op("Reshape", cache, g.const(np.array([0, 0, 16]))), g.weight(16, 2))
    g.nodes[-1].output[0] = "y"
    analysis = spa.analyze(g.model({"x": [1, 3, 8], "past": [1, 4, 5, 4]}, {"y": [1, 8, 2]}))
    assert not analysis.groups
    assert any("beside elements of no channel" in k.reason for k in analysis.kept)


def test_a_layer_of_one_channel_says_why_it_stays():
    g = Graph()
    g.gemm(g.op("Relu", g.gemm("x", 8, 1)), 1, 4)
    g.nodes[-1].output[0] = "y"
    analysis = spa.analyze(g.model({"x": [2, 8]}, {"y": [2, 4]}))
    assert "one channel is the whole tensor" in [k.reason for k in analysis.kept]
    assert unexplained(g.model({"x": [2, 8]}, {"y": [2, 4]})) == []


def test_a_constant_scaling_a_graph_input_to_an_output_keeps_no_layer_channels():
    """y = x * scale, x [N, 1], scale [1, 16]: the axis scale varies along opens classes that no
    layer has; nothing is said to be kept for them."""
    g = Graph()
    g.op("Mul", "x", g.const(np.arange(16, dtype=np.float32).reshape(1, 16)))
    g.nodes[-1].output[0] = "y"
    analysis = spa.analyze(g.model({"x": ["N", 1]}, {"y": ["N", 16]}))
    assert not analysis.groups and not analysis.kept
