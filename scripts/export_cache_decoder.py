"""Export a small decoder with a key/value cache to ONNX with both torch exporters.

A LLaMA-style decoder in plain torch (2 layers, hidden 64, 4 heads of 16, SwiGLU FFN of 128,
RMSNorm, rotary positions, vocabulary 256, random weights), written out the way optimum and ONNX
Runtime GenAI export decoders for generation: inputs ``input_ids`` (batch, sequence),
``position_ids`` (batch, sequence) and ``past_key_values.{i}.key`` / ``.value`` (batch, 4,
past, 16) per layer; outputs ``logits`` (batch, sequence, 256) and ``present.{i}.key`` /
``.value`` (batch, 4, past + sequence, 16), the new keys and values concatenated to the past
ones. Batch, sequence and past length are dynamic. Writes ``decoder_dynamo.onnx`` (+ ``.data``,
opset 18) and ``decoder_legacy.onnx`` (opset 17) into ``--out`` (default
``models/cache_decoder``), each checked with the full checker and against torch in onnxruntime.

The heads reach the graph's inputs and outputs through the cache: runtimes allocate the cache
from the head count in the model's config, so spa keeps them unless asked.

`--kv-heads 2` writes ``gqa_decoder_{dynamo,legacy}.onnx`` instead: grouped-query attention, 2
key/value heads in the cache, each repeated for 2 of the 4 query heads after the cache is
extended (transformers' repeat_kv). Its query heads can go without touching the cache.

    pip install torch==2.13.0 onnxscript
    python scripts/export_cache_decoder.py [--out models/cache_decoder] [--kv-heads 2]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from export_check import difference  # a sibling script
from torch import nn

LAYERS, HIDDEN, HEADS, FFN, VOCAB = 2, 64, 4, 128, 256
DIM = HIDDEN // HEADS
KV_HEADS = HEADS  # --kv-heads


class RMSNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(HIDDEN) + 0.5)

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def rotate(x, position_ids):
    """Rotary position embedding over each head's dims."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM))
    angles = position_ids[:, None, :, None].float() * inv_freq  # (batch, 1, sequence, DIM / 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def repeat_kv(x):
    """Each key/value head once for each of its query heads, as transformers writes it."""
    batch, kv, length, dim = x.shape
    if kv == HEADS:
        return x
    x = x[:, :, None, :, :].expand(batch, kv, HEADS // kv, length, dim)
    return x.reshape(batch, HEADS, length, dim)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(), RMSNorm()
        self.q, self.o = (nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(2))
        self.k, self.v = (nn.Linear(HIDDEN, KV_HEADS * DIM, bias=False) for _ in range(2))
        self.gate, self.up = nn.Linear(HIDDEN, FFN, bias=False), nn.Linear(HIDDEN, FFN, bias=False)
        self.down = nn.Linear(FFN, HIDDEN, bias=False)

    def heads(self, x, count=HEADS):
        return x.view(x.shape[0], x.shape[1], count, DIM).transpose(1, 2)

    def forward(self, x, position_ids, past_key, past_value):
        h = self.norm1(x)
        q = rotate(self.heads(self.q(h)), position_ids)
        new_key = rotate(self.heads(self.k(h), KV_HEADS), position_ids)
        key = torch.cat([past_key, new_key], dim=2)
        value = torch.cat([past_value, self.heads(self.v(h), KV_HEADS)], dim=2)
        past, sequence = past_key.shape[2], x.shape[1]
        # causal over the past and the new positions
        mask = torch.ones(sequence, past + sequence, dtype=torch.bool).tril(diagonal=past)
        scores = (q @ repeat_kv(key).transpose(-1, -2)) / DIM**0.5
        scores = scores.masked_fill(~mask, float("-inf"))
        context = (scores.softmax(-1) @ repeat_kv(value)).transpose(1, 2).reshape(x.shape)
        x = x + self.o(context)
        h = self.norm2(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h)), key, value


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.norm = RMSNorm()
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, position_ids, *past):
        x, present = self.embed(input_ids), []
        for i, layer in enumerate(self.layers):
            x, key, value = layer(x, position_ids, past[2 * i], past[2 * i + 1])
            present += [key, value]
        return (self.lm_head(self.norm(x)), *present)


def inputs(batch: int, sequence: int, past: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, sequence), generator=g)
    positions = torch.arange(past, past + sequence).expand(batch, sequence)
    cache = [torch.randn(batch, KV_HEADS, past, DIM, generator=g) for _ in range(2 * LAYERS)]
    return (ids, positions, *cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models/cache_decoder"))
    parser.add_argument("--kv-heads", type=int, default=HEADS, help="key/value heads (GQA)")
    args = parser.parse_args()
    global KV_HEADS
    KV_HEADS = args.kv_heads
    prefix = "decoder" if KV_HEADS == HEADS else "gqa_decoder"
    args.out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = Decoder().eval()
    cache_names = [f"past_key_values.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    names = ["input_ids", "position_ids", *cache_names]
    for dynamo in (True, False):
        path = args.out / f"{prefix}_{'dynamo' if dynamo else 'legacy'}.onnx"
        if dynamo:
            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
            past = torch.export.Dim("past")
            tokens, cache = {0: batch, 1: sequence}, {0: batch, 2: past}
            # the structure of forward's arguments: the cache is one *args tuple
            shapes = (tokens, tokens, tuple(cache for _ in cache_names))
            options = {"dynamic_shapes": shapes, "opset_version": 18}
        else:
            axes = {n: {0: "batch", 1: "sequence"} for n in names[:2]}
            axes |= {n: {0: "batch", 2: "past"} for n in cache_names}
            axes |= {"logits": {0: "batch", 1: "sequence"}}
            axes |= {n: {0: "batch", 2: "total"} for n in present_names}
            options = {"dynamic_axes": axes, "opset_version": 17}
        torch.onnx.export(
            model,
            inputs(2, 3, 5, 0),
            str(path),
            input_names=names,
            output_names=["logits", *present_names],
            dynamo=dynamo,
            **options,
        )
        feeds = inputs(3, 2, 7, 1)
        with torch.no_grad():
            want = [w.numpy() for w in model(*feeds)]
        error = difference(path, {n: t.numpy() for n, t in zip(names, feeds)}, want)
        assert error < 1e-4, f"{path.name}: onnxruntime differs from torch by {error}"
        print(f"{path}: ok (max abs difference to torch {error:.1e})")


if __name__ == "__main__":
    main()
