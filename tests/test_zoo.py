"""Every committed model from the other frameworks' exporters (TensorFlow/Keras via tf2onnx,
JAX/Flax via jax2onnx, PaddlePaddle via paddle2onnx, scikit-learn via skl2onnx, ONNX files shipped
in PyPI packages), the graph neural networks (torch_geometric), the diffusion UNet (diffusers), the
key/value cache decoder (with --prune-cache, zoo_coverage.OPTIONS; these three from both torch
exporters) and YOLO detectors (ultralytics' exporter) passes the coverage benchmark's bar: it prunes
at ratio 0.5 to a valid model (checker, onnxruntime, same inputs and outputs) that keeps at most 70%
of its MACs, and the zero-channel test is exact. The PyTorch exports are tested in test_models and
test_transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
from pins import unexplained

from scripts import zoo_coverage

pytestmark = pytest.mark.slow  # the whole module: real models, each a prune

ROOT = Path(__file__).parent.parent

FOLDERS = (
    "tensorflow",
    "jax",
    "paddle",
    "sklearn",
    "packaged",
    "graph",
    "diffusers",
    "yolo",
    "cache_decoder",
)
MODELS = sorted(p for folder in FOLDERS for p in (ROOT / "models" / folder).glob("*.onnx"))


def test_every_framework_has_at_least_two_models():
    for folder in FOLDERS:
        assert len([p for p in MODELS if p.parent.name == folder]) >= 2, folder


@pytest.mark.parametrize("path", MODELS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_zoo_model_prunes_to_a_valid_smaller_model(path):
    row = zoo_coverage.measure(path, [zoo_coverage.PASS_RATIO])
    assert row["failures"] == []
    assert row["groups"] >= 1


EVERY = sorted((ROOT / "models").glob("*/*.onnx"))


@pytest.mark.parametrize("path", EVERY, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_channel_that_stays_says_why(path):
    """Each layer's channels that the analysis keeps are explained by a barrier, an op that keeps
    them or a normalization, directly or through the channels they are coupled with
    (tests/pins.py): spa analyze gives a reason for every channel that stays."""
    assert unexplained(path, input_shapes=zoo_coverage.input_shapes(path)) == []
