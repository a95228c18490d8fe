#!/usr/bin/env python3
"""One command for a GPU owner: what meddiff does on one GPU against the seed recipe, in under 8 minutes.

    python benchmarks/gpu_check.py              # on a CUDA GPU; writes benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --dry-run    # the same path on the CPU in seconds, at toy sizes: a smoke
                                                # test (tests/test_benchmarks.py), never a figure

1. train128  The seed UNet at 128 px, batch 10, side by side in one process, interleaved rounds: the seed
             recipe's step as it ran it (fp32, plain AdamW) against meddiff's training step (--precision auto:
             bf16 autocast on a GPU, fused AdamW, EMA). img/s, median and spread, ratio with its interval.
2. big       meddiff's step on the same UNet at a large batch (--big-batch, halved until it fits): img/s, the
             model FLOPs of a training step (3 x the forward FLOPs that torch's FLOP counter sees) and the share
             of the GPU's dense bf16 peak that reaches (a table of known GPUs, or --peak-tflops).
3. sample    Sampling img/s on the same UNet at 128 px, batch --sample-batch: the seed's DDIM 20 in fp32
             against meddiff's default sampler (UniPC 10) in the run precision, interleaved rounds.
4. quality   meddiff's default preset trained --minutes on the held-out split of builtin:mni-mri at 256 px
             (benchmarks/_heldout.py: slabs held out with a guard band), --n samples scored against the held-out
             slices (KID, FID on random-conv features, SSIM to the nearest, each with its 95 % interval; copies of
             training slices) beside the real-vs-real reference.

Timings synchronise the GPU before reading the clock. The GPU's name, the CPU and the precision are recorded.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import _results as R
from _heldout import mni_split, reference_rows, score_heldout
from _seed import seed_module, seed_stepper
from train_speed import meddiff_stepper

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' data sheets; match by substring.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "H100": 756.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0}

FULL = dict(device="cuda", size=128, arch="seed", batch=10, big_batch=128, sample_batch=32, steps=5, repeats=5,
            quality_size=256, minutes=2.0, n=64, bootstrap=200, preset="lean")
DRY = dict(device="cpu", size=32, arch="small", batch=2, big_batch=4, sample_batch=2, steps=1, repeats=2,
           quality_size=32, minutes=0.05, n=4, bootstrap=10, preset="tiny")


def peak_tflops(gpu: str | None, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "--peak-tflops"
    for key, value in BF16_PEAK_TFLOPS.items():
        if gpu and key.lower() in gpu.lower():
            return value, f"data sheet ({key}, dense bf16)"
    return None, "unknown GPU: pass --peak-tflops"


def synced(fn: Callable[[], Any], device: str) -> Callable[[], float]:
    """fn → a callable that runs it and returns its seconds, the GPU's queue drained before each clock read."""
    def timed() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    return timed


def train128(p: dict[str, Any], precision: str, echo: Callable[[str], None]) -> tuple[list, dict]:
    seed_step = seed_stepper(p["arch"], p["size"], p["batch"], device=p["device"])
    med_step, hardware = meddiff_stepper(p["arch"], p["size"], p["batch"], p["batch"], False, False, precision,
                                         p["device"])
    steps = p["steps"]
    timed = {"seed": synced(lambda: [seed_step() for _ in range(steps)], p["device"]),
             "meddiff": synced(lambda: [med_step() for _ in range(steps)], p["device"])}
    runs = R.interleaved(["seed", "meddiff"], timed, p["repeats"], echo=lambda m: echo(f"train128: {m}"))
    for r in runs:
        r.update(part="train128", img_per_s=steps * p["batch"] / r["seconds"])
    ips = {who: R.per_round(runs, who, "img_per_s") for who in ("seed", "meddiff")}
    ratio = R.ratio_of_medians(ips["meddiff"], ips["seed"])
    return runs, dict(seed=dict(arch=p["arch"], size=p["size"], batch=p["batch"], precision="fp32",
                                img_per_s=R.median_spread(ips["seed"])),
                      meddiff=dict(preset=p["arch"], size=p["size"], batch=p["batch"], hardware=hardware,
                                   img_per_s=R.median_spread(ips["meddiff"])),
                      ratio=ratio, verdict=R.verdict(ratio["ci95"], 1.0))


def big_batch(p: dict[str, Any], precision: str, gpu: str | None, given_peak: float | None,
              echo: Callable[[str], None]) -> tuple[list, dict]:
    from meddiff.config import model_config
    from meddiff.model import build_unet, forward_flops

    flops_image = 3.0 * forward_flops(build_unet(model_config(p["arch"], p["size"])))  # forward + backward (2x)
    batch = p["big_batch"]
    while True:
        try:
            step, hardware = meddiff_stepper(p["arch"], p["size"], batch, batch, False, False, precision, p["device"])
            step()  # warm-up, and the out-of-memory test
            break
        except torch.OutOfMemoryError:
            step = None
            torch.cuda.empty_cache()
            if batch <= 2:
                raise
            batch //= 2
            echo(f"big: out of memory, trying batch {batch}")
    timed = synced(lambda: [step() for _ in range(p["steps"])], p["device"])
    runs = [dict(part="big", setting="meddiff", round=r, warmup=False, seconds=timed()) for r in range(p["repeats"])]
    for r in runs:
        r["img_per_s"] = p["steps"] * batch / r["seconds"]
    ips = R.median_spread([r["img_per_s"] for r in runs])
    peak, peak_source = peak_tflops(gpu, given_peak)
    achieved = ips["median"] * flops_image / 1e12
    return runs, dict(preset=p["arch"], size=p["size"], batch=batch, hardware=hardware, img_per_s=ips,
                      train_flops_per_image=flops_image, achieved_tflops=achieved, peak_bf16_tflops=peak,
                      peak_source=peak_source, share_of_peak=(achieved / peak) if peak else None)


def sampling(p: dict[str, Any], precision: str, echo: Callable[[str], None]) -> tuple[list, dict]:
    from diffusers import DDIMScheduler, DDPMScheduler

    from meddiff.config import TrainConfig, default_sampler
    from meddiff.diffusion import diffusers_scheduler_config
    from meddiff.model import Denoiser
    from meddiff.runtime import pick_precision
    from meddiff.sample import make_scheduler, sample_loop

    sr = seed_module()
    torch.manual_seed(0)
    unet = sr.make_model(p["arch"], p["size"]).to(p["device"]).eval()
    prec = pick_precision(precision, torch.device(p["device"]))
    config = dict(DDPMScheduler(**diffusers_scheduler_config("linear", 1000, "eps", False)).config)
    sampler, steps = default_sampler(TrainConfig(data="", out="").preset)
    noise = torch.randn(p["sample_batch"], 1, p["size"], p["size"], device=p["device"])

    @torch.no_grad()
    def seed_way() -> None:  # seed_recipe.py's sample loop: DDIM 20, fp32, the UNet called directly
        sched = DDIMScheduler(num_train_timesteps=1000)
        sched.set_timesteps(20)
        x = noise.clone()
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample

    def meddiff_way() -> None:
        sample_loop(make_scheduler(sampler, config, steps), Denoiser(unet, precision=prec), noise)

    timed = {"seed DDIM 20 fp32": synced(seed_way, p["device"]),
             f"meddiff {sampler} {steps} {prec}": synced(meddiff_way, p["device"])}
    names = list(timed)
    runs = R.interleaved(names, timed, p["repeats"], echo=lambda m: echo(f"sample: {m}"))
    for r in runs:
        r.update(part="sample", img_per_s=p["sample_batch"] / r["seconds"])
    ips = {n: R.per_round(runs, n, "img_per_s") for n in names}
    ratio = R.ratio_of_medians(ips[names[1]], ips[names[0]])
    calls = {names[0]: 20, names[1]: steps}
    return runs, dict(arch=p["arch"], size=p["size"], batch=p["sample_batch"], unet_calls=calls,
                      img_per_s={n: R.median_spread(v) for n, v in ips.items()}, ratio=ratio,
                      most_from_calls=20 / steps, verdict=R.verdict(ratio["ci95"], 1.0))


def quality(p: dict[str, Any], precision: str, echo: Callable[[str], None]) -> dict[str, Any]:
    from meddiff.config import TrainConfig
    from meddiff.data.dataset import ImageSet
    from meddiff.sample import generate, load_run
    from meddiff.train import train

    split = mni_split(p["quality_size"])
    train_images = torch.from_numpy(split.images[split.train])[:, None] * 2 - 1
    data = ImageSet(train_images, torch.zeros(len(train_images), dtype=torch.long), ("mri",),
                    np.arange(len(train_images)))
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cfg = TrainConfig(data="builtin:mni-mri (held-out split)", out=str(run), preset=p["preset"],
                          size=p["quality_size"], max_minutes=p["minutes"], device=p["device"], precision=precision,
                          progress=False, val_fraction=0.0).resolve()
        result = train(cfg, data=data, echo=lambda m: echo(f"quality: {m}"))
        loaded = load_run(run, device=p["device"])
        t0 = time.perf_counter()
        fake = generate(loaded, list(range(p["n"])), precision=precision)
        sample_s = time.perf_counter() - t0
    scores = score_heldout(fake, split, n_boot=p["bootstrap"])
    scores.pop("ssim_per_sample", None)
    return dict(split=split.as_dict() | {"train": None, "heldout": None}, preset=p["preset"],
                size=p["quality_size"], minutes=p["minutes"], steps=result.steps, images_seen=result.images_seen,
                train_img_per_s=result.train_img_per_s, sample_seconds=sample_s, n=p["n"], meddiff=scores,
                reference=reference_rows(split, n_boot=p["bootstrap"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="the same path on the CPU at toy sizes, in seconds")
    ap.add_argument("--precision", default="auto", help="meddiff's precision (auto: bf16 where the hardware runs it)")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when it is not in the table")
    ap.add_argument("--parts", default="train128,big,sample,quality")
    ap.add_argument("--minutes", type=float, help=f"training time of the quality part (default {FULL['minutes']})")
    R.add_results_arg(ap, "gpu_check")
    a = ap.parse_args(argv)
    p = dict(DRY if a.dry_run else FULL)
    if a.minutes:
        p["minutes"] = a.minutes
    if p["device"] == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run it on one, or use --dry-run to try the path on the CPU")
        return 2
    if a.dry_run and a.results == str(R.RESULTS / "gpu_check.json"):
        a.results = None  # a dry run never overwrites the figure
    from meddiff.runtime import pick_precision

    precision = pick_precision(a.precision, torch.device(p["device"]))
    mach = R.machine(precision)
    echo = (lambda m: print(m, flush=True))
    echo(f"gpu_check{' (dry run, CPU)' if a.dry_run else ''}: {mach['gpu'] or mach['cpu']}, {precision}")
    t_start, runs, summary = time.perf_counter(), [], {}
    parts = [x for x in a.parts.split(",") if x]
    if "train128" in parts:
        r, summary["train128"] = train128(p, precision, echo)
        runs += r
    if "big" in parts:
        r, summary["big"] = big_batch(p, precision, mach["gpu"], a.peak_tflops, echo)
        runs += r
    if "sample" in parts:
        r, summary["sample"] = sampling(p, precision, echo)
        runs += r
    if "quality" in parts:
        summary["quality"] = quality(p, precision, echo)
    summary["seconds"] = time.perf_counter() - t_start
    summary["dry_run"] = a.dry_run
    for name, s in summary.items():
        if isinstance(s, dict):
            echo(f"{name}: " + ", ".join(f"{k}={v}" for k, v in s.items() if not isinstance(v, (dict, list)))[:400])
    if a.results:
        R.write_results(a.results, "gpu_check", mach, dict(p, parts=parts), runs, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
