#!/usr/bin/env python3
"""Data sets larger than memory (issue 20): cache-build speed and training memory against the set's size.

    python benchmarks/data_scale.py                          # 2,000 / 20,000 / 100,000 images at 256 px
    python benchmarks/data_scale.py --counts 2000,20000      # fewer
    python benchmarks/data_scale.py --quick                  # seconds: a smoke test, not a figure

For each count N: a folder of N 8-bit PNGs at --size px (MedPhantom-4 X-ray and CT phantoms rendered once, --distinct
of them, each file a distinct copy with its own noise, so no two files are equal), then, each in a fresh process:
  build   `load_data(folder, size, cache_dir)`: the cache built from nothing (decoding in worker processes);
          wall seconds, images/s, peak RSS of the process and of its workers
  train   `meddiff train` on the cached folder for --steps steps (lean preset, batch 8): peak RSS
If training holds only its batches, the train peak RSS is the same at every N, while the set's float32 size grows
with N (26 GB at 100,000 images of 256 px). Writes benchmarks/results/data_scale.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import _results as R

CHILD_BUILD = """
import json, resource, sys, time
from meddiff.data.dataset import load_data
from meddiff.train import peak_rss_mib
t0 = time.perf_counter()
data = load_data(sys.argv[1], int(sys.argv[2]), cache_dir=sys.argv[3])
seconds = time.perf_counter() - t0
print(json.dumps(dict(images=len(data), seconds=seconds, skipped=len(data.skipped),
                      peak_rss_mib=peak_rss_mib(),
                      workers_peak_rss_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)))
"""

CHILD_TRAIN = """
import json, sys
from meddiff.cli import main
from meddiff.train import peak_rss_mib
code = main(["train", "--data", sys.argv[1], "--size", sys.argv[2], "--cache-dir", sys.argv[3], "--out", sys.argv[4],
             "--max-steps", sys.argv[5], "--batch-size", "8", "--threads", "1", "--no-progress"])
print(json.dumps(dict(code=code, peak_rss_mib=peak_rss_mib())))
"""


def make_folder(folder: Path, n: int, size: int, distinct: int) -> float:
    """N PNGs in xray/ and ct/ class folders; returns seconds."""
    from PIL import Image

    from meddiff.data.phantoms import render

    t0 = time.perf_counter()
    bases = {m: [render(m, i, 0, size, bool(i % 2)) for i in range(distinct)] for m in ("xray", "ct")}
    rng = np.random.default_rng(0)
    for k in range(n):
        m = ("xray", "ct")[k % 2]
        image = bases[m][(k // 2) % distinct] + rng.normal(0, 0.01, (size, size)).astype(np.float32)
        out = folder / m / f"{k // 1000:03d}" / f"{k:06d}.png"  # sub-folders: as archives are laid out
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(out, compress_level=1)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="2000,20000,100000")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--distinct", type=int, default=32, help="phantoms rendered per modality")
    ap.add_argument("--steps", type=int, default=20, help="training steps per count")
    ap.add_argument("--work", default="bench_out/data_scale", help="folders, caches and runs (removed per count)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 32 px, 80 and 160 images, 2 steps")
    R.add_results_arg(ap, "data_scale")
    a = ap.parse_args()
    if a.quick:
        a.counts, a.size, a.distinct, a.steps = "80,160", 32, 4, 2
    counts = [int(c) for c in a.counts.split(",")]
    mach = R.machine("fp32 data path; training at --precision auto")
    work = Path(a.work)
    runs = []
    for n in counts:
        shutil.rmtree(work, ignore_errors=True)
        folder, cache, run = work / "images", work / "cache", work / "run"
        make_s = make_folder(folder, n, a.size, a.distinct)
        png_bytes = sum(f.stat().st_size for f in folder.rglob("*.png"))
        one = {"OMP_NUM_THREADS": "1"}
        build = R.last_json([sys.executable, "-c", CHILD_BUILD, str(folder), str(a.size), str(cache)], one)
        train = R.last_json([sys.executable, "-c", CHILD_TRAIN, str(folder), str(a.size), str(cache), str(run),
                             str(a.steps)], one)
        row = dict(n=n, size=a.size, png_gib=png_bytes / 2**30, make_seconds=make_s,
                   cache_gib=sum(f.stat().st_size for f in cache.glob("*.npy")) / 2**30,
                   float32_set_gib=n * a.size**2 * 4 / 2**30,
                   build_seconds=build["seconds"], build_img_per_s=n / build["seconds"],
                   build_peak_rss_mib=build["peak_rss_mib"], build_workers_peak_rss_mib=build["workers_peak_rss_mib"],
                   train_steps=a.steps, train_code=train["code"], train_peak_rss_mib=train["peak_rss_mib"])
        print(json.dumps(row), flush=True)
        runs.append(row)
    shutil.rmtree(work, ignore_errors=True)
    rss = [r["train_peak_rss_mib"] for r in runs]
    summary = dict(counts=counts, train_peak_rss_mib=rss, train_rss_growth=max(rss) / min(rss),
                   build_img_per_s=[r["build_img_per_s"] for r in runs], cpus=os.cpu_count())
    if not a.quick:
        R.write_results(a.results, "data_scale", mach, vars(a), runs, summary)
    else:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
