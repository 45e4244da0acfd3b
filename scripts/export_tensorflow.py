"""Export small hand-written Keras models to ONNX with tf2onnx (TensorFlow's exporter).

Models (all seeded, random init, no downloaded weights; BatchNorm moving mean/variance and
gamma/beta and every bias are randomized so that folded weights are non-trivial):

* ``vgg``        -- Conv2D + BatchNormalization + ReLU + MaxPooling2D, then Flatten + Dense: the
                    Flatten of an NHWC tensor keeps a Transpose (NCHW -> NHWC) before the Reshape;
* ``resnet``     -- Conv2D + BatchNormalization + ReLU, residual Add (identity and 1x1-projection
                    shortcuts), GlobalAveragePooling2D, Dense;
* ``mobilenet``  -- MobileNetV2-style: 1x1 expand, DepthwiseConv2D, ReLU6, linear 1x1 project,
                    inverted-residual Add, plus one SeparableConv2D;
* ``inception``  -- inception-style blocks whose branches (1x1, 3x3, 1x1->3x3->3x3, MaxPool->1x1)
                    are joined by Concatenate;
* ``mlp``        -- Flatten + Dense/ReLU/Dropout stack;
* ``textcnn``    -- Embedding (int32 token ids) + Conv1D + GlobalMaxPooling1D + Dense;
* ``lstm``       -- Embedding + LSTM + Dense;
* ``transformer`` -- Embedding + two encoder blocks (MultiHeadAttention of 4 heads of 8, residual
                    Add, LayerNormalization, Dense/ReLU/Dense FFN of 64, Add, LayerNormalization),
                    GlobalAveragePooling1D, Dense: Keras' attention (EinsumDense) and tf2onnx's
                    LayerNorm.

Vision models take ``input`` float32 (batch, 32, 32, 3), NHWC as Keras has it; the text models take
``input`` int32 (batch, 64) token ids. All return ``logits`` float32 (batch, 10). The batch
dimension is dynamic. Opset 13 (``--opset``; 17 exports and checks as well). tf2onnx keeps the
graph's NHWC input and inserts Transposes around the (NCHW) ONNX convolutions; its own transpose
optimizer then pushes them away wherever it can, so what remains is one Transpose on the input
(vision models), a Transpose back to NHWC before ``vgg``'s Flatten/Reshape, Unsqueeze/Transpose/
Conv/Squeeze for Conv1D, BatchNorm folded into Conv except after DepthwiseConv2D/Dense/Conv1D (left
as Mul + Add), ReLU6 as Clip, Dense as MatMul + Add, Keras 3's Embedding index wrap as
Less/Not/Cast/Mul/Add before Gather, and Keras LSTM as one ONNX LSTM. Nothing is cleaned up here:
those are the fingerprints we want.

Weights, op graph and outputs are reproducible run to run; tf2onnx may name deduplicated
constants differently between runs, so the files are not byte-identical.

The script runs in two environments, because TensorFlow's pins (numpy, protobuf) must not enter
the project's environment:

1. Export, in a separate virtualenv with TensorFlow (tested with tensorflow-cpu 2.21.0,
   keras 3.15.1, tf2onnx 1.17.0, numpy 2.4.6, protobuf 7.36.2)::

       python -m venv /work/venvs/tf
       /work/venvs/tf/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0
       /work/venvs/tf/bin/python scripts/export_tensorflow.py --out models/tensorflow [--only
       resnet,mlp]

   This writes ``{out}/{name}.onnx`` and, for each, a reference batch of 2 with the Keras output
   in ``{refs}/{name}.npz`` (default ``out/tensorflow_refs``, not committed).

2. Check, in the project's environment (onnx, onnxruntime; no TensorFlow)::

       python scripts/export_tensorflow.py --check --out models/tensorflow

   ``onnx.checker.check_model(full_check=True)``, then onnxruntime on the reference batch; the max
   abs difference to Keras must be < 1e-4. It also prints the op types of each graph.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
SEQ_LEN = 64
VOCAB = 1000
SEED = 0
TOL = 1e-4
VISION = ("vgg", "resnet", "mobilenet", "inception", "mlp")
TEXT = ("textcnn", "lstm", "transformer")
NAMES = VISION + TEXT


# --------------------------------------------------------------------------
# Keras models (export phase only: TensorFlow is imported lazily)
# --------------------------------------------------------------------------


def build(name: str):
    import keras
    from keras import layers as L

    def conv_bn(x, filters, k=3, stride=1, act="relu", name=None):
        x = L.Conv2D(
            filters, k, strides=stride, padding="same", use_bias=False, name=f"{name}_conv"
        )(x)
        x = L.BatchNormalization(name=f"{name}_bn")(x)
        if act == "relu":
            x = L.ReLU(name=f"{name}_relu")(x)
        elif act == "relu6":
            x = L.ReLU(max_value=6.0, name=f"{name}_relu6")(x)
        return x

    def head(x):
        x = L.GlobalAveragePooling2D(name="gap")(x)
        return L.Dense(NUM_CLASSES, name="logits")(x)

    if name in VISION:
        inp = keras.Input(IMAGE_SHAPE, name="input", dtype="float32")
    else:
        inp = keras.Input((SEQ_LEN,), name="input", dtype="int32")

    if name == "vgg":
        x = inp
        for i, filters in enumerate([16, 32]):
            x = conv_bn(x, filters, name=f"s{i}a")
            x = conv_bn(x, filters, name=f"s{i}b")
            x = L.MaxPooling2D(2, name=f"pool{i}")(x)
        x = conv_bn(x, 16, name="s2")
        x = L.MaxPooling2D(2, name="pool2")(x)
        x = L.Flatten(name="flatten")(x)
        x = L.Dense(64, activation="relu", name="fc")(x)
        out = L.Dense(NUM_CLASSES, name="logits")(x)
    elif name == "resnet":
        x = conv_bn(inp, 16, name="stem")
        for i, (filters, stride) in enumerate([(16, 1), (32, 2), (64, 2)]):
            shortcut = x
            y = conv_bn(x, filters, stride=stride, name=f"b{i}a")
            y = conv_bn(y, filters, act=None, name=f"b{i}b")
            if stride != 1 or shortcut.shape[-1] != filters:
                shortcut = conv_bn(shortcut, filters, k=1, stride=stride, act=None, name=f"b{i}sc")
            x = L.Add(name=f"b{i}_add")([y, shortcut])
            x = L.ReLU(name=f"b{i}_out")(x)
        out = head(x)
    elif name == "mobilenet":
        x = conv_bn(inp, 16, stride=2, act="relu6", name="stem")
        # (expansion, out channels, stride)
        for i, (t, c, s) in enumerate([(1, 16, 1), (4, 24, 2), (4, 24, 1), (4, 32, 2), (4, 32, 1)]):
            cin = x.shape[-1]
            y = x
            if t != 1:
                y = conv_bn(y, cin * t, k=1, act="relu6", name=f"ir{i}_expand")
            y = L.DepthwiseConv2D(3, strides=s, padding="same", use_bias=False, name=f"ir{i}_dw")(y)
            y = L.BatchNormalization(name=f"ir{i}_dw_bn")(y)
            y = L.ReLU(max_value=6.0, name=f"ir{i}_dw_relu6")(y)
            y = conv_bn(y, c, k=1, act=None, name=f"ir{i}_project")
            x = L.Add(name=f"ir{i}_add")([x, y]) if s == 1 and cin == c else y
        x = L.SeparableConv2D(64, 3, padding="same", use_bias=False, name="sep_conv")(x)
        x = L.BatchNormalization(name="sep_bn")(x)
        x = L.ReLU(max_value=6.0, name="sep_relu6")(x)
        x = conv_bn(x, 96, k=1, act="relu6", name="last")
        out = head(x)
    elif name == "inception":
        x = conv_bn(inp, 24, name="stem")
        for i, (b1, b3, b5, bp) in enumerate([(8, 16, 8, 8), (16, 24, 8, 8)]):
            p1 = conv_bn(x, b1, k=1, name=f"inc{i}_1x1")
            p3 = conv_bn(conv_bn(x, b3 // 2, k=1, name=f"inc{i}_3x3r"), b3, name=f"inc{i}_3x3")
            p5 = conv_bn(x, b5 // 2, k=1, name=f"inc{i}_5x5r")
            p5 = conv_bn(conv_bn(p5, b5, name=f"inc{i}_5x5a"), b5, name=f"inc{i}_5x5b")
            pp = L.MaxPooling2D(3, strides=1, padding="same", name=f"inc{i}_pool")(x)
            pp = conv_bn(pp, bp, k=1, name=f"inc{i}_poolproj")
            x = L.Concatenate(axis=-1, name=f"inc{i}_concat")([p1, p3, p5, pp])
            x = L.MaxPooling2D(2, name=f"down{i}")(x)
        out = head(x)
    elif name == "mlp":
        x = L.Flatten(name="flatten")(inp)
        x = L.Dense(48, activation="relu", name="fc1")(x)
        x = L.Dropout(0.2, name="drop1")(x)
        x = L.Dense(64, name="fc2")(x)
        x = L.BatchNormalization(name="fc2_bn")(x)
        x = L.ReLU(name="fc2_relu")(x)
        x = L.Dense(32, activation="relu", name="fc3")(x)
        out = L.Dense(NUM_CLASSES, name="logits")(x)
    elif name == "textcnn":
        x = L.Embedding(VOCAB, 32, name="embed")(inp)
        x = L.Conv1D(64, 3, padding="same", activation="relu", name="conv1")(x)
        x = L.Conv1D(64, 5, padding="same", name="conv2")(x)
        x = L.BatchNormalization(name="conv2_bn")(x)
        x = L.ReLU(name="conv2_relu")(x)
        x = L.GlobalMaxPooling1D(name="gmp")(x)
        x = L.Dense(32, activation="relu", name="fc")(x)
        out = L.Dense(NUM_CLASSES, name="logits")(x)
    elif name == "lstm":
        x = L.Embedding(VOCAB, 32, name="embed")(inp)
        x = L.LSTM(48, name="lstm")(x)
        x = L.Dense(32, activation="relu", name="fc")(x)
        out = L.Dense(NUM_CLASSES, name="logits")(x)
    elif name == "transformer":
        x = L.Embedding(VOCAB, 32, name="embed")(inp)
        for i in range(2):
            attended = L.MultiHeadAttention(num_heads=4, key_dim=8, name=f"mha{i}")(x, x)
            x = L.LayerNormalization(name=f"ln{i}a")(L.Add(name=f"add{i}a")([x, attended]))
            ffn = L.Dense(64, activation="relu", name=f"ffn{i}a")(x)
            ffn = L.Dense(32, name=f"ffn{i}b")(ffn)
            x = L.LayerNormalization(name=f"ln{i}b")(L.Add(name=f"add{i}b")([x, ffn]))
        x = L.GlobalAveragePooling1D(name="gap")(x)
        out = L.Dense(NUM_CLASSES, name="logits")(x)
    else:
        raise ValueError(name)
    model = keras.Model(inp, out, name=name)
    randomize(model, np.random.default_rng(SEED + NAMES.index(name)))
    return model


def randomize(model, rng: np.random.Generator) -> None:
    """Non-trivial BatchNorm statistics/affine parameters and biases (Keras inits them to 0/1)."""
    from keras import layers as L

    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.beta.assign(rng.normal(0.0, 0.1, n).astype("float32"))
            layer.moving_mean.assign(rng.normal(0.0, 0.1, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
        elif isinstance(layer, L.LayerNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.beta.assign(rng.normal(0.0, 0.1, n).astype("float32"))
        elif isinstance(layer, L.LSTM):
            bias = layer.cell.bias
            bias.assign(rng.normal(0.0, 0.1, bias.shape).astype("float32"))
        elif getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0.0, 0.1, layer.bias.shape).astype("float32"))


def sample(name: str, batch: int, rng: np.random.Generator) -> np.ndarray:
    if name in VISION:
        return rng.standard_normal((batch, *IMAGE_SHAPE)).astype(np.float32)
    return rng.integers(0, VOCAB, (batch, SEQ_LEN)).astype(np.int32)


def export(names, out: Path, refs: Path, opset: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf
    import tf2onnx

    print(
        f"tensorflow {tf.__version__}, keras {keras.__version__}, tf2onnx {tf2onnx.__version__}, "
        f"opset {opset}"
    )
    out.mkdir(parents=True, exist_ok=True)
    refs.mkdir(parents=True, exist_ok=True)
    for name in names:
        keras.utils.set_random_seed(SEED)
        model = build(name)
        x = sample(name, 2, np.random.default_rng(SEED + 100))
        y = model(x, training=False).numpy()
        dtype = tf.float32 if name in VISION else tf.int32
        shape = (None, *IMAGE_SHAPE) if name in VISION else (None, SEQ_LEN)
        spec = (tf.TensorSpec(shape, dtype, name="input"),)
        path = out / f"{name}.onnx"
        tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset, output_path=str(path))
        np.savez(refs / f"{name}.npz", input=x, logits=y)
        print(
            f"{name}: {model.count_params()} params -> {path} ({path.stat().st_size / 1024:.0f} "
            "KiB)"
        )


# --------------------------------------------------------------------------
# Check phase (project environment: onnx + onnxruntime, no TensorFlow)
# --------------------------------------------------------------------------


def check(names, out: Path, refs: Path) -> bool:
    import onnx
    import onnxruntime as ort
    from export_check import max_difference

    ok = True
    for name in names:
        path = out / f"{name}.onnx"
        if not path.exists():
            print(f"{name}: missing {path}")
            ok = False
            continue
        diff = max_difference(path, refs / f"{name}.npz")
        good = diff < TOL
        ok &= good
        model = onnx.load(str(path))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inputs = [(i.name, i.type, i.shape) for i in sess.get_inputs()]
        outputs = [(o.name, o.type, o.shape) for o in sess.get_outputs()]
        ops = Counter(n.op_type for n in model.graph.node)
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        print(
            f"{name}: {'ok' if good else 'FAIL'} max|ort-keras|={diff:.2e} opset={opset} "
            f"size={path.stat().st_size / 1024:.0f}KiB in={inputs} out={outputs}"
        )
        print("    ops: " + ", ".join(f"{k}x{v}" for k, v in sorted(ops.items())))
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("models/tensorflow"))
    parser.add_argument("--refs", type=Path, default=Path("out/tensorflow_refs"))
    parser.add_argument(
        "--only", default=",".join(NAMES), help="comma-separated subset of " + ",".join(NAMES)
    )
    parser.add_argument("--opset", type=int, default=13)
    parser.add_argument(
        "--check", action="store_true", help="verify exported models (project environment)"
    )
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(NAMES)
    if unknown:
        parser.error(f"unknown models: {sorted(unknown)}")
    if args.check:
        sys.exit(0 if check(names, args.out, args.refs) else 1)
    export(names, args.out, args.refs, args.opset)


if __name__ == "__main__":
    main()
