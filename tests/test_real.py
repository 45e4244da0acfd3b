"""A real pretrained model keeps the method honest: EfficientNet-Lite0 with its ImageNet weights,
cut after block 7 (stem and 8 MBConv blocks, 250 K params; `python scripts/real_models.py slice`
makes it from the full export), on real photos at 64x64: calibration crops of scikit-image's photos,
evaluation crops of foolbox's ImageNet images (disjoint sources). The figures below are the
measured ones less a margin; the full models are measured by scripts/real_models.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import spa

pytestmark = pytest.mark.slow  # the whole module: real models, each a prune

SLICE = Path(__file__).parent.parent / "models" / "real" / "efficientnet_lite0_blocks0-7.onnx"


def _pixels(u8: np.ndarray) -> np.ndarray:
    return (u8.astype(np.float32) - 127.0) / 128.0  # EfficientNet-Lite's preprocessing


@pytest.fixture(scope="module")
def data():
    arrays = np.load(SLICE.with_suffix(".npz"))
    evaluation = _pixels(arrays["evaluation"])
    return _pixels(arrays["calibration"]), evaluation, _features(str(SLICE), evaluation)


def _features(path: str, x: np.ndarray) -> np.ndarray:
    return (
        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        .run(None, {"input": x})[0]
        .reshape(len(x), -1)
    )


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def test_at_0_8_of_the_macs_calibration_keeps_features_data_free_most_magnitude_little(
    data, tmp_path
):
    calibration, evaluation, reference = data
    cosines = {}
    for name, options in (
        ("calibrated", {"calibration": calibration}),
        ("data-free", {}),
        ("magnitude", {"importance": "l2", "compensate": False}),
    ):
        result = spa.prune(SLICE, tmp_path / f"{name}.onnx", target_macs=0.8, round_to=1, **options)
        assert result.target["met"] and result.target["reached"] > 0.75
        cosines[name] = _cosine(reference, _features(str(tmp_path / f"{name}.onnx"), evaluation))
        # spa's own estimate, on held-out calibration crops, is near the truth
        if name == "calibrated":
            assert (
                result.method.allocation == "sensitivity"
                and abs(result.verdict.fidelity.similarity - cosines[name]) < 0.05
            )
    # measured: 0.955, 0.836 (0.804 with 1/f noise alone), 0.365
    assert (
        cosines["calibrated"] >= 0.93
        and cosines["data-free"] >= 0.78
        and cosines["magnitude"] < 0.5
    ), cosines


def test_the_zero_channel_test_holds_on_the_real_slice():
    error, removed = spa.zero_channel_check(
        SLICE, ratio=0.5, input_shapes={"input": [2, 3, 64, 64]}
    )
    assert removed > 0 and error < 1e-4
