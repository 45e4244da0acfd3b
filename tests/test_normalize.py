"""Normalization: each pass on a small graph of the form exporters write; outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort

from spa.normalize import (
    DropZeroInitialStates,
    FoldConstants,
    InitializersOutOfInputs,
    PushCastsIntoConcats,
    SplitSharedVectors,
    normalize,
)


def _model(text: str, **arrays) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(a, n) for n, a in arrays.items())
    return ir.serde.deserialize_model(proto)


def _run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    data = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


def _normalized_computes_the_same(model: ir.Model, feeds: dict) -> ir.Model:
    before = _run(model, feeds)
    normalize(model)
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    for a, b in zip(before, _run(model, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    return model


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


RNG = np.random.default_rng(0)
X = {"x": RNG.standard_normal((2, 4)).astype(np.float32)}


def test_a_shared_vector_gets_a_copy_per_use_and_the_layers_come_apart():
    """The dynamo exporter merges equal constants: two layers' zero biases become one tensor."""
    model = _model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 3] y, float[2, 3] z) {
            y = Gemm <transB: int = 1> (x, w1, b)
            z = Gemm <transB: int = 1> (x, w2, b)
        }""",
        w1=RNG.standard_normal((3, 4)).astype(np.float32),
        w2=RNG.standard_normal((3, 4)).astype(np.float32),
        b=np.zeros(3, np.float32),
    )
    assert SplitSharedVectors().change(model) == 1
    biases = [node.inputs[2] for node in model.graph]
    assert biases[0] is not biases[1] and len(model.graph.initializers) == 4
    assert SplitSharedVectors().change(model) == 0


def test_an_integer_shape_cast_as_a_whole_is_cast_piece_by_piece_and_folds():
    """tf2onnx builds a Reshape's shape in int32 and casts the vector: after the push, the constant
    pieces are int64 constants the surgery can rewrite."""
    model = _model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 2, 2] y) {
            batch32 = Constant <value_ints: ints = [2]> ()
            batch = Cast <to: int = 6> (batch32)
            shape32 = Concat <axis: int = 0> (batch, rest)
            shape = Cast <to: int = 7> (shape32)
            y = Reshape (x, shape)
        }""",
        rest=np.array([2, 2], np.int32),
    )
    normalize(model)
    assert _ops(model) == ["Reshape"]
    assert model.graph.node(0).inputs[1].const_value.numpy().tolist() == [2, 2, 2]
    assert PushCastsIntoConcats().change(model) == 0


def test_a_shape_of_a_static_tensor_folds_into_a_constant():
    model = _model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[4, 2] y) {
            s = Shape (x)
            r = Slice (s, starts, ends)
            shape = Concat <axis: int = 0> (r, two)
            y = Reshape (x, shape)
        }""",
        starts=np.array([1], np.int64),
        ends=np.array([2], np.int64),
        two=np.array([2], np.int64),
    )
    _normalized_computes_the_same(model, X)
    assert _ops(model) == ["Reshape"]
    assert FoldConstants().change(model) == 0


def test_random_ops_never_fold():
    model = _model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 4] y) {
            noise = RandomNormal <shape: ints = [2, 4]> ()
            y = Add (x, noise)
        }"""
    )
    normalize(model)
    assert _ops(model) == ["RandomNormal", "Add"]


def test_a_zero_initial_state_built_at_run_time_is_dropped():
    """Exporters write h0 = zeros(...) (ConstantOfShape); no state computes the same and has no
    hidden size to keep."""
    hidden = 3
    model = _model(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[5, 2, 4] x) => (float[5, 1, 2, {hidden}] y) {{
            h0 = ConstantOfShape (dims)
            y, h = GRU <hidden_size: int = {hidden}> (x, w, r, , , h0)
        }}""",
        dims=np.array([1, 2, hidden], np.int64),
        w=RNG.standard_normal((1, 3 * hidden, 4)).astype(np.float32),
        r=RNG.standard_normal((1, 3 * hidden, hidden)).astype(np.float32),
    )
    feeds = {"x": RNG.standard_normal((5, 2, 4)).astype(np.float32)}
    _normalized_computes_the_same(model, feeds)
    (gru,) = (n for n in model.graph if n.op_type == "GRU")
    assert len(gru.inputs) < 6 or gru.inputs[5] is None
    assert DropZeroInitialStates().change(model) == 0


def test_initializers_listed_as_inputs_by_old_exporters_are_weights():
    proto = onnx.parser.parse_model(
        """<ir_version: 3, opset_import: ["" : 9]>
        g (float[2, 4] x, float[4, 3] w) => (float[2, 3] y) {
            y = MatMul (x, w)
        }"""
    )
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((4, 3), np.float32), "w"))
    model = ir.serde.deserialize_model(proto)
    assert InitializersOutOfInputs().change(model) == 1
    assert [v.name for v in model.graph.inputs] == ["x"] and model.ir_version >= 4


def test_normalize_twice_changes_nothing_more():
    model = _model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 3] y) {
            h = Gemm <transB: int = 1> (x, w, b)
            y = Relu (h)
        }""",
        w=RNG.standard_normal((3, 4)).astype(np.float32),
        b=np.zeros(3, np.float32),
    )
    normalize(model)
    once = ir.serde.serialize_model(model).SerializeToString()
    normalize(model)
    assert ir.serde.serialize_model(model).SerializeToString() == once
