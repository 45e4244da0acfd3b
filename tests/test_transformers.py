"""Transformer and recurrent exports in models/transformers, both torch exporters: heads and FFN
neurons pass the zero-channel test separately, and --ratio 0.5 keeps at most 0.75 of the MACs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import spa
from spa import normalize

pytestmark = pytest.mark.slow  # the whole module: real models, each a prune

MODELS = sorted((Path(__file__).parent.parent / "models" / "transformers").glob("*.onnx"))
SEQ = 8  # a real sequence for the analysis and the checks: with 1, attention is degenerate
SHAPES = {
    "bert": {"input_ids": [2, SEQ], "attention_mask": [2, SEQ]},
    "gpt2": {"input_ids": [2, SEQ]},
    "llama": {"input_ids": [2, SEQ]},
    "vit": {"pixel_values": [2, 3, 32, 32]},
    "segformer": {"pixel_values": [2, 3, 64, 64]},
    "deit": {"pixel_values": [2, 3, 32, 32]},
    "mha": {"x": [2, SEQ, 64]},
    "lstm": {"x": [2, SEQ, 16]},
    "gru": {"x": [2, SEQ, 16]},
    "conv1d": {"x": [2, 16, SEQ]},
}
WITH_HEADS = {"bert", "gpt2", "llama", "vit", "deit", "mha"}


def shapes(path: Path) -> dict:
    return SHAPES[path.stem.split("_")[0]]


def test_every_architecture_from_both_exporters():
    names = {p.stem for p in MODELS}
    assert {f"{a}_{e}" for a in SHAPES for e in ("dynamo", "legacy")} <= names


def test_constants_the_dynamo_exporter_merged_do_not_tie_layers():
    """DeiT as initialized: one all-zero bias tensor read by 15 layers in the dynamo export. Each
    use gets its own copy: the same groups as the legacy export, which keeps them apart."""
    groups = [
        sorted(
            g.width
            for g in spa.analyze(
                f"models/transformers/deit_{e}.onnx", input_shapes=SHAPES["deit"]
            ).groups
        )
        for e in ("legacy", "dynamo")
    ]
    assert groups[0] == groups[1] and len(groups[0]) == 4


def test_layernorms_report_the_channels_they_average_not_the_tokens():
    """DeiT's first LayerNorm reads tokens whose labels differ (class and distillation tokens)."""
    analysis = spa.analyze("models/transformers/deit_legacy.onnx", input_shapes=SHAPES["deit"])
    assert {n.channels for n in analysis.normalizations} == {64}


def test_a_shared_vector_that_is_also_a_graph_input_stays_shared():
    """An initializer that is a graph input is a default the caller may override: every use must
    keep reading the input."""
    from onnx import TensorProto, helper, numpy_helper

    bias = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["h"]), helper.make_node("Mul", ["h", "b"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [bias],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    normalize.normalize(model)
    assert [n.inputs[1].name for n in model.graph] == ["b", "b"]


@pytest.mark.parametrize(
    "path", [p for p in MODELS if p.stem.split("_")[0] in WITH_HEADS], ids=lambda p: p.stem
)
def test_zero_heads(path):
    analysis = spa.analyze(path, input_shapes=shapes(path))
    # one attention per layer
    assert sum(g.heads for g in analysis.groups) == (1 if "mha" in path.stem else 2)
    error, removed = spa.zero_channel_check(path, input_shapes=shapes(path), select="heads")
    assert removed > 0 and error <= 1e-4


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_zero_neurons_and_units(path):
    error, removed = spa.zero_channel_check(path, input_shapes=shapes(path), select="channels")
    assert removed > 0 and error <= 1e-4


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_half_ratio_is_valid_and_at_most_three_quarters_of_the_macs(path, tmp_path):
    out = tmp_path / "p.onnx"
    result = spa.prune(path, out, ratio=0.5, input_shapes=shapes(path))
    assert result.after.macs <= 0.75 * result.before.macs
    onnx.checker.check_model(str(out), full_check=True)
    original, pruned = onnx.load(path, load_external_data=False), onnx.load(out)
    assert list(original.graph.input) == list(pruned.graph.input)
    assert [o.name for o in original.graph.output] == [o.name for o in pruned.graph.output]
    assert [o.type for o in original.graph.output] == [o.type for o in pruned.graph.output]
