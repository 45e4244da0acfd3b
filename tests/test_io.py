"""Loading and saving: external data in, atomic writes out, the 2 GB switch to external data."""

from __future__ import annotations

import errno
import gc
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import spa
from spa import io

MODELS = Path(__file__).parent.parent / "models" / "torch"


@pytest.mark.slow
def test_external_data_model_loads_and_output_stands_alone(tmp_path):
    out = tmp_path / "pruned.onnx"
    spa.prune(MODELS / "resnet_dynamo.onnx", out, ratio=0.3)
    proto = onnx.load(out, load_external_data=False)
    # no link back to the input's data
    assert not any(t.external_data for t in proto.graph.initializer)
    assert list(tmp_path.iterdir()) == [out]  # no temporary files left


def test_save_switches_to_external_data_past_the_limit(tmp_path, monkeypatch):
    model = io.load(MODELS / "vgg_dynamo.onnx")
    monkeypatch.setattr(io, "PROTO_LIMIT", 1000)
    io.save(model, tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    proto = onnx.load(tmp_path / "big.onnx")
    onnx.checker.check_model(str(tmp_path / "big.onnx"), full_check=True)
    original = onnx.load(MODELS / "vgg_dynamo.onnx")
    a = {t.name: onnx.numpy_helper.to_array(t) for t in original.graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_symbolic_dims_survive(tmp_path):
    out = tmp_path / "p.onnx"
    spa.prune(MODELS / "mobilenetv2_dynamo.onnx", out, ratio=0.5)
    dims = [d.dim_param for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim]
    assert (
        dims[0]
        and dims[0]
        == onnx.load(MODELS / "mobilenetv2_dynamo.onnx")
        .graph.input[0]
        .type.tensor_type.shape.dim[0]
        .dim_param
    )


@pytest.mark.slow
def test_pruned_model_runs_with_a_larger_batch(tmp_path):
    out = tmp_path / "p.onnx"
    spa.prune(MODELS / "shufflenet_legacy.onnx", out, ratio=0.5)
    session = spa.runtime.session(ir.load(out))
    (y,) = session.run(
        None, {"input": np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)}
    )
    assert y.shape == (3, 10)


TRANSFORMERS = Path(__file__).parent.parent / "models" / "transformers"


def test_large_model_is_verified_on_shared_weights_and_keeps_external_data(tmp_path, monkeypatch):
    # The same pruning as for a small model; only the verification and the container change, and
    # the cut and refit weights wait in a temporary file instead of memory.
    small = tmp_path / "small.onnx"
    options = dict(ratio=0.5, calibration="synthetic", input_shapes={"input_ids": [1, 16]})
    spa.prune(TRANSFORMERS / "llama_dynamo.onnx", small, **options)
    monkeypatch.setattr(io, "LARGE_BYTES", 1000)
    monkeypatch.setattr(io.Spill, "MIN_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    large = tmp_path / "large" / "pruned.onnx"
    large.parent.mkdir()
    result = spa.prune(TRANSFORMERS / "llama_dynamo.onnx", large, **options)
    assert result.verdict.serialized is None
    assert sorted(p.name for p in large.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]
    (spill,) = (tmp_path / "tmp").glob("spa-*.spill")
    before = io.load(TRANSFORMERS / "llama_dynamo.onnx").graph.initializers
    cut = [
        v.const_value
        for v in result.model.graph.initializers.values()
        if v.name in before and v.shape != before[v.name].shape
    ]
    assert result.method.compensated and cut
    assert all(isinstance(t, ir.ExternalTensor) and Path(t.path) == spill for t in cut)
    del result
    gc.collect()
    assert not spill.exists()
    onnx.checker.check_model(str(large), full_check=True)
    a = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(small).graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(large).graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_large_model_whose_temporary_file_fills_the_disk_keeps_its_weights_in_memory(
    tmp_path, monkeypatch, caplog
):
    class Full:  # a file system with no room left
        def seek(self, offset):
            pass

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

        def close(self):
            pass

    made = io.Spill.__init__

    def full(self):
        made(self)
        self._file.close()
        self._file = Full()

    monkeypatch.setattr(io, "LARGE_BYTES", 1000)
    monkeypatch.setattr(io.Spill, "MIN_BYTES", 0)
    monkeypatch.setattr(io.Spill, "__init__", full)
    result = spa.prune(TRANSFORMERS / "llama_dynamo.onnx", tmp_path / "p.onnx", ratio=0.5)
    assert "the pruned weights stay in memory" in caplog.text
    assert not any(
        str(v.const_value.path).endswith(".spill")
        for v in result.model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    )
    onnx.checker.check_model(str(tmp_path / "p.onnx"), full_check=True)


def test_lean_session_runs_on_the_weights_in_place():
    model = io.load(TRANSFORMERS / "llama_dynamo.onnx")
    reference = spa.runtime.session(io.load(TRANSFORMERS / "llama_dynamo.onnx"))
    lean = spa.runtime.session(model, lean=True)
    feeds = spa.runtime.random_inputs(reference)
    assert spa.verify.relative_error(reference.run(None, feeds), lean.run(None, feeds)) < 1e-5
    assert all(
        isinstance(v.const_value, ir.ExternalTensor)
        for v in model.graph.initializers.values()
        if v.const_value.nbytes > 1024
    )


def test_a_session_takes_the_weights_beside_its_graph_and_leaves_the_model_as_it_was():
    # The weights go to onnxruntime as arrays, not through protobuf: the same outputs, bit for bit,
    # as a session of the file, and the model's memory-mapped tensors stay so.
    path = TRANSFORMERS / "llama_dynamo.onnx"
    model = io.load(path)
    ours = spa.runtime.session(model, lean=False)
    theirs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = spa.runtime.random_inputs(theirs)
    assert all(np.array_equal(a, b) for a, b in zip(ours.run(None, feeds), theirs.run(None, feeds)))
    mapped = [v for v in model.graph.initializers.values() if v.const_value.nbytes > 1024]
    assert mapped and all(isinstance(v.const_value, ir.ExternalTensor) for v in mapped)
    # a session for an intermediate value (its nodes and weights only) gives what the whole does
    first = next(n for n in model.graph if n.op_type == "MatMul").outputs[0]
    exposed = spa.statistics.exposing(model, [first.name])(feeds)[first.name]
    model.graph.outputs.append(first)
    whole = spa.runtime.session(model, lean=False)
    assert np.array_equal(exposed, whole.run([first.name], feeds)[0])


def test_output_data_file_never_replaces_the_inputs(tmp_path, monkeypatch):
    # a.onnx keeps its weights in resnet_dynamo.onnx.data: an output named resnet_dynamo.onnx
    # would write over them.
    for name, target in (
        ("resnet_dynamo.onnx", "a.onnx"),
        ("resnet_dynamo.onnx.data", "resnet_dynamo.onnx.data"),
    ):
        (tmp_path / target).write_bytes((MODELS / name).read_bytes())
    before = (tmp_path / "resnet_dynamo.onnx.data").read_bytes()
    monkeypatch.setattr(io, "LARGE_BYTES", 1000)
    with pytest.raises(spa.SpaError, match="is the input's"):
        spa.prune(tmp_path / "a.onnx", tmp_path / "resnet_dynamo.onnx", ratio=0.5)
    assert (tmp_path / "resnet_dynamo.onnx.data").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "resnet_dynamo.onnx.data"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_released_weights_leave_the_process_memory_and_read_the_same(tmp_path):
    # Memory-mapped weights count as the process's memory once read; released, their pages go
    # back to the page cache, and reading them again gives the same values.
    weight = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)  # 64 MB
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 4096]))
    w = ir.Value(name="w", const_value=ir.tensor(weight, name="w"))
    node = ir.node("MatMul", [x, w])
    y = node.outputs[0]
    y.name, y.dtype, y.shape = "y", ir.DataType.FLOAT, ir.Shape([1, 4096])
    graph = ir.Graph(
        [x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 21}, name="g"
    )
    io.save(ir.Model(graph, ir_version=10), tmp_path / "m.onnx", external=True)
    model = io.load(tmp_path / "m.onnx")
    value = model.graph.initializers["w"]
    assert isinstance(value.const_value, ir.ExternalTensor)

    def resident() -> int:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    total = float(value.const_value.numpy().sum())
    before = resident()
    io.release_pages([value])
    assert before - resident() > 48 << 20
    assert float(value.const_value.numpy().sum()) == total
