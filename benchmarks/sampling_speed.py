#!/usr/bin/env python3
"""Sampling speed at equal quality, same weights: the seed recipe's DDIM-20 loop against meddiff's samplers
(fewer steps, DeepCache feature reuse) on ONE trained UNet, the seed recipe's own, timed side by side.

    python benchmarks/sampling_speed.py                         # trains the seed recipe 20 min first
    python benchmarks/sampling_speed.py --unet RUN/unet          # reuse seed-recipe weights
    python benchmarks/sampling_speed.py --quick                  # seconds: a smoke test, not a figure

Timing: one thread; settings interleaved round-robin (round r of every setting before round r + 1 of any),
one warm-up round, --repeats timed rounds of --n-time images each. Reported: median img/s with min/max, and
the speed-up over the seed's loop as the ratio of medians with a 95 % bootstrap interval over rounds. A
speed-up above the ratio of UNet calls (full UNet calls for DeepCache) is flagged: the calls cost the same
for every sampler, so a larger figure means the machine changed speed, not the sampler.

Quality: --n samples per setting (same seeds), scored against held-out MNI slabs that the UNet never saw
(benchmarks/_heldout.py) with bootstrap intervals, beside the real-vs-real reference. Without --unet the
seed recipe trains on the training slabs first; with --unet, train it on them too (quality_per_compute.py's
seed run does) or the held-out set is not held out. Writes benchmarks/results/sampling_speed.json.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

import _results as R
from _heldout import mni_split, reference_rows, score_heldout
from _seed import seed_as_run, seed_ddim20, start_seed_train

# (sampler, steps, DeepCache interval); the seed's own loop ("seed") is always first and the baseline
SETTINGS = "ddim:20,ddim:20:2,dpmpp-2m:10,dpmpp-2m:10:2,unipc:10,unipc:8"
BASELINE = "seed recipe: DDIM 20"


def parse_settings(text: str) -> list[tuple[str, int, int]]:
    out = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise SystemExit(f"--settings {item!r}: expected sampler:steps[:deepcache_interval], e.g. unipc:10")
        out.append((parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else 1))
    return out


def label(sampler: str, steps: int, interval: int) -> str:
    return f"meddiff: {sampler} {steps}" + (f" + DeepCache {interval}" if interval > 1 else "")


def unet_calls(run, sampler: str, steps: int, interval: int) -> tuple[int, int]:
    """(UNet evaluations, full ones) per image batch: one per scheduler timestep (Heun's list holds both of its
    evaluations); with DeepCache, the full UNet runs on every interval-th call only."""
    from meddiff.sample import make_scheduler

    calls = len(make_scheduler(sampler, run.scheduler_config, steps).timesteps)
    return calls, math.ceil(calls / interval)


def train_seed(out: Path, minutes: float, size: int, split) -> Path:
    images = out / "train_images.npy"
    out.mkdir(parents=True, exist_ok=True)
    np.save(images, (split.images[split.train] * 255).round().astype(np.uint8))
    proc = start_seed_train(images, size, minutes, [], out / "seed")
    proc.communicate()
    if proc.returncode:
        raise SystemExit(f"seed recipe training failed (exit {proc.returncode})")
    return out / "seed" / "unet"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", help="a diffusers UNet2DModel folder trained by seed_recipe.py on the training slabs")
    ap.add_argument("--train-minutes", type=float, default=20, help="without --unet: train the seed recipe this long")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--settings", default=SETTINGS, help=f"meddiff settings, sampler:steps[:deepcache] (default {SETTINGS})")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    ap.add_argument("--n-time", type=int, default=10, help="images per timed repeat (one batch, as the seed samples)")
    ap.add_argument("--n", type=int, default=64, help="samples per setting for the quality scores")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bootstrap", type=int, default=200, help="resamples of the quality intervals")
    ap.add_argument("--out", default="bench_out/sampling_speed", help="work folder (the trained seed UNet)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 32 px, 3 s of training, 1 repeat, n 4")
    R.add_results_arg(ap, "sampling_speed")
    a = ap.parse_args()
    if a.quick:
        a.size, a.train_minutes, a.repeats, a.n_time, a.n, a.bootstrap = 32, 0.05, 1, 2, 8, 20
        a.settings = "ddim:20:4,unipc:5"
    torch.set_num_threads(a.threads)
    mach = R.machine("fp32")
    split = mni_split(a.size)
    unet_dir = Path(a.unet) if a.unet else train_seed(Path(a.out), a.train_minutes, a.size, split)
    run = seed_as_run(unet_dir)
    settings = parse_settings(a.settings)
    names = [BASELINE] + [label(*s) for s in settings]

    def meddiff_fn(sampler: str, steps: int, interval: int, n: int):
        from meddiff.sample import generate
        return lambda: np.concatenate([generate(run, list(range(i, min(i + 10, n))), None, sampler, steps,
                                                cache_interval=interval) for i in range(0, n, 10)])

    make = {BASELINE: lambda n: (lambda: seed_ddim20(run.unet, n))}
    make.update({label(*s): (lambda n, s=s: meddiff_fn(*s, n)) for s in settings})
    runs = R.interleaved(names, {k: R.stopwatch(make[k](a.n_time)) for k in names}, a.repeats)
    for r in runs:
        r["img_per_s"] = a.n_time / r["seconds"]

    calls = {BASELINE: (20, 20)}
    calls.update({label(*s): unet_calls(run, *s) for s in settings})
    base_t = R.per_round(runs, BASELINE)
    rows, warnings = {}, []
    for name in names:
        t = R.per_round(runs, name)
        t0 = time.time()
        imgs = make[name](a.n)()
        q = score_heldout(imgs, split, n_boot=a.bootstrap)
        speed = R.ratio_of_medians(base_t, t)  # time ratio = img/s ratio
        limit = calls[BASELINE][0] / calls[name][1]
        row = dict(img_per_s=R.median_spread(a.n_time / t), speedup=speed, verdict=R.verdict(speed["ci95"], 1.0), unet_calls=calls[name][0],
                   full_unet_calls=calls[name][1], speedup_limit=limit, exceeds_call_ratio=speed["ratio"] > limit * 1.05,
                   quality_sampling_s=time.time() - t0, **q)
        if row["exceeds_call_ratio"]:
            warnings.append(f"{name}: speed-up {speed['ratio']:.2f}x exceeds the ratio of (full) UNet calls "
                            f"{limit:.2f}x: the machine's speed changed during the run; rerun on a quiet machine")
            print("WARNING:", warnings[-1], flush=True)
        rows[name] = row
        print(f"{name}: {row['img_per_s']['median']:.3f} img/s, x{speed['ratio']:.2f} "
              f"{speed['ci95']} (limit {limit:.2f}x), KID {q['kid']:.4f} "
              f"[{q['kid_ci95'][0]:.4f}, {q['kid_ci95'][1]:.4f}]", flush=True)
    summary = dict(baseline=BASELINE, rows=rows, reference=reference_rows(split, a.bootstrap), warnings=warnings,
                   heldout=split.description, unet=str(unet_dir))
    R.write_results(a.results, "sampling_speed", mach, vars(a), runs, summary)


if __name__ == "__main__":
    main()
