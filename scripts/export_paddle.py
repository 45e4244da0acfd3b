"""Export small PaddlePaddle models to ONNX with paddle2onnx.

Writes ``{out}/NAME.onnx`` (current toolchain) or ``{out}/NAME_p2o1.onnx``
(legacy toolchain, see below) for each NAME:

* ``resnet`` -- ResNet-style CNN written here: Conv2D + BatchNorm2D + ReLU
  stem, three BasicBlocks (16, 32 and 64 channels, the last two strided with
  a 1x1 Conv + BN shortcut), AdaptiveAvgPool2D(1), flatten, Linear;
* ``mobilenet`` -- MobileNetV2-style CNN written here: inverted residual
  blocks with 1x1 expand, 3x3 depthwise (groups = channels) and 1x1 project
  convolutions, ReLU6, residual adds where shapes allow, Dropout, Linear;
* ``mlp`` -- 784 -> 128 -> 64 -> 10 (Linear + ReLU, one BatchNorm1D);
* ``mobilenetv3`` -- ``paddle.vision.models.mobilenet_v3_small(scale=0.25)``
  from Paddle's own model zoo (squeeze-excitation, hardswish/hardsigmoid),
  random init (``pretrained=False``);
* ``shufflenet`` -- ``paddle.vision.models.shufflenet_v2_x0_25`` (channel
  split/shuffle), random init.

The image models take ``input`` of shape (B, 3, 32, 32) float32 (NCHW), the
MLP (B, 784); B is dynamic (``InputSpec([None, ...])``). All return (B, 10)
logits. Export goes through ``paddle.onnx.export`` (``paddle.jit.save`` to a
static program, then paddle2onnx) at opset 11, the opset Paddle's deployment
docs use. Weights are random (``paddle.seed``; the same weights under both
toolchains below), BatchNorm statistics and affine parameters are randomized
so that folding them is non-trivial; nothing is downloaded.

Two toolchains, told apart by the installed paddle2onnx's major version:

* current -- paddlepaddle 3.3.1 + paddle2onnx 2.1.0 -> ``NAME.onnx``: PIR
  program; weights are initializers named after the Paddle parameters
  (``conv2d_0.w_0``, ``batch_norm2d_0.w_1``, ...), Polygraphy constant folding
  (paddle2onnx's default), an ``Identity`` after most elementwise ops, output
  ``fetch_name_0``, batch dim ``DynamicDimension.0`` on input and output;
* legacy -- paddlepaddle 2.6.2 + paddle2onnx 1.2.11 -> ``NAME_p2o1.onnx``:
  every weight and helper constant is an unnamed ``Constant`` node, the graph
  has no initializers at all, output ``save_infer_model/scale_0.tmp_N`` whose
  batch dim (``DynamicDimension.1``) is not tied to the input's -- what many
  Paddle-exported models in the wild look like. paddle2onnx raises the opset
  where an op needs it (``mobilenetv3_p2o1`` is opset 14 for HardSwish).

Both keep BatchNormalization in the graph (nothing is folded into the Conv),
Linear is MatMul + Add, and neither sets ``producer_name``.

Besides each ``.onnx`` file, the export writes ``{ref_dir}/{stem}.npz`` with a
random input batch of 2 and the Paddle output on it (not committed).

Usage (two environments: paddle is never installed into the main one)::

    python -m venv /work/venvs/paddle
    /work/venvs/paddle/bin/pip install paddlepaddle==3.3.1 paddle2onnx==2.1.0 \\
        packaging onnxruntime==1.32.0 onnx_graphsurgeon==0.6.1 sympy==1.14.0
    /work/venvs/paddle/bin/python scripts/export_paddle.py --out models/paddle [--only NAME]

    python -m venv /work/venvs/paddle26
    /work/venvs/paddle26/bin/pip install paddlepaddle==2.6.2 paddle2onnx==1.2.11 "numpy<2"
    /work/venvs/paddle26/bin/python scripts/export_paddle.py --out models/paddle [--only NAME]

    # then, in the main environment (onnx + onnxruntime + numpy only):
    python scripts/export_paddle.py --check --out models/paddle

(paddle2onnx imports ``packaging`` without declaring it, and its Polygraphy
folding pip-installs onnxruntime, onnx_graphsurgeon and sympy at run time when
they are missing; installing them up front keeps that from happening.)

``--check`` takes every ``NAME.onnx`` and ``NAME_p2o1.onnx`` there, runs
``onnx.checker.check_model(path, full_check=True)`` on it, runs it in onnxruntime on the saved
batch of 2 and requires the max abs difference to the Paddle output to be < 1e-4.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections import Counter

import numpy as np

NAMES = ("resnet", "mobilenet", "mlp", "mobilenetv3", "shufflenet")
SEED = 0
TOL = 1e-4
OPSET = 11
DEFAULT_REF_DIR = "/tmp/spa_refs/paddle"


def toolchain_suffix() -> str:
    import paddle2onnx

    return "_p2o1" if int(paddle2onnx.__version__.split(".")[0]) < 2 else ""


def input_shape(name: str) -> list:
    return [None, 784] if name == "mlp" else [None, 3, 32, 32]


# --------------------------------------------------------------------------
# Models. Paddle's dynamic-to-static conversion reads the source of forward()
# and insists on the parameter being called ``self``; the classes therefore
# live at module level, behind a function so that --check needs no paddle.
# --------------------------------------------------------------------------


def _define_models():
    import paddle
    from paddle import nn

    def conv_bn(cin, cout, k=3, stride=1, groups=1, act="relu"):
        layers = [
            nn.Conv2D(cin, cout, k, stride, k // 2, groups=groups, bias_attr=False),
            nn.BatchNorm2D(cout),
        ]
        if act == "relu":
            layers.append(nn.ReLU())
        elif act == "relu6":
            layers.append(nn.ReLU6())
        return nn.Sequential(*layers)

    class BasicBlock(nn.Layer):
        def __init__(self, cin, cout, stride=1):
            super().__init__()
            self.conv1 = conv_bn(cin, cout, 3, stride)
            self.conv2 = conv_bn(cout, cout, 3, 1, act=None)
            self.short = (
                conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None
            )
            self.relu = nn.ReLU()

        def forward(self, x):
            identity = x if self.short is None else self.short(x)
            return self.relu(self.conv2(self.conv1(x)) + identity)

    class ResNet(nn.Layer):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn(3, 16)
            self.layer1 = BasicBlock(16, 16)
            self.layer2 = BasicBlock(16, 32, stride=2)
            self.layer3 = BasicBlock(32, 64, stride=2)
            self.pool = nn.AdaptiveAvgPool2D(1)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = self.layer3(self.layer2(self.layer1(self.stem(x))))
            return self.fc(paddle.flatten(self.pool(x), 1))

    class InvertedResidual(nn.Layer):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            self.use_res = stride == 1 and cin == cout
            self.expand = conv_bn(cin, hidden, 1, act="relu6")
            self.dw = conv_bn(hidden, hidden, 3, stride, groups=hidden, act="relu6")
            self.project = conv_bn(hidden, cout, 1, act=None)

        def forward(self, x):
            y = self.project(self.dw(self.expand(x)))
            return x + y if self.use_res else y

    class MobileNet(nn.Layer):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn(3, 16, 3, 1, act="relu6")
            self.blocks = nn.Sequential(
                InvertedResidual(16, 16, 1, 2),
                InvertedResidual(16, 24, 2, 4),
                InvertedResidual(24, 24, 1, 4),
                InvertedResidual(24, 32, 2, 4),
                InvertedResidual(32, 32, 1, 4),
            )
            self.head = conv_bn(32, 128, 1, act="relu6")
            self.pool = nn.AdaptiveAvgPool2D(1)
            self.dropout = nn.Dropout(0.2)
            self.fc = nn.Linear(128, 10)

        def forward(self, x):
            x = self.pool(self.head(self.blocks(self.stem(x))))
            return self.fc(self.dropout(paddle.flatten(x, 1)))

    class MLP(nn.Layer):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(784, 128)
            self.fc2 = nn.Linear(128, 64)
            self.bn = nn.BatchNorm1D(64)
            self.fc3 = nn.Linear(64, 10)
            self.relu = nn.ReLU()

        def forward(self, x):
            x = self.relu(self.fc1(x))
            x = self.relu(self.bn(self.fc2(x)))
            return self.fc3(x)

    return {
        "resnet": ResNet,
        "mobilenet": MobileNet,
        "mlp": MLP,
        "mobilenetv3": lambda: paddle.vision.models.mobilenet_v3_small(
            scale=0.25, num_classes=10, pretrained=False
        ),
        "shufflenet": lambda: paddle.vision.models.shufflenet_v2_x0_25(
            num_classes=10, pretrained=False
        ),
    }


def build(name: str):
    import paddle

    paddle.seed(SEED)
    model = _define_models()[name]()
    randomize_bn(model, np.random.default_rng(SEED + 1))
    model.eval()
    return model


def randomize_bn(model, rng: np.random.Generator) -> None:
    """Random, non-trivial BatchNorm statistics and affine parameters."""
    from paddle import nn

    for layer in model.sublayers(include_self=True):
        if isinstance(layer, nn.layer.norm._BatchNormBase):
            c = layer._mean.shape[0]
            layer._mean.set_value(rng.normal(0.0, 0.2, c).astype(np.float32))
            layer._variance.set_value(rng.uniform(0.5, 1.5, c).astype(np.float32))
            layer.weight.set_value(rng.uniform(0.5, 1.5, c).astype(np.float32))
            layer.bias.set_value(rng.normal(0.0, 0.1, c).astype(np.float32))


# --------------------------------------------------------------------------
# Export (in the paddle venv) and check (in the main environment)
# --------------------------------------------------------------------------


def export(name: str, out: str, ref_dir: str) -> None:
    import paddle

    model = build(name)
    stem = name + toolchain_suffix()
    prefix = os.path.join(out, stem)
    spec = paddle.static.InputSpec(input_shape(name), "float32", "input")
    # paddle.onnx.export logs conversion errors instead of raising them.
    if os.path.exists(prefix + ".onnx"):
        os.remove(prefix + ".onnx")
    paddle.onnx.export(model, prefix, input_spec=[spec], opset_version=OPSET)
    # paddle2onnx 1.x leaves its temporary static model beside the output.
    shutil.rmtree(os.path.join(out, "paddle_model_temp_dir"), ignore_errors=True)
    path = prefix + ".onnx"
    if not os.path.exists(path):
        raise SystemExit(f"paddle2onnx wrote no {path}; see its log above")

    rng = np.random.default_rng(SEED + 2)
    x = rng.standard_normal((2, *input_shape(name)[1:])).astype(np.float32)
    with paddle.no_grad():
        y = model(paddle.to_tensor(x)).numpy().astype(np.float32)
    assert y.shape == (2, 10), y.shape
    np.savez(os.path.join(ref_dir, f"{stem}.npz"), input=x, logits=y)
    summary = f"{path}: {os.path.getsize(path) / 1024:.0f} KiB"
    try:  # the legacy venv has no onnx package
        import onnx
    except ImportError:
        print(summary)
        return
    ops = Counter(n.op_type for n in onnx.load(path).graph.node)
    print(f"{summary}, {sum(ops.values())} nodes: {dict(ops)}")


def check(stem: str, out: str, ref_dir: str) -> float:
    from export_check import max_difference

    path = os.path.join(out, f"{stem}.onnx")
    diff = max_difference(path, os.path.join(ref_dir, f"{stem}.npz"))
    status = "ok" if diff < TOL else "FAIL"
    print(
        f"{path}: check_model(full_check) ok, onnxruntime vs paddle max abs diff {diff:.2e} "
        f"{status}"
    )
    return diff


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/paddle")
    ap.add_argument("--ref-dir", default=DEFAULT_REF_DIR, help="where the reference .npz files go")
    ap.add_argument("--only", choices=NAMES, action="append")
    ap.add_argument(
        "--check", action="store_true", help="check existing exports (main environment)"
    )
    args = ap.parse_args(argv)
    names = args.only or NAMES
    if args.check:
        stems = [
            n + sfx
            for n in names
            for sfx in ("", "_p2o1")
            if os.path.exists(os.path.join(args.out, n + sfx + ".onnx"))
        ]
        if not stems:
            raise SystemExit(f"no exported models in {args.out}")
        bad = [n for n in stems if not check(n, args.out, args.ref_dir) < TOL]
        return 1 if bad else 0
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.ref_dir, exist_ok=True)
    for name in names:
        export(name, args.out, args.ref_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
