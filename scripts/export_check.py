"""The exporters' --check step, run in the main environment: the full checker, then onnxruntime on
the inputs the framework saw, against the framework's own logits (saved by the export step)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort


def difference(
    path: str | os.PathLike, feeds: dict[str, np.ndarray], expected: list[np.ndarray]
) -> float:
    """Max abs difference between onnxruntime's outputs on `feeds` and the framework's `expected`
    ones (inf if shapes differ), after onnx's full checker (which raises)."""
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)
    return max(
        float(np.max(np.abs(g - e))) if g.shape == e.shape else float("inf")
        for g, e in zip(got, expected)
    )


def max_difference(path: str | os.PathLike, reference: str | os.PathLike) -> float:
    """Max abs difference between onnxruntime's output and the framework's (inf if shapes differ);
    raises if the file fails onnx's full checker. reference: an .npz with `input` and `logits`."""
    onnx.checker.check_model(str(path), full_check=True)
    ref = np.load(reference)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: ref["input"]})
    return (
        float(np.max(np.abs(got - ref["logits"])))
        if got.shape == ref["logits"].shape
        else float("inf")
    )
