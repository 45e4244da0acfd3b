"""Interrupts and the environment: SIGTERM and SIGINT clean up and exit 128 + the signal, the file
system's errors and odd inputs get one line each, a non-UTF-8 path loads, stale shapes are
dropped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
from graphs import Graph
from onnx import TensorProto, helper

from spa import cli


def _model(seed: int = 0, input_name: str = "x") -> onnx.ModelProto:
    g = Graph(seed)
    g.conv(g.op("Relu", g.conv(input_name, 3, 16)), 16, 4)
    g.nodes[-1].output[0] = "y"
    return g.model({input_name: [1, 3, 8, 8]}, {"y": [1, 4, 8, 8]})


@pytest.fixture
def folder(tmp_path, monkeypatch):
    onnx.save(_model(), tmp_path / "m.onnx")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _one_error(capsys, argv: list[str], message: str) -> None:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spa: error: ") and message in err, err


# Runs spa with its write interrupted: right after the temporary file (and its .data) is complete,
# the process sends itself the signal. It prints the temporary files there were at that moment.
_INTERRUPTED_WRITE = """
import os, pathlib, signal, sys
import onnx_ir
from spa import io
from spa.cli import main

signum, mode = int(sys.argv[1]), sys.argv[2]

def interrupting(write):
    def wrapper(*args, **kwargs):
        result = write(*args, **kwargs)
        temporary = [p.name for p in pathlib.Path(".").iterdir() if p.name.startswith(".spa-")]
        print(sorted(temporary), flush=True)
        os.kill(os.getpid(), signum)
        return result
    return wrapper

if mode == "external":  # the weights go to out.onnx.data, through onnx_ir.save
    io.LARGE_BYTES = 0
    onnx_ir.save = interrupting(onnx_ir.save)
else:
    pathlib.Path.write_bytes = interrupting(pathlib.Path.write_bytes)
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.parametrize("mode", ["inline", "external"])
@pytest.mark.slow
def test_an_interrupted_write_leaves_nothing(folder, signum, code, mode):
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            _INTERRUPTED_WRITE,
            str(int(signum)),
            mode,
            "prune",
            "m.onnx",
            "out.onnx",
        ],
        capture_output=True,
        text=True,
    )
    assert ".spa-" in run.stdout  # the signal came while the temporary files were there
    assert run.returncode == code and run.stderr == "spa: interrupted\n", run.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx"]


# Ctrl-C while spa is still importing onnxruntime (about 2 s of a run's start).
_INTERRUPTED_START = """
import sys

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "onnxruntime":
            raise KeyboardInterrupt

sys.meta_path.insert(0, CtrlC())
from spa.cli import main
sys.exit(main(["analyze", "m.onnx"]))
"""


@pytest.mark.slow
def test_an_interrupt_during_start_up_is_one_line(folder):
    run = subprocess.run([sys.executable, "-c", _INTERRUPTED_START], capture_output=True, text=True)
    assert run.returncode == 130 and run.stderr == "spa: interrupted\n", run.stderr


def test_the_file_systems_errors_are_one_line_each(folder, capsys, monkeypatch):
    os.mkdir("folder")
    _one_error(
        capsys,
        ["prune", "m.onnx", "a" * 300 + ".onnx"],
        "aaaa.onnx: file name too long; choose a shorter one",
    )
    _one_error(capsys, ["prune", "m.onnx", "folder"], "output folder: is a directory")
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith("out.onnx"):
            raise PermissionError(13, "Permission denied", str(src), None, str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    _one_error(
        capsys,
        ["prune", "m.onnx", "out.onnx"],
        "out.onnx: permission denied; choose a file and folder you may write",
    )
    assert sorted(p.name for p in folder.iterdir()) == ["folder", "m.onnx"]


def _huge_header(f) -> None:
    np.lib.format.write_array_header_1_0(
        f, {"descr": "<f4", "fortran_order": False, "shape": (10**10, 3, 8, 8)}
    )
    f.write(bytes(1000))


def test_calibration_arrays_that_are_not_samples_are_one_line(folder, capsys):
    np.save("scalar.npy", np.float32(1.0))
    with open("huge.npy", "wb") as f:  # numpy would try to allocate 7 TB
        _huge_header(f)
    with zipfile.ZipFile("huge.npz", "w") as z, z.open("x.npy", "w") as f:
        _huge_header(f)
    _one_error(
        capsys,
        ["prune", "m.onnx", "out.onnx", "--calibration", "scalar.npy"],
        "--calibration scalar.npy: the array for input 'x' is a scalar",
    )
    for name in ("huge.npy", "huge.npz"):
        _one_error(
            capsys,
            ["prune", "m.onnx", "out.onnx", "--calibration", name],
            "the header declares shape [10000000000, 3, 8, 8]",
        )
        _one_error(
            capsys,
            ["bench", "m.onnx", "--inputs", name],
            "the header declares shape [10000000000, 3, 8, 8]",
        )
    assert not os.path.exists("out.onnx")


def test_bench_options_and_inputs_that_cannot_run_are_one_line(folder, capsys):
    onnx.save(_model(1, input_name="z"), "other.onnx")
    np.savez("small.npz", x=np.zeros((1, 3, 4, 4), np.float32))
    for runs in ("0", "-1"):
        _one_error(
            capsys, ["bench", "m.onnx", "--runs", runs], f"--runs must be at least 1, got {runs}"
        )
    _one_error(
        capsys,
        ["bench", "m.onnx", "--inputs", "small.npz"],
        "m.onnx: does not run on --inputs small.npz (x float32 [1, 3, 4, 4])",
    )
    _one_error(
        capsys,
        ["bench", "m.onnx", "other.onnx"],
        "other.onnx: does not run on random inputs made for m.onnx",
    )


def test_a_path_that_is_not_utf8_loads(folder, capsys):
    name, out = os.fsdecode(b"m\xff.onnx"), os.fsdecode(b"out\xff.onnx")
    os.rename("m.onnx", name)
    assert cli.main(["prune", name, out, "--json", "r.json"]) == 0
    assert "m\\udcff.onnx -> out\\udcff.onnx" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert cli.main(["bench", name, out, "--runs", "2"]) == 0
    assert cli.main(["analyze", name]) == 0
    sub = os.fsdecode(b"d\xff")  # a folder too, its model's weights in external data beside it
    os.mkdir("d")
    onnx.save(
        _model(),
        "d/ext.onnx",
        save_as_external_data=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    os.rename("d", sub)
    assert cli.main(["prune", os.path.join(sub, "ext.onnx"), os.path.join(sub, "out.onnx")]) == 0


def test_stale_intermediate_shapes_are_dropped_with_a_note(folder, capsys):
    """Like a jax2onnx export: a conv's output declared with 8 channels, which it has 16 of.
    onnxruntime runs it (a lenient merge); onnx's full checker refuses it."""
    model = _model()
    conv = model.graph.node[0].output[0]
    model.graph.value_info.append(
        helper.make_tensor_value_info(conv, TensorProto.FLOAT, [1, 8, 8, 8])
    )
    onnx.save(model, "stale.onnx")
    with pytest.raises(Exception, match="Inferred shape and existing shape differ"):
        onnx.checker.check_model("stale.onnx", full_check=True)
    assert cli.main(["prune", "stale.onnx", "out.onnx"]) == 0
    out = capsys.readouterr().out
    assert (
        out.count("note: stale.onnx: dropped the intermediate shapes") == 1
        and "Inferred shape and existing shape differ" in out
    )
    pruned = onnx.load("out.onnx")
    onnx.checker.check_model(pruned, full_check=True)
    assert [d.dim_value for d in pruned.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 8, 8]


def test_a_model_the_checker_refuses_otherwise_is_still_refused(folder, capsys):
    model = _model()
    model.graph.node[1].input.append("nowhere")  # Relu with two inputs: not stale shapes
    model.graph.value_info.append(
        helper.make_tensor_value_info(
            model.graph.node[0].output[0], TensorProto.FLOAT, [1, 8, 8, 8]
        )
    )
    onnx.save(model, "bad.onnx")
    _one_error(capsys, ["prune", "bad.onnx", "out.onnx"], "bad.onnx: invalid ONNX model")
