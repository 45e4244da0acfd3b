"""Calibration inputs: the user's arrays, files or quantization readers, or synthetic ones."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from spa.errors import SpaError
from spa.verify import random_inputs

BATCH = 32
SYNTHETIC_SAMPLES = 256


def batches(source, sess: ort.InferenceSession, input_shapes: dict[str, list[int]] | None = None, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Feeds for the calibration runs, BATCH samples each.

    source: a .npy file (one input) or .npz (keyed by input name); an array or a dict of arrays
    (samples along axis 0); an onnxruntime.quantization CalibrationDataReader (anything with
    get_next()); or "synthetic": standard normal noise at the model's input shapes, the data-free
    fallback (see the README for why noise, and what it costs).
    """
    names = [i.name for i in sess.get_inputs()]
    if isinstance(source, str) and source == "synthetic":
        return _synthetic(sess, input_shapes, seed)
    if hasattr(source, "get_next"):
        feeds = []
        while (item := source.get_next()) is not None:
            feeds.append({n: np.asarray(item[n]) for n in names})
        if not feeds:
            raise SpaError("the calibration reader gave no data")
        return feeds
    if isinstance(source, (str, os.PathLike)):
        source = _load(Path(source), names)
    if isinstance(source, np.ndarray):
        if len(names) != 1:
            raise SpaError(f"one calibration array for a model with {len(names)} inputs: pass a dict keyed by input name")
        source = {names[0]: source}
    missing = set(names) - set(source)
    if missing:
        raise SpaError(f"calibration data has no array for input(s) {sorted(missing)}")
    count = len(next(iter(source.values())))
    return [{n: np.asarray(source[n][i : i + BATCH]) for n in names} for i in range(0, count, BATCH)]


def _load(path: Path, names: list[str]) -> dict[str, np.ndarray] | np.ndarray:
    if not path.is_file():
        raise SpaError(f"--calibration {path}: no such file")
    try:
        if path.suffix == ".npy":
            return np.load(path)
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise SpaError(f"--calibration {path}: cannot read it ({e})") from None


def _synthetic(sess: ort.InferenceSession, input_shapes, seed: int) -> list[dict[str, np.ndarray]]:
    feeds = []
    for i in range(SYNTHETIC_SAMPLES // BATCH):
        shapes = {a.name: [BATCH, *[d if isinstance(d, int) and d > 0 else 1 for d in a.shape[1:]]] for a in sess.get_inputs()}
        shapes.update({k: [BATCH, *v[1:]] for k, v in (input_shapes or {}).items()})
        feeds.append(random_inputs(sess, shapes, seed + i))
    return feeds
