"""What the layers see: second moments of every consumer's input, accumulated over calibration
batches run in onnxruntime, one batch at a time (never all activations at once).

A consumer is a layer with a weight that reads channels: Conv, Gemm, MatMul with a constant
weight. Its features are the input vector (dense) or the im2col patch (conv), plus a constant 1 so
that the bias takes part in every least-squares fit. A depthwise conv reads each channel alone: its
features are one patch per channel, and its moments one small matrix per channel.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import functools
import math
import os

import numpy as np
import onnx_ir as ir
import threadpoolctl

from spa import padding
from spa.analysis import Analysis
from spa.errors import CalibrationError, first_line
from spa.graph import is_default_domain
from spa.progress import Progress
from spa.runtime import parts, rows_per_run, samples, session


class Kind(enum.Enum):
    """How a consumer's features are made from its input."""

    DENSE = "dense"  # the input vector along the feature axis
    CONV = "conv"  # the im2col patch over every input channel
    DEPTHWISE = "depthwise"  # one input channel per group: a patch per channel


@dataclasses.dataclass
class Consumer:
    """A layer that reads channels through a weight. Its identity is its weight initializer's name:
    the same in every copy of the model (the original and the pruned one that the refit compares,
    the sessions that score and measure) and in the analysis (`Analysis.members_named`), where
    nodes and values are objects of one copy."""

    node: str  # for messages
    input: str  # the activation it reads
    weight: str
    kind: Kind
    in_axis: int  # the weight's input-feature axis
    out_axis: int
    conv: dict | None = None  # kernel, strides, pads, dilations
    feature_axis: int = -1  # the input's feature axis (dense; 0 for Gemm with transA)
    groups: int = 1  # a depthwise conv's groups: its input channels
    width: int = 0  # input features (a depthwise conv: per channel)

    @property
    def kernel_size(self) -> int:
        """Weights per input channel and output: a conv's kernel elements, else 1."""
        return math.prod(self.conv["kernel"]) if self.conv is not None else 1

    @property
    def columns_per_channel(self) -> int:
        """Weight-matrix columns per input channel: a (non-depthwise) conv's kernel, else 1."""
        return self.kernel_size if self.kind == Kind.CONV else 1

    @property
    def positions(self) -> int:
        """Output positions per sample a conv's statistics use (POSITIONS_PER_SAMPLE)."""
        return DEPTHWISE_POSITIONS if self.kind == Kind.DEPTHWISE else POSITIONS_PER_SAMPLE

    @property
    def reads(self) -> tuple:
        """What its features are made of: consumers with equal keys (a transformer's Q, K and V,
        an FFN's gate and up projections) have equal features, and share their statistics."""
        conv = tuple(tuple(v) for v in self.conv.values()) if self.conv is not None else None
        return (self.input, self.kind, self.feature_axis, self.groups, conv)

    @property
    def wide(self) -> bool:
        """Too wide for second moments: only the means of its features are kept (MAX_WIDTH)."""
        return self.width > MAX_WIDTH

    def features(self, x: np.ndarray, feed: dict | None = None) -> np.ndarray:
        """Rows of input features, with a trailing 1: (samples, features + 1); for a depthwise conv
        (samples, channels, kernel + 1). feed: the run's inputs, whose padded positions (an
        attention mask's 0s) give no rows (spa.padding)."""
        if self.kind == Kind.DENSE:
            if feed is not None and self.feature_axis in (-1, x.ndim - 1):
                x = padding.real(x, feed)
            rows = np.moveaxis(x, self.feature_axis, -1).reshape(-1, x.shape[self.feature_axis])
        else:
            rows = im2col(x, **self.conv, positions=self.positions)
        if self.kind == Kind.DEPTHWISE:
            rows = rows.reshape(len(rows), x.shape[1], -1)
        # One copy into the result (these copies bound the refit of a CNN), checked element by
        # element (half the time of a float64 sum).
        out = np.empty((*rows.shape[:-1], rows.shape[-1] + 1), np.float32)
        out[..., :-1] = rows
        out[..., -1] = 1
        if not np.isfinite(out).all():
            raise CalibrationError(
                f"'{self.node}' reads NaN or infinite values on the calibration data: no "
                "statistics from those (prune with --importance l2 --no-compensate)"
            )
        return out

    def output_rows(self, y: np.ndarray, feed: dict | None = None) -> np.ndarray:
        """Rows of an output-shaped tensor at the positions `features` samples: (samples,
        channels)."""
        if self.kind == Kind.DENSE:
            if feed is not None and self.feature_axis in (-1, y.ndim - 1):
                y = padding.real(y, feed)
            return y.reshape(-1, y.shape[-1]).astype(np.float32)
        flat = y.reshape(y.shape[0], y.shape[1], -1)
        total = flat.shape[2]
        step = max(1, -(-total // self.positions))
        return (
            np.ascontiguousarray(flat[:, :, np.arange(0, total, step)].transpose(0, 2, 1))
            .reshape(-1, y.shape[1])
            .astype(np.float32)
        )

    def node_in(self, model: ir.Model) -> ir.Node | None:
        """Its node in `model` (a copy of the model it was found in); None where the weight is
        gone or has other readers."""
        value = model.graph.initializers.get(self.weight)
        if value is None:
            return None
        uses = [u.node for u in value.uses() if u.idx == 1]
        return uses[0] if len(uses) == 1 else None

    def matrix(self, weight: np.ndarray) -> np.ndarray:
        """The weight as (outputs, features), features in the order of `features`."""
        w = np.moveaxis(weight, (self.out_axis, self.in_axis), (0, 1))
        return w.reshape(w.shape[0], -1)

    def unmatrix(self, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        moved = np.moveaxis(
            np.empty(shape, dtype=np.float32), (self.out_axis, self.in_axis), (0, 1)
        ).shape
        return np.moveaxis(matrix.reshape(moved), (0, 1), (self.out_axis, self.in_axis))


# A consumer's statistics are features x features float64 matrices, several alive at once (the
# sums, the inverse and the greedy OBS copies, the refit's products). Wider than this (a 1 GiB
# matrix), a layer is neither scored nor refit from them; the refit corrects its bias for the mean
# of its inputs instead. VGG-16's classifier reads 25,088 features: its calibrated prune was killed
# at 24 GB.
MAX_WIDTH = 11_585


# Conv statistics use the same evenly spaced output positions of every sample, at most this many:
# bounded cost, and the sums do not depend on how samples are split into batches.
POSITIONS_PER_SAMPLE = 32
# A depthwise conv fits each channel from its own patch (a 5x5 kernel: 26 unknowns), so fewer
# positions suffice: its patches of every channel were most of EfficientNet-Lite0's refit time.
# Measured there (agreement at 0.9 / 0.8 of the MACs, calibrated): 32 positions 0.902 / 0.703 in
# 91 / 81 s, 16 positions 0.892 / 0.703 in 69 / 69 s, 8 positions 0.910 / 0.693 (top-1 0.80 ->
# 0.65).
DEPTHWISE_POSITIONS = 16


def im2col(
    x: np.ndarray,
    kernel: list[int],
    strides: list[int],
    pads: list[int],
    dilations: list[int],
    positions: int | None = None,
) -> np.ndarray:
    """Conv input patches (N, C, *spatial) -> (N * positions, C * prod(kernel)), channel-major.

    Only the chosen output positions are gathered (no padded copy of the whole input): each
    patch element's input index, clamped into the input, and zero where it falls in the padding."""
    dims = len(kernel)
    size = x.shape[2:]
    out = [
        (size[i] + pads[i] + pads[i + dims] - ((kernel[i] - 1) * dilations[i] + 1)) // strides[i]
        + 1
        for i in range(dims)
    ]
    total = math.prod(out)
    step = max(1, -(-total // positions)) if positions else 1
    chosen = np.unravel_index(np.arange(0, total, step), out)  # per dim: (P,)
    offsets = np.unravel_index(np.arange(math.prod(kernel)), kernel)  # per dim: (K,)
    index, inside = np.zeros((len(chosen[0]), math.prod(kernel)), dtype=np.int64), True
    for i in range(dims):
        # (P, K)
        at = chosen[i][:, None] * strides[i] - pads[i] + offsets[i][None, :] * dilations[i]
        inside = inside & (at >= 0) & (at < size[i])
        index = index * size[i] + np.clip(at, 0, size[i] - 1)
    n, c = x.shape[:2]
    patches = x.reshape(n, c, -1)[:, :, index]  # (N, C, P, K)
    if not np.all(inside):
        np.multiply(patches, inside, out=patches)
    return np.ascontiguousarray(patches.transpose(0, 2, 1, 3)).reshape(-1, c * math.prod(kernel))


def consumers(model: ir.Model) -> list[Consumer]:
    found = []
    for node in model.graph:
        if not is_default_domain(node) or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if (
            w is None
            or w.const_value is None
            or x is None
            or x.const_value is not None
            or not w.name
        ):
            continue
        shape = w.const_value.shape
        rank = len(shape)
        groups = node.attributes.get_int("group", 1)
        depthwise = groups > 1 and rank > 1 and shape[1] == 1
        if node.op_type == "Conv" and (groups == 1 or depthwise) and rank in (3, 4):
            kernel = list(shape[2:])
            dims = len(kernel)
            if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
                continue
            conv = {
                "kernel": kernel,
                "strides": list(node.attributes.get_ints("strides", [1] * dims)),
                "pads": list(node.attributes.get_ints("pads", [0] * 2 * dims)),
                "dilations": list(node.attributes.get_ints("dilations", [1] * dims)),
            }
            found.append(
                Consumer(
                    node.name,
                    x.name,
                    w.name,
                    Kind.DEPTHWISE if depthwise else Kind.CONV,
                    1,
                    0,
                    conv,
                    groups=groups,
                    width=shape[1] * math.prod(kernel),
                )
            )
        elif node.op_type == "Gemm" and rank == 2:
            trans_a, trans_b = (
                node.attributes.get_int("transA", 0),
                node.attributes.get_int("transB", 0),
            )
            found.append(
                Consumer(
                    node.name,
                    x.name,
                    w.name,
                    Kind.DENSE,
                    1 if trans_b else 0,
                    0 if trans_b else 1,
                    feature_axis=0 if trans_a else -1,
                    width=shape[1 if trans_b else 0],
                )
            )
        elif node.op_type == "MatMul" and rank == 2:
            found.append(Consumer(node.name, x.name, w.name, Kind.DENSE, 0, 1, width=shape[0]))
    return found


def feature_classes(
    analysis: Analysis, consumer: Consumer, weight_shape: tuple[int, ...]
) -> np.ndarray:
    """The class (root label) of every input feature of a consumer; 0 where none."""
    per_channel = np.zeros(weight_shape[consumer.in_axis], dtype=np.int64)
    for m in analysis.members_named(consumer.weight):
        if m.labels.shape[consumer.in_axis] > 1:
            per_channel = analysis.sets.find(m.labels.reshape(-1))
    return np.repeat(per_channel, consumer.columns_per_channel)


class Moments:
    """Running sums of a consumer's features: their count, and products with themselves or with
    another model's features at the same place (for fitting one model to the other). Features of
    shape (samples, blocks, size) give one product per block (a depthwise conv's channels).

    Rows wait in a buffer of up to BUFFER_BYTES and are multiplied together: a model with a fixed
    batch of 1 gives 32 rows per run, and products of 32 rows by thousands of features are bound by
    memory, not arithmetic (ResNet-18 at 224x224 with a fixed batch of 1: 88 s of products and sums
    became 15 s).

    The first mean asked for turns the sums into means in place, and the means come back
    read-only: no copy of a layer's moments per use (a 5,632-wide gram is 250 MB), and no rows may
    be added after."""

    def __init__(self) -> None:
        self.count = 0
        self._gram: np.ndarray | None = None  # sum of x x^T, or its mean once asked for
        self._cross: np.ndarray | None = None  # sum of x y^T, or its mean once asked for
        self._means = False
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._pending_bytes = 0

    def add(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        if self._means:
            raise RuntimeError("rows added to moments whose means were read")
        self.count += len(x)
        self._pending.append((x, y))
        self._pending_bytes += x.nbytes + (y.nbytes if y is not None else 0)
        if self._pending_bytes >= BUFFER_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        xs, ys = zip(*self._pending)
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        self._gram = _accumulate(self._gram, _products(x, x))
        if ys[0] is not None:
            self._cross = _accumulate(
                self._cross, _products(x, ys[0] if len(ys) == 1 else np.concatenate(ys))
            )
        self._pending, self._pending_bytes = [], 0
        if not (
            np.isfinite(self._gram).all()
            and (self._cross is None or np.isfinite(self._cross).all())
        ):
            raise CalibrationError(
                "activations on the calibration data overflow float32 statistics (prune with "
                "--importance l2 --no-compensate)"
            )

    def mean_gram(self) -> np.ndarray:
        self._to_means()
        return self._gram

    def mean_cross(self) -> np.ndarray:
        self._to_means()
        return self._cross

    def _to_means(self) -> None:
        if self._means:
            return
        self._flush()
        for sums in (self._gram, self._cross):
            if sums is not None:
                sums /= max(self.count, 1)
                sums.flags.writeable = False
        self._means = True

    def release(self) -> None:
        """Free the sums (their reader is done with them)."""
        self._gram = self._cross = None
        self._pending = []


class Means:
    """What a consumer too wide for Moments keeps (Consumer.wide): the means of its features and of
    their squares (the diagonal of its second moments), and the means of another model's features
    at the same place."""

    def __init__(self) -> None:
        self.count = 0
        self._sums: list[np.ndarray] | None = None

    def add(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        self.count += len(x)
        x = x.astype(np.float64)
        sums = [
            x.sum(axis=0),
            np.square(x).sum(axis=0),
            (x if y is None else y).sum(axis=0, dtype=np.float64),
        ]
        self._sums = sums if self._sums is None else [a + b for a, b in zip(self._sums, sums)]

    def mean(self) -> np.ndarray:
        return self._sums[0] / max(self.count, 1)

    def mean_square(self) -> np.ndarray:
        return self._sums[1] / max(self.count, 1)

    def mean_other(self) -> np.ndarray:
        return self._sums[2] / max(self.count, 1)


BUFFER_BYTES = 8 << 20  # per consumer: collect holds every consumer's buffer at once


def _products(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x^T y in float32, per block for 3-D features (overflow is checked on the sums).

    Large products are cut into tiles of PRODUCT_TILE x PRODUCT_TILE outputs, computed on every
    core by single-threaded BLAS (numpy lets go of the GIL): the tiles do not depend on the core
    count, so neither do the bits (spa.statistics.one_blas_thread). x^T x computes its upper tiles
    only and mirrors them."""
    with np.errstate(over="ignore", invalid="ignore"):
        if x.ndim != 2:
            return np.matmul(x.transpose(1, 2, 0), y.transpose(1, 0, 2))
        rows, cols = _tiles(x.shape[1]), _tiles(y.shape[1])
        if len(rows) * len(cols) == 1:
            return x.T @ y
        symmetric = y is x
        out = np.empty((x.shape[1], y.shape[1]), dtype=np.result_type(x, y))
        tasks = [(r, c) for r in rows for c in cols if not symmetric or c.start >= r.start]

        def tile(task: tuple[slice, slice]) -> None:
            r, c = task
            with np.errstate(over="ignore", invalid="ignore"):  # per thread: not the caller's
                out[r, c] = x[:, r].T @ y[:, c]

        for _ in pool().map(tile, tasks):
            pass
        if symmetric:
            for r, c in tasks:
                if c.start > r.start:
                    out[c, r] = out[r, c].T
        return out


PRODUCT_TILE = 256


def _tiles(size: int) -> list[slice]:
    return [slice(i, min(i + PRODUCT_TILE, size)) for i in range(0, size, PRODUCT_TILE)]


@functools.cache
def pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for numpy work that lets go of the GIL (products, solves), one per core."""
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=os.cpu_count() or 1, thread_name_prefix="spa-numpy"
    )


def _accumulate(total: np.ndarray | None, product: np.ndarray) -> np.ndarray:
    """Sums in float64, added in place: a fresh float64 copy of a large Gram matrix per batch costs
    more than the product itself (4608 features: 0.4 s against 0.12 s)."""
    if total is None:
        total = np.zeros(product.shape, dtype=np.float64)
    np.add(total, product, out=total)
    return total


def one_blas_thread(fn):
    """Run `fn` with BLAS on one thread, for the same bytes on every machine. OpenBLAS takes other
    kernels on one thread than on several: x^T y, W C^T and np.linalg.solve differ in the last
    bits between 1 and 2 threads (they agree from 2 to 8), and the refit carries that on through
    depth (measured: up to 4e-4 relative in written weights); its default is a thread per core. One
    thread is a count every machine has, and measured no slower on a shared 2-core machine.
    OPENBLAS_NUM_THREADS cannot do this: OpenBLAS reads it once, when numpy loads it."""

    @functools.wraps(fn)
    def pinned(*args, **kwargs):
        with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return pinned


@one_blas_thread
def collect(
    model: ir.Model, found: list[Consumer], feeds: list[dict], label: str = "statistics"
) -> dict[str, Moments | Means] | Along:
    """Second moments of every consumer's features (Means of the wide ones), per weight name,
    consumers that read the same features sharing one: in one pass over the calibration batches
    where they fit in STATISTICS_BYTES together, else layer by layer as they are asked for
    (`Along`)."""
    shared = {c.reads: c for c in found}  # one consumer per distinct features
    if sum(_statistics_bytes(c) for c in shared.values()) > STATISTICS_BYTES:
        return Along(model, found, feeds)
    run = exposing(model, sorted({c.input for c in found}))
    moments = {key: Means() if c.wide else Moments() for key, c in shared.items()}
    rows = _rows_per_run(model, run, feeds[0]) if feeds else 0
    bar = Progress(len(feeds), label)
    for i, feed in enumerate(feeds):
        for part in parts(feed, rows):
            values = run(part)
            for key, c in shared.items():
                moments[key].add(c.features(values[c.input], part))
            del values
        bar.update(i + 1)
    bar.close()
    return {c.weight: moments[c.reads] for c in found}


# What the statistics of every layer may take at once. A LLaMA-style model with hidden 2048, 16
# layers and an FFN of 5632 holds 4.6 GB of float64 moments for its output and down projections
# alone (1.3x its weights); a 7B model's would be 45 GB.
STATISTICS_BYTES = 1 << 30


def _statistics_bytes(consumer: Consumer) -> int:
    features = consumer.width + 1
    return 8 * (3 * features if consumer.wide else features * features)


class Along:
    """The statistics of each consumer, collected when they are first asked for, by running the
    model forward along the graph (`Forward`): asked in graph order, with each released when its
    reader is done (`Moments.release`), only the layers in hand hold statistics, at the cost of
    running the model in steps. Asking for a layer collects every layer before it first, so that
    the model only ever runs forward."""

    def __init__(self, model: ir.Model, found: list[Consumer], feeds: list[dict]):
        self.forward = Forward(model, feeds)
        self.by_weight = {c.weight: c for c in found}
        position = {v.name: i for i, n in enumerate(model.graph) for v in n.outputs}
        # one consumer per distinct features, in the graph order of what they read
        shared = {c.reads: c for c in found}
        self.order = sorted(shared.values(), key=lambda c: position.get(c.input, -1))
        self.made: dict[tuple, Moments | Means] = {}
        self.bar = Progress(len(self.order), "statistics, layer by layer")

    def __getitem__(self, weight: str) -> Moments | Means:
        wanted = self.by_weight[weight].reads
        for c in self.order[len(self.made) :]:
            if wanted in self.made:
                break
            moments = Means() if c.wide else Moments()
            for x, feed in zip(self.forward.values(c.input), self.forward.feeds):
                moments.add(c.features(x, feed))
            self.made[c.reads] = moments
            self.bar.update(len(self.made))
        if len(self.made) == len(self.order):
            self.bar.close()
        return self.made[wanted]


def _rows_per_run(model: ir.Model, run, feed: dict) -> int:
    """Samples per statistics run (0: the whole feed), measured on the feed's first sample: the
    exposed values stay alive together, in onnxruntime's arena, then as arrays, then as features
    (SmolLM2-135M exposes 50 MB per 128-token window; a batch of 32 windows peaked at 9.3 GB). A
    model that fixes its batch size runs whole feeds."""
    if samples(feed) <= 1 or any(
        v.shape is None or not v.shape or isinstance(v.shape[0], int) for v in model.graph.inputs
    ):
        return 0
    probe = run({k: v[:1] for k, v in feed.items()})
    return rows_per_run(sum(getattr(v, "nbytes", 0) for v in probe.values()))


def exposing(model: ir.Model, names: list[str]):
    """A function feed -> {name: value} for intermediate values (graph inputs come from the
    feed)."""
    produced = {v.name: v for n in model.graph for v in n.outputs if v.name}
    wanted = [n for n in names if n in produced]
    outputs = list(model.graph.outputs)
    sess = None
    if wanted:
        try:  # the wanted values become the only outputs, and the session runs what they need
            model.graph.outputs.clear()
            model.graph.outputs.extend(produced[n] for n in wanted)
            sess = _open(model, only_for=wanted)
        finally:
            model.graph.outputs.clear()
            model.graph.outputs.extend(outputs)

    def run(feed: dict) -> dict[str, np.ndarray]:
        values = dict(zip(wanted, _run(sess, wanted, feed))) if sess is not None else {}
        values.update({n: feed[n] for n in names if n in feed})
        return values

    return run


class Forward:
    """Runs a model forward on every calibration feed, to one value after another in graph order,
    each node once: a step runs the nodes between the last value and the next, as a model of its
    own whose inputs are the values kept from earlier steps (those that later nodes read). Nodes
    are read when their step runs, so a refit of later layers between steps takes effect.

    Running a prefix of the model for every value instead costs a pass per value (ResNet-18 at
    224x224: a refit of 141 s, against 20 s this way). The kept values of every feed live in memory;
    past KEPT_BYTES, for a value asked out of order, or where a step's model does not run on its
    own, it runs prefixes, feed by feed, from then on (a failure there is the model's)."""

    def __init__(self, model: ir.Model, feeds: list[dict]):
        self.model, self.feeds = model, feeds
        self.done = 0  # nodes run so far, in graph order
        self.kept: dict[str, list] | None = {}  # value name -> one array per feed; None: prefixes
        self.cut: dict[str, ir.Value] = {}  # value name -> the value kept

    def values(self, name: str):
        """`name` on every feed, in feed order."""
        if name in self.feeds[0]:
            return [feed[name] for feed in self.feeds]
        if self.kept is not None and name not in self.kept:
            self._step_to(name)
        if self.kept is not None and name in self.kept:
            return self.kept[name]
        run = exposing(self.model, [name])
        return (run(feed)[name] for feed in self.feeds)

    def advance(self, index: int) -> bool:
        """Run the nodes before graph position `index`; whether the values they leave for the rest
        (`cut`, `kept`) are at hand."""
        if self.kept is not None and index > self.done:
            self._step(index - 1)
        return self.kept is not None and self.done == index

    def _step_to(self, name: str) -> None:
        nodes = list(self.model.graph)
        end = next(
            (
                i
                for i in range(self.done, len(nodes))
                if any(v.name == name for v in nodes[i].outputs)
            ),
            None,
        )
        if end is not None:  # else made before the last step and not kept: run its prefix
            self._step(end, name)

    def _step(self, end: int, name: str | None = None) -> None:
        """Run the nodes up to graph position `end`, keeping what later nodes read (and `name`)."""
        nodes = list(self.model.graph)
        later = set().union(*(reads(n) for n in nodes[end + 1 :]))
        produced = [
            v
            for n in nodes[self.done : end + 1]
            for v in n.outputs
            if v.name in later or v.name == name
        ]
        kept = self._run_step(produced)
        if kept is not None:
            kept.update({n: v for n, v in self.kept.items() if n in later})
            self.cut = {
                n: v for n, v in {**self.cut, **{v.name: v for v in produced}}.items() if n in kept
            }
            self.done = end + 1
        self.kept = kept

    def _run_step(self, produced: list[ir.Value]) -> dict[str, list] | None:
        """`produced` on every feed, from the kept values; None where the step does not run on its
        own (an untyped value at the cut) or what it would keep passes KEPT_BYTES."""
        inputs = [self.cut[n] for n in self.kept] + [
            v for v in self.model.graph.inputs if v.name not in self.model.graph.initializers
        ]
        names = [v.name for v in produced]
        kept = {n: [] for n in names}
        held = sum(getattr(a, "nbytes", 0) for arrays in self.kept.values() for a in arrays)
        try:
            graph = ir.convenience.extract(self.model.graph, inputs, produced)
            # a graph output read later keeps its declared shape: drop it
            for value in graph.inputs:
                if value.name in self.kept:
                    value.shape = None
            step = _open(
                ir.Model(
                    graph,
                    ir_version=self.model.ir_version,
                    functions=list(self.model.functions.values()),
                )
            )
            needed = [i.name for i in step.get_inputs()]
            for i, feed in enumerate(self.feeds):
                outputs = _run(
                    step, names, {n: self.kept[n][i] if n in self.kept else feed[n] for n in needed}
                )
                for n, out in zip(names, outputs):
                    kept[n].append(out)
                held += sum(getattr(out, "nbytes", 0) for out in outputs)
                if held > KEPT_BYTES:
                    return None
        except (ValueError, CalibrationError):
            return None
        return kept


KEPT_BYTES = 2 << 30  # per model: the refit steps two (original and pruned)


def reads(node: ir.Node) -> set[str]:
    """Names of the values a node reads, those its subgraphs read from outside included."""
    names = {v.name for v in node.inputs if v is not None}
    for attr in node.attributes.values():
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            for graph in [attr.value] if attr.type == ir.AttributeType.GRAPH else attr.value:
                names |= {
                    v.name
                    for inner in ir.traversal.RecursiveGraphIterator(graph)
                    for v in inner.inputs
                    if v is not None
                }
    return names


# On every core (0): nothing else runs meanwhile. The statistics do not depend on it: onnxruntime's
# CPU kernels split work over outputs, never over one sum (measured: every intermediate value of 8
# models, and reductions, softmax and matmuls over 262,144 elements, bit for bit the same on 1 to 8
# threads; tests/test_determinism.py holds it to that).
SESSION_THREADS = 0


def _open(model: ir.Model, only_for: list[str] | None = None):
    try:
        return session(model, threads=SESSION_THREADS, only_for=only_for)
    except Exception as e:  # onnxruntime raises untyped errors
        raise CalibrationError(
            f"onnxruntime cannot open the model for calibration: {first_line(e)}"
        ) from None


def _run(sess, names: list[str], feed: dict) -> list:
    try:
        return sess.run(names, feed)
    except Exception as e:  # onnxruntime raises untyped errors
        raise CalibrationError(
            f"onnxruntime fails to run the model on the calibration data: {first_line(e)}"
        ) from None


def batchnorm_means(model: ir.Model, found: list[Consumer]) -> dict[str, np.ndarray]:
    """Data-free: the mean of every input channel of the consumers that read a BatchNormalization,
    directly or through one Relu or Clip. In inference a BN outputs gamma (y - mu) / sigma + beta,
    whose distribution over the training data has mean beta and standard deviation |gamma|; taken
    as Gaussian, a Relu or Clip of it has a closed-form mean. Per weight name, one mean per input
    channel; consumers that read anything else are not in the result."""
    means = {}
    producers = {v.name: n for n in model.graph for v in n.outputs if v.name}
    for c in found:
        if c.kind == Kind.DEPTHWISE:  # loses its outputs with its inputs: nothing to absorb
            continue
        node = producers.get(c.input)
        bounds = (-np.inf, np.inf)
        if node is not None and node.op_type in ("Relu", "Clip"):
            bounds = _clip_bounds(node)
            node = node.inputs[0].producer() if node.inputs[0] is not None else None
        if (
            node is None
            or node.op_type != "BatchNormalization"
            or len(node.outputs) != 1
            or np.isnan(bounds).any()
        ):
            continue
        gamma, beta = (
            node.inputs[i].const_value if node.inputs[i] is not None else None for i in (1, 2)
        )
        if gamma is None or beta is None:
            continue
        # BN's channels are axis 1 of its input; a dense consumer reads features on another axis
        # unless that input is (samples, channels).
        rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else None
        if c.kind == Kind.DENSE and (rank != 2 or c.feature_axis not in (-1, 1)):
            continue
        means[c.weight] = _clipped_gaussian_mean(
            beta.numpy().astype(np.float64), np.abs(gamma.numpy().astype(np.float64)), *bounds
        )
    return means


def _clip_bounds(node: ir.Node) -> tuple[float, float]:
    if node.op_type == "Relu":
        return 0.0, np.inf
    low = node.attributes.get_float("min", -np.inf)
    high = node.attributes.get_float("max", np.inf)
    for i in (1, 2):
        bound = node.inputs[i] if len(node.inputs) > i else None
        if bound is not None:
            if bound.const_value is None:
                return np.nan, np.nan  # a bound only known at run time: no closed form
            value = float(bound.const_value.numpy())
            low, high = (value, high) if i == 1 else (low, value)
    return low, high


def _clipped_gaussian_mean(
    mu: np.ndarray, sigma: np.ndarray, low: float, high: float
) -> np.ndarray:
    """E[clip(z, low, high)] for z ~ N(mu, sigma^2), per channel."""
    sigma = np.maximum(sigma, 1e-12)
    erf = np.vectorize(math.erf)

    def cdf(t):
        return 0.5 * (1 + erf(t / math.sqrt(2)))

    def pdf(t):
        return np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)

    a, b = (low - mu) / sigma, (high - mu) / sigma
    below = low * cdf(a) if np.isfinite(low) else 0.0
    above = high * (1 - cdf(b)) if np.isfinite(high) else 0.0
    return below + above + mu * (cdf(b) - cdf(a)) + sigma * (pdf(a) - pdf(b))
