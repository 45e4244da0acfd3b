"""Is the pruned model right? The full checker, an onnxruntime session, the same signature.

Also the zero-channel check: if every parameter of the removed channels is zero, removing them
cannot change the outputs. It proves the couplings, index maps and slicing of a whole architecture
with one comparison.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from spa.errors import SpaError
from spa.io import _PROTO_LIMIT, _inline_external_tensors, save


@dataclasses.dataclass
class Verdict:
    max_abs_diff: float  # between original and pruned outputs on random inputs (informational)
    output_shapes: list[tuple[int, ...]]


def signature(model: ir.Model) -> tuple[list, list]:
    """Names, element types and shapes (symbolic dims by name) of the real inputs and the outputs."""

    def describe(v: ir.Value):
        shape = None if v.shape is None else tuple(d if isinstance(d, int) else str(d) for d in v.shape)
        return (v.name, v.dtype, shape)

    inputs = [describe(v) for v in model.graph.inputs if not v.is_initializer()]
    return inputs, [describe(v) for v in model.graph.outputs]


def session(model: ir.Model, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    _inline_external_tensors(model)
    proto = ir.serde.serialize_model(model)
    if proto.ByteSize() < _PROTO_LIMIT:
        return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    folder = tempfile.mkdtemp(prefix="spa-")
    path = Path(folder) / "model.onnx"
    save(model, path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check(model: ir.Model) -> None:
    """onnx's full checker (with shape inference); raise SpaError on failure."""
    _inline_external_tensors(model)
    proto = ir.serde.serialize_model(model)
    try:
        if proto.ByteSize() < _PROTO_LIMIT:
            onnx.checker.check_model(proto, full_check=True)
        else:
            with tempfile.TemporaryDirectory(prefix="spa-") as folder:
                path = Path(folder) / "model.onnx"
                save(model, path)
                onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise SpaError(f"pruned model fails the ONNX checker: {str(e).strip().splitlines()[0]}") from None


def random_inputs(sess: ort.InferenceSession, input_shapes: dict[str, list[int]] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in sess.get_inputs():
        given = (input_shapes or {}).get(arg.name)
        shape = given or [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape]
        kind = arg.type[len("tensor(") : -1]
        dtype = np.dtype({"float": "float32", "double": "float64"}.get(kind, kind)) if kind != "string" else None
        if dtype is None:
            raise SpaError(f"input '{arg.name}' is a string tensor: spa cannot make test inputs for it")
        if dtype.kind == "f":
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[arg.name] = np.zeros(shape, dtype=dtype)  # ids, masks: 0 is valid for any vocabulary
    return feeds


def verify(original: ir.Model, pruned: ir.Model, input_shapes: dict[str, list[int]] | None = None) -> Verdict:
    """Raise SpaError unless `pruned` is a valid stand-in for `original`."""
    if signature(original) != signature(pruned):
        raise SpaError(f"pruned model changed the inputs or outputs: {signature(original)} -> {signature(pruned)}")
    check(pruned)
    try:
        new = session(pruned)
    except Exception as e:
        raise SpaError(f"onnxruntime cannot open the pruned model: {str(e).strip().splitlines()[0]}") from None
    old = session(original)
    feeds = random_inputs(old, input_shapes)
    before, after = old.run(None, feeds), new.run(None, feeds)
    for a, b, arg in zip(before, after, old.get_outputs()):
        if a.shape != b.shape:
            raise SpaError(f"pruned model's output '{arg.name}' has shape {b.shape}, the original {a.shape}")
    diff = max((float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0) for a, b in zip(before, after))
    return Verdict(max_abs_diff=diff, output_shapes=[a.shape for a in after])


def zero_classes(analysis, classes: np.ndarray) -> None:
    """Zero every parameter element that belongs to one of `classes` (root labels)."""
    for member in analysis.members:
        array = member.value.const_value.numpy()
        hit = np.broadcast_to(analysis.removed_mask(member.labels, classes), array.shape)
        if hit.any():
            array = np.where(hit, np.zeros((), array.dtype), array)
            member.value.const_value = ir.tensor(array, name=member.value.name)


def relative_error(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    worst = 0.0
    for a, b in zip(expected, actual):
        if a.shape != b.shape:
            return float("inf")
        scale = max(float(np.max(np.abs(a))) if a.size else 0.0, 1e-12)
        worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b))) / scale if a.size else 0.0)
    return worst
