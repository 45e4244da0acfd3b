"""What a prune costs: spa's time as a multiple of one onnxruntime pass over the same calibration
data, and its peak memory as a multiple of the model's weight bytes (issue #16).

Models, each pruned in its own process (its peak RSS is its own), calibrated and with the data-free
default, at 0.85 of the MACs:

- EfficientNet-Lite0 (legacy export) and SmolLM2-135M (dynamo) with their calibration data, from
  scripts/real_models.py (`python scripts/real_models.py build` first);
- ResNet-50 from a transformers config, random weights, dynamo export, 224x224
  (scripts/export_hf_vision.py), calibrated on 64 random crops of scikit-image photos;
- a LLaMA-style model over 2 GB built here: random weights, hidden 2048, 16 layers, 32 query and 8
  key/value heads, FFN 5632, vocabulary 32,000 (3.4 GB of float32 weights, external data),
  dynamo export; calibrated on 16 windows of 128 random token ids.

One pass is timed with the thread count spa's calibration sessions use (every core), on a session
built beforehand. Rows accumulate in out/cost/results.json.

    . out/venv-real/bin/activate   # scripts/real_models.py's environment
    python scripts/prune_cost.py build
    python scripts/prune_cost.py measure [--models efficientnet,smollm2,resnet50,llama2g]
    [--methods calibrated,data-free]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
OUT = SCRIPTS.parent / "out" / "cost"
REAL = SCRIPTS.parent / "out" / "real"
TARGET = 0.85
TIMEOUT_S = 40 * 60

sys.path.insert(0, str(SCRIPTS))


def llama_config():
    import transformers

    return transformers.LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


MODELS = {
    # name: (model file, calibration file, input shapes for the analysis)
    "efficientnet": (
        REAL / "efficientnet" / "efficientnet_legacy.onnx",
        REAL / "efficientnet" / "calibration.npz",
        None,
    ),
    "smollm2": (
        REAL / "smollm2" / "smollm2_dynamo.onnx",
        REAL / "smollm2" / "calibration.npz",
        {"input_ids": [1, 128]},
    ),
    "resnet50": (OUT / "resnet50_dynamo.onnx", OUT / "resnet50_calibration.npz", None),
    "llama2g": (
        OUT / "llama2g_dynamo.onnx",
        OUT / "llama2g_calibration.npz",
        {"input_ids": [1, 128]},
    ),
}


def build() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path, calibration, _ = MODELS["resnet50"]
    if not path.is_file():
        import export_hf_vision

        export_hf_vision.export("resnet50", OUT, "dynamo")
        print(f"resnet50: exported {path}")
    if not calibration.is_file():
        import real_models

        photos = real_models.package_folder("skimage") / "data"
        images = [real_models.rgb(photos / name) for name in real_models.CALIBRATION_PHOTOS]
        np.savez(calibration, pixel_values=real_models.random_crops(images, 64, seed=0))
    path, calibration, _ = MODELS["llama2g"]
    if not calibration.is_file():
        ids = np.random.default_rng(0).integers(
            0, llama_config().vocab_size, (16, 128), dtype=np.int64
        )
        np.savez(calibration, input_ids=ids)
    if not path.is_file():
        export_llama(path, np.load(calibration)["input_ids"])


def export_llama(path: Path, ids: np.ndarray) -> None:
    import real_models
    import torch
    import transformers

    torch.manual_seed(0)
    start = time.perf_counter()
    lm = transformers.LlamaForCausalLM(llama_config()).eval()

    net = real_models.logits_only(lm)
    real_models.torch_export(
        net,
        (torch.from_numpy(ids[:2, :16]),),
        path,
        "dynamo",
        (["input_ids"], ["logits"]),
        {"input_ids": {0: "batch", 1: "seq"}},
    )
    real_models.check_export(net, path, {"input_ids": ids[:2, :24]})
    print(
        f"llama2g: exported {path} in {time.perf_counter() - start:.0f} s, "
        f"{real_models.model_bytes(path) / 1e9:.2f} GB"
    )


def one_pass_seconds(path: Path, calibration: Path) -> float:
    """One pass of the original over the calibration data, in batches of 32 (spa.calibration.BATCH),
    on every core."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    data = dict(np.load(calibration))
    count = len(next(iter(data.values())))
    start = time.perf_counter()
    for i in range(0, count, 32):
        sess.run(None, {k: v[i : i + 32] for k, v in data.items()})
    return time.perf_counter() - start


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def stage_profile(stages: dict, done: threading.Event) -> None:
    """Every 0.1 s, the running pipeline step (spa.progress) and the resident memory: per step, its
    seconds and its peak."""
    from spa import progress

    while not done.wait(0.1):
        stage = progress._stage
        if stage is not None:
            seconds, peak = stages.get(stage[0], (0.0, 0))
            stages[stage[0]] = (time.perf_counter() - stage[1], max(peak, rss_bytes()))


def prune_child(request: dict) -> None:
    import real_models

    import spa

    options = {}
    if request["calibrated"]:
        options["calibration"] = dict(np.load(request["calibration"]))
    stages, done = {}, threading.Event()
    sampler = threading.Thread(target=stage_profile, args=(stages, done), daemon=True)
    sampler.start()
    result = spa.prune(
        request["input"],
        request["output"],
        target_macs=TARGET,
        input_shapes=request["input_shapes"],
        **options,
    )
    done.set()
    sampler.join()
    report = {
        "seconds": result.seconds,
        "macs": result.after.macs / max(result.before.macs, 1),
        "method": result.method.describe() if result.method else None,
        "peak_rss_bytes": real_models.peak_rss_bytes(),  # not the parent's: it ran a pass
        # spa's forked children (crash checks, the verification run): pages shared with spa's
        # count in both
        "peak_child_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "stages": stages,
    }
    Path(request["report"]).write_text(json.dumps(report))


def prune_in_child(request: dict) -> dict:
    Path(request["report"]).unlink(missing_ok=True)
    start = time.perf_counter()
    child = subprocess.run(
        [sys.executable, __file__, "_prune", json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if child.returncode != 0 or not Path(request["report"]).is_file():
        lines = [
            line for line in (child.stderr + child.stdout).strip().splitlines() if line.strip()
        ][-1:] or ["(no output)"]
        return {
            "error": f"exit {child.returncode}: {lines[0][:300]}",
            "wall_s": time.perf_counter() - start,
        }
    for p in (Path(request["output"]), Path(request["output"] + ".data")):
        p.unlink(missing_ok=True)
    return json.loads(Path(request["report"]).read_text())


def weight_bytes(path: Path) -> int:
    import onnx_ir as ir

    model = ir.load(path)
    return sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )


def measure(names: list[str], methods: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)  # the real models come from out/real: no build needed
    results_path = OUT / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    rows = []
    for name in names:
        path, calibration, shapes = MODELS[name]
        if not (path.is_file() and calibration.is_file()):
            print(f"{name}: {path} or its calibration data is missing (run build)")
            continue
        weights = weight_bytes(path)
        pass_s = one_pass_seconds(path, calibration)
        samples = len(next(iter(np.load(calibration).values())))
        print(
            f"\n{name}: {weights / 1e6:.0f} MB of weights; one onnxruntime pass over the {samples} "
            f"calibration samples: {pass_s:.1f} s ({os.cpu_count()} threads)",
            flush=True,
        )
        for method in methods:
            request = {
                "input": str(path),
                "output": str(OUT / f"{name}_pruned.onnx"),
                "report": str(OUT / f"{name}_{method}.json"),
                "calibration": str(calibration),
                "calibrated": method == "calibrated",
                "input_shapes": shapes,
            }
            report = prune_in_child(request)
            if "error" in report:
                line = f"  {method}: {report['error']}"
            else:
                line = (
                    f"  {method}: {report['seconds']:.0f} s = {report['seconds'] / pass_s:.1f}x a "
                    f"pass, peak {report['peak_rss_bytes'] / 1e9:.2f} GB"
                    f" = {report['peak_rss_bytes'] / weights:.2f}x the weights (its child "
                    f"processes' {report.get('peak_child_rss_bytes', 0) / 1e9:.2f} GB); MACs "
                    f"{report['macs']:.3f}; {report['method']}"
                )
            print(line, flush=True)
            for stage, (seconds, peak) in report.get("stages", {}).items():
                print(f"    {stage}: {seconds:.1f} s, peak {peak / 1e9:.2f} GB", flush=True)
            results[f"{name} {method}"] = dict(
                report,
                pass_s=pass_s,
                weight_bytes=weights,
                measured=time.strftime("%Y-%m-%d %H:%M"),
            )
            results_path.write_text(json.dumps(results, indent=1) + "\n")
            rows.append((name, method, weights, pass_s, report))
    print(
        "\n| model | weights | one pass | method | prune time | x a pass | peak memory | x the "
        "weights |\n|---|---|---|---|---|---|---|---|"
    )
    for name, method, weights, pass_s, r in rows:
        if "error" in r:
            print(
                f"| {name} | {weights / 1e6:.0f} MB | {pass_s:.1f} s | {method} | {r['error']} | | "
                "| |"
            )
        else:
            print(
                f"| {name} | {weights / 1e6:.0f} MB | {pass_s:.1f} s | {method} | "
                f"{r['seconds']:.0f} s | {r['seconds'] / pass_s:.1f} | "
                f"{r['peak_rss_bytes'] / 1e9:.2f} GB | {r['peak_rss_bytes'] / weights:.2f} |"
            )


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_prune":
        return prune_child(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=("build", "measure"))
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, of {','.join(MODELS)}"
    )
    parser.add_argument(
        "--methods", default="calibrated,data-free", help="comma-separated, of calibrated,data-free"
    )
    args = parser.parse_args()
    if args.command == "build":
        return build()
    measure(args.models.split(","), args.methods.split(","))


if __name__ == "__main__":
    main()
