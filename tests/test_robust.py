"""Robust by default: unsupported versions, truncated files, control flow, functions,
determinism."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import Graph, if_model
from onnx import helper

import spa

MODELS = Path(__file__).parent.parent / "models" / "torch"


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "spa", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: setattr(m, "ir_version", 99), "IR version 99"),
        (lambda m: m.opset_import[0].__setattr__("version", 99), "opset 99"),
        (lambda m: m.opset_import[0].__setattr__("version", 5), "opset 5 is too old"),
    ],
)
@pytest.mark.slow
def test_unsupported_versions_are_one_line(tmp_path, edit, message):
    model = onnx.load(MODELS / "vgg_legacy.onnx")
    edit(model)
    onnx.save(model, tmp_path / "m.onnx")
    run = _cli("prune", "m.onnx", "out.onnx", cwd=tmp_path)
    assert run.returncode == 1 and message in run.stderr and run.stderr.count("\n") == 1
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_truncated_file_is_one_line(tmp_path):
    data = (MODELS / "vgg_legacy.onnx").read_bytes()
    (tmp_path / "m.onnx").write_bytes(data[: len(data) // 3])
    run = _cli("prune", "m.onnx", "out.onnx", cwd=tmp_path)
    assert (
        run.returncode == 1
        and "not a readable ONNX model" in run.stderr
        and "Traceback" not in run.stderr
    )
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_a_native_crash_in_onnxruntime_is_one_line(tmp_path):
    """Found by the fuzzer: without its pads, an AveragePool of Inception V1 makes onnxruntime die
    of SIGFPE when the model runs. spa runs onnxruntime in a forked child: one line, exit 1."""
    model = onnx.load(
        Path(onnx.__file__).parent
        / "backend"
        / "test"
        / "data"
        / "light"
        / "light_inception_v1.onnx"
    )
    pool = next(n for n in model.graph.node if n.name == "n138")
    del pool.attribute[:]
    pool.attribute.extend(
        [helper.make_attribute("kernel_shape", [7, 7]), helper.make_attribute("strides", [1, 1])]
    )
    onnx.save(model, tmp_path / "m.onnx")
    run = _cli("prune", "m.onnx", "out.onnx", cwd=tmp_path)
    assert (
        run.returncode == 1
        and run.stderr.count("\n") == 1
        and "onnxruntime crashed (SIGFPE)" in run.stderr
    ), run.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_a_grouped_conv_with_weight_and_bias_swapped_is_one_line(tmp_path):
    """Found by the fuzzer (seed 10): a 1-D weight on a grouped conv was an internal error where
    spa looked for the layers calibration reads."""
    model = onnx.load(MODELS / "mobilenetv2_legacy.onnx")
    conv = next(
        n
        for n in model.graph.node
        if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
    )
    conv.input[1], conv.input[2] = conv.input[2], conv.input[1]
    onnx.save(model, tmp_path / "m.onnx")
    run = _cli("prune", "m.onnx", "out.onnx", cwd=tmp_path)
    assert (
        run.returncode == 1 and run.stderr.count("\n") == 1 and "internal error" not in run.stderr
    ), run.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_a_dynamic_dim_written_as_minus_one_survives_shape_inference(tmp_path):
    """Found by the fuzzer: magika's batch dim set to -1 made onnx's C++ shape inference abort (a
    Shape folded to [-1, 2048], then a clamp). -1 is dynamic: never folded, unknown to inference."""
    model = onnx.load(
        Path(__file__).parent.parent / "models" / "packaged" / "magika_standard_v3_3.onnx"
    )
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    onnx.save(model, tmp_path / "m.onnx")
    run = _cli("prune", "m.onnx", "out.onnx", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (
        onnx.load(tmp_path / "out.onnx").graph.input[0].type.tensor_type.shape.dim[0].dim_value
        == -1
    )


def test_unwritable_output_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if (locked / "probe").exists() or _writable(locked):
            pytest.skip("running as a user that can write anywhere")
        run = _cli("prune", str(MODELS / "vgg_legacy.onnx"), str(locked / "out.onnx"))
        assert run.returncode == 1 and "not writable" in run.stderr
    finally:
        locked.chmod(0o700)


def _writable(folder: Path) -> bool:
    try:
        (folder / "probe").write_text("x")
        (folder / "probe").unlink()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_same_input_same_bytes(tmp_path):
    for i in range(2):
        spa.prune(MODELS / "shufflenet_dynamo.onnx", tmp_path / f"{i}.onnx", ratio=0.5)
    assert (tmp_path / "0.onnx").read_bytes() == (tmp_path / "1.onnx").read_bytes()


def test_control_flow_is_a_barrier_and_the_rest_prunes():
    model = if_model()
    analysis = spa.analyze(model)
    assert any(b.op == "If" for b in analysis.barriers)
    assert sorted(g.width for g in analysis.groups) == [16]  # the chain the branches capture stays
    result = spa.prune(model, ratio=0.5, round_to=1)  # verified valid
    for cond in (True, False):
        sess = spa.runtime.session(result.model)
        out = sess.run(None, {"x": np.ones((1, 3, 6, 6), np.float32), "cond": np.array(cond)})[0]
        assert out.shape == (1, 4, 6, 6)


def test_model_local_function_is_a_barrier():
    g = Graph()
    a = g.op("Relu", g.conv("x", 3, 16))
    g.nodes.append(helper.make_node("Twice", [a], ["f"], domain="local", name="call"))
    g.conv("f", 16, 4)
    g.nodes[-1].output[0] = "y"
    fn = onnx.helper.make_function(
        "local",
        "Twice",
        ["i"],
        ["o"],
        [helper.make_node("Add", ["i", "i"], ["o"])],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        g.nodes,
        "m",
        [helper.make_tensor_value_info("x", 1, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", 1, [1, 4, 6, 6])],
        g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[fn],
    )
    analysis = spa.analyze(model)
    assert any(b.op == "local::Twice" and b.blocked for b in analysis.barriers)
    assert not analysis.groups  # the only prunable channels meet the call
    spa.prune(model, ratio=0.5, round_to=1)  # still a valid model, written unchanged in structure
