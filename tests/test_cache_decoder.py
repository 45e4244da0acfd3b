"""A decoder exported with a key/value cache (models/cache_decoder, both torch exporters): the heads
reach the graph's inputs and outputs through the cache, so they stay and say why; --prune-cache
prunes them consistently, exactly, and reports the changed signature."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from pins import unexplained

import spa
from spa.errors import SpaError

pytestmark = pytest.mark.slow  # real exports, each a prune

FOLDER = Path(__file__).parent.parent / "models" / "cache_decoder"
MODELS = sorted(FOLDER.glob("decoder_*.onnx"))
CACHE = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
SHAPES = {"input_ids": [2, 3], "position_ids": [2, 3]} | {name: [2, 4, 5, 16] for name in CACHE}


def test_both_exporters():
    assert {p.stem for p in MODELS} == {"decoder_dynamo", "decoder_legacy"}


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_without_the_opt_in_the_heads_stay_and_say_why(path):
    analysis = spa.analyze(path)
    assert [g.width for g in analysis.groups] == [128, 128]  # the FFNs
    kept = {k.reason for k in analysis.kept}
    for i in range(2):
        for kv in ("key", "value"):
            assert f"they reach the graph output 'present.{i}.{kv}'" in kept


@pytest.mark.parametrize("select", ["heads", "all"])
@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_pruning_the_cache_is_exact(path, select):
    error, removed = spa.zero_channel_check(
        path, ratio=0.5, input_shapes=SHAPES, select=select, prune_cache=True
    )
    assert removed >= 2 and error <= 1e-5


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_the_pruned_signature_is_reported_and_runs(path, tmp_path):
    out = tmp_path / "pruned.onnx"
    result = spa.prune(path, out, ratio=0.5, prune_cache=True)
    assert result.after.macs / result.before.macs <= 0.7
    names = [*CACHE, *(f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value"))]
    assert sorted(result.signature_changes) == sorted(names)
    for before, after in result.signature_changes.values():
        assert before[1] == 4 and after[1] == 2 and before[3] == after[3] == 16
    assert result.report()["signature_changes"]["present.0.key"]["after"][1] == 2
    onnx.checker.check_model(str(out), full_check=True)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.ones((2, 3), np.int64), "position_ids": np.tile(np.arange(3), (2, 1))}
    feeds |= {name: np.zeros((2, 2, 5, 16), np.float32) for name in CACHE}
    logits, *present = sess.run(None, feeds)
    assert logits.shape == (2, 3, 256) and all(p.shape == (2, 2, 8, 16) for p in present)


def test_pruning_the_cache_with_calibration_data_is_refused():
    with pytest.raises(SpaError, match="prune-cache"):
        spa.prune(MODELS[0], prune_cache=True, calibration="synthetic")


@pytest.mark.parametrize("prune_cache", [False, True])
@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_every_channel_that_stays_says_why(path, prune_cache):
    assert unexplained(path, prune_cache=prune_cache) == []


def test_a_sweep_times_each_model_on_a_cache_of_its_own_head_count():
    rows = spa.sweep(MODELS[0], [0.5], prune_cache=True, importance="l2")
    assert rows[1]["macs"] < rows[0]["macs"] and rows[1]["latency_ms"] > 0


def test_a_gqa_decoder_loses_query_heads_and_keeps_its_cache(tmp_path):
    """2 key/value heads in the cache, each read by 2 of the 4 query heads (dynamo export): without
    the opt-in the query heads go, as many per kv head, and the signature stays."""
    path = FOLDER / "gqa_decoder_dynamo.onnx"
    shapes = SHAPES | {name: [2, 2, 5, 16] for name in CACHE}
    error, removed = spa.zero_channel_check(path, ratio=0.5, input_shapes=shapes)
    assert removed >= 2 and error <= 1e-5
    result = spa.prune(path, tmp_path / "pruned.onnx", ratio=0.5, importance="l2")
    assert result.signature_changes == {}
    heads = [g for g in result.analysis.groups if g.heads]
    assert [len(np.intersect1d(g.classes, result.plan.removed)) for g in heads] == [2, 2]
    assert result.after.macs / result.before.macs < 0.7
    assert unexplained(path) == []
