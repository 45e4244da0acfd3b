"""Coverage of the model zoo: does every exported model in models/ prune to a valid, smaller model?

For every .onnx file under models/ (one folder per exporter: torch, transformers and mnist from
PyTorch, graph (torch_geometric), diffusers and yolo (ultralytics), tensorflow, jax, paddle,
sklearn, and packaged files from PyPI wheels), this script analyzes it, prunes it at each ratio with
spa's verification on (full checker, onnxruntime, same inputs and outputs), runs the zero-channel
check, and prints one row per model: groups, barriers, MACs and params kept at each ratio, the
zero-channel error and the wall time. A model passes when it prunes at ratio 0.5 to a valid model
that keeps at most 70% of its MACs and the zero-channel error is at most 1e-4, or at most 10 times
the model's own rounding noise (the relative change of its outputs when its inputs change by 1e-7: a
deep net on random inputs can amplify float32 rounding past 1e-4); every other row says why it did
not.

    pip install -e .
    python scripts/zoo_coverage.py [--models-dir models] [--ratios 0.3 0.5] \
        [--json out/coverage.json]

Symbolic input dims are fixed for the analysis at 2 (first axis) and 8 (others), except where
SHAPES gives a model's real input size (OCR crops, detector pages, YOLO's multiples of 32).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

import spa
from spa import runtime, verify

FRAMEWORKS = {
    "torch": "PyTorch",
    "transformers": "PyTorch",
    "mnist": "PyTorch",
    "tensorflow": "TensorFlow/Keras",
    "jax": "JAX/Flax",
    "paddle": "PaddlePaddle",
    "sklearn": "scikit-learn",
    "packaged": "PyPI packages",
    "graph": "PyTorch (torch_geometric)",
    "diffusers": "PyTorch (diffusers)",
    "yolo": "PyTorch (ultralytics)",
    "cache_decoder": "PyTorch",
}
SHAPES = {
    "ppocr_det": {"x": [1, 3, 320, 320]},
    "ppocr_cls": {"x": [1, 3, 48, 192]},
    "ppocr_rec": {"x": [1, 3, 48, 320]},
    "yolov8": {"images": [1, 3, 160, 160]},
    "yolo11": {"images": [1, 3, 160, 160]},
    "yolov8-seg": {"images": [1, 3, 160, 160]},
}
# Options a model is pruned with (opt-ins it needs to prune at all): shown in its row.
OPTIONS = {
    "decoder_dynamo": {"prune_cache": True},  # its heads reach the key/value cache
    "decoder_legacy": {"prune_cache": True},
    "gqa_decoder_dynamo": {"prune_cache": True},
}
PASS_RATIO = 0.5
PASS_MACS = 0.7
PASS_ERROR = 1e-4


def input_shapes(path: Path) -> dict[str, list[int]]:
    if path.stem in SHAPES:
        return SHAPES[path.stem]
    graph = onnx.load(path, load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    shapes = {}
    for value in graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") or d.dim_value < 1 for d in dims):
            shapes[value.name] = [
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (2 if i == 0 else 8)
                for i, d in enumerate(dims)
            ]
    return shapes


def rounding_noise(path: Path, shapes: dict[str, list[int]]) -> float:
    """Relative output change of the unpruned model when its float inputs change by 1e-7."""
    sess = runtime.session(spa.io.load(path))
    feeds = runtime.random_inputs(sess, shapes)
    rng = np.random.default_rng(1)
    nudged = {
        k: v * (1 + 1e-7 * rng.standard_normal(v.shape)).astype(v.dtype)
        if v.dtype.kind == "f"
        else v
        for k, v in feeds.items()
    }
    return verify.relative_error(sess.run(None, feeds), sess.run(None, nudged))


def exporter(path: Path) -> str:
    model = onnx.load(path, load_external_data=False)
    name = f"{model.producer_name} {model.producer_version}".strip()
    return name or "(none)"


def measure(path: Path, ratios: list[float]) -> dict:
    shapes = input_shapes(path)
    options = OPTIONS.get(path.stem, {})
    flags = " ".join(f"--{name.replace('_', '-')}" for name in options)
    row = {
        "model": f"{path.parent.name}/{path.stem}" + (f" ({flags})" if flags else ""),
        "framework": FRAMEWORKS.get(path.parent.name, path.parent.name),
        "exporter": exporter(path),
        "failures": [],
    }
    start = time.perf_counter()
    try:
        analysis = spa.analyze(path, input_shapes=shapes, **options)
        row.update(
            groups=len(analysis.groups),
            barriers=sum(b.blocked for b in analysis.barriers),
            normalizations=len(analysis.normalizations),
        )
    except spa.SpaError as e:
        row["failures"].append(f"analyze: {e}")
        return row
    for r in ratios:
        try:
            result = spa.prune(path, ratio=r, input_shapes=shapes, **options)
            row[f"macs@{r}"] = result.after.macs / max(result.before.macs, 1)
            row[f"params@{r}"] = result.after.params / max(result.before.params, 1)
        except spa.SpaError as e:
            row["failures"].append(f"prune {r}: {e}")
    try:
        row["zero_error"], _ = spa.zero_channel_check(path, input_shapes=shapes, **options)
    except spa.SpaError as e:
        row["failures"].append(f"zero-channel check: {e}")
    row["seconds"] = time.perf_counter() - start
    macs = row.get(f"macs@{PASS_RATIO}")
    if macs is not None and macs > PASS_MACS:
        reasons = []
        if row["barriers"]:
            reasons.append(f"{row['barriers']} barrier(s)")
        if row["normalizations"]:
            reasons.append(f"{row['normalizations']} normalization(s) keep their channels")
        row["failures"].append(
            f"MACs kept at {PASS_RATIO}: {macs:.2f} > {PASS_MACS}"
            + (f" ({', '.join(reasons)})" if reasons else "")
        )
    if row.get("zero_error", 0.0) > PASS_ERROR:
        row["rounding_noise"] = rounding_noise(path, shapes)
        if row["zero_error"] > 10 * row["rounding_noise"]:
            row["failures"].append(
                f"zero-channel error {row['zero_error']:.1e} (rounding noise "
                f"{row['rounding_noise']:.1e})"
            )
    return row


def table(rows: list[dict], ratios: list[float]) -> str:
    head = (
        "| model | framework | exporter | groups | barriers | "
        + " | ".join(f"MACs / params @{r}" for r in ratios)
        + " | zero-channel error | seconds | result |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        cells = [
            row["model"],
            row["framework"],
            row["exporter"],
            str(row.get("groups", "-")),
            str(row.get("barriers", "-")),
        ]
        for r in ratios:
            m, p = row.get(f"macs@{r}"), row.get(f"params@{r}")
            cells.append(f"{m:.2f} / {p:.2f}" if m is not None else "-")
        noise = f" (noise {row['rounding_noise']:.0e})" if "rounding_noise" in row else ""
        cells.append(f"{row['zero_error']:.0e}{noise}" if "zero_error" in row else "-")
        cells.append(f"{row['seconds']:.1f}" if "seconds" in row else "-")
        cells.append("pass" if not row["failures"] else "FAIL: " + "; ".join(row["failures"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    passed = [r for r in rows if not r["failures"]]
    frameworks = sorted({r["framework"] for r in rows})
    lines = [
        f"{len(passed)} of {len(rows)} models pass ({100 * len(passed) / max(len(rows), 1):.0f}%), "
        f"{len(frameworks)} sources:"
    ]
    for f in frameworks:
        mine = [r for r in rows if r["framework"] == f]
        lines.append(f"- {f}: {sum(not r['failures'] for r in mine)} of {len(mine)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", type=Path, default=Path(__file__).parent.parent / "models")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--json", type=Path, default=Path("out/coverage.json"))
    parser.add_argument("--only", default=None, help="substring of the model paths to run")
    args = parser.parse_args()
    ratios = sorted(set(args.ratios) | {PASS_RATIO})
    paths = sorted(
        p for p in args.models_dir.glob("*/*.onnx") if args.only is None or args.only in str(p)
    )
    rows = []
    for i, path in enumerate(paths):
        print(f"[{i + 1}/{len(paths)}] {path.parent.name}/{path.name}", file=sys.stderr, flush=True)
        rows.append(measure(path, ratios))
    print(table(rows, ratios))
    print()
    print(summary(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
