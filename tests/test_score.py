"""Channel importance: magnitude per class, dead channels first, OBS from statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from graphs import Graph

from spa import io, statistics
from spa.analysis import analyze
from spa.normalize import normalize
from spa.score import dead_first, reading_classes, score, score_with_statistics
from spa.statistics import collect, consumers

TRANSFORMERS = Path(__file__).parent.parent / "models" / "transformers"


def _mlp(scale_rows: dict[int, float] | None = None, copy: tuple[int, int] | None = None):
    """x[8, 5] -> Gemm 5->6 -> Gemm 6->3: one group of 6 hidden channels. `scale_rows` scales
    the first layer's output channels (weight row and bias); `copy` = (i, j): j repeats i."""
    g = Graph(seed=0)
    h = g.gemm("x", 5, 6)
    y = g.gemm(h, 6, 3)
    model = ir.serde.deserialize_model(g.model({"x": [8, 5]}, {y: [8, 3]}))
    w, b = (model.graph.initializers[n] for n in ("w1", "c2"))
    weight, bias = w.const_value.numpy().copy(), b.const_value.numpy().copy()
    for row, factor in (scale_rows or {}).items():
        weight[row] *= factor
        bias[row] *= factor
    if copy is not None:
        weight[copy[1]], bias[copy[1]] = weight[copy[0]], bias[copy[0]]
    w.const_value, b.const_value = ir.tensor(weight, name="w1"), ir.tensor(bias, name="c2")
    normalize(model)
    return model, analyze(model)


def _ranked(analysis, scores) -> list[int]:
    """Hidden channel indices (0..5), least important first."""
    (group,) = analysis.groups
    return [
        int(np.flatnonzero(group.classes == c)[0])
        for c in sorted(group.classes.tolist(), key=scores.get)
    ]


def test_magnitude_ranks_the_channels_whose_parameters_are_smallest_first():
    _, analysis = _mlp(scale_rows={2: 0.01, 4: 0.1})
    for criterion in ("l1", "l2"):
        assert _ranked(analysis, score(analysis, criterion))[:2] == [2, 4]


def test_group_scores_are_normalized_to_mean_one():
    _, analysis = _mlp()
    scores = score(analysis, "l2")
    assert np.mean(list(scores.values())) == pytest.approx(1.0)


def test_random_scores_depend_on_the_seed_only():
    _, analysis = _mlp()
    assert score(analysis, "random", seed=3) == score(analysis, "random", seed=3)
    assert score(analysis, "random", seed=3) != score(analysis, "random", seed=4)


def test_all_zero_channels_rank_below_every_live_one_whatever_the_criterion():
    model, analysis = _mlp(scale_rows={1: 0.0})
    reader = model.graph.initializers["w5"]  # the next layer's column of channel 1 too
    column = reader.const_value.numpy().copy()
    column[:, 1] = 0
    reader.const_value = ir.tensor(column, name="w5")
    ranked = _ranked(analysis, dead_first(analysis, score(analysis, "random", seed=0)))
    assert ranked[0] == 1


def test_an_unknown_criterion_is_refused():
    _, analysis = _mlp()
    with pytest.raises(ValueError, match="unknown importance criterion"):
        score(analysis, "taylor")


def test_obs_finds_a_channel_the_others_make_up_for_exactly():
    """Channel 5 repeats channel 0: removing either costs nothing once the next layer takes its
    weight over, so OBS ranks one of them first (the damping keeps its score above 0) while
    magnitude sees two ordinary channels."""
    model, analysis = _mlp(copy=(0, 5))
    found = consumers(model)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((8, 5)).astype(np.float32)} for _ in range(16)]
    obs = score_with_statistics(analysis, "obs", collect(model, found, feeds), found)
    first, second = sorted(obs.values())[:2]
    assert _ranked(analysis, obs)[0] in (0, 5) and first < 0.5 * second
    assert _ranked(analysis, score(analysis, "l2"))[0] not in (0, 5)


def test_statistics_too_large_to_hold_at_once_are_collected_layer_by_layer_to_the_same_scores(
    monkeypatch,
):
    # A decoder whose layers' statistics do not fit in STATISTICS_BYTES together: each layer's
    # are collected as its groups are scored, stepping forward through the graph, and released
    # once they are; the scores are those of one pass over the whole model.
    model = io.load(TRANSFORMERS / "llama_dynamo.onnx")
    normalize(model)
    analysis = analyze(model)
    found = reading_classes(analysis, consumers(model))
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, 256, (4, 16))} for _ in range(3)]
    whole = score_with_statistics(analysis, "obs", collect(model, found, feeds), found)
    monkeypatch.setattr(statistics, "STATISTICS_BYTES", 0)
    along = collect(model, found, feeds)
    assert isinstance(along, statistics.Along)
    layered = score_with_statistics(analysis, "obs", along, found)
    assert layered.keys() == whole.keys()
    np.testing.assert_allclose([layered[c] for c in whole], list(whole.values()), rtol=1e-4)
    assert len(along.made) == len({c.reads for c in found}) > 2
    assert all(m._gram is None for m in along.made.values())  # each released after its groups
