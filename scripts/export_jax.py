"""Export three small Flax NNX models to ONNX with jax2onnx.

Writes, for each model NAME:

* ``{out}/cnn.onnx`` -- ResNet-style CNN: Conv + BatchNorm + ReLU, one
  residual block, a strided Conv + LayerNorm, mean pooling over H and W,
  Dense head;
* ``{out}/mlp.onnx`` -- 784 -> 128 -> 64 -> 10 MLP (Linear + ReLU, one
  LayerNorm);
* ``{out}/vit.onnx`` -- tiny ViT: 4x4 patch Conv embedding, learned position
  embedding, one pre-LN encoder block with ``nnx.MultiHeadAttention``
  (4 heads, width 64) and a GELU MLP, mean over tokens, Dense head.

Image models take ``input`` of shape (B, 32, 32, 3) float32 -- NHWC, the JAX
layout, which jax2onnx keeps at the graph boundary and transposes to NCHW in
front of the ONNX Conv -- and the MLP takes (B, 784). All return ``logits`` of
shape (B, 10); B is a symbolic dimension. Weights are random (``nnx.Rngs``
seeded), BatchNorm statistics and affine parameters are randomized so that
folding them is non-trivial; nothing is downloaded.

Besides each ``.onnx`` file, the export writes ``{ref_dir}/{NAME}.npz`` with a
random input batch of 2 and the Flax output on it (not committed).

Usage (two environments: jax2onnx is never installed into the main one)::

    python -m venv /work/venvs/jax
    /work/venvs/jax/bin/pip install jax==0.10.2 jaxlib==0.10.2 flax==0.12.8 jax2onnx==0.17.1
    /work/venvs/jax/bin/python scripts/export_jax.py --out models/jax [--only NAME]

    # then, in the main environment (onnx + onnxruntime + numpy only):
    python scripts/export_jax.py --check --out models/jax

``--check`` runs ``onnx.checker.check_model(path, full_check=True)`` on each
file, runs it in onnxruntime on the saved batch of 2 and requires the max abs
difference to the Flax output to be < 1e-4.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

import numpy as np

NAMES = ("cnn", "mlp", "vit")
SEED = 0
TOL = 1e-4
OPSET = 23  # jax2onnx's default
DEFAULT_REF_DIR = "/tmp/spa_refs/jax"


def input_shape(name: str) -> tuple:
    return ("B", 784) if name == "mlp" else ("B", 32, 32, 3)


# --------------------------------------------------------------------------
# Models (framework imports are local so that --check needs no jax)
# --------------------------------------------------------------------------


def build(name: str):
    import jax.numpy as jnp
    from flax import nnx

    rngs = nnx.Rngs(SEED)

    class ResBlock(nnx.Module):
        def __init__(self, c, rngs):
            self.conv1 = nnx.Conv(c, c, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
            self.bn1 = nnx.BatchNorm(c, use_running_average=True, rngs=rngs)
            self.conv2 = nnx.Conv(c, c, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
            self.bn2 = nnx.BatchNorm(c, use_running_average=True, rngs=rngs)

        def __call__(self, x):
            y = nnx.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return nnx.relu(x + y)

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.stem = nnx.Conv(3, 16, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
            self.bn = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
            self.block = ResBlock(16, rngs)
            self.down = nnx.Conv(16, 32, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
            self.ln = nnx.LayerNorm(32, rngs=rngs)
            self.block2 = ResBlock(32, rngs)
            self.fc = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn(self.stem(x)))
            x = self.block(x)
            x = nnx.relu(self.ln(self.down(x)))
            x = self.block2(x)
            x = jnp.mean(x, axis=(1, 2))
            return self.fc(x)

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(784, 128, rngs=rngs)
            self.fc2 = nnx.Linear(128, 64, rngs=rngs)
            self.ln = nnx.LayerNorm(64, rngs=rngs)
            self.fc3 = nnx.Linear(64, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.fc1(x))
            x = nnx.relu(self.ln(self.fc2(x)))
            return self.fc3(x)

    class EncoderBlock(nnx.Module):
        def __init__(self, d, heads, hidden, rngs):
            self.ln1 = nnx.LayerNorm(d, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(
                num_heads=heads,
                in_features=d,
                qkv_features=d,
                out_features=d,
                decode=False,
                deterministic=True,
                rngs=rngs,
            )
            self.ln2 = nnx.LayerNorm(d, rngs=rngs)
            self.fc1 = nnx.Linear(d, hidden, rngs=rngs)
            self.fc2 = nnx.Linear(hidden, d, rngs=rngs)

        def __call__(self, x):
            h = self.ln1(x)
            x = x + self.attn(h)
            h = nnx.gelu(self.fc1(self.ln2(x)), approximate=False)
            return x + self.fc2(h)

    class ViT(nnx.Module):
        def __init__(self, rngs, d=64, patch=4):
            self.d = d
            self.patch = nnx.Conv(
                3, d, (patch, patch), strides=(patch, patch), padding="VALID", rngs=rngs
            )
            n = (32 // patch) ** 2
            self.pos = nnx.Param(0.02 * jax_normal(rngs.params(), (1, n, d)))
            self.block = EncoderBlock(d, 4, 2 * d, rngs)
            self.ln = nnx.LayerNorm(d, rngs=rngs)
            self.head = nnx.Linear(d, 10, rngs=rngs)

        def __call__(self, x):
            x = self.patch(x)  # (B, 8, 8, d)
            x = x.reshape(x.shape[0], -1, self.d) + self.pos[...]
            x = self.block(x)
            x = self.ln(x).mean(axis=1)
            return self.head(x)

    def jax_normal(key, shape):
        import jax

        return jax.random.normal(key, shape, jnp.float32)

    model = {"cnn": CNN, "mlp": MLP, "vit": ViT}[name](rngs)
    randomize_norms(model, np.random.default_rng(SEED + 1))
    return model


def randomize_norms(model, rng: np.random.Generator) -> None:
    """Random, non-trivial BatchNorm statistics and norm affine parameters."""
    import jax.numpy as jnp
    from flax import nnx

    for _, mod in nnx.iter_graph(model):
        if isinstance(mod, nnx.BatchNorm):
            c = mod.mean.shape[0]
            mod.mean[...] = jnp.asarray(rng.normal(0.0, 0.2, c), jnp.float32)
            mod.var[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
        if isinstance(mod, (nnx.BatchNorm, nnx.LayerNorm)):
            c = mod.scale.shape[0]
            mod.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
            mod.bias[...] = jnp.asarray(rng.normal(0.0, 0.1, c), jnp.float32)


# --------------------------------------------------------------------------
# Export (in the jax venv) and check (in the main environment)
# --------------------------------------------------------------------------


def export(name: str, out: str, ref_dir: str) -> None:
    import jax.numpy as jnp
    import onnx
    from jax2onnx import to_onnx

    model = build(name)
    path = os.path.join(out, f"{name}.onnx")
    proto = to_onnx(
        model,
        [input_shape(name)],
        model_name=name,
        opset=OPSET,
        input_names=["input"],
        output_names=["logits"],
    )
    proto = fix_value_info(proto)
    onnx.save(proto, path)  # all weights inline: the files are small

    rng = np.random.default_rng(SEED + 2)
    x = rng.standard_normal((2, *input_shape(name)[1:])).astype(np.float32)
    y = np.asarray(model(jnp.asarray(x)), dtype=np.float32)
    assert y.shape == (2, 10), y.shape
    np.savez(os.path.join(ref_dir, f"{name}.npz"), input=x, logits=y)
    ops = Counter(n.op_type for n in proto.graph.node)
    print(f"{path}: {os.path.getsize(path) / 1024:.0f} KiB, {sum(ops.values())} nodes: {dict(ops)}")


def fix_value_info(proto):
    """Replace jax2onnx's intermediate value_info by onnx's own shape inference.

    jax2onnx 0.17.1 removes NHWC<->NCHW Transpose pairs between Convs after it
    has recorded the shapes, so tensors such as the ReLU outputs between two
    Convs keep their NHWC shapes in value_info although they are NCHW; the
    numbers are right, but ``check_model(full_check=True)`` rejects the file
    and onnxruntime warns. The graph itself is left exactly as exported.
    """
    import onnx

    del proto.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(
        proto, check_type=True, strict_mode=True, data_prop=True
    )


def check(name: str, out: str, ref_dir: str) -> float:
    from export_check import max_difference

    path = os.path.join(out, f"{name}.onnx")
    diff = max_difference(path, os.path.join(ref_dir, f"{name}.npz"))
    status = "ok" if diff < TOL else "FAIL"
    print(
        f"{path}: check_model(full_check) ok, onnxruntime vs flax max abs diff {diff:.2e} {status}"
    )
    return diff


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/jax")
    ap.add_argument("--ref-dir", default=DEFAULT_REF_DIR, help="where the reference .npz files go")
    ap.add_argument("--only", choices=NAMES, action="append")
    ap.add_argument(
        "--check", action="store_true", help="check existing exports (main environment)"
    )
    args = ap.parse_args(argv)
    names = args.only or NAMES
    if args.check:
        bad = [n for n in names if not check(n, args.out, args.ref_dir) < TOL]
        return 1 if bad else 0
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.ref_dir, exist_ok=True)
    for name in names:
        export(name, args.out, args.ref_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
