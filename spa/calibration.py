"""Calibration inputs: the user's arrays, files or quantization readers, or synthetic ones."""

from __future__ import annotations

import enum
import math
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from spa import io, synthetic
from spa.count import node_macs
from spa.errors import CalibrationError, SpaError
from spa.runtime import fixed_batch, isolated, random_inputs, samples
from spa.statistics import KEPT_BYTES, Kind, reads
from spa.verify import class_scores

BATCH = 32
SYNTHETIC_SAMPLES = 256


class Source(str, enum.Enum):
    """Where a prune's calibration came from (`Method.calibration`; the value is the JSON's)."""

    DATA = "data"  # the user's samples
    SYNTHETIC = "synthetic"  # samples with the structure of natural ones (data-free)
    GENERATED = "generated"  # text a causal language model wrote itself (data-free)
    BATCHNORM = "batchnorm"  # no samples: BatchNormalization means moved into biases (data-free)

    def __str__(self) -> str:
        return self.value

    @classmethod
    def made_by_spa(cls, option) -> Source | None:
        """SYNTHETIC or GENERATED where the calibration option names one; None for user data (a
        path, arrays, a reader) and for no option."""
        if isinstance(option, str) and option in (cls.SYNTHETIC.value, cls.GENERATED.value):
            return cls(option)
        return None


def batches(
    source,
    sess: ort.InferenceSession,
    input_shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Feeds for the calibration runs, BATCH samples each (or the batch size the model fixes).

    source: a .npy file (one input) or .npz (keyed by input name); an array or a dict of arrays
    (samples along axis 0); an onnxruntime.quantization CalibrationDataReader (anything with
    get_next()); "synthetic": samples at the model's input shapes with the structure of natural
    ones (spa.synthetic), the data-free mode (see the README for why, and what it costs); or
    "generated": text that a causal language model samples itself (`generate`), its data-free
    mode.
    """
    names = [i.name for i in sess.get_inputs()]
    made = Source.made_by_spa(source)
    if made is Source.SYNTHETIC:
        return _synthetic(sess, input_shapes, seed)
    if made is Source.GENERATED:
        tokens = causal_lm(sess)
        if tokens is None:
            raise CalibrationError(
                "--calibration generated needs a causal language model: token ids [batch, "
                "sequence] in, logits [batch, sequence, vocabulary] out"
            )
        source = {tokens: generate(sess, tokens, seed)}
    if hasattr(source, "get_next"):
        feeds = []
        while (item := source.get_next()) is not None:
            feeds.append({n: np.asarray(item[n]) for n in names})
        if not feeds:
            raise SpaError("the calibration reader gave no data")
        return feeds
    where = "calibration data"
    if isinstance(source, (str, os.PathLike)):
        where = f"--calibration {source}"
        source = io.load_arrays(Path(source), "--calibration")
    if isinstance(source, np.ndarray):
        if len(names) != 1:
            raise SpaError(
                f"one calibration array for a model with {len(names)} inputs: pass a dict keyed by "
                "input name"
            )
        source = {names[0]: source}
    missing = set(names) - set(source)
    if missing:
        raise SpaError(f"{where} has no array for input(s) {sorted(missing)}")
    for name in names:
        if np.ndim(source[name]) == 0:
            raise SpaError(
                f"{where}: the array for input '{name}' is a scalar; give samples along the first "
                "axis"
            )
    arrays = {n: np.asarray(source[n]) for n in names}
    if samples(arrays) == 1:  # no sample axis the inputs share: the whole data is one sample
        return [arrays]
    count = len(arrays[names[0]])
    step, fixed = batch_size(sess)
    if fixed:  # the model takes whole batches only
        count -= count % step
    if count == 0:
        raise SpaError(
            "calibration data has no "
            f"samples{f' (the model takes batches of {step})' if fixed else ''}"
        )
    return [{n: np.asarray(source[n][i : i + step]) for n in names} for i in range(0, count, step)]


# Calibration samples kept out of the fit to measure the pruned model: 1/HELD_OUT_SHARE of them,
# at least MIN_FIT left to fit on.
HELD_OUT_SHARE = 8
MIN_FIT = 8


def describe(source) -> str | None:
    """The calibration source in a report: the file, the data-free mode, or what kind of object."""
    if source is None or isinstance(source, (str, os.PathLike)):
        return None if source is None else str(source)
    if hasattr(source, "get_next"):
        return f"a {type(source).__name__} (calibration data reader)"
    if isinstance(source, dict):
        return "arrays: " + ", ".join(f"{k} {list(np.shape(v))}" for k, v in source.items())
    return f"an array {list(np.shape(source))}"


def hold_out(
    feeds: list[dict[str, np.ndarray]], sess: ort.InferenceSession
) -> tuple[list[dict], list[dict]]:
    """(fit, held out): the last 1/HELD_OUT_SHARE of the samples, a batch split where the model
    takes any batch size. Nothing is held out of too few samples."""
    sizes = [samples(f) if f else 0 for f in feeds]
    held = sum(sizes) // HELD_OUT_SHARE
    if held == 0 or sum(sizes) - held < MIN_FIT:
        return feeds, []
    fixed = batch_size(sess)[1]
    fit, out = list(feeds), []
    while held > 0:
        if sizes[len(fit) - 1] <= held:
            held -= sizes[len(fit) - 1]
            out.insert(0, fit.pop())
        elif fixed:  # whole batches only
            break
        else:
            last = fit.pop()
            fit.append({k: v[:-held] for k, v in last.items()})
            out.insert(0, {k: v[-held:] for k, v in last.items()})
            held = 0
    return fit, out


def batch_size(sess: ort.InferenceSession) -> tuple[int, bool]:
    """Samples per run: BATCH, or the batch size the model fixes (True)."""
    fixed = fixed_batch(sess)
    return (fixed, True) if fixed else (BATCH, False)


def _synthetic(sess: ort.InferenceSession, input_shapes, seed: int) -> list[dict[str, np.ndarray]]:
    for a in sess.get_inputs():
        if a.name not in (input_shapes or {}) and any(
            not isinstance(d, int) or d <= 0 for d in a.shape[1:]
        ):
            raise CalibrationError(
                f"synthetic calibration: input '{a.name}' has symbolic dims {a.shape}; give them "
                "with --input-shapes"
            )
    batch, _ = batch_size(sess)
    count = -(-SYNTHETIC_SAMPLES // batch)
    shapes = {a.name: [batch, *a.shape[1:]] for a in sess.get_inputs()}  # all fixed, or given:
    shapes.update({k: [batch, *v[1:]] for k, v in (input_shapes or {}).items()})
    feeds = [random_inputs(sess, shapes, seed + i) for i in range(count)]
    for j, (name, v) in enumerate(feeds[0].items()):
        if v.dtype.kind == "f":  # drawn all at once: images share layouts (spa.synthetic)
            samples = synthetic.fill((count * batch, *v.shape[1:]), v.dtype, seed + j)
            for i, feed in enumerate(feeds):
                feed[name] = samples[i * batch : (i + 1) * batch]
    return feeds


# A causal language model calibrates, without data, on text it writes itself: GENERATED sequences
# of GENERATED_LENGTH tokens, each from one random first token, sampled at temperature 1 from the
# TOP_K likeliest next tokens. No KV cache: step t runs the model on t tokens (SmolLM2-135M: 32 x 48
# tokens in about 3 minutes on two cores).
GENERATED = 32
GENERATED_LENGTH = 48
TOP_K = 40
_GENERATION_BATCH = 8  # sequences per run: the logits of 32 x 48 positions x 49k tokens are 300 MB


def token_input(model: ir.Model) -> str | None:
    """The model's token input where it could be a causal language model (`causal_lm` checks it
    runs like one): one integer input [batch, sequence] with a free sequence length, and logits
    [batch, sequence, vocabulary] from an LM head (spa.verify.class_scores) first out."""
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    if (
        len(inputs) != 1
        or inputs[0].dtype is None
        or inputs[0].dtype.is_floating_point()
        or inputs[0].shape is None
    ):
        return None
    shape = list(inputs[0].shape)
    if len(shape) != 2 or isinstance(shape[1], int) or not model.graph.outputs:
        return None
    logits = model.graph.outputs[0]  # from an LM head: hidden states out is an encoder, not an LM
    return (
        inputs[0].name
        if class_scores(model).get(logits.name) == "logits" and len(logits.shape or ()) == 3
        else None
    )


def causal_lm(sess: ort.InferenceSession) -> str | None:
    """The name of the token input, where the model is a causal language model: one integer input
    [batch, sequence] with a free sequence length, logits [batch, sequence, vocabulary] first out,
    and a position's logits do not depend on later tokens (checked on the model itself)."""
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if (
        len(inputs) != 1
        or "int" not in inputs[0].type
        or len(inputs[0].shape) != 2
        or isinstance(inputs[0].shape[1], int)
    ):
        return None
    if (
        not outputs
        or outputs[0].type not in ("tensor(float)", "tensor(double)")
        or len(outputs[0].shape) != 3
    ):
        return None
    name, dtype = inputs[0].name, np.dtype(inputs[0].type[len("tensor(") : -1])
    probe = np.array([[1, 2, 3, 4], [1, 2, 3, 5]], dtype)

    def check() -> bool:
        logits = sess.run([outputs[0].name], {name: probe})[0]
        return (
            logits.shape[:2] == probe.shape
            and bool(np.allclose(logits[0, :3], logits[1, :3], rtol=1e-4, atol=1e-5))
            and not np.allclose(logits[0, 3], logits[1, 3])
        )

    try:
        return (
            name
            if isolated(check, "checking whether the model is a causal language model")
            else None
        )
    except (RuntimeError, SpaError):
        return None


def generate(sess: ort.InferenceSession, name: str, seed: int = 0) -> np.ndarray:
    """GENERATED sequences sampled from the model: [GENERATED, GENERATED_LENGTH] token ids."""
    from spa.progress import Progress

    logits_name = sess.get_outputs()[0].name
    rng = np.random.default_rng(seed)
    dtype = np.dtype(sess.get_inputs()[0].type[len("tensor(") : -1])
    vocabulary = sess.run([logits_name], {name: np.ones((1, 1), dtype)})[0].shape[-1]
    ids = np.zeros((GENERATED, GENERATED_LENGTH), dtype)
    ids[:, 0] = rng.integers(0, vocabulary, GENERATED)
    bar = Progress(GENERATED_LENGTH - 1, "generating calibration text")
    for t in range(1, GENERATED_LENGTH):
        for start in range(0, GENERATED, _GENERATION_BATCH):
            rows = slice(start, start + _GENERATION_BATCH)
            last = sess.run([logits_name], {name: ids[rows, :t]})[0][:, -1, :].astype(np.float64)
            top = np.argpartition(-last, TOP_K, axis=-1)[:, :TOP_K]
            weights = np.take_along_axis(last, top, -1)
            weights = np.exp(weights - weights.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            choice = (weights.cumsum(-1) < rng.random((len(top), 1))).sum(-1).clip(max=TOP_K - 1)
            ids[rows, t] = top[np.arange(len(top)), choice]
        bar.update(t)
    bar.close()
    return ids


# Without calibration data, spa runs the data-free refit by default while it costs at most this
# many multiply-accumulates: about a minute on two cores (a ResNet-18 at 224x224 is 6.5 T and took
# 53 s). Above it (a ResNet-50 at 224x224 is 9.4 T) the default is a plain prune by magnitude, and a
# note says how to ask for the refit. The estimate is coarse: within a factor of two of the time.
DATA_FREE_BUDGET_MACS = 7e12


def data_free_work(model: ir.Model, shapes: dict, consumers: list) -> int:
    """Multiply-accumulates of the data-free mode over SYNTHETIC_SAMPLES inputs: three passes of
    the model (statistics; the original and the pruned model in the refit, each run once, value by
    value: spa.statistics.Forward), and three products of every consumer's features (statistics;
    the refit's with themselves and with the original's); plus, whatever the samples, 8 features^3
    per consumer for the inverse, the greedy OBS updates and the solve of its features x features
    matrices (measured: AlexNet's 9,216-input layer alone took 60 s; VGG's 25,088-input one would
    be 1.3e14)."""
    # The shapes hold the analysis' batch (--input-shapes, a fixed batch): count per sample.
    batch = max(1, min((shapes[v][0] for v in model.graph.inputs if shapes.get(v)), default=1))
    values = {v.name: v for v in shapes}
    passes = 3 * sum(node_macs(node, shapes) for node in model.graph)
    if _kept_bytes(model, shapes, consumers) * SYNTHETIC_SAMPLES // batch > KEPT_BYTES:
        # Forward runs prefixes instead: a pass up to every value the refit reads, for both models
        before, upstream = 0, {}
        for node in model.graph:
            upstream.update((v.name, before) for v in node.outputs)
            before += node_macs(node, shapes)
        passes = before + 2 * sum(upstream.get(name, 0) for name in {c.input for c in consumers})
    products = solves = 0
    for c in consumers:
        shape = shapes.get(values.get(c.input))
        if shape is None or c.wide:  # only means: no products, no solves
            continue
        if c.kind == Kind.DENSE:
            features = shape[c.feature_axis]
            rows = math.prod(shape) // max(features, 1) // batch
        else:
            features = shape[1] * c.kernel_size // (shape[1] if c.kind == Kind.DEPTHWISE else 1)
            rows = min(c.positions, math.prod(shape[2:])) * (
                shape[1] if c.kind == Kind.DEPTHWISE else 1
            )
        products += 3 * rows * features**2
        solves += 8 * features**3 if c.kind != Kind.DEPTHWISE else 0
    return SYNTHETIC_SAMPLES * (passes // batch + products) + solves


def _kept_bytes(model: ir.Model, shapes: dict, consumers: list) -> int:
    """The most bytes spa.statistics.Forward holds at once, at the analysis' batch (float32 taken
    for all): at each step, what the last step kept and what this one makes that later nodes
    read."""
    nodes = list(model.graph)
    last = {name: i for i, node in enumerate(nodes) for name in reads(node)}
    made = {v.name: i for i, node in enumerate(nodes) for v in node.outputs}
    sizes = {
        v.name: 4 * math.prod(shapes[v])
        for node in nodes
        for v in node.outputs
        if shapes.get(v) is not None
    }

    def read_after(end: int, first: int = 0) -> int:
        return sum(
            sizes.get(v.name, 0)
            for node in nodes[first : end + 1]
            for v in node.outputs
            if last.get(v.name, -1) > end
        )

    peak = kept = start = 0
    for end in sorted({made[c.input] for c in consumers if c.input in made}):
        peak = max(peak, kept + read_after(end, start))
        kept, start = read_after(end), end + 1
    return peak


def why_not_data_free(
    model: ir.Model, shapes: dict, consumers: list, large: bool, input_shapes: dict | None = None
) -> str | None:
    """Why the data-free mode is not the default for this model, or None when it is."""
    if large:
        return "the model is too large to run twice in memory (--calibration synthetic forces it)"
    inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    if any(v.dtype is None or not v.dtype.is_floating_point() for v in inputs):
        return (
            "synthetic data cannot stand in for integer inputs such as token ids "
            "(--calibration gives real ones)"
        )
    for v in inputs:  # noise of size 1 along an image's height says nothing about the model
        if v.name not in (input_shapes or {}) and (
            v.shape is None or any(not isinstance(d, int) or d <= 0 for d in list(v.shape)[1:])
        ):
            return (
                f"input '{v.name}' has symbolic dims beyond the batch (--input-shapes gives them)"
            )
    work = data_free_work(model, shapes, consumers)
    if work > DATA_FREE_BUDGET_MACS:
        return (
            f"the data-free refit would take {work / 1e12:.1f} T multiply-accumulates "
            "(--calibration synthetic forces it)"
        )
    return None
