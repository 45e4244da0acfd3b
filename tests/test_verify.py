"""How spa measures a pruned model: the held-out calibration samples, class scores compared by
top-1 agreement and KL, everything else by cosine; the loud warning on a likely broken result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import Graph

import spa
from spa import calibration, verify
from spa.cli import main

MAGIKA = Path(__file__).parents[1] / "models" / "packaged" / "magika_standard_v3_3.onnx"


def classifier(head: str = "Gemm") -> onnx.ModelProto:
    """x[N,16] -> Gemm 16->32 -> Relu -> Gemm 32->10 (-> Softmax, or the same written out as
    exp(z - max) / sum, as jax2tf exports it: "exp/sum"; or normalized over the batch instead of
    the classes: "exp/sum over N"; or a LayerNormalization)."""
    g = Graph()
    h = g.op("Relu", g.gemm("x", 16, 32))
    y = g.gemm(h, 32, 10)
    if head == "Softmax":
        y = g.op("Softmax", y, axis=-1)
    elif head.startswith("exp/sum"):
        axis = 0 if head.endswith("over N") else 1
        shifted = g.op("Sub", y, g.op("ReduceMax", y, axes=[axis], keepdims=1))
        e = g.op("Exp", shifted)
        total = g.op("ReduceSum", e, g.const(np.array([axis], np.int64)), keepdims=0)
        y = g.op("Div", e, g.op("Unsqueeze", total, g.const(np.array([axis], np.int64))))
    elif head == "LayerNormalization":
        y = g.op(
            "LayerNormalization",
            y,
            g.const(np.ones(10, np.float32)),
            g.const(np.zeros(10, np.float32)),
            axis=-1,
        )
    return g.model({"x": ["N", 16]}, {y: ["N", 10]})


class _Session:
    """What hold_out asks of a session: its inputs' shapes."""

    def __init__(self, batch):
        self.batch = batch

    def get_inputs(self):
        return [type("Arg", (), {"shape": [self.batch, 16]})()]


def _batches(sizes):
    return [{"x": np.zeros((n, 16), np.float32)} for n in sizes]


def _sizes(feeds):
    return [len(f["x"]) for f in feeds]


def test_an_eighth_of_the_samples_is_held_out_splitting_a_batch_where_the_model_allows():
    fit, held = calibration.hold_out(_batches([32, 32, 32, 4]), _Session("N"))
    assert _sizes(fit) == [32, 32, 24] and _sizes(held) == [8, 4]  # 100 // 8 = 12, the last ones


def test_a_fixed_batch_holds_out_whole_batches_only():
    fit, held = calibration.hold_out(_batches([4] * 16), _Session(4))
    assert _sizes(fit) == [4] * 14 and _sizes(held) == [4] * 2
    fit, held = calibration.hold_out(_batches([32, 32]), _Session(32))
    assert _sizes(fit) == [32, 32] and held == []  # 8 of 64 would split a batch


def test_too_few_samples_hold_nothing_out():
    fit, held = calibration.hold_out(_batches([8]), _Session("N"))
    assert _sizes(fit) == [8] and held == []


@pytest.mark.parametrize(
    "head, kind",
    [
        ("Gemm", "logits"),
        ("Softmax", "probabilities"),
        ("exp/sum", "probabilities"),
        ("exp/sum over N", None),
        ("LayerNormalization", None),
    ],
)
def test_class_scores_are_the_outputs_of_a_classifier_head(head, kind):
    proto = classifier(head)
    onnx.checker.check_model(proto, full_check=True)
    model = ir.serde.deserialize_model(proto)
    assert verify.class_scores(model) == ({model.graph.outputs[0].name: kind} if kind else {})


def test_a_softmax_written_out_by_jax2tf_is_compared_by_class_agreement():
    """magika (Google's file-type classifier, a JAX model exported by jax2tf) ends in exp / sum
    through Expand and Reshape: its pruned copy was compared by cosine (0.968) where the top-1
    class of 1 in 8 held-out samples moved."""
    model = ir.load(MAGIKA)
    assert verify.class_scores(model) == {"target_label": "probabilities"}


def test_class_scores_are_compared_by_top1_agreement_and_kl():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 10))
    b = a.copy()
    b[:10] = -b[:10]  # a quarter of the rows now rank another class first
    moved = verify.compare(
        ["y"],
        [([a[:20]], [b[:20]]), ([a[20:]], [b[20:]])],
        "test",
        False,
        {"y": "logits"},
        held_out=True,
    )
    found = moved.outputs["y"]
    assert found["rows"] == 40 and found["top1_agreement"] == 0.75 and found["kl"] > 0
    assert moved.similarity == 0.75 and not moved.likely_broken
    b[:30] = -a[:30]
    broken = verify.compare(["y"], [([a], [b])], "test", False, {"y": "logits"}, held_out=True)
    assert broken.likely_broken and broken.describe().startswith("WARNING")


def test_one_random_sample_is_judged_by_cosine_not_by_its_single_top1():
    a = np.array([[1.0, 0.9]])
    moved = verify.compare(["y"], [([a], [a[:, ::-1]])], "one sample", False, {"y": "logits"})
    assert moved.outputs["y"]["top1_agreement"] == 0.0 and moved.similarity == pytest.approx(
        moved.outputs["y"]["cosine"]
    )


def test_a_calibrated_prune_reports_fidelity_on_held_out_samples(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(classifier(), path)
    x = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    result = spa.prune(path, ratio=0.25, round_to=1, calibration=x)
    fidelity = result.verdict.fidelity
    assert fidelity.held_out and fidelity.outputs[next(iter(fidelity.outputs))]["rows"] == 64 // 8
    assert result.verdict.measured is fidelity and 0.0 <= fidelity.similarity <= 1.0
    np.savez(tmp_path / "cal.npz", x=x)
    assert (
        main(
            [
                "prune",
                str(path),
                str(tmp_path / "out.onnx"),
                "--calibration",
                str(tmp_path / "cal.npz"),
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "r.json").read_text())["verify"]
    assert (
        report["fidelity"]["held_out"]
        and report["likely_broken"] == report["fidelity"]["likely_broken"]
    )


def test_a_likely_broken_prune_says_so_on_stderr_and_in_the_json(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(classifier(), path)
    np.savez(
        tmp_path / "cal.npz",
        x=np.random.default_rng(1).standard_normal((256, 16)).astype(np.float32),
    )
    args = [
        "prune",
        str(path),
        str(tmp_path / "out.onnx"),
        "--calibration",
        str(tmp_path / "cal.npz"),
        "--ratio",
        "0.95",
        "--round-to",
        "1",
    ]
    assert (
        main(
            [*args, "--importance", "random", "--no-compensate", "--json", str(tmp_path / "r.json")]
        )
        == 0
    )
    report = json.loads((tmp_path / "r.json").read_text())["verify"]
    assert report["likely_broken"] and report["fidelity"]["similarity"] < verify.BROKEN_HELD_OUT
    assert "WARNING: the pruned model is likely broken" in capsys.readouterr().err


def test_min_fidelity_cuts_less_where_the_held_out_fidelity_would_fall_below_the_bound(
    tmp_path, capsys
):
    path = tmp_path / "m.onnx"
    onnx.save(classifier(), path)
    x = np.random.default_rng(1).standard_normal((256, 16)).astype(np.float32)
    options = dict(
        ratio=0.9,
        round_to=1,
        calibration=x,
        importance="l2",
        compensate=False,
        allocation="uniform",
    )
    deep = spa.prune(path, **options)
    bound = (1.0 + deep.verdict.fidelity.similarity) / 2  # the full cut misses it
    bounded = spa.prune(path, min_fidelity=bound, **options)
    record = bounded.target["fidelity"]
    assert 0 < bounded.ratio < 0.9 and record["met"] and record["steps"][0]["ratio"] == 0.9
    assert bounded.verdict.fidelity.similarity >= bound and bounded.after.macs > deep.after.macs
    np.savez(tmp_path / "cal.npz", x=x)
    args = [
        "prune",
        str(path),
        str(tmp_path / "out.onnx"),
        "--ratio",
        "0.9",
        "--round-to",
        "1",
        "--importance",
        "l2",
        "--no-compensate",
        "--allocation",
        "uniform",
    ]
    assert (
        main([*args, "--calibration", str(tmp_path / "cal.npz"), "--min-fidelity", str(bound)]) == 0
    )
    assert (
        f"fidelity bound: held-out fidelity >= {bound:g}, kept at ratio {bounded.ratio:.3g}"
        in capsys.readouterr().out
    )
    assert main([*args, "--min-fidelity", "0.9"]) == 1  # no data, nothing to measure it on
    assert "min_fidelity needs calibration data" in capsys.readouterr().err
