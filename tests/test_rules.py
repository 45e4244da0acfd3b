"""Op-level tests: one small graph per rule, checked by the zero-channel test and by what the
analysis says about its groups."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphs import Graph
from onnx import helper

import spa
from spa.report import analysis_listing, analysis_report

IMG = [1, 8, 6, 6]


def _zero_check(model: onnx.ModelProto, removed_at_least: int = 1) -> None:
    error, removed = spa.zero_channel_check(model, ratio=0.5)
    assert removed >= removed_at_least
    assert error <= 1e-4


def _widths(model: onnx.ModelProto) -> list[int]:
    return sorted(g.width for g in spa.analyze(model).groups)


def _pruned(model: onnx.ModelProto, **kw) -> onnx.ModelProto:
    result = spa.prune(model, ratio=0.5, round_to=1, **kw)
    import onnx_ir as ir

    return ir.serde.serialize_model(result.model)


def test_conv_chain_one_group_and_output_pinned():
    g = Graph()
    h = g.op("Relu", g.conv("x", 8, 16))
    g.nodes[-1].output[0] = h
    g.conv(h, 16, 4)
    g.nodes[-1].output[0] = "y"
    model = g.model({"x": IMG}, {"y": [1, 4, 6, 6]})
    assert _widths(model) == [16]  # the last conv feeds the output: its channels stay
    _zero_check(model)
    pruned = _pruned(model)
    shapes = {i.name: list(i.dims) for i in pruned.graph.initializer}
    assert sorted(s[0] for s in shapes.values() if len(s) == 4) == [4, 8]


def _out(g: Graph, value: str) -> None:
    g.nodes[-1].output[0] = "y" if value is None else value


def test_residual_add_couples_both_convs():
    g = Graph()
    a = g.op("Relu", g.conv("x", 8, 16))
    b = g.conv(a, 16, 16)
    s = g.op("Add", a, b)
    g.conv(s, 16, 4)
    _out(g, None)
    model = g.model({"x": IMG}, {"y": [1, 4, 6, 6]})
    assert _widths(model) == [16]
    analysis = spa.analyze(model)
    assert len(analysis.groups[0].spaces) == 2
    _zero_check(model)


def test_concat_keeps_groups_apart_and_offsets_right():
    g = Graph()
    a = g.conv("x", 8, 12)
    b = g.conv("x", 8, 20)
    c = g.op("Concat", a, b, axis=1)
    g.conv(g.op("Relu", c), 32, 4)
    _out(g, None)
    model = g.model({"x": IMG}, {"y": [1, 4, 6, 6]})
    assert _widths(model) == [12, 20]
    _zero_check(model)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_couples_input_and_output(multiplier):
    g = Graph()
    a = g.op("Relu", g.conv("x", 8, 16))
    d = g.op(
        "Clip",
        g.conv(a, 16, 16 * multiplier, group=16),
        g.const(np.float32(0)),
        g.const(np.float32(6)),
    )
    g.conv(d, 16 * multiplier, 4)
    _out(g, None)
    model = g.model({"x": IMG}, {"y": [1, 4, 6, 6]})
    assert _widths(model) == [16]  # a depthwise group goes with its input channel
    _zero_check(model)
    conv = [n for n in _pruned(model).graph.node if n.op_type == "Conv"][1]
    assert (
        helper.get_attribute_value(conv.attribute[[a.name for a in conv.attribute].index("group")])
        == 8
    )


def test_grouped_conv_keeps_as_many_channels_in_every_group_at_positions_of_its_own():
    g = Graph()
    w = g.rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    w[[0, 1, 14, 15]] = 0  # two dead channels at each end: group 0's first, group 1's last
    a = g.op("Relu", g.op("Conv", "x", g.const(w), pads=[1] * 4))
    w = g.rng.standard_normal((24, 8, 3, 3)).astype(np.float32)
    w[[0, 1, 2, 21, 22, 23]] = 0  # and the grouped conv's: three at each end
    b = g.op("Relu", g.op("Conv", a, g.const(w), pads=[1] * 4, group=2))
    g.conv(b, 24, 4)
    _out(g, None)
    model = g.model({"x": IMG}, {"y": [1, 4, 6, 6]})
    assert _widths(model) == [16, 24]  # every channel its own class; counts equal per group
    _zero_check(model)
    result = spa.prune(model, ratio=0.25, round_to=1, importance="l2")
    assert sorted(result.plan.removed.tolist())[:4] == [1, 2, 15, 16]  # labels count from 1
    pruned = ir.serde.serialize_model(result.model)
    conv = [n for n in pruned.graph.node if n.op_type == "Conv"][1]
    assert [a.i for a in conv.attribute if a.name == "group"] == [2]
    weights = {t.name: t for t in pruned.graph.initializer}
    assert list(weights[conv.input[1]].dims) == [18, 6, 3, 3]
    feed = {"x": g.rng.standard_normal(IMG).astype(np.float32)}
    before, after = (
        ort.InferenceSession(m.SerializeToString()).run(None, feed)[0] for m in (model, pruned)
    )
    # the dead channels went: the same up to the order of float sums
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6 * np.abs(before).max())


def _channel_shuffle(g: Graph, x: str, groups: int, channels: int, side: int) -> str:
    x = g.op("Reshape", x, g.const(np.array([1, groups, channels // groups, side, side])))
    x = g.op("Transpose", x, perm=[0, 2, 1, 3, 4])
    return g.op("Reshape", x, g.const(np.array([1, channels, side, side])))


def test_shufflenet_v1_unit_prunes_classes_of_the_shuffle_and_keeps_those_across_groups():
    """3 groups of 8: the shuffle's classes are 3 channels; two of them lie across two groups of
    the grouped conv after it and stay, the others go 3 channels at a time, as many per group."""
    g = Graph()
    x = g.op("Relu", g.conv("x", 8, 24))
    x = g.op("Relu", g.conv(x, 24, 24, k=1, group=3))
    x = _channel_shuffle(g, x, 3, 24, 6)
    x = g.conv(x, 24, 24, group=24)
    x = g.op("Relu", g.conv(x, 24, 24, k=1, group=3))
    g.conv(x, 24, 4)
    _out(g, None)
    model = g.model({"x": IMG}, {"y": [1, 4, 6, 6]})
    analysis = spa.analyze(model)
    shuffled = [g for g in analysis.groups if g.channels_per_class == 3]
    assert [(len(g.classes), g.pinned) for g in shuffled] == [(6, 2)]
    assert any("across two of its groups" in k.reason for k in analysis.kept)
    # the first grouped conv's inputs, the second's inputs (the shuffle's) and outputs
    units = sorted(e["units_per_group"] for e in analysis_report(analysis)["equal_counts"])
    assert units == [[2, 2, 2], [8, 8, 8], [8, 8, 8]]
    assert "3 groups of 2 unit(s) of their own" in analysis_listing(analysis, "m")
    _zero_check(model, removed_at_least=4)


def test_conv_transpose():
    g = Graph()
    a = g.op("Relu", g.conv("x", 8, 16))
    w = g.weight(16, 12, 2, 2)
    t = g.op("ConvTranspose", a, w, g.const(np.ones(12, np.float32)), strides=[2, 2])
    g.conv(g.op("Relu", t), 12, 4)
    _out(g, None)
    model = g.model({"x": IMG}, {"y": [1, 4, 12, 12]})
    assert _widths(model) == [12, 16]
    _zero_check(model)


def test_grouped_conv_transpose_keeps_as_many_channels_in_every_group():
    g = Graph()
    a = g.op("Relu", g.conv("x", 8, 16))
    w = g.weight(16, 6, 2, 2)  # 2 groups: 8 inputs -> 6 outputs each
    t = g.op("ConvTranspose", a, w, strides=[2, 2], group=2)
    g.conv(g.op("Relu", t), 12, 4)
    _out(g, None)
    model = g.model({"x": IMG}, {"y": [1, 4, 12, 12]})
    assert _widths(model) == [12, 16]
    assert [len(e.blocks) for e in spa.analyze(model).equal_counts] == [2, 2]
    _zero_check(model, removed_at_least=8)


def test_per_channel_parameters_are_sliced_with_the_channels():
    g = Graph()
    a = g.bn(g.conv("x", 8, 16, bias=False), 16)
    a = g.op("PRelu", a, g.const(g.rng.uniform(0, 0.3, (16, 1, 1)).astype(np.float32)))
    a = g.op("Mul", a, g.const(g.rng.uniform(0.5, 2, (1, 16, 1, 1)).astype(np.float32)))
    a = g.op("Add", a, g.const(g.rng.standard_normal((16, 1, 1)).astype(np.float32)))
    a = g.op(
        "InstanceNormalization",
        a,
        g.const(np.ones(16, np.float32)),
        g.const(np.zeros(16, np.float32)),
    )
    a = g.op("LeakyRelu", a, alpha=0.1)
    g.conv(a, 16, 4)
    _out(g, None)
    model = g.model({"x": IMG}, {"y": [1, 4, 6, 6]})
    assert _widths(model) == [16]
    members = {m.value.name for m in spa.analyze(model).members}
    assert len(members) == 12  # conv w; 4 BN; slope; scale; shift; IN scale, bias; next conv w, b
    _zero_check(model)


@pytest.mark.parametrize(
    "op",
    [
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Erf",
        "Softplus",
        "Gelu",
        "Dropout",
        "Identity",
        "Abs",
        "Elu",
    ],
)
def test_unary_ops_pass_channels(op):
    g = Graph()
    a = g.op(op, g.conv("x", 8, 16))
    g.conv(a, 16, 4)
    _out(g, None)
    model = g.model({"x": IMG}, {"y": [1, 4, 6, 6]}, opset=20)
    assert _widths(model) == [16]
    _zero_check(model)


@pytest.mark.parametrize(
    "pool", ["MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean"]
)
def test_pooling_then_flatten_into_gemm(pool):
    g = Graph()
    a = g.op("Relu", g.conv("x", 8, 16))
    attrs = (
        {"kernel_shape": [2, 2], "strides": [2, 2]} if pool in ("MaxPool", "AveragePool") else {}
    )
    if pool == "ReduceMean":
        attrs = {"axes": [2, 3], "keepdims": 1}
    p = g.op(pool, a, **attrs)
    spatial = 9 if pool in ("MaxPool", "AveragePool") else 1
    f = g.op("Flatten", p, axis=1)
    g.op("Gemm", f, g.weight(10, 16 * spatial), g.const(np.zeros(10, np.float32)), transB=1)
    _out(g, None)
    model = g.model({"x": IMG}, {"y": [1, 10]})
    assert _widths(model) == [16]
    _zero_check(model)
    gemm_weight = [
        i for i in _pruned(model).graph.initializer if list(i.dims)[:1] == [10] and len(i.dims) == 2
    ][0]
    assert list(gemm_weight.dims) == [10, 8 * spatial]  # flatten blocks of `spatial` per channel


def test_channel_shuffle_prunes_the_same_channel_in_both_halves():
    g = Graph()
    a = g.op("Relu", g.conv("x", 8, 16))
    r = g.op("Reshape", a, g.const(np.array([1, 2, 8, 6, 6], np.int64)))
    t = g.op("Transpose", r, perm=[0, 2, 1, 3, 4])
    s = g.op("Reshape", t, g.const(np.array([1, 16, 6, 6], np.int64)))
    g.conv(s, 16, 4)
    _out(g, None)
    model = g.model({"x": IMG}, {"y": [1, 4, 6, 6]})
    assert _widths(model) == [8]
    _zero_check(model)
    shapes = [
        numpy_value(model, n.input[1]) for n in _pruned(model).graph.node if n.op_type == "Reshape"
    ]
    assert shapes  # rewritten shape constants are checked by onnxruntime in the zero test


def numpy_value(model: onnx.ModelProto, name: str):
    return [onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name]


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_sizes_follow_the_pruning(opset):
    g = Graph()
    a = g.op("Relu", g.conv("x", 8, 16))
    if opset >= 13:
        parts = g.op("Split", a, g.const(np.array([6, 10], np.int64)), axis=1, outputs=2)
    else:
        parts = g.op("Split", a, axis=1, split=[6, 10], outputs=2)
    b = g.conv(parts[0], 6, 6)
    c = g.conv(parts[1], 10, 6)
    g.op("Add", b, c)
    _out(g, None)
    model = g.model({"x": IMG}, {"y": [1, 6, 6, 6]}, opset=opset)
    assert _widths(model) == [16]
    _zero_check(model)


def test_slice_and_gather_on_channels():
    g = Graph()
    a = g.op("Relu", g.conv("x", 8, 16))
    s = g.op(
        "Slice",
        a,
        g.const(np.array([4], np.int64)),
        g.const(np.array([12], np.int64)),
        g.const(np.array([1], np.int64)),
    )
    q = g.op("Gather", a, g.const(np.array([0, 3, 5, 15], np.int64)), axis=1)
    b = g.conv(s, 8, 4)
    c = g.conv(q, 4, 4)
    g.op("Add", b, c)
    _out(g, None)
    model = g.model({"x": IMG}, {"y": [1, 4, 6, 6]})
    assert _widths(model) == [16]
    _zero_check(model)


def test_squeeze_and_excitation_gate():
    g = Graph()
    a = g.op("Relu", g.conv("x", 8, 16))
    s = g.op("GlobalAveragePool", a)
    s = g.op("Relu", g.conv(s, 16, 4, k=1))
    s = g.op("HardSigmoid", g.conv(s, 4, 16, k=1))
    m = g.op("Mul", a, s)
    g.conv(m, 16, 4)
    _out(g, None)
    model = g.model({"x": IMG}, {"y": [1, 4, 6, 6]})
    assert _widths(model) == [4, 16]  # the gate's expand conv is coupled to the features it scales
    _zero_check(model)


def test_resize_pad_and_squeeze_keep_channels():
    g = Graph()
    a = g.op("Relu", g.conv("x", 8, 16))
    r = g.op("Resize", a, "", g.const(np.array([1, 1, 2, 2], np.float32)), mode="nearest")
    p = g.op("Pad", r, g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)))
    u = g.op("Unsqueeze", p, g.const(np.array([0], np.int64)))
    q = g.op("Squeeze", u, g.const(np.array([0], np.int64)))
    g.conv(q, 16, 4)
    _out(g, None)
    model = g.model({"x": IMG}, {"y": [1, 4, 14, 14]})
    assert _widths(model) == [16]
    _zero_check(model)


@pytest.mark.parametrize("channels", ["the input's dim", "a constant", "another tensor's dim"])
def test_resize_sizes_computed_at_run_time(channels):
    """SegFormer's decoder: sizes = Concat(Shape(x)[0:2], H, W) follows the pruning by itself; a
    constant channel count among the pieces is rewritten; a count read from a tensor with other
    channels pins both (pruned, that tensor would make the Resize interpolate across channels)."""
    g = Graph()
    a = g.op("Relu", g.conv("x", 8, 16))
    b = g.op("Relu", g.conv("x", 8, 16))
    batch = g.op("Shape", a, end=1)  # a symbolic batch: the sizes stay computed
    count = {
        "the input's dim": g.op("Shape", a, start=1, end=2),
        "a constant": g.const(np.array([16], np.int64)),
        "another tensor's dim": g.op("Shape", b, start=1, end=2),
    }[channels]
    sizes = g.op("Concat", batch, count, g.const(np.array([12, 12], np.int64)), axis=0)
    r = g.op("Resize", a, "", "", sizes, mode="nearest")
    g.op(
        "Add",
        g.conv(r, 16, 4),
        g.op(
            "Resize",
            g.conv(b, 16, 4),
            "",
            g.const(np.array([1, 1, 2, 2], np.float32)),
            mode="nearest",
        ),
    )
    _out(g, None)
    model = g.model({"x": ["N", 8, 6, 6]}, {"y": ["N", 4, 12, 12]})
    shapes = {"x": [2, 8, 6, 6]}
    widths = sorted(group.width for group in spa.analyze(model, input_shapes=shapes).groups)
    assert widths == ([] if channels == "another tensor's dim" else [16, 16])
    if widths:
        error, removed = spa.zero_channel_check(model, ratio=0.5, input_shapes=shapes)
        assert removed == 16 and error <= 1e-4


def test_matmul_with_weight_and_bias():
    g = Graph()
    h = g.op(
        "Add",
        g.op("MatMul", "x", g.weight(8, 32)),
        g.const(g.rng.standard_normal(32).astype(np.float32)),
    )
    h = g.op("Relu", h)
    g.op("MatMul", h, g.weight(32, 4))
    _out(g, None)
    model = g.model({"x": [2, 5, 8]}, {"y": [2, 5, 4]})
    assert _widths(model) == [32]
    _zero_check(model)


@pytest.mark.parametrize(
    "op,attrs", [("Softmax", {"axis": 1}), ("ReduceMean", {"axes": [1]}), ("LRN", {"size": 3})]
)
def test_ops_across_channels_pin_them(op, attrs):
    g = Graph()
    a = g.op("Relu", g.conv("x", 8, 16))
    b = g.op(op, a, **attrs)
    g.conv(g.op("Add", a, b) if op != "ReduceMean" else b, 16 if op != "ReduceMean" else 1, 4)
    _out(g, None)
    out = [1, 4, 6, 6]
    model = g.model({"x": IMG}, {"y": out})
    assert _widths(model) == []  # normalizing over channels: removing one changes the others


@pytest.mark.parametrize("keepdims", [0, 1])
def test_a_mean_over_channels_keeps_them_and_says_so(keepdims):
    """A LayerNorm written out in basic ops (jax2onnx, tf2onnx): the channels it averages over stay,
    the analysis lists the normalization, and the first conv still prunes."""
    g = Graph()
    a = g.op("Relu", g.conv("x", 8, 16))
    b = g.conv(a, 16, 16)
    mean = g.op("ReduceMean", b, axes=[1], keepdims=keepdims)
    if not keepdims:
        mean = g.op("Unsqueeze", mean, g.const(np.array([1], np.int64)))
    g.op("Sub", b, mean)
    _out(g, None)
    model = g.model({"x": IMG}, {"y": IMG[:1] + [16] + IMG[2:]})
    analysis = spa.analyze(model)
    assert [g.width for g in analysis.groups] == [16]
    assert [(n.op, n.channels) for n in analysis.normalizations] == [("ReduceMean", 16)]
    _zero_check(model)


def test_a_keepdims_other_than_0_or_1_is_a_barrier():
    """keepdims=16 (found by the fuzzer): onnxruntime's kernel keeps the dims, ONNX's shape
    inference drops them; spa cannot know which the model means, so the channels stay."""
    g = Graph()
    a = g.op("Relu", g.conv("x", 8, 16))
    g.op("ReduceMean", g.conv(a, 16, 16), axes=[2, 3], keepdims=16)
    _out(g, None)
    analysis = spa.analyze(g.model({"x": IMG}, {"y": [1, 16]}))
    assert [g.width for g in analysis.groups] == [16]  # the first conv still prunes
    assert [(b.op, b.reason) for b in analysis.barriers if b.blocked] == [
        ("ReduceMean", "keepdims=16 is neither 0 nor 1")
    ]


def test_a_dim_of_minus_one_is_dynamic():
    """Paddle's converters write -1 for a dynamic dim: spa treats it like a symbolic one and keeps
    it."""
    g = Graph()
    g.conv(g.op("Relu", g.conv("x", 3, 16)), 16, 4)
    _out(g, None)
    model = g.model({"x": [-1, 3, 6, 6]}, {"y": [-1, 4, 6, 6]})
    pruned = _pruned(model)
    assert [d.dim_value for d in pruned.graph.input[0].type.tensor_type.shape.dim] == [-1, 3, 6, 6]
    _zero_check(model)


def test_nhwc_flatten_with_an_int32_shape_prunes_the_last_conv():
    """tf2onnx's Flatten: Transpose to NHWC, then Reshape to (batch, H*W*C) with the shape built in
    int32 and cast to int64. The constant H*W*C is rewritten; each channel is its own unit."""
    g = Graph()
    a = g.op("Relu", g.conv("x", 8, 16))
    t = g.op("Transpose", a, perm=[0, 2, 3, 1])
    dims = g.op("Cast", g.op("Shape", a), to=onnx.TensorProto.INT32)
    batch = g.op("Slice", dims, g.const(np.array([0], np.int32)), g.const(np.array([1], np.int32)))
    shape = g.op(
        "Cast",
        g.op("Concat", batch, g.const(np.array([6 * 6 * 16], np.int32)), axis=0),
        to=onnx.TensorProto.INT64,
    )
    g.op("MatMul", g.op("Reshape", t, shape), g.weight(6 * 6 * 16, 4))
    _out(g, None)
    model = g.model({"x": ["n", 8, 6, 6]}, {"y": ["n", 4]})
    assert [len(g.classes) for g in spa.analyze(model).groups] == [16]
    _zero_check(model, removed_at_least=8)


def test_unknown_op_is_a_barrier_and_listed():
    g = Graph()
    a = g.op("Relu", g.conv("x", 8, 16))
    b = g.conv(a, 16, 16)
    g.nodes.append(helper.make_node("Mystery", [b], ["m"], domain="custom.ops", name="mystery"))
    g.op("Identity", "m")
    _out(g, None)
    graph = helper.make_graph(
        g.nodes,
        "t",
        [helper.make_tensor_value_info("x", 1, IMG)],
        [helper.make_tensor_value_info("y", 1, None)],
        g.inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.ops", 1)]
    )
    analysis = spa.analyze(model)
    assert [(b.op, b.blocked) for b in analysis.barriers] == [("custom.ops::Mystery", True)]
    assert sorted(g.width for g in analysis.groups) == [16]  # the first conv still prunes


def test_ignore_leaves_matching_layers_alone():
    g = Graph()
    a = g.op("Relu", g.conv("x", 8, 16))
    b = g.op("Relu", g.conv(a, 16, 16))
    g.conv(b, 16, 4)
    _out(g, None)
    model = g.model({"x": IMG}, {"y": [1, 4, 6, 6]})
    first = model.graph.node[0].name
    result = spa.prune(model, ratio=0.5, round_to=1, ignore=[first])
    kept = {grp["layers"][0]["node"]: grp["removed"] for grp in result.report()["groups"]}
    assert kept[first] == 0
    assert sum(kept.values()) == 8


def test_round_to_and_keep_one():
    from spa.plan import keep_count

    assert keep_count(64, 0.5, 16) == 32
    assert keep_count(64, 0.6, 16) == 32  # 25.6 kept -> nearest multiple of 16
    assert keep_count(24, 0.5, 16) == 16
    assert keep_count(16, 0.5, 16) == 8  # a group no wider than round_to rounds to half the step
    assert keep_count(16, 0.1, 16) == 16  # 15 channels would be slower than 16
    assert keep_count(12, 0.5, 16) == 8
    assert keep_count(3, 0.9, 1) == 1
    assert keep_count(24, 0.1, 16) == 24  # rounding never removes more than asked (not 8 of 24)
    assert keep_count(40, 0.3, 8) == 32  # 28 kept -> up to 32


def _message_passing(axis: int) -> onnx.ModelProto:
    """Node features through a layer, gathered along `axis` by run-time indices (a graph's edges),
    through another layer: axis 0 picks nodes (the channels move whole), axis 1 picks channels."""
    g = Graph()
    h = g.op("Relu", g.gemm("x", 8, 16))
    picked = g.op("Gather", h, "edges", axis=axis)
    y = g.gemm(picked, 16, 4) if axis == 0 else g.op("ReduceSum", picked, keepdims=1)
    shapes = {0: [10, 4], 1: [6, 1]}[axis]
    graph = onnx.helper.make_graph(
        g.nodes,
        "gnn",
        [
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [6, 8]),
            onnx.helper.make_tensor_value_info(
                "edges", onnx.TensorProto.INT64, [10 if axis == 0 else 16]
            ),
        ],
        [onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, shapes)],
        g.inits,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_run_time_indices_along_an_axis_without_channels_move_whole_channel_vectors():
    analysis = spa.analyze(_message_passing(axis=0))
    assert [g.width for g in analysis.groups] == [16] and not analysis.barriers
    error, removed = spa.zero_channel_check(_message_passing(axis=0), ratio=0.5)
    assert removed == 8 and error < 1e-5


def test_run_time_indices_along_a_channel_axis_pin_it():
    analysis = spa.analyze(_message_passing(axis=1))
    assert not analysis.groups and "addresses a channel axis" in analysis.barriers[0].reason


NODES = {"x": [6, 8]}  # the zero-channel check's int64 indices are ones: valid with 6 nodes


def _node_graph(g: Graph, y: str, out_shape: list, indices: dict[str, list]) -> onnx.ModelProto:
    """Node features x [N, 8] (a dynamic count: its Shape is not folded) and int64 indices."""
    g.nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        g.nodes,
        "gnn",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])]
        + [helper.make_tensor_value_info(n, onnx.TensorProto.INT64, s) for n, s in indices.items()],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, out_shape)],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _sized_like(g: Graph, tensor: str, how: str, rows: str | None = None) -> str:
    """A shape vector for `tensor`'s shape, optionally with its first dim from `rows`: read at
    run time (torch's legacy export: Shape) or its channel count as a constant (dynamo)."""
    first = g.op("Shape", rows or tensor, start=0, end=1)
    if how == "run time":
        return g.op("Concat", first, g.op("Shape", tensor, start=1, end=2), axis=0)
    return g.op("Concat", first, g.const(np.array([16], np.int64)), axis=0)


@pytest.mark.parametrize("how", ["run time", "constant"])
def test_messages_summed_into_nodes_by_scatter_elements_move_whole_channels(how):
    """A graph layer: h's rows gathered along the edges, summed into the nodes (torch_geometric's
    scatter: ScatterElements into a zero buffer, with the index broadcast over the channels)."""
    g = Graph()
    h = g.op("Relu", g.gemm("x", 8, 16))
    messages = g.op("Gather", h, "src", axis=0)
    index = g.op(
        "Expand",
        g.op("Unsqueeze", "dst", g.const(np.array([1], np.int64))),
        _sized_like(g, messages, how),
    )
    zeros = g.op("ConstantOfShape", _sized_like(g, h, how))
    summed = g.op("ScatterElements", zeros, index, messages, axis=0, reduction="add")
    g.gemm(summed, 16, 4)
    model = _node_graph(g, "y", ["N", 4], {"src": [10], "dst": [10]})
    analysis = spa.analyze(model, input_shapes=NODES)
    assert [gr.width for gr in analysis.groups] == [16]
    assert not [b for b in analysis.barriers if b.blocked]
    _zero_check_nodes(model)


def test_elements_gathered_along_nodes_and_picked_by_nd_indices_move_whole_channels():
    g = Graph()
    h = g.op("Relu", g.gemm("x", 8, 16))
    index = g.op(
        "Expand",
        g.op("Unsqueeze", "rows", g.const(np.array([1], np.int64))),
        g.const(np.array([5, 16], np.int64)),
    )
    picked = g.op("GatherElements", h, index, axis=0)
    nd = g.op("GatherND", h, "pairs")
    g.op("Add", g.gemm(picked, 16, 4), g.gemm(nd, 16, 4))
    model = _node_graph(g, "y", [5, 4], {"rows": [5], "pairs": [5, 1]})
    assert [gr.width for gr in spa.analyze(model, input_shapes=NODES).groups] == [16]
    _zero_check_nodes(model)


def test_updates_placed_by_scatter_nd_move_whole_channels():
    g = Graph()
    h = g.op("Relu", g.gemm("x", 8, 16))
    placed = g.op(
        "ScatterND",
        g.op("ConstantOfShape", g.op("Shape", h)),
        "pairs",
        g.op("Gather", h, "rows", axis=0),
        reduction="add",
    )
    g.gemm(placed, 16, 4)
    model = _node_graph(g, "y", ["N", 4], {"rows": [5], "pairs": [5, 1]})
    assert [gr.width for gr in spa.analyze(model, input_shapes=NODES).groups] == [16]
    _zero_check_nodes(model)


def test_indices_that_address_the_channels_pin_them():
    g = Graph()
    h = g.op("Relu", g.gemm("x", 8, 16))
    g.gemm(g.op("Reshape", g.op("GatherND", h, "pairs"), g.const(np.array([5, 1]))), 1, 4)
    analysis = spa.analyze(_node_graph(g, "y", [5, 4], {"pairs": [5, 2]}), input_shapes=NODES)
    assert not analysis.groups
    assert "address a channel axis" in analysis.barriers[0].reason


@pytest.mark.parametrize("end", ["same channels", "other channels"])
def test_a_slice_to_an_end_read_at_run_time_takes_channels_whole_or_pins_them(end):
    """torch_geometric's `src[: index.numel()]`, legacy export: Slice(h, 0, Shape(t)); the end
    follows the pruning when t has h's channels."""
    g = Graph()
    h = g.op("Relu", g.gemm("x", 8, 16))
    t = g.op("Neg", h) if end == "same channels" else g.gemm("x", 8, 16)
    sliced = g.op("Slice", h, g.const(np.array([0, 0], np.int64)), g.op("Shape", t))
    g.op("Add", g.gemm(sliced, 16, 4), g.gemm(t, 16, 4))
    model = _node_graph(g, "y", ["N", 4], {})
    analysis = spa.analyze(model, input_shapes=NODES)
    if end == "same channels":
        assert [gr.width for gr in analysis.groups] == [16] and not analysis.barriers
        _zero_check_nodes(model)
    else:
        assert "slice across channels" in analysis.barriers[0].reason


def test_a_reduction_within_heads_makes_each_head_one_unit():
    """GAT's attention logit: per head, the sum over its channels of h * a (a parameter); removing
    a whole head leaves the other heads' sums as they were."""
    g = Graph()
    heads = g.op("Reshape", g.op("Relu", g.gemm("x", 8, 16)), g.const(np.array([-1, 4, 4])))
    logits = g.op(
        "ReduceSum",
        g.op("Mul", heads, g.weight(1, 4, 4)),
        g.const(np.array([2], np.int64)),
        keepdims=0,
    )
    g.gemm(logits, 4, 3)
    model = _node_graph(g, "y", ["N", 3], {})
    analysis = spa.analyze(model, input_shapes=NODES)
    assert [(gr.width, gr.channels_per_class) for gr in analysis.groups] == [(4, 4)]
    assert not analysis.normalizations
    _zero_check_nodes(model)


def _zero_check_nodes(model: onnx.ModelProto) -> None:
    error, removed = spa.zero_channel_check(model, ratio=0.5, input_shapes=NODES)
    assert removed >= 2 and error <= 1e-5


def _group_norm_model() -> onnx.ModelProto:
    g = Graph()
    h = g.conv("x", 8, 16)
    scale, bias = (
        g.const(g.rng.uniform(0.5, 1.5, 16).astype(np.float32)),
        g.const(g.rng.standard_normal(16).astype(np.float32)),
    )
    h = g.op("Relu", g.op("GroupNormalization", h, scale, bias, num_groups=4, epsilon=1e-5))
    g.op("Conv", h, g.weight(4, 16, 3, 3), pads=[1, 1, 1, 1])
    g.nodes[-1].output[0] = "y"
    return g.model({"x": IMG}, {"y": [1, 4, 6, 6]}, opset=21)


def _group_count_and_width(pruned: onnx.ModelProto) -> tuple[int, int]:
    norm = next(n for n in pruned.graph.node if n.op_type == "GroupNormalization")
    groups = next(a for a in norm.attribute if a.name == "num_groups")
    scale = next(i for i in pruned.graph.initializer if i.name == norm.input[1])
    return helper.get_attribute_value(groups), scale.dims[0]


def test_group_norm_prunes_whole_groups_exactly_and_lowers_the_group_count():
    model = _group_norm_model()
    analysis = spa.analyze(model)
    group = next(gr for gr in analysis.groups if gr.width * gr.channels_per_class == 16)
    assert group.channels_per_class == 4  # a unit is one group of channels
    _zero_check(model, removed_at_least=1)
    assert _group_count_and_width(_pruned(model)) == (2, 8)


def test_group_norm_with_prune_hidden_prunes_as_many_channels_from_every_group():
    """Lossy (each group's statistics change), opt-in: the groups stay, each narrower, each
    losing its own weakest channels."""
    model = _group_norm_model()
    analysis = spa.analyze(model, prune_hidden=True)
    group = next(gr for gr in analysis.groups if gr.width == 16)
    assert group.lossy and group.channels_per_class == 1
    assert [len(b) for e in analysis.equal_counts for b in e.blocks] == [4, 4, 4, 4]
    assert _group_count_and_width(_pruned(model, prune_hidden=True)) == (4, 8)


@pytest.mark.parametrize("back", ["constant", "run time"])
def test_group_norm_as_exporters_write_it_prunes_whole_groups_exactly(back):
    """Reshape (N, C, H, W) -> (N, groups, -1), InstanceNormalization, Reshape back (to a constant
    shape, or to the input's shape read at run time: diffusers' UNet), then the per-channel gamma
    and beta: torch's exporters' GroupNorm. A group is one unit."""
    g = Graph()
    x = g.conv("x", 8, 16)
    h = g.op("Reshape", x, g.const(np.array([0, 4, -1], np.int64)))
    h = g.op(
        "InstanceNormalization",
        h,
        g.const(np.ones(4, np.float32)),
        g.const(np.zeros(4, np.float32)),
        epsilon=1e-5,
    )
    shape = g.const(np.array([1, 16, 6, 6], np.int64)) if back == "constant" else g.op("Shape", x)
    h = g.op("Reshape", h, shape)
    h = g.op(
        "Add",
        g.op("Mul", h, g.const(g.rng.uniform(0.5, 1.5, (16, 1, 1)).astype(np.float32))),
        g.const(g.rng.standard_normal((16, 1, 1)).astype(np.float32)),
    )
    g.op("Conv", g.op("Relu", h), g.weight(4, 16, 3, 3), pads=[1, 1, 1, 1])
    g.nodes[-1].output[0] = "y"
    batch = 1 if back == "constant" else "N"
    model = g.model({"x": [batch, 8, 6, 6]}, {"y": [batch, 4, 6, 6]})
    analysis = spa.analyze(model)
    assert [(gr.width, gr.channels_per_class) for gr in analysis.groups] == [(4, 4)]
    assert not analysis.barriers
    _zero_check(model, removed_at_least=1)


@pytest.mark.parametrize("merged", ["product", "max of products"])
def test_heads_merged_into_the_batch_by_a_product_of_run_time_dims_prune(merged):
    """tf2onnx's einsum: Reshape(t, [ReduceProd(Shape(t)[0:2]), ...]) merges batch and heads; the
    product follows a removal of heads by itself (and Max of two such products, the einsum's
    broadcast batch, when both read the same heads)."""
    g = Graph()
    h = g.op("Relu", g.conv("x", 8, 16))
    heads = g.op("Reshape", h, g.const(np.array([0, 4, 4, 36], np.int64)))

    def batch_times_heads(t: str) -> str:
        return g.op("ReduceProd", g.op("Shape", t, start=0, end=2), keepdims=1)

    merged_dim = batch_times_heads(heads)
    if merged == "max of products":
        merged_dim = g.op("Max", merged_dim, batch_times_heads(g.op("Neg", heads)))
    flat = g.op(
        "Reshape",
        heads,
        g.op("Concat", merged_dim, g.const(np.array([4, 36], np.int64)), axis=0),
    )
    back = g.op("Reshape", g.op("Sigmoid", flat), g.op("Shape", h))
    g.conv(back, 16, 4)
    g.nodes[-1].output[0] = "y"
    model = g.model({"x": ["N", 8, 6, 6]}, {"y": ["N", 4, 6, 6]})
    analysis = spa.analyze(model)
    assert [gr.width * gr.channels_per_class for gr in analysis.groups] == [16]
    assert not analysis.barriers
    _zero_check(model, removed_at_least=1)


def _tf2onnx_layer_norm() -> onnx.ModelProto:
    """tf2onnx's LayerNorm over the last axis: means as GlobalAveragePool, and
    y = x * (rstd * gamma) + (beta - mean * rstd * gamma), rstd * gamma computed before x meets
    it."""
    g = Graph()
    h = g.op("Add", g.op("MatMul", "x", g.weight(8, 16)), g.const(g.rng.standard_normal(16)))
    g.inits[-1] = onnx.numpy_helper.from_array(
        g.rng.standard_normal(16).astype(np.float32), g.inits[-1].name
    )
    mean = g.op("GlobalAveragePool", h)
    centred = g.op("Sub", h, mean)
    variance = g.op("GlobalAveragePool", g.op("Mul", centred, centred))
    eps = g.const(np.array(1e-3, np.float32))
    rstd = g.op("Reciprocal", g.op("Sqrt", g.op("Add", variance, eps)))
    gamma = g.const(g.rng.uniform(0.5, 1.5, (1, 1, 16)).astype(np.float32))
    beta = g.const(g.rng.standard_normal((1, 1, 16)).astype(np.float32))
    scale = g.op("Mul", rstd, gamma)
    shift = g.op("Sub", beta, g.op("Mul", mean, scale))
    normed = g.op("Add", g.op("Mul", h, scale), shift)
    g.op("MatMul", g.op("Relu", normed), g.weight(16, 4))
    g.nodes[-1].output[0] = "y"
    return g.model({"x": ["N", 4, 8]}, {"y": ["N", 4, 4]})


def test_tf2onnx_layer_norm_keeps_its_channels_as_a_normalization_or_prunes_them_lossily():
    model = _tf2onnx_layer_norm()
    analysis = spa.analyze(model)
    assert not analysis.groups
    assert [k.reason for k in analysis.kept] == ["they reach the graph output 'y'"]
    assert {n.op for n in analysis.normalizations} == {"GlobalAveragePool"}
    hidden = spa.analyze(model, prune_hidden=True)
    assert [gr.width for gr in hidden.groups] == [16]
    # gamma and beta, met before the channels reach them, are the channels' parameters
    assert len(hidden.member_names()[hidden.groups[0].id]) == 5
    pruned = _pruned(model, prune_hidden=True)
    weights = {i.name: list(i.dims) for i in pruned.graph.initializer}
    first = next(n for n in pruned.graph.node if n.op_type == "MatMul")
    assert weights[first.input[1]] == [8, 8]


def test_a_head_size_computed_as_hidden_over_heads_prunes_whole_heads():
    """Reshape(h, [N, T, 4, Shape(h)[2] / 4]): whole heads go, and the surgery rewrites the Div's
    head count with the Reshape's."""
    g = Graph()
    h = g.op("Relu", g.op("MatMul", "x", g.weight(8, 16)))
    heads = g.const(np.array([4], np.int64))
    per_head = g.op("Div", g.op("Shape", h, start=2, end=3), heads)
    split = g.op(
        "Reshape", h, g.op("Concat", g.op("Shape", h, start=0, end=2), heads, per_head, axis=0)
    )
    merged = g.op("Reshape", g.op("Softmax", split, axis=-1), g.op("Shape", h))
    g.op("MatMul", merged, g.weight(16, 8))
    g.nodes[-1].output[0] = "y"
    model = g.model({"x": ["N", 3, 8]}, {"y": ["N", 3, 8]})
    analysis = spa.analyze(model)
    assert [(gr.width, gr.channels_per_class) for gr in analysis.groups] == [(4, 4)]
    assert not analysis.barriers
    _zero_check(model, removed_at_least=1)
    pruned = _pruned(model)
    divisor = next(n for n in pruned.graph.node if n.op_type == "Div").input[1]
    counts = {
        i.name: onnx.numpy_helper.to_array(i).tolist()
        for i in pruned.graph.initializer
        if i.data_type == onnx.TensorProto.INT64
    }
    assert counts[divisor] == [2]
