"""Speed benchmark: spa's pruning time and the pruned models' latency, on ResNet-50 and MobileNetV2.

Builds the models offline from transformers configs (scripts/export_hf_vision.py, cached in
out/hf), then prints in one run:
  1. spa's pruning wall time (in-process, verification included) against a plain onnx.load +
     onnx.save of the same model;
  2. latency against MACs at ratios 0.3/0.5/0.7 (onnxruntime CPU, interleaved, one thread), and
     at the ratio found for --target-macs 0.5;
  3. the SIMD step effect: one conv layer at several output widths.
and writes the ResNet-50 sweep plot.

    pip install -e ".[export,plot]"
    python scripts/benchmark.py [--out out/hf] [--plot docs/sweep_resnet50.png]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))

import spa  # noqa: E402
from spa.bench import benchmark  # noqa: E402
from spa.plan import default_round_to  # noqa: E402
from spa.plot import sweep_plot  # noqa: E402


def median_time(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def wall_times(path: Path, scratch: Path) -> tuple[float, float, float]:
    def load_save():
        onnx.save(onnx.load(path), scratch / "plain.onnx")

    plain = median_time(load_save)
    spa_time = median_time(lambda: spa.prune(path, scratch / "pruned.onnx", ratio=0.5))
    no_verify = median_time(
        lambda: spa.prune(path, scratch / "pruned.onnx", ratio=0.5, verify=False)
    )
    return plain, spa_time, no_verify


def conv_model(out_channels: int, size: int = 56) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(
        rng.standard_normal((out_channels, 64, 3, 3)).astype(np.float32), "w"
    )
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels, size, size])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def simd_steps(scratch: Path) -> None:
    widths = [64, 60, 56, 52, 48, 40, 32]
    paths = []
    for c in widths:
        path = scratch / f"conv{c}.onnx"
        onnx.save(conv_model(c), path)
        paths.append(path)
    timings = benchmark(paths, [f"{c}" for c in widths], threads=1, progress=False)
    print("\n## SIMD steps: one 3x3 conv, 64 -> C channels on 56x56 (1 thread)\n")
    print("| output channels | MACs x | latency x |")
    print("|---|---|---|")
    for c, t in zip(widths, timings):
        print(f"| {c} | {c / 64:.3f} | {t.ratio:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("out/hf"))
    parser.add_argument("--plot", type=Path, default=Path("docs/sweep_resnet50.png"))
    args = parser.parse_args()
    from export_hf_vision import export

    models = {name: export(name, args.out, "dynamo") for name in ("resnet50", "mobilenetv2")}
    print(
        f"spa {spa.__version__}, onnxruntime {__import__('onnxruntime').__version__}, default "
        f"round-to {default_round_to()}"
    )
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        print("\n## Pruning wall time at ratio 0.5 (in-process, median of 3)\n")
        print(
            "| model | onnx.load + onnx.save | spa prune | ratio | spa prune --no-verify | ratio |"
        )
        print("|---|---|---|---|---|---|")
        for name, path in models.items():
            plain, full, quick = wall_times(path, scratch)
            print(
                f"| {name} | {plain:.3f} s | {full:.3f} s | {full / plain:.2f}x | {quick:.3f} s | "
                f"{quick / plain:.2f}x |"
            )

        print(
            "\n## Latency against MACs (onnxruntime CPU, 1 intra-op thread, all ratios "
            "interleaved)\n"
        )
        print("| model | ratio | MACs x | params x | latency x | speed-up |")
        print("|---|---|---|---|---|---|")
        for name, path in models.items():
            rows = spa.sweep(path, [0.3, 0.5, 0.7], threads=1)
            for row in rows[1:]:
                m, p = row["macs"] / rows[0]["macs"], row["params"] / rows[0]["params"]
                print(
                    f"| {name} | {row['ratio']} | {m:.3f} | {p:.3f} | {row['latency_ratio']:.3f} | "
                    f"{1 / row['latency_ratio']:.2f}x |"
                )
            if name == "resnet50" and args.plot:
                args.plot.parent.mkdir(parents=True, exist_ok=True)
                sweep_plot(
                    rows, args.plot, "ResNet-50 (transformers, dynamo export): spa sweep, 1 thread"
                )
            half = spa.prune(path, scratch / "half.onnx", target_macs=0.5)
            (before, after) = benchmark(
                [path, scratch / "half.onnx"], ["before", "after"], threads=1, progress=False
            )
            print(
                f"| {name} | --target-macs 0.5 -> {half.ratio:.3f} | "
                f"{half.after.macs / half.before.macs:.3f} | "
                f"{half.after.params / half.before.params:.3f} | {after.ratio:.3f} | "
                f"{1 / after.ratio:.2f}x |"
            )
        simd_steps(scratch)


if __name__ == "__main__":
    main()
