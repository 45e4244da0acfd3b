"""Is the pruned model right? The full checker, an onnxruntime session, the same signature.

Also the zero-channel check: if every parameter of the removed channels is zero, removing them
cannot change the outputs. It proves the couplings, index maps and slicing of a whole architecture
with one comparison.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import pickle
import signal
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

ort.set_default_logger_severity(4)  # onnxruntime's own log lines would break the one-line errors

from spa.errors import SpaError
from spa.io import _PROTO_LIMIT, _first_line, _inline_external_tensors, is_large


T = TypeVar("T")


def isolated(run: Callable[[], T], doing: str) -> T:
    """run() in a forked child process. onnxruntime can die of a native fault (an integer division
    by zero on a degenerate shape: SIGFPE) that no `except` catches; in a child, that becomes a
    one-line SpaError and spa lives on. The result must pickle; an exception comes back as a
    RuntimeError with its type and first line. Where there is no fork, run() runs here."""
    if not hasattr(os, "fork"):
        return run()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            os.close(read)
            faulthandler.disable()  # a crash is reported by the parent, in one line
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            try:
                payload = pickle.dumps((True, run()))
            except BaseException as e:  # noqa: BLE001 -- everything goes back to the parent
                payload = pickle.dumps((False, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"))
            with os.fdopen(write, "wb") as pipe:
                pipe.write(payload)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        payload = pipe.read()  # before waiting: a large result would fill the pipe
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        raise SpaError(f"onnxruntime crashed ({signal.Signals(os.WTERMSIG(status)).name}) while {doing}")
    if not payload:
        raise SpaError(f"onnxruntime's process ended without a result (exit {os.waitstatus_to_exitcode(status)}) while {doing}")
    ok, value = pickle.loads(payload)
    if not ok:
        raise RuntimeError(value)
    return value


@dataclasses.dataclass
class Deviation:
    """How far the pruned model's outputs moved from the original's on the verification inputs."""

    inputs: str  # what they were
    outputs: dict[str, dict]  # per output: relative_error and cosine (floats) or agreement
    relative_error: float  # the worst output's: max |a - b| / max |a|
    similarity: float  # the worst output's cosine (or, for integer outputs, fraction equal)
    exact: bool | None  # the removed channels were all zero, so nothing could move; None: not provable

    @property
    def likely_broken(self) -> bool:
        return self.similarity < BROKEN_SIMILARITY

    def describe(self) -> str:
        text = f"outputs moved by {self.relative_error:.3g} (max relative error), similarity {self.similarity:.4f} (worst output's cosine), on {self.inputs}"
        if self.exact:
            text += "; exact, as the removed channels were all zero"
        if self.likely_broken:
            text = f"WARNING: the pruned model may be broken: {text}. Random inputs are a weak proxy (a calibrated prune fitted to real images can score lower than a worse one fitted to noise): check its accuracy on real data"
        return text


# Below this similarity the outputs have little to do with the original's. Measured on
# EfficientNet-Lite0 (ImageNet) at 0.8-0.9 of the MACs, logits' cosine on one random input against
# top-1 agreement on 400 real images: 0.05-0.06 at agreement 0.00-0.07 (magnitude, no refit), 0.71
# at 0.52 (data-free refit), but 0.12 at 0.785 (calibrated on real crops): random inputs are a weak
# proxy, and the warning says so; held-out real samples are issue #15's to add.
BROKEN_SIMILARITY = 0.5
# Removing all-zero channels leaves float rounding only; deep nets amplify it, but not this far.
EXACT_TOLERANCE = 1e-3


@dataclasses.dataclass
class Reference:
    """The original model's outputs on the verification inputs."""

    feeds: dict[str, np.ndarray]
    outputs: list[np.ndarray]
    inputs: str  # the inputs, described


@dataclasses.dataclass
class Verdict:
    output_shapes: list[tuple[int, ...]]
    serialized: bytes | None  # the checked model, ready to write (None past protobuf's limit)
    deviation: Deviation | None = None


def signature(model: ir.Model) -> tuple[list, list]:
    """Names, element types and shapes (symbolic dims by name) of the real inputs and the outputs."""

    def describe(v: ir.Value):
        shape = None if v.shape is None else tuple(d if isinstance(d, int) else str(d) for d in v.shape)
        return (v.name, v.dtype, shape)

    inputs = [describe(v) for v in model.graph.inputs if not v.is_initializer()]
    return inputs, [describe(v) for v in model.graph.outputs]


def _serialize(model: ir.Model, outputs: list[str] | None = None) -> bytes | None:
    _inline_external_tensors(model)
    proto = ir.serde.serialize_model(model)
    if outputs is not None:
        _keep_nodes_for(proto.graph, outputs)
    return proto.SerializeToString() if proto.ByteSize() < _PROTO_LIMIT else None


def _keep_nodes_for(graph: onnx.GraphProto, outputs: list[str]) -> None:
    """Drop the nodes that `outputs` do not depend on: onnxruntime runs every node of a graph,
    needed or not (an early layer's input costs the whole model otherwise). Graphs with subgraphs
    stay whole: their nodes read outer values that the node inputs do not list."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return
    needed, kept = set(outputs), []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if threads != 1:  # idle threads that spin for work starve every other process on a busy machine
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 4  # errors come back as exceptions; keep stderr to one line
    return options


def session(model: ir.Model, threads: int = 1, serialized: bytes | None = None, lean: bool | None = None, only_for: list[str] | None = None) -> ort.InferenceSession:
    """An onnxruntime session of `model`.

    lean: share the weights with onnxruntime instead of serializing them (see `_skeleton`); the
    default is lean for large models (`spa.io.is_large`). A lean session runs without graph
    optimizations and without prepacked weights, so it costs no copy of the weights.
    only_for: output names; the session keeps only the nodes they need (not on the lean path).
    """
    if serialized is None and not (is_large(model) if lean is None else lean):
        serialized = _serialize(model, only_for)
    if serialized is not None:
        return ort.InferenceSession(serialized, session_options(threads), providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="spa-") as folder:
        path, shared = _skeleton(model, Path(folder))
        return _lean_session(path, shared, threads)


def check(model: ir.Model, serialized: bytes | None = None) -> None:
    """onnx's full checker (with shape inference); raise SpaError on failure."""
    if serialized is None and not is_large(model):
        serialized = _serialize(model)
    if serialized is not None:
        _check(serialized)
        return
    with tempfile.TemporaryDirectory(prefix="spa-") as folder:
        path, _ = _skeleton(model, Path(folder))
        _check(str(path))


def _check(model: bytes | str) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise SpaError(f"pruned model fails the ONNX checker: {str(e).strip().splitlines()[0]}") from None


# Weights onnxruntime can take from memory as they are (numpy dtypes it maps one to one).
_SHAREABLE = {
    ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BOOL,
    ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
    ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64,
}
_SHARE_MIN_BYTES = 1024  # smaller tensors (shape constants and the like) stay in the graph
_PLACEHOLDER = "weights.data"


def _skeleton(model: ir.Model, folder: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Write `model` to `folder/model.onnx` without its weights: every large initializer points
    into `weights.data`, a sparse file of zeros that takes no disk space, and comes back as an
    array to hand to onnxruntime (`_lean_session`).

    The checker only reads the graph and checks that the data file is there; onnxruntime uses the
    shared arrays, memory-mapped external data included, without copying them. Nothing is
    serialized in memory but the graph, so a model over 2 GB costs no second copy of its weights.
    The model is left as it was; its external tensors stay memory-mapped.
    """
    shared: dict[str, np.ndarray] = {}
    replaced: list[tuple[ir.Value, ir.TensorProtocol]] = []
    offset = 0
    try:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or tensor.dtype not in _SHAREABLE or tensor.nbytes <= _SHARE_MIN_BYTES:
                continue
            shared[value.name] = np.ascontiguousarray(tensor.numpy())
            replaced.append((value, tensor))
            value.const_value = ir.ExternalTensor(_PLACEHOLDER, offset, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=value.name, base_dir=folder)
            offset += tensor.nbytes
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in replaced:
            value.const_value = tensor
    path = folder / "model.onnx"
    onnx.save(proto, path)
    with open(folder / _PLACEHOLDER, "wb") as f:
        f.truncate(offset)
    return path, shared


def _lean_session(path: Path, shared: dict[str, np.ndarray], threads: int) -> ort.InferenceSession:
    """A session of a skeleton (`_skeleton`) that runs on the shared arrays. Graph optimizations
    would read the placeholder zeros instead of the shared weights (constant folding), and
    prepacking copies the weights: both are off."""
    options = session_options(threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in shared.items()}
    for name, value in values.items():
        options.add_initializer(name, value)
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    sess._spa_shared = values  # onnxruntime borrows the arrays: they live as long as the session
    return sess


def _opened(make) -> ort.InferenceSession:
    try:
        return make()
    except Exception as e:
        raise SpaError(f"onnxruntime cannot open the pruned model: {str(e).strip().splitlines()[0]}") from None


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


def reference(original: ir.Model, input_shapes: dict[str, list[int]] | None = None, lean: bool | None = None) -> Reference:
    """Run the original model on the verification inputs (random floats, integer inputs as ones),
    in a child process; a model that fails there is blamed, not the pruned one."""
    try:
        sess = session(original, lean=lean)
    except Exception as e:
        raise SpaError(f"onnxruntime cannot open the original model: {_first_line(e)}") from None
    feeds = random_inputs(sess, input_shapes)
    inputs = "1 random sample (" + ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items()) + ")"
    try:
        outputs = isolated(lambda: sess.run(None, feeds), f"running the original model on {inputs}")
    except SpaError:
        raise
    except Exception as e:  # onnxruntime's errors are untyped
        raise SpaError(f"the original model fails to run on spa's test inputs, {inputs}: {_first_line(e)}; give --input-shapes, or skip the check with --no-verify") from None
    return Reference(feeds, outputs, inputs)


def deviation(expected: Reference, names: list[str], actual: list[np.ndarray], exact: bool) -> Deviation:
    outputs = {}
    for name, a, b in zip(names, expected.outputs, actual):
        a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        if np.asarray(a).dtype.kind == "f":
            norms = float(np.linalg.norm(a64) * np.linalg.norm(b64))
            cosine = float(a64 @ b64) / norms if norms else float(np.array_equal(a64, b64))
            outputs[name] = {"relative_error": relative_error([a], [b]), "cosine": cosine}
        else:
            outputs[name] = {"relative_error": relative_error([a], [b]), "agreement": float(np.mean(a64 == b64)) if a64.size else 1.0}
    worst_error = max((o["relative_error"] for o in outputs.values()), default=0.0)
    similarity = min((o.get("cosine", o.get("agreement")) for o in outputs.values()), default=1.0)
    return Deviation(expected.inputs, outputs, worst_error, similarity, True if exact else None)


def verify(expected_signature: tuple, expected_shapes: list, pruned: ir.Model, expected: Reference, exact: bool = False, lean: bool | None = None) -> Verdict:
    """Raise SpaError unless `pruned` keeps the signature, passes the full checker, opens in
    onnxruntime and gives outputs of the expected concrete shapes on the inputs the original ran
    on. The verdict says how far the outputs moved; where `exact` (the removed channels were all
    zero) they must not have moved at all.

    lean (default: for large models): check a skeleton of the model and run it on shared weights
    (`_skeleton`) instead of serializing it; the verdict then carries no serialized model."""
    if signature(pruned) != expected_signature:
        raise SpaError(f"pruned model changed the inputs or outputs: {expected_signature} -> {signature(pruned)}")
    serialized = None if (is_large(pruned) if lean is None else lean) else _serialize(pruned)
    if serialized is not None:
        _check(serialized)
        sess = _opened(lambda: session(pruned, serialized=serialized))
    else:
        with tempfile.TemporaryDirectory(prefix="spa-") as folder:
            path, shared = _skeleton(pruned, Path(folder))
            _check(str(path))
            sess = _opened(lambda: _lean_session(path, shared, 1))
    try:
        outputs = isolated(lambda: sess.run(None, expected.feeds), f"running the pruned model on {expected.inputs}")
    except SpaError:
        raise
    except Exception as e:
        raise SpaError(f"the pruned model fails to run in onnxruntime on {expected.inputs}, where the original runs: {_first_line(e)}") from None
    names = [arg.name for arg in sess.get_outputs()]
    for output, name, shape in zip(outputs, names, expected_shapes):
        if shape is not None and output.shape != tuple(shape):
            raise SpaError(f"pruned model's output '{name}' has shape {output.shape}, the original {tuple(shape)}")
    moved = deviation(expected, names, outputs, exact)
    if exact and not moved.relative_error <= EXACT_TOLERANCE:
        raise SpaError(
            f"spa bug: the removed channels were all zero, yet the outputs moved by {moved.relative_error:.3g} (relative error);"
            " nothing written. Please report it with the model; `spa analyze` lists what spa saw"
        )
    return Verdict(output_shapes=[o.shape for o in outputs], serialized=serialized, deviation=moved)


def all_zero(analysis, classes: np.ndarray) -> bool:
    """Whether every parameter element that belongs to one of `classes` is zero: removing them
    then cannot change the outputs (outside lossy groups, whose statistics change)."""
    if any(g.lossy and np.isin(g.classes, classes).any() for g in analysis.groups):
        return False
    for member in analysis.members:
        hit = analysis.removed_mask(member.labels, classes)
        if hit.any() and np.any(member.value.const_value.numpy()[np.broadcast_to(hit, member.value.const_value.shape)]):
            return False
    return True


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
