"""Loading and saving: external data in, atomic writes out, the 2 GB switch to external data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

import spa
from spa import io

MODELS = Path(__file__).parent.parent / "models" / "torch"


def test_external_data_model_loads_and_output_stands_alone(tmp_path):
    out = tmp_path / "pruned.onnx"
    spa.prune(MODELS / "resnet_dynamo.onnx", out, ratio=0.3)
    proto = onnx.load(out, load_external_data=False)
    assert not any(t.external_data for t in proto.graph.initializer)  # no link back to the input's data
    assert list(tmp_path.iterdir()) == [out]  # no temporary files left


def test_save_switches_to_external_data_past_the_limit(tmp_path, monkeypatch):
    model = io.load(MODELS / "vgg_dynamo.onnx")
    monkeypatch.setattr(io, "_PROTO_LIMIT", 1000)
    io.save(model, tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    proto = onnx.load(tmp_path / "big.onnx")
    onnx.checker.check_model(str(tmp_path / "big.onnx"), full_check=True)
    original = onnx.load(MODELS / "vgg_dynamo.onnx")
    a = {t.name: onnx.numpy_helper.to_array(t) for t in original.graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_symbolic_dims_survive(tmp_path):
    out = tmp_path / "p.onnx"
    spa.prune(MODELS / "mobilenetv2_dynamo.onnx", out, ratio=0.5)
    dims = [d.dim_param for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] and dims[0] == onnx.load(MODELS / "mobilenetv2_dynamo.onnx").graph.input[0].type.tensor_type.shape.dim[0].dim_param


def test_pruned_model_runs_with_a_larger_batch(tmp_path):
    out = tmp_path / "p.onnx"
    spa.prune(MODELS / "shufflenet_legacy.onnx", out, ratio=0.5)
    session = spa.verify.session(ir.load(out))
    (y,) = session.run(None, {"input": np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)})
    assert y.shape == (3, 10)
