"""Files spa must never touch: what a command reads, one file twice, devices and FIFOs; and the
write rule: everything a command writes is written, or nothing is."""

from __future__ import annotations

import errno
import os
import pathlib
import stat

import onnx
import pytest
from graphs import Graph

from spa import cli, io


def _model() -> onnx.ModelProto:
    g = Graph()
    g.conv(g.op("Relu", g.conv("x", 3, 16)), 16, 4)
    g.nodes[-1].output[0] = "y"
    return g.model({"x": [1, 3, 8, 8]}, {"y": [1, 4, 8, 8]})


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """m.onnx, and ext.onnx with its weights in ext.onnx.data; the tests run in this folder."""
    model = _model()
    onnx.save(model, tmp_path / "m.onnx")
    onnx.save(
        model,
        tmp_path / "ext.onnx",
        save_as_external_data=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _snapshot(folder: pathlib.Path) -> dict[str, bytes | None]:
    return {p.name: p.read_bytes() if p.is_file() else None for p in folder.iterdir()}


def _refused(capsys, argv: list[str], message: str) -> None:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spa: error: ") and message in err, err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["prune", "m.onnx", "out.onnx", "--json", "m.onnx"], "--json m.onnx: is the input model"),
        (
            ["prune", "ext.onnx", "out.onnx", "--json", "ext.onnx.data"],
            "--json ext.onnx.data: is the input's external data",
        ),
        (
            ["prune", "m.onnx", "out.onnx", "--json", "out.onnx"],
            "--json out.onnx: the same file as output out.onnx",
        ),
        (
            ["prune", "m.onnx", "out.onnx", "--json", "out.onnx.data"],
            "the same file as the output's external data",
        ),
        (
            ["prune", "ext.onnx", "ext.onnx.data"],
            "output ext.onnx.data: is the input's external data",
        ),
        (
            ["prune", "m.onnx", "out.onnx", "--calibration", "c.npy", "--json", "c.npy"],
            "is the calibration data",
        ),
        (["analyze", "m.onnx", "--json", "m.onnx"], "--json m.onnx: is the input model"),
        (["analyze", "ext.onnx", "--json", "ext.onnx.data"], "is the input's external data"),
        (
            ["bench", "m.onnx", "ext.onnx", "--runs", "1", "--json", "ext.onnx.data"],
            "is the input's external data",
        ),
        (
            ["bench", "m.onnx", "--runs", "1", "--inputs", "c.npy", "--json", "c.npy"],
            "is the --inputs file",
        ),
        (["sweep", "m.onnx", "--json", "m.onnx"], "--json m.onnx: is the input model"),
        (["sweep", "m.onnx", "--plot", "m.onnx"], "--plot m.onnx: is the input model"),
        (
            ["sweep", "m.onnx", "--plot", "s.png", "--json", "s.png"],
            "--plot s.png: the same file as --json s.png",
        ),
    ],
)
def test_a_file_the_command_reads_or_writes_twice_is_refused(folder, capsys, argv, message):
    (folder / "c.npy").write_bytes(b"not read: refused before")
    before = _snapshot(folder)
    _refused(capsys, argv, message)
    assert _snapshot(folder) == before


@pytest.mark.parametrize("link", [os.link, os.symlink])
def test_a_link_to_the_input_is_the_input(folder, capsys, link):
    link("m.onnx", "alias.onnx")
    before = _snapshot(folder)
    _refused(
        capsys, ["prune", "m.onnx", "alias.onnx"], "output alias.onnx: is the input model 'm.onnx'"
    )
    _refused(
        capsys,
        ["prune", "m.onnx", "out.onnx", "--json", "alias.onnx"],
        "--json alias.onnx: is the input model",
    )
    assert _snapshot(folder) == before


@pytest.mark.parametrize("flag", [[], ["--json"]])
def test_a_fifo_or_a_directory_is_not_replaced(folder, capsys, flag):
    os.mkfifo("fifo")  # like /dev/null: not a regular file
    os.mkdir("folder")
    out = ["prune", "m.onnx"] + (["out.onnx", "--json"] if flag else [])
    _refused(capsys, out + ["fifo"], "fifo: is not a regular file")
    _refused(capsys, out + ["folder"], "folder: is a directory")
    assert stat.S_ISFIFO(os.stat("fifo").st_mode) and os.path.isdir("folder")
    assert sorted(p.name for p in folder.iterdir()) == [
        "ext.onnx",
        "ext.onnx.data",
        "fifo",
        "folder",
        "m.onnx",
    ]


def _fail_json(monkeypatch, where: str, error: int) -> None:
    """The JSON's write (disk full) or its rename (permission denied) fails; the model's works."""
    if where == "write":
        real = pathlib.Path.write_text

        def write_text(self, *args, **kwargs):
            if self.suffix == ".json":
                raise OSError(error, os.strerror(error))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    else:
        real = os.replace

        def replace(src, dst):
            if str(dst).endswith(".json"):
                raise OSError(error, os.strerror(error), str(src), None, str(dst))
            return real(src, dst)

        monkeypatch.setattr(io.os, "replace", replace)


@pytest.mark.parametrize(
    "where,error,message",
    [
        ("write", errno.ENOSPC, "r.json: no space left on the device"),
        ("write", errno.EDQUOT, "r.json: disk quota exceeded"),
        ("rename", errno.EACCES, "r.json: permission denied"),
    ],
)
@pytest.mark.parametrize("old_output", [False, True])
def test_a_failed_json_write_leaves_no_model(
    folder, capsys, monkeypatch, where, error, message, old_output
):
    """All or nothing: the model is renamed into place only with its report; a rename that fails
    after the model's puts back the file the model replaced."""
    if old_output:
        (folder / "out.onnx").write_bytes(b"an older model")
    before = _snapshot(folder)
    _fail_json(monkeypatch, where, error)
    _refused(capsys, ["prune", "m.onnx", "out.onnx", "--json", "r.json"], message)
    assert _snapshot(folder) == before  # no model, no truncated JSON, no temporary file


def test_everything_is_written_when_nothing_fails(folder, capsys):
    assert cli.main(["prune", "m.onnx", "out.onnx", "--json", "r.json"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "ext.onnx",
        "ext.onnx.data",
        "m.onnx",
        "out.onnx",
        "r.json",
    ]
    onnx.checker.check_model("out.onnx", full_check=True)
