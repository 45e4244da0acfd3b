"""Allocation from measured sensitivity: zeroing a group's channels measures exactly what removing
them costs; the groups that cost least per MAC lose the most."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import Graph

import spa
from spa import io, runtime, sensitivity, verify
from spa.analysis import analyze
from spa.apply import apply
from spa.count import count
from spa.normalize import normalize
from spa.plan import make_plan
from spa.score import score


def _curves(analysis, scores, feeds):
    def plan_for_group(gid, fraction):
        return make_plan(analysis, scores, 0.0, 1, shares={gid: fraction}).removed

    return sensitivity.measure(
        analysis, plan_for_group, feeds, count(analysis.model, shapes=analysis.shapes), "macs", 0.8
    )


def test_the_measured_loss_is_the_loss_of_removing_the_channels():
    """On a real trained net with BatchNormalization: one group's zeroed parameters in the shared
    session give the outputs that the model with those channels removed gives."""
    model = io.load("models/mnist/resnet_bn.onnx")
    normalize(model)
    analysis = analyze(model)
    scores = score(analysis, "l2")
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    curves = _curves(analysis, scores, [{"input": x}])
    group = max(analysis.groups, key=lambda g: g.width)
    fraction, classes, _, loss = curves.points[group.id][4]  # half of the group
    original = runtime.session(io.clone(model)).run(None, {"input": x})
    removed = make_plan(analysis, scores, 0.0, 1, shares={group.id: fraction}).removed
    assert len(removed) == classes > 0
    apply(analysis, removed)
    pruned = runtime.session(model).run(None, {"input": x})
    names = [o.name for o in model.graph.outputs]
    feed = {"input": x}
    expected = sensitivity._expected(names, original, verify.class_scores(model), feed)
    assert loss > 0 and sensitivity._loss(expected, pruned, feed) == pytest.approx(loss, rel=1e-4)


def _two_hidden_layers() -> onnx.ModelProto:
    """x -> Gemm 16->32 -> Relu (h1) -> Gemm 32->32 -> Relu (h2); y = Gemm(h1) + Gemm(h2) * 1e-3:
    the second hidden layer's channels barely reach the output, the first's do."""
    g = Graph(seed=3)
    h1 = g.op("Relu", g.gemm("x", 16, 32))
    h2 = g.op("Relu", g.gemm(h1, 32, 32))
    faint = g.op(
        "Gemm", h2, g.const(g.rng.standard_normal((10, 32)).astype(np.float32) * 1e-3), transB=1
    )
    y = g.op("Add", g.gemm(h1, 32, 10), faint)
    return g.model({"x": ["N", 16]}, {y: ["N", 10]})


def test_the_cheapest_group_loses_the_most():
    model = _two_hidden_layers()
    x = np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32)
    options = dict(ratio=0.25, round_to=1, calibration=x, importance="l2", compensate=False)
    uniform = spa.prune(model, allocation="uniform", **options)
    measured = spa.prune(model, allocation="sensitivity", **options)
    assert (
        measured.method.allocation == "sensitivity"
        and "measured sensitivity" in measured.method.describe()
    )
    first, second = sorted(measured.analysis.groups, key=lambda g: g.id)  # h1, h2
    # 16 of 64, from the faint layer
    assert [len(measured.plan.by_group[g.id]) for g in (first, second)] == [0, 16]
    kl = [next(iter(r.verdict.fidelity.outputs.values()))["kl"] for r in (uniform, measured)]
    assert kl[1] < kl[0] / 10


def test_with_calibration_data_the_default_allocation_is_sensitivity_and_without_uniform():
    model = _two_hidden_layers()
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    assert (
        spa.prune(model, ratio=0.25, round_to=1, calibration=x).method.allocation == "sensitivity"
    )
    assert (
        spa.prune(model, ratio=0.25, round_to=1, calibration="synthetic").method.allocation
        == "uniform"
    )
    with pytest.raises(spa.SpaError, match="needs --calibration"):
        spa.prune(model, ratio=0.25, allocation="sensitivity", importance="l2")


def test_a_bump_in_a_curve_does_not_hide_the_cheap_steps_behind_it():
    # (fraction, classes, saved, loss): group 1's first step costs more than group 2's, but its
    # second is free: on average from the start, group 1 is the cheaper
    points = {
        1: [(0.0, 0, 0.0, 0.0), (0.5, 2, 10.0, 3.0), (1.0, 4, 20.0, 3.0)],
        2: [(0.0, 0, 0.0, 0.0), (0.5, 2, 10.0, 2.0), (1.0, 4, 20.0, 8.0)],
    }
    steps = sensitivity.order(points)
    assert [(s.group, s.end) for s in steps] == [(1, 0.5), (1, 1.0), (2, 0.5), (2, 1.0)]


def test_shares_take_the_flattest_steps_first_and_grow_with_the_ratio():
    """The step that would overshoot is taken in part: the budget is filled, not left short."""
    points = {
        1: [(0.0, 0, 0.0, 0.0), (0.5, 4, 100.0, 1.0)],
        2: [(0.0, 0, 0.0, 0.0), (0.5, 4, 100.0, 10.0)],
    }
    curves = sensitivity.Curves(points, sensitivity.order(points), total=16, samples=1, trials=2)
    assert curves.shares(0.1) == pytest.approx({1: 0.2, 2: 0.0}, abs=1e-6)
    assert curves.shares(0.25) == pytest.approx({1: 0.5, 2: 0.0}, abs=1e-6)
    assert curves.shares(0.375) == pytest.approx({1: 0.5, 2: 0.25}, abs=1e-6)
    assert curves.shares(0.5) == pytest.approx({1: 0.5, 2: 0.5}, abs=1e-6)


@pytest.mark.parametrize(
    "path, feed",
    [
        ("models/transformers/llama_lm_dynamo.onnx", "ids"),
        ("models/mnist/resnet_bn.onnx", "image"),
    ],
)
def test_trials_run_from_a_cut_measure_what_the_whole_model_measures(path, feed, monkeypatch):
    """A trial runs the model from the first node that reads its group's parameters, on the values
    that cross there, computed once: the curves are those of trials on the whole model."""
    rng = np.random.default_rng(0)
    if feed == "ids":
        feeds = [{"input_ids": rng.integers(0, 256, (4, 12)).astype(np.int64)} for _ in range(2)]
    else:
        feeds = [
            {"input": rng.standard_normal((4, 1, 28, 28)).astype(np.float32)} for _ in range(2)
        ]
    model = io.load(path)
    normalize(model)
    analysis = analyze(model)
    scores = score(analysis, "l2")
    cuts = []
    suffix = sensitivity._Suffixes._suffix
    monkeypatch.setattr(
        sensitivity._Suffixes,
        "_suffix",
        lambda self, cut, *a: cuts.append(cut) or suffix(self, cut, *a),
    )
    from_cuts = _curves(analysis, scores, feeds).points
    assert len(cuts) > 1 and min(cuts) > 0  # sessions that run a suffix of the model
    # a suffix that does not open (onnxruntime's untyped errors): its trials run the whole model

    def fails(self, *args):
        raise RuntimeError("cannot open")

    monkeypatch.setattr(sensitivity._Suffixes, "_suffix", fails)
    whole = _curves(analysis, scores, feeds).points
    assert whole.keys() == from_cuts.keys()
    for g, curve in whole.items():
        assert [p[:3] for p in curve] == [p[:3] for p in from_cuts[g]]
        np.testing.assert_allclose(
            [p[3] for p in from_cuts[g]], [p[3] for p in curve], rtol=1e-3, atol=1e-9
        )


@pytest.mark.parametrize("rows, samples", [(1, 8), (40, 4), (128, 1), (512, 1)])
def test_trials_take_a_window_of_positions_where_a_sample_gives_several(rows, samples):
    """An image gives one row of loss: 8 of them. A sequence's positions are not independent
    samples: at least 128, an LM window's worth (PP-OCR's 40-position lines: 4 lines, not 1)."""
    feeds = [{"x": np.zeros((32, 3), np.float32)} for _ in range(4)]
    chosen = sensitivity._samples(feeds, trials=1000, rows_per_sample=rows, whole=False)
    assert sum(len(f["x"]) for f in chosen) == samples
