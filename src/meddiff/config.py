"""Every option in one table: frozen config dataclasses whose fields carry their help, choices and limits (an
`Option` in the field's metadata), the presets (seed, small, lean, tiny) that fill them, and the checks.

The CLI derives its flags from these fields, the library validates with them, and the web page parses its
requests with the same limits, so a number is refused with the same message wherever it comes from.
A run folder stores the configs as JSON (`meddiff.json`) so that resume and sampling need no flags.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import MISSING, dataclass
from typing import Any

from .errors import ConfigError

_ATTN_DOWN, _DOWN = "AttnDownBlock2D", "DownBlock2D"
_ATTN_UP, _UP = "AttnUpBlock2D", "UpBlock2D"


# --- options: limits, choices, help ------------------------------------------------------------------------

@dataclass(frozen=True)
class Bounds:
    """The numbers an option allows: finite, lo ≤ value ≤ hi (strict where open), whole numbers only when
    `whole`, and multiples of `step`."""

    lo: float = -math.inf
    hi: float = math.inf
    whole: bool = False
    lo_open: bool = False
    hi_open: bool = False
    step: int = 1

    def allows(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and (self.whole or not math.isfinite(value)):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below and (self.step == 1 or value % self.step == 0)

    def describe(self) -> str:
        """'a whole number from 1 to 1000', 'a number in [0, 1)', 'a number > 0', 'a multiple of 8 from 16 to 1024'."""
        kind = f"a multiple of {self.step}" if self.step > 1 else "a whole number" if self.whole else "a number"
        lo, hi = show(self.lo), show(self.hi)
        if self.hi == math.inf:
            return kind if self.lo == -math.inf else f"{kind} {'>' if self.lo_open else '≥'} {lo}"
        if self.lo == -math.inf:
            return f"{kind} {'<' if self.hi_open else '≤'} {hi}"
        if not (self.lo_open or self.hi_open):
            return f"{kind} from {lo} to {hi}"
        return f"{kind} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


def show(value: Any) -> str:
    """A value for a message: numbers as Python writes them (0.0001, 1e+20, nan), text quoted, anything long cut
    short."""
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value) if abs(value) < 10**30 else f"{float(value):.3g}"
    else:
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Option:
    """How a config field is offered and checked: its help, choices or bounds, the flag(s) that set it."""

    help: str
    flags: tuple[str, ...] = ()              # () → "--" + the field's name with dashes
    choices: tuple[str, ...] | None = None
    pattern: tuple[str, str] | None = None   # (how it reads, regular expression) text outside `choices` may match
    bounds: Bounds | None = None
    auto: int | None = None                  # the value the word "auto" stands for (--micro-batch auto → 0)
    recipe: Any = None                       # TrainConfig: meddiff's default where the preset's recipe sets none
    group: str | None = None                 # the options of one group exclude each other (the stopping rules)
    cli: bool = True                         # False: set from Python only
    web: Bounds | tuple[str, ...] | None = None  # narrower bounds or choices for one request of the web page

    def allows(self, value: Any) -> bool:
        if self.auto is not None and value == self.auto and not isinstance(value, bool):
            return True
        if self.choices is not None and value not in self.choices:
            return bool(self.pattern and isinstance(value, str) and re.fullmatch(self.pattern[1], value))
        return self.bounds is None or self.bounds.allows(value)

    def allowed(self) -> str:
        """What the option takes, for messages: 'choose from a, b' or 'must be a number > 0'."""
        if self.choices is not None:
            return f"choose from {', '.join(self.choices + self.pattern[:1] if self.pattern else self.choices)}"
        return f"must be {(self.bounds or Bounds()).describe()}{' or auto' if self.auto is not None else ''}"

    def check(self, name: str, value: Any) -> None:
        """ConfigError `<name> <value>: <what is allowed>` unless the value is allowed (None always is)."""
        if value is not None and not self.allows(value):
            raise ConfigError(f"{name} {show(value)}: {self.allowed()}")

    def parse(self, name: str, raw: Any, kind: type) -> Any:
        """Text (a flag, a form field) or a JSON value → a checked value of `kind` (int, float or str), or the
        ConfigError `check` gives. The word "auto" stands for `auto` where that is set."""
        if self.auto is not None and raw == "auto":
            return self.auto
        value = _coerce(raw, kind)
        spelled_auto = self.auto is not None and value == self.auto  # "0" is not the word auto: bounds apply
        if value is None or (spelled_auto and not (self.bounds or Bounds()).allows(value)):
            raise ConfigError(f"{name} {show(raw if value is None else value)}: {self.allowed()}")
        self.check(name, value)
        return value


_WHOLE = re.compile(r"\s*[+-]?\d{1,40}\s*")  # a whole number as text: "12", " -3 " (not "1e3", not 41 digits)


def _coerce(raw: Any, kind: type) -> Any:
    """raw as an int, float or str, or None when it is not one (True is not a number, 2.5 not a whole one)."""
    if isinstance(raw, bool):
        return None
    if kind is int:
        return raw if isinstance(raw, int) else int(raw) if isinstance(raw, str) and _WHOLE.fullmatch(raw) else None
    if kind is float:
        if isinstance(raw, (int, float)):
            return float(raw)
        try:
            return float(raw) if isinstance(raw, str) and len(raw) <= 64 else None
        except ValueError:
            return None
    return raw if isinstance(raw, str) else None


def check_value(name: str, value: Any, *, bounds: Bounds | None = None,
                choices: tuple[str, ...] | None = None) -> None:
    """Option.check for a value that is no config field (a function's argument)."""
    Option("", choices=choices, bounds=bounds).check(name, value)


def option(default: Any = MISSING, help: str = "", **how: Any) -> Any:  # noqa: A002 (argparse's word)
    """A dataclass field with its Option: `lr: float | None = option(None, "peak learning rate", bounds=...)`."""
    return dataclasses.field(default=default, metadata={"option": Option(help=help, **how)})


def precision_option() -> Any:
    """--precision, as every command that computes offers it."""
    return option("auto", "auto: bf16 where the hardware runs it fast, else fp32", choices=PRECISIONS)


def guidance_cutoff_option() -> Any:
    """--guidance-cutoff, as sample and inpaint offer it (`model.Denoiser`)."""
    return option(0.0, "guide only at timesteps from this share of the schedule's up (0: at every step): the noisy "
                  "steps place what the class and map ask for, the last ones set intensities, where guidance draws "
                  "a lesion too bright (e.g. 0.5)", bounds=Bounds(0, 1, hi_open=True))


def device_option() -> Any:
    """--device, as every command that computes offers it."""
    return option("auto", "auto, cpu, cuda or cuda:N", choices=DEVICES, pattern=CUDA_N)


def options(cls: Any) -> list[tuple[dataclasses.Field, Option]]:
    """The fields of a config dataclass (or instance) that carry an Option, in order."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def flag(f: dataclasses.Field) -> str:
    """The field's flag as users write it: its Option's first flag, else --the-field-name."""
    opt = f.metadata.get("option")
    return opt.flags[0] if opt and opt.flags else "--" + f.name.replace("_", "-")


def field_type(cls: Any, f: dataclasses.Field) -> type:
    """The plain type of a field: int, float, str or bool (`int | None` → int)."""
    hints = typing.get_type_hints(cls if isinstance(cls, type) else type(cls))
    return next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))


def validate_options(cfg: Any) -> None:
    """Check every set field of a config against its Option; ConfigError names the flag, value and limits."""
    for f, opt in options(cfg):
        opt.check(flag(f), getattr(cfg, f.name))


class Checked:
    """A config dataclass that checks its options whenever it is made (CLI, Python API, JSON, replace())."""

    def __post_init__(self) -> None:
        validate_options(self)


# --- limits: each number an option takes is finite and inside one of these; absurd values stop at the edge ----
SEEDS = Bounds(0, 2**63 - 1, whole=True)        # numpy's and torch's generators take each of these
MAX_IMAGES = 1_000_000                           # images one request asks for, or one built-in data set holds
IMAGES = Bounds(1, MAX_IMAGES, whole=True)
BATCH = Bounds(1, 4096, whole=True)
IMAGE_SIZE = Bounds(8, 1024, whole=True)         # px, where images are compared or read at a size
STEP_COUNT = Bounds(1, 10**9, whole=True)        # optimizer steps, and steps between validations or saves
WARMUP = Bounds(0, 10**9, whole=True)
EPOCHS = Bounds(1, 10**6, whole=True)
PATIENCE = Bounds(0, 10**6, whole=True)
MINUTES = Bounds(0, 10**6, lo_open=True)         # about two years
LEARNING_RATE = Bounds(0, 10, lo_open=True)
GAMMA = Bounds(0, 10**4, lo_open=True)
TIMESTEPS = Bounds(1, 100_000, whole=True)
STEPS = Bounds(1, 1000, whole=True)              # sampler steps
GUIDANCE = Bounds(0, 100)
CACHE_INTERVAL = Bounds(1, 1000, whole=True)
DEPTH = Bounds(1, 32, whole=True)                # folder levels naming a class
KEEP = Bounds(1, 1000, whole=True)
RESAMPLES = Bounds(1, 100_000, whole=True)       # bootstrap resamples
SHARE = Bounds(0, 1, hi_open=True)
NON_NEGATIVE = Bounds(0, 10**6)
JOBS_KEPT = Bounds(1, 10_000, whole=True)         # meddiff serve --keep-jobs: batches whose folders are kept
COMPUTE_BUDGET = Bounds(0, 10**6, lo_open=True)  # meddiff serve --compute-budget: millions of pixel-evaluations
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
CUDA_N = ("cuda:N", r"cuda:\d{1,3}")


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
    in_channels: int = 1         # channels the UNet denoises: 1 (pixels) or an autoencoder's latent channels
    latent_factor: int = 1       # >1: a latent model; sample_size is the latent grid, images are this many times larger
    mask_values: tuple[int, ...] = ()  # label-map conditioning: one input channel per label value (issue 21)
    map_values: tuple[int, ...] = ()   # a model of label maps (--learn maps): one channel per value, 0 first

    @property
    def makes_maps(self) -> bool:
        """A model of label maps: it denoises one channel per label value and its samples are maps, not images."""
        return bool(self.map_values)

    @property
    def image_size(self) -> int:
        """The size in px of the images the model makes (its latent grid times the autoencoder's factor)."""
        return self.sample_size * self.latent_factor

    @property
    def latent(self) -> bool:
        return self.latent_factor > 1

    @property
    def cond_channels(self) -> int:
        """Input channels beside the image: one per label value of a mask-conditioned model; a latent model takes
        each value's map at the image's resolution folded onto its grid (`latent_factor`² channels per value)."""
        return len(self.mask_values) * self.latent_factor ** 2


def _unet(channels: tuple[int, ...], attention_at: int, layers: int, **extra: Any) -> dict[str, Any]:
    """A UNet2DModel architecture with self-attention at one level (0 = the finest), mirrored on the way up."""
    down = tuple(_ATTN_DOWN if level == attention_at else _DOWN for level in range(len(channels)))
    up = tuple(_ATTN_UP if level == attention_at else _UP for level in reversed(range(len(channels))))
    return dict(block_out_channels=channels, down_block_types=down, up_block_types=up, layers_per_block=layers,
                **extra)


ARCHITECTURES: dict[str, dict[str, Any]] = {
    # The slides' config: 6 levels, 3 layers a block, attention at one down and one up level (8x8 at 128 px).
    "seed": _unet((128, 128, 256, 256, 512, 512), attention_at=4, layers=3),
    # The seed's shape narrowed for CPU at 64 px: identical to `seed_recipe.py --arch small`.
    "small": _unet((64, 128, 256, 256), attention_at=2, layers=2),
    # meddiff's CPU default: 2x2 space-to-depth patches, so the widest convolutions run at half resolution,
    # one layer per block and attention only at the coarsest level (4x4 at 64 px): ~5x the seed's small img/s.
    "lean": _unet((64, 128, 128, 256), attention_at=3, layers=1, patch_size=2),
    # For tests: well under 1 M parameters.
    "tiny": _unet((16, 32), attention_at=1, layers=1, norm_num_groups=8),
}

# Training defaults per preset, over the `recipe` of each TrainConfig option. `seed` reproduces the student
# project's recipe exactly.
RECIPES: dict[str, dict[str, Any]] = {
    "seed": dict(size=128, batch_size=10, lr=1e-4, lr_schedule="constant", warmup_steps=0, warmup_fraction=0.0,
                 ema_decay=0.0,
                 objective="eps", loss_weighting="none", beta_schedule="linear", flip=False, weight_decay=0.01,
                 grad_clip=0.0, timestep_spacing="leading"),
    "small": dict(size=64),
    "lean": dict(size=64, batch_size=8),  # more, smaller steps learn faster per CPU-second (docs/history.md)
    "tiny": dict(size=32, batch_size=8),
}
DEFAULT_PRESET = "lean"
SHIFT_BASE = 64  # px: the resolution meddiff's noise schedule was tuned at (docs/history.md)
# A model of label maps (--learn maps) shifts its noisy end's log SNR this much lower, its clean end not at all (the
# "interpolated" schedule, diffusion.shift_log_snr): a map is a few flat regions, each a channel at ±1 on every
# pixel, so noise that hides an image's layout leaves a map's readable, and an unshifted schedule trains too few
# steps where the layout is chosen. 4,269 steps at 64 px, 100 maps an abnormal class: a lesion in 91 % of CT and
# 63 % of MRI maps, against 82 % and 43 % unshifted, nearest agreement with the training maps the same; a constant
# -3 lost the small structures (no lesion in any map). Segmenters trained on pairs drawn on the maps of 8,538 steps:
# 0.74x [0.69, 0.79] the Dice of real pairs, 0.61x [0.56, 0.67] unshifted (docs/benchmarks.md, "A noisier schedule
# for maps").
MAP_NOISE_SHIFT = -3.0
PATCH_GRID = 32  # px: the grid the patched presets' widest convolutions run on, whatever the image size
PRESETS: tuple[str, ...] = tuple(ARCHITECTURES)
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "dpmpp-2m", "unipc", "euler", "heun")
HELDOUT_SPLITS: tuple[str, ...] = ("group", "contiguous")  # held out by group, or in runs of consecutive images
FORMATS: tuple[str, ...] = ("png", "png16", "dicom", "nifti")
WEIGHTS: tuple[str, ...] = ("ema", "best", "raw")


@dataclass(frozen=True)
class TrainConfig(Checked):
    """Everything `meddiff train` needs. `None` means "the preset's value": its recipe (RECIPES), else the
    option's `recipe`; `resolve()` fills them in. Every set value is checked on construction."""

    data: str = option(help="a folder of images (sub-folders = classes) or builtin:mni-mri, builtin:phantoms …")
    out: str = option(help="the run folder to create")
    preset: str = option(DEFAULT_PRESET, "architecture + recipe (seed = the student project exactly)",
                         choices=PRESETS)
    size: int | None = option(None, "image size in px", bounds=Bounds(16, 1024, whole=True, step=8), recipe=64)
    batch_size: int | None = option(None, "effective (global) batch size", bounds=BATCH, recipe=16)
    micro_batch: int | None = option(None, "images per forward pass (gradients accumulate to --batch-size), or "
                                     "auto: the largest that fits the device", bounds=BATCH, auto=0)
    epochs: int | None = option(None, "stop after this many passes over the training images", bounds=EPOCHS,
                                group="stop")
    max_steps: int | None = option(None, "stop after this many optimizer steps", bounds=STEP_COUNT, group="stop")
    max_minutes: float | None = option(None, "stop after this many minutes of training", bounds=MINUTES,
                                       group="stop")
    lr: float | None = option(None, "peak learning rate of AdamW", bounds=LEARNING_RATE, recipe=1e-3)
    lr_schedule: str | None = option(None, "learning rate after the warm-up: cosine decay to zero or constant",
                                     choices=("cosine", "constant"), recipe="cosine")
    warmup_steps: int | None = option(None, "linear learning-rate warm-up steps; 0: warm up over the recipe's "
                                      "share of the run (5 %, none for seed)", bounds=WARMUP, recipe=0)
    warmup_fraction: float | None = option(None, "share of the run to warm up over when warmup_steps is 0",
                                           bounds=SHARE, recipe=0.05, cli=False)
    weight_decay: float | None = option(None, "AdamW's weight decay", bounds=NON_NEGATIVE, recipe=0.01, cli=False)
    ema_decay: float | None = option(None, "decay of the weights' exponential moving average (0 turns it off)",
                                     bounds=SHARE, recipe=0.999)
    # plain v-MSE (= eps-MSE + x_0-MSE), not min-SNR-5: on 121 MRI slices it copied no training slice in 20
    # minutes where min-SNR-5 copied 83 %, with a lower validation loss (docs/history.md, objectives)
    objective: str | None = option(None, "what the UNet predicts: eps (the noise), v (the velocity) or x0 (the "
                                   "clean image, trained with the v-loss); default v, and x0 on pixels where the "
                                   "patch is 4 or more (above 64 px: docs/benchmarks.md, size rules)",
                                   choices=("eps", "v", "x0"), recipe="v")
    loss_weighting: str | None = option(None, "none: the objective's plain MSE; min-snr: min-SNR-gamma "
                                        "(--min-snr-gamma)", choices=("none", "min-snr"), recipe="none")
    min_snr_gamma: float = option(5.0, "gamma of --loss-weighting min-snr", bounds=GAMMA)
    beta_schedule: str | None = option(None, "noise schedule", choices=("linear", "cosine"), recipe="cosine")
    zero_terminal_snr: bool = option(False, "rescale the noise schedule so that its last step is pure noise")
    noise_shift: float | None = option(None, "shift of the noise schedule's log SNR (default: 2 ln(64/size) above "
                                       "64 px for meddiff's presets, as in \"simple diffusion\"; 0 for seed; "
                                       "--learn maps: 3 lower at the noisy end, 0 more at the clean end)",
                                       bounds=Bounds(-20, 20))
    noise_shift_clean: float | None = option(None, "log-SNR shift at the clean end of the schedule: the shift then "
                                             "moves linearly from it at the first step to --noise-shift at the "
                                             "last (default: the same as --noise-shift, a constant shift)",
                                             bounds=Bounds(-20, 20))
    patch: int | None = option(None, "space-to-depth patch of the patched presets (lean); default: the size / "
                               f"{PATCH_GRID} rounded down to a power of 2, at least the preset's own",
                               bounds=Bounds(1, 64, whole=True))
    timestep_spacing: str | None = option(None, "how samplers place their steps", recipe="trailing",
                                          choices=("trailing", "leading", "linspace"), cli=False)
    grad_clip: float | None = option(None, "max gradient norm; 0 turns clipping off", bounds=NON_NEGATIVE,
                                     recipe=1.0, cli=False)
    num_train_timesteps: int = option(1000, "diffusion steps of the noise schedule", bounds=TIMESTEPS)
    flip: bool | None = option(None, "random horizontal flips", recipe=True)
    conditional: str = option("auto", "class conditioning: auto (when there are 2 or more classes), on or off",
                              choices=("auto", "on", "off"))
    cond_drop_prob: float = option(0.1, "share of labels replaced by the null class, for guidance", bounds=SHARE,
                                   cli=False)
    label_depth: int = option(1, "folder levels naming a class (2: xray/normal)", bounds=DEPTH)
    val_fraction: float = option(0.1, "share of the images held out for the validation loss",
                                 bounds=Bounds(0, 0.5, hi_open=True))
    val_split: str = option("group", "how the validation images are held out: group (whole sub-folders, "
                            "volumes or patients) or contiguous (whole runs of consecutive files, with a guard band of "
                            "files on each side used by neither: for one volume's slices in one folder, so that they "
                            "are not the neighbours of training slices)",
                            choices=HELDOUT_SPLITS)
    val_every: int | None = option(None, "steps between validations (default: about 10 in a run)", bounds=STEP_COUNT)
    patience: int | None = option(None, "stop after this many evaluations without improvement",
                                  bounds=PATIENCE)
    copy_check: int | None = option(None, "at each validation, sample this many images and audit them for copies "
                                    "of training images (threshold: the held-out images' nearest NCC, as `meddiff "
                                    "audit`); the share flagged goes into the log (default: no check)",
                                    bounds=Bounds(1, 256, whole=True))
    max_copies: float | None = option(None, "stop when more than this share of the audited images copy a training "
                                      "image, and export the weights of the last check at or under it (needs "
                                      "--copy-check)", bounds=Bounds(0, 1))
    checkpoint_every: int | None = option(None, "steps between checkpoints (default: with each validation)",
                                          bounds=STEP_COUNT, cli=False)
    keep_checkpoints: int = option(2, "checkpoints kept", bounds=KEEP, cli=False)
    grad_checkpointing: bool = option(False, "recompute activations in the backward pass: less memory, slower")
    channels_last: bool = option(False, "UNet in channels-last memory format; on AMX CPUs under bf16 it trains "
                                 "the `seed` UNet at 128 px 1.26x faster, at 64 px it is slower (docs/history.md)")
    compile: bool = option(False, "torch.compile the UNet")
    precision: str = precision_option()
    device: str = device_option()
    seed: int = option(0, "seed of every random draw (data order, split, noise, flips)", bounds=SEEDS)
    crop: bool = option(False, "centre-crop to square instead of padding")
    cache_dir: str | None = option(None, "preprocessed-image cache")
    autoencoder: str | None = option(None, "an autoencoder folder (meddiff train-autoencoder): train the diffusion "
                                     "model in its latent space; the run keeps its own copy")
    masks: str = option("auto", "condition on the images' label maps: auto (when the data have them: images/ + "
                        "masks/, builtin:phantoms?masks=1) or off", choices=("auto", "off"))
    learn: str = option("images", "what the model learns to make: images (conditioned on the data's label maps where "
                        "they have them) or maps: the data's label maps themselves, conditioned on the class, a "
                        "model that draws new maps for `meddiff sample --mask-run` (the maps are not moved copies "
                        "of a training patient's, as --augment-masks's are)", choices=("images", "maps"))
    mask_loss_weight: float = option(0.0, "weight the loss this many times more inside the label maps' labelled "
                                     "regions (1 + W there, 1 elsewhere; inside the lesion alone where the data name "
                                     "one among other structures): lesions cover a few per cent of an image, "
                                     "and the plain loss spends little on drawing them where the map asks; for runs "
                                     "conditioned on label maps", bounds=Bounds(0, 100))
    progress: bool = option(True, "no progress bar")

    @property
    def shift(self) -> float | tuple[float, float]:
        """The schedule's log-SNR shift as `diffusion.shift_log_snr` takes it: a constant, or (at the clean end,
        at pure noise) when --noise-shift-clean is set."""
        shift = self.noise_shift or 0.0
        return shift if self.noise_shift_clean is None else (self.noise_shift_clean, shift)

    def resolve(self) -> "TrainConfig":
        """Fill every `None` from the preset's recipe and the options' recipes; validate."""
        base = {f.name: opt.recipe for f, opt in options(self) if opt.recipe is not None}
        base.update(RECIPES[self.preset])
        filled = {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in base.items()}
        size = self.size or filled.get("size")
        if self.objective is None and self.autoencoder is None and self.preset != "seed" and size:
            filled["objective"] = (objective_for(self.preset, size, self.patch, self.learn == "maps")
                                   or filled["objective"])
        cfg = dataclasses.replace(self, **filled)
        if cfg.micro_batch and cfg.micro_batch > cfg.batch_size:
            raise ConfigError(f"--micro-batch {cfg.micro_batch}: must not exceed --batch-size {cfg.batch_size}")
        if cfg.autoencoder is not None:  # the latent grid, and with it the shift and the UNet, follow the autoencoder
            return cfg
        if cfg.noise_shift is None:
            shift = noise_shift_for(cfg.preset, cfg.size)
            if cfg.learn == "maps" and cfg.noise_shift_clean is None:
                cfg = dataclasses.replace(cfg, noise_shift=shift + MAP_NOISE_SHIFT, noise_shift_clean=shift)
            else:
                cfg = dataclasses.replace(cfg, noise_shift=shift)
        model_config(cfg.preset, cfg.size, patch=cfg.patch)  # the UNet takes this size: known now, before any work
        return cfg


STOP_RULES: tuple[str, ...] = tuple(f.name for f, opt in options(TrainConfig) if opt.group == "stop")
LATENT_FACTORS = (2, 4, 8, 16)


@dataclass(frozen=True)
class AutoencoderConfig(Checked):
    """Everything `meddiff train-autoencoder` needs: a KL autoencoder (grayscale in and out) that a latent
    diffusion run (`meddiff train --autoencoder`) then trains in. Checked on construction."""

    data: str = option(help="a folder of images or builtin:…, as for meddiff train")
    out: str = option(help="the autoencoder folder to create")
    size: int = option(128, "image size in px", bounds=Bounds(16, 1024, whole=True, step=16))
    factor: int = option(4, "how many times smaller the latent grid is than the image: 2, 4, 8 or 16",
                         bounds=Bounds(2, 16, whole=True))
    latent_channels: int = option(4, "channels of the latent grid", bounds=Bounds(1, 16, whole=True))
    width: int = option(32, "channels at full resolution (doubled at the next level, then 4x from there on)",
                        bounds=Bounds(8, 256, whole=True, step=8))
    patch_px: int = option(64, "train on random square crops of this many px (the network is convolutional); 0, "
                           "or the image size or more: whole images", bounds=Bounds(0, 1024, whole=True, step=16))
    batch_size: int = option(8, "images (crops) per step", bounds=BATCH)
    max_steps: int | None = option(None, "stop after this many steps (default 2000 unless --max-minutes)",
                                   bounds=STEP_COUNT, group="stop")
    max_minutes: float | None = option(None, "stop after this many minutes of training", bounds=MINUTES,
                                       group="stop")
    lr: float = option(5e-4, "peak learning rate of AdamW (5 % warm-up, then cosine decay to 10 %)",
                       bounds=LEARNING_RATE)
    kl_weight: float = option(1e-6, "weight of the KL term against the L1 reconstruction loss",
                              bounds=Bounds(0, 1))
    val_fraction: float = option(0.1, "share of the images held out (by group) to report reconstruction PSNR and "
                                 "SSIM on", bounds=Bounds(0, 0.5, lo_open=True, hi_open=True))
    precision: str = precision_option()
    device: str = device_option()
    seed: int = option(0, "seed of every random draw (split, order, crops, initialisation)", bounds=SEEDS)
    crop: bool = option(False, "centre-crop to square instead of padding")
    label_depth: int = option(1, "folder levels naming a class (kept only for the split)", bounds=DEPTH)
    cache_dir: str | None = option(None, "preprocessed-image cache")
    progress: bool = option(True, "no progress bar")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.factor not in LATENT_FACTORS:
            raise ConfigError(f"--factor {self.factor}: choose from {', '.join(map(str, LATENT_FACTORS))}")
        if self.size % self.factor:
            raise ConfigError(f"--size {self.size}: must be a multiple of --factor {self.factor}")
        if self.patch_px % self.factor:
            raise ConfigError(f"--patch-px {self.patch_px}: must be 0 or a multiple of --factor {self.factor}")
# what `train --resume` may change: when to stop
RESUME_FIELDS: tuple[str, ...] = (*STOP_RULES, "patience", "copy_check", "max_copies")


@dataclass(frozen=True)
class SampleConfig(Checked):
    """Everything `meddiff sample` needs; checked on construction. `web`: what one request of `meddiff serve`'s
    page may ask for, where that is narrower (a cap on the work a web client can queue)."""

    run: str = option(help="a run folder written by meddiff train (under torchrun write --run-dir: torchrun "
                      "takes --run for its own --run-path)", flags=("--run", "--run-dir"))
    out: str = option(help="the folder the images are written into")
    n: int = option(4, "number of images (under torchrun write --count: torchrun reads --n as its own option)",
                    flags=("--n", "--count"), bounds=IMAGES, web=Bounds(1, 64, whole=True))
    steps: int | None = option(None, "sampler steps (default 10; 20 for seed-preset runs)", bounds=STEPS,
                               web=Bounds(1, 200, whole=True))
    sampler: str | None = option(None, "default unipc (at 10 steps as good as DDIM at 20 or better, docs/benchmarks.md); "
                                 "ddim for seed-preset runs", choices=SAMPLERS)
    seed: int = option(0, "seed of the first image; image i has seed + i", bounds=SEEDS,
                       web=Bounds(0, 2**32 - 1, whole=True))
    batch_size: int = option(16, "images per forward pass", bounds=BATCH)
    class_name: str | None = option(None, "a class the model knows, e.g. xray/pneumonia", flags=("--class",))
    per_class: int | None = option(None, "N images of each class, in class folders", bounds=IMAGES)
    masks: str | None = option(None, "a folder of label images (PNG/TIFF/BMP, label values as the model learnt "
                               "them), or a data set with label maps (images/ + masks/, builtin:phantoms?masks=1): "
                               "one image for each map (each class's with --per-class; --n is not used), written as "
                               "images/ + masks/ pairs")
    mask_run: str | None = option(None, "a run trained with --learn maps: each image's label map is drawn from it "
                                  "(its seed and class are the image's), then the image for that map; --n (or "
                                  "--per-class) pairs are written as images/ + masks/")
    mask_guidance: float = option(1.0, "classifier-free guidance of the --mask-run model's class (1 = none): "
                                  "higher draws maps more typical of the class, e.g. a lesion in more of an abnormal "
                                  "class's maps", bounds=GUIDANCE)
    augment_masks: bool = option(False, "draw new maps from the --masks ones: each image's map is one of them "
                                 "(in turn), mirrored half the time, rotated up to 15 degrees, scaled 0.85-1.15 and "
                                 "shifted up to 10 % of the side, all drawn from the image's seed; --n (or "
                                 "--per-class) images are made")
    guidance: float = option(1.0, "classifier-free guidance scale (1 = none)", bounds=GUIDANCE, web=Bounds(0, 20))
    guidance_cutoff: float = guidance_cutoff_option()
    fmt: str = option("png", "file format", flags=("--format",), choices=FORMATS, web=("png", "dicom"))
    weights: str = option("ema", "ema: the averaged weights, best: the lowest validation loss, raw: the last "
                          "checkpoint's", choices=WEIGHTS)
    cache_interval: int = option(1, "DeepCache feature reuse: full UNet every N model calls (1 = off; 2-3 is "
                                 "~1.5-2x faster)", bounds=CACHE_INTERVAL)
    precision: str = precision_option()
    device: str = device_option()
    grid: bool = option(True, "write grid.png", cli=False)
    progress: bool = option(True, "no progress bar")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_seeds(self.seed, self.n)
        if self.augment_masks and not self.masks:
            raise ConfigError("--augment-masks: draws new maps from the --masks ones; give --masks too")
        if self.mask_run and self.masks:
            raise ConfigError("--mask-run: draws each image's map, --masks gives them: use one of the two")
        if self.mask_guidance != 1.0 and not self.mask_run:
            raise ConfigError("--mask-guidance: guides the maps --mask-run draws; give --mask-run too")


@dataclass(frozen=True)
class InpaintConfig(Checked):
    """Everything `meddiff inpaint` needs: regenerate the masked region of a real image (RePaint: Lugmayr et al.
    2022), leaving every other pixel as it was. Checked on construction."""

    run: str = option(help="a run folder written by meddiff train (pixel space)", flags=("--run", "--run-dir"))
    image: str = option(help="the image to change (PNG, JPEG, TIFF, BMP, DICOM or a one-slice NIfTI)")
    mask: str = option(help="the region to regenerate: a label image of the image's size, non-zero inside; for a "
                       "run trained on label maps of anatomy and lesion (builtin:phantoms?masks=2), such a map: "
                       "its lesion is regenerated, its anatomy is what the lesion is asked with")
    out: str = option(help="the folder the results are written into (images/ + masks/ pairs)")
    n: int = option(1, "how many versions (seeds --seed, --seed + 1, …)", bounds=Bounds(1, 1000, whole=True))
    seed: int = option(0, "seed of the first version", bounds=SEEDS)
    class_name: str | None = option(None, "the class to generate inside the region, e.g. ct/abnormal",
                                    flags=("--class",))
    steps: int = option(25, "DDIM steps", bounds=STEPS)
    resample: int = option(2, "RePaint's resampling: extra passes per step that blend the region with its "
                           "surroundings (0: none)", bounds=Bounds(0, 20, whole=True))
    guidance: float = option(1.0, "classifier-free guidance scale (1 = none)", bounds=GUIDANCE)
    guidance_cutoff: float = guidance_cutoff_option()
    fmt: str = option("png", "file format (the result holds real pixels: no DICOM or NIfTI export carries it)",
                      flags=("--format",), choices=("png", "png16"))
    precision: str = precision_option()
    device: str = device_option()
    progress: bool = option(True, "no progress bar")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_seeds(self.seed, self.n)


def check_seeds(seed: int, n: int) -> None:
    """Images seed, seed + 1, …, seed + n - 1 all have valid seeds: ConfigError naming --seed and --n else."""
    if seed + n - 1 > SEEDS.hi:
        raise ConfigError(f"--seed {seed}: with --n {n} the seeds run past the largest, {SEEDS.hi}")


def web_option(opt: Option) -> Option:
    """The option as `meddiff serve`'s page offers it: its `web` bounds or choices in place of the CLI's."""
    if isinstance(opt.web, Bounds):
        return dataclasses.replace(opt, bounds=opt.web)
    return dataclasses.replace(opt, choices=opt.web) if opt.web else opt


def default_sampler(preset: str) -> tuple[str, int]:
    """(sampler, steps) when none is asked for: the seed's DDIM-20 for `seed` runs, else UniPC at 10 steps."""
    return ("ddim", 20) if preset == "seed" else ("unipc", 10)


def patch_for(preset: str, size: int) -> int:
    """The space-to-depth patch of a preset at `size` px: presets without patches keep 1; patched ones grow the
    patch with the image (the largest power of 2 ≤ size / PATCH_GRID, never below the preset's own), so the UNet's
    widest convolutions stay on a PATCH_GRID-px grid and a step costs roughly the same at 64 and 512 px (the
    "simple diffusion" recipe of Hoogeboom et al. 2023: patch, then shift the noise schedule)."""
    base = ARCHITECTURES[preset].get("patch_size", 1)
    if base == 1:
        return 1
    return max(base, 2 ** int(math.floor(math.log2(max(size // PATCH_GRID, 1)))))


def objective_for(preset: str, size: int, patch: int | None = None, maps: bool = False) -> str | None:
    """"x0" where a patched preset's patch (`patch`, else `patch_for`) is 4 or more, else None (the recipe's
    objective). With large patches each grid cell of the UNet carries 16-256 pixels; predicting the noise or v
    there leaves the noise the UNet cannot reproduce pixel by pixel in every sample (grain), while the clean image
    it can: at 256 px x0-prediction reached the real-vs-real KID and FID in 10 one-thread minutes where v left
    samples 180x as grainy as real slices (benchmarks/results/size_rules_256.json; Li & He 2025 found the same
    for large-patch transformers). A model of label maps (`maps`) always predicts the clean map: each UNet cell
    carries a channel per label value for every pixel of its patch (84 at 64 px with 21 values), and with v its
    maps came out as label noise at every pixel after 4,269 steps (the next-highest channel at +0.5 on average),
    where x0 drew clean regions after 800."""
    if maps:
        return "x0"
    return "x0" if ARCHITECTURES[preset].get("patch_size", 1) > 1 and (patch or patch_for(preset, size)) >= 4 \
        else None


def noise_shift_for(preset: str, size: int) -> float:
    """The log-SNR shift a preset's recipe uses at `size` px: the seed recipe never shifts (it is the student
    project's recipe); meddiff's presets shift by 2 ln(64 / size) above 64 px (`diffusion.shift_log_snr`)."""
    return 0.0 if preset == "seed" or size <= SHIFT_BASE else 2.0 * math.log(SHIFT_BASE / size)


def model_config(preset: str, size: int, num_classes: int = 0, patch: int | None = None, channels: int = 1,
                 latent_factor: int = 1, mask_values: tuple[int, ...] = (),
                 map_values: tuple[int, ...] = ()) -> ModelConfig:
    """The UNet of a preset at an image size (or, for a latent model, the latent grid's size, `channels` deep,
    `latent_factor` times smaller than the images; for a model of label maps, one channel per `map_values`);
    `patch` overrides the preset's rule (`patch_for`)."""
    check_value("--preset", preset, choices=PRESETS)
    arch = dict(ARCHITECTURES[preset], patch_size=patch or patch_for(preset, size))
    factor = 2 ** (len(arch["block_out_channels"]) - 1) * arch["patch_size"]
    if size % factor:
        p = arch["patch_size"]
        patched = f" (patch {p} x {factor // p} in the UNet)" if p > 1 else ""
        raise ConfigError(f"--size {size}: preset {preset!r} reduces the image by {factor}{patched}, "
                          f"so the size must be a multiple of {factor}")
    return ModelConfig(sample_size=size, num_classes=num_classes, in_channels=len(map_values) or channels,
                       latent_factor=latent_factor, mask_values=tuple(mask_values), map_values=tuple(map_values),
                       **arch)


def to_json(obj: Any) -> dict[str, Any]:
    """A config dataclass → a JSON-safe dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def from_json(cls: type, data: dict[str, Any]) -> Any:
    """A dict written by `to_json` → the dataclass, ignoring keys this version does not know."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
    return cls(**kwargs)


__all__ = ["ModelConfig", "TrainConfig", "SampleConfig", "Option", "Bounds", "ARCHITECTURES", "RECIPES", "SAMPLERS",
           "FORMATS", "DEFAULT_PRESET", "STOP_RULES", "RESUME_FIELDS", "model_config", "option", "options",
           "to_json", "from_json", "AutoencoderConfig", "LATENT_FACTORS", "InpaintConfig", "objective_for"]
