"""SPADE for meddiff's mask-conditioned UNet, as a benchmark variant (`masks.py --conditioning spade`): how much
a label map gains by reaching every layer, measured before the product takes it.

meddiff's mask conditioning gives the UNet the map as input channels beside x_t (`meddiff.model.with_cond`): the
map enters once, at the first convolution. SPADE (Park et al. 2019, "Semantic image synthesis with spatially-adaptive
normalization") lets it modulate every normalisation instead: after each group norm of every residual block, a
per-pixel scale and shift predicted from the map (scaled by area averaging to that block's resolution) by a small
convolutional head. Here SPADE is *added* to the input channels (the UNet still sees the map at its input), so the
comparison asks what the per-layer path adds. The heads' last convolutions start at zero: at step 0 the network is
exactly the input-channel one.

The UNet stays a diffusers `UNet2DModel` with SPADE modules swapped into its residual blocks; a forward pre-hook
reads the map's channels off the UNet's own input (the channels `with_cond` appended, space-to-depth undone), so
`meddiff train`, the samplers and guidance run it unchanged (the unconditional branch's zero channels are "no map"
for the heads too). Its weights are the run's own safetensors; `load_spade_run` rebuilds the architecture from the
run record before loading them, as `meddiff.runfolder` does for a plain run.

    python benchmarks/_spade.py train --data 'builtin:phantoms?n=1200&masks=1' --size 64 --out runs/spade …
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

HIDDEN = 32  # channels of each head's shared convolution


class SpadeGroupNorm(nn.Module):
    """A residual block's group norm followed by the map's per-pixel scale and shift: norm(x) (1 + γ(m)) + β(m)."""

    def __init__(self, norm: nn.GroupNorm, map_channels: int, context: dict[str, Any]) -> None:
        super().__init__()
        self.norm, self.context = norm, context
        self.shared = nn.Sequential(nn.Conv2d(map_channels, HIDDEN, 3, padding=1), nn.SiLU())
        self.scale = nn.Conv2d(HIDDEN, norm.num_channels, 3, padding=1)
        self.shift = nn.Conv2d(HIDDEN, norm.num_channels, 3, padding=1)
        for conv in (self.scale, self.shift):  # start as the plain network
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = F.adaptive_avg_pool2d(self.context["map"].to(x.dtype), x.shape[-2:])
        h = self.shared(m)
        return self.norm(x) * (1 + self.scale(h)) + self.shift(h)


def _read_map(unet: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: the map's channels of this call's input, full size, into the UNet's SPADE context."""
    ctx = unet.spade_context
    sample = args[0] if args else kwargs["sample"]
    ctx["map"] = F.pixel_shuffle(sample[:, ctx["image_channels"]:], ctx["patch"]) if ctx["patch"] > 1 \
        else sample[:, ctx["image_channels"]:]


def add_spade(unet: nn.Module, model: Any) -> nn.Module:
    """Swap a SpadeGroupNorm into both norms of every residual block of a mask-conditioned UNet (`ModelConfig`
    with cond_channels); the heads read the map the UNet's input carries. A deep copy (the EMA) reads its own."""
    from diffusers.models.resnet import ResnetBlock2D

    if not model.cond_channels:
        raise ValueError("SPADE needs a model conditioned on label maps (cond_channels > 0)")
    p = model.patch_size
    unet.spade_context = {"image_channels": model.in_channels * p * p, "patch": p, "map": None}
    for block in [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]:
        block.norm1 = SpadeGroupNorm(block.norm1, model.cond_channels, unet.spade_context)
        block.norm2 = SpadeGroupNorm(block.norm2, model.cond_channels, unet.spade_context)
    unet.register_forward_pre_hook(_read_map, with_kwargs=True)
    return unet


def build_spade_unet(model: Any) -> nn.Module:
    from meddiff.model import build_unet

    return add_spade(build_unet(model), model)


def load_spade_run(run: str | Path, device: str = "cpu") -> Any:
    """A run trained by `train` below → meddiff's LoadedRun (EMA weights), ready for `meddiff.sample.generate`."""
    from safetensors.torch import load_file

    from meddiff import runfolder
    from meddiff.model import with_meddiff_attention
    from meddiff.sample import LoadedRun, model_id

    record = runfolder.read_record(run)
    unet = build_spade_unet(record.model)
    wfile = runfolder.weights_file(run, "ema")
    unet.load_state_dict(load_file(str(wfile)), strict=True)
    return LoadedRun(with_meddiff_attention(unet).to(device).eval(), runfolder.scheduler_config(run, record),
                     record.class_names, record.model, record.train, model_id(wfile))


def train(argv: list[str]) -> int:
    """`meddiff train` with every UNet it builds given SPADE (the loop, checkpoints and EMA are meddiff's own)."""
    import importlib

    from meddiff.cli import main

    module = importlib.import_module("meddiff.train")  # (`meddiff.train` is the function)
    plain, module.build_unet = module.build_unet, build_spade_unet
    try:
        return main(["train", *argv])
    finally:
        module.build_unet = plain


if __name__ == "__main__":
    if sys.argv[1:2] != ["train"]:
        raise SystemExit("usage: python benchmarks/_spade.py train MEDDIFF-TRAIN-FLAGS…")
    sys.exit(train(sys.argv[2:]))
