#!/usr/bin/env python3
"""Quality per compute, one command: the seed recipe (../shared/baselines/seed_recipe.py) against meddiff's
default recipe, trained side by side on the same training slices, one thread each, then sampled with the same
sampler and seeds and scored against held-out slices that neither saw.

    python benchmarks/quality_per_compute.py                     # --minutes 2,4,20 (about 45 min on 2 cores)
    python benchmarks/quality_per_compute.py --minutes 3,30
    python benchmarks/quality_per_compute.py --quick             # seconds: a smoke test, not a figure
    python benchmarks/quality_per_compute.py --size 256 --systems meddiff,latent --minutes 50   # pixel vs latent
    python benchmarks/quality_per_compute.py --size 256 --systems meddiff --minutes 60 --threads 2   # both cores
    python benchmarks/quality_per_compute.py --data phantoms --size 256 --systems meddiff --minutes 60 --threads 2

Data (--data): `mni` is `builtin:mni-mri` split by benchmarks/_heldout.py (whole 8-slice slabs held out, a guard
band of dropped slices between them and the training slices); `phantoms` is MedPhantom-4 rendered natively at
--size, --n-train phantoms of one render seed training and --n-heldout of another held out (other simulated
subjects), --modalities (default all 4) x normal/abnormal: meddiff trains class-conditional on them and samples
every class in turn (sample i asks for class i mod the number of classes; the unconditional seed recipe cannot be
asked). Both recipes train on the same training images (8-bit, as the seed reads them); meddiff keeps its own
validation share of them for early stopping, as it always does.
Training: every run on one thread (--threads), as many at once as the cores hold (two on 2 cores), longest first:
the seed recipe trains for the longest budget, saving snapshots at the shorter ones; meddiff's and the latent
path's shorter budgets are separate runs (their schedules depend on the budget). No two runs share a core:
three systems on 2 cores take longer in all, never fewer steps each.
Systems (--systems): `seed` (the student recipe), `meddiff` (the default pixel recipe at --size) and `latent`
(meddiff's latent path: `meddiff train-autoencoder` for --ae-share of the budget, then `meddiff train
--autoencoder` for the rest, so it gets the same minutes in all). The latent rows add the autoencoder's PSNR and
SSIM on the held-out slices.
Scoring: every model sampled by meddiff's DDIM 20 (diffusers' DDIMScheduler) with seeds 0..n-1 (a
class-conditional one at --guidance, default 1: no classifier-free guidance); KID, FID
(random-conv features) and SSIM to the nearest held-out slice with 95 % bootstrap intervals, the share of
samples that copy a training slice, the pixel-scale detail against the held-out slices' (1 = real; grain is
far above), and the eps-MSE on the held-out slices at the seed's noise levels (512 draws) with its interval; the real-vs-real reference (two held-out halves) in the same table.
Writes benchmarks/results/quality_per_compute.json, OUT/ (runs, samples) and docs/qpc_grid.png.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import _results as R
from _heldout import HeldOutSplit, mni_split, phantom_split, reference_rows, score_heldout
from _seed import one_thread_env, seed_as_run, start_seed_train

BANDS = ((0, 25), (25, 100), (100, 250), (250, 1000))  # seed (linear) timesteps: low noise → pure noise
VAL_REPS = 16  # draws per held-out slice: 32 slices x 16 = 512 draws


def start_meddiff(data: Path, size: int, minutes: float, out: Path, extra: list[str],
                  threads: int = 1) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "meddiff.cli", "train", "--threads", str(threads), "--data", str(data), "--size",
           str(size), "--max-minutes", str(minutes), "--out", str(out), "--no-progress", *extra]
    return subprocess.Popen(cmd, env=one_thread_env(threads), stdout=subprocess.PIPE, text=True)


def start_latent(data: Path, size: int, minutes: float, out: Path, extra: list[str],
                 ae_share: float, threads: int = 1) -> subprocess.Popen:
    """meddiff's latent path as one process chain on one thread: the autoencoder for `ae_share` of the minutes,
    then diffusion in its latents for the rest (its JSON line is the diffusion run's)."""
    ae = [sys.executable, "-m", "meddiff.cli", "train-autoencoder", "--threads", str(threads), "--data", str(data), "--size",
          str(size), "--max-minutes", f"{minutes * ae_share:g}", "--out", str(out / "ae"), "--no-progress"]
    dm = [sys.executable, "-m", "meddiff.cli", "train", "--threads", str(threads), "--data", str(data), "--size", str(size),
          "--autoencoder", str(out / "ae"), "--max-minutes", f"{minutes * (1 - ae_share):g}", "--out",
          str(out / "run"), "--no-progress", *extra]
    script = " && ".join(" ".join(f"'{a}'" for a in cmd) for cmd in (ae, dm))
    return subprocess.Popen(["bash", "-c", script], env=one_thread_env(threads), stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: stopping it stops both stages


def last_json(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"a training process failed ({proc.args}):\n{out[-2000:]}")
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def write_training_data(split: HeldOutSplit, out: Path) -> tuple[Path, Path]:
    """The training images as 8-bit images twice: out/train_images.npy (the seed reads it) and a PNG folder
    out/train_png/ (meddiff reads it; one class folder per class where the data have classes): the same pixels
    for both."""
    from PIL import Image

    u8 = (split.images[split.train] * 255).round().astype(np.uint8)
    npy, folder = out / "train_images.npy", out / "train_png"
    np.save(npy, u8)
    for i, im in zip(split.train, u8):
        where = folder / split.classes[i] if split.classes else folder
        where.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(where / f"slice_{i:03d}.png")
    return npy, folder


def training_jobs(budgets: list[float], systems: list[str]) -> list[tuple[str, float]]:
    """The training processes, longest first: every system at the longest budget (the seed's run saves snapshots
    at the shorter ones), then meddiff's and the latent path's shorter budgets (their schedules depend on the
    budget, so they are separate runs)."""
    longest = budgets[-1]
    return [(who, longest) for who in systems] + [(who, m) for m in reversed(budgets[:-1]) for who in systems
                                                  if who != "seed"]


def core_slots(threads: int) -> int:
    """How many `threads`-thread training processes run at once: as many as this process's cores hold, so no
    two share a core (2 cores, one thread each: two at a time)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // threads)


def run_jobs(jobs: list[tuple[str, float]], start: Callable[[str, float], subprocess.Popen],
             slots: int) -> dict[str, dict]:
    """Run every job's process, at most `slots` at once, each started as soon as one ends, in the jobs' order
    (longest first: the runs finish close together); returns each process's last JSON line by job name. When one
    fails, the jobs not started are dropped and the running ones stopped before its error is raised."""
    running: list[subprocess.Popen] = []
    lock, stopping = threading.Lock(), threading.Event()

    def one(job: tuple[str, float]) -> dict:
        with lock:  # no run starts once stopping has begun
            if stopping.is_set():
                raise SystemExit("stopped")
            running.append(start(*job))
            proc = running[-1]
        return last_json(proc)
    pool = ThreadPoolExecutor(max_workers=slots)
    futures = {job_name(*job): pool.submit(one, job) for job in jobs}
    try:
        done, _ = wait(futures.values(), return_when=FIRST_EXCEPTION)
        failed = next((f.exception() for f in done if f.exception()), None)
        if failed:  # raised now, not after the runs still going
            raise failed
        return {name: f.result() for name, f in futures.items()}
    finally:
        with lock:
            stopping.set()
            for proc in running:
                try:
                    if proc.poll() is None:  # a process group of its own (the latent chain): all of it
                        os.killpg(proc.pid, signal.SIGKILL) if os.getpgid(proc.pid) == proc.pid else proc.kill()
                except ProcessLookupError:  # it ended meanwhile
                    pass
        pool.shutdown(wait=True, cancel_futures=True)


def job_name(who: str, minutes: float) -> str:
    return "seed" if who == "seed" else f"{who}_{minutes:g}min"


def train_all(out: Path, budgets: list[float], size: int, systems: list[str], extra: list[str], npy: Path,
              png: Path, ae_share: float, threads: int = 1) -> dict:
    """Every training run on `threads` threads, as many at once as the cores hold, longest first."""
    def start(who: str, m: float) -> subprocess.Popen:
        if who == "seed":
            return start_seed_train(npy, size, m, budgets[:-1], out / "seed")
        if who == "meddiff":
            return start_meddiff(png, size, m, out / f"meddiff_{m:g}min", extra, threads)
        return start_latent(png, size, m, out / f"latent_{m:g}min", extra, ae_share, threads)
    return run_jobs(training_jobs(budgets, systems), start, core_slots(threads))


def record_shift(train: dict) -> float | tuple[float, float]:
    """A run record's log-SNR shift as `diffusion.alphas_cumprod` takes it (`TrainConfig.shift`)."""
    shift = train.get("noise_shift") or 0.0
    return shift if train.get("noise_shift_clean") is None else (train["noise_shift_clean"], shift)


def val_losses(unet_dir: Path, held: torch.Tensor, objective: str, schedule: str, patch: int,
               shift: float | tuple[float, float] = 0.0, labels: torch.Tensor | None = None) -> dict:
    """eps-MSE on the held-out slices at the seed's (linear) noise levels, each model told its own timestep for
    them (on its own, possibly shifted, schedule); same images, noise and draws for every model. Mean, 95 %
    bootstrap interval over draws, by band."""
    from diffusers import UNet2DModel

    from meddiff.diffusion import alphas_cumprod
    from meddiff.train import validation_losses

    unet = UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False, local_files_only=True,
                                        use_safetensors=True).eval()
    t, losses = validation_losses(unet, held, labels, alphas_cumprod(schedule, 1000, shift=shift).float(), objective, seed=1,
                                  patch_size=patch, noise_levels=alphas_cumprod("linear", 1000).float(), reps=VAL_REPS)
    losses, t = losses.numpy(), t.numpy()
    band = {f"t{lo}-{hi - 1}": float(losses[(t >= lo) & (t < hi)].mean()) for lo, hi in BANDS}
    boot = R.bootstrap_mean(losses)
    return dict(val_eps_mse=boot["value"], val_eps_mse_ci95=boot["ci95"], val_draws=boot["n"],
                val_eps_mse_by_band=band)


def heldout_labels(split: HeldOutSplit, class_names: list[str]) -> torch.Tensor | None:
    """The held-out images' class indices in a conditional run's class order (None for an unconditional one)."""
    if len(class_names) < 2 or not split.classes:
        return None
    return torch.tensor([class_names.index(split.classes[i]) for i in split.heldout])


def models(out: Path, budgets: list[float], longest: float, systems: list[str]) -> dict[str, dict]:
    """Every model to score: name → unet folder, how to sample it, its objective/schedule/patch size."""
    rows = {}
    for m in budgets:
        if "seed" in systems:
            snap = out / "seed" / f"snap_{int(round(m * 60))}s"
            unet = snap / "unet" if m < longest else out / "seed" / "unet"
            if not (unet / "config.json").exists():
                raise SystemExit(f"{unet} is missing: the seed run saved no weights at {m:g} min (no step finished?)")
            rows[f"seed_{m:g}min"] = dict(who="seed", minutes=m, unet=unet, objective="eps", schedule="linear",
                                          patch=1, shift=0.0)
        for who in (w for w in systems if w != "seed"):
            run = out / f"{who}_{m:g}min" / ("run" if who == "latent" else "")
            rec = json.loads((run / "meddiff.json").read_text())
            rows[f"{who}_{m:g}min"] = dict(who=who, minutes=m, unet=run / "unet", run=run,
                                           objective=rec["train"]["objective"],
                                           schedule=rec["train"]["beta_schedule"], shift=record_shift(rec["train"]),
                                           patch=rec["model"].get("patch_size", 1), hardware=rec.get("hardware"),
                                           class_names=rec.get("class_names") or [],
                                           result=rec.get("result", {}))
    return rows


def autoencoder_figures(run: Path, split: HeldOutSplit) -> dict:
    """The latent run's autoencoder on the held-out slices: PSNR and SSIM with their intervals."""
    from meddiff.data.dataset import ImageSet
    from meddiff.latent import reconstruction_figures
    from meddiff.runfolder import load_run_vae, read_record

    vae, _ = load_run_vae(run, read_record(run).model)
    held = torch.from_numpy(split.images[split.heldout])[:, None] * 2 - 1
    data = ImageSet(held, torch.zeros(len(held), dtype=torch.long), ("all",), np.arange(len(held)))
    figures, _, _ = reconstruction_figures(vae, data, torch.device("cpu"))
    return {f"autoencoder_{k}": v for k, v in figures.items()}


def requested(row: dict, n: int) -> list[str] | None:
    """The class each of a class-conditional run's n samples asked for (`sample`'s order); None: unconditional."""
    names = row.get("class_names") or []
    return [names[i % len(names)] for i in range(n)] if len(names) > 1 else None


def class_figures(imgs: np.ndarray, asked: list[str], split: HeldOutSplit, n_boot: int) -> dict:
    """Samples of a class-conditional run judged by meddiff's classifier (meddiff.metrics.classifier, as `meddiff
    evaluate` judges them) fitted on the real images, training and held-out: the share judged the class they asked
    for, overall and per class; its reference is the same classifier fitted without the held-out images and scored
    on them."""
    from meddiff.metrics.classifier import class_consistency, classifier_features
    from meddiff.metrics.features import RandConvFeatures

    names = tuple(sorted(set(split.classes)))
    conv = RandConvFeatures(64)
    lab = np.concatenate([split.train, split.heldout])
    x_lab = classifier_features(split.images[lab], conv(split.images[lab]))
    y_lab = np.array([names.index(split.classes[i]) for i in lab])
    y_fake = np.array([names.index(c) for c in asked])
    return class_consistency(x_lab, y_lab, classifier_features(imgs, conv(imgs)), y_fake, names,
                             np.isin(lab, split.heldout), n_boot=n_boot)


def sample(row: dict, n: int, guidance: float = 1.0) -> np.ndarray:
    """n samples, seeds 0..n-1; a class-conditional run's sample i asks for class i mod (its classes), with
    classifier-free guidance at `guidance` (1: the conditional model alone)."""
    from meddiff.sample import generate, load_run

    loaded = seed_as_run(row["unet"]) if row["who"] == "seed" else load_run(row["run"])  # latent: decoded
    if not loaded.conditional:
        return np.concatenate([generate(loaded, list(range(i, min(i + 8, n))), None, "ddim", 20)
                               for i in range(0, n, 8)])
    k, parts = len(loaded.class_names), {}
    for label in range(k):
        seeds = list(range(label, n, k))
        for i in range(0, len(seeds), 8):
            parts.update(zip(seeds[i:i + 8], generate(loaded, seeds[i:i + 8], label, "ddim", 20, guidance)))
    return np.stack([parts[i] for i in range(n)])


def clips_x0(row: dict) -> bool:
    """Whether the sampler clipped the predicted x_0 to [-1, 1] at every step (the pixel models; a latent run
    never since `diffusion.diffusers_scheduler_config` learned that latents lie outside it)."""
    from meddiff.runfolder import scheduler_config

    return True if row["who"] == "seed" else bool(scheduler_config(row["run"]).get("clip_sample"))


def write_grid(path: Path, samples: dict[str, np.ndarray], per_row: int = 10) -> None:
    """The first `per_row` samples of every model (seeds 0..per_row-1), one labelled row each."""
    from meddiff.export import make_grid, save_png

    tiles = np.concatenate([s[:per_row] for s in samples.values()])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(make_grid(tiles, ncols=min(per_row, min(len(s) for s in samples.values())),
                       row_labels=[k.replace("_", " ") for k in samples]), path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", default="2,4,20", help="training budgets, comma-separated; each side gets each")
    ap.add_argument("--data", choices=("mni", "phantoms"), default="mni",
                    help="mni: builtin:mni-mri slabs (default); phantoms: MedPhantom-4, held out by render seed")
    ap.add_argument("--n-train", type=int, default=800, help="--data phantoms: training phantoms (default 800)")
    ap.add_argument("--n-heldout", type=int, default=96, help="--data phantoms: held-out phantoms (default 96)")
    ap.add_argument("--modalities", default="", help="--data phantoms: which, comma-separated (default all four)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n", type=int, default=64, help="samples per model (seeds 0..n-1)")
    ap.add_argument("--holdout-every", type=int, default=4, help="hold out every k-th 8-slice slab")
    ap.add_argument("--guard", type=int, default=4, help="training slices this close to a held-out one are dropped")
    ap.add_argument("--bootstrap", type=int, default=200, help="resamples of the KID/FID intervals")
    ap.add_argument("--out", default="bench_out/qpc", help="work folder: training data, runs, samples")
    ap.add_argument("--grid", default=str(R.ROOT / "docs" / "qpc_grid.png"))
    ap.add_argument("--meddiff-args", default="",
                    help="extra flags for meddiff train, one quoted string after '=': --meddiff-args='--preset small'")
    ap.add_argument("--systems", default="seed,meddiff", help="which to train: seed, meddiff, latent (comma-separated)")
    ap.add_argument("--ae-share", type=float, default=0.2,
                    help="share of each budget the latent path spends on its autoencoder (default 0.2)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads of each meddiff training process (default 1: side by side, one each; 2 for "
                         "one system on both cores)")
    ap.add_argument("--score-only", action="store_true", help="skip training: score the runs already in --out")
    ap.add_argument("--guidance", type=float, default=1.0,
                    help="classifier-free guidance scale of a class-conditional model's samples (default 1: none; "
                         "with --score-only, the same trained runs judged at another scale)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 32 px, --minutes 0.05,0.1, n 8, results and grid under --out")
    R.add_results_arg(ap, "quality_per_compute")
    a = ap.parse_args()
    if a.quick:
        a.size, a.n, a.bootstrap, a.out = 32, 8, 20, a.out if a.out != "bench_out/qpc" else "bench_out/qpc_quick"
        a.minutes = a.minutes if a.minutes != "2,4,20" else "0.05,0.1"
        a.grid, a.results = str(Path(a.out) / "grid.png"), str(Path(a.out) / "results.json")
        a.meddiff_args = a.meddiff_args or "--preset tiny --val-every 2"
    budgets = sorted(float(m) for m in a.minutes.split(","))
    systems = [w.strip() for w in a.systems.split(",") if w.strip()]
    if not systems or set(systems) - {"seed", "meddiff", "latent"}:
        raise SystemExit(f"--systems {a.systems}: choose from seed, meddiff, latent")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    mods = tuple(m.strip() for m in a.modalities.split(",") if m.strip()) or None
    split = (phantom_split(a.size, a.n_train, a.n_heldout, mods) if a.data == "phantoms"
             else mni_split(a.size, a.holdout_every, a.guard))
    npy, png = write_training_data(split, out)
    stats_file = out / "training.json"  # so --score-only keeps what only the training processes printed
    if a.score_only:
        train_stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    else:
        train_stats = train_all(out, budgets, a.size, systems, a.meddiff_args.split(), npy, png, a.ae_share, a.threads)
        stats_file.write_text(json.dumps(train_stats))
    rows = models(out, budgets, budgets[-1], systems)
    mach = R.machine(dict(seed="fp32", meddiff=next((r["hardware"] for r in rows.values() if r["who"] != "seed"), "")))
    held = torch.from_numpy(split.images[split.heldout])[:, None] * 2 - 1
    runs, samples, summary_rows = [], {}, {}
    for name, row in rows.items():
        t0 = time.time()
        imgs = sample(row, a.n, a.guidance)
        q = dict(minutes=row["minutes"], who=row["who"], sample_img_per_s_ddim20=a.n / (time.time() - t0),
                 clip_sample=clips_x0(row),
                 **score_heldout(imgs, split, n_boot=a.bootstrap))
        # eps-MSE compares models that denoise the same pixels; a latent model denoises its own latents
        q.update(autoencoder_figures(row["run"], split) if row["who"] == "latent" else
                 val_losses(row["unet"], held, row["objective"], row["schedule"], row["patch"], row["shift"],
                            heldout_labels(split, row.get("class_names", []))))
        trained = train_stats.get("seed" if row["who"] == "seed" else name, row.get("result", {}))
        q.update({k: trained.get(k) for k in ("train_img_per_s", "images_seen", "steps", "peak_rss_mib", "stopped",
                                              "seconds")})
        if row["who"] == "seed":
            q["images_seen"] = q["steps"] = None  # the seed's counts are those of its whole (longest) run
        asked = requested(row, a.n)
        if asked and split.classes:
            q["requested_classes"] = asked
            q["class_consistency"] = class_figures(imgs, asked, split, a.bootstrap)
        if row["who"] == "latent":  # the first stage's own training: steps, img/s, peak memory
            ae = json.loads((row["run"].parent / "ae" / "autoencoder.json").read_text())["result"]
            q["autoencoder_train"] = {k: ae.get(k) for k in ("steps", "seconds", "train_img_per_s", "peak_rss_mib")}
        guided = "" if a.guidance == 1 else f"_guidance{a.guidance:g}"  # keeps another scale's samples
        np.save(out / f"{name}_samples{guided}.npy", (imgs * 255).round().astype(np.uint8))
        samples[name] = imgs
        summary_rows[name] = q
        runs.append(dict(model=name, unet=str(row["unet"]), training=trained, **q))
        print(name, json.dumps({k: v for k, v in q.items() if k not in ("ssim_per_sample", "requested_classes")}),
              flush=True)
    order = [f"{who}_{m:g}min" for m in budgets for who in systems]
    write_grid(Path(a.grid), {k: samples[k] for k in order}, per_row=8 if split.classes else 10)  # 8: every class
    summary = dict(rows=summary_rows, order=order, reference=reference_rows(split, a.bootstrap),
                   heldout=split.description, sampler="DDIM 20 (diffusers DDIMScheduler via meddiff.sample.generate)",
                   threads_per_run=a.threads, grid=str(a.grid), budgets=budgets, systems=systems, size=a.size,
                   data=a.data, guidance=a.guidance)
    R.write_results(a.results, "quality_per_compute", mach, vars(a), runs, summary)


if __name__ == "__main__":
    main()
