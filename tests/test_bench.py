"""spa bench, spa prune --bench and spa sweep: rows, reports and plots; behaviour, never timings."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import spa

RESNET = "models/torch/resnet_legacy.onnx"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "spa", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_bench_cli_reports_every_model_and_ratios(tmp_path):
    pruned = tmp_path / "p.onnx"
    spa.prune(RESNET, pruned, ratio=0.5)
    np.savez(tmp_path / "in.npz", input=np.ones((2, 3, 32, 32), np.float32))
    run = _cli(
        "bench",
        RESNET,
        str(pruned),
        "--runs",
        "5",
        "--inputs",
        str(tmp_path / "in.npz"),
        "--json",
        str(tmp_path / "b.json"),
    )
    assert run.returncode == 0, run.stderr
    data = json.loads((tmp_path / "b.json").read_text())
    first, second = data["models"]
    assert first["ratio"] == 1.0 and second["runs"] == 5
    assert first["p10_ms"] <= first["median_ms"] <= first["p90_ms"]
    assert abs(second["ratio"] - second["median_ms"] / first["median_ms"]) < 1e-9


@pytest.mark.slow
def test_prune_bench_adds_a_latency_row(tmp_path):
    run = _cli(
        "prune", RESNET, str(tmp_path / "p.onnx"), "--bench", "--json", str(tmp_path / "r.json")
    )
    assert run.returncode == 0, run.stderr
    assert "latency" in run.stdout and "speed-up" in run.stdout
    assert set(json.loads((tmp_path / "r.json").read_text())["latency_ms"]) == {
        "before",
        "after",
        "threads",
        "runs",
        "p10_p90",
    }


@pytest.mark.slow
def test_sweep_prints_rows_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    run = _cli(
        "sweep",
        RESNET,
        "--ratios",
        "0.3,0.6",
        "--plot",
        str(tmp_path / "s.png"),
        "--json",
        str(tmp_path / "s.json"),
    )
    assert run.returncode == 0, run.stderr
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [r["ratio"] for r in rows] == [0.0, 0.3, 0.6]
    assert rows[2]["macs"] < rows[1]["macs"] < rows[0]["macs"]
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bench_inputs_file_must_match(tmp_path):
    np.savez(tmp_path / "in.npz", wrong=np.ones(3, np.float32))
    run = _cli("bench", RESNET, "--inputs", str(tmp_path / "in.npz"))
    assert run.returncode == 1 and "no array for input" in run.stderr
