"""Fuzz `spa prune`: mutate valid models and check that every case ends well.

Every case takes a seed model (every committed model in models/, from all the exporters, and
the onnx wheel's light_* backend test models), applies one mutation (drop a node or an
initializer, change an attribute, an initializer or an input shape, rewire an input, set the
opset, truncate or flip bytes, empty the file, delete the external data, duplicate an output name,
corrupt weights or external data references, ...), runs `spa prune IN OUT --ratio R` and
classifies what happened:

  ok           exit 0, OUT passes onnx.checker (full check), opens in onnxruntime and has the
               input and output names of IN (initializer-inputs of IR<4 models excepted)
  clean error  exit 1, exactly one line on stderr starting with "spa: error:", no OUT
  BUG          anything else: a traceback, "spa: internal error:", exit 0 with an invalid OUT,
               OUT (or a .spa-* temp file) left behind, a timeout, the input modified, ...
  timeout/killed  the worker process running the case died (the OOM killer, a crash in native
               code) or had no result 2 x --timeout + 120 s after it started (a hang that the
               case's own timeout could not interrupt): it is killed, the case reported and its
               mutated model saved, and a fresh worker carries on

    python scripts/fuzz.py --cases 300 --seed 1 --jobs 2 [--in-process] [--out out/fuzz]

Deterministic given --seed: case i draws its seed model, mutation, mutation seed and ratio from
random.Random(f"{seed}:{i}"). The default runs the CLI in a subprocess per case (what a user
runs); --in-process calls spa.cli.main in the worker processes (one case at a time each, a
fresh worker after 200), 20x faster at the median (0.1-0.2 s against 3.3 s per case with 2 jobs
on 2 cores), for big runs. Every BUG is saved
under OUT/bugs/<case>/ (the mutated model, its external data if any, stderr, the stderr of a
rerun with -v, case.json) and listed, one line each; bugs are then grouped into classes by the
exception and the innermost spa frame of the -v traceback. --report FILE.jsonl reprints a run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import onnx
from onnx import TensorProto

REPO = Path(__file__).resolve().parent.parent
OK, CLEAN, BUG = "ok", "clean error", "BUG"
DEFAULT_MEM_GB = 8.0


def seed_models() -> list[Path]:
    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    models = sorted((REPO / "models").glob("*/*.onnx"))  # every exporter of the zoo
    return models + sorted(light.glob("light_*.onnx"))


def external_files(model: Path) -> list[Path]:
    """The external data files a model refers to (they lie beside it)."""
    proto = onnx.load(str(model), load_external_data=False)
    names = set()
    for init in _all_initializers(proto.graph):
        for entry in init.external_data:
            if entry.key == "location":
                names.add(entry.value)
    return [model.parent / n for n in sorted(names) if (model.parent / n).is_file()]


# ---------------------------------------------------------------- mutations


class NotApplicable(Exception):
    """The mutation has nothing to work on in this model."""


@dataclasses.dataclass
class Mutated:
    data: bytes  # the model file to write
    copy_external: bool = True  # copy the seed's external data files beside it
    note: str = ""  # what exactly changed, for the bug report


@dataclasses.dataclass
class Mutation:
    name: str
    fn: Callable
    takes: str  # "proto" (an onnx.ModelProto, external data not loaded) or "bytes"


MUTATIONS: dict[str, Mutation] = {}


def mutation(takes: str):
    def register(fn):
        MUTATIONS[fn.__name__] = Mutation(fn.__name__, fn, takes)
        return fn

    return register


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_initializers(g)


def _pick(rng: random.Random, items, what: str):
    items = list(items)
    if not items:
        raise NotApplicable(f"no {what}")
    return rng.choice(items)


def _result(proto: onnx.ModelProto, note: str) -> Mutated:
    return Mutated(proto.SerializeToString(), True, note)


def _real_inputs(graph: onnx.GraphProto):
    inits = {i.name for i in graph.initializer}
    return [v for v in graph.input if v.name not in inits]


_INTS = [-3, -2, -1, 0, 1, 2, 3, 4, 5, 7, 8, 16, 64, 1000, 2**31, -(2**40)]
_DIMS = [0, 1, 2, 3, 5, 8, 17, 64]


def _rand_int(rng: random.Random) -> int:
    return rng.choice(_INTS) if rng.random() < 0.8 else rng.randint(-10, 300)


@mutation("proto")
def drop_node(m: onnx.ModelProto, rng: random.Random) -> Mutated:
    i = _pick(rng, range(len(m.graph.node)), "nodes")
    node = m.graph.node[i]
    del m.graph.node[i]
    return _result(m, f"dropped node {i} {node.op_type} '{node.name}'")


@mutation("proto")
def drop_initializer(m: onnx.ModelProto, rng: random.Random) -> Mutated:
    i = _pick(rng, range(len(m.graph.initializer)), "initializers")
    name = m.graph.initializer[i].name
    del m.graph.initializer[i]
    also_input = rng.random() < 0.5
    if also_input:  # IR<4 models list initializers among the inputs too
        for j, v in enumerate(m.graph.input):
            if v.name == name:
                del m.graph.input[j]
                break
    return _result(
        m, f"dropped initializer '{name}'" + (" (and its graph input)" if also_input else "")
    )


@mutation("proto")
def change_int_attribute(m: onnx.ModelProto, rng: random.Random) -> Mutated:
    """group, axis, perm, kernel_shape, pads, strides, ...: a random value."""
    attrs = [
        (n, a)
        for n in m.graph.node
        for a in n.attribute
        if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS)
    ]
    node, attr = _pick(rng, attrs, "int/ints attributes")
    before = onnx.helper.get_attribute_value(attr)
    if attr.type == onnx.AttributeProto.INT:
        attr.i = _rand_int(rng)
    else:
        values = list(attr.ints)
        how = rng.choice(["element", "length", "empty", "all"])
        if how == "element" and values:
            values[rng.randrange(len(values))] = _rand_int(rng)
        elif how == "length":
            values = (
                values[: rng.randrange(len(values))]
                if values and rng.random() < 0.5
                else values + [_rand_int(rng)]
            )
        elif how == "empty":
            values = []
        else:
            values = [_rand_int(rng) for _ in values or [0]]
        del attr.ints[:]
        attr.ints.extend(values)
    after = onnx.helper.get_attribute_value(attr)
    return _result(m, f"{node.op_type} '{node.name}' {attr.name}: {before} -> {after}")


@mutation("proto")
def change_initializer(m: onnx.ModelProto, rng: random.Random) -> Mutated:
    """An initializer's dims (one dim, or the rank), its dtype, or its data truncated."""
    t = _pick(rng, list(_all_initializers(m.graph)), "initializers")
    how = rng.choice(["dim", "rank", "dtype", "truncate"])
    before = (list(t.dims), t.data_type)
    if how == "dim" and len(t.dims):
        t.dims[rng.randrange(len(t.dims))] = rng.choice(_DIMS + [-1])
    elif how in ("dim", "rank"):
        dims = list(t.dims)
        if dims and rng.random() < 0.5:
            dims.pop(rng.randrange(len(dims)))
        else:
            dims.insert(rng.randint(0, len(dims)), rng.choice([1, 1, 2, 3]))
        del t.dims[:]
        t.dims.extend(dims)
    elif how == "dtype":
        t.data_type = rng.choice([v for v in TensorProto.DataType.values() if v != t.data_type])
    else:
        if t.data_location == TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "length":
                    entry.value = str(max(0, int(entry.value) - rng.randint(1, 64)))
                    break
            else:
                t.external_data.add(key="length", value=str(rng.randint(0, 16)))
        elif t.raw_data:
            t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data))]
        else:
            for field in (
                "float_data",
                "int32_data",
                "int64_data",
                "double_data",
                "uint64_data",
                "string_data",
            ):
                values = getattr(t, field)
                if len(values):
                    del values[rng.randrange(len(values)) :]
                    break
    return _result(m, f"initializer '{t.name}' {how}: {before} -> {(list(t.dims), t.data_type)}")


@mutation("proto")
def change_input_shape(m: onnx.ModelProto, rng: random.Random) -> Mutated:
    """A graph input's rank, a dim, a dim to a dim_param, no shape, or its element type."""
    v = _pick(
        rng, [v for v in _real_inputs(m.graph) if v.type.HasField("tensor_type")], "tensor inputs"
    )
    tt = v.type.tensor_type
    before = str(tt.shape.dim).replace("\n", " ") if tt.HasField("shape") else "no shape"
    how = rng.choice(["rank", "dim", "dim_param", "no_shape", "elem_type"])
    dims = list(tt.shape.dim)
    if how == "rank":
        if dims and rng.random() < 0.5:
            del tt.shape.dim[rng.randrange(len(dims))]
        else:
            tt.shape.dim.add().dim_value = rng.choice([1, 2, 3])
    elif how == "dim" and dims:
        d = tt.shape.dim[rng.randrange(len(dims))]
        d.dim_value = rng.choice(_DIMS + [-1])
    elif how == "dim_param" and dims:
        d = tt.shape.dim[rng.randrange(len(dims))]
        d.dim_param = rng.choice(["batch", "N", "fuzz_dim", "seq"])
    elif how == "elem_type":
        tt.elem_type = rng.choice([t for t in (1, 2, 3, 6, 7, 9, 10, 11, 16) if t != tt.elem_type])
    else:
        tt.ClearField("shape")
    return _result(
        m,
        f"input '{v.name}' {how}: {before} -> "
        f"{tt.shape if tt.HasField('shape') else 'no shape'}".replace("\n", " "),
    )


@mutation("proto")
def rename_input(m: onnx.ModelProto, rng: random.Random) -> Mutated:
    """A node's input renamed to a value nothing produces."""
    node = _pick(rng, [n for n in m.graph.node if any(n.input)], "nodes with inputs")
    k = rng.choice([k for k, name in enumerate(node.input) if name])
    before = node.input[k]
    node.input[k] = f"fuzz_missing_{rng.randrange(1000)}"
    return _result(m, f"{node.op_type} '{node.name}' input {k}: '{before}' -> '{node.input[k]}'")


@mutation("proto")
def swap_inputs(m: onnx.ModelProto, rng: random.Random) -> Mutated:
    node = _pick(rng, [n for n in m.graph.node if len(n.input) >= 2], "nodes with 2+ inputs")
    a, b = rng.sample(range(len(node.input)), 2)
    node.input[a], node.input[b] = node.input[b], node.input[a]
    return _result(m, f"{node.op_type} '{node.name}' inputs {a} <-> {b}")


@mutation("proto")
def set_opset(m: onnx.ModelProto, rng: random.Random) -> Mutated:
    entry = _pick(
        rng, [o for o in m.opset_import if o.domain in ("", "ai.onnx")], "default-domain opset"
    )
    before = entry.version
    entry.version = rng.choice(
        [v for v in range(1, onnx.defs.onnx_opset_version() + 3) if v != before]
    )
    return _result(m, f"opset {before} -> {entry.version}")


@mutation("bytes")
def truncate_bytes(data: bytes, rng: random.Random) -> Mutated:
    cut = rng.randrange(1, len(data))
    return Mutated(data[:cut], True, f"truncated to {cut} of {len(data)} bytes")


@mutation("bytes")
def flip_bytes(data: bytes, rng: random.Random) -> Mutated:
    buf = bytearray(data)
    where = sorted(rng.sample(range(len(buf)), min(len(buf), rng.choice([1, 1, 2, 4, 16]))))
    for i in where:
        buf[i] ^= rng.randrange(1, 256)
    return Mutated(
        bytes(buf), True, f"flipped bytes at {where[:8]}{'...' if len(where) > 8 else ''}"
    )


@mutation("bytes")
def empty_file(data: bytes, rng: random.Random) -> Mutated:
    return Mutated(b"", False, "empty file")


@mutation("proto")
def delete_external_data(m: onnx.ModelProto, rng: random.Random) -> Mutated:
    if not any(t.data_location == TensorProto.EXTERNAL for t in _all_initializers(m.graph)):
        raise NotApplicable("no external data")
    return Mutated(m.SerializeToString(), False, "external data file deleted")


@mutation("proto")
def duplicate_output(m: onnx.ModelProto, rng: random.Random) -> Mutated:
    """A node's output renamed to a name another node (or a graph input/initializer) already has."""
    outputs = [(n, k) for n in m.graph.node for k, name in enumerate(n.output) if name]
    node, k = _pick(rng, outputs, "node outputs")
    others = [o for n in m.graph.node if n is not node for o in n.output if o]
    others += [v.name for v in m.graph.input] + [t.name for t in m.graph.initializer]
    before = node.output[k]
    node.output[k] = _pick(rng, [o for o in others if o != before], "other value names")
    return _result(m, f"{node.op_type} '{node.name}' output {k}: '{before}' -> '{node.output[k]}'")


@mutation("proto")
def corrupt_weights(m: onnx.ModelProto, rng: random.Random, base: Path | None = None) -> Mutated:
    """A float initializer filled with NaN, inf, zeros or huge values (external data inlined)."""
    import numpy as np
    from onnx import numpy_helper

    floats = [
        t
        for t in m.graph.initializer
        if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
    ]
    t = _pick(rng, floats, "float initializers")
    if t.data_location == TensorProto.EXTERNAL:
        if base is None:
            raise NotApplicable("external tensor without its folder")
        onnx.external_data_helper.load_external_data_for_tensor(t, str(base))
        t.data_location = TensorProto.DEFAULT
        del t.external_data[:]
    array = numpy_helper.to_array(t).copy()
    how = rng.choice(["nan", "inf", "zero", "huge", "some_nan"])
    if how == "nan":
        array[...] = np.nan
    elif how == "inf":
        array[...] = np.inf
    elif how == "zero":
        array[...] = 0
    elif how == "huge":
        array[...] = np.finfo(array.dtype).max
    elif array.size:
        array.reshape(-1)[rng.randrange(array.size)] = np.nan
    t.CopyFrom(numpy_helper.from_array(array, t.name))
    return _result(m, f"initializer '{t.name}' {list(t.dims)} set to {how}")


@mutation("proto")
def corrupt_external_reference(m: onnx.ModelProto, rng: random.Random) -> Mutated:
    """An external tensor's location, offset or length made wrong."""
    t = _pick(
        rng,
        [t for t in _all_initializers(m.graph) if t.data_location == TensorProto.EXTERNAL],
        "external tensors",
    )
    how = rng.choice(
        [
            "location_missing",
            "location_escape",
            "location_absolute",
            "offset_past_end",
            "offset_negative",
            "length_long",
            "offset_text",
        ]
    )
    entries = {e.key: e for e in t.external_data}

    def entry(key: str):
        if key not in entries:
            entries[key] = t.external_data.add(key=key, value="0")
        return entries[key]

    if how.startswith("location"):
        value = {
            "location_missing": "nothing_here.data",
            "location_escape": "../../" + entries["location"].value,
            "location_absolute": "/etc/hostname",
        }[how]
        entries["location"].value = value
    elif how == "offset_past_end":
        entry("offset").value = str(2**40)
    elif how == "offset_negative":
        entry("offset").value = "-4"
    elif how == "length_long":
        entry("length").value = str(2**33)
    else:
        entry("offset").value = "twelve"
    return _result(m, f"external tensor '{t.name}': {how}")


@mutation("proto")
def change_op_type(m: onnx.ModelProto, rng: random.Random) -> Mutated:
    node = _pick(rng, m.graph.node, "nodes")
    before = node.op_type
    node.op_type = rng.choice(
        [
            "Relu",
            "Conv",
            "Add",
            "Concat",
            "Gemm",
            "MatMul",
            "Transpose",
            "Reshape",
            "FuzzOp",
            "Identity",
            "Split",
            "BatchNormalization",
        ]
    )
    return _result(m, f"node '{node.name}' op {before} -> {node.op_type}")


@mutation("proto")
def drop_attribute(m: onnx.ModelProto, rng: random.Random) -> Mutated:
    node = _pick(rng, [n for n in m.graph.node if len(n.attribute)], "nodes with attributes")
    k = rng.randrange(len(node.attribute))
    name = node.attribute[k].name
    del node.attribute[k]
    return _result(m, f"{node.op_type} '{node.name}' lost attribute {name}")


@mutation("proto")
def drop_graph_io(m: onnx.ModelProto, rng: random.Random) -> Mutated:
    """A graph input or output removed from the signature (or all outputs)."""
    how = rng.choice(["input", "output", "all_outputs"])
    if how == "input":
        i = _pick(rng, range(len(m.graph.input)), "inputs")
        name = m.graph.input[i].name
        del m.graph.input[i]
    elif how == "output":
        i = _pick(rng, range(len(m.graph.output)), "outputs")
        name = m.graph.output[i].name
        del m.graph.output[i]
    else:
        name = "*"
        del m.graph.output[:]
    return _result(m, f"dropped graph {how} '{name}'")


# ---------------------------------------------------------------- one case


@dataclasses.dataclass
class Case:
    index: int
    seed_model: str  # path
    mutations: list[str]  # tried in order until one applies
    mutation_seed: int
    ratio: float


@dataclasses.dataclass
class Result:
    index: int
    seed_model: str
    mutation: str
    outcome: str  # OK, CLEAN or BUG (or "n/a")
    reason: str  # why a BUG, or the error line
    rc: int | None
    stderr: str
    seconds: float
    note: str = ""
    ratio: float = 0.0
    mutation_seed: int = 0
    verbose_stderr: str = ""
    saved: str = ""
    # for a BUG: is the mutated input itself a valid model? ("valid" or why not)
    input_check: str = ""


def make_case(seed: int, index: int, seeds: list[Path]) -> Case:
    rng = random.Random(f"{seed}:{index}")
    names = list(MUTATIONS)
    first = rng.choice(names)
    rest = [n for n in names if n != first]
    rng.shuffle(rest)
    model = rng.choice(seeds)
    return Case(
        index, str(model), [first] + rest, rng.randrange(2**32), round(rng.uniform(0.1, 0.7), 3)
    )


_PROTO_CACHE: dict[str, bytes] = {}


def apply_mutation(seed_model: Path, name: str, mutation_seed: int) -> Mutated:
    """Raise NotApplicable when the mutation has nothing to work on in this model."""
    key = str(seed_model)
    if key not in _PROTO_CACHE:
        _PROTO_CACHE[key] = seed_model.read_bytes()
    data = _PROTO_CACHE[key]
    mut = MUTATIONS[name]
    rng = random.Random(mutation_seed)
    if mut.takes == "bytes":
        if not data:
            raise NotApplicable("empty seed")
        return mut.fn(data, rng)
    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    if name == "corrupt_weights":
        return mut.fn(proto, rng, base=seed_model.parent)
    return mut.fn(proto, rng)


def _digest(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.exists()}


class CaseTimeout(BaseException):
    """Raised by SIGALRM in in-process mode; a BaseException so `except Exception` in spa lets it
    through."""


def _alarm(signum, frame):
    raise CaseTimeout()


def invoke(
    argv: list[str],
    cwd: Path,
    in_process: bool,
    timeout: float,
    mem_limit_gb: float | None = DEFAULT_MEM_GB,
) -> tuple[int | None, str, str]:
    """Run `spa ARGV` in `cwd`: (exit code or None on timeout, stdout, stderr).

    mem_limit_gb caps the address space (RLIMIT_AS) so that a model that makes spa allocate
    absurd arrays ends in a MemoryError (a BUG) instead of the OOM killer taking the machine.
    """
    if not in_process:

        def limit():
            if mem_limit_gb:
                _, hard = resource.getrlimit(resource.RLIMIT_AS)
                resource.setrlimit(resource.RLIMIT_AS, (int(mem_limit_gb * 2**30), hard))

        try:
            run = subprocess.run(
                [sys.executable, "-m", "spa", *argv],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=timeout,
                preexec_fn=limit,
            )
            return run.returncode, run.stdout, run.stderr
        except subprocess.TimeoutExpired as e:
            return None, _text(e.stdout), _text(e.stderr)
    with _address_space_limit(mem_limit_gb):
        return _invoke_in_process(argv, cwd, timeout)


@contextlib.contextmanager
def _address_space_limit(gb: float | None):
    """In this process: at most `gb` more address space than now, while the block runs."""
    if not gb:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    want = now + int(gb * 2**30)
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    resource.setrlimit(resource.RLIMIT_AS, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """As the interpreter shows a warning: to the sys.stderr of the moment."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


# The interpreter's default warning filters (no -W, no PYTHONWARNINGS), in order.
_DEFAULT_FILTERS = [
    ("default", DeprecationWarning, "__main__"),
    ("ignore", DeprecationWarning, ""),
    ("ignore", PendingDeprecationWarning, ""),
    ("ignore", ImportWarning, ""),
    ("ignore", ResourceWarning, ""),
]


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _invoke_in_process(argv: list[str], cwd: Path, timeout: float) -> tuple[int | None, str, str]:
    """spa.cli.main(argv) here, with stdout and stderr captured at the Python level and at the
    file-descriptor level (onnxruntime's C++ logging writes to fd 2)."""
    import logging
    import traceback

    import spa.cli

    out, err = io.StringIO(), io.StringIO()
    fd_err = tempfile.TemporaryFile()
    saved_fd = os.dup(2)
    old_cwd = os.getcwd()
    rc: int | None
    use_alarm = timeout and hasattr(signal, "SIGALRM") and _main_thread()
    old_handler = signal.signal(signal.SIGALRM, _alarm) if use_alarm else None
    saved_logging = logging.root.handlers[:], logging.root.level
    try:
        logging.root.handlers.clear()  # spa's basicConfig binds the stderr of the moment
        sys.stderr.flush()
        os.dup2(fd_err.fileno(), 2)
        os.chdir(cwd)
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, timeout)
        # Fresh warning state per case (catch_warnings invalidates the once-per-location
        # registries),
        # the interpreter's default filters, shown on stderr: as in a subprocess, even under pytest.
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            warnings.catch_warnings(),
        ):
            warnings.resetwarnings()
            for action, category, module in _DEFAULT_FILTERS:
                warnings.filterwarnings(action, category=category, module=module, append=True)
            warnings.showwarning = _show_warning
            try:
                rc = spa.cli.main(argv)
            except SystemExit as e:  # argparse, or an explicit sys.exit
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
            except CaseTimeout:
                rc = None
            except Exception:  # main() escaped: what the interpreter would print
                traceback.print_exc()
                rc = 1
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
        os.chdir(old_cwd)
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        logging.root.handlers[:] = saved_logging[0]
        logging.root.setLevel(saved_logging[1])
    fd_err.seek(0)
    native = fd_err.read().decode(errors="replace")
    fd_err.close()
    return rc, out.getvalue(), err.getvalue() + native


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def check_output(inp: Path, out: Path) -> str:
    """'' if OUT is a valid model with the input and output names of IN, else why not."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(out), full_check=True)
    except Exception as e:
        return f"output fails onnx.checker: {_first_line(e)}"
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        sess = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        return f"onnxruntime cannot open the output: {_first_line(e)}"
    src = onnx.load(str(inp), load_external_data=False)
    dst = onnx.load(str(out), load_external_data=False)

    def inputs(m: onnx.ModelProto) -> list[str]:
        inits = {t.name for t in m.graph.initializer}
        return [v.name for v in m.graph.input if not (src.ir_version < 4 and v.name in inits)]

    want_in, want_out = inputs(src), [v.name for v in src.graph.output]
    if inputs(dst) != want_in:
        return f"graph inputs changed: {want_in} -> {inputs(dst)}"
    if [v.name for v in dst.graph.output] != want_out:
        return f"graph outputs changed: {want_out} -> {[v.name for v in dst.graph.output]}"
    sess_in = [i.name for i in sess.get_inputs()]
    if [n for n in want_in if n not in sess_in] or [o.name for o in sess.get_outputs()] != want_out:
        return (
            f"onnxruntime sees other inputs/outputs: {sess_in} / "
            f"{[o.name for o in sess.get_outputs()]}"
        )
    return ""


def check_input(inp: Path) -> str:
    """'valid' if the (mutated) input passes the full checker and opens in onnxruntime, else why
    not: tells a crash on an invalid model (spa should have said so) from one on a valid model."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(inp), full_check=True)
    except Exception as e:
        return f"invalid (checker: {_first_line(e)[:120]})"
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        ort.InferenceSession(str(inp), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        return f"invalid (onnxruntime: {_first_line(e)[:120]})"
    return "valid"


def _first_line(e) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def classify(
    rc: int | None,
    stderr: str,
    inp: Path,
    out: Path,
    folder: Path,
    expected_files: set[str],
    digests_before: dict,
    digests_after: dict,
) -> tuple[str, str]:
    """(outcome, reason). Progress lines (a step that ran long, see spa.progress) are not errors."""
    lines = [line for line in stderr.splitlines() if not re.match(r"^spa: .*, \d+ s so far", line)]
    leftovers = sorted(
        p.name
        for p in folder.iterdir()
        if p.name not in expected_files and p.name not in (out.name, out.name + ".data")
    )
    temp = [n for n in leftovers if n.startswith(".spa-")]
    if rc is None:
        return BUG, "timeout"
    if digests_before != digests_after:
        return BUG, "input modified"
    if temp:
        return BUG, f"temp files left behind: {temp}"
    if leftovers:
        return BUG, f"unexpected files in the output folder: {leftovers}"
    if "Traceback (most recent call last)" in stderr:
        return BUG, "traceback: " + (lines[-1] if lines else "")
    internal = [line for line in lines if line.startswith("spa: internal error:")]
    if internal:
        return BUG, internal[0]
    if rc == 0:
        if not out.exists():
            return BUG, "exit 0 but no output written"
        why = check_output(inp, out)
        return (BUG, f"exit 0 but {why}") if why else (OK, "")
    if rc == 1:
        if out.exists():
            return BUG, "exit 1 but the output was written"
        native = [line for line in lines if re.search(r"\[[EWIV]:onnxruntime:", line)]
        spa_lines = [line for line in lines if line.startswith("spa:")]
        if native:
            return BUG, f"exit 1 with onnxruntime's C++ log on stderr ({len(lines)} lines): " + (
                spa_lines[0][:200] if spa_lines else ""
            )
        warned = [
            m.group(1) for line in lines if (m := re.match(r"^\S.*?:\d+: (\w*Warning: .*)", line))
        ]
        if warned:
            return (
                BUG,
                f"exit 1 with a Python warning on stderr ({len(lines)} lines): {warned[0][:160]}",
            )
        if len(lines) != 1 or not lines[0].startswith("spa: error:"):
            return BUG, f"exit 1 with {len(lines)} stderr line(s): " + " | ".join(
                line[:200] for line in lines[:3]
            )
        return CLEAN, lines[0]
    return BUG, f"exit {rc}: " + (lines[-1] if lines else "(no stderr)")


def run_case(
    case: Case,
    in_process: bool = False,
    timeout: float = 120,
    bugs_dir: str | None = None,
    mem_limit_gb: float | None = DEFAULT_MEM_GB,
) -> Result:
    seed_model = Path(case.seed_model)
    mutated = None
    for name in case.mutations:
        try:
            mutated = apply_mutation(seed_model, name, case.mutation_seed)
            break
        except NotApplicable:
            continue
    if mutated is None:
        return Result(case.index, seed_model.name, "-", "n/a", "no mutation applies", None, "", 0.0)
    with tempfile.TemporaryDirectory(prefix="spa-fuzz-") as tmp:
        folder = Path(tmp)
        inp = folder / seed_model.name
        inp.write_bytes(mutated.data)
        copied = []
        if mutated.copy_external and mutated.data:
            try:
                ext = external_files(seed_model)
            except Exception:
                ext = []
            for f in ext:
                shutil.copyfile(f, folder / f.name)
                copied.append(folder / f.name)
        out = folder / "out.onnx"
        expected = {inp.name} | {p.name for p in copied}
        before = _digest([inp, *copied])
        argv = ["prune", inp.name, out.name, "--ratio", str(case.ratio)]
        start = time.perf_counter()
        rc, _, stderr = invoke(argv, folder, in_process, timeout, mem_limit_gb)
        seconds = time.perf_counter() - start
        after = _digest([inp, *copied])
        outcome, reason = classify(rc, stderr, inp, out, folder, expected, before, after)
        result = Result(
            case.index,
            seed_model.name,
            name,
            outcome,
            reason,
            rc,
            stderr,
            seconds,
            mutated.note,
            case.ratio,
            case.mutation_seed,
        )
        if outcome == BUG:
            for p in folder.iterdir():
                if p.name not in expected:
                    p.unlink() if p.is_file() else shutil.rmtree(p)
            _, _, result.verbose_stderr = invoke(
                [*argv, "-v"], folder, in_process, timeout, mem_limit_gb
            )
            result.input_check = check_input(inp)
            if bugs_dir:
                result.saved = str(_save_bug(Path(bugs_dir), result, folder, inp, copied, before))
        return result


def _save_bug(
    bugs: Path, r: Result, folder: Path, inp: Path, copied: list[Path], digests: dict
) -> Path:
    where = bugs / f"case{r.index:06d}-{r.mutation}-{Path(r.seed_model).stem}"
    where.mkdir(parents=True, exist_ok=True)
    # the input as mutated (if the bug was that spa changed it, the bytes on disk are not it:
    # say so)
    for p in [inp, *copied]:
        if p.exists():
            shutil.copyfile(p, where / p.name)
    (where / "stderr.txt").write_text(r.stderr)
    (where / "stderr-v.txt").write_text(r.verbose_stderr)
    info = dataclasses.asdict(r)
    info.pop("stderr"), info.pop("verbose_stderr")
    info["repro"] = f"spa prune {inp.name} out.onnx --ratio {r.ratio} -v"
    info["input_sha256"] = digests
    (where / "case.json").write_text(json.dumps(info, indent=1))
    return where


# ---------------------------------------------------------------- the driver


def _worker(args) -> Result:
    case, in_process, timeout, bugs_dir, mem_limit_gb = args
    try:
        return run_case(case, in_process, timeout, bugs_dir, mem_limit_gb)
    except BaseException as e:  # the fuzzer's own failure: report it, do not lose the run
        import traceback

        return Result(
            case.index,
            Path(case.seed_model).name,
            case.mutations[0],
            "fuzzer error",
            f"{type(e).__name__}: {e}",
            None,
            traceback.format_exc(),
            0.0,
        )


def _init_worker():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# the worker died on the case (OOM killer, a native crash) or outlived its deadline
KILLED = "timeout/killed"
CASES_PER_WORKER = 200  # then a fresh worker: in-process runs leak a little per case


def _serve(
    conn, in_process: bool, timeout: float, bugs_dir: str, mem_limit_gb: float | None
) -> None:
    """A worker process: run the cases sent on `conn`, one at a time, until it gets None."""
    _init_worker()
    with contextlib.suppress(EOFError, KeyboardInterrupt):
        while (case := conn.recv()) is not None:
            conn.send(_worker((case, in_process, timeout, bugs_dir, mem_limit_gb)))


def run_cases(
    cases: list[Case],
    jobs: int,
    in_process: bool,
    timeout: float,
    bugs_dir: str,
    mem_limit_gb: float | None,
    rerun: str,
    deadline: float | None = None,
):
    """Yield the cases' results as they come, from `jobs` worker processes that get one case at a
    time. A worker that dies (the OOM killer, a segfault in native code) or has no result after
    the case's deadline (its own timeouts cannot interrupt native code) is killed: that case is
    reported as KILLED, its mutated model saved, and a fresh worker carries on."""
    import multiprocessing
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("spawn")
    deadline = deadline or 2 * timeout + 120  # the run, the -v rerun of a BUG, the checks
    todo = collections.deque(cases)
    workers: dict = {}  # parent end of the pipe -> [process, case or None, start time, cases done]

    def spawn():
        parent, child = ctx.Pipe()
        p = ctx.Process(
            target=_serve, args=(child, in_process, timeout, bugs_dir, mem_limit_gb), daemon=True
        )
        p.start()
        child.close()
        workers[parent] = [p, None, 0.0, 0]
        return parent

    def stop(conn, kill=False):
        p = workers.pop(conn)[0]
        with contextlib.suppress(OSError):
            p.kill() if kill else conn.send(None)
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
        conn.close()

    def assign(conn):
        w = workers[conn]
        w[1], w[2] = todo.popleft(), time.monotonic()
        try:
            conn.send(w[1])
        except OSError:  # died while idle: not this case's doing, it goes back to the queue
            todo.appendleft(w[1])
            stop(conn, kill=True)
            spawn()

    try:
        for _ in range(min(jobs, len(cases))):
            spawn()
        while workers:
            for conn, w in list(workers.items()):  # idle workers: a case each, else retire
                if conn in workers and w[1] is None:
                    if todo and w[3] < CASES_PER_WORKER:
                        assign(conn)
                    else:
                        stop(conn)
                        if todo:
                            assign(spawn())
            if not workers:
                break
            ready = wait(
                list(workers) + [w[0].sentinel for w in workers.values()], timeout=min(5, deadline)
            )
            for conn, w in list(workers.items()):
                p, case, started, _ = w
                if case is None:
                    continue
                result = None
                if conn in ready or p.sentinel in ready:
                    with contextlib.suppress(EOFError, OSError):
                        if conn.poll():
                            result = conn.recv()
                if result is not None:
                    w[1], w[3] = None, w[3] + 1
                    yield result
                elif not p.is_alive() or time.monotonic() - started > deadline:
                    seconds = time.monotonic() - started
                    code = p.exitcode
                    if code is None:
                        why = (
                            f"no result after {seconds:.0f} s (deadline {deadline:.0f} s): "
                            "worker killed"
                        )
                    elif code < 0:
                        sig = signal.Signals(-code).name if -code in signal.valid_signals() else "?"
                        why = f"worker died on signal {-code} ({sig}) after {seconds:.1f} s"
                    else:
                        why = f"worker exited with {code} after {seconds:.1f} s"
                    stop(conn, kill=True)
                    yield _killed(case, why, seconds, Path(bugs_dir), rerun)
                    if todo:
                        assign(spawn())
    finally:
        for conn in list(workers):
            stop(conn, kill=True)


def _killed(case: Case, why: str, seconds: float, bugs: Path, rerun: str) -> Result:
    """The Result of a case whose worker died, with its mutated model saved for a rerun."""
    name, mutated = "-", None
    for candidate in case.mutations:
        with contextlib.suppress(NotApplicable):
            mutated, name = (
                apply_mutation(Path(case.seed_model), candidate, case.mutation_seed),
                candidate,
            )
            break
    seed_model = Path(case.seed_model)
    r = Result(
        case.index,
        seed_model.name,
        name,
        KILLED,
        why,
        None,
        "",
        seconds,
        mutated.note if mutated else "",
        case.ratio,
        case.mutation_seed,
    )
    if mutated is None:
        return r
    where = bugs / f"case{r.index:06d}-{name}-{seed_model.stem}"
    where.mkdir(parents=True, exist_ok=True)
    (where / seed_model.name).write_bytes(mutated.data)
    if mutated.copy_external and mutated.data:
        with contextlib.suppress(Exception):
            for f in external_files(seed_model):
                shutil.copyfile(f, where / f.name)
    info = dataclasses.asdict(r)
    info["repro"] = f"spa prune {seed_model.name} out.onnx --ratio {r.ratio} -v"
    info["rerun"] = f"{rerun} --start {r.index} --cases 1"
    (where / "case.json").write_text(json.dumps(info, indent=1))
    r.saved = str(where)
    return r


def bug_class(r: Result) -> str:
    """A bug's class: the exception type and the innermost spa frame of the -v traceback
    (spa/apply.py:71 activation_keeps), else the reason with names and numbers abstracted."""
    frames = re.findall(r'File "[^"]*?/(spa/[^"/]+\.py)", line (\d+), in (\S+)', r.verbose_stderr)
    m = re.search(r"internal error: (\w+)", r.reason) or re.search(
        r"^(\w+(?:Error|Exception|Fail|Argument)\w*):", r.verbose_stderr, re.M
    )
    if frames and m:
        path, line, func = frames[-1]
        return f"{m.group(1)} at {path}:{line} {func}"
    return signature(r.reason)


def signature(reason: str) -> str:
    """The reason with names, numbers and paths abstracted."""
    s = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    s = re.sub(r"'[^']*'", "'…'", s)
    s = re.sub(r"\"[^\"]*\"", '"…"', s)
    s = re.sub(r"\b\d+\b", "N", s)
    s = re.sub(r"\([^()]*\)", "(…)", s)
    return s[:160]


def summary(results: list[Result]) -> str:
    outcomes = [OK, CLEAN, BUG] + sorted({r.outcome for r in results} - {OK, CLEAN, BUG})
    table = collections.defaultdict(collections.Counter)
    for r in results:
        table[r.mutation][r.outcome] += 1
    width = max([len("mutation")] + [len(m) for m in table])
    lines = [
        f"{'mutation':<{width}}  " + "  ".join(f"{o:>11}" for o in outcomes) + f"  {'total':>6}"
    ]
    lines.append("-" * len(lines[0]))
    for m in sorted(table):
        lines.append(
            f"{m:<{width}}  "
            + "  ".join(f"{table[m][o]:>11}" for o in outcomes)
            + f"  {sum(table[m].values()):>6}"
        )
    lines.append("-" * len(lines[0]))
    total = collections.Counter(r.outcome for r in results)
    lines.append(
        f"{'total':<{width}}  "
        + "  ".join(f"{total[o]:>11}" for o in outcomes)
        + f"  {len(results):>6}"
    )
    return "\n".join(lines)


def report(results: list[Result], how: str, bugs_dir) -> None:
    """The summary table, the timing, one line per bug and the distinct bug classes."""
    elapsed = how
    print()
    print(summary(results))
    timed = sorted(r.seconds for r in results if r.seconds)
    if timed:
        print(
            f"\n{len(results)} cases in {elapsed}: "
            f"per case mean {sum(timed) / len(timed):.3f} s, median {timed[len(timed) // 2]:.3f} "
            f"s, max {timed[-1]:.2f} s"
        )
    bugs = [r for r in results if r.outcome not in (OK, CLEAN)]
    if bugs:
        print(f"\n{len(bugs)} bug(s), saved under {bugs_dir}:")
        for r in bugs:
            print(f"  case {r.index}: {r.mutation} on {r.seed_model}: {r.reason[:300]}")
        classes = collections.defaultdict(list)
        for r in bugs:
            classes[bug_class(r)].append(r)
        print(
            f"\n{len(classes)} distinct bug class(es) (exception at the innermost spa frame, or "
            "the abstracted reason):"
        )
        for c, rs in sorted(classes.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            muts = ",".join(sorted({r.mutation for r in rs}))
            valid = sum(r.input_check == "valid" for r in rs)
            print(
                f"  {len(rs):>4} x {c}  (input valid in {valid} of {len(rs)})\n         mutations: "
                f"{muts}; e.g. case {rs[0].index} ({rs[0].mutation} on {rs[0].seed_model}): "
                f"{rs[0].reason[:160]}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100, help="how many cases (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed: same seed, same cases")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "out" / "fuzz",
        help="results-seedS.jsonl and bugs/ go here (default out/fuzz)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="call spa.cli.main in worker processes (fast) instead of a subprocess per case",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300,
        help="seconds per case (default 300: the data-free default takes up to about a minute "
        "alone on 2 cores, 3x that beside a second job)",
    )
    parser.add_argument(
        "--mem-limit-gb",
        type=float,
        default=DEFAULT_MEM_GB,
        help=f"address-space cap per case, 0 for none (default {DEFAULT_MEM_GB:g}): past it spa "
        "gets a MemoryError (a BUG) instead of the OOM killer",
    )
    parser.add_argument(
        "--mutations", default=None, help="comma-separated subset of: " + ",".join(MUTATIONS)
    )
    parser.add_argument(
        "--models", default=None, help="glob on the seed model file names (e.g. '*_dynamo*')"
    )
    parser.add_argument(
        "--start",
        type=int,
        default=0,
        help="first case index (to rerun case I: --start I --cases 1, with the same --seed, "
        "--mutations and --models)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="JSONL",
        help="only print the summary of an earlier run's results-seed*.jsonl",
    )
    args = parser.parse_args(argv)
    if args.report is not None:
        results = [
            Result(**json.loads(line))
            for line in args.report.read_text().splitlines()
            if line.strip()
        ]
        report(results, "(from " + str(args.report) + ")", args.report.parent / "bugs")
        return 1 if any(r.outcome not in (OK, CLEAN) for r in results) else 0

    if args.mutations:
        unknown = set(args.mutations.split(",")) - set(MUTATIONS)
        if unknown:
            parser.error(f"unknown mutations: {sorted(unknown)}")
        for name in list(MUTATIONS):
            if name not in args.mutations.split(","):
                del MUTATIONS[name]
    seeds = seed_models()
    if args.models:
        import fnmatch

        seeds = [s for s in seeds if fnmatch.fnmatch(s.name, args.models)]
    if not seeds:
        parser.error("no seed models")
    bugs_dir = args.out / "bugs"
    cases = [make_case(args.seed, i, seeds) for i in range(args.start, args.start + args.cases)]
    # how to rerun one case
    rerun = f"python scripts/fuzz.py --seed {args.seed}" + " --in-process" * args.in_process
    rerun += f" --mutations {args.mutations}" * bool(
        args.mutations
    ) + f" --models '{args.models}'" * bool(args.models)
    mode = "in-process" if args.in_process else "subprocess"
    print(
        f"fuzz: {len(cases)} cases, seed {args.seed}, {len(seeds)} seed models, {len(MUTATIONS)} "
        f"mutations, {args.jobs} job(s), {mode}",
        flush=True,
    )

    results: list[Result] = []
    start = time.perf_counter()
    it = run_cases(
        cases,
        max(1, args.jobs),
        args.in_process,
        args.timeout,
        str(bugs_dir),
        args.mem_limit_gb,
        rerun,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    # Each result is on disk as soon as it is known: a run that is killed keeps what it found.
    with open(args.out / f"results-seed{args.seed}.jsonl", "w") as saved:
        try:
            for r in it:
                results.append(r)
                saved.write(_result_line(r))
                saved.flush()
                _progress(r, len(results), len(cases), start)
        except KeyboardInterrupt:
            print("interrupted: summary of the cases run so far", flush=True)
        finally:
            it.close()  # kills the workers
    elapsed = time.perf_counter() - start
    results.sort(key=lambda r: r.index)
    report(results, f"{elapsed:.1f} s wall ({args.jobs} job(s), {mode})", bugs_dir)
    return 1 if any(r.outcome not in (OK, CLEAN) for r in results) else 0


def _result_line(r: Result) -> str:
    info = dataclasses.asdict(r)
    info["stderr"] = info["stderr"][-2000:]
    info["verbose_stderr"] = info["verbose_stderr"][-4000:]
    return json.dumps(info) + "\n"


def _progress(r: Result, n: int, total: int, start: float) -> None:
    if r.outcome not in (OK, CLEAN):
        print(
            f"  [{n}/{total}] case {r.index}: {r.outcome}: {r.mutation} on {r.seed_model}: "
            f"{r.reason}",
            flush=True,
        )
    elif n % 25 == 0:
        print(f"  [{n}/{total}] {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
