#!/usr/bin/env python3
"""Sampling speed at equal quality, same architecture: the seed recipe's DDIM-20 loop against meddiff's
samplers (fewer steps, DeepCache feature reuse) on ONE trained UNet — the seed recipe's own weights.

    python benchmarks/sampling_speed.py --unet bench_out/qpc/seed/unet --real builtin:mni-mri --n 32

The seed's loop is the one in seed_recipe.py (diffusers DDIMScheduler, 20 steps, batch 10); meddiff wraps the
same weights with the same noise schedule (linear betas, eps prediction) and samples them with each setting.
Each set is scored by SSIM to the nearest real image and KID (random-conv features), so speed-ups are only
claimed where quality holds. Writes OUT (default bench_out/sampling_speed.json).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

SETTINGS = [("ddim", 20, 1), ("ddim", 20, 2), ("dpmpp-2m", 10, 1), ("dpmpp-2m", 10, 2), ("unipc", 8, 1),
            ("dpmpp-2m", 7, 1), ("unipc", 6, 1)]


@torch.no_grad()
def seed_loop(unet, n: int, batch: int = 10) -> tuple[np.ndarray, float]:
    """seed_recipe.py's sample(): DDIMScheduler(1000) with 20 steps, global-seeded noise."""
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(20)
    size = unet.config.sample_size
    outs, t0 = [], time.time()
    for i in range(0, n, batch):
        x = torch.randn(min(batch, n - i), 1, size, size)
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
        outs.append(((x.clamp(-1, 1) + 1) / 2)[:, 0].numpy())
    return np.concatenate(outs), time.time() - t0


def wrap(unet_dir: Path):
    """A meddiff LoadedRun around the seed recipe's weights (linear schedule, eps prediction)."""
    from diffusers import DDPMScheduler, UNet2DModel

    from meddiff.config import ModelConfig, TrainConfig
    from meddiff.diffusion import diffusers_scheduler_config
    from meddiff.sample import LoadedRun, model_id

    unet = UNet2DModel.from_pretrained(unet_dir).eval()
    c = unet.config
    mcfg = ModelConfig(tuple(c.block_out_channels), tuple(c.down_block_types), tuple(c.up_block_types),
                       c.layers_per_block, c.sample_size)
    sched = dict(DDPMScheduler(**diffusers_scheduler_config("linear", 1000, "eps", False)).config)
    return LoadedRun(unet, sched, ("all",), mcfg, TrainConfig(data="", out="", preset="seed"),
                     model_id(unet_dir / "diffusion_pytorch_model.safetensors"))


def quality(images: np.ndarray, real: np.ndarray) -> dict:
    from meddiff.metrics.features import get_extractor
    from meddiff.metrics.fid import compute_stats, kid
    from meddiff.metrics.ssim import ssim_figure

    ext = get_extractor("randconv", resolution=images.shape[-1])
    k, _ = kid(compute_stats(images, ext).features, compute_stats(real, ext).features,
               subset_size=min(len(images), len(real)))
    return dict(ssim=ssim_figure(images, real)[0].value, kid=k, kid_protocol=ext.protocol)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", required=True, help="a diffusers UNet2DModel folder trained by seed_recipe.py")
    ap.add_argument("--real", required=True)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--out", default="bench_out/sampling_speed.json")
    a = ap.parse_args()
    from meddiff.imagesets import images01
    from meddiff.runtime import cpu_model, describe
    from meddiff.sample import generate

    run = wrap(Path(a.unet))
    real = images01(a.real, run.model.sample_size)
    imgs, secs = seed_loop(run.unet, a.n)
    base = dict(setting="seed recipe: DDIM 20", img_per_s=a.n / secs, **quality(imgs, real))
    rows = [base]
    print(json.dumps(base), flush=True)
    for sampler, steps, interval in SETTINGS:
        t0 = time.time()
        imgs = np.concatenate([generate(run, list(range(i, min(i + 10, a.n))), None, sampler, steps,
                                        cache_interval=interval) for i in range(0, a.n, 10)])
        row = dict(setting=f"meddiff: {sampler} {steps}" + (f" + DeepCache {interval}" if interval > 1 else ""),
                   img_per_s=a.n / (time.time() - t0), **quality(imgs, real))
        row["speedup"] = row["img_per_s"] / base["img_per_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = dict(cpu=cpu_model(), hardware=describe(torch.device("cpu"), "fp32"), n=a.n, rows=rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
