"""Op-level tests for attention heads, FFN neurons, hidden size and recurrent layers."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import Graph
from onnx import helper

import spa
from spa.report import analysis_report

S = 5


def attention(heads=4, kv_heads=4, d=4, rope=False, fused=False) -> onnx.ModelProto:
    """x (1, S, C) -> multi-head attention -> output projection -> y."""
    g = Graph()
    c = heads * d

    def split_heads(h, n, perm):
        h = g.op("Reshape", h, g.const(np.array([1, S, n, d], np.int64)))
        return g.op("Transpose", h, perm=perm)

    def proj(n):
        return g.op(
            "Add",
            g.op("MatMul", "x", g.weight(c, n * d)),
            g.const(g.rng.standard_normal(n * d).astype(np.float32)),
        )

    if fused:
        q, k, v = g.op(
            "Split",
            proj(heads + 2 * kv_heads),
            g.const(np.array([heads * d, kv_heads * d, kv_heads * d], np.int64)),
            axis=2,
            outputs=3,
        )
    else:
        q, k, v = proj(heads), proj(kv_heads), proj(kv_heads)
    q, k, v = (
        split_heads(q, heads, [0, 2, 1, 3]),
        split_heads(k, kv_heads, [0, 2, 3, 1]),
        split_heads(v, kv_heads, [0, 2, 1, 3]),
    )
    if kv_heads != heads:  # repeat_kv: (1, kv, ...) -> (1, kv, rep, ...) -> (1, heads, ...)
        rep = heads // kv_heads

        def repeat(t, tail):
            t = g.op(
                "Expand",
                g.op("Unsqueeze", t, g.const(np.array([2], np.int64))),
                g.const(np.array([1, kv_heads, rep, *tail], np.int64)),
            )
            return g.op("Reshape", t, g.const(np.array([1, heads, *tail], np.int64)))

        k, v = repeat(k, [d, S]), repeat(v, [S, d])
    if rope:  # rotate_half with a run-time cos table over the head dims
        cos = g.op("Cos", g.op("Mul", "pos", g.const(np.linspace(0.1, 1, d).astype(np.float32))))
        first = g.op(
            "Slice", q, g.const(np.array([0])), g.const(np.array([d // 2])), g.const(np.array([3]))
        )
        second = g.op(
            "Slice", q, g.const(np.array([d // 2])), g.const(np.array([d])), g.const(np.array([3]))
        )
        rotated = g.op("Concat", g.op("Neg", second), first, axis=3)
        q = g.op("Add", g.op("Mul", q, cos), g.op("Mul", rotated, g.op("Sin", cos)))
    scores = g.op("Mul", g.op("MatMul", q, k), g.const(np.float32(d**-0.5)))
    probs = g.op("Softmax", g.op("Add", scores, "mask"), axis=-1)
    context = g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3])
    context = g.op("Reshape", context, g.const(np.array([1, S, c], np.int64)))
    g.op("MatMul", context, g.weight(c, c))
    g.nodes[-1].output[0] = "y"
    inputs = {"x": [1, S, c], "mask": [1, 1, 1, S]} | ({"pos": [1, 1, S, 1]} if rope else {})
    return g.model(inputs, {"y": [1, S, c]})


@pytest.mark.parametrize(
    "kw", [{}, {"rope": True}, {"fused": True}], ids=["separate", "rope", "fused-qkv"]
)
def test_heads_are_pruned_whole(kw):
    model = attention(**kw)
    (group,) = spa.analyze(model).groups
    assert group.heads and group.width == 4
    # a fused projection holds q, k and v of a head
    assert group.channels_per_class == (12 if kw.get("fused") else 4)
    error, removed = spa.zero_channel_check(model, ratio=0.5)
    assert removed == 2 and error <= 1e-4
    pruned = ir.serde.serialize_model(spa.prune(model, ratio=0.5, round_to=1).model)
    shapes = [
        onnx.numpy_helper.to_array(i).tolist()
        for i in pruned.graph.initializer
        if i.name.startswith("c") and len(i.dims) == 1 and i.dims[0] == 4
    ]
    assert [1, S, 2, 4] in shapes  # the head count in the reshape constants follows


def test_grouped_query_attention_prunes_query_heads_as_many_per_kv_head_or_kv_heads_whole():
    model = attention(heads=4, kv_heads=2)
    analysis = spa.analyze(model)
    (group,) = analysis.groups
    # 4 query heads (each with its copies of a key and a value head) and the 2 key and 2 value
    # heads that own them: a query head goes alone, as many per kv head; a kv head only with all
    (constraint,) = analysis.equal_counts
    assert group.heads and group.width == 4 and len(group.owners) == 4
    assert [len(b) for b in constraint.blocks] == [2, 2]
    assert [len(o) for o in constraint.owners] == [2, 2]  # its key head and its value head
    listed = analysis_report(analysis)["equal_counts"]
    assert [(e["units_per_group"], e["owners_per_group"]) for e in listed] == [([2, 2], [2, 2])]
    error, removed = spa.zero_channel_check(model, ratio=0.5)
    assert removed >= 2 and error <= 1e-4

    def shapes(result):
        matrices = {m.value for m in result.analysis.members}
        expand = next(n for n in result.model.graph if n.op_type == "Expand")
        repeat = expand.inputs[1].const_value.numpy().tolist()
        return sorted(
            tuple(v.const_value.shape) for v in matrices if len(v.const_value.shape) == 2
        ), repeat

    # the ratio counts query heads. One of each kv head (l2 finds them weakest): q 2 of 4 heads,
    # k and v whole, o reads 2 heads; the Expand repeats each kv head once instead of twice
    weights, repeat = shapes(spa.prune(model, ratio=0.5, round_to=1, importance="l2"))
    assert weights == [(8, 16), (16, 8), (16, 8), (16, 8)] and repeat[2] == 1
    # a whole kv group (the default method's choice): q 2 of 4, k and v 1 of 2, o 2 heads in
    weights, repeat = shapes(spa.prune(model, ratio=0.5, round_to=1))
    assert weights == [(8, 16), (16, 4), (16, 4), (16, 8)] and repeat[1:3] == [1, 2]
    # and one more query head, of the group left: q 1 of 4, one copy of the kv head
    weights, repeat = shapes(spa.prune(model, ratio=0.75, round_to=1))
    assert weights == [(4, 16), (16, 4), (16, 4), (16, 4)] and repeat[1:3] == [1, 1]


def ffn(activation: str) -> onnx.ModelProto:
    g = Graph()
    h = g.op("MatMul", "x", g.weight(8, 32))
    if activation == "erf-gelu":  # x * 0.5 * (1 + erf(x / sqrt 2)), as exporters decompose GELU
        e = g.op("Erf", g.op("Div", h, g.const(np.float32(np.sqrt(2)))))
        h = g.op(
            "Mul", g.op("Mul", h, g.op("Add", e, g.const(np.float32(1)))), g.const(np.float32(0.5))
        )
    elif activation == "silu":
        h = g.op("Mul", h, g.op("Sigmoid", h))
    elif activation == "swiglu":  # silu(gate) * up
        up = g.op("MatMul", "x", g.weight(8, 32))
        h = g.op("Mul", g.op("Mul", h, g.op("Sigmoid", h)), up)
    else:
        h = g.op(activation, h)
    g.op("MatMul", h, g.weight(32, 8))
    g.nodes[-1].output[0] = "y"
    return g.model({"x": [1, S, 8]}, {"y": [1, S, 8]}, opset=20)


@pytest.mark.parametrize("activation", ["Relu", "Gelu", "erf-gelu", "silu", "swiglu"])
def test_ffn_neurons(activation):
    model = ffn(activation)
    analysis = spa.analyze(model)
    assert [g.width for g in analysis.groups] == [32]
    # gate and up coupled
    assert len(analysis.groups[0].spaces) == (2 if activation == "swiglu" else 1)
    error, removed = spa.zero_channel_check(model, ratio=0.5)
    assert removed == 16 and error <= 1e-4


def hidden_model(rms: bool) -> onnx.ModelProto:
    """Embedding -> norm -> FFN -> norm -> classifier: the hidden size is the residual stream."""
    g = Graph()
    h = g.op("Gather", g.weight(50, 16), "ids", axis=0)
    if rms:  # x / sqrt(mean(x^2) + eps) * w
        ms = g.op(
            "ReduceMean",
            g.op("Pow", h, g.const(np.float32(2))),
            g.const(np.array([-1], np.int64)),
            keepdims=1,
        )
        n = g.op(
            "Mul",
            g.op("Div", h, g.op("Sqrt", g.op("Add", ms, g.const(np.float32(1e-6))))),
            g.const(np.ones(16, np.float32)),
        )
    else:
        n = g.op(
            "LayerNormalization",
            h,
            g.const(np.ones(16, np.float32)),
            g.const(np.zeros(16, np.float32)),
            axis=-1,
        )
    h = g.op(
        "Add",
        h,
        g.op("MatMul", g.op("Relu", g.op("MatMul", n, g.weight(16, 32))), g.weight(32, 16)),
    )
    g.op("MatMul", h, g.weight(16, 3))
    g.nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        g.nodes,
        "h",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, S])],
        [helper.make_tensor_value_info("y", 1, [1, S, 3])],
        g.inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_hidden_size_is_opt_in_and_lossy(rms):
    model = hidden_model(rms)
    exact = spa.analyze(model)
    assert sorted(g.width for g in exact.groups) == [32]  # only the FFN: the hidden size is pinned
    lossy = spa.analyze(model, prune_hidden=True)
    hidden = [g for g in lossy.groups if g.width == 16]
    assert (
        len(hidden) == 1
        and hidden[0].lossy
        and not [g for g in lossy.groups if g.width == 32][0].lossy
    )
    # verified: valid, same signature
    result = spa.prune(model, ratio=0.5, round_to=1, prune_hidden=True)
    table = [m for m in result.analysis.members if m.value.const_value.shape[0] == 50]
    assert table and table[0].value.const_value.shape == (50, 8)
    assert result.report()["groups"][[g["width"] for g in result.report()["groups"]].index(16)][
        "lossy"
    ]


def recurrent(op: str, direction: str = "forward", hidden: int = 12) -> onnx.ModelProto:
    g = Graph()
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    dirs = 2 if direction == "bidirectional" else 1
    x = g.op("Relu", g.op("MatMul", "x", g.weight(6, 8)))  # (S, 1, 8): prunable input features
    ins = [
        x,
        g.weight(dirs, gates * hidden, 8),
        g.weight(dirs, gates * hidden, hidden),
        g.weight(dirs, 2 * gates * hidden),
    ]
    # Y (S, dirs, 1, hidden)
    y = g.op(op, *ins, hidden_size=hidden, direction=direction, outputs=2)[0]
    y = g.op(
        "Reshape",
        g.op("Transpose", y, perm=[0, 2, 1, 3]),
        g.const(np.array([S, 1, dirs * hidden], np.int64)),
    )
    g.op("MatMul", y, g.weight(dirs * hidden, 3))
    g.nodes[-1].output[0] = "y"
    return g.model({"x": [S, 1, 6]}, {"y": [S, 1, 3]})


@pytest.mark.parametrize(
    "op,direction",
    [("LSTM", "forward"), ("GRU", "bidirectional"), ("RNN", "forward"), ("LSTM", "bidirectional")],
)
def test_recurrent_hidden_units(op, direction):
    model = recurrent(op, direction)
    assert sorted(g.width for g in spa.analyze(model).groups) == [8, 12]
    error, removed = spa.zero_channel_check(model, ratio=0.5)
    assert removed == 10 and error <= 1e-4


def test_lstm_gate_layout():
    """Unit j of an LSTM owns row j of each of the four gate blocks of W, R and eight of B."""
    model = recurrent("LSTM", hidden=12)
    result = spa.prune(model, ratio=0.5, round_to=1, importance="random")
    kept = result.report()["groups"]
    lstm = next(g for g in kept if g["layers"][0]["op"] == "LSTM")["layers"][0]["kept"]
    assert len(lstm) == 6
    rows = np.concatenate([np.array(lstm) + gate * 12 for gate in range(4)])
    original = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "LSTM")
    pruned = {v.name: v.const_value.numpy() for v in result.model.graph.initializers.values()}
    w, r, b = (original[name] for name in node.input[1:4])
    assert np.array_equal(
        pruned[node.input[1]], w[:, rows][:, :, np.sort(np.array(_kept_inputs(kept)))]
    )
    assert np.array_equal(pruned[node.input[2]], r[:, rows][:, :, lstm])
    assert np.array_equal(pruned[node.input[3]], b[:, np.concatenate([rows, rows + 48])])
    lstm_node = next(n for n in result.model.graph if n.op_type == "LSTM")
    assert lstm_node.attributes["hidden_size"].value == 6


def _kept_inputs(groups) -> list[int]:
    return next(g for g in groups if g["layers"][0]["op"] == "MatMul")["layers"][0]["kept"]


def test_a_plan_that_removes_a_kv_head_but_keeps_a_query_head_reading_it_is_refused():
    import onnx_ir as ir

    from spa.analysis import analyze
    from spa.errors import SpaError
    from spa.normalize import normalize
    from spa.plan import plan_from_report

    model = attention(heads=4, kv_heads=2)
    result = spa.prune(model, ratio=0.5, round_to=1)  # a whole kv group (see above)
    report = result.report()
    analysis = analyze(normalize(ir.serde.deserialize_model(model)))
    assert plan_from_report(analysis, report).removed.tolist() == result.plan.removed.tolist()
    q = next(layer for g in report["groups"] for layer in g["layers"] if layer["width"] == 16)
    q["kept"] = list(range(16))  # every query head back, its kv head still gone
    with pytest.raises(SpaError, match="goes only with all of its query heads"):
        plan_from_report(analysis, report)
