"""Export ResNet-50 and MobileNetV2 (Hugging Face ``transformers``) to ONNX, offline.

The models are built from their default ``transformers`` configs with random
weights -- nothing is downloaded from the Hugging Face hub (``HF_HUB_OFFLINE``
is set to 1):

* ``resnet50``    -- ``ResNetForImageClassification(ResNetConfig(num_labels=1000))``
  (bottleneck blocks, depths [3, 4, 6, 3], ~25.6M parameters);
* ``mobilenetv2`` -- ``MobileNetV2ForImageClassification(MobileNetV2Config(num_labels=1000))``
  (MobileNetV2 1.0/224 with TF-style "same" padding, ~3.5M parameters).

For each model NAME and exporter KIND (``dynamo`` and/or ``legacy``) it writes

* ``{out}/{NAME}_dynamo.onnx`` + ``{NAME}_dynamo.onnx.data`` (external
  weights) -- ``torch.onnx.export(..., dynamo=True)``, opset 18;
* ``{out}/{NAME}_legacy.onnx`` -- ``torch.onnx.export(..., dynamo=False)``,
  opset 17, weights inline.

Input ``pixel_values`` is (batch, 3, 224, 224) float32 with a dynamic batch
dimension; the single output is ``logits`` (batch, 1000). Models are seeded,
in eval mode, and every BatchNorm gets randomized running statistics and
affine parameters so that folded weights are non-trivial. An existing
``.onnx`` file is reused (delete it to re-export). Each file is checked with
``onnx.checker.check_model(path, full_check=True)`` and run in onnxruntime on
a random batch of 2; the max abs difference to torch must be < 1e-3.

The output folder (default ``out/hf``) is git-ignored; these files are big
(ResNet-50 is ~100 MB per exporter) and are not committed.

Usage::

    pip install torch==2.13.0 onnxscript transformers
    python scripts/export_hf_vision.py --out out/hf [--only resnet50] [--exporter
    dynamo|legacy|both]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import contextlib
import io
import logging
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

NAMES = ("resnet50", "mobilenetv2")
EXPORTERS = ("dynamo", "legacy")
NUM_LABELS = 1000
INPUT_SHAPE = (1, 3, 224, 224)
SEED = 0
TOL = 1e-3
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"


class LogitsOnly(nn.Module):
    """Wraps a ``*ForImageClassification`` model so its only output is ``logits``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values).logits


def build(name: str) -> nn.Module:
    """The seeded, eval-mode, logits-only model ``name`` with randomized BatchNorms."""
    import transformers

    torch.manual_seed(SEED)
    if name == "resnet50":
        cfg = transformers.ResNetConfig(num_labels=NUM_LABELS)
        model = transformers.ResNetForImageClassification(cfg)
    elif name == "mobilenetv2":
        cfg = transformers.MobileNetV2Config(num_labels=NUM_LABELS)
        model = transformers.MobileNetV2ForImageClassification(cfg)
    else:
        raise ValueError(f"unknown model {name!r}; expected one of {NAMES}")
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(generator=gen).mul_(0.1)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                    m.bias.normal_(generator=gen).mul_(0.1)
    return LogitsOnly(model).eval()


def _quiet():
    """Silence the exporters' chatter (progress lines, warnings)."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def onnx_path(name: str, out_dir: Path, exporter: str) -> Path:
    return Path(out_dir) / f"{name}_{exporter}.onnx"


def _export(model: nn.Module, path: Path, exporter: str) -> None:
    x = torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(SEED))
    data = Path(str(path) + ".data")
    if data.exists():  # don't leave a stale external-data file
        data.unlink()
    with _quiet(), torch.no_grad():
        if exporter == "dynamo":
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=True,
                opset_version=18,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
                external_data=True,
                optimize=True,
                verify=False,
            )
        elif exporter == "legacy":
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
        else:
            raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")


def export(name: str, out_dir: Path, exporter: str = "dynamo") -> Path:
    """Export model ``name`` with ``exporter`` into ``out_dir``; return the .onnx path.

    Skips the export when the file already exists (a cache).
    """
    if name not in NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {NAMES}")
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    path = onnx_path(name, out_dir, exporter)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # e.g. "torchvision is not installed. Skipping torchvision::nms"
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    _export(build(name), path, exporter)
    return path


def file_size(path: Path) -> int:
    """Size of ``path`` plus its ``.data`` external-weights file, if any."""
    path = Path(path)
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def verify(name: str, path: Path, model: nn.Module | None = None) -> tuple[float, float]:
    """check_model(full_check=True), then run onnxruntime vs torch on a batch of 2.

    Returns (max |onnxruntime - torch|, max |torch logits|); the second gives
    the scale (MobileNetV2's random-init logits are small, ~0.25).
    """
    onnx.checker.check_model(str(path), full_check=True)
    model = build(name) if model is None else model
    x = torch.randn(2, *INPUT_SHAPE[1:], generator=torch.Generator().manual_seed(SEED + 2))
    with torch.no_grad():
        ref = model(x).numpy()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    (got,) = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    assert got.shape == ref.shape == (2, NUM_LABELS), (got.shape, ref.shape)
    return float(np.abs(got - ref).max()), float(np.abs(ref).max())


def op_counts(path: Path) -> Counter:
    m = onnx.load(str(path), load_external_data=False)
    return Counter(n.op_type for n in m.graph.node)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/hf", help="output directory (default: out/hf)")
    ap.add_argument("--only", choices=NAMES, help="export just this model")
    ap.add_argument(
        "--exporter",
        choices=(*EXPORTERS, "both"),
        default="both",
        help="which torch exporter(s) to use (default: both)",
    )
    ap.add_argument("--ops", action="store_true", help="also print op-type counts")
    args = ap.parse_args(argv)

    out = Path(args.out)
    names = [args.only] if args.only else list(NAMES)
    kinds = list(EXPORTERS) if args.exporter == "both" else [args.exporter]
    failed = False
    for name in names:
        model = None
        for kind in kinds:
            cached = onnx_path(name, out, kind).exists()
            t0 = time.perf_counter()
            path = export(name, out, kind)
            secs = time.perf_counter() - t0
            if model is None:
                model = build(name)
            diff, scale = verify(name, path, model)
            ok = diff < TOL
            failed |= not ok
            took = "cached" if cached else f"{secs:6.1f}s"
            print(
                f"{'ok  ' if ok else 'FAIL'} {name:12s} {kind:6s} "
                f"size={file_size(path) / 2**20:7.1f}MiB export={took:>7s} "
                f"max_abs_diff={diff:.2e} (|logits|max={scale:.3g})  {path}"
            )
            if args.ops:
                print("     ", dict(sorted(op_counts(path).items(), key=lambda kv: -kv[1])))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
