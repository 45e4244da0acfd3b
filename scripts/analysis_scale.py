"""How the analysis scales with the graph: `spa.analyze` and a plan on chains of N MatMul+Relu
layers (16x16 weights), then the ratio of the times. Linear analysis gives time(8N) ~ 8 time(N).

    python scripts/analysis_scale.py [--layers 500 4000] [--prune]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import spa


def chain(layers: int, width: int = 16) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits.append(
            numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), f"w{i}")
        )
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"matmul{i}"))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, width])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[500, 4000])
    parser.add_argument(
        "--prune",
        action="store_true",
        help="also time a whole prune (l2, no verification) with its JSON report",
    )
    args = parser.parse_args()
    times = []
    for n in args.layers:
        model = chain(n)
        start = time.perf_counter()
        analysis = spa.analyze(model)
        seconds = time.perf_counter() - start
        line = (
            f"{n:>7} layers ({2 * n} nodes): analyze {seconds:.2f} s, {len(analysis.groups)} groups"
        )
        if args.prune:
            start = time.perf_counter()
            result = spa.prune(model, ratio=0.5, importance="l2", round_to=1, verify=False)
            result.report()
            line += f"; prune + report {time.perf_counter() - start:.2f} s"
        times.append(seconds)
        print(line, flush=True)
    for (a, ta), (b, tb) in zip(zip(args.layers, times), zip(args.layers[1:], times[1:])):
        print(f"{b} / {a} layers: analysis time x{tb / ta:.1f} for x{b / a:.1f} the graph")


if __name__ == "__main__":
    main()
