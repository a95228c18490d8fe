#!/usr/bin/env python3
"""Quality per compute, side by side in one run: the seed recipe (../shared/baselines/seed_recipe.py) against
meddiff's default recipe on the same images and the same CPU cores, then the same sampler (DDIM, 20 steps)
and the same metrics for every model.

    python benchmarks/quality_per_compute.py --data builtin:mni-mri --size 64 \
        --seed-minutes 30 --meddiff-minutes 3,30 --n 64 --out bench_out/qpc

The seed recipe and the longest meddiff run train at the same time, one thread each (OMP_NUM_THREADS=1), so
both see the same machine; shorter meddiff runs follow, also on one thread. Snapshots of the seed run at the
meddiff budgets give the seed's quality at equal time. Prints one JSON document and writes
OUT/results.json, each model's samples as OUT/<row>_samples.npy (uint8) and OUT/grid.png (one row per model).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SEED_SCRIPT = ROOT.parent / "shared" / "baselines" / "seed_recipe.py"
BANDS = ((0, 25), (25, 100), (100, 250), (250, 1000))  # seed (linear) timesteps: low noise → pure noise


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_seed(images: Path, size: int, minutes: float, snaps: list[float], out: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(SEED_SCRIPT), "train", "--images", str(images), "--size", str(size), "--arch", "small",
           "--seconds", str(minutes * 60), "--snapshots", ",".join(str(int(s * 60)) for s in snaps), "--out", str(out)]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, text=True)


def start_meddiff(data: str, size: int, minutes: float, out: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "meddiff.cli", "train", "--data", data, "--size", str(size), "--max-minutes",
           str(minutes), "--out", str(out), "--no-progress", *extra]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, text=True)


def last_json(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"a training process failed ({proc.args}):\n{out[-2000:]}")
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def seed_samples(run: Path, n: int) -> tuple[np.ndarray, float]:
    t0 = time.time()
    subprocess.run([sys.executable, str(SEED_SCRIPT), "sample", "--out", str(run), "--n", str(n), "--steps", "20"],
                   check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL)
    return np.load(run / "samples.npy").astype(np.float32) / 255.0, time.time() - t0


def meddiff_samples(run: Path, n: int) -> tuple[np.ndarray, float]:
    from meddiff.sample import generate, load_run

    loaded = load_run(run)
    t0 = time.time()
    imgs = np.concatenate([generate(loaded, list(range(i, min(i + 16, n))), None, "ddim", 20)
                           for i in range(0, n, 16)])
    return imgs, time.time() - t0


def val_loss_of(unet_dir: Path, val: torch.Tensor, objective: str, schedule: str, patch: int) -> dict:
    """Two eps-MSE validation losses, same images, noise and draws for every model: at its own schedule's
    evenly spaced timesteps (what a run logs for early stopping), and at the seed's (linear) schedule's noise
    levels, each model told its own timestep for them: the like-for-like comparison across schedules."""
    from diffusers import UNet2DModel

    from meddiff.diffusion import alphas_cumprod
    from meddiff.train import validation_loss, validation_losses

    unet = UNet2DModel.from_pretrained(unet_dir).eval()
    ab = alphas_cumprod(schedule, 1000).float()
    seed_levels = alphas_cumprod("linear", 1000).float()
    # where the seed-level loss comes from: 32 draws per image, grouped by the seed's timestep
    t, losses = validation_losses(unet, val, None, ab, objective, seed=1, patch_size=patch,
                                  noise_levels=seed_levels, reps=32)
    bands = {f"t{lo}-{hi - 1}": float(losses[(t >= lo) & (t < hi)].mean()) for lo, hi in BANDS}
    return dict(val_loss_eps=validation_loss(unet, val, None, ab, objective, seed=0, patch_size=patch),
                val_loss_eps_seed_levels=validation_loss(unet, val, None, ab, objective, seed=0,
                                                         patch_size=patch, noise_levels=seed_levels),
                val_loss_eps_seed_levels_32=float(losses.mean()), val_loss_eps_seed_levels_by_band=bands)


def score(fake: np.ndarray, real: np.ndarray, heldout: np.ndarray | None = None) -> dict:
    """fake, real (training), heldout: (N, H, W) float in [0, 1]. With held-out images, also the share of samples
    that copy a training image (nearest NCC above the 0.99 quantile of the held-out images' own nearest NCC)."""
    from meddiff.metrics.features import get_extractor
    from meddiff.metrics.fid import compute_stats, feature_scores
    from meddiff.metrics.memorization import memorization_report
    from meddiff.metrics.ssim import ssim_figure

    s, _, _ = ssim_figure(fake, real)
    extractor = get_extractor("randconv", resolution=fake.shape[-1])
    f = feature_scores(compute_stats(fake, extractor), compute_stats(real, extractor),
                       kid_subset_size=min(len(fake), len(real)))
    q = dict(ssim_mean=s.value, ssim_ci95=list(s.interval), ssim_reference=s.reference,
             kid=f["kid"], fid=f["fid"], feature_protocol=f["protocol"])
    if heldout is not None:
        m = memorization_report(fake, real, heldout, size=fake.shape[-1])
        q.update(copies_share=m.flagged_share, copies_threshold_ncc=m.threshold,
                 train_copied_share=m.train_copied_share, memorization_protocol=m.protocol)
    return q


def write_grid(out: Path, samples: dict[str, np.ndarray], per_row: int = 10) -> None:
    """OUT/grid.png: the first `per_row` samples of every model, one labelled row each (seeds 0..per_row-1)."""
    from meddiff.export import make_grid, save_png

    names = list(samples)
    tiles = np.concatenate([samples[k][:per_row] for k in names])
    save_png(make_grid(tiles, ncols=per_row, row_labels=[k.replace("_", " ") for k in names]), out / "grid.png")


def seed_as_run(unet_dir: Path):
    """A seed-recipe UNet wrapped for meddiff's sampler (linear schedule, eps prediction)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sampling_speed import wrap

    return wrap(unet_dir)


def score_existing(out: Path, budgets: list[float], a: argparse.Namespace, real: np.ndarray, val: torch.Tensor,
                   results: dict) -> None:
    """Every model sampled with the same DDIM-20 code and seeds, then scored alike."""
    from meddiff.sample import generate, load_run

    heldout = ((val[:, 0] + 1) / 2).numpy()
    results["sampler"] = "DDIM 20 steps (diffusers DDIMScheduler via meddiff.sample.generate), seeds 0..n-1"
    results["rows"], grids = {}, {}
    for m in budgets:
        snap = out / "seed" / f"snap_{int(m * 60)}s"
        candidates = [("seed", snap / "unet" if (snap / "unet").exists() else out / "seed" / "unet", "eps", "linear", 1)]
        run = out / f"meddiff_{m:g}min"
        rec = json.loads((run / "meddiff.json").read_text())
        candidates.append(("meddiff", run / "unet", rec["train"]["objective"], rec["train"]["beta_schedule"],
                           rec["model"].get("patch_size", 1)))
        for who, unet_dir, objective, schedule, patch in candidates:
            loaded = seed_as_run(unet_dir) if who == "seed" else load_run(run)
            t0 = time.time()
            imgs = np.concatenate([generate(loaded, list(range(i, min(i + 8, a.n))), None, "ddim", 20)
                                   for i in range(0, a.n, 8)])
            q = score(imgs, real, heldout)
            q["sample_img_per_s_ddim20"] = a.n / (time.time() - t0)
            q.update(val_loss_of(unet_dir, val, objective, schedule, patch))
            if who == "meddiff":
                q.update({k: rec["result"][k] for k in ("train_img_per_s", "images_seen", "steps", "peak_rss_mib")})
            results["rows"][f"{who}_{m:g}min"] = q
            np.save(out / f"{who}_{m:g}min_samples.npy", (imgs * 255).round().astype(np.uint8))
            grids[f"{who}_{m:g}min"] = imgs
            print(f"{who}_{m:g}min", json.dumps(q), flush=True)
    write_grid(out, grids)
    (out / "results.json").write_text(json.dumps(results, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="builtin:mni-mri")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed-minutes", type=float, default=30)
    ap.add_argument("--meddiff-minutes", default="3,30")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--out", default="bench_out/qpc")
    ap.add_argument("--meddiff-args", default="", help="extra flags for meddiff train, one quoted string after '=': --meddiff-args='--preset small'")
    ap.add_argument("--score-only", action="store_true",
                    help="skip training: score the runs already in --out, every model sampled by meddiff's DDIM 20")
    a = ap.parse_args()
    from meddiff.data.dataset import load_data, split
    from meddiff.runtime import cpu_model

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = sorted(float(m) for m in a.meddiff_minutes.split(","))
    data = load_data(a.data, a.size)
    train_idx, val_idx = split(data, 0.1, 0)
    real = ((data.images[:, 0] + 1) / 2).numpy()
    np.save(out / "train_images.npy", (real[train_idx] * 255).round().astype(np.uint8))  # the seed sees the same split
    val = data.images[val_idx]

    seed_run = out / "seed"
    if a.score_only:
        score_existing(out, budgets, a, real[train_idx], val, dict(cpu=cpu_model(), data=a.data, size=a.size, n=a.n,
                                                                   n_train=len(train_idx), n_val=len(val_idx)))
        return
    procs = {"seed": start_seed(out / "train_images.npy", a.size, a.seed_minutes, budgets, seed_run)}
    longest = budgets[-1]
    procs[f"meddiff_{longest:g}min"] = start_meddiff(a.data, a.size, longest, out / f"meddiff_{longest:g}min",
                                                     a.meddiff_args.split())
    train_stats = {name: last_json(p) for name, p in procs.items()}
    for m in budgets[:-1]:
        train_stats[f"meddiff_{m:g}min"] = last_json(start_meddiff(a.data, a.size, m, out / f"meddiff_{m:g}min",
                                                                   a.meddiff_args.split()))
    rows = {}
    for m in budgets:
        snap = seed_run / f"snap_{int(m * 60)}s"
        if m >= a.seed_minutes or not (snap / "unet").exists():
            snap = seed_run
        imgs, secs = seed_samples(snap, a.n)
        rows[f"seed_{m:g}min"] = dict(images=imgs, sample_s=secs, unet=snap / "unet", objective="eps",
                                      schedule="linear", patch=1, train=train_stats["seed"])
        run = out / f"meddiff_{m:g}min"
        record = json.loads((run / "meddiff.json").read_text())
        imgs, secs = meddiff_samples(run, a.n)
        rows[f"meddiff_{m:g}min"] = dict(images=imgs, sample_s=secs, unet=run / "unet",
                                         objective=record["train"]["objective"],
                                         schedule=record["train"]["beta_schedule"],
                                         patch=record["model"].get("patch_size", 1), train=train_stats[f"meddiff_{m:g}min"],
                                         hardware=record.get("hardware"))
    # the seed recipe is fp32 by definition; meddiff's precision is its own choice (auto), read from its run record
    results = dict(cpu=cpu_model(), threads_per_run=1, precision=dict(
                       seed="fp32", meddiff=rows[f"meddiff_{budgets[-1]:g}min"]["hardware"]),
                   data=a.data, size=a.size, n=a.n,
                   n_train=len(train_idx), n_val=len(val_idx), rows={})
    for name, r in rows.items():
        q = score(r["images"], real[train_idx], real[val_idx])
        q.update(val_loss_of(r["unet"], val, r["objective"], r["schedule"], r["patch"]))
        q["train_img_per_s"] = r["train"]["train_img_per_s"]
        q["peak_rss_mib"] = r["train"].get("peak_rss_mib")
        q["sample_img_per_s_ddim20"] = a.n / r["sample_s"]
        results["rows"][name] = q
        np.save(out / f"{name}_samples.npy", (r["images"] * 255).round().astype(np.uint8))
    write_grid(out, {name: r["images"] for name, r in rows.items()})
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
