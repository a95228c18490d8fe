"""The seed recipe (../shared/baselines/seed_recipe.py) as the benchmarks use it: its module, its training step,
its DDIM-20 sampling loop, its weights wrapped for meddiff's sampler, and its `train` command as a process.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import torch

import _results as R
from _results import SEED_SCRIPT


def seed_module() -> ModuleType:
    """seed_recipe.py imported as a module (it lives outside the repository, beside it)."""
    if not SEED_SCRIPT.exists():
        raise SystemExit(f"the seed recipe is missing: expected {SEED_SCRIPT}")
    spec = importlib.util.spec_from_file_location("seed_recipe", SEED_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def seed_stepper(arch: str, size: int, batch: int, seed: int = 0, device: str = "cpu") -> Callable[[], None]:
    """One training step of the seed recipe exactly as its `speed` command times it (random data, fp32):
    DDPMScheduler.add_noise, eps-MSE, AdamW at 1e-4 (`--device cuda`: the same on the GPU)."""
    sr = seed_module()
    torch.manual_seed(seed)
    model = sr.make_model(arch, size).to(device)
    sched = sr.DDPMScheduler(num_train_timesteps=sr.TRAIN_STEPS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, size, size, device=device)

    def step() -> None:
        noise = torch.randn_like(x)
        t = torch.randint(0, sr.TRAIN_STEPS, (len(x),), device=device)
        loss = torch.nn.functional.mse_loss(model(sched.add_noise(x, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


@torch.no_grad()
def seed_ddim20(unet: Any, n: int, batch: int = 10, seed: int = 0) -> np.ndarray:
    """seed_recipe.py's sample(): DDIMScheduler(1000) with 20 steps, global-seeded noise → (n, H, W) in [0, 1],
    on the UNet's device."""
    from diffusers import DDIMScheduler

    torch.manual_seed(seed)
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(20)
    size, device = unet.config.sample_size, next(unet.parameters()).device
    outs = []
    for i in range(0, n, batch):
        x = torch.randn(min(batch, n - i), 1, size, size).to(device)
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
        outs.append(((x.clamp(-1, 1) + 1) / 2)[:, 0].cpu().numpy())
    return np.concatenate(outs)


def seed_as_run(unet_dir: Path) -> Any:
    """A meddiff LoadedRun around the seed recipe's weights (linear schedule, eps prediction), so meddiff's
    samplers run on exactly the seed's UNet."""
    from diffusers import DDPMScheduler, UNet2DModel

    from meddiff.config import ModelConfig, TrainConfig
    from meddiff.diffusion import diffusers_scheduler_config
    from meddiff.sample import LoadedRun, model_id

    unet = UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False, local_files_only=True,
                                        use_safetensors=True).eval()
    c = unet.config
    mcfg = ModelConfig(tuple(c.block_out_channels), tuple(c.down_block_types), tuple(c.up_block_types),
                       c.layers_per_block, c.sample_size)
    sched = dict(DDPMScheduler(**diffusers_scheduler_config("linear", 1000, "eps", False)).config)
    return LoadedRun(unet, sched, ("all",), mcfg, TrainConfig(data="", out="", preset="seed"),
                     model_id(Path(unet_dir) / "diffusion_pytorch_model.safetensors"))


def one_thread_env(threads: int = 1) -> dict[str, str]:
    """The environment of a training process that must use one CPU thread (or `threads`)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def start_seed_train(images_npy: Path, size: int, minutes: float, snapshots: list[float], out: Path,
                     arch: str = "small") -> subprocess.Popen:
    """`seed_recipe.py train` on one thread, saving snapshots at the given minutes (its own out/snap_<s>s/)."""
    cmd = [sys.executable, str(SEED_SCRIPT), "train", "--images", str(images_npy), "--size", str(size), "--arch",
           arch, "--seconds", str(minutes * 60), "--out", str(out)]
    if snapshots:
        cmd += ["--snapshots", ",".join(str(int(round(s * 60))) for s in snapshots)]
    return subprocess.Popen(R.fresh(cmd), env=one_thread_env(), stdout=subprocess.PIPE, text=True)
