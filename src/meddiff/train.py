"""The training loop, readable top to bottom: TrainConfig + ImageSet → a run folder (weights, checkpoints, log).

Every random draw of step k — the data order, the noise, the timesteps, flips and label dropout — is a pure
function of (seed, k), so a resumed run replays exactly what an uninterrupted one would have done, at any
micro-batch size. Model, EMA and optimizer state are checkpointed as safetensors.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as td

from . import __version__, runfolder
from .atomic import check_out_dir
from .audit import TrainingAudit
from .config import RESUME_FIELDS, STOP_RULES, ModelConfig, TrainConfig, model_config, noise_shift_for
from .data.dataset import (ImageSet, check_memory, guard_note, load_data, loss_weighted_values, named_values,
                           skipped_listing, split)
from .diffusion import (alphas_cumprod, diffusers_scheduler_config, diffusion_loss, label_map_weight, predicted_eps,
                        q_sample)
from .errors import ConfigError, RunError
from .latent import encode_set, latent_bytes, latent_factor, load_autoencoder, read_autoencoder_record
from .metrics.memorization import at_audit_size
from .model import build_unet, count_parameters, denoise, mask_channels, null_class
from .modelcard import write_model_card
from .runfolder import RunRecord, TrainResult  # TrainResult: stored in the run record, returned by train()
from .runtime import Dist, autocast, available_memory, describe, pick_device, pick_precision, progress_bar

VAL_TIMESTEPS_PER_IMAGE = 4
MAX_VAL_IMAGES = 64
MAX_AUDIT_GALLERY = 10_000  # training images the copy check compares with (evenly spaced when more)
AUDIT_SEED = 1_000_000  # the copy check's images: seeds AUDIT_SEED + i, the same at every check
ETA_STEPS = (10, 40)  # the ETA times the steps between these (counted from the start): past the first steps' warm-up


# ---------------------------------------------------------------- pure helpers: schedule, data order, draws

def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up to cfg.lr (over warmup_steps, or else over the first warmup_fraction of the run), then
    cosine decay to 10 % at progress 1 (or constant). `progress` is step/total, or elapsed/budget for timed runs."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if not cfg.warmup_steps and cfg.warmup_fraction and progress < cfg.warmup_fraction:
        return cfg.lr * max(progress / cfg.warmup_fraction, 1.0 / 1000)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0))))


EXTENDED_PEAK = 0.5  # a run resumed towards a farther goal climbs back to at most this share of its peak rate


def rewarmed(lr: float, progress: float, since: float, start_lr: float, span: float, cap: float) -> float:
    """The schedule's `lr` for a run resumed towards a farther goal: at most `cap`, and ramped linearly from
    `start_lr` (the rate it last trained at) over `span` of the run after progress `since`. The stretched schedule
    can put the rate far above where the run stood (at the end of a cosine, 10 % of the peak, back to ~87 %), and
    a trained model at that rate can be thrown off for good: a 4,269-step run resumed towards 17,076 went from
    loss 0.07 to 0.6 at once, and with a ramp up to the stretched schedule, at 8e-4, 900 steps later; runs taken
    on at up to 5.5e-4 (55 % of the peak) kept learning. So it warms up again, as at the start, to at most `cap`
    (EXTENDED_PEAK of the peak)."""
    lr = min(lr, cap)
    if span <= 0 or progress >= since + span:
        return lr
    return start_lr + (lr - start_lr) * max(progress - since, 0.0) / span


def seed_mix(*numbers: int) -> int:
    """A 63-bit seed from several integers (splitmix-style), so nearby steps get unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for n in numbers:
        h = ((h ^ (n & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def batch_indices(n_train: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Positions (into the training indices) of the global batch of `step`: epoch-wise permutations seeded by
    (seed, epoch); the last batch of an epoch may be smaller."""
    per_epoch = math.ceil(n_train / batch)
    epoch, j = divmod(step, per_epoch)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed_mix(seed, 1, epoch)))
    return perm[j * batch:(j + 1) * batch]


def step_draws(step: int, seed: int, b: int, size: int, T: int, drop_prob: float,
               channels: int = 1) -> dict[str, torch.Tensor]:
    """Noise (b, C, S, S), timesteps (b,), flip and label-drop masks (b,) of one step, from (seed, step) alone."""
    g = torch.Generator().manual_seed(seed_mix(seed, 2, step))
    return dict(t=torch.randint(0, T, (b,), generator=g), eps=torch.randn(b, channels, size, size, generator=g),
                flip=torch.rand(b, generator=g) < 0.5, drop=torch.rand(b, generator=g) < drop_prob)


# ---------------------------------------------------------------- model pieces

def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, normalisation scales and embeddings (vectors and lookup tables)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel is ~10x faster than the per-tensor loop on CPU, where the optimizer step is memory-bound
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """Exponential moving average with warm-up: d = min(decay, (1 + k) / (10 + k)), so early weights fade fast."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - d)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


@torch.no_grad()
def timesteps_at(alpha_bar: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Fractional timesteps at which a model trained on `alpha_bar` sees the noise levels `levels` (alpha_bar
    values of another schedule): linear interpolation in log-SNR, which every schedule makes monotone in t.
    Levels outside the schedule's range are clamped to its ends."""
    own = (alpha_bar / (1 - alpha_bar)).double().log().flip(0)       # increasing in flipped t
    q = (levels / (1 - levels)).double().log().clamp(float(own[0]), float(own[-1]))
    hi = torch.searchsorted(own, q).clamp(1, len(own) - 1)
    lo = hi - 1
    frac = (q - own[lo]) / (own[hi] - own[lo]).clamp_min(1e-12)
    t_flipped = lo.double() + frac
    return (len(own) - 1 - t_flipped).float()


def validation_loss(unet: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
                    alpha_bar: torch.Tensor, objective: str, seed: int = 0, batch: int = 32,
                    patch_size: int = 1, noise_levels: torch.Tensor | None = None,
                    cond: torch.Tensor | None = None) -> float:
    """Mean eps-MSE at fixed noise and evenly spaced timesteps: the same draws at every evaluation and for
    every objective (v-predictions are converted to eps), so values compare across evaluations of a run.
    `validation_losses` gives the same losses one per draw, with their timesteps."""
    _, losses = validation_losses(unet, images, labels, alpha_bar, objective, seed, batch, patch_size, noise_levels,
                                  cond=cond)
    return float(losses.mean())


@torch.no_grad()
def validation_losses(unet: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
                      alpha_bar: torch.Tensor, objective: str, seed: int = 0, batch: int = 32,
                      patch_size: int = 1, noise_levels: torch.Tensor | None = None,
                      reps: int = VAL_TIMESTEPS_PER_IMAGE,
                      cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, eps-MSE) of each validation draw, both (N * reps,): N images at `reps` evenly spaced timesteps.

    Two recipes with different schedules put different noise levels at timestep t, so their losses at equal t
    measure different tasks (eps-MSE grows with the signal-to-noise ratio). To compare them, pass
    `noise_levels`, a reference schedule's alpha_bar (e.g. the seed's linear one): each model is then noised at
    those levels and told the (fractional) timestep of its own schedule at which it learned them."""
    n = len(images)
    levels = alpha_bar if noise_levels is None else noise_levels
    T = len(levels)
    g = torch.Generator().manual_seed(seed_mix(seed, 3))
    t_all = (torch.arange(n * reps) * T // (n * reps)).flip(0)[torch.randperm(n * reps, generator=g)]
    eps_all = torch.randn(n * reps, *images.shape[1:], generator=g)
    device = next(unet.parameters()).device
    losses = torch.empty(n * reps, dtype=torch.float64)
    for i in range(0, n * reps, batch):
        idx = torch.arange(i, min(i + batch, n * reps))
        x0, eps, t = images[idx % n].to(device), eps_all[idx].to(device), t_all[idx]
        ab = levels[t.to(levels.device)].to(device)
        x_t = q_sample(x0, eps, ab)
        lab = labels[idx % n].to(device) if labels is not None else None
        t_model = t if noise_levels is None else timesteps_at(alpha_bar.cpu(), ab.cpu())
        c = cond[idx % n].to(device) if cond is not None else None
        pred = denoise(unet, x_t, t_model.to(device), lab, patch_size, c).float()
        losses[idx] = (predicted_eps(pred, x_t, ab, objective) - eps).pow(2).mean(dim=(1, 2, 3)).double().cpu()
    return t_all, losses


def activation_bytes_per_image(unet: torch.nn.Module, mcfg: ModelConfig, device: torch.device,
                               precision: str) -> int:
    """Bytes autograd saves for backward for one training image, counted with saved-tensor hooks on a real
    forward pass (no allocator or platform specifics, so the same on CPU and CUDA)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = torch.zeros(1, mcfg.in_channels, mcfg.sample_size, mcfg.sample_size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    lab = torch.zeros(1, dtype=torch.long, device=device) if mcfg.num_classes else None
    cond = (torch.zeros(1, mcfg.cond_channels, mcfg.sample_size, mcfg.sample_size, device=device)
            if mcfg.cond_channels else None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device, precision):
        denoise(unet, x, t, lab, mcfg.patch_size, cond).float().mean().backward()
    unet.zero_grad(set_to_none=True)
    return total


def auto_micro_batch(unet: torch.nn.Module, mcfg: ModelConfig, batch: int, device: torch.device, precision: str,
                     budget_fraction: float = 0.5) -> int:
    """The largest micro-batch whose activations fit in `budget_fraction` of the free memory (at least 1)."""
    per_image = max(activation_bytes_per_image(unet, mcfg, device, precision), 1)
    fits = int(available_memory(device) * budget_fraction // (per_image * 1.3))  # 30 % for workspace and grads
    return max(1, min(batch, fits))


# ---------------------------------------------------------------- the copy check (--copy-check, --max-copies)

def _audit_images(data: ImageSet, idx: np.ndarray) -> np.ndarray:
    """The images at `idx` in [0, 1] at the copy audit's size, read a chunk at a time (a large set at 512 px is
    never expanded whole)."""
    return np.concatenate([at_audit_size(((data.take(idx[i:i + 256])[:, 0] + 1) / 2).numpy())
                           for i in range(0, len(idx), 256)])


def _spread(idx: np.ndarray, n: int) -> np.ndarray:
    """n of the indices `idx`, evenly spaced over them (so over the classes of a set sorted by class)."""
    return idx[np.linspace(0, len(idx) - 1, n).round().astype(int)]


class _CopyGuard:
    """--copy-check N in the loop: at each validation, audit N images sampled with the weights the run exports
    (`audit.TrainingAudit`), log the share that copies a training image, and keep the last weights at or under
    --max-copies; past it the run stops and exports those."""

    def __init__(self, cfg: TrainConfig, data: ImageSet, train_idx: np.ndarray, val_idx: np.ndarray,
                 conditional: bool, has_masks: bool, echo: Callable[[str], None]) -> None:
        gallery = train_idx if len(train_idx) <= MAX_AUDIT_GALLERY else _spread(train_idx, MAX_AUDIT_GALLERY)
        if len(gallery) < len(train_idx):
            echo(f"--copy-check: compares with {len(gallery)} of the {len(train_idx)} training images, evenly spaced")
        pick = _spread(train_idx, cfg.copy_check)  # their classes and label maps condition the audited images
        self.audit = TrainingAudit(_audit_images(data, gallery), _audit_images(data, val_idx[:MAX_VAL_IMAGES]),
                                   data.labels[pick].numpy() if conditional else None,
                                   data.take_masks(pick)[:, 0].numpy() if has_masks else None,
                                   [AUDIT_SEED + i for i in range(cfg.copy_check)])
        if self.audit.warning:
            echo(f"warning: {self.audit.warning}")
        self.limit, self.clean, self.share = cfg.max_copies, None, 0.0
        self.view: Any = None  # the sample.LoadedRun the checks sample with, set once the model exists

    def check(self, net: torch.nn.Module, step: int, run: Path, precision: str) -> float:
        """Audit `net` now: the share of the audited images flagged as copies, also written to the log."""
        was = net.training
        net.eval()
        vae = self.view.vae
        try:
            if vae is not None:
                vae.to(next(net.parameters()).device)
            result = self.audit.check(dataclasses.replace(self.view, unet=net, vae=vae), precision)
        finally:
            net.train(was)
            if vae is not None:
                vae.to("cpu")
        self.share = result.flagged_share
        runfolder.append_log(run, dict(step=step, copies=self.share, copy_threshold=self.audit.threshold))
        if self.limit is None or self.share <= self.limit:
            self.clean = (step, runfolder.state_dict_cpu(net))
        return self.share

    def exported(self, net: torch.nn.Module, step: int, run: Path, echo: Callable[[str], None]) -> torch.nn.Module:
        """The weights to export after the check stopped the run: those of the last check at or under the limit."""
        n = len(self.audit.seeds)
        what = (f"stopped at step {step}: {self.share:.0%} of {n} images sampled there copy a training image "
                f"(--max-copies {self.limit:g})")
        if self.clean is None:
            echo(f"{what}; no check was at or under it, so the exported weights are these, and they copy: train "
                 f"on more images, or stop earlier")
            return net
        kept = copy.deepcopy(net)
        kept.load_state_dict(self.clean[1])
        runfolder.append_log(run, dict(step=step, exported_weights_step=self.clean[0]))
        echo(f"{what}; the exported weights are step {self.clean[0]}'s, the last check at or under it")
        return kept


# ---------------------------------------------------------------- run folder

def _prepare_run(cfg: TrainConfig, resume: bool, main: bool = True) -> tuple[TrainConfig, RunRecord | None]:
    """Check the run folder; on resume, return the stored config (no flags needed; stopping criteria given in
    `cfg` replace the stored ones, to extend a run) and the run record. Only the main process writes."""
    run = Path(cfg.out)
    if resume:
        record = runfolder.read_record(run)
        stored = record.train
        given = {k: getattr(cfg, k) for k in RESUME_FIELDS if getattr(cfg, k) is not None}
        if set(given) & set(STOP_RULES):  # a new stopping rule replaces the old one
            stored = _replace(stored, **{k: None for k in STOP_RULES})
        stored = _replace(stored, **given, out=str(run), progress=cfg.progress)  # the folder given, even if moved
        if given and main:  # so that a second interruption resumes towards the extended goal
            record = replace(record, train=stored)
            runfolder.write_record(run, record)
        return stored, record
    check_out_dir(run, "--out")
    if cfg.autoencoder is not None and cfg.size is None:  # a latent run's images are the autoencoder's size
        cfg = _replace(cfg, size=int(read_autoencoder_record(cfg.autoencoder)["config"]["size"]))
    if main and runfolder.has_record(run):
        raise ConfigError(f"--out {run}: already holds a meddiff run; continue it with `meddiff train --resume {run}`"
                          " or choose another --out")
    return cfg.resolve(), None


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (a second Ctrl-C still interrupts)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


RESIDENT_SHARE = 0.25  # of a GPU's free memory: a set smaller than this is kept there whole, as float32


def batch_images(data: ImageSet, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """How a step gets its images: `images(indices) → (k, 1, S, S)` on `device`. A set given as a tensor, or one
    that takes under RESIDENT_SHARE of a GPU's free memory, is moved there whole once (no copy per step). Else,
    and always on the CPU, each batch reads only its own images from the cache (`ImageSet.take`), so training's
    memory does not grow with the data set and a set larger than memory trains."""
    need = len(data) * data.size**2 * 4
    if data.in_memory or (device.type == "cuda" and need <= RESIDENT_SHARE * available_memory(device)):
        resident = data.images.to(device)
        return lambda idx: resident[idx]
    return lambda idx: data.take(idx.cpu()).to(device, non_blocking=True)


def _mask_values(cfg: TrainConfig, data: ImageSet, record: RunRecord | None,
                 echo: Callable[[str], None]) -> tuple[int, ...]:
    """The label values a new run conditions on (one input channel each): those of the data's label maps, unless
    --masks off or the data have none. A resumed run keeps its own and needs maps again."""
    if record is not None:
        if record.model.cond_channels and not data.has_masks:
            raise RunError(f"--resume {cfg.out}: the run conditions on label maps and its data no longer have them")
        return record.model.mask_values
    if cfg.masks == "off" or not data.has_masks:
        return ()
    if not data.mask_values:
        echo("note: every label map is background only: training without them")
        return ()
    echo(f"conditioning on label maps: label value(s) {', '.join(map(str, data.mask_values))}")
    return data.mask_values


def _weighted_values(cfg: TrainConfig, data: ImageSet, mask_values: tuple[int, ...],
                     echo: Callable[[str], None]) -> tuple[int, ...] | None:
    """The label values --mask-loss-weight weights (`dataset.loss_weighted_values`), said once."""
    if not cfg.mask_loss_weight:
        return None
    values = loss_weighted_values(named_values(data.summary), mask_values)
    echo(f"--mask-loss-weight {cfg.mask_loss_weight:g}: " + (
        "the loss inside every labelled region" if values is None else
        f"the loss inside the lesion (label value {values[0]}), the {len(mask_values) - 1} other structures weighted "
        "as the background"))
    return values


MAP_CHUNK = 256  # label maps turned into channels at a time


def _map_data(cfg: TrainConfig, data: ImageSet, record: RunRecord | None,
              echo: Callable[[str], None]) -> tuple[ImageSet, tuple[int, ...]]:
    """--learn maps: the set's label maps become what the model denoises, one channel per label value (0 first;
    +1 where the map has the value, -1 elsewhere, as `mask_channels` shows a map to an image model), with the set's
    labels and groups and no maps beside them (the model conditions on its class alone). → (that set, the values).
    A resumed run keeps its own values, and its data may hold no others."""
    if cfg.autoencoder is not None:
        raise ConfigError("--learn maps: a model of label maps learns them in pixels; leave out --autoencoder")
    if cfg.copy_check:
        raise ConfigError("--copy-check: audits sampled images, and a model of label maps (--learn maps) makes "
                          "none; screen what its maps make with `meddiff audit`")
    if cfg.mask_loss_weight:
        raise ConfigError("--mask-loss-weight: weights an image's loss inside its label map; a model of label maps "
                          "(--learn maps) has no map beside what it learns")
    if not data.has_masks:
        raise ConfigError(f"--learn maps: --data {cfg.data} has no label maps (a folder of images/ + masks/, "
                          "builtin:phantoms?masks=1)")
    values = record.model.map_values if record is not None else (0, *data.mask_values)
    unknown = sorted(set(data.mask_values) - set(values))
    if unknown:
        raise RunError(f"--resume {cfg.out}: the data's label maps hold value(s) {unknown} the run does not learn "
                       f"(it learns {', '.join(map(str, values))})")
    if len(values) < 2:
        raise ConfigError(f"--learn maps: every label map of --data {cfg.data} is background only: nothing to learn")
    check_memory("the label maps as channels", len(data), len(data) * len(values) * data.size ** 2 * 4)
    channels = torch.cat([mask_channels(data.take_masks(np.arange(lo, min(lo + MAP_CHUNK, len(data)))), values)
                          for lo in range(0, len(data), MAP_CHUNK)])
    echo(f"learning the label maps: one channel per label value ({', '.join(map(str, values))})")
    return data.with_images(channels, keep_masks=False), values


@dataclass
class _Latents:
    """A latent run's view of its data: the autoencoder (its scaling_factor set), the flipped images' latents
    (when training flips) and what the record keeps of the autoencoder."""

    vae: Any
    flipped: ImageSet | None
    summary: dict[str, Any]


def _latent_data(cfg: TrainConfig, data: ImageSet, train_idx: np.ndarray, record: RunRecord | None, run: Path,
                 device: torch.device, precision: str, echo: Callable[[str], None]
                 ) -> tuple[TrainConfig, ImageSet, _Latents]:
    """Encode the whole set (and its mirror images, when training flips) once with the autoencoder: a new run's
    from the --autoencoder folder, scaled to unit standard deviation over the training images; a resumed run's
    from its own copy (RUN/vae/), with the scale it stored. → (config with the latent grid's noise shift, the
    latents as an ImageSet with the data's labels and groups, _Latents)."""
    if record is not None:
        vae, _ = runfolder.load_run_vae(run, record.model)
        summary = dict(record.autoencoder)
    else:
        vae, ae_record = load_autoencoder(cfg.autoencoder)
        summary = dict(factor=latent_factor(vae), latent_channels=vae.config.latent_channels,
                       trained_size=ae_record["config"].get("size"),
                       heldout_reconstruction=ae_record.get("heldout_reconstruction", {}))
    factor = latent_factor(vae)
    if cfg.size % factor:
        raise ConfigError(f"--size {cfg.size}: the autoencoder makes latents {factor}x smaller; the size must be a "
                          f"multiple of {factor}")
    copies = 2 if cfg.flip else 1
    check_memory("the latents of the data set", len(data) * copies, latent_bytes(vae, len(data), cfg.size) * copies)
    vae = vae.to(device).eval()
    echo(f"encoding {len(data)} images{' and their mirror images' if cfg.flip else ''} with the autoencoder "
         f"(latents {vae.config.latent_channels} x {cfg.size // factor} x {cfg.size // factor})")
    z, z_mirror = encode_set(vae, data, device, precision, mirror=True) if cfg.flip else \
        (encode_set(vae, data, device, precision), None)
    if record is None:
        vae.register_to_config(scaling_factor=float(1.0 / z[torch.as_tensor(train_idx)].std().clamp_min(1e-6)))
        summary["scaling_factor"] = vae.config.scaling_factor
    scale = float(vae.config.scaling_factor)
    flipped = None if z_mirror is None else ImageSet(z_mirror * scale, data.labels, data.class_names, data.groups)
    if cfg.noise_shift is None:
        cfg = _replace(cfg, noise_shift=noise_shift_for(cfg.preset, cfg.size // factor))
    latents = data.with_images(z * scale)  # with the set's label maps, at the images' resolution
    return cfg, latents, _Latents(vae.to("cpu"), flipped, summary)


def _latent_model(cfg: TrainConfig, latents: ImageSet, num_classes: int,
                  mask_values: tuple[int, ...] = ()) -> ModelConfig:
    """The UNet of a new latent run: the preset at the latent grid's size and depth (and the label maps' channels
    folded onto that grid, `ModelConfig.cond_channels`)."""
    _, channels, grid, _ = latents.take([0]).shape
    try:
        return model_config(cfg.preset, grid, num_classes, patch=cfg.patch, channels=channels,
                            latent_factor=cfg.size // grid, mask_values=mask_values)
    except ConfigError as err:
        raise ConfigError(f"--autoencoder {cfg.autoencoder}: its latent grid is {grid} px at --size {cfg.size}, "
                          f"which preset {cfg.preset!r} cannot take ({err})") from None


STATE_KEYS = ("step", "images_seen", "elapsed", "best_val_loss", "bad_evals", "recent_losses", "optimizer")


def _checkpoint_state(step: int, images_seen: int, elapsed: float, best: float | None, bad_evals: int,
                      losses: list[float], rewarm: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """A checkpoint's state.json (with "optimizer" added by `_save`): STATE_KEYS, all needed to resume, and the
    re-warm-up a resume towards a farther goal started (`rewarmed`'s since, start_lr, span), if any."""
    return dict(step=step, images_seen=images_seen, elapsed=elapsed, best_val_loss=best, bad_evals=bad_evals,
                recent_losses=losses[-50:], **({"lr_rewarm": list(rewarm)} if rewarm else {}))


def _save(run: Path, cfg: TrainConfig, step: int, unet: torch.nn.Module, ema: torch.nn.Module | None,
          opt: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
    opt_tensors, opt_meta = runfolder.optimizer_tensors(opt)
    weights = {"model": runfolder.state_dict_cpu(unet), "optimizer": opt_tensors}
    if ema is not None:
        weights["ema"] = runfolder.state_dict_cpu(ema)
    return runfolder.save_checkpoint(run, step, weights, {**state, "optimizer": opt_meta}, keep=cfg.keep_checkpoints)


def goal_moved_up(cfg: TrainConfig, step: int, before: float, lr: float, resumed_lr: float,
                  rewarm: tuple[float, float, float] | None) -> bool:
    """Whether a resumed run's goal moved its rate up: the schedule asks for `lr`, well above `resumed_lr` (what the
    checkpoint's last step, at progress `before`, trained at), and no longer gives that last step its own rate (a
    run resumed inside its first warm-up climbs too, on the same schedule: that resume stays exact)."""
    then = lr_at(cfg, step - 1, before)
    if rewarm is not None:
        then = rewarmed(then, before, *rewarm, EXTENDED_PEAK * cfg.lr)
    return lr > 1.5 * resumed_lr and not math.isclose(then, resumed_lr, rel_tol=0.01)


def _stored_rewarm(state: dict[str, Any]) -> tuple[float, float, float] | None:
    """The re-warm-up a checkpoint's run was in (`_checkpoint_state`), or None (none, or not three numbers)."""
    got = state.get("lr_rewarm")
    if isinstance(got, list) and len(got) == 3 and all(isinstance(v, (int, float)) for v in got):
        return float(got[0]), float(got[1]), float(got[2])
    return None


def _warmup_span(cfg: TrainConfig, total: int | None) -> float:
    """The share of the run the recipe warms up over: warmup_steps of the goal, else warmup_fraction; 5 % when the
    recipe has none (a constant rate never jumps, so this is only for a cosine recipe without a warm-up)."""
    if cfg.warmup_steps and total:
        return cfg.warmup_steps / total
    return cfg.warmup_fraction or 0.05


def _restore(run: Path, unet: torch.nn.Module, ema: torch.nn.Module | None, opt: torch.optim.Optimizer,
             echo: Callable[[str], None]) -> dict[str, Any] | None:
    """Load the newest checkpoint that verifies into the modules → its state (None: no checkpoint yet); says
    which newer ones were damaged and skipped."""
    names = ("model", "optimizer") + (("ema",) if ema is not None else ())
    last = runfolder.newest_verified_checkpoint(run, names, STATE_KEYS)
    if last is None:
        return None
    if last.damaged:
        echo(f"checkpoint {'; '.join(last.damaged)}; resuming from {last.folder.name}")
    try:
        unet.load_state_dict(last.weights["model"])
        if ema is not None:
            ema.load_state_dict(last.weights["ema"])
        runfolder.load_optimizer(opt, last.weights["optimizer"], last.state["optimizer"])
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as err:
        raise RunError(f"{last.folder}: does not fit this run's model ({runfolder.one_line(err)})") from None
    return last.state


def _stop_reason(cfg: TrainConfig, step: int, total: int | None, elapsed: float) -> str | None:
    if cfg.max_steps is not None and step >= cfg.max_steps:
        return "max-steps"
    if cfg.epochs is not None and total is not None and step >= total:
        return "epochs"
    if cfg.max_minutes is not None and elapsed >= cfg.max_minutes * 60:
        return "max-minutes"
    return None


def eta_line(step: int, total: int, s_per_step: float, seconds_left: float | None) -> str:
    """'step 40 of 3000: 0.150 s a step, about 7.4 min to go', and when `seconds_left` of a time limit end the
    run first, near which step it will stop."""
    line = f"step {step} of {total}: {s_per_step:.3f} s a step, about {(total - step) * s_per_step / 60:.1f} min to go"
    if seconds_left is not None and (total - step) * s_per_step > seconds_left:
        line += (f"; the time limit ({seconds_left / 60:.1f} min left) will stop training near step "
                 f"{step + int(seconds_left / s_per_step)}")
    return line


# ---------------------------------------------------------------- the loop

def start(cfg: Any, data: ImageSet | None, device: torch.device | None = None
          ) -> tuple[torch.device, str, ImageSet]:
    """What every training loop does first (a TrainConfig or an AutoencoderConfig): the device and precision, the
    seed of the model's initialisation (every later draw has its own generator), the data at the size asked for."""
    device = device or pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    data = data if data is not None else load_data(cfg.data, cfg.size, crop=cfg.crop, label_depth=cfg.label_depth,
                                                   cache_dir=cfg.cache_dir)
    if data.size != cfg.size:
        raise ConfigError(f"--size {cfg.size}: the data given are {data.size} px")
    return device, precision, data


def train(cfg: TrainConfig, data: ImageSet | None = None, *, resume: bool = False,
          echo: Callable[[str], None] = print, dist: Dist = Dist(), device: torch.device | None = None) -> TrainResult:
    """Train (or resume) a run. `data` may be given to skip loading `cfg.data` (notebooks, tests).
    With `dist` (several processes under torchrun, process group already initialised), every rank computes its
    slice of the same global batch and gradients are summed with the engine's all-reduce; rank 0 writes.
    A new run that fails before its first complete checkpoint leaves nothing that would block a second attempt."""
    new_run = dist.main and not resume and not runfolder.has_record(cfg.out)
    created = not Path(cfg.out).exists()
    try:
        return _train(cfg, data, resume, echo, dist, device)
    except BaseException:
        if new_run:
            runfolder.discard_unsaved_run(cfg.out, created)
        raise


def _train(cfg: TrainConfig, data: ImageSet | None, resume: bool, echo: Callable[[str], None], dist: Dist,
           device: torch.device | None) -> TrainResult:
    if dist.main:
        cfg, record = _prepare_run(cfg, resume)
        if resume:
            for p in runfolder.remove_temporaries(cfg.out):
                echo(f"removed {p}, left behind by an interrupted save")
    _barrier(dist)
    if not dist.main:
        cfg, record = _prepare_run(cfg, resume, main=False)
    if not dist.main:
        echo = _silent
    run = Path(cfg.out)
    device, precision, data = start(cfg, data, device)
    conditional = cfg.conditional == "on" or (cfg.conditional == "auto" and len(data.class_names) > 1)
    if record and record.class_names != data.class_names:
        raise RunError(f"--resume {run}: the data's classes {list(data.class_names)} differ from the run's "
                       f"{list(record.class_names)}")
    train_idx, val_idx = split(data, cfg.val_fraction, cfg.seed, cfg.val_split)
    if len(train_idx) == 0:
        raise ConfigError(f"--data {cfg.data}: no training images left after the validation split")
    map_values: tuple[int, ...] = ()
    if cfg.learn == "maps":  # from here on `data` is the set's label maps, one channel per value
        data, map_values = _map_data(cfg, data, record, echo)
    mask_values = _mask_values(cfg, data, record, echo)
    if cfg.mask_loss_weight and not mask_values:
        raise ConfigError("--mask-loss-weight: weights the loss inside label maps, and this run has none (the data "
                          "have no masks/, or --masks off)")
    weighted = _weighted_values(cfg, data, mask_values, echo)
    if cfg.max_copies is not None and not cfg.copy_check:
        raise ConfigError("--max-copies: needs --copy-check N, the images to sample and audit at each validation")
    if cfg.copy_check and not len(val_idx):
        raise ConfigError("--copy-check: needs held-out images to set the copy threshold; --val-fraction is 0")
    guard = (_CopyGuard(cfg, data, train_idx, val_idx, conditional, bool(mask_values), echo)
             if cfg.copy_check and dist.main else None)  # on pixels, before a latent run swaps them for latents
    latent = None
    if cfg.autoencoder is not None:  # the latent path: from here on `data` is the set's latents
        cfg, data, latent = _latent_data(cfg, data, train_idx, record, run, device, precision, echo)
    n_classes = len(data.class_names) if conditional else 0
    mcfg: ModelConfig = (record.model if record else
                         model_config(cfg.preset, cfg.size, n_classes, patch=cfg.patch, mask_values=mask_values,
                                      map_values=map_values)
                         if latent is None else _latent_model(cfg, data, n_classes, mask_values))
    if record is None and dist.main:
        run.mkdir(parents=True, exist_ok=True)  # only now, so that a failed start leaves no empty run folder
        record = RunRecord(train=cfg, model=mcfg, class_names=tuple(data.class_names), data=data.summary,
                           split=dict(train=len(train_idx), val=len(val_idx)), hardware=describe(device, precision),
                           processes=dist.world, meddiff_version=__version__,
                           autoencoder=latent.summary if latent is not None else {})
        runfolder.write_record(run, record)
        if latent is not None:
            runfolder.save_vae_folder(run / runfolder.VAE_DIR, latent.vae)
    if data.summary.get("upsampled") and dist.main:
        shapes = sorted(data.summary.get("source_shapes", {}))
        shapes = ", ".join(shapes[:5]) + (f" and {len(shapes) - 5} more" if len(shapes) > 5 else "")
        echo(f"note: {data.summary['upsampled']} of {len(data)} images are smaller than {cfg.size} px (source sizes "
             f"{shapes}) and were upsampled: finer detail than the sources hold cannot be learnt")
    if data.skipped and dist.main:
        listing = runfolder.write_skipped(run, skipped_listing(data, cfg.data))
        files = data.summary.get("files")
        echo(f"skipped {len(data.skipped)}{f' of {files}' if files else ''} files (unreadable or not images); "
             f"listed in {listing}")

    unet = build_unet(mcfg).to(device)
    if cfg.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(unet).requires_grad_(False).eval() if cfg.ema_decay > 0 else None
    if guard is not None:
        from .sample import LoadedRun

        guard.view = LoadedRun(None, diffusers_scheduler_config(
            cfg.beta_schedule, cfg.num_train_timesteps, cfg.objective, cfg.zero_terminal_snr, cfg.timestep_spacing,
            cfg.shift, mcfg.latent), tuple(data.class_names), mcfg, cfg, "training",
            latent.vae if latent is not None else None)
    opt = make_optimizer(unet, cfg)
    forward = torch.compile(unet) if cfg.compile else unet
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    alpha_bar = alphas_cumprod(cfg.beta_schedule, cfg.num_train_timesteps, cfg.zero_terminal_snr,
                               cfg.shift).float().to(device)
    images = batch_images(data, device)
    flipped = batch_images(latent.flipped, device) if latent is not None and latent.flipped is not None else None
    masks = (lambda i: data.take_masks(i.cpu()).to(device)) if mcfg.cond_channels else None  # (b, 1, S, S) maps
    labels = data.labels.to(device) if conditional else None
    train_pos = torch.as_tensor(train_idx, device=device)
    val_images, val_labels = data.take(val_idx[:MAX_VAL_IMAGES]), data.labels[val_idx[:MAX_VAL_IMAGES]]
    val_cond = (mask_channels(masks(torch.as_tensor(val_idx[:MAX_VAL_IMAGES])), mcfg.mask_values,
                              mcfg.latent_factor).cpu() if masks is not None else None)
    B, mb = cfg.batch_size, cfg.micro_batch or cfg.batch_size
    if cfg.micro_batch == 0:  # "auto"
        mb = auto_micro_batch(unet, mcfg, B, device, precision)
        echo(f"micro-batch auto: {mb} of {B} images per forward pass")
    per_epoch = math.ceil(len(train_idx) / B)
    total = cfg.max_steps or (cfg.epochs * per_epoch if cfg.epochs else None)
    if total is None and cfg.max_minutes is None:
        total = 2000
        cfg = _replace(cfg, max_steps=total)
    val_every = cfg.val_every or max(1, (total or 1000) // 10)
    ckpt_every = cfg.checkpoint_every or val_every

    step, images_seen, elapsed0, best, bad_evals, losses = 0, 0, 0.0, None, 0, []
    st = _restore(run, unet, ema, opt, echo) if resume else None
    saved_at = None if st is None else st["step"]  # the step of the newest checkpoint that verifies
    rewarm, resumed_lr = None, None
    cap = EXTENDED_PEAK * cfg.lr  # the highest rate a resume towards a farther goal climbs back to
    if st is not None:
        step, images_seen, elapsed0 = st["step"], st["images_seen"], st["elapsed"]
        best, bad_evals, losses = st["best_val_loss"], st["bad_evals"], list(st["recent_losses"])
        rewarm = _stored_rewarm(st)
        resumed_lr = float(opt.param_groups[0]["lr"])  # the rate the checkpoint's last step trained at
        echo(f"resuming {run} at step {step}")
    echo(f"training {cfg.preset} ({count_parameters(unet) / 1e6:.2f} M parameters) on "
         f"{len(train_idx)} images ({len(val_idx)} held out{guard_note(len(data), len(train_idx), len(val_idx))}), "
         f"{len(data.class_names)} class(es)"
         f"{' conditional' if conditional else ''}; {describe(device, precision)}")

    bar = progress_bar(cfg.progress, total, step, "step") if dist.main else None
    t_start, stopped, seen_at_start, step_at_start, t_eta = time.time(), None, images_seen, step, 0.0
    with StopFlag() as flag:
        while True:
            elapsed = elapsed0 + time.time() - t_start
            if dist.active and cfg.max_minutes is not None:
                elapsed = _rank0_float(elapsed, dist, device)  # timed runs follow rank 0's clock
            stopped = _stop_reason(cfg, step, total, elapsed)
            if stopped:
                break
            progress = step / total if total else elapsed / (cfg.max_minutes * 60)
            scheduled = lr_at(cfg, step, progress)
            lr = scheduled if rewarm is None else rewarmed(scheduled, progress, *rewarm, cap)
            if resumed_lr is not None:  # the first step after a resume: has the goal moved the rate up?
                before = (step - 1) / total if total else elapsed0 / (cfg.max_minutes * 60)
                if goal_moved_up(cfg, step, before, lr, resumed_lr, rewarm):
                    rewarm = (progress, resumed_lr, _warmup_span(cfg, total))
                    echo(f"the goal moved: the learning rate warms up again from {resumed_lr:.2g} to "
                         f"{min(lr, cap):.2g} over {rewarm[2]:.0%} of the run, then follows the stretched schedule "
                         f"below {cap:.2g}")
                    lr = rewarmed(scheduled, progress, *rewarm, cap)
                resumed_lr = None
            for group in opt.param_groups:
                group["lr"] = lr
            pos = batch_indices(len(train_idx), B, step, cfg.seed)
            draws = {k: v.to(device) for k, v in step_draws(step, cfg.seed, len(pos), mcfg.sample_size,
                                                           cfg.num_train_timesteps, cfg.cond_drop_prob,
                                                           mcfg.in_channels).items()}
            mine = torch.tensor_split(torch.arange(len(pos)), dist.world)[dist.rank].to(device)  # this rank's slice
            n_global = len(pos)
            idx = train_pos[pos.to(device)][mine]
            draws = {k: v[mine] for k, v in draws.items()}
            unet.train()
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for lo in range(0, len(idx), mb):  # gradient accumulation over micro-batches of the global batch
                sl = slice(lo, lo + mb)
                x0 = images(idx[sl])
                flip = draws["flip"][sl].view(-1, 1, 1, 1)
                if cfg.flip:  # a latent is not flipped: the flipped image's own latent is taken
                    x0 = torch.where(flip, x0.flip(-1) if flipped is None else flipped(idx[sl]), x0)
                cond = weight = None
                if masks is not None:  # the image's map, flipped with it; none where the condition is dropped
                    m = masks(idx[sl])
                    m = torch.where(flip, m.flip(-1), m) if cfg.flip else m
                    cond = mask_channels(m, mcfg.mask_values, mcfg.latent_factor)
                    dropped = draws["drop"][sl].view(-1, 1, 1, 1)
                    cond = torch.where(dropped, torch.zeros_like(cond), cond)
                    if cfg.mask_loss_weight:  # only where the model is shown the map: p(x) stays evenly weighted
                        weight = label_map_weight(m, cfg.mask_loss_weight, mcfg.latent_factor, weighted)
                        weight = torch.where(dropped, torch.ones_like(weight), weight)
                ab = alpha_bar[draws["t"][sl]]
                x_t = q_sample(x0, draws["eps"][sl], ab)
                lab = None
                if labels is not None:
                    lab = torch.where(draws["drop"][sl], null_class(mcfg), labels[idx[sl]])
                with autocast(device, precision):
                    pred = denoise(forward, x_t, draws["t"][sl], lab, mcfg.patch_size, cond)
                loss = diffusion_loss(pred, x0, draws["eps"][sl], ab, cfg.objective, cfg.loss_weighting,
                                      cfg.min_snr_gamma, weight).sum() / n_global
                (scaler.scale(loss) if scaler else loss).backward()
                step_loss += float(loss.detach())
            if dist.active:
                step_loss = _allreduce_grads(unet, step_loss, device)
            if not math.isfinite(step_loss):
                latest = runfolder.latest_checkpoint(run)
                raise RunError(f"step {step}: the loss is {step_loss} (not finite); stopped without saving. "
                               f"The last good checkpoint is {latest or 'none yet'}; lower --lr or use --precision fp32")
            if scaler:
                scaler.unscale_(opt)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if ema is not None:
                ema_update(ema, unet, cfg.ema_decay, step)
            step, images_seen = step + 1, images_seen + n_global
            losses.append(step_loss)
            elapsed = elapsed0 + time.time() - t_start
            rate = (images_seen - seen_at_start) / max(time.time() - t_start, 1e-9)
            if step % 10 == 0 or step == 1:
                if dist.main:
                    runfolder.append_log(run, dict(step=step, loss=float(np.mean(losses[-10:])), lr=lr,
                                                   img_per_s=rate, elapsed=elapsed))
            if step - step_at_start == ETA_STEPS[0]:
                t_eta = time.time()
            elif step - step_at_start == ETA_STEPS[1] and total:
                if bar is not None:
                    bar.clear()  # the line goes above the bar, not through it
                left = None if cfg.max_minutes is None else cfg.max_minutes * 60 - elapsed
                echo(eta_line(step, total, (time.time() - t_eta) / (ETA_STEPS[1] - ETA_STEPS[0]), left))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", img_s=f"{rate:.1f}", lr=f"{lr:.1e}")
            if len(val_idx) and step % val_every == 0:
                v = validation_loss(ema or unet, val_images, val_labels if conditional else None, alpha_bar,
                                    cfg.objective, cfg.seed, patch_size=mcfg.patch_size, cond=val_cond)
                if dist.main:
                    runfolder.append_log(run, dict(step=step, val_loss=v, elapsed=elapsed))
                if best is None or v < best:
                    best, bad_evals = v, 0
                    if dist.main:
                        runfolder.save_model_folder(run, ema or unet, record, weights="best")
                else:
                    bad_evals += 1
                if cfg.patience is not None and bad_evals > cfg.patience:
                    stopped = "early-stopping"
                if cfg.copy_check:  # the audit samples on the main process; every rank stops with it
                    share = 0.0
                    if guard is not None:
                        share = guard.check(ema or unet, step, run, precision)
                        if bar is not None:
                            bar.clear()
                        echo(f"step {step}: {share:.0%} of {cfg.copy_check} images sampled now copy a training image")
                    if _any_rank(cfg.max_copies is not None and share > cfg.max_copies, dist, device):
                        stopped = "copies"
            interrupted = _any_rank(flag.signal is not None, dist, device)
            if dist.main and (step % ckpt_every == 0 or interrupted or stopped):
                _save(run, cfg, step, unet, ema, opt,
                      _checkpoint_state(step, images_seen, elapsed, best, bad_evals, losses, rewarm))
                saved_at = step
            if interrupted:
                stopped = "interrupted"
            if stopped:
                break
    if bar is not None:
        bar.close()
    elapsed = elapsed0 + time.time() - t_start
    result = TrainResult(run, step, images_seen, elapsed, images_seen / max(elapsed, 1e-9),
                         float(np.mean(losses[-50:])) if losses else float("nan"), best, peak_rss_mib(), stopped)
    if not dist.main:
        _barrier(dist)
        return result
    if stopped != "interrupted":
        state = _checkpoint_state(step, images_seen, elapsed, best, bad_evals, losses, rewarm)
        if saved_at != step:  # not latest_checkpoint(): a damaged one skipped on resume may hold this step
            _save(run, cfg, step, unet, ema, opt, state)
    exported = guard.exported(ema or unet, step, run, echo) if stopped == "copies" and guard is not None else ema or unet
    runfolder.save_model_folder(run, exported, record)
    record = replace(record, result=result)
    runfolder.write_record(run, record)
    write_model_card(run, record=record)
    _barrier(dist)
    return result


# ---------------------------------------------------------------- several processes (torchrun)

def _silent(_message: str) -> None:
    pass


def _barrier(dist: Dist) -> None:
    if dist.active:
        td.barrier()


def _allreduce_grads(unet: torch.nn.Module, step_loss: float, device: torch.device) -> float:
    """Sum every rank's gradients (each already divided by the GLOBAL batch size, so the sum is the global
    mean) and the step loss, in one flat all-reduce of the engine; returns the global step loss. Ranks whose
    slice of a short last batch is empty contribute zeros."""
    params = [p for p in unet.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([step_loss], device=device, dtype=grads[0].dtype)])
    td.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()
    return float(flat[-1])


def _any_rank(flag: bool, dist: Dist, device: torch.device) -> bool:
    """True on every rank when any rank saw Ctrl-C/SIGTERM, so all stop after the same step."""
    if not dist.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t.item())


def _rank0_float(value: float, dist: Dist, device: torch.device) -> float:
    """Rank 0's value on every rank (timed runs stop on rank 0's clock)."""
    t = torch.tensor([value], device=device, dtype=torch.float64)
    td.broadcast(t, src=0)
    return float(t.item())


def peak_rss_mib() -> float | None:
    """This process's own peak resident memory in MiB: Linux's VmHWM, the high-water mark of the memory this
    program mapped. Not getrusage's ru_maxrss where VmHWM exists: a child keeps its parent's ru_maxrss across
    fork and exec, so a run started by a large process (a notebook, a benchmark holding its data) would report
    the parent's peak. Elsewhere (macOS, BSD) ru_maxrss; None without either."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, kB elsewhere


def _replace(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    return dataclasses.replace(cfg, **changes)
