"""UNet presets over diffusers' `UNet2DModel` and the class conditioning around it: ModelConfig → nn.Module."""
from __future__ import annotations

import torch
from diffusers import UNet2DModel

from .config import ModelConfig


def build_unet(cfg: ModelConfig) -> UNet2DModel:
    """A single-channel UNet. With classes, an embedding of `num_classes + 1` rows: the last is the null class
    that classifier-free guidance trains with dropped labels and samples as the unconditional branch."""
    return UNet2DModel(
        sample_size=cfg.sample_size,
        in_channels=1,
        out_channels=1,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=cfg.attention_head_dim,
        num_class_embeds=cfg.num_classes + 1 if cfg.num_classes else None,
    )


def null_class(cfg: ModelConfig) -> int:
    """The label index that means "no class" (classifier-free guidance's unconditional branch)."""
    return cfg.num_classes


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: UNet2DModel, size: int) -> float:
    """Forward FLOPs for one image (2 x multiply-accumulates), counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 1, size, size)
    t = torch.zeros(1, dtype=torch.long)
    labels = torch.zeros(1, dtype=torch.long) if model.config.num_class_embeds else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, class_labels=labels)
    return float(counter.get_total_flops())
