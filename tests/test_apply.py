"""The surgery: the keeps and shapes it announces are what it does; rewrites registered once;
what it writes still fuses in onnxruntime."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphs import Graph

import spa
from spa import rules
from spa.analysis import analyze
from spa.apply import apply, pruned_shapes, weight_keeps
from spa.normalize import normalize


def _cnn():
    """conv 3->8 -> relu -> conv 8->8 (+ residual) -> pool -> flatten -> gemm 8->4."""
    g = Graph(seed=0)
    a = g.op("Relu", g.conv("x", 3, 8))
    b = g.op("Add", a, g.conv(a, 8, 8))
    y = g.gemm(g.op("Flatten", g.op("GlobalAveragePool", b)), 8, 4)
    model = ir.serde.deserialize_model(g.model({"x": [2, 3, 6, 6]}, {y: [2, 4]}))
    normalize(model)
    return model, analyze(model)


def _removed(analysis, per_group: int) -> np.ndarray:
    return np.concatenate([g.classes[:per_group] for g in analysis.groups])


def test_weight_keeps_are_what_the_surgery_keeps():
    model, analysis = _cnn()
    removed = _removed(analysis, 3)
    keeps = weight_keeps(analysis, removed)
    before = {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}
    apply(analysis, removed)
    assert keeps, "no initializer lost anything"
    for name, keep in keeps.items():
        after = model.graph.initializers[name].const_value.numpy()
        assert np.array_equal(after, before[name][np.ix_(*keep)]), name


def test_pruned_shapes_are_the_shapes_after_the_surgery():
    model, analysis = _cnn()
    removed = _removed(analysis, 3)
    predicted = {value.name: shape for value, shape in pruned_shapes(analysis, removed).items()}
    apply(analysis, removed)
    values = [*model.graph.initializers.values(), *(o for n in model.graph for o in n.outputs)]
    checked = 0
    for value in values:
        if value.name in predicted and value.shape is not None:
            assert tuple(value.shape.numpy()) == predicted[value.name], value.name
            checked += 1
    assert checked >= 8
    assert predicted[model.graph.initializers["w1"].name] == (5, 3, 3, 3)


@pytest.mark.parametrize(
    "path", ["models/mnist/resnet_bn.onnx", "models/transformers/llama_dynamo.onnx"]
)
def test_a_plan_that_cuts_one_group_changes_the_shapes_it_predicts_and_no_others(path):
    """pruned_shapes recomputes only the tensors that carry a removed class (a sensitivity
    trial cuts one group): every other shape must come through the surgery unchanged."""
    model = spa.io.load(path)
    normalize(model)
    analysis = analyze(model)
    group = max(analysis.groups, key=lambda g: g.width)
    removed = np.sort(group.classes[: len(group.classes) // 2])
    predicted = {value.name: shape for value, shape in pruned_shapes(analysis, removed).items()}
    apply(analysis, removed)
    values = [*model.graph.initializers.values(), *(o for n in model.graph for o in n.outputs)]
    changed = 0
    for value in values:
        if value.name in predicted and value.shape is not None and value.shape.is_static():
            assert tuple(value.shape.numpy()) == predicted[value.name], value.name
            changed += predicted[value.name] != tuple(analysis.shapes.get(value, ()))
    assert changed >= 2


def test_removing_nothing_changes_nothing():
    model, analysis = _cnn()
    before = ir.serde.serialize_model(model).SerializeToString()
    apply(analysis, np.array([], dtype=np.int64))
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_a_rewrite_needs_a_rule_and_an_op_has_one_rewrite():
    with pytest.raises(ValueError, match="no rule to rewrite"):
        rules.rewrite("NoSuchOp")(lambda surgery, node: None)
    with pytest.raises(ValueError, match="already rewritten"):
        rules.rewrite("Conv")(lambda surgery, node: None)


def _ort_optimized_ops(path, folder) -> dict:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(folder / f"{path.stem}.ort.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(
        f"{n.domain}::{n.op_type}" for n in onnx.load(options.optimized_model_filepath).graph.node
    )


def test_onnxruntime_fusions_survive_pruning(tmp_path):
    """Sliced weights, no inserted Gather/Slice: Conv+BN+activation and Gemm+bias still fuse."""
    g = Graph()
    h = g.op("Relu", g.bn(g.conv("x", 3, 32), 32))
    h = g.op("Clip", g.bn(g.conv(h, 32, 32), 32), g.const(np.float32(0)), g.const(np.float32(6)))
    h = g.op("Flatten", g.op("GlobalAveragePool", h))
    g.op("Relu", g.gemm(h, 32, 16))
    g.nodes[-1].output[0] = "y"
    original = tmp_path / "m.onnx"
    onnx.save(g.model({"x": [1, 3, 16, 16]}, {"y": [1, 16]}), original)
    spa.prune(original, tmp_path / "p.onnx", ratio=0.5)
    before = _ort_optimized_ops(original, tmp_path)
    after = _ort_optimized_ops(tmp_path / "p.onnx", tmp_path)
    assert before == after
    assert before["com.microsoft::FusedConv"] == 2 and "::BatchNormalization" not in before
