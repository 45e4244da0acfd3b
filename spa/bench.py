"""Latency you can trust: onnxruntime on CPU, models interleaved in one loop.

Absolute milliseconds on a shared machine drift; running A, B, A, B, ... in one loop (alternating
the order every round) exposes every model to the same drift, so the ratio B/A holds even when the
absolute numbers do not.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from spa import io
from spa.errors import SpaError
from spa.progress import Progress
from spa.runtime import random_inputs, session, session_options


@dataclasses.dataclass
class Timing:
    name: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    ratio: float  # median / the first model's median


def load_inputs(path: str | os.PathLike, sess: ort.InferenceSession) -> dict[str, np.ndarray]:
    """`.npz` keyed by input name, or `.npy` for a model with one input."""
    path = Path(path)
    names = [i.name for i in sess.get_inputs()]
    feeds = io.load_arrays(path, "--inputs")
    if isinstance(feeds, np.ndarray):
        if len(names) != 1:
            raise SpaError(
                f"--inputs {path}: a .npy file feeds one input, the model has {len(names)}: use "
                ".npz"
            )
        return {names[0]: feeds}
    missing = set(names) - set(feeds)
    if missing:
        raise SpaError(f"--inputs {path}: no array for input(s) {sorted(missing)}")
    return {n: feeds[n] for n in names}


def _timed_session(model, threads: int) -> ort.InferenceSession:
    """A file goes to onnxruntime as it is (it reads external data itself), with the graph
    optimizations and prepacked weights a deployment gets; in-memory models over spa.io's large
    threshold get a lean session (no optimizations), so time large models from files."""
    if isinstance(model, ir.Model):
        return session(model, threads=threads)
    loaded = io.load(model)  # the same checks and one-line errors as every command
    if not io.is_utf8(Path(model)):  # onnxruntime takes UTF-8 paths only
        return session(loaded, threads=threads)
    return ort.InferenceSession(
        str(model), session_options(threads), providers=["CPUExecutionProvider"]
    )


def _first_runs(
    sessions: list[ort.InferenceSession],
    names: list[str],
    feeds: list[dict[str, np.ndarray]],
    source: str,
) -> None:
    """Each model once on its feeds, before any timing: a model with other inputs than the first
    (names, types, shapes), or inputs of the wrong shape, get one line that names them."""
    for name, sess, feed in zip(names, sessions, feeds):
        shown = ", ".join(f"{k} {v.dtype} {list(v.shape)}" for k, v in feed.items())
        try:
            sess.run(None, feed)
        except Exception as e:  # onnxruntime raises untyped errors
            # its lines run on
            message = " ".join(str(e).split()).rstrip(".")[:300] or type(e).__name__
            raise SpaError(
                f"{name}: does not run on {source} ({shown}): {message}; spa bench compares models "
                "that take the same inputs"
            ) from None


def benchmark(
    models: list,
    names: list[str] | None = None,
    threads: int = 1,
    warmup: int = 5,
    runs: int | None = None,
    budget_s: float = 4.0,
    input_shapes: dict[str, list[int]] | None = None,
    inputs: str | os.PathLike | None = None,
    progress: bool = True,
    own_inputs: bool = False,
) -> list[Timing]:
    """Time each model (a path or an onnx_ir.Model) on the same inputs, interleaved.

    runs: rounds of the loop; by default as many as fit in about `budget_s` seconds (at least 10).
    own_inputs: random inputs made for each model's own signature (a decoder whose key/value
    cache lost heads, --prune-cache), the same values wherever the shapes agree.
    """
    if not models:
        raise SpaError("nothing to benchmark")
    if runs is not None and runs < 1:
        raise SpaError(f"--runs must be at least 1, got {runs}")
    if warmup < 0:
        raise SpaError(f"--warmup must be 0 or more, got {warmup}")
    sessions = [_timed_session(m, threads) for m in models]
    names = names or [
        str(m) if not isinstance(m, ir.Model) else f"model {i}" for i, m in enumerate(models)
    ]
    if inputs:
        feeds = [load_inputs(inputs, sessions[0])] * len(sessions)
    elif own_inputs:
        feeds = [random_inputs(sess, input_shapes) for sess in sessions]
    else:
        feeds = [random_inputs(sessions[0], input_shapes)] * len(sessions)
    source = f"--inputs {inputs}" if inputs else f"random inputs made for {names[0]}"
    _first_runs(sessions, names, feeds, source)
    for sess, feed in zip(sessions, feeds):
        for _ in range(warmup):
            sess.run(None, feed)
    if runs is None:
        start = time.perf_counter()
        for sess, feed in zip(sessions, feeds):
            sess.run(None, feed)
        one_round = time.perf_counter() - start
        runs = int(min(2000, max(10, budget_s / max(one_round, 1e-6))))
    samples = np.zeros((len(sessions), runs))
    bar = Progress(runs, "bench") if progress else None
    for r in range(runs):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            start = time.perf_counter_ns()
            sessions[i].run(None, feeds[i])
            samples[i, r] = (time.perf_counter_ns() - start) / 1e6
        if bar:
            bar.update(r + 1)
    if bar:
        bar.close()
    medians = np.median(samples, axis=1)
    return [
        Timing(
            name,
            float(medians[i]),
            float(np.percentile(samples[i], 10)),
            float(np.percentile(samples[i], 90)),
            runs,
            float(medians[i] / medians[0]),
        )
        for i, name in enumerate(names)
    ]


def table(timings: list[Timing], threads: int) -> str:
    width = max(len(t.name) for t in timings)
    lines = [
        f"{'model'.ljust(width)}  {'median ms':>10}  {'p10 ms':>9}  {'p90 ms':>9}  {'ratio':>6}"
    ]
    for t in timings:
        lines.append(
            f"{t.name.ljust(width)}  {t.median_ms:>10.3f}  {t.p10_ms:>9.3f}  {t.p90_ms:>9.3f}  "
            f"{t.ratio:>6.3f}"
        )
    lines.append(
        f"onnxruntime {ort.__version__}, CPU, {threads} intra-op thread(s), {timings[0].runs} "
        "interleaved rounds"
    )
    return "\n".join(lines)
