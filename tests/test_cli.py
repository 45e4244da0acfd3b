"""The command line as a user meets it: a run, the table, the JSON, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

MODELS = Path(__file__).parent.parent / "models" / "torch"


def spa(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spa", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.slow
def test_prune_prints_table_and_writes_json(tmp_path):
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    run = spa(
        "prune",
        str(MODELS / "resnet_dynamo.onnx"),
        str(out),
        "--ratio",
        "0.5",
        "--json",
        str(report),
    )
    assert run.returncode == 0, run.stderr
    for row in ("params", "MACs", "FLOPs", "file size", "Conv"):
        assert row in run.stdout
    assert "method: importance obs, synthetic calibration (data-free), layers refit" in run.stdout
    data = json.loads(report.read_text())
    assert data["method"] == {
        "importance": "obs",
        "calibration": "synthetic",
        "compensated": True,
        "note": None,
        "too_wide": [],
        "allocation": "uniform",
        "sensitivity": None,
        "damping": 0.01,
    }
    assert data["after"]["macs"] < data["before"]["macs"]
    assert data["after"]["flops"] == 2 * data["after"]["macs"]
    assert data["groups"] and all("kept" in layer for g in data["groups"] for layer in g["layers"])
    kept = sum(len(layer["kept"]) for g in data["groups"] for layer in g["layers"])
    assert kept < sum(layer["width"] for g in data["groups"] for layer in g["layers"])
    onnx.checker.check_model(str(out), full_check=True)
    assert oct(out.stat().st_mode & 0o777) != "0o600"


@pytest.mark.slow
def test_analyze_lists_groups_and_barriers(tmp_path):
    model = onnx.load(MODELS / "vgg_legacy.onnx")
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type, relu.domain = "Mystery", "vendor"
    model.opset_import.append(onnx.helper.make_opsetid("vendor", 1))
    path = tmp_path / "vendor.onnx"
    onnx.save(model, path)
    run = spa("analyze", str(path), "--json", str(tmp_path / "a.json"))
    assert run.returncode == 0, run.stderr
    assert "prunable groups" in run.stdout
    assert "vendor::Mystery" in run.stdout and "channels pinned" in run.stdout
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["barriers"][0]["op"] == "vendor::Mystery"


def test_version():
    run = spa("--version")
    assert run.returncode == 0 and run.stdout.startswith("spa ")


@pytest.mark.parametrize(
    "setup,args,message",
    [
        (None, ["missing.onnx", "out.onnx"], "no such file"),
        (b"", ["bad.onnx", "out.onnx"], "empty file"),
        (b"hello, I am text\n", ["bad.onnx", "out.onnx"], "not a readable ONNX model"),
        (b"\x08\x07\x12\xff\xff\xff", ["bad.onnx", "out.onnx"], "not a readable ONNX model"),
        ("model", ["in.onnx", "out.onnx", "--ratio", "1.5"], "ratio must be in [0, 1)"),
        ("model", ["in.onnx", "in.onnx"], "output in.onnx: is the input model"),
        ("model", ["in.onnx", "nowhere/out.onnx"], "does not exist"),
        ("model", ["in.onnx", "out.onnx", "--input-shapes", "nope:1,2"], "unknown input"),
    ],
)
@pytest.mark.slow
def test_bad_input_is_one_line_and_no_output(tmp_path, setup, args, message):
    if setup == "model":
        (tmp_path / "in.onnx").write_bytes((MODELS / "vgg_legacy.onnx").read_bytes())
    elif setup is not None:
        (tmp_path / "bad.onnx").write_bytes(setup)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    run = spa("prune", *args, cwd=tmp_path)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and message in run.stderr and "Traceback" not in run.stderr
    # nothing written, input intact
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_usage_error_exits_2():
    assert spa("prune").returncode == 2


@pytest.mark.slow
def test_missing_external_data_is_one_line(tmp_path):
    (tmp_path / "m.onnx").write_bytes((MODELS / "vgg_dynamo.onnx").read_bytes())
    run = spa("prune", "m.onnx", "out.onnx", cwd=tmp_path)
    assert run.returncode == 1 and "external data" in run.stderr and run.stderr.count("\n") == 1
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_external_data_location_that_is_not_utf8_is_one_line(tmp_path):
    data = (MODELS / "vgg_dynamo.onnx").read_bytes()
    assert data.count(b"vgg_dynamo.onnx.data") >= 1
    (tmp_path / "m.onnx").write_bytes(
        data.replace(b"vgg_dynamo.onnx.data", b"vgg_dynamo.onnx.dat\xff")
    )
    run = spa("prune", "m.onnx", "out.onnx", cwd=tmp_path)
    assert (
        run.returncode == 1
        and run.stderr.count("\n") == 1
        and "not a valid file name" in run.stderr
    ), run.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_off_a_terminal_a_quiet_step_still_gets_a_progress_line_and_v_logs_each_step(
    tmp_path, capsys, monkeypatch
):
    from spa import progress
    from spa.cli import main

    monkeypatch.setattr(progress, "QUIET_S", 0.0)  # every second of a step is "too long"
    assert main(["prune", str(MODELS / "resnet_dynamo.onnx"), str(tmp_path / "out.onnx")]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("spa: ") and " s so far" in line for line in lines), lines
    run = spa("prune", "-v", str(MODELS / "resnet_dynamo.onnx"), str(tmp_path / "out.onnx"))
    for step in (
        "finding the coupled channels ...",
        "removing channels and refitting: ",
        "verifying the pruned model: ",
    ):
        assert f"spa.progress: {step}" in run.stderr, run.stderr


@pytest.mark.slow
def test_the_report_and_the_model_say_what_made_them_and_keep_the_dim_names(tmp_path):
    from spa import api

    out = tmp_path / "small.onnx"
    result = api.prune(MODELS / "resnet_dynamo.onnx", out, ratio=0.3, seed=3)
    assert len(repr(result)) < 300 and "macs=" in repr(result)
    data = result.report()
    assert data["schema"] >= 2 and set(data["versions"]) >= {"spa", "onnx", "onnxruntime"}
    assert (
        data["options"]["seed"] == 3
        and data["options"]["resolved"]["round_to"] >= 1
        and data["ratio"] == 0.3
    )
    model = onnx.load(out)
    props = {p.key: p.value for p in model.metadata_props}
    assert (
        props["spa.version"] == data["versions"]["spa"]
        and json.loads(props["spa.options"])["seed"] == 3
    )
    dims = {
        d.dim_param
        for v in model.graph.value_info
        for d in v.type.tensor_type.shape.dim
        if d.HasField("dim_param")
    }
    assert dims == {"batch"}  # as the exporter named it; shape inference alone would invent unk__0


@pytest.mark.slow
def test_dry_run_exclusions_and_the_notes_on_options_that_do_nothing(tmp_path, capsys):
    from spa.cli import main

    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    # flags before the files
    args = [
        "prune",
        "--input-shapes",
        "input:1,3,32,32",
        str(MODELS / "resnet_dynamo.onnx"),
        str(out),
    ]
    assert (
        main(
            [
                *args,
                "--target-macs",
                "0.6",
                "--ratio",
                "0.3",
                "--ignore",
                "nomatch*",
                "--exclude-ops",
                "Conv,Foo",
                "--dry-run",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert "dry run, nothing written" in stdout and not out.exists() and report.is_file()
    for note in ("--ratio 0.3 is ignored", "'nomatch*' matches no node", "excluded op type 'Foo'"):
        assert note in stdout, stdout
    data = json.loads(report.read_text())
    assert all(g["removed"] == 0 for g in data["groups"])  # every layer is a Conv (or reads one)


@pytest.mark.slow
def test_plot_draws_the_layers_before_and_after(tmp_path):
    pytest.importorskip("matplotlib")
    from spa.cli import main

    plot = tmp_path / "layers.png"
    assert (
        main(
            [
                "prune",
                str(MODELS / "resnet_dynamo.onnx"),
                str(tmp_path / "out.onnx"),
                "--importance",
                "l2",
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_every_prune_option_is_a_flag_and_an_api_keyword_from_one_declaration(tmp_path):
    import dataclasses

    from spa.cli import _parser
    from spa.options import PruneOptions

    flags = {a.dest for a in _parser()._subparsers._group_actions[0].choices["prune"]._actions}
    fields = {f.name for f in dataclasses.fields(PruneOptions)}
    assert fields <= flags  # input_shapes too, through --input-shapes
    with pytest.raises(Exception, match="unknown option"):
        __import__("spa").prune(MODELS / "resnet_dynamo.onnx", ratioo=0.3)
    sweep_flags = {
        a.dest for a in _parser()._subparsers._group_actions[0].choices["sweep"]._actions
    }
    assert {
        "importance",
        "calibration",
        "allocation",
        "ignore",
        "round_to",
        "compensate",
    } <= sweep_flags


@pytest.mark.slow
def test_a_plan_from_an_earlier_report_prunes_the_same_channels_and_refuses_what_does_not_fit(
    tmp_path, capsys
):
    from spa.cli import main

    model, report = str(MODELS / "resnet_dynamo.onnx"), tmp_path / "r.json"
    assert (
        main(
            [
                "prune",
                model,
                str(tmp_path / "a.onnx"),
                "--ratio",
                "0.4",
                "--importance",
                "l1",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    first = json.loads(report.read_text())
    assert (
        main(
            [
                "prune",
                model,
                str(tmp_path / "b.onnx"),
                "--plan",
                str(report),
                "--json",
                str(tmp_path / "again.json"),
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "again.json").read_text())

    def kept(r):
        return {layer["node"]: layer["kept"] for g in r["groups"] for layer in g["layers"]}

    assert kept(again) == kept(first) and again["after"]["macs"] == first["after"]["macs"]
    layer = next(layer for g in first["groups"] for layer in g["layers"] if len(g["layers"]) > 1)
    # one layer of a coupled group loses a channel the others keep
    layer["kept"] = layer["kept"][1:]
    report.write_text(json.dumps(first))
    capsys.readouterr()
    assert main(["prune", model, str(tmp_path / "c.onnx"), "--plan", str(report)]) == 1
    assert "coupled layers keep the same channels" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_takes_the_method_options_prints_each_step_and_saves_the_models(tmp_path, capsys):
    from spa.cli import main

    args = [
        "sweep",
        str(MODELS / "resnet_dynamo.onnx"),
        "--ratios",
        "0.05,0.5",
        "--importance",
        "l2",
        "--save-dir",
        str(tmp_path / "models"),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (
        "ratio 0.05: MACs x1.000" in out
        and "nothing removed" in out
        and "ratio 0.5: MACs x0.2" in out
    )
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "resnet_dynamo_ratio0.05.onnx",
        "resnet_dynamo_ratio0.5.onnx",
    ]


def test_shell_completion_offers_commands_and_flags(tmp_path):
    """With argcomplete (the `completion` extra), the shell asks spa for completions."""
    pytest.importorskip("argcomplete")
    answers = tmp_path / "completions"
    for line, expected in (
        ("spa sw", ["sweep"]),
        ("spa prune m.onnx o.onnx --layer", ["--layer-ratio"]),
    ):
        env = {
            **os.environ,
            "_ARGCOMPLETE": "1",
            "_ARGCOMPLETE_IFS": " ",
            "COMP_LINE": line,
            "COMP_POINT": str(len(line)),
            "_ARGCOMPLETE_STDOUT_FILENAME": str(answers),
        }
        subprocess.run([sys.executable, "-m", "spa"], env=env, timeout=120, check=False)
        assert answers.read_text().split() == expected
