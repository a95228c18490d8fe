"""Every option as a frozen dataclass, and the presets (seed, small, lean, tiny) that fill them.

CLI flags → `TrainConfig` / `SampleConfig`; a run folder stores them as JSON (`meddiff.json`)
so that resume and sampling need no flags.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

_ATTN_DOWN, _DOWN = "AttnDownBlock2D", "DownBlock2D"
_ATTN_UP, _UP = "AttnUpBlock2D", "UpBlock2D"


@dataclass(frozen=True)
class ModelConfig:
    """A diffusers `UNet2DModel` architecture; `num_classes` > 0 adds a class embedding (+1 null class for CFG)."""

    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int
    sample_size: int
    norm_num_groups: int = 32
    attention_head_dim: int | None = 8
    num_classes: int = 0
    patch_size: int = 1          # >1: the UNet sees (p*p, S/p, S/p) space-to-depth patches (Hoogeboom et al. 2023)


ARCHITECTURES: dict[str, dict[str, Any]] = {
    # The slides' config: 6 levels, 3 layers a block, attention at one down and one up level (8x8 at 128 px).
    "seed": dict(
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=(_DOWN, _DOWN, _DOWN, _DOWN, _ATTN_DOWN, _DOWN),
        up_block_types=(_UP, _ATTN_UP, _UP, _UP, _UP, _UP),
        layers_per_block=3,
    ),
    # The seed's shape narrowed for CPU at 64 px: identical to `seed_recipe.py --arch small`.
    "small": dict(
        block_out_channels=(64, 128, 256, 256),
        down_block_types=(_DOWN, _DOWN, _ATTN_DOWN, _DOWN),
        up_block_types=(_UP, _ATTN_UP, _UP, _UP),
        layers_per_block=2,
    ),
    # meddiff's CPU default: 2x2 space-to-depth patches, so the widest convolutions run at half resolution,
    # one layer per block and attention only at the coarsest level (4x4 at 64 px): ~5x the seed's small img/s.
    "lean": dict(
        block_out_channels=(64, 128, 128, 256),
        down_block_types=(_DOWN, _DOWN, _DOWN, _ATTN_DOWN),
        up_block_types=(_ATTN_UP, _UP, _UP, _UP),
        layers_per_block=1,
        patch_size=2,
    ),
    # For tests: well under 1 M parameters.
    "tiny": dict(
        block_out_channels=(16, 32),
        down_block_types=(_DOWN, _ATTN_DOWN),
        up_block_types=(_ATTN_UP, _UP),
        layers_per_block=1,
        norm_num_groups=8,
    ),
}

# Training defaults per preset. `seed` reproduces the student project's recipe exactly.
RECIPES: dict[str, dict[str, Any]] = {
    "seed": dict(size=128, batch_size=10, lr=1e-4, lr_schedule="constant", warmup_steps=0, warmup_fraction=0.0,
                 ema_decay=0.0,
                 objective="eps", loss_weighting="none", beta_schedule="linear", flip=False, weight_decay=0.01,
                 grad_clip=0.0, timestep_spacing="leading"),
    "small": dict(size=64),
    "lean": dict(size=64, batch_size=8),  # more, smaller steps learn faster per CPU-second (docs/benchmarks.md)
    "tiny": dict(size=32, batch_size=8),
}
DEFAULT_PRESET = "lean"


@dataclass(frozen=True)
class TrainConfig:
    """Everything `meddiff train` needs. `None` means "the preset's value"; see `resolve()`."""

    data: str
    out: str
    preset: str = DEFAULT_PRESET
    size: int | None = None
    batch_size: int | None = None
    micro_batch: int | None = None          # None: whole batch at once; 0: "auto" (largest that fits the device)
    epochs: int | None = None
    max_steps: int | None = None
    max_minutes: float | None = None
    lr: float | None = None
    lr_schedule: str | None = None          # "cosine" (after warm-up) | "constant"
    warmup_steps: int | None = None         # linear warm-up steps; 0 → warm up over warmup_fraction of the run
    warmup_fraction: float | None = None
    weight_decay: float | None = None
    ema_decay: float | None = None          # 0 turns EMA off
    objective: str | None = None            # "eps" | "v"
    loss_weighting: str | None = None       # "none" | "min-snr"
    min_snr_gamma: float = 5.0
    beta_schedule: str | None = None        # "linear" | "cosine"
    zero_terminal_snr: bool = False
    timestep_spacing: str | None = None     # how samplers place their steps: "trailing" | "leading" | "linspace"
    grad_clip: float | None = None          # max gradient norm; 0 turns clipping off
    num_train_timesteps: int = 1000
    flip: bool | None = None                # random horizontal flips
    conditional: str = "auto"               # "auto" (when >1 class) | "on" | "off"
    cond_drop_prob: float = 0.1
    val_fraction: float = 0.1
    val_every: int | None = None            # steps; None → about 10 evaluations per run
    patience: int | None = None             # evaluations without improvement before stopping
    checkpoint_every: int | None = None     # steps; None → with each evaluation
    keep_checkpoints: int = 2
    grad_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False
    label_depth: int = 1                    # folder levels that name a class: 2 for data/xray/pneumonia/…
    precision: str = "auto"                 # "auto" | "fp32" | "bf16" | "fp16"
    device: str = "auto"
    seed: int = 0
    crop: bool = False                      # centre-crop instead of padding to a square
    cache_dir: str | None = None
    progress: bool = True

    def resolve(self) -> "TrainConfig":
        """Fill every `None` from the preset's recipe and meddiff's defaults; validate."""
        if self.preset not in ARCHITECTURES:
            raise ConfigError(f"--preset {self.preset!r}: unknown preset; choose from {', '.join(ARCHITECTURES)}")
        # plain v-MSE (= eps-MSE + x_0-MSE), not min-SNR-5: on 121 MRI slices it copied no training slice in 20
        # minutes where min-SNR-5 copied 83 %, with a lower validation loss (docs/benchmarks.md, objectives)
        base = dict(size=64, batch_size=16, lr=1e-3, lr_schedule="cosine", warmup_steps=0, warmup_fraction=0.05,
                    weight_decay=0.01,
                    ema_decay=0.999, objective="v", loss_weighting="none", beta_schedule="cosine", flip=True,
                    grad_clip=1.0, timestep_spacing="trailing")
        base.update(RECIPES[self.preset])
        filled = {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in base.items()}
        cfg = dataclasses.replace(self, **filled)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        _choice("--objective", self.objective, ("eps", "v"))
        _choice("--loss-weighting", self.loss_weighting, ("none", "min-snr"))
        _choice("--beta-schedule", self.beta_schedule, ("linear", "cosine"))
        _choice("--lr-schedule", self.lr_schedule, ("cosine", "constant"))
        _choice("--timestep-spacing", self.timestep_spacing, ("trailing", "leading", "linspace"))
        _choice("--precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        if not self.device.startswith("cuda:"):
            _choice("--device", self.device, ("auto", "cpu", "cuda"))
        _choice("--conditional", self.conditional, ("auto", "on", "off"))
        if not 16 <= self.size <= 1024 or self.size % 8:
            raise ConfigError(f"--size {self.size}: must be a multiple of 8 between 16 and 1024")
        if self.micro_batch is not None and self.micro_batch < 0:
            raise ConfigError(f"--micro-batch {self.micro_batch}: must be a positive whole number or auto")
        for flag, value in (("--batch-size", self.batch_size), ("--epochs", self.epochs), ("--max-steps", self.max_steps)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} {value}: must be a positive whole number")
        if self.micro_batch and self.micro_batch > self.batch_size:
            raise ConfigError(f"--micro-batch {self.micro_batch}: must not exceed --batch-size {self.batch_size}")
        for flag, value in (("--patience", self.patience), ("--warmup-steps", self.warmup_steps)):
            if value is not None and value < 0:
                raise ConfigError(f"{flag} {value}: must be zero or a positive whole number")
        if self.lr <= 0:
            raise ConfigError(f"--lr {self.lr}: must be positive")
        if self.min_snr_gamma <= 0:
            raise ConfigError(f"--min-snr-gamma {self.min_snr_gamma}: must be positive")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"--ema-decay {self.ema_decay}: must be in [0, 1)")
        if not 0 <= self.val_fraction < 0.5:
            raise ConfigError(f"--val-fraction {self.val_fraction}: must be in [0, 0.5)")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"--max-minutes {self.max_minutes}: must be positive")


@dataclass(frozen=True)
class SampleConfig:
    """Everything `meddiff sample` needs."""

    run: str
    out: str
    n: int = 4
    steps: int | None = None                # None: 10, or 20 for the seed preset
    sampler: str | None = None              # None: unipc (beats DDIM-20 at 10 steps, docs/benchmarks.md), or
                                            # ddim for runs of the seed preset (the student project's sampler)
    seed: int = 0
    batch_size: int = 16
    class_name: str | None = None           # one class of the run; None → unconditional / all classes
    per_class: int | None = None            # N images for each class into class folders
    guidance: float = 1.0
    fmt: str = "png"
    weights: str = "ema"                    # "ema" | "raw" | "best"
    cache_interval: int = 1                 # DeepCache: run the full UNet every N model calls (1 = off)
    precision: str = "auto"
    device: str = "auto"
    grid: bool = True
    progress: bool = True


SAMPLERS = ("ddpm", "ddim", "dpmpp-2m", "unipc", "euler", "heun")
HELDOUT_SPLITS = ("group", "contiguous")  # how images are held out: by group, or in runs of consecutive images


def default_sampler(preset: str) -> tuple[str, int]:
    """(sampler, steps) when none is asked for: the seed's DDIM-20 for `seed` runs, else UniPC at 10 steps."""
    return ("ddim", 20) if preset == "seed" else ("unipc", 10)


def _choice(flag: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{flag} {value!r}: choose from {', '.join(allowed)}")


def model_config(preset: str, size: int, num_classes: int = 0) -> ModelConfig:
    """The UNet of a preset at an image size."""
    if preset not in ARCHITECTURES:
        raise ConfigError(f"--preset {preset!r}: unknown preset; choose from {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[preset]
    factor = 2 ** (len(arch["block_out_channels"]) - 1) * arch.get("patch_size", 1)
    if size % factor:
        raise ConfigError(f"--size {size}: preset {preset!r} reduces the image by {factor}, "
                          f"so the size must be a multiple of {factor}")
    return ModelConfig(sample_size=size, num_classes=num_classes, **ARCHITECTURES[preset])


def to_json(obj: Any) -> dict[str, Any]:
    """A config dataclass → a JSON-safe dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def from_json(cls: type, data: dict[str, Any]) -> Any:
    """A dict written by `to_json` → the dataclass, ignoring keys this version does not know."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
    return cls(**kwargs)


__all__ = ["ModelConfig", "TrainConfig", "SampleConfig", "ARCHITECTURES", "RECIPES", "SAMPLERS",
           "DEFAULT_PRESET", "model_config", "to_json", "from_json"]
