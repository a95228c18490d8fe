#!/usr/bin/env python3
"""Sampler × steps → quality for one trained run: the table and plot behind the default sampler.

    python benchmarks/sampler_quality.py --run bench_out/qpc/meddiff_20min    # a run trained on the training slabs
    python benchmarks/sampler_quality.py --run RUN --quick                    # seconds: a smoke test

For each sampler (diffusers' schedulers) and step count the same seeds are sampled and scored against the
held-out MNI slabs (benchmarks/_heldout.py; the run must have been trained on the training slabs, as
quality_per_compute.py's runs are): KID, FID and SSIM to the nearest held-out slice with 95 % bootstrap
intervals, beside the real-vs-real reference. img/s is one timed pass per setting, indicative only (the
speed figures are sampling_speed.py's). Writes benchmarks/results/sampler_quality.json and docs/samplers.png.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import _results as R
from _heldout import mni_split, reference_rows, score_heldout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="bench_out/qpc/meddiff_20min",
                    help="a run folder trained on the training slabs (default: quality_per_compute.py's 20-min run)")
    ap.add_argument("--samplers", default="ddim,dpmpp-2m,unipc,euler,heun,ddpm")
    ap.add_argument("--steps", default="5,10,20,50")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--plot", default=str(R.ROOT / "docs" / "samplers.png"))
    ap.add_argument("--quick", action="store_true", help="smoke test: unipc and ddim at 2 steps, n 4, no plot in docs")
    R.add_results_arg(ap, "sampler_quality")
    a = ap.parse_args()
    if a.quick:
        a.samplers, a.steps, a.n, a.bootstrap = "ddim,unipc", "2", 4, 20
        a.plot = str(Path(a.results).with_suffix(".png"))
    torch.set_num_threads(a.threads)
    from meddiff.sample import generate, load_run

    run = load_run(a.run)
    mach = R.machine("fp32")
    split = mni_split(run.model.sample_size)
    seeds = list(range(a.n))
    rows, runs = [], []
    for sampler in a.samplers.split(","):
        for steps in (int(s) for s in a.steps.split(",")):
            t0 = time.time()
            imgs = np.concatenate([generate(run, seeds[i:i + 16], None, sampler, steps) for i in range(0, a.n, 16)])
            secs = time.time() - t0
            q = score_heldout(imgs, split, n_boot=a.bootstrap)
            rows.append(dict(sampler=sampler, steps=steps, img_per_s=a.n / secs, **q))
            runs.append(dict(sampler=sampler, steps=steps, seconds=secs, n=a.n))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "ssim_per_sample"}), flush=True)
    summary = dict(rows=rows, reference=reference_rows(split, a.bootstrap), heldout=split.description,
                   run=str(a.run), plot=a.plot)
    _plot(rows, Path(a.plot))
    R.write_results(a.results, "sampler_quality", mach, vars(a), runs, summary)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        rs = [r for r in rows if r["sampler"] == sampler]
        for ax, key in zip(axes, ("ssim", "kid")):
            x, y = [r["steps"] for r in rs], [r[key] for r in rs]
            lo, hi = [r[key + "_ci95"][0] for r in rs], [r[key + "_ci95"][1] for r in rs]
            ax.errorbar(x, y, yerr=[np.subtract(y, lo).clip(0), np.subtract(hi, y).clip(0)], marker="o",
                        capsize=2, label=sampler)
    for ax, name in zip(axes, ["SSIM to nearest held-out slice (higher is closer)",
                               "KID vs held-out, random-conv features (lower is better)"]):
        ax.set_xscale("log")
        ax.set_xlabel("steps")
        ax.set_title(name, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
