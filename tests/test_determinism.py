"""The same input and options give the same bytes, whatever the thread counts of BLAS and
onnxruntime."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest
from graphs import Graph

import spa


def _mlp(path) -> None:
    """Three dense layers of 256 features: wide enough that OpenBLAS's products and solves take
    other kernels on two threads than on one (at 128 they do not)."""
    g = Graph()
    h = g.op("Relu", g.op("MatMul", "x", g.weight(256, 256)))
    h = g.op("Relu", g.gemm(h, 256, 256))
    g.gemm(h, 256, 10)
    g.nodes[-1].output[0] = "y"
    path.write_bytes(g.model({"x": [32, 256]}, {"y": [32, 10]}).SerializeToString())


@pytest.mark.parametrize("calibration", [None, "data"])
@pytest.mark.slow
def test_output_bytes_do_not_depend_on_the_blas_thread_count(tmp_path, calibration):
    _mlp(tmp_path / "mlp.onnx")
    options = []
    if calibration:
        np.save(
            tmp_path / "calibration.npy",
            np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32),
        )
        options = ["--calibration", str(tmp_path / "calibration.npy")]
    outputs = []
    for threads in ("1", "2"):
        # Only the thread counts change: OPENBLAS_CORETYPE and the like stay as the
        # machine has them.
        env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
        out = tmp_path / f"pruned{threads}.onnx"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "spa",
                "prune",
                str(tmp_path / "mlp.onnx"),
                str(out),
                "--ratio",
                "0.5",
                *options,
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_output_bytes_do_not_depend_on_the_statistics_session_threads(tmp_path, monkeypatch):
    _mlp(tmp_path / "mlp.onnx")
    outputs = []
    for threads in (1, 3):
        monkeypatch.setattr(spa.statistics, "SESSION_THREADS", threads)
        result = spa.prune(tmp_path / "mlp.onnx", ratio=0.5)
        assert result.method.compensated
        outputs.append(ir.serde.serialize_model(result.model).SerializeToString())
    assert outputs[0] == outputs[1]
