"""Export a small diffusion UNet (diffusers' UNet2DModel) to ONNX with both torch exporters.

Writes ``unet_dynamo.onnx`` (+ ``.onnx.data``, opset 18) and ``unet_legacy.onnx`` (opset 17)
into ``--out`` (default ``models/diffusers``): a UNet2DModel of 16x16 RGB samples, blocks of 32
and 64 channels (a plain down block, an attention down block, their up blocks and the attention
mid block), one ResNet layer per block, GroupNorm of 8 groups, heads of 16, the sinusoidal time
embedding. Inputs ``sample`` float32 (batch, 3, 16, 16) and ``timestep`` int64 (batch,), output
``out`` (batch, 3, 16, 16); the batch is dynamic. Random weights (nothing is downloaded), the
GroupNorm scales and shifts randomized too: at their initial ones and zeros the dynamo exporter
would share one constant between every GroupNorm of a width, which ties those layers' channels
together. Each export is checked with the full checker and against torch in onnxruntime.

What spa has to follow there: GroupNorm written as Reshape to (N, groups, -1),
InstanceNormalization and a Reshape back to the input's run-time shape (whole groups go), the
attention heads, the time embedding added to every ResNet block, the skip connections concatenated
into the up blocks.

    pip install torch==2.13.0 onnxscript diffusers==0.42.1
    python scripts/export_diffusers.py [--out models/diffusers]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from diffusers import UNet2DModel
from export_check import difference  # a sibling script


class Sample(torch.nn.Module):
    """The UNet's output tensor alone (diffusers returns a dataclass)."""

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep):
        return self.unet(sample, timestep).sample


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
    )
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return Sample(unet).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models/diffusers"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    model = build()
    sample, timestep = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    names = {"input_names": ["sample", "timestep"], "output_names": ["out"]}
    for dynamo in (True, False):
        path = args.out / f"unet_{'dynamo' if dynamo else 'legacy'}.onnx"
        if dynamo:
            batch = torch.export.Dim("batch")
            options = {"dynamic_shapes": ({0: batch}, {0: batch}), "opset_version": 18}
        else:
            axes = {"sample": {0: "batch"}, "timestep": {0: "batch"}, "out": {0: "batch"}}
            options = {"dynamic_axes": axes, "opset_version": 17}
        torch.onnx.export(model, (sample, timestep), str(path), dynamo=dynamo, **names, **options)
        x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 250, 999])
        with torch.no_grad():
            want = model(x, t).numpy()
        error = difference(path, {"sample": x.numpy(), "timestep": t.numpy()}, [want])
        assert error < 1e-4, f"{path.name}: onnxruntime differs from torch by {error}"
        print(f"{path}: ok (max abs difference to torch {error:.1e})")


if __name__ == "__main__":
    main()
