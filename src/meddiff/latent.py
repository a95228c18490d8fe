"""The latent path's model half: a KL autoencoder (diffusers' `AutoencoderKL`, one channel in and out) that maps an
image (1, S, S) in [-1, 1] to a latent grid (C, S/f, S/f) and back. Latent diffusion (Rombach et al. 2022; the first
stage of MONAI Generative's and medfusion's models) trains and samples the UNet in that grid, which is f² / C times
smaller than the image, and decodes only the finished sample.

meddiff's autoencoder is small and fully convolutional (no attention in its middle block), so it trains on crops
(`train_autoencoder.py`) and applies to whole images of any size that the factor divides. Latents are scaled to
unit standard deviation over the training set before diffusion (the scale is stored in the run's own copy of the
autoencoder, as diffusers' `scaling_factor`), so the noise schedule means the same as in pixel space.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL

from . import runfolder
from .config import AutoencoderConfig
from .data.dataset import ImageSet
from .errors import RunError
from .runtime import autocast

ENCODE_BATCH = 16
RECORD_FILE = "autoencoder.json"  # an autoencoder folder's record; its weights are in vae/


def autoencoder_config(cfg: AutoencoderConfig) -> dict[str, Any]:
    """The `AutoencoderKL` arguments of a config: log2(factor) + 1 levels, `width` channels at full resolution,
    doubled at the next level and 4x from there on; one ResNet layer a level; no attention."""
    levels = int(math.log2(cfg.factor)) + 1
    channels = tuple(cfg.width * min(2**i, 4) for i in range(levels))
    return dict(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=channels, layers_per_block=1,
                latent_channels=cfg.latent_channels, norm_num_groups=8, sample_size=cfg.size,
                mid_block_add_attention=False, scaling_factor=1.0, force_upcast=False)


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL:
    return AutoencoderKL(**autoencoder_config(cfg))


def latent_factor(vae: AutoencoderKL) -> int:
    """How many times smaller than the image the latent grid is: 2 per down-sampling level."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode(vae: AutoencoderKL, x: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Images (B, 1, S, S) in [-1, 1] → the posterior means (B, C, S/f, S/f) float32, not yet scaled."""
    with autocast(x.device, precision):
        return vae.encode(x.to(vae.dtype)).latent_dist.mean.float()


@torch.no_grad()
def decode(vae: AutoencoderKL, z: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Scaled latents (B, C, h, w) → images (B, 1, h f, w f) float32, about [-1, 1] (not clamped)."""
    with autocast(z.device, precision):
        return vae.decode((z / vae.config.scaling_factor).to(vae.dtype)).sample.float()


@torch.no_grad()
def encode_set(vae: AutoencoderKL, data: ImageSet, device: torch.device, precision: str = "fp32",
               flip: bool = False, batch: int = ENCODE_BATCH, mirror: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Every image of a set (read a batch at a time, horizontally flipped with `flip`) → unscaled latents
    (N, C, h, w) float32 on the CPU. `mirror`: (latents, latents of the mirror images), each image read once."""
    out, mirrored = [], []
    for lo in range(0, len(data), batch):
        x = data.take(np.arange(lo, min(lo + batch, len(data)))).to(device)
        out.append(encode(vae, x.flip(-1) if flip else x, precision).cpu())
        if mirror:
            mirrored.append(encode(vae, x.flip(-1), precision).cpu())
    return (torch.cat(out), torch.cat(mirrored)) if mirror else torch.cat(out)


def latent_bytes(vae: AutoencoderKL, n: int, size: int) -> int:
    """Memory of `n` images' float32 latents at `size` px."""
    return n * vae.config.latent_channels * (size // latent_factor(vae)) ** 2 * 4


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Peak signal-to-noise ratio in dB of image pairs in [0, 1]: (N, H, W) x 2 → (N,)."""
    mse = ((a.astype(np.float64) - b) ** 2).reshape(len(a), -1).mean(axis=1)
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


def reconstruction_figures(vae: AutoencoderKL, data: ImageSet, device: torch.device, precision: str = "fp32",
                           seed: int = 0) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Held-out images through the autoencoder → (PSNR and SSIM, each with its 95 % bootstrap interval over
    images, the originals and reconstructions (N, S, S) in [0, 1])."""
    from .metrics.ssim import bootstrap_ci, paired_ssim

    originals, recons = [], []
    with torch.no_grad():
        for lo in range(0, len(data), ENCODE_BATCH):
            x = data.take(np.arange(lo, min(lo + ENCODE_BATCH, len(data)))).to(device)
            z = encode(vae, x, precision) * vae.config.scaling_factor
            recons.append(((decode(vae, z, precision).clamp(-1, 1) + 1) / 2)[:, 0].cpu().numpy())
            originals.append(((x + 1) / 2)[:, 0].cpu().numpy())
    a, b = np.concatenate(originals), np.concatenate(recons)
    p, s = psnr(a, b), paired_ssim(b, a)
    figures = dict(images=len(a), psnr_db=float(p.mean()), psnr_ci95=bootstrap_ci(p, seed),
                   ssim=float(s.mean()), ssim_ci95=bootstrap_ci(s, seed))
    return figures, a, b


def read_autoencoder_record(folder: str | Path) -> dict[str, Any]:
    """An autoencoder folder's record (autoencoder.json) → dict; RunError naming the file when it is not one."""
    path = Path(folder) / RECORD_FILE
    if not Path(folder).is_dir():
        raise RunError(f"--autoencoder {folder}: no such folder; make one with meddiff train-autoencoder")
    if not path.is_file():
        raise RunError(f"--autoencoder {folder}: not an autoencoder folder (no {RECORD_FILE}); make one with meddiff "
                       "train-autoencoder")
    record = runfolder.read_json_object(path, "a meddiff autoencoder record")
    if record.get("kind") != "meddiff-autoencoder" or not isinstance(record.get("config"), dict):
        raise RunError(f"{path}: not a meddiff autoencoder record (meddiff train-autoencoder writes one)")
    size = record["config"].get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 1024:
        raise RunError(f"{path}: config.size is {size!r}; expected the image size in px it was trained at")
    return record


def load_autoencoder(folder: str | Path) -> tuple[AutoencoderKL, dict[str, Any]]:
    """An autoencoder folder → (autoencoder on the CPU, its record), from its own files only."""
    record = read_autoencoder_record(folder)
    return runfolder.load_vae_folder(Path(folder) / runfolder.VAE_DIR)[0], record
