"""`meddiff evaluate` speed: 1000 generated against 1000 real images at 128 px, two classes, with the privacy audit
(1000 training images) and the utility study → one JSON line on stdout (CPU model, seconds per stage, cold and warm).

    python benchmarks/evaluate_speed.py                    # 1000 / 1000 / 1000 at 128 px
    python benchmarks/evaluate_speed.py --n 200 --size 64  # a quick look

The target: under 3 minutes on a 2-core CPU, the real set's features computed once and cached. The first run
starts with an empty cache (cold: real and training images read and their features computed); the second reads
both from the cache (warm), as evaluating a second model against the same real set does. The images are synthetic
(random blobs with texture), written as PNG class folders like `meddiff sample --per-class` writes them.
`--check-ssim K` also compares the shortlisted nearest-SSIM search with the exhaustive one on K generated images.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from meddiff.evaluate import EvalConfig, evaluate
from meddiff.runtime import cpu_model


def textured(n: int, size: int, seed: int, label: int) -> np.ndarray:
    """(n, size, size) uint8: a few blobs (brighter for class 1) over fine noise."""
    rng = np.random.default_rng([seed, label])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, size, size), np.uint8)
    for i in range(n):
        img = 0.05 * rng.random((size, size), np.float32)
        for _ in range(5):
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.04, 0.15)
            img += (0.4 + 0.3 * label) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        out[i] = np.round(np.clip(img, 0, 1) * 255)
    return out


def write_set(root: Path, n: int, size: int, seed: int) -> Path:
    for label, name in enumerate(("normal", "abnormal")):
        folder = root / name
        folder.mkdir(parents=True)
        for i, im in enumerate(textured(n // 2, size, seed, label)):
            Image.fromarray(im).save(folder / f"seed{i:06d}.png")
    return root


def check_ssim(cfg: EvalConfig, k: int) -> dict:
    """Shortlisted vs exhaustive nearest SSIM on k generated images: agreement and the mean gap."""
    from meddiff.imagesets import load_images
    from meddiff.metrics.ssim import nearest_ssim, nearest_ssim_shortlist

    fake = load_images(cfg.fake, "--fake", cfg.size, 1, None).images[:k]
    real = load_images(cfg.real, "--real", cfg.size, 1, cfg.cache_dir).images
    t = time.perf_counter()
    v_all, i_all = nearest_ssim(fake, real)
    t_all = time.perf_counter() - t
    t = time.perf_counter()
    v_short, i_short = nearest_ssim_shortlist(fake, real, cfg.ssim_shortlist)
    t_short = time.perf_counter() - t
    return {"images": k, "same_match": float((i_all == i_short).mean()), "mean_gap": float((v_all - v_short).mean()),
            "max_gap": float((v_all - v_short).max()), "exhaustive_s": round(t_all, 2),
            "shortlist_s": round(t_short, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="images per set")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--check-ssim", type=int, default=0, metavar="K")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice); on a CPU shared with "
                                                 "other jobs 1 thread is often faster than 2")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        sets = {name: write_set(root / name, a.n, a.size, seed) for seed, name in enumerate(("real", "fake", "train"))}
        write_s = time.perf_counter() - t
        cfg = EvalConfig(real=str(sets["real"]), fake=str(sets["fake"]), train=str(sets["train"]), size=a.size,
                         utility=True, cache_dir=str(root / "cache"))
        runs = {}
        for label in ("cold", "warm"):
            t = time.perf_counter()
            ev = evaluate(cfg)
            runs[label] = {"total_s": round(time.perf_counter() - t, 1), "stages_s": ev.seconds}
        out = {"benchmark": "evaluate_speed", "cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
               "images": {"real": a.n, "fake": a.n, "train": a.n}, "size": a.size, "write_pngs_s": round(write_s, 1),
               **runs, "target_s": 180, "ssim_search": ev.results["ssim"]["search"],
               "figures": {k: round(ev.results[k]["value"], 4) for k in ("ssim", "ms_ssim", "fid", "precision")}}
        if a.check_ssim:
            out["ssim_check"] = check_ssim(cfg, a.check_ssim)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
