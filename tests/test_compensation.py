"""Compensation is exact where it must be, and statistics do not depend on batching."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import Graph, if_model
from onnx import numpy_helper

import spa
from spa import apply, compensate, io, normalize, statistics
from spa.analysis import analyze


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    sess = spa.runtime.session(io.clone(model))
    return sess.run(None, {"x": x})[0]


def _pruned_and_refit(
    model: onnx.ModelProto, removed_channels: list[int], feeds: list[dict]
) -> tuple[ir.Model, ir.Model]:
    """Remove the given output channels of the first layer, then refit its consumers, with a
    vanishing ridge: the default ridge trades a little exactness for robustness."""
    work = ir.serde.deserialize_model(model)
    normalize.normalize(work)
    analysis = analyze(work)
    first = analysis.spaces[0].labels
    removed = np.unique(analysis.sets.find(first[removed_channels]))
    original = io.clone(work)
    keeps = apply.weight_keeps(analysis, removed)
    apply.apply(analysis, removed)
    compensate.refit(original, work, statistics.consumers(original), feeds, keeps, damping=1e-7)
    return original, work


def test_channels_that_are_combinations_of_kept_ones_are_reconstructed_exactly():
    """Outputs 6 and 7 of a linear layer are combinations of outputs 0..5: removing them and
    refitting the next layer loses nothing."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 6)).astype(np.float32)
    # (16, 8)
    w1 = np.concatenate([w1, w1 @ rng.standard_normal((6, 2)).astype(np.float32)], axis=1)
    g = Graph()
    h = g.op("MatMul", "x", g.const(w1))
    g.op("MatMul", h, g.weight(8, 4))
    g.nodes[-1].output[0] = "y"
    model = g.model({"x": [64, 16]}, {"y": [64, 4]})
    feeds = [{"x": rng.standard_normal((64, 16)).astype(np.float32)} for _ in range(4)]
    original, pruned = _pruned_and_refit(model, [6, 7], feeds)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    assert np.allclose(_run(original, x), _run(pruned, x), rtol=1e-3, atol=1e-3)


def test_a_constant_channel_is_absorbed_into_the_bias():
    """Channel 3 of a conv output is constant (zero weights, bias 2): after removing it, the next
    conv's new bias carries its contribution and the output is unchanged."""
    rng = np.random.default_rng(1)
    g = Graph()
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w[3] = 0
    b = rng.standard_normal(8).astype(np.float32)
    b[3] = 2.0
    h = g.op("Conv", "x", g.const(w), g.const(b), pads=[1, 1, 1, 1])
    g.op("Conv", h, g.weight(4, 8, 1, 1))  # no bias: one is added
    g.nodes[-1].output[0] = "y"
    model = g.model({"x": [2, 3, 6, 6]}, {"y": [2, 4, 6, 6]})
    feeds = [{"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)} for _ in range(8)]
    original, pruned = _pruned_and_refit(model, [3], feeds)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    assert np.allclose(_run(original, x), _run(pruned, x), rtol=1e-4, atol=1e-4)
    conv = [n for n in pruned.graph if n.op_type == "Conv"][1]
    assert len(conv.inputs) == 3 and conv.inputs[2] is not None


@pytest.mark.parametrize("residual", [True, False])
def test_the_last_layer_of_a_residual_block_makes_up_for_what_the_branch_lost(
    monkeypatch, residual
):
    """y = MatMul(MatMul(x, W1), W2) + x * c, where the pruned model's branch drifted (c moved, as
    upstream pruning moves a residual stream): the refit of W2 reproduces the original sum, since
    x (c - c') is linear in the 16 hidden features; fit to its own output only, it cannot."""
    rng = np.random.default_rng(3)
    c = rng.uniform(0.5, 1.5, 8).astype(np.float32)
    g = Graph()
    h = g.op("MatMul", "x", g.weight(8, 16))
    g.op("Add", g.op("MatMul", h, g.weight(16, 8)), g.op("Mul", "x", g.const(c, "scale")))
    g.nodes[-1].output[0] = "y"
    original = ir.serde.deserialize_model(g.model({"x": [64, 8]}, {"y": [64, 8]}))
    normalize.normalize(original)
    pruned = io.clone(original)
    scale = pruned.graph.initializers[
        next(n for n in pruned.graph.initializers if n.startswith("scale"))
    ]
    scale.const_value = ir.tensor(c + rng.uniform(0.2, 0.5, 8).astype(np.float32), name=scale.name)
    if not residual:
        monkeypatch.setattr(compensate, "_residual_partner", lambda *args: None)
    feeds = [{"x": rng.standard_normal((64, 8)).astype(np.float32)} for _ in range(4)]
    compensate.refit(original, pruned, statistics.consumers(original), feeds, {}, damping=1e-7)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    assert np.allclose(_run(original, x), _run(pruned, x), rtol=1e-3, atol=1e-3) == residual


def test_a_layer_after_a_matmul_that_gained_a_bias_reads_it_with_the_bias():
    """x -> MatMul -> MatMul -> MatMul: removing a constant channel of the first gives the second a
    bias, an Add after it; the third must be refit on what it now reads, the Add's output (it read
    the MatMul's and learnt a bias against the missing one: a shift of the outputs)."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((5, 8)).astype(np.float32)
    w1[:, 3], w1[4, 3] = 0, 2.0  # channel 3 = 2 * x[:, 4], and x[:, 4] is always 1
    g = Graph()
    h = g.op("MatMul", g.op("MatMul", "x", g.const(w1)), g.weight(8, 6))
    g.op("MatMul", h, g.weight(6, 4))
    g.nodes[-1].output[0] = "y"
    model = g.model({"x": [64, 5]}, {"y": [64, 4]})

    def sample():
        return np.concatenate([rng.standard_normal((64, 4)), np.ones((64, 1))], axis=1).astype(
            np.float32
        )

    original, pruned = _pruned_and_refit(model, [3], [{"x": sample()} for _ in range(4)])
    x = sample()
    assert np.allclose(_run(original, x), _run(pruned, x), rtol=1e-4, atol=1e-4)


def test_a_graph_output_that_later_layers_read_is_refit_whatever_shape_it_declares():
    """Found in review: shape inference keeps a graph output's declared shape ([1, 32] here, while
    the batch is symbolic); as the input of a step of spa.statistics.Forward, onnxruntime
    enforced it on a batch of 64."""
    g = Graph()
    hidden = g.op("Relu", g.gemm(g.op("Relu", g.gemm("x", 16, 32)), 32, 32))
    y = g.gemm(g.op("Relu", g.gemm(hidden, 32, 32)), 32, 8)
    graph = onnx.helper.make_graph(
        g.nodes,
        "m",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 16])],
        [
            onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, ["batch", 8]),
            onnx.helper.make_tensor_value_info(hidden, onnx.TensorProto.FLOAT, [1, 32]),
        ],
        g.inits,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    data = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    result = spa.prune(model, ratio=0.5, round_to=1, calibration=data)
    assert result.method.calibration == "data" and result.method.compensated


@pytest.mark.parametrize("batch", [8, 64])
@pytest.mark.parametrize("removed", ["combinations of kept ones", "independent"])
def test_the_ridge_is_cross_validated_where_rows_are_few(removed, batch):
    """64 rows for 40 kept features, in batches of 8 or in one: where the removed features are
    combinations of the kept ones the fit holds on unseen rows and the least ridge wins; where
    they are independent, what the fit learns from 32 rows does not carry over and a stronger
    ridge wins."""
    rng = np.random.default_rng(0)
    kept = rng.standard_normal((64, 40))
    gone = (
        kept @ rng.standard_normal((40, 8))
        if removed == "combinations of kept ones"
        else rng.standard_normal((64, 8))
    )
    ones = np.ones((64, 1))
    pruned_features, original_features = np.hstack([kept, ones]), np.hstack([kept, gone, ones])
    halves = compensate._Halves()
    for i in range(0, 64, batch):
        halves.add(
            pruned_features[i : i + batch].astype(np.float32),
            original_features[i : i + batch].astype(np.float32),
        )
    assert [h.count for h in halves.halves] == [32, 32]
    target = rng.standard_normal((5, 49))
    prior = target[:, list(range(40)) + [48]].T
    _, chosen = compensate._cross_validated(
        halves.halves, [target], prior, [0.01 * 10**k for k in range(4)]
    )
    assert (chosen == 0.01) == (removed == "combinations of kept ones")


def test_the_ridge_is_cross_validated_however_many_rows_a_layer_has(monkeypatch):
    """256 rows for 9 features: real calibration data cross-validates the ridge all the same (a
    conv's rows are patches of few images: EfficientNet-Lite0's refit from crops of 10 photos
    carried far better with it); synthetic data does not (noise says nothing of real inputs)."""
    model, w2 = _two_dense_layers()
    chosen = []

    def cross_validated(halves, targets, prior, dampings):
        target, damping = original(halves, targets, prior, dampings)
        chosen.append((halves[0].count, len(dampings)))
        return target, damping

    original = compensate._cross_validated
    monkeypatch.setattr(compensate, "_cross_validated", cross_validated)
    x = np.random.default_rng(3).standard_normal((256, 8)).astype(np.float32)
    spa.prune(model, ratio=0.5, round_to=1, calibration=x)
    rows = 256 - 256 // 8  # the held-out samples are not fit
    assert chosen == [(rows // 2, 4)] * 2  # both layers, one half of the rows, four ridges
    chosen.clear()
    spa.prune(model, ratio=0.5, round_to=1, calibration="synthetic")
    assert chosen == []


def test_obs_removes_redundant_channels_one_at_a_time():
    """Hidden channels 0 and 1 are copies, 2..5 independent. Either copy alone is free to remove,
    both together are not: greedy OBS removes one copy, then the cheapest independent channels."""
    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((8, 6)).astype(np.float32)
    w1[:, 1] = w1[:, 0]
    w2 = rng.standard_normal((6, 4)).astype(np.float32)
    w2[2:] *= np.array([[0.1], [1.0], [1.0], [1.0]], dtype=np.float32)  # channel 2 matters least
    g = Graph()
    h = g.op("MatMul", "x", g.const(w1))
    h = g.op("Relu", h)
    g.op("MatMul", h, g.const(w2))
    g.nodes[-1].output[0] = "y"
    model = g.model({"x": ["n", 8]}, {"y": ["n", 4]})
    data = rng.standard_normal((256, 8)).astype(np.float32)
    result = spa.prune(model, ratio=0.5, round_to=1, calibration=data)
    kept = next(v for v in result.model.graph.initializers.values() if v.const_value.shape[0] == 8)
    kept_columns = kept.const_value.numpy().T.tolist()
    assert sum(np.allclose(c, w1[:, 0]) for c in kept_columns) == 1  # one copy stays
    assert not any(np.allclose(c, w1[:, 2]) for c in kept_columns)


def test_statistics_are_the_same_in_one_batch_or_many():
    model = io.load("models/torch/resnet_legacy.onnx")
    normalize.normalize(model)
    found = statistics.consumers(model)
    x = np.random.default_rng(2).standard_normal((12, 3, 32, 32)).astype(np.float32)
    one = statistics.collect(model, found, [{"input": x}])
    many = statistics.collect(model, found, [{"input": x[:5]}, {"input": x[5:6]}, {"input": x[6:]}])
    for c in found:
        assert one[c.weight].count == many[c.weight].count
        assert np.allclose(
            one[c.weight].mean_gram(), many[c.weight].mean_gram(), rtol=1e-5, atol=1e-3
        )


@pytest.mark.parametrize("kept_bytes", [statistics.KEPT_BYTES, 0])
def test_forward_gives_the_values_that_running_prefixes_gives(monkeypatch, kept_bytes):
    """Each node runs once, and what later nodes read (an If's branches included) is kept between
    steps; with nothing kept (over the memory budget), or for a value asked again out of order,
    it runs prefixes."""
    monkeypatch.setattr(statistics, "KEPT_BYTES", kept_bytes)
    rng = np.random.default_rng(0)
    resnet = io.load("models/torch/resnet_legacy.onnx")
    branching = ir.serde.deserialize_model(if_model())
    cases = [
        (
            resnet,
            [{"input": rng.standard_normal((n, 3, 32, 32)).astype(np.float32)} for n in (2, 3)],
        ),
        (
            branching,
            [
                {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32), "cond": np.array(c)}
                for c in (True, False)
            ],
        ),
    ]
    for model, feeds in cases:
        normalize.normalize(model)
        names = list(dict.fromkeys(c.input for c in statistics.consumers(model)))
        forward = statistics.Forward(model, feeds)
        for name in names + names[1:2]:
            expected = [statistics.exposing(model, [name])(feed)[name] for feed in feeds]
            got = list(forward.values(name))
            assert all(np.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(expected, got)), name


@pytest.mark.parametrize("calibration", ["synthetic", "arrays", "arrays, wide layers"])
@pytest.mark.slow
def test_zero_channel_test_holds_with_compensation(calibration, monkeypatch):
    if "wide" in calibration:  # the mean-only repair of layers too wide for statistics
        monkeypatch.setattr(statistics, "MAX_WIDTH", 100)
    data = (
        "synthetic"
        if calibration == "synthetic"
        else np.random.default_rng(3).standard_normal((64, 3, 32, 32)).astype(np.float32)
    )
    error, removed = spa.zero_channel_check(
        "models/torch/mobilenetv2_dynamo.onnx", calibration=data
    )
    assert removed > 0 and error <= 1e-4


@pytest.mark.slow
def test_calibration_reader_and_files(tmp_path):
    """An onnxruntime CalibrationDataReader-like object, a .npy and a .npz all work."""
    x = np.random.default_rng(4).standard_normal((40, 3, 32, 32)).astype(np.float32)

    class Reader:
        def __init__(self):
            self.batches = iter([{"input": x[:20]}, {"input": x[20:]}])

        def get_next(self):
            return next(self.batches, None)

    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", input=x)
    for source in (Reader(), tmp_path / "x.npy", tmp_path / "x.npz"):
        result = spa.prune("models/torch/vgg_legacy.onnx", ratio=0.3, calibration=source)
        assert result.after.macs < result.before.macs


@pytest.mark.slow
def test_default_without_data_is_the_data_free_refit_where_it_is_cheap(monkeypatch):
    result = spa.prune("models/mnist/vgg.onnx", ratio=0.3, round_to=1)
    assert result.method == spa.api.Method("obs", "synthetic", True, None)
    monkeypatch.setattr(spa.calibration, "DATA_FREE_BUDGET_MACS", 1e6)
    result = spa.prune("models/mnist/vgg.onnx", ratio=0.3, round_to=1)
    assert (result.method.importance, result.method.calibration, result.method.compensated) == (
        "l2",
        None,
        False,
    )
    assert "multiply-accumulates" in result.method.note


def test_default_without_data_is_magnitude_for_integer_inputs():
    result = spa.prune("models/transformers/bert_legacy.onnx", ratio=0.3)
    assert result.method.importance == "l2" and "integer inputs" in result.method.note


def test_a_model_with_a_fixed_batch_takes_calibration_in_batches_of_its_size():
    """Batches of the model's own size; samples that do not fill one are left out."""
    from spa import calibration, runtime

    fixed = io.load("models/mnist/vgg.onnx")
    fixed.graph.inputs[0].shape = ir.Shape([4, *fixed.graph.inputs[0].shape[1:]])
    sess = runtime.session(fixed)
    x = np.zeros((10, *sess.get_inputs()[0].shape[1:]), np.float32)
    feeds = calibration.batches(x, sess)
    assert [f[sess.get_inputs()[0].name].shape[0] for f in feeds] == [4, 4]
    assert len(calibration.batches("synthetic", sess)) == calibration.SYNTHETIC_SAMPLES // 4


def test_batchnorm_means_are_those_of_a_clipped_gaussian():
    rng = np.random.default_rng(5)
    mu, sigma = np.array([0.5, -1.0, 3.0]), np.array([1.0, 2.0, 4.0])
    z = mu + sigma * rng.standard_normal((400_000, 3))
    for low, high in [(0.0, np.inf), (0.0, 6.0), (-np.inf, np.inf)]:
        assert np.allclose(
            statistics._clipped_gaussian_mean(mu, sigma, low, high),
            np.clip(z, low, high).mean(axis=0),
            atol=0.02,
        )


@pytest.mark.parametrize("activation", ["Relu", "Clip"])
def test_without_data_a_constant_batchnorm_channel_is_absorbed_into_the_bias(activation):
    """A BatchNormalization channel with gamma 0 outputs beta, whatever its input: pruned without
    data, the next conv's bias absorbs relu(beta) (clip(beta, 0, 6)) and the outputs do not
    change."""
    rng = np.random.default_rng(6)
    g = Graph()
    h = g.conv("x", 3, 8)
    gamma, beta = (
        rng.uniform(0.5, 1.5, 8).astype(np.float32),
        rng.standard_normal(8).astype(np.float32),
    )
    gamma[[2, 5]], beta[[2, 5]] = 0.0, [1.5, 7.0]
    h = g.op(
        "BatchNormalization",
        h,
        g.const(gamma),
        g.const(beta),
        g.const(np.zeros(8, np.float32)),
        g.const(np.ones(8, np.float32)),
    )
    h = (
        g.op("Relu", h)
        if activation == "Relu"
        else g.op("Clip", h, g.const(np.float32(0)), g.const(np.float32(6)))
    )
    g.op("Conv", h, g.weight(4, 8, 3, 3), pads=[1, 1, 1, 1])
    g.nodes[-1].output[0] = "y"
    model = g.model({"x": ["n", 3, 8, 8]}, {"y": ["n", 4, 8, 8]})
    constant = [2, 5]  # remove exactly these
    original = io.clone(ir.serde.deserialize_model(model))
    work = ir.serde.deserialize_model(model)
    normalize.normalize(work)
    analysis = analyze(work)
    removed = np.unique(analysis.sets.find(analysis.spaces[0].labels[constant]))
    found = statistics.consumers(work)
    keeps = apply.weight_keeps(analysis, removed)
    shifts = compensate.mean_shifts(work, found, statistics.batchnorm_means(work, found), keeps)
    apply.apply(analysis, removed)
    assert compensate.shift_biases(work, found, shifts) == 1
    # Padding: at the border a removed channel's constant is missing from the patch; inside, exact.
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert np.allclose(
        _run(original, x)[..., 1:-1, 1:-1], _run(work, x)[..., 1:-1, 1:-1], rtol=1e-4, atol=1e-4
    )


def test_default_without_data_absorbs_batchnorm_means_where_the_refit_is_too_costly(monkeypatch):
    monkeypatch.setattr(spa.calibration, "DATA_FREE_BUDGET_MACS", 1e6)
    # 0.5: at 0.3, kept counts rounded up to the SIMD multiple remove nothing from this small net
    result = spa.prune("models/torch/densenet_legacy.onnx", ratio=0.5)
    assert (result.method.calibration, result.method.compensated) == ("batchnorm", True)
    result = spa.prune("models/torch/densenet_legacy.onnx", ratio=0.5, compensate=False)
    assert (result.method.calibration, result.method.compensated) == (None, False)


def test_symbolic_image_dims_need_input_shapes_for_the_data_free_refit(tmp_path):
    """Noise of height 1 says nothing about an image model: without --input-shapes the default
    falls back and says why, and an explicit synthetic calibration is an error."""
    path = "models/transformers/conv1d_legacy.onnx"  # input (batch, 16, seq)
    assert "--input-shapes" in spa.prune(path, ratio=0.3).method.note
    with pytest.raises(spa.SpaError, match="symbolic dims"):
        spa.prune(path, ratio=0.3, calibration="synthetic")
    assert (
        spa.prune(path, ratio=0.3, input_shapes={"x": [1, 16, 64]}).method.calibration
        == "synthetic"
    )


def test_batchnorm_means_only_reach_dense_layers_that_read_its_channels(tmp_path):
    """A BN over axis 1 of a (N, C, H) tensor feeds a MatMul over H: its means belong to other
    channels than the MatMul's inputs, so none are absorbed (it used to crash or shift wrongly)."""
    g = Graph()
    h = g.op("MatMul", "x", g.weight(8, 16))
    h = g.op("Relu", g.bn(h, 4))
    g.op("MatMul", h, g.weight(16, 8))
    g.nodes[-1].output[0] = "y"
    result = spa.prune(
        g.model({"x": [2, 4, 8]}, {"y": [2, 4, 8]}), ratio=0.5, round_to=1, importance="l2"
    )
    assert (result.method.calibration, result.method.compensated) == (None, False)


def test_a_model_that_noise_breaks_prunes_without_data_and_says_why():
    """x -> Log -> Conv: half of any noise is negative, so the statistics would be NaN."""
    g = Graph()
    h = g.conv(g.op("Log", "x"), 3, 8)
    g.op("Conv", g.op("Relu", h), g.weight(4, 8, 3, 3), pads=[1, 1, 1, 1])
    g.nodes[-1].output[0] = "y"
    result = spa.prune(g.model({"x": ["n", 3, 8, 8]}, {"y": ["n", 4, 8, 8]}), ratio=0.5, round_to=1)
    assert result.method.importance == "l2" and "fails on synthetic data" in result.method.note


def test_a_model_whose_activations_overflow_the_statistics_prunes_without_data_and_says_why():
    """Weights that multiply the activations 10^4-fold per layer: float32 products overflow."""
    g = Graph()
    x, width = "x", 3
    for _ in range(5):
        x, width = g.op("Relu", g.conv(x, width, 16)), 16
    g.op("Identity", x)
    g.nodes[-1].output[0] = "y"
    model = g.model({"x": [1, 3, 16, 16]}, {"y": [1, 16, 16, 16]})
    for t in model.graph.initializer:
        w = onnx.numpy_helper.to_array(t)
        if w.ndim == 4:
            t.CopyFrom(onnx.numpy_helper.from_array(np.abs(w) * np.float32(3e4), t.name))
    result = spa.prune(model, ratio=0.5, round_to=1)
    assert result.method.calibration is None and "overflow float32 statistics" in result.method.note


def test_the_cost_estimate_is_per_sample_whatever_batch_the_analysis_used():
    model = io.load("models/mnist/vgg.onnx")
    normalize.normalize(model)
    found = statistics.consumers(model)
    name = model.graph.inputs[0].name
    one, many = (
        spa.calibration.data_free_work(model, analyze(model, {name: [n, 1, 28, 28]}).shapes, found)
        for n in (1, 64)
    )
    assert abs(one - many) <= 0.01 * one


def test_a_layer_too_wide_for_statistics_keeps_its_weights_and_its_mean_output(monkeypatch):
    """Above MAX_WIDTH features (VGG-16's 25,088-input classifier: 5 GB a matrix, killed at 24 GB)
    a layer is not scored or refit from second moments: it keeps the weights of its kept inputs
    and its bias moves so that its mean output on the calibration data is the original's."""
    monkeypatch.setattr(statistics, "MAX_WIDTH", 32)
    g = Graph()
    g.op("Relu", g.gemm("x", 16, 64))
    g.gemm(g.nodes[-1].output[0], 64, 8)
    g.nodes[-1].output[0] = "y"
    model = g.model({"x": ["N", 16]}, {"y": ["N", 8]})
    x = np.random.default_rng(5).standard_normal((256, 16)).astype(np.float32)
    result = spa.prune(model, ratio=0.5, round_to=1, calibration=x)
    wide = g.nodes[-1].name or g.nodes[-1].input[1]
    assert (
        result.method.too_wide == [wide] and "only their biases refit" in result.method.describe()
    )
    original = ir.serde.deserialize_model(model)
    # the rest is held out to measure the result
    fit = x[: -len(x) // spa.calibration.HELD_OUT_SHARE]
    assert np.allclose(
        _run(result.model, fit).mean(axis=0), _run(original, fit).mean(axis=0), atol=1e-4
    )
    weights = {v.name: v.const_value.numpy() for v in result.model.graph.initializers.values()}
    kept = weights[g.nodes[-1].input[1]]
    assert kept.shape == (8, 32)
    wide_weight = onnx.numpy_helper.to_array(
        next(i for i in g.inits if i.name == g.nodes[-1].input[1])
    )
    assert all(any(np.array_equal(column, w) for w in wide_weight.T) for column in kept.T)


def test_a_wide_layer_costs_the_data_free_estimate_nothing_but_its_pass():
    """It needs no products or solves: a 25,088-input dense layer alone stays under the cap."""
    g = Graph()
    g.op("Relu", g.gemm("x", 25088, 4))
    g.nodes[-1].output[0] = "y"
    model = ir.serde.deserialize_model(g.model({"x": [1, 25088]}, {"y": [1, 4]}))
    found = statistics.consumers(model)
    assert (
        found[0].wide and spa.calibration.data_free_work(model, analyze(model).shapes, found) < 1e9
    )


def test_the_cost_estimate_counts_prefix_runs_where_forward_would_keep_too_much(monkeypatch):
    """DenseNet-121 at 224x224 keeps 2.3 GiB of concatenated features over 256 samples: Forward
    runs prefixes past KEPT_BYTES, and the estimate must say so (it is then 133 T, not 5)."""
    model = io.load("models/torch/resnet_legacy.onnx")
    normalize.normalize(model)
    found, shapes = statistics.consumers(model), analyze(model).shapes
    stepwise = spa.calibration.data_free_work(model, shapes, found)
    monkeypatch.setattr(spa.calibration, "KEPT_BYTES", 0)
    assert spa.calibration.data_free_work(model, shapes, found) > 2 * stepwise


def _two_dense_layers() -> tuple[onnx.ModelProto, str]:
    """x (8) -> MatMul -> Relu (16) -> MatMul -> y (4); and the second weight's name."""
    g = Graph()
    w2 = g.weight(16, 4)
    g.op("MatMul", g.op("Relu", g.op("MatMul", "x", g.weight(8, 16))), w2)
    g.nodes[-1].output[0] = "y"
    return g.model({"x": ["batch", 8]}, {"y": ["batch", 4]}), w2


def test_damping_pulls_the_refit_towards_the_original_weights():
    """--damping is the ridge of the scores and the refit: at a vanishing one the next layer is
    refit to the calibration data, at a huge one it keeps the original weights of its kept inputs
    (the same channels removed, by the first prune's plan)."""
    model, w2 = _two_dense_layers()
    x = np.random.default_rng(2).standard_normal((256, 8)).astype(np.float32)
    second = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == w2))

    def refit_weight(damping: float, plan=None) -> tuple[np.ndarray, dict]:
        result = spa.prune(model, ratio=0.5, round_to=1, calibration=x, damping=damping, plan=plan)
        assert result.report()["options"]["damping"] == damping
        assert ("(damping 1e+06)" in result.method.describe()) == (damping == 1e6)
        weight = next(
            v.const_value.numpy()
            for v in result.model.graph.initializers.values()
            if v.const_value is not None and v.const_value.numpy().shape == (8, 4)
        )
        return weight, result.report()

    fitted, report = refit_weight(1e-6)
    (group,) = report["groups"]
    prior = second[group["layers"][0]["kept"]]
    held, _ = refit_weight(1e6, plan=report)
    assert np.abs(held - prior).max() < 1e-4 < np.abs(fitted - prior).max()
    with pytest.raises(spa.SpaError, match="damping"):
        spa.prune(model, calibration=x, damping=0.0)


def test_damping_without_data_is_said_to_be_ignored(caplog):
    model, _ = _two_dense_layers()
    spa.prune(model, importance="l2", damping=0.1)
    assert "damping 0.1 is ignored: no calibration data" in caplog.text
