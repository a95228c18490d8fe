"""UNet presets over diffusers' `UNet2DModel` and the class conditioning around it: ModelConfig → nn.Module."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from .config import ModelConfig


def build_unet(cfg: ModelConfig) -> UNet2DModel:
    """A single-channel UNet. With classes, an embedding of `num_classes + 1` rows: the last is the null class
    that classifier-free guidance trains with dropped labels and samples as the unconditional branch."""
    p = cfg.patch_size
    return UNet2DModel(
        sample_size=cfg.sample_size // p,
        in_channels=p * p,
        out_channels=p * p,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=cfg.attention_head_dim,
        num_class_embeds=cfg.num_classes + 1 if cfg.num_classes else None,
    )


def denoise(unet: UNet2DModel, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
            patch_size: int = 1) -> torch.Tensor:
    """The UNet's output for (B, 1, H, W) inputs, through space-to-depth patches when patch_size > 1
    (pixel-unshuffle in, pixel-shuffle out: a lossless rearrangement, so the output is again (B, 1, H, W))."""
    if patch_size == 1:
        return unet(x, t, class_labels=class_labels).sample
    out = unet(F.pixel_unshuffle(x, patch_size), t, class_labels=class_labels).sample  # (B, p*p, H/p, W/p)
    return F.pixel_shuffle(out, patch_size)


def null_class(cfg: ModelConfig) -> int:
    """The label index that means "no class" (classifier-free guidance's unconditional branch)."""
    return cfg.num_classes


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: UNet2DModel) -> float:
    """Forward FLOPs for one image (2 x multiply-accumulates), counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    c, size = model.config.in_channels, model.config.sample_size
    x = torch.zeros(1, c, size, size)
    t = torch.zeros(1, dtype=torch.long)
    labels = torch.zeros(1, dtype=torch.long) if model.config.num_class_embeds else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, class_labels=labels)
    return float(counter.get_total_flops())
