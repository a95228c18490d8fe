"""`meddiff train-autoencoder`: the latent path's first stage. AutoencoderConfig + images → an autoencoder folder:

```
AE/vae/                 diffusers AutoencoderKL (config.json + diffusion_pytorch_model.safetensors)
AE/autoencoder.json     the record: config, architecture, data summary, split, hardware, result (held-out PSNR, SSIM)
AE/log.jsonl            one JSON line per logged step
AE/reconstructions.png  held-out images (top row) over their reconstructions (bottom row)
```
The loss is L1 on pixels plus a small KL term (LDM's weighting: `kl_weight` x the KL summed over the latent, against
the L1 summed over the pixels), on random crops of `patch_px` (the network is convolutional, so what it learns on
crops applies to whole images; a crop costs a fraction of an image). The figures are measured on whole held-out
images, split off by group (a patient's images never on both sides). The folder is written whole when training
ends (or is stopped with Ctrl-C), never half: a failure leaves nothing behind.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import __version__, runfolder
from .atomic import atomic_folder, check_out_dir, no_space_is_an_error, write_json, write_text
from .config import AutoencoderConfig, to_json
from .data.dataset import ImageSet, skipped_listing, split
from .errors import ConfigError, RunError
from .export import make_grid, save_png
from .latent import RECORD_FILE, autoencoder_config, build_autoencoder, reconstruction_figures
from .model import count_parameters
from .runtime import autocast, describe, progress_bar
from .train import StopFlag, batch_indices, peak_rss_mib, seed_mix, start

LOG_FILE = "log.jsonl"
GRID_FILE = "reconstructions.png"
SKIPPED_FILE = "skipped.txt"
DEFAULT_STEPS = 2000
MAX_FIGURE_IMAGES = 256  # held-out images the figures are measured on
WARMUP_SHARE = 0.05


@dataclass(frozen=True)
class AutoencoderResult:
    folder: Path
    steps: int
    images_seen: int
    seconds: float
    train_img_per_s: float
    final_loss: float
    psnr_db: float
    ssim: float
    peak_rss_mib: float | None
    stopped: str

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def lr_at(cfg: AutoencoderConfig, progress: float) -> float:
    """Linear warm-up over the first WARMUP_SHARE of the run, then cosine decay to 10 % of cfg.lr."""
    if progress < WARMUP_SHARE:
        return cfg.lr * max(progress / WARMUP_SHARE, 1e-3)
    x = min((progress - WARMUP_SHARE) / (1 - WARMUP_SHARE), 1.0)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * x)))


def crop_draws(step: int, seed: int, b: int, size: int, crop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, flip) for each image of step k: a pure function of (seed, k)."""
    g = torch.Generator().manual_seed(seed_mix(seed, 7, step))
    top, left = (torch.randint(0, size - crop + 1, (b,), generator=g) for _ in range(2))
    return top, left, torch.rand(b, generator=g) < 0.5


def crops(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, crop: int) -> torch.Tensor:
    """(B, 1, S, S) → (B, 1, crop, crop): each image's own window, horizontally flipped where `flip`."""
    out = torch.stack([x[i, :, t:t + crop, l:l + crop] for i, (t, l) in enumerate(zip(top.tolist(), left.tolist()))])
    return torch.where(flip.view(-1, 1, 1, 1).to(out.device), out.flip(-1), out)


def train_autoencoder(cfg: AutoencoderConfig, data: ImageSet | None = None,
                      echo: Callable[[str], None] = print) -> AutoencoderResult:
    """Train an autoencoder and write its folder (see the module's docstring). `data` may be given to skip loading
    `cfg.data` (tests, notebooks)."""
    out = check_out_dir(cfg.out, "--out", empty=True)
    device, precision, data = start(cfg, data)
    train_idx, val_idx = split(data, cfg.val_fraction, cfg.seed)
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise ConfigError(f"--data {cfg.data}: {len(data)} image(s) in {len(np.unique(data.groups))} group(s) cannot "
                          "be split into training and held-out images; give more images (or patients)")
    vae = build_autoencoder(cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=(0.5, 0.9), weight_decay=0.0)
    crop = min(cfg.patch_px or cfg.size, cfg.size)
    total = cfg.max_steps or (None if cfg.max_minutes else DEFAULT_STEPS)
    echo(f"training an autoencoder ({count_parameters(vae) / 1e6:.2f} M parameters, {cfg.size} px → "
         f"{cfg.latent_channels} x {cfg.size // cfg.factor} x {cfg.size // cfg.factor}) on {len(train_idx)} images "
         f"({len(val_idx)} held out), {crop} px crops; {describe(device, precision)}")
    log: list[dict[str, Any]] = []
    losses: list[float] = []
    step, seen, t0, stopped = 0, 0, time.time(), None
    bar = progress_bar(cfg.progress, total, 0, "step")
    with StopFlag() as flag:
        while stopped is None:
            elapsed = time.time() - t0
            progress = step / total if total else elapsed / (cfg.max_minutes * 60)
            if total and step >= total:
                stopped = "max-steps"
                break
            if not total and progress >= 1:
                stopped = "max-minutes"
                break
            lr = lr_at(cfg, progress)
            for group in opt.param_groups:
                group["lr"] = lr
            pos = batch_indices(len(train_idx), cfg.batch_size, step, cfg.seed)
            x = data.take(train_idx[pos.numpy()]).to(device)
            x = crops(x, *crop_draws(step, cfg.seed, len(x), cfg.size, crop), crop)
            g = torch.Generator(device=device).manual_seed(seed_mix(cfg.seed, 8, step))
            vae.train()
            with autocast(device, precision):
                posterior = vae.encode(x).latent_dist
                recon = vae.decode(posterior.sample(generator=g)).sample
            l1 = (recon.float() - x).abs().mean()
            kl = posterior.kl().float().mean() / x[0].numel()  # per pixel, as the L1 is
            loss = l1 + cfg.kl_weight * kl
            if not math.isfinite(float(loss.detach())):
                raise RunError(f"step {step}: the loss is {float(loss.detach())} (not finite); nothing was written. Lower --lr "
                               "or use --precision fp32")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            step, seen = step + 1, seen + len(x)
            losses.append(float(l1.detach()))
            if step % 10 == 0 or step == 1:
                log.append(dict(step=step, l1=float(np.mean(losses[-10:])), kl=float(kl.detach()), lr=lr,
                                img_per_s=seen / max(time.time() - t0, 1e-9), elapsed=time.time() - t0))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(l1=f"{np.mean(losses[-20:]):.4f}", lr=f"{lr:.1e}")
            if flag.signal is not None:
                stopped = "interrupted"
    if bar is not None:
        bar.close()
    seconds = time.time() - t0
    vae.eval()
    held = val_idx[:MAX_FIGURE_IMAGES]
    held_set = ImageSet(data.take(held), data.labels[held], data.class_names, data.groups[held])
    figures, originals, recons = reconstruction_figures(vae, held_set, device, precision, cfg.seed)
    echo(f"held-out reconstruction ({figures['images']} images): PSNR {figures['psnr_db']:.2f} dB "
         f"[{figures['psnr_ci95'][0]:.2f}, {figures['psnr_ci95'][1]:.2f}], SSIM {figures['ssim']:.3f} "
         f"[{figures['ssim_ci95'][0]:.3f}, {figures['ssim_ci95'][1]:.3f}]")
    result = AutoencoderResult(out, step, seen, seconds, seen / max(seconds, 1e-9),
                               float(np.mean(losses[-50:])) if losses else float("nan"), figures["psnr_db"],
                               figures["ssim"], peak_rss_mib(), stopped)
    record = dict(kind="meddiff-autoencoder", config=to_json(cfg), architecture=autoencoder_config(cfg),
                  data=data.summary, split=dict(train=len(train_idx), heldout=len(val_idx)),
                  hardware=describe(device, precision), meddiff_version=__version__,
                  heldout_reconstruction=figures, result=result.to_json())
    with no_space_is_an_error(f"{out}", "nothing was written"), atomic_folder(out) as tmp:
        runfolder.save_vae_folder(tmp / runfolder.VAE_DIR, vae.to("cpu"))
        write_json(tmp / RECORD_FILE, record)
        write_text(tmp / LOG_FILE, "".join(json.dumps(e) + "\n" for e in log))
        k = min(8, len(originals))
        save_png(make_grid(np.concatenate([originals[:k], recons[:k]]), ncols=k,
                           row_labels=["held-out", "reconstructed"]), tmp / GRID_FILE)
        if data.skipped:
            write_text(tmp / SKIPPED_FILE, skipped_listing(data, cfg.data))
    return result

