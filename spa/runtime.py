"""onnxruntime for spa: sessions (serialized, or lean ones that share the weights), their
options, random test inputs, and a forked child for runs that may crash natively."""

from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from spa.errors import SpaError, first_line
from spa.io import PROTO_LIMIT, inline_external_tensors, is_large, release_pages


def quiet() -> None:
    """onnxruntime's own log lines off (the command line's errors are one line). The command line
    calls it; a library user keeps onnxruntime's logging as they set it."""
    ort.set_default_logger_severity(4)


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
                payload = pickle.dumps((False, f"{type(e).__name__}: {first_line(e)}"))
            with os.fdopen(write, "wb") as pipe:
                pipe.write(payload)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        payload = pipe.read()  # before waiting: a large result would fill the pipe
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        raise SpaError(
            f"onnxruntime crashed ({signal.Signals(os.WTERMSIG(status)).name}) while {doing}"
        )
    if not payload:
        raise SpaError(
            "onnxruntime's process ended without a result (exit "
            f"{os.waitstatus_to_exitcode(status)}) while {doing}"
        )
    ok, value = pickle.loads(payload)
    if not ok:
        raise RuntimeError(value)
    return value


def serialize(model: ir.Model) -> bytes | None:
    """The whole model as bytes, ready to write (None past protobuf's 2 GB)."""
    inline_external_tensors(model)
    proto = ir.serde.serialize_model(model)
    # Serialized at once: a ByteSize() first walked every message again (10 s of SmolLM2's refit,
    # whose steps serialize a layer each).
    try:
        data = proto.SerializeToString()
    except ValueError:  # protobuf refuses messages past 2 GB
        return None
    return data if len(data) < PROTO_LIMIT else None


def _keep_nodes_for(graph: onnx.GraphProto, outputs: list[str]) -> None:
    """Drop the nodes that `outputs` do not depend on, and the initializers no kept node reads:
    onnxruntime runs every node of a graph, needed or not (an early layer's input costs the whole
    model otherwise). Graphs with subgraphs stay whole: their nodes read outer values that the
    node inputs do not list."""
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in graph.node
        for a in n.attribute
    ):
        return
    needed, kept = set(outputs), []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    needed.update(i.name for i in graph.input)  # an initializer listed as an input stays
    read = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(read)


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if threads != 1:  # idle threads that spin for work starve every other process on a busy machine
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 4  # errors come back as exceptions; keep stderr to one line
    return options


def session(
    model: ir.Model,
    threads: int = 1,
    serialized: bytes | None = None,
    lean: bool | None = None,
    only_for: list[str] | None = None,
) -> ort.InferenceSession:
    """An onnxruntime session of `model`.

    The weights go to onnxruntime as arrays beside a serialized graph that points to them
    (SessionOptions.add_external_initializers; onnxruntime puts them in before it optimizes), not
    through protobuf: serializing SmolLM2-135M's weights cost 2 s of a 3 s session, and the
    refit opens a session per step. The same session, bit for bit.
    lean: share the weights with onnxruntime instead of handing them over (see `skeleton`); the
    default is lean for large models (`spa.io.is_large`). A lean session runs without graph
    optimizations and without prepacked weights, so it costs no copy of the weights.
    only_for: output names; the session keeps only the nodes they need (not on the lean path).
    """
    options = session_options(threads)
    if serialized is None and not (is_large(model) if lean is None else lean):
        proto, shared = _weights_apart(model)
        if only_for is not None:
            _keep_nodes_for(proto.graph, only_for)
        read = {t.name for t in proto.graph.initializer}
        values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in shared.items() if n in read}
        if values:
            options.add_external_initializers(list(values), list(values.values()))
        sess = ort.InferenceSession(
            proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        # onnxruntime copied the weights: memory-mapped ones need not stay paged in for it
        release_pages(v for v in model.graph.initializers.values() if v.name in values)
        return sess
    if serialized is not None:
        return ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="spa-") as folder:
        path, shared = skeleton(model, Path(folder))
        return lean_session(path, shared, threads)


# Weights onnxruntime can take from memory as they are (numpy dtypes it maps one to one).
_SHAREABLE = {
    ir.DataType.FLOAT,
    ir.DataType.DOUBLE,
    ir.DataType.FLOAT16,
    ir.DataType.BOOL,
    ir.DataType.INT8,
    ir.DataType.INT16,
    ir.DataType.INT32,
    ir.DataType.INT64,
    ir.DataType.UINT8,
    ir.DataType.UINT16,
    ir.DataType.UINT32,
    ir.DataType.UINT64,
}
_SHARE_MIN_BYTES = 1024  # smaller tensors (shape constants and the like) stay in the graph
_PLACEHOLDER = "weights.data"


def _weights_apart(
    model: ir.Model, folder: Path | None = None
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`model`'s proto with every large initializer as external data at its own offset in
    `folder/weights.data`, and those initializers as arrays; the others in the proto. The model is
    left as it was; its external tensors stay memory-mapped."""
    shared: dict[str, np.ndarray] = {}
    replaced: list[tuple[ir.Value, ir.TensorProtocol]] = []
    offset = 0
    try:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            replaced.append((value, tensor))
            if tensor.dtype not in _SHAREABLE or tensor.nbytes <= _SHARE_MIN_BYTES:
                if isinstance(tensor, ir.ExternalTensor):  # its file is the input's: inline it
                    value.const_value = ir.Tensor(tensor.numpy(), name=value.name)
                continue
            shared[value.name] = np.ascontiguousarray(tensor.numpy())
            value.const_value = ir.ExternalTensor(
                _PLACEHOLDER,
                offset,
                tensor.nbytes,
                tensor.dtype,
                shape=tensor.shape,
                name=value.name,
                base_dir=folder or "",
            )
            offset += tensor.nbytes
        return ir.serde.serialize_model(model), shared
    finally:
        for value, tensor in replaced:
            value.const_value = tensor


def skeleton(model: ir.Model, folder: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Write `model` to `folder/model.onnx` without its weights: every large initializer points
    into `weights.data`, a sparse file of zeros that takes no disk space, and comes back as an
    array to hand to onnxruntime (`lean_session`).

    The checker only reads the graph and checks that the data file is there; onnxruntime uses the
    shared arrays, memory-mapped external data included, without copying them. Nothing is
    serialized in memory but the graph, so a model over 2 GB costs no second copy of its weights.
    """
    proto, shared = _weights_apart(model, folder)
    path = folder / "model.onnx"
    onnx.save(proto, path)
    with open(folder / _PLACEHOLDER, "wb") as f:
        f.truncate(sum(a.nbytes for a in shared.values()))
    return path, shared


def lean_session(path: Path, shared: dict[str, np.ndarray], threads: int) -> ort.InferenceSession:
    """A session of a skeleton (`skeleton`) that runs on the shared arrays. Graph optimizations
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


def samples(feed: dict[str, np.ndarray]) -> int:
    """Samples in a feed: the length of the first axis all its inputs share; 1 where their first
    axes differ (a graph's nodes and its edges, an RNN's initial state that leads with its
    layers): then the feed is one sample and is never cut."""
    firsts = {len(v) if np.ndim(v) else 1 for v in feed.values()}
    return firsts.pop() if len(firsts) == 1 else 1


def fixed_batch(sess: ort.InferenceSession) -> int | None:
    """The batch size the model fixes: the first dim, when every input has the same fixed one (an
    RNN's initial state leads with its layers, not the batch); None where any batch goes."""
    firsts = {
        a.shape[0] if a.shape and isinstance(a.shape[0], int) and a.shape[0] > 0 else None
        for a in sess.get_inputs()
    }
    return firsts.pop() if len(firsts) == 1 and None not in firsts else None


def first_sample(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> dict:
    """The feed's first sample, or the whole feed where the model fixes its batch size: what a
    crash check runs."""
    if fixed_batch(sess) is None and samples(feed) > 1:
        return {k: v[:1] for k, v in feed.items()}
    return feed


# What one run's outputs may take: they stay alive together (in onnxruntime's arena, then as
# arrays), so a run takes as many samples as fit in this.
RUN_BYTES = 256 << 20


def rows_per_run(bytes_per_sample: int) -> int:
    return max(1, RUN_BYTES // max(bytes_per_sample, 1))


def parts(feed: dict, rows: int) -> list[dict]:
    """The feed cut into runs of `rows` samples (0: whole)."""
    count = samples(feed) if feed else 0
    if rows <= 0 or count <= rows:
        return [feed]
    return [{k: v[i : i + rows] for k, v in feed.items()} for i in range(0, count, rows)]


def random_inputs(
    sess: ort.InferenceSession, input_shapes: dict[str, list[int]] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in sess.get_inputs():
        given = (input_shapes or {}).get(arg.name)
        shape = given or [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape]
        kind = arg.type[len("tensor(") : -1]
        dtype = (
            np.dtype({"float": "float32", "double": "float64"}.get(kind, kind))
            if kind != "string"
            else None
        )
        if dtype is None:
            raise SpaError(
                f"input '{arg.name}' is a string tensor: spa cannot make test inputs for it"
            )
        if dtype.kind == "f":
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            # ids and masks: 1 is valid for any vocabulary
            feeds[arg.name] = np.ones(shape, dtype=dtype)
    return feeds
