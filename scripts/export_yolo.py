"""Export small YOLO detectors with ultralytics' own ONNX exporter.

Writes ``yolov8.onnx``, ``yolov8-seg.onnx`` and ``yolo11.onnx`` into ``--out`` (default
``models/yolo``): ultralytics' YOLOv8 and YOLO11 detection and YOLOv8's segmentation architectures
(C2f / C3k2 blocks, SPPF, YOLO11's C2PSA attention, the decoupled head with its DFL box decoding) at
the "n" depth and an eighth of the widths (a scale ultralytics' yaml files allow; channels 8 to 128,
10 classes), random weights built from the yaml (nothing is downloaded) and re-drawn so that the
outputs depend on the image (ultralytics' initial weights shrink the activations layer by layer and
its head's bias priors then fix every output whatever the input, which would make the zero-channel
test vacuous), exported by ``YOLO.export(format="onnx", dynamic=True)`` (torch's legacy exporter
underneath): input ``images`` (batch, 3, height, width), output ``output0``. Each export is checked
with the full checker and against the torch model in onnxruntime at 160x160.

    pip install torch==2.13.0 "torchvision<0.29" ultralytics==8.4.190
    python scripts/export_yolo.py [--out models/yolo]

(ultralytics' dependencies pull a CUDA torch: pin torch and torchvision in the same install.)
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from export_check import difference  # a sibling script
from ultralytics import YOLO
from ultralytics.cfg import get_cfg  # noqa: F401  (ultralytics' config machinery, imported first)
from ultralytics.utils import ROOT as ULTRALYTICS

SCALE = [0.50, 0.125, 1024]  # depth, width, max channels: "n" depth, an eighth of the widths
CLASSES = 10
SIZE = 160


# name -> (ultralytics' yaml, the file name it is built from: "n" picks the scale, "-seg" the task)
MODELS = {
    "yolov8": ("v8/yolov8.yaml", "yolov8n.yaml"),
    "yolov8-seg": ("v8/yolov8-seg.yaml", "yolov8n-seg.yaml"),
    "yolo11": ("11/yolo11.yaml", "yolo11n.yaml"),
}


def build(version: str, folder: Path) -> YOLO:
    source, name = MODELS[version]
    config = yaml.safe_load((ULTRALYTICS / "cfg" / "models" / source).read_text())
    config["scales"] = {"n": SCALE}
    config["nc"] = CLASSES
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    model = YOLO(str(path))
    with torch.no_grad():
        for module in model.model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    module.bias.normal_(0, 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def _first(outputs) -> np.ndarray:
    """output0 of what the torch model returns (nested tuples: predictions, then the raw maps and
    a segmentation head's prototypes)."""
    while isinstance(outputs, (list, tuple)):
        outputs = outputs[0]
    return outputs.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models/yolo"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    out = args.out.resolve()
    # ultralytics writes the export beside the model's yaml or in the working directory
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        for version in MODELS:
            model = build(version, Path(tmp))
            exported = Path(model.export(format="onnx", imgsz=SIZE, dynamic=True, simplify=False))
            path = out / f"{version}.onnx"
            shutil.copy(exported, path)
            images = torch.rand(2, 3, SIZE, SIZE)
            with torch.no_grad():
                want = model.model.eval()(images)
                want = _first(want)
            scale = max(1.0, float(np.abs(want).max()))  # box coordinates run to the image size
            error = difference(path, {"images": images.numpy()}, [want]) / scale
            assert error < 1e-4, f"{path.name}: onnxruntime differs from torch by {error}"
            with torch.no_grad():  # the outputs follow the image
                other = model.model(torch.rand(2, 3, SIZE, SIZE))
                other = _first(other)
            # the class scores (rows 4 on) are probabilities: another image must move them
            moved = float(np.abs(other[:, 4:] - want[:, 4:]).max())
            assert moved > 1e-2, f"{path.name}: the scores barely depend on the image ({moved})"
            print(f"{path}: ok (to torch {error:.1e}; another image moves the scores {moved:.2f})")


if __name__ == "__main__":
    main()
