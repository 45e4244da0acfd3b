"""Train small scikit-learn MLPs on the bundled digits data and export them with skl2onnx.

Writes to ``{out}`` (default ``models/sklearn``):

* ``mlp_relu.onnx`` -- ``MLPClassifier(hidden_layer_sizes=(64, 32),
  activation="relu")``;
* ``mlp_tanh3.onnx`` -- ``MLPClassifier(hidden_layer_sizes=(64, 48, 32),
  activation="tanh")``, three hidden layers;
* ``mlp_logistic3.onnx`` -- same shape with ``activation="logistic"``;
* ``pipeline_scaler_mlp.onnx`` -- ``Pipeline(StandardScaler(),
  MLPClassifier((64, 32), relu))`` on the raw 0..16 pixels (the scaler
  becomes an ``ai.onnx.ml`` ``Scaler`` node);
* ``mlp_regressor.onnx`` -- ``MLPRegressor(hidden_layer_sizes=(64, 32))``
  predicting the digit value 0..9 as a float;
* ``reference.npz`` -- the test inputs ``X_test`` (float32, 360 x 64), the
  labels ``y_test`` and, per model NAME, scikit-learn's own outputs
  ``NAME.label`` / ``NAME.probabilities`` (classifiers) or
  ``NAME.variable`` (regressor), so that the ONNX files can be compared
  with scikit-learn in an environment without scikit-learn.

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, shipped with
scikit-learn, no download), split 80/20 with ``random_state=0``, stratified.
The classifiers other than the pipeline see the pixels divided by 16.

Every graph has one input ``input``: float32, shape ``(N, 64)`` with a
dynamic batch dimension ``N`` (skl2onnx writes it as an anonymous dim:
neither ``dim_value`` nor ``dim_param`` set). Classifiers are exported with
``zipmap=False``, so their outputs are ``label`` (int64, ``(N,)``) and
``probabilities`` (float32, ``(N, 10)``) instead of a sequence of maps; the
regressor's output is ``variable`` (float32, ``(N, 1)``). Opsets: ``""`` 18
(pinned via ``target_opset``); skl2onnx records ``ai.onnx.ml`` 1 for the
classifiers (the lowest that their ops need) and 3 for the regressor, which
uses no ``ai.onnx.ml`` op. The files keep skl2onnx's fingerprint:
``producer_name == "skl2onnx"``, a float->float ``Cast`` on the input,
``MatMul`` + ``Add`` per dense layer (weights ``coefficient*`` /
``intercepts*`` of shape (1, n)), ``Softmax`` -> ``Identity`` ->
``probabilities`` (a graph output that ``ArgMax`` also consumes), then
``ai.onnx.ml.ArrayFeatureExtractor`` on the ``classes`` initializer +
``Reshape`` + ``Cast`` for the int64 ``label``, and an ``ai.onnx.ml.Scaler``
node for the StandardScaler.

After each export the file is checked with
``onnx.checker.check_model(path, full_check=True)`` and run in onnxruntime
on the test set; the max abs difference to scikit-learn's probabilities
(or regression outputs) must be < 1e-4 and the labels must agree.

Usage (in a venv outside the repository, not the project's environment)::

    python -m venv /work/venvs/skl
    /work/venvs/skl/bin/pip install scikit-learn==1.9.1 skl2onnx==1.20.0 \
        onnxruntime==1.32.0
    # pulls onnx 1.23.2, numpy 2.4.6, protobuf 7.36.2; without onnxruntime
    # the comparison with scikit-learn is skipped (the checker still runs)
    /work/venvs/skl/bin/python scripts/export_sklearn.py [--out models/sklearn]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np
import onnx
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import r2_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

TARGET_OPSET = {"": 18, "ai.onnx.ml": 3}
SEED = 0


def build_models():
    """Return [(name, estimator, kind, scaled_input)]: kind is 'clf' or 'reg'."""
    return [
        (
            "mlp_relu",
            MLPClassifier(
                hidden_layer_sizes=(64, 32), activation="relu", max_iter=400, random_state=SEED
            ),
            "clf",
            True,
        ),
        (
            "mlp_tanh3",
            MLPClassifier(
                hidden_layer_sizes=(64, 48, 32), activation="tanh", max_iter=400, random_state=SEED
            ),
            "clf",
            True,
        ),
        (
            "mlp_logistic3",
            MLPClassifier(
                hidden_layer_sizes=(64, 48, 32),
                activation="logistic",
                max_iter=800,
                random_state=SEED,
            ),
            "clf",
            True,
        ),
        (
            "pipeline_scaler_mlp",
            Pipeline(
                [
                    ("scaler", StandardScaler()),
                    (
                        "mlp",
                        MLPClassifier(
                            hidden_layer_sizes=(64, 32),
                            activation="relu",
                            max_iter=400,
                            random_state=SEED,
                        ),
                    ),
                ]
            ),
            "clf",
            False,
        ),
        (
            "mlp_regressor",
            MLPRegressor(
                hidden_layer_sizes=(64, 32), activation="relu", max_iter=800, random_state=SEED
            ),
            "reg",
            True,
        ),
    ]


def run_onnx(path: str, x: np.ndarray) -> dict[str, np.ndarray] | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"input": x})))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="models/sklearn")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=SEED, stratify=y
    )
    ref: dict[str, np.ndarray] = {"X_test": x_test, "y_test": y_test}
    failed = False

    for name, model, kind, scaled in build_models():
        xtr = x_train / 16.0 if scaled else x_train
        xte = (x_test / 16.0).astype(np.float32) if scaled else x_test
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if kind == "clf":
                model.fit(xtr, y_train)
            else:
                model.fit(xtr, y_train.astype(np.float32))
        # The ONNX graph takes the already scaled pixels for the 'scaled' models.
        ref[f"{name}.input"] = xte
        if kind == "clf":
            acc_tr = model.score(xtr, y_train)
            acc_te = model.score(xte, y_test)
            print(f"{name:22s} train acc {acc_tr:.4f}  test acc {acc_te:.4f}")
            ref[f"{name}.label"] = model.predict(xte).astype(np.int64)
            ref[f"{name}.probabilities"] = model.predict_proba(xte).astype(np.float32)
            options = {id(model): {"zipmap": False}}
        else:
            pred_tr = model.predict(xtr)
            pred_te = model.predict(xte)
            acc_tr = np.mean(np.clip(np.rint(pred_tr), 0, 9) == y_train)
            acc_te = np.mean(np.clip(np.rint(pred_te), 0, 9) == y_test)
            print(
                f"{name:22s} train R2 {r2_score(y_train, pred_tr):.4f}  "
                f"test R2 {r2_score(y_test, pred_te):.4f}  "
                f"(rounded acc train {acc_tr:.4f} test {acc_te:.4f})"
            )
            ref[f"{name}.variable"] = pred_te.astype(np.float32).reshape(-1, 1)
            options = None

        onx = to_onnx(
            model,
            initial_types=[("input", FloatTensorType([None, 64]))],
            target_opset=TARGET_OPSET,
            options=options,
        )
        onx.doc_string = (
            f"scikit-learn {type(model).__name__} trained on "
            f"sklearn.datasets.load_digits; exported by "
            f"scripts/export_sklearn.py"
        )
        path = os.path.join(args.out, f"{name}.onnx")
        onnx.save(onx, path)
        onnx.checker.check_model(path, full_check=True)

        got = run_onnx(path, xte)
        if got is None:
            print(f"  wrote {path} (onnxruntime not installed: not compared)")
            continue
        if kind == "clf":
            diff = float(np.max(np.abs(got["probabilities"] - ref[f"{name}.probabilities"])))
            same = bool(np.array_equal(got["label"], ref[f"{name}.label"]))
        else:
            diff = float(np.max(np.abs(got["variable"] - ref[f"{name}.variable"])))
            same = True
        ok = diff < 1e-4 and same
        failed |= not ok
        print(
            f"  wrote {path} ({os.path.getsize(path)} bytes); onnxruntime vs "
            f"sklearn max abs diff {diff:.2e}, labels equal {same} "
            f"-> {'OK' if ok else 'MISMATCH'}"
        )

    np.savez_compressed(os.path.join(args.out, "reference.npz"), **ref)
    print(f"wrote {os.path.join(args.out, 'reference.npz')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
