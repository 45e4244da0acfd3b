"""Targets, global ranking, bench and sweep: behaviour, never timings."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import spa
from spa import analysis, io, normalize, plan, score

RESNET = "models/torch/resnet_legacy.onnx"


@pytest.mark.parametrize("kind,goal", [("macs", 0.5), ("macs", 0.3), ("params", 0.4)])
def test_target_is_met_by_the_smallest_ratio(kind, goal):
    result = spa.prune(RESNET, round_to=1, **{f"target_{kind}": goal})
    reached = getattr(result.after, kind) / getattr(result.before, kind)
    assert result.target["met"] and reached <= goal
    assert abs(result.target["reached"] - reached) < 1e-9  # the estimate is the real figure
    less = spa.prune(RESNET, round_to=1, ratio=max(result.ratio - 0.02, 0.0), verify=False)
    # a smaller ratio would not do
    assert getattr(less.after, kind) / getattr(less.before, kind) > goal


def test_unreachable_target_says_so():
    result = spa.prune(RESNET, target_macs=0.001)
    assert not result.target["met"] and result.target["reached"] > 0.001


def _analysis(path=RESNET):
    m = io.load(path)
    normalize.normalize(m)
    return analysis.analyze(m)


def test_global_ranking_follows_scores_across_groups_within_the_cap():
    a = _analysis()
    # One group is all noise: global ranking should take it first, up to the cap.
    weak = a.groups[0]
    scores = {c: 1.0 + i * 1e-3 for i, c in enumerate(int(c) for g in a.groups for c in g.classes)}
    scores.update({int(c): 0.01 for c in weak.classes})
    total = sum(g.width for g in a.groups)
    p = plan.make_plan(a, scores, ratio=0.1, round_to=1, global_ranking=True, max_group_ratio=0.75)
    assert len(p.by_group[weak.id]) == weak.width - plan.keep_count(weak.width, 0.75, 1)  # capped
    assert sum(len(v) for v in p.by_group.values()) == int(0.1 * total)
    capped = {
        g.id
        for g in a.groups
        if len(p.by_group[g.id]) == g.width - plan.keep_count(g.width, 0.75, 1)
    }
    removed_scores = [scores[int(c)] for gid, v in p.by_group.items() if gid != weak.id for c in v]
    kept_scores = [
        scores[int(c)]
        for g in a.groups
        if g.id not in capped
        for c in g.classes
        if c not in p.removed
    ]
    assert max(removed_scores) <= min(kept_scores)  # below the caps, strictly by score


def test_local_ratio_is_per_group():
    a = _analysis()
    p = plan.make_plan(a, score.score(a), 0.5, round_to=1)
    assert all(len(p.by_group[g.id]) == g.width // 2 for g in a.groups)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "spa", *args], capture_output=True, text=True)


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


def test_bench_inputs_file_must_match(tmp_path):
    np.savez(tmp_path / "in.npz", wrong=np.ones(3, np.float32))
    run = _cli("bench", RESNET, "--inputs", str(tmp_path / "in.npz"))
    assert run.returncode == 1 and "no array for input" in run.stderr


def _ort_optimized_ops(path, folder) -> dict:
    import collections

    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(folder / f"{path.stem}.ort.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(
        f"{n.domain}::{n.op_type}" for n in onnx.load(options.optimized_model_filepath).graph.node
    )


def test_onnxruntime_fusions_survive_pruning(tmp_path):
    """Sliced weights, no inserted Gather/Slice: Conv+BN+activation and Gemm+bias still fuse."""
    import onnx
    from graphs import Graph

    g = Graph()
    h = g.op("Relu", g.bn(g.conv("x", 3, 32), 32))
    h = g.op("Clip", g.bn(g.conv(h, 32, 32), 32), g.const(np.float32(0)), g.const(np.float32(6)))
    h = g.op("Flatten", g.op("GlobalAveragePool", h))
    g.op("Relu", g.gemm(h, 32, 16))
    g.nodes[-1].output[0] = "y"
    original = tmp_path / "m.onnx"
    onnx.save(g.model({"x": [1, 3, 16, 16]}, {"y": [1, 16]}), original)
    spa.prune(original, tmp_path / "p.onnx", ratio=0.5)
    before = _ort_optimized_ops(original, tmp_path)
    after = _ort_optimized_ops(tmp_path / "p.onnx", tmp_path)
    assert before == after
    assert before["com.microsoft::FusedConv"] == 2 and "::BatchNormalization" not in before
