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

ort.set_default_logger_severity(4)  # onnxruntime's own log lines would break the one-line errors

from spa.errors import SpaError
from spa.io import _PROTO_LIMIT, _inline_external_tensors, save


@dataclasses.dataclass
class Verdict:
    output_shapes: list[tuple[int, ...]]
    serialized: bytes | None  # the checked model, ready to write (None past protobuf's limit)


def signature(model: ir.Model) -> tuple[list, list]:
    """Names, element types and shapes (symbolic dims by name) of the real inputs and the outputs."""

    def describe(v: ir.Value):
        shape = None if v.shape is None else tuple(d if isinstance(d, int) else str(d) for d in v.shape)
        return (v.name, v.dtype, shape)

    inputs = [describe(v) for v in model.graph.inputs if not v.is_initializer()]
    return inputs, [describe(v) for v in model.graph.outputs]


def _serialize(model: ir.Model) -> bytes | None:
    _inline_external_tensors(model)
    proto = ir.serde.serialize_model(model)
    return proto.SerializeToString() if proto.ByteSize() < _PROTO_LIMIT else None


def session(model: ir.Model, threads: int = 1, serialized: bytes | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4  # errors come back as exceptions; keep stderr to one line
    serialized = serialized if serialized is not None else _serialize(model)
    if serialized is not None:
        return ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
    folder = tempfile.mkdtemp(prefix="spa-")
    path = Path(folder) / "model.onnx"
    save(model, path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check(model: ir.Model, serialized: bytes | None = None) -> None:
    """onnx's full checker (with shape inference); raise SpaError on failure."""
    serialized = serialized if serialized is not None else _serialize(model)
    try:
        if serialized is not None:
            onnx.checker.check_model(serialized, full_check=True)
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
            feeds[arg.name] = np.ones(shape, dtype=dtype)  # ids and masks: 1 is valid for any vocabulary
    return feeds


def verify(expected_signature: tuple, expected_shapes: list, pruned: ir.Model, input_shapes: dict[str, list[int]] | None = None) -> Verdict:
    """Raise SpaError unless `pruned` keeps the signature, passes the full checker, opens in
    onnxruntime and gives outputs of the expected concrete shapes on random inputs."""
    if signature(pruned) != expected_signature:
        raise SpaError(f"pruned model changed the inputs or outputs: {expected_signature} -> {signature(pruned)}")
    serialized = _serialize(pruned)
    check(pruned, serialized)
    try:
        sess = session(pruned, serialized=serialized)
    except Exception as e:
        raise SpaError(f"onnxruntime cannot open the pruned model: {str(e).strip().splitlines()[0]}") from None
    try:
        outputs = sess.run(None, random_inputs(sess, input_shapes))
    except Exception as e:
        raise SpaError(f"the pruned model fails to run in onnxruntime: {str(e).strip().splitlines()[0]}") from None
    for out, arg, expected in zip(outputs, sess.get_outputs(), expected_shapes):
        if expected is not None and out.shape != tuple(expected):
            raise SpaError(f"pruned model's output '{arg.name}' has shape {out.shape}, the original {tuple(expected)}")
    return Verdict(output_shapes=[o.shape for o in outputs], serialized=serialized)


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
