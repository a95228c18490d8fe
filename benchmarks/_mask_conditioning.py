"""How a label map reaches meddiff's UNet: the candidates beside the product's input channels, as benchmark
variants (`masks.py --conditioning spade|controlnet`), measured before the product takes one.

meddiff's mask conditioning gives the UNet the map as input channels beside x_t (`meddiff.model.with_cond`): the
map enters once, at the first convolution. The candidates add a path that carries it to every level, on top of the
input channels (so each comparison asks what that path adds):

- `spade` (Park et al. 2019, "Semantic image synthesis with spatially-adaptive normalization"): after both group
  norms of every residual block, a per-pixel scale and shift predicted from the map (scaled by area averaging to the
  block's resolution) by a small convolutional head.
- `controlnet` (Zhang et al. 2023, "Adding conditional control to text-to-image diffusion models"): a trainable
  copy of the UNet's encoder (input convolution, down blocks, middle block, its own time and class embedding) reads
  the same input, and each of its skip features and its middle output reaches the UNet through a 1x1 convolution,
  added to the UNet's skip connections (the encoder's own path is left as it is) and middle output. ControlNet was
  made to add a condition to a frozen, pretrained model; here both are trained together from the start, which is
  how meddiff trains on a user's own pairs.

Both start as the input-channel network: SPADE's last convolutions and ControlNet's 1x1 convolutions are zero at
step 0. The UNet stays a diffusers `UNet2DModel` with the candidate's modules inside it; forward hooks read the
map (or the whole input) off the UNet's own input, so `meddiff train` (its loop, EMA, checkpoints), the samplers
and guidance run it unchanged; a deep copy (the EMA) reads its own. Its weights are the run's own safetensors;
`load_variant_run` rebuilds the architecture from the run record before loading them, as `meddiff.runfolder` does
for a plain run.

    python benchmarks/_mask_conditioning.py train spade --data 'builtin:phantoms?n=1200&masks=1' --size 64 --out runs/spade …
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

HIDDEN = 32  # channels of each SPADE head's shared convolution


# ---------------------------------------------------------------- SPADE

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
    """Swap a SpadeGroupNorm into both norms of every residual block; the heads read the map the input carries."""
    from diffusers.models.resnet import ResnetBlock2D

    p = model.patch_size
    unet.spade_context = {"image_channels": model.in_channels * p * p, "patch": p, "map": None}
    for block in [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]:
        block.norm1 = SpadeGroupNorm(block.norm1, model.cond_channels, unet.spade_context)
        block.norm2 = SpadeGroupNorm(block.norm2, model.cond_channels, unet.spade_context)
    unet.register_forward_pre_hook(_read_map, with_kwargs=True)
    return unet


# ---------------------------------------------------------------- ControlNet

def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _embedding(unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
               class_labels: torch.Tensor | None) -> torch.Tensor:
    """The time (+ class) embedding as `UNet2DModel.forward` computes it, from `unet`'s own embedding layers."""
    t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=sample.device)
    t = t.reshape(-1).to(sample.device) * torch.ones(sample.shape[0], dtype=t.dtype, device=sample.device)
    emb = unet.time_embedding(unet.time_proj(t).to(dtype=unet.dtype))
    if unet.class_embedding is not None:
        emb = emb + unet.class_embedding(class_labels).to(dtype=unet.dtype)
    return emb


def _run_branch(unet: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: the control branch on this call's input; its zero-convolved skip features and middle
    output into the UNet's context, for the hooks on the down blocks and the middle block to add."""
    branch, ctx = unet.control_branch, unet.control_context
    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    emb = _embedding(branch, sample, timestep, args[2] if len(args) > 2 else kwargs.get("class_labels"))
    h, skips = branch.conv_in(sample), []
    for block in branch.down_blocks:
        h, res = block(hidden_states=h, temb=emb)
        skips += res
    mid = branch.mid_block(h, emb)
    ctx["down"] = [zero(r) for zero, r in zip(unet.control_zero_down, skips)]
    ctx["mid"] = unet.control_zero_mid(mid)


def _add_to_skips(block: nn.Module, _args: tuple, output: tuple) -> tuple:
    """Forward hook on a down block: the branch's features added to its skip features only (the hidden state
    that the next block reads is returned as it came)."""
    hidden, res = output
    add = block.control_context["down"][block.control_first:block.control_first + len(res)]
    return hidden, tuple(r + a for r, a in zip(res, add))


def _add_to_mid(block: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + block.control_context["mid"]


def add_controlnet(unet: nn.Module, model: Any) -> nn.Module:
    """Give the UNet a trainable copy of its encoder (a fresh build of the same architecture, its decoder removed)
    whose skip features and middle output reach it through zero-initialised 1x1 convolutions."""
    from meddiff.model import build_unet

    branch = build_unet(model)
    branch.up_blocks = nn.ModuleList()
    branch.conv_norm_out = branch.conv_act = branch.conv_out = None
    unet.control_branch = branch
    ctx: dict[str, Any] = {"down": [], "mid": None}
    unet.control_context = ctx
    channels, first = [], 0
    for i, (block, c) in enumerate(zip(unet.down_blocks, model.block_out_channels)):
        n = len(block.resnets) + (1 if block.downsamplers else 0)
        block.control_context, block.control_first = ctx, first
        block.register_forward_hook(_add_to_skips)
        channels += [c] * n
        first += n
    unet.control_zero_down = nn.ModuleList(_zero_conv(c) for c in channels)
    unet.control_zero_mid = _zero_conv(model.block_out_channels[-1])
    unet.mid_block.control_context = ctx
    unet.mid_block.register_forward_hook(_add_to_mid)
    unet.register_forward_pre_hook(_run_branch, with_kwargs=True)
    return unet


# ---------------------------------------------------------------- the variants, as meddiff trains and samples them

VARIANTS: dict[str, Callable[[nn.Module, Any], nn.Module]] = {"spade": add_spade, "controlnet": add_controlnet}


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"mask conditioning {variant!r}: choose from {', '.join(VARIANTS)}")


def build_variant_unet(variant: str, model: Any) -> nn.Module:
    """meddiff's UNet for a mask-conditioned ModelConfig, with the variant's modules added."""
    from meddiff.model import build_unet

    check_variant(variant)
    if not model.cond_channels:
        raise ValueError(f"{variant} needs a model conditioned on label maps (cond_channels > 0)")
    return VARIANTS[variant](build_unet(model), model)


def load_variant_run(variant: str, run: str | Path, device: str = "cpu") -> Any:
    """A run trained by `train(variant, …)` → meddiff's LoadedRun (EMA weights), for `meddiff.sample.generate`.
    The weights of a run trained otherwise do not fit: RuntimeError."""
    from safetensors.torch import load_file

    from meddiff import runfolder
    from meddiff.model import with_meddiff_attention
    from meddiff.sample import LoadedRun, model_id

    record = runfolder.read_record(run)
    unet = build_variant_unet(variant, record.model)
    wfile = runfolder.weights_file(run, "ema")
    unet.load_state_dict(load_file(str(wfile)), strict=True)
    return LoadedRun(with_meddiff_attention(unet).to(device).eval(), runfolder.scheduler_config(run, record),
                     record.class_names, record.model, record.train, model_id(wfile))


def train(variant: str, argv: list[str]) -> int:
    """`meddiff train` with every UNet it builds given the variant (the loop, checkpoints and EMA are meddiff's)."""
    import importlib

    from meddiff.cli import main

    check_variant(variant)  # before any training
    module = importlib.import_module("meddiff.train")  # (`meddiff.train` is the function)
    plain = module.build_unet
    module.build_unet = lambda model: build_variant_unet(variant, model)
    try:
        return main(["train", *argv])
    finally:
        module.build_unet = plain


if __name__ == "__main__":
    if sys.argv[1:2] != ["train"] or len(sys.argv) < 3:
        raise SystemExit(f"usage: python benchmarks/_mask_conditioning.py train {{{'|'.join(VARIANTS)}}} "
                         "MEDDIFF-TRAIN-FLAGS…")
    sys.exit(train(sys.argv[2], sys.argv[3:]))
