#!/usr/bin/env python3
"""Sampler × steps → quality and speed for one trained run: the table and plot behind the default sampler.

    python benchmarks/sampler_quality.py --run RUN --real builtin:mni-mri --n 32 --out bench_out/samplers

For each sampler (diffusers' schedulers) and step count, the same seeds are sampled; each set is scored by
SSIM to the nearest real image (the seed's metric) and KID on meddiff's offline random-conv features
(protocol recorded), and timed. Writes OUT/samplers.json, OUT/samplers.md and OUT/samplers.png.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--real", required=True, help="the real images (data spec) the model was trained on")
    ap.add_argument("--samplers", default="ddim,dpmpp-2m,unipc,euler,heun,ddpm")
    ap.add_argument("--steps", default="5,10,20,50")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--out", default="bench_out/samplers")
    a = ap.parse_args()

    from meddiff.imagesets import images01
    from meddiff.metrics.features import get_extractor
    from meddiff.metrics.fid import compute_stats, kid
    from meddiff.metrics.ssim import ssim_figure
    from meddiff.runtime import cpu_model
    from meddiff.sample import generate, load_run

    run = load_run(a.run)
    size = run.model.sample_size
    real = images01(a.real, size)
    extractor = get_extractor("randconv", resolution=size)
    real_stats = compute_stats(real, extractor)
    seeds = list(range(a.n))
    rows = []
    for sampler in a.samplers.split(","):
        for steps in (int(s) for s in a.steps.split(",")):
            t0 = time.time()
            imgs = np.concatenate([generate(run, seeds[i:i + 16], None, sampler, steps) for i in range(0, a.n, 16)])
            secs = time.time() - t0
            s, _, _ = ssim_figure(imgs, real)
            fake_stats = compute_stats(imgs, extractor)
            k, _ = kid(fake_stats.features, real_stats.features, subset_size=min(a.n, len(real)))
            rows.append(dict(sampler=sampler, steps=steps, ssim=s.value, kid=k, img_per_s=a.n / secs))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(cpu=cpu_model(), run=str(a.run), n=a.n, feature_protocol=extractor.protocol, size=size)
    (out / "samplers.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = ["| sampler | steps | SSIM to nearest real ↑ | KID ↓ | img/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['steps']} | {r['ssim']:.3f} | {r['kid']:.4f} | {r['img_per_s']:.2f} |" for r in rows]
    (out / "samplers.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "samplers.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        rs = [r for r in rows if r["sampler"] == sampler]
        axes[0].plot([r["steps"] for r in rs], [r["ssim"] for r in rs], marker="o", label=sampler)
        axes[1].plot([r["steps"] for r in rs], [r["kid"] for r in rs], marker="o", label=sampler)
    for ax, name in zip(axes, ["SSIM to nearest real (higher is closer)", "KID, random-conv features (lower is better)"]):
        ax.set_xscale("log")
        ax.set_xlabel("steps")
        ax.set_title(name, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
