"""Export six small hand-written CNNs to ONNX with both torch exporters.

Writes, for each model NAME in (resnet, mobilenetv2, densenet, shufflenet,
senet, vgg):

* ``{out}/{NAME}_dynamo.onnx`` (+ ``{NAME}_dynamo.onnx.data``, external
  weights) -- ``torch.onnx.export(..., dynamo=True)``, opset 18;
* ``{out}/{NAME}_legacy.onnx`` -- ``torch.onnx.export(..., dynamo=False)``,
  opset 17, weights inline.

All models take ``input`` of shape (batch, 3, 32, 32) float32 and return
``logits`` of shape (batch, 10); the batch dimension is dynamic in both
exporters. The nets are written in plain ``torch.nn`` (no torchvision),
seeded, in eval mode, with randomized BatchNorm statistics/affine parameters
so that folded weights are non-trivial. After each export the file is checked
with ``onnx.checker.check_model(path, full_check=True)`` and run in
onnxruntime on a random batch of 2; the max abs difference to torch must be
< 1e-4.

Usage::

    pip install torch==2.13.0 onnxscript
    python scripts/export_torch_models.py [--out models/torch] [--only NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10
INPUT_SHAPE = (1, 3, 32, 32)
SEED = 0
TOL = 1e-4


# --------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------


def conv_bn(cin, cout, k=3, stride=1, groups=1, act="relu"):
    layers = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act == "relu":
        layers.append(nn.ReLU(inplace=True))
    elif act == "relu6":
        layers.append(nn.ReLU6(inplace=True))
    elif act is not None:
        raise ValueError(act)
    return nn.Sequential(*layers)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, c, h, w)


# ---- ResNet ---------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.downsample = None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, stride=2), BasicBlock(32, 32))
        self.layer3 = nn.Sequential(BasicBlock(32, 64, stride=2), BasicBlock(64, 64))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# ---- MobileNetV2 ----------------------------------------------------------


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1, act="relu6"))
        layers += [
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act="relu6"),
            conv_bn(hidden, cout, 1, act=None),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_res else out


class DepthMultiplierBlock(nn.Module):
    """Depthwise conv with depth multiplier 2 (out = 2*in, groups=in)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.dw = conv_bn(cin, 2 * cin, 3, 1, groups=cin, act="relu6")
        self.pw = conv_bn(2 * cin, cout, 1, act=None)

    def forward(self, x):
        return self.pw(self.dw(x))


class MobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 1, act="relu6")
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 1, 1),  # no expansion
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),  # residual
            DepthMultiplierBlock(24, 32),
            InvertedResidual(32, 40, 2, 4),
            InvertedResidual(40, 40, 1, 4),  # residual
            InvertedResidual(40, 48, 1, 4),
        )
        self.head = conv_bn(48, 96, 1, act="relu6")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(96, NUM_CLASSES)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(self.dropout(x))


# ---- DenseNet (+ one Inception block) --------------------------------------


class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size=2):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, feats):
        x = torch.cat(feats, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseBlock(nn.Module):
    def __init__(self, num_layers, cin, growth):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth) for i in range(num_layers))

    def forward(self, x):
        feats = [x]
        for layer in self.layers:
            feats.append(layer(feats))
        return torch.cat(feats, 1)


class Transition(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)

    def forward(self, x):
        return self.pool(self.conv(F.relu(self.norm(x))))


class InceptionBlock(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.b1 = conv_bn(cin, 16, 1)
        self.b2 = nn.Sequential(conv_bn(cin, 16, 1), conv_bn(16, 24, 3))
        self.b3 = nn.Sequential(conv_bn(cin, 8, 1), conv_bn(8, 16, 3), conv_bn(16, 16, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, 8, 1))

    def forward(self, x):  # -> 16 + 24 + 16 + 8 = 64 channels
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, 1, 1, bias=False)
        self.block1 = DenseBlock(3, 24, 8)  # -> 48
        self.trans1 = Transition(48, 32)
        self.block2 = DenseBlock(4, 32, 8)  # -> 64
        self.trans2 = Transition(64, 48)
        self.inception = InceptionBlock(48)  # -> 64
        self.norm = nn.BatchNorm2d(64)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x):
        x = self.trans1(self.block1(self.stem(x)))
        x = self.trans2(self.block2(x))
        x = F.relu(self.norm(self.inception(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


# ---- ShuffleNet -----------------------------------------------------------


class ShuffleV2Unit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                conv_bn(cin, cin, 3, stride, groups=cin, act=None),
                conv_bn(cin, branch, 1),
            )
            b2_in = cin
        else:
            assert cin == cout
            self.branch1 = None
            b2_in = branch
        self.branch2 = nn.Sequential(
            conv_bn(b2_in, branch, 1),
            conv_bn(branch, branch, 3, stride, groups=branch, act=None),
            conv_bn(branch, branch, 1),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleV1Unit(nn.Module):
    """ShuffleNetV1 unit (stride 1): grouped 1x1 -> shuffle -> dw 3x3 -> grouped 1x1, + x."""

    def __init__(self, channels, groups=4):
        super().__init__()
        mid = channels // 2
        self.groups = groups
        self.gconv1 = conv_bn(channels, mid, 1, groups=groups)
        self.dw = conv_bn(mid, mid, 3, 1, groups=mid, act=None)
        self.gconv2 = conv_bn(mid, channels, 1, groups=groups, act=None)

    def forward(self, x):
        out = self.gconv1(x)
        out = channel_shuffle(out, self.groups)
        out = self.gconv2(self.dw(out))
        return F.relu(x + out)


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 24, 3, 1)
        self.stage2 = nn.Sequential(ShuffleV2Unit(24, 48, 2), ShuffleV2Unit(48, 48, 1))
        self.stage3 = nn.Sequential(
            ShuffleV2Unit(48, 96, 2), ShuffleV2Unit(96, 96, 1), ShuffleV1Unit(96, 4)
        )
        self.head = conv_bn(96, 96, 1)
        self.fc = nn.Linear(96, NUM_CLASSES)

    def forward(self, x):
        x = self.head(self.stage3(self.stage2(self.stem(x))))
        x = x.mean([2, 3])
        return self.fc(x)


# ---- SENet ----------------------------------------------------------------


class SqueezeExcite(nn.Module):
    def __init__(self, channels, reduction=4, use_linear=False, hard=False):
        super().__init__()
        red = channels // reduction
        self.use_linear = use_linear
        self.pool = nn.AdaptiveAvgPool2d(1)
        if use_linear:
            self.reduce = nn.Linear(channels, red)
            self.expand = nn.Linear(red, channels)
        else:
            self.reduce = nn.Conv2d(channels, red, 1)
            self.expand = nn.Conv2d(red, channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.gate = nn.Hardsigmoid() if hard else nn.Sigmoid()

    def forward(self, x):
        if self.use_linear:
            n, c = x.shape[:2]
            s = torch.flatten(self.pool(x), 1)
            s = self.gate(self.expand(self.relu(self.reduce(s))))
            s = s.view(n, c, 1, 1)
        else:
            s = self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))
        return x * s


class SEBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, **se_kw):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, 1, act=None)
        self.se = SqueezeExcite(cout, **se_kw)
        if stride != 1 or cin != cout:
            self.shortcut = conv_bn(cin, cout, 1, stride, act=None)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.se(self.conv2(self.conv1(x)))
        return F.relu(out + self.shortcut(x))


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.blocks = nn.Sequential(
            SEBlock(16, 16),  # conv SE, sigmoid
            SEBlock(16, 32, 2, use_linear=True),  # Linear SE
            SEBlock(32, 32, hard=True),  # conv SE, hardsigmoid
            SEBlock(32, 64, 2),
            SEBlock(64, 64, use_linear=True, hard=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


# ---- VGG ------------------------------------------------------------------


class VGG(nn.Module):
    cfg = [16, 16, "M", 32, 32, "M", 64, 64, "M", 64, "M"]

    def __init__(self):
        super().__init__()
        layers, cin = [], 3
        for v in self.cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(conv_bn(cin, v, 3))
                cin = v
        self.features = nn.Sequential(*layers)  # -> 64 x 2 x 2
        self.classifier = nn.Sequential(
            nn.Linear(64 * 2 * 2, 64),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(64, NUM_CLASSES),
        )

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        return self.classifier(x)


MODELS = {
    "resnet": ResNet,
    "mobilenetv2": MobileNetV2,
    "densenet": DenseNet,
    "shufflenet": ShuffleNet,
    "senet": SENet,
    "vgg": VGG,
}


# --------------------------------------------------------------------------
# Build / export / verify
# --------------------------------------------------------------------------


def build(name: str) -> nn.Module:
    torch.manual_seed(SEED)
    model = MODELS[name]()
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
    return model.eval()


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def strip_stack_traces(path) -> int:
    """Drop the dynamo exporter's per-node Python stack traces from ``path``.

    They hold absolute paths of this script and of the Python install, so the
    files would differ between checkouts/machines. All other metadata
    (namespace, fx_node, class_hierarchy, ...) is kept. The external-data file
    is not touched: the proto is loaded without its external tensors and
    saved back with the same references.
    """
    model = onnx.load(path, load_external_data=False)
    removed = 0

    def scrub(props):
        nonlocal removed
        keep = [p for p in props if p.key != STACK_TRACE_KEY]
        removed += len(props) - len(keep)
        if len(keep) != len(props):
            del props[:]
            props.extend(keep)

    def walk(graph):
        for n in graph.node:
            scrub(n.metadata_props)
            for a in n.attribute:
                if a.HasField("g"):
                    walk(a.g)
                for g in a.graphs:
                    walk(g)
        for v in list(graph.input) + list(graph.output) + list(graph.value_info):
            scrub(v.metadata_props)
        for t in graph.initializer:
            scrub(t.metadata_props)

    walk(model.graph)
    for f in model.functions:
        for n in f.node:
            scrub(n.metadata_props)
    if removed:
        onnx.save(model, path)
    return removed


def _quiet():
    """Silence the exporters' chatter (progress lines, warnings)."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def export_dynamo(model, x, path) -> bool:
    """Returns True if the batch dim is dynamic, False if we fell back to static."""
    for dynamic in (True, False):
        kw = {}
        if dynamic:
            kw["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch")}}
        try:
            with _quiet():
                torch.onnx.export(
                    model,
                    (x,),
                    path,
                    dynamo=True,
                    opset_version=18,
                    input_names=["input"],
                    output_names=["logits"],
                    external_data=True,
                    optimize=True,
                    verify=False,
                    **kw,
                )
            return dynamic
        except Exception as e:  # noqa: BLE001
            if not dynamic:
                raise
            print(
                f"  dynamo: dynamic batch export failed ({type(e).__name__}: {e}); "
                "falling back to static batch",
                file=sys.stderr,
            )
    raise AssertionError("unreachable")


def export_legacy(model, x, path) -> bool:
    with _quiet():
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
    return True


def verify(model, path, dynamic: bool) -> float:
    onnx.checker.check_model(path, full_check=True)
    batch = 2 if dynamic else INPUT_SHAPE[0]
    gen = torch.Generator().manual_seed(SEED + 2)
    x = torch.randn(batch, *INPUT_SHAPE[1:], generator=gen)
    with torch.no_grad():
        ref = model(x).numpy()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    (got,) = sess.run(["logits"], {"input": x.numpy()})
    assert got.shape == ref.shape == (batch, NUM_CLASSES), (got.shape, ref.shape)
    return float(np.abs(got - ref).max())


def op_counts(path) -> Counter:
    m = onnx.load(path, load_external_data=False)
    return Counter(n.op_type for n in m.graph.node)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="models/torch", help="output directory")
    ap.add_argument("--only", choices=sorted(MODELS), help="export just this model")
    ap.add_argument("--ops", action="store_true", help="also print op-type counts")
    ap.add_argument(
        "--keep-stack-traces",
        action="store_true",
        help="keep the dynamo exporter's per-node stack traces (machine-specific paths)",
    )
    args = ap.parse_args(argv)
    # e.g. "torchvision is not installed. Skipping torchvision::nms"
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)

    os.makedirs(args.out, exist_ok=True)
    names = [args.only] if args.only else list(MODELS)
    failed = False
    for name in names:
        model = build(name)
        x = torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(SEED))
        nparams = sum(p.numel() for p in model.parameters())
        for kind, fn in (("dynamo", export_dynamo), ("legacy", export_legacy)):
            path = os.path.join(args.out, f"{name}_{kind}.onnx")
            data = path + ".data"
            if os.path.exists(data):  # don't leave a stale external-data file
                os.remove(data)
            dynamic = fn(model, x, path)
            if kind == "dynamo" and not args.keep_stack_traces:
                strip_stack_traces(path)
            diff = verify(model, path, dynamic)
            ok = diff < TOL
            failed |= not ok
            size = os.path.getsize(path) + (os.path.getsize(data) if os.path.exists(data) else 0)
            print(
                f"{'ok  ' if ok else 'FAIL'} {name:12s} {kind:6s} params={nparams:7d} "
                f"batch={'dynamic' if dynamic else 'static '} size={size / 1024:7.1f}KiB "
                f"max_abs_diff={diff:.2e}  {path}"
            )
            if args.ops:
                print("     ", dict(sorted(op_counts(path).items(), key=lambda kv: -kv[1])))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
