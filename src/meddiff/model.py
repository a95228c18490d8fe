"""UNet presets over diffusers' `UNet2DModel` and what wraps it: ModelConfig → nn.Module; the `Denoiser` (class
conditioning, guidance, patches, DeepCache) that every sampler calls."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention

from .config import ModelConfig
from .errors import ConfigError
from .runtime import autocast


def unet_config(cfg: ModelConfig) -> dict[str, Any]:
    """The diffusers `UNet2DModel` arguments of a ModelConfig: what `build_unet` builds and what a run's
    unet/config.json must hold. With classes, an embedding of `num_classes + 1` rows: the last is the null class
    that classifier-free guidance trains with dropped labels and samples as the unconditional branch."""
    p = cfg.patch_size
    c = cfg.in_channels * p * p
    return dict(sample_size=cfg.sample_size // p, in_channels=c + cfg.cond_channels * p * p, out_channels=c,
                layers_per_block=cfg.layers_per_block, block_out_channels=tuple(cfg.block_out_channels),
                down_block_types=tuple(cfg.down_block_types), up_block_types=tuple(cfg.up_block_types),
                norm_num_groups=cfg.norm_num_groups, attention_head_dim=cfg.attention_head_dim,
                num_class_embeds=cfg.num_classes + 1 if cfg.num_classes else None)


def build_unet(cfg: ModelConfig) -> UNet2DModel:
    """A single-channel UNet (`unet_config`) with meddiff's attention processor."""
    return with_meddiff_attention(UNet2DModel(**unet_config(cfg)))


def with_meddiff_attention(unet: UNet2DModel) -> UNet2DModel:
    """Give every attention block of `unet` meddiff's processor (below); for models built here and loaded."""
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(SelfAttention())
    return unet


class SelfAttention:
    """The UNet's spatial self-attention (diffusers' Attention block: group norm, q/k/v projections, residual)
    with one change from diffusers' default processor: on the CPU, scaled-dot-product attention runs in fp32
    even under bf16 autocast. With these blocks' 8-channel heads, PyTorch's CPU flash-attention kernel is 3-9x
    slower in bf16 than in fp32 (docs/history.md, measured on Sapphire Rapids), while the projections
    around it still run in bf16. Outputs in fp32 and on CUDA are those of diffusers' AttnProcessor2_0."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None:
            raise NotImplementedError("meddiff's UNet uses self-attention only (no cross-attention or masks)")
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        x = hidden_states.view(b, c, h * w)
        x = (attn.group_norm(x) if attn.group_norm is not None else x).transpose(1, 2)  # (B, N, C)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        heads = attn.heads
        q, k, v = (y.view(b, -1, heads, y.shape[-1] // heads).transpose(1, 2) for y in (q, k, v))
        if q.device.type == "cpu" and q.dtype != torch.float32:
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, -1, c)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        out = out.transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def to_patches(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Space-to-depth (pixel-unshuffle): (B, C, H, W) → (B, C*p*p, H/p, W/p); identity for p = 1."""
    return F.pixel_unshuffle(x, patch_size) if patch_size > 1 else x


def from_patches(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Depth-to-space (pixel-shuffle), the exact inverse of `to_patches`."""
    return F.pixel_shuffle(x, patch_size) if patch_size > 1 else x


def mask_channels(masks: torch.Tensor, values: tuple[int, ...], factor: int = 1) -> torch.Tensor:
    """Label maps (B, 1, H, W) integers → the conditioning channels (B, K, H, W) float32, one per label value:
    +1 where the map has that value, -1 elsewhere. 0 everywhere (`torch.zeros`) is "no map": what training shows
    with dropped conditions and what guidance's unconditional branch sees. A latent model (`factor` > 1: its grid
    is that many times coarser) gets them space-to-depth, (B, K factor², H / factor, W / factor): every pixel of
    the map reaches the model, a lesion smaller than a latent cell included."""
    want = torch.as_tensor(values, device=masks.device).view(1, -1, 1, 1)
    channels = (masks == want).float() * 2 - 1
    return channels if factor == 1 else F.pixel_unshuffle(channels, factor)


def maps_from_channels(x: torch.Tensor, values: tuple[int, ...]) -> torch.Tensor:
    """A model of label maps' sample (B, K, H, W), one channel per label value as `mask_channels` encodes a map,
    → label maps (B, 1, H, W) int64: each pixel takes the value whose channel is highest."""
    table = torch.as_tensor(values, dtype=torch.int64, device=x.device)
    return table[x.argmax(dim=1, keepdim=True)]


def with_cond(x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """The UNet's input: x_t, then the conditioning channels (label maps) where the model has them."""
    return x if cond is None else torch.cat([x, cond.to(x.dtype)], dim=1)


def denoise(unet: UNet2DModel, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
            patch_size: int = 1, cond: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet's output for (B, C, H, W) inputs (and (B, K, H, W) label-map channels `cond`), through
    space-to-depth patches when patch_size > 1 (a lossless rearrangement, so the output is again (B, C, H, W)).
    Training calls this; sampling calls a `Denoiser`."""
    return from_patches(unet(to_patches(with_cond(x, cond), patch_size), t, class_labels=class_labels).sample,
                        patch_size)


class Denoiser:
    """The model as a sampler sees it: `denoiser(x_t, t) → prediction`, (B, C, H, W) in and out (eps or v, as
    the UNet was trained), with everything else its own state: the UNet, the class labels and the null class,
    the label maps' conditioning channels (`cond`), the guidance scale, the patch size, the autocast precision
    and the DeepCache feature cache.

    Classifier-free guidance (Ho & Salimans 2022, eq. 6): out = u + w (c - u), u from the null class and no label
    map (zero channels); one pass when there is nothing to guide (w = 1, or neither a class nor a map), and, with
    `guidance_cutoff` c > 0, at the timesteps below c T (`timesteps`): the least noisy steps, which set intensities
    rather than where things are, so that guidance places a lesion without drawing it w times too bright (guidance
    on part of the trajectory only, as in Kynkäänniemi et al. 2024, there dropped at the noisy end instead).
    DeepCache (Ma et al. 2024, Alg. 1): the full UNet runs on call 0, cache_interval, 2 cache_interval, ...; the
    calls between reuse its deep features (see `cached_unet_forward`). One Denoiser serves one sampling run of one batch."""

    def __init__(self, unet: UNet2DModel, labels: torch.Tensor | None = None, null_class: int = 0,
                 guidance: float = 1.0, patch_size: int = 1, cache_interval: int = 1, precision: str = "fp32",
                 cond: torch.Tensor | None = None, guidance_cutoff: float = 0.0, timesteps: int = 1000) -> None:
        if cache_interval < 1:
            raise ConfigError(f"--cache-interval {cache_interval}: must be a whole number ≥ 1 (1 = off)")
        self.unet, self.labels, self.null_class, self.cond = unet, labels, null_class, cond
        self.guidance, self.patch_size, self.precision = guidance, patch_size, precision
        self.cutoff_t = guidance_cutoff * timesteps  # no guidance below this timestep
        self.cache_interval = cache_interval
        self.calls = 0                            # UNet evaluations so far; DeepCache's refresh schedule
        self._deep: torch.Tensor | None = None    # the cached features entering the last up block

    @property
    def guided(self) -> bool:
        """Whether a call runs the conditional and the unconditional branch (batched as one UNet pass)."""
        labels = self.labels
        if self.guidance == 1.0:
            return False
        has_class = labels is not None and not bool((labels == self.null_class).all())
        return has_class or (self.cond is not None and bool(self.cond.any()))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t (B, C, H, W), any float dtype (cast to the UNet's), and t (B,) → the prediction (B, C, H, W)."""
        refresh = self.calls % self.cache_interval == 0
        self.calls += 1
        x = x.to(self.unet.dtype)
        guide = self.guided and float(t.reshape(-1)[0]) >= self.cutoff_t
        # DeepCache's features hold both branches or one: a change of branches refreshes them
        refresh = refresh or self._deep is None or len(self._deep) != len(x) * (2 if guide else 1)
        with autocast(x.device, self.precision):
            if not guide:
                return self._forward(x, t, self.labels, self.cond, refresh)
            labels = None if self.labels is None else torch.cat([self.labels,
                                                                 torch.full_like(self.labels, self.null_class)])
            cond = None if self.cond is None else torch.cat([self.cond, torch.zeros_like(self.cond)])
            with_c, without = self._forward(torch.cat([x, x]), torch.cat([t, t]), labels, cond, refresh).chunk(2)
            return without + self.guidance * (with_c - without)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, cond: torch.Tensor | None,
                 refresh: bool) -> torch.Tensor:
        if self.cache_interval == 1:
            return denoise(self.unet, x, t, labels, self.patch_size, cond)
        out, self._deep = cached_unet_forward(self.unet, to_patches(with_cond(x, cond), self.patch_size), t, labels,
                                              None if refresh else self._deep)
        return from_patches(out, self.patch_size)


def _embedding(unet: UNet2DModel, t: torch.Tensor, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Timestep (+ class) embedding, as UNet2DModel.forward computes it."""
    t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
    emb = unet.time_embedding(unet.time_proj(t).to(dtype=unet.dtype))
    if unet.class_embedding is not None:
        emb = emb + unet.class_embedding(class_labels).to(dtype=unet.dtype)
    return emb


def cached_unet_forward(unet: UNet2DModel, sample: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None,
                        deep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepCache (Ma et al. 2024, Alg. 1) → (UNet output, deep features). Without `deep` run the whole UNet and
    return the features entering the last (highest-resolution) up block; with `deep` (from an earlier call) run
    only conv_in, the first down block and the last up block, reusing those features, since they change slowly
    between adjacent steps. Without `deep` the output equals `unet(sample, t, class_labels).sample`."""
    emb = _embedding(unet, t, class_labels, sample.shape[0])
    h = unet.conv_in(sample)
    res: tuple[torch.Tensor, ...] = (h,)
    h, r = unet.down_blocks[0](hidden_states=h, temb=emb)
    res += r
    n_last = len(unet.up_blocks[-1].resnets)  # conv_in output + the first block's resnet outputs
    if deep is None:
        for block in unet.down_blocks[1:]:
            h, r = block(hidden_states=h, temb=emb)
            res += r
        h = unet.mid_block(h, emb) if unet.mid_block is not None else h
        stack = res
        for block in unet.up_blocks[:-1]:
            k = len(block.resnets)
            h, stack = block(h, stack[-k:], emb), stack[:-k]
        deep = h
    h = unet.up_blocks[-1](deep, res[:n_last], emb)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h))), deep


def null_class(cfg: ModelConfig) -> int:
    """The label index that means "no class" (classifier-free guidance's unconditional branch)."""
    return cfg.num_classes


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: UNet2DModel) -> float:
    """Forward FLOPs for one image (2 x multiply-accumulates), counted by torch's FLOP counter."""
    c, size = model.config.in_channels, model.config.sample_size
    x = torch.zeros(1, c, size, size)
    t = torch.zeros(1, dtype=torch.long)
    labels = torch.zeros(1, dtype=torch.long) if model.config.num_class_embeds else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, class_labels=labels)
    return float(counter.get_total_flops())
