"""Real exports: the torch models in models/ (both exporters) and the real-topology models that ship
in the onnx wheel. On each: the zero-channel test, and `--ratio 0.5` gives a valid, smaller
model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import spa
from spa import io

pytestmark = pytest.mark.slow  # the whole module: real models, each a prune

MODELS = Path(__file__).parent.parent / "models"
TORCH = sorted((MODELS / "torch").glob("*.onnx"))
LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT = [
    "resnet50",
    "vgg19",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "shufflenet",
    "squeezenet",
]


def test_all_torch_models_are_here():
    names = {p.stem for p in TORCH}
    for arch in ["resnet", "mobilenetv2", "densenet", "shufflenet", "senet", "vgg"]:
        assert {f"{arch}_dynamo", f"{arch}_legacy"} <= names


def randomized(path: Path) -> ir.Model:
    """The light models' weights are constants (every output is a uniform softmax), which would
    hide wrong surgery: give them random weights, positive where BatchNormalization needs it."""
    model = io.load(path)
    spa.normalize.normalize(model)
    rng = np.random.default_rng(0)
    variances = {n.inputs[4] for n in model.graph if n.op_type == "BatchNormalization"}
    for value in model.graph.initializers.values():
        array = value.const_value.numpy()
        if array.dtype == np.float32 and array.size > 1:
            noise = rng.standard_normal(array.shape).astype(np.float32)
            fan_in = np.prod(array.shape[1:]) if array.ndim > 1 else 1
            noise = np.abs(noise) + 0.5 if value in variances else noise / np.sqrt(fan_in)
            value.const_value = ir.tensor(noise.astype(np.float32), name=value.name)
    return model


@pytest.mark.parametrize("calibration", [None, "synthetic"], ids=["no-data", "data-free"])
@pytest.mark.parametrize("path", TORCH, ids=lambda p: p.stem)
def test_zero_channels_torch(path, calibration):
    """Under both defaults: without data (magnitude) and data-free (synthetic refit, which must
    then change nothing)."""
    error, removed = spa.zero_channel_check(path, ratio=0.5, calibration=calibration)
    assert removed > 0
    assert error <= 1e-4


@pytest.mark.parametrize("name", LIGHT)
def test_zero_channels_light(name):
    error, removed = spa.zero_channel_check(randomized(LIGHT_DIR / f"light_{name}.onnx"), ratio=0.5)
    assert removed > 0
    assert error <= 1e-4


def test_zero_channel_test_sees_a_real_change():
    """Pruning without zeroing first must change the outputs: the comparison is not vacuous."""
    model = randomized(LIGHT_DIR / "light_resnet50.onnx")
    reference = spa.runtime.session(io.clone(model))
    result = spa.prune(model, ratio=0.5, round_to=1, verify=False)
    feeds = spa.runtime.random_inputs(reference)
    error = spa.verify.relative_error(
        reference.run(None, feeds), spa.runtime.session(result.model).run(None, feeds)
    )
    assert error > 1e-2


@pytest.mark.parametrize(
    "path", TORCH + [LIGHT_DIR / f"light_{n}.onnx" for n in LIGHT], ids=lambda p: p.stem
)
def test_prune_half_is_valid_and_smaller(path, tmp_path):
    out = tmp_path / "pruned.onnx"
    before = path.read_bytes()
    result = spa.prune(path, out, ratio=0.5)  # default round-to, verified before writing
    assert path.read_bytes() == before
    assert result.after.macs <= 0.6 * result.before.macs
    assert result.after.params < result.before.params
    onnx.checker.check_model(str(out), full_check=True)
    original, pruned = onnx.load(path), onnx.load(out)
    initializers = {i.name for i in original.graph.initializer}
    assert [i for i in original.graph.input if i.name not in initializers] == list(
        pruned.graph.input
    )
    assert list(original.graph.output) == list(pruned.graph.output)
