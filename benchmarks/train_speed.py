#!/usr/bin/env python3
"""Training throughput and peak memory, side by side with the seed recipe, each case in its own process.

    python benchmarks/train_speed.py                    # small@64 and seed@128, batch 10, + memory case
    python benchmarks/train_speed.py --cases small64     # one case

Cases:
  small64 / seed128   same architecture, same batch (10): seed recipe vs meddiff's training step
                      (fused AdamW, precision auto, EMA update included) → the img/s ratio
  small64cl / seed128cl  the same with the UNet in channels-last memory format (`--channels-last`)
  lean64              meddiff's default preset at 64 px, batch 16, against the seed's small@64
  mem128              `seed` preset at 128 px with effective batch 64 (micro-batch 4 + gradient checkpointing)
                      against the seed recipe's peak memory at batch 10
Prints the CPU model and precision; writes OUT (default bench_out/train_speed.json).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED_SCRIPT = ROOT.parent / "shared" / "baselines" / "seed_recipe.py"


def meddiff_step_speed(preset: str, size: int, batch: int, micro: int, steps: int, grad_ckpt: bool,
                       channels_last: bool = False, precision_flag: str = "auto") -> dict:
    """meddiff's training step (as in train.py) on random data: img/s and peak RSS of this process."""
    import copy

    import torch

    from meddiff.config import TrainConfig, model_config
    from meddiff.diffusion import alphas_cumprod, diffusion_loss, q_sample
    from meddiff.model import build_unet, denoise
    from meddiff.runtime import autocast, describe, pick_device, pick_precision
    from meddiff.train import ema_update, make_optimizer, peak_rss_mib

    cfg = TrainConfig(data="", out="", preset=preset, size=size, batch_size=batch).resolve()
    device = pick_device("auto")
    precision = pick_precision(precision_flag, device)
    mcfg = model_config(preset, size)
    unet = build_unet(mcfg).to(device)
    if grad_ckpt:
        unet.enable_gradient_checkpointing()
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = make_optimizer(unet, cfg)
    ab = alphas_cumprod(cfg.beta_schedule, 1000).float().to(device)
    x = torch.randn(batch, 1, size, size, device=device)

    def step(k: int) -> None:
        opt.zero_grad(set_to_none=True)
        for lo in range(0, batch, micro):
            x0 = x[lo:lo + micro]
            eps, t = torch.randn_like(x0), torch.randint(0, 1000, (len(x0),), device=device)
            with autocast(device, precision):
                pred = denoise(unet, q_sample(x0, eps, ab[t]), t, None, mcfg.patch_size)
            (diffusion_loss(pred, x0, eps, ab[t], cfg.objective, cfg.loss_weighting).sum() / batch).backward()
        opt.step()
        ema_update(ema, unet, cfg.ema_decay, k)

    t0 = time.time()
    step(0)
    if steps:
        t0 = time.time()
        for k in range(steps):
            step(k + 1)
    return dict(who="meddiff", preset=preset, size=size, batch=batch, micro_batch=micro, grad_checkpointing=grad_ckpt,
                channels_last=channels_last,
                train_img_per_s=max(steps, 1) * batch / (time.time() - t0), peak_rss_mib=peak_rss_mib(),
                hardware=describe(device, precision))


def run_case(argv: list[str]) -> dict:
    out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if out.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def seed_case(arch: str, size: int, batch: int, steps: int) -> dict:
    r = run_case([sys.executable, str(SEED_SCRIPT), "speed", "--arch", arch, "--size", str(size), "--batch",
                  str(batch), "--steps", str(steps)])
    return {"who": "seed", **r}


def meddiff_case(preset: str, size: int, batch: int, micro: int, steps: int, grad_ckpt: bool,
                 channels_last: bool = False, precision: str = "auto") -> dict:
    return run_case([sys.executable, __file__, "--inner",
                     json.dumps([preset, size, batch, micro, steps, grad_ckpt, channels_last, precision])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="small64,lean64,seed128,mem128")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="bench_out/train_speed.json")
    ap.add_argument("--mem-batch", type=int, default=64, help="effective batch of the mem128 case")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                    help="meddiff's precision (auto: bf16 only on CUDA or a CPU with AMX/AVX512-BF16); the seed is fp32")
    ap.add_argument("--inner", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:
        print(json.dumps(meddiff_step_speed(*json.loads(a.inner))))
        return
    from meddiff.runtime import cpu_model

    results: dict = {"cpu": cpu_model(), "cases": {}}
    cases = a.cases.split(",")
    seed_small = seed_case("small", 64, 10, a.steps) if {"small64", "small64cl", "lean64"} & set(cases) else None
    seed_big = seed_case("seed", 128, 10, a.steps) if {"seed128", "seed128cl", "mem128"} & set(cases) else None
    for case in cases:
        if case in ("small64", "small64cl"):
            m = meddiff_case("small", 64, 10, 10, a.steps, False, case.endswith("cl"), precision=a.precision)
            base = seed_small
        elif case == "lean64":
            m = meddiff_case("lean", 64, 16, 16, a.steps, False, precision=a.precision)
            base = seed_small
        elif case in ("seed128", "seed128cl"):
            m = meddiff_case("seed", 128, 10, 10, a.steps, False, case.endswith("cl"), precision=a.precision)
            base = seed_big
        elif case == "mem128":
            # peak memory is set by the micro-batch (4) and checkpointing, not by how many micro-batches are
            # accumulated: --mem-batch 64 measures the effective batch, 8 the same peak in 1/8 the time
            m = meddiff_case("seed", 128, a.mem_batch, 4, 0, True, precision=a.precision)
            base = seed_big
        else:
            raise SystemExit(f"unknown case {case!r}")
        results["cases"][case] = dict(seed=base, meddiff=m,
                                      img_per_s_ratio=m["train_img_per_s"] / base["train_img_per_s"],
                                      peak_memory_ratio=m["peak_rss_mib"] / base["peak_rss_mib"])
        print(f"{case}: meddiff {m['train_img_per_s']:.2f} img/s vs seed {base['train_img_per_s']:.2f} "
              f"(x{results['cases'][case]['img_per_s_ratio']:.2f}); peak RSS {m['peak_rss_mib']:.0f} vs "
              f"{base['peak_rss_mib']:.0f} MiB (x{results['cases'][case]['peak_memory_ratio']:.2f}); "
              f"{m['hardware']}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
