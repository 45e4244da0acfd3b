"""The MNIST CNNs with their BatchNormalization back, for spa's data-free mode that reads it.

The exporter folded every BatchNormalization into its conv (scripts/mnist_models.py). This puts one
back after every conv, with the statistics a trained BN holds: the mean and standard deviation of
the conv's output over the 4,000 training images. The conv is rescaled so that the model computes
exactly the same function (same top-1), and a BN's beta and gamma are its channel's real mean and
spread.

    python scripts/mnist_batchnorm.py   # writes models/mnist/{vgg,resnet,mobilenetv2}_bn.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
import mnist_data  # noqa: E402

MODELS = Path(__file__).parent.parent / "models" / "mnist"
EPSILON = 1e-5


def conv_output_moments(
    model: onnx.ModelProto, convs: list[onnx.NodeProto], images: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per conv output: the mean and standard deviation of every channel over images and
    positions."""
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    names = [n.output[0] for n in convs]
    probe.graph.output.extend(
        helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names
    )
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    sums = {n: 0.0 for n in names}
    squares = {n: 0.0 for n in names}
    count = {n: 0 for n in names}
    for i in range(0, len(images), 500):
        for name, out in zip(
            names, sess.run(names, {sess.get_inputs()[0].name: images[i : i + 500]})
        ):
            out = out.astype(np.float64)
            sums[name] = sums[name] + out.sum(axis=(0, 2, 3))
            squares[name] = squares[name] + (out**2).sum(axis=(0, 2, 3))
            count[name] += out.shape[0] * out.shape[2] * out.shape[3]
    moments = {}
    for name in names:
        mean = sums[name] / count[name]
        moments[name] = (mean, np.sqrt(np.maximum(squares[name] / count[name] - mean**2, 1e-12)))
    return moments


def unfold_batchnorm(model: onnx.ModelProto, images: np.ndarray) -> onnx.ModelProto:
    """conv(x) = BN(conv'(x)) with conv' = (conv - mean) / std, BN's gamma = std and beta = mean."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    moments = conv_output_moments(model, [n for n in graph.node if n.op_type == "Conv"], images)
    initializers = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "Conv":
            continue
        mean, std = moments[node.output[0]]
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
        bias = (
            numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64)
            if len(node.input) > 2
            else np.zeros(len(weight))
        )
        initializers[node.input[1]].CopyFrom(
            numpy_helper.from_array(
                (weight / std[:, None, None, None]).astype(np.float32), node.input[1]
            )
        )
        bias = numpy_helper.from_array(
            ((bias - mean) / std).astype(np.float32),
            node.input[2] if len(node.input) > 2 else f"{node.name}_bias",
        )
        if len(node.input) > 2:
            initializers[node.input[2]].CopyFrom(bias)
        else:
            graph.initializer.append(bias)
            node.input.append(bias.name)
        params = {
            "scale": std,
            "B": mean,
            "mean": np.zeros_like(mean),
            "var": np.full_like(mean, 1 - EPSILON),
        }
        graph.initializer.extend(
            numpy_helper.from_array(a.astype(np.float32), f"{node.name}_bn_{k}")
            for k, a in params.items()
        )
        normalized = node.output[0] + "_normalized"
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [normalized, *(f"{node.name}_bn_{k}" for k in params)],
                [node.output[0]],
                name=f"{node.name}_bn",
                epsilon=EPSILON,
            )
        )
        node.output[0] = normalized
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    return model


def top1(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float(
        (sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(axis=1) == y).mean() * 100
    )


def main() -> None:
    data = mnist_data.mnist()
    for name in ("vgg", "resnet", "mobilenetv2"):
        folded = onnx.load(MODELS / f"{name}.onnx")
        unfolded = unfold_batchnorm(folded, data["train_x"])
        onnx.save(unfolded, MODELS / f"{name}_bn.onnx")
        print(
            f"{name}_bn.onnx: top-1 {top1(unfolded, data['test_x'], data['test_y']):.1f}% (folded "
            f"{top1(folded, data['test_x'], data['test_y']):.1f}%)"
        )


if __name__ == "__main__":
    main()
