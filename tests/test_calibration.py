"""Calibration a causal language model writes itself: which models qualify, what they generate,
and that the default without data uses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import spa
from spa import calibration, io, runtime
from spa.cli import main

MODELS = Path(__file__).parent.parent / "models" / "transformers"


@pytest.mark.parametrize(
    "name, lm",
    [
        ("llama_lm_legacy", True),
        ("llama_lm_dynamo", True),
        ("llama_legacy", False),
        ("gpt2_dynamo", False),
        ("bert_legacy", False),
    ],
)
def test_a_causal_lm_is_token_ids_in_and_logits_from_an_lm_head_out(name, lm):
    """Hidden states out (an encoder, or a decoder without its head) is not a language model;
    two inputs (ids and a mask) are not handled."""
    model = io.load(MODELS / f"{name}.onnx")
    assert (calibration.token_input(model) == "input_ids") is lm
    if lm:
        assert calibration.causal_lm(runtime.session(model)) == "input_ids"


def test_generated_text_is_sampled_from_the_model_deterministically(monkeypatch):
    monkeypatch.setattr(calibration, "GENERATED", 6)
    monkeypatch.setattr(calibration, "GENERATED_LENGTH", 10)
    sess = runtime.session(io.load(MODELS / "llama_lm_legacy.onnx"))
    ids = calibration.generate(sess, "input_ids", seed=3)
    assert ids.shape == (6, 10) and ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 256
    assert np.array_equal(ids, calibration.generate(sess, "input_ids", seed=3))
    # every next token is among the model's TOP_K likeliest after its prefix
    logits = sess.run(None, {"input_ids": ids})[0]
    top = np.argsort(-logits[:, :-1], axis=-1)[..., : calibration.TOP_K]
    assert (top == ids[:, 1:, None]).any(-1).all()


@pytest.mark.slow
def test_without_data_a_causal_lm_calibrates_on_its_own_text_and_reports_fidelity():
    result = spa.prune(MODELS / "llama_lm_dynamo.onnx", ratio=0.3, round_to=1)
    assert result.method.calibration == "generated" and result.method.importance == "obs"
    assert "text the model generated itself" in result.method.describe()
    fidelity = result.verdict.fidelity
    assert (
        fidelity.held_out
        and fidelity.outputs["logits"]["rows"]
        == calibration.GENERATED // 8 * calibration.GENERATED_LENGTH
    )


def test_generated_calibration_on_a_model_that_is_no_lm_is_one_error_line(tmp_path, capsys):
    code = main(
        [
            "prune",
            str(MODELS / "llama_legacy.onnx"),
            str(tmp_path / "out.onnx"),
            "--calibration",
            "generated",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "needs a causal language model" in err[0]
    assert not (tmp_path / "out.onnx").exists()


def test_inputs_without_a_shared_sample_axis_are_one_sample_never_cut():
    """A graph's node features [40, 16] and edges [2, 160]: cutting along the first axis would
    pair 32 nodes with edges into all 40 (onnxruntime: index out of bounds)."""
    rng = np.random.default_rng(0)
    graph = {
        "x": rng.standard_normal((40, 16)).astype(np.float32),
        "edge_index": rng.integers(0, 40, (2, 160)).astype(np.int64),
    }
    model = Path(__file__).parent.parent / "models" / "graph" / "gcn_dynamo.onnx"
    result = spa.prune(model, ratio=0.5, calibration=graph)
    assert result.method.calibration == "data" and result.method.compensated
    assert result.after.macs < result.before.macs
