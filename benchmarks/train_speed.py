#!/usr/bin/env python3
"""Training throughput and peak memory, side by side with the seed recipe.

    python benchmarks/train_speed.py                       # small64, lean64, seed128, mem128; 5 repeats
    python benchmarks/train_speed.py --cases small64 --repeats 7
    python benchmarks/train_speed.py --quick               # seconds: a smoke test, not a figure
    python benchmarks/train_speed.py --cases sizes --sizes 64,128,256,512   # the size table (about 25 min)

Throughput cases run both sides in this one process on --threads threads (1: one thread each, as on a
2-core machine), interleaved: after one warm-up step each, round r times --steps steps of the seed
recipe's step, then --steps of meddiff's, before round r + 1. Reported: median img/s with min/max per side,
and meddiff/seed as the ratio of medians with a 95 % bootstrap interval over rounds (a tie when it holds 1).

  small64 / seed128        same architecture, same batch (10): the seed recipe's step (seed_recipe.py's
                           `speed`, fp32) vs meddiff's training step (fused AdamW, --precision, EMA update)
  small64cl / seed128cl    the same with meddiff's UNet in channels-last memory format (`--channels-last`)
  lean64                   meddiff's default preset at 64 px, batch 16, against the seed's small@64
  mem128                   peak memory, each side in its own fresh process (peak RSS is per process): the
                           `seed` preset at 128 px with effective batch --mem-batch (micro-batch 4 + gradient
                           checkpointing) against the seed recipe at batch 10; --mem-repeats processes a side
  sizes                    the size table: at each of --sizes, the seed recipe's step (`seed` UNet, batch 10,
                           fp32), meddiff's pixel path (`lean` with the size's patch, batch 8) and its latent path
                           (`lean` on the 4x smaller, 4-channel latent grid, batch 8), each in its own fresh
                           process on one thread, the seed and the pixel path side by side: img/s over --steps
                           timed steps after one warm-up step, and peak RSS. A side whose activations (counted
                           for one image on the meta device with saved-tensor hooks, an upper bound, x batch x 1.3
                           + weights, gradients and AdamW state) exceed 90 % of the free memory is reported as not
                           fitting, with that need, and not run.
                           With it: real training (`meddiff train`, data included) on the X-ray and CT phantoms at
                           the largest size, 20 steps, peak RSS.
Writes benchmarks/results/train_speed.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from typing import Callable

import torch

import _results as R
from _seed import one_thread_env, seed_stepper

# case → (seed arch, seed size, seed batch) and meddiff (preset, size, batch, channels_last)
THROUGHPUT = {
    "small64": (("small", 64, 10), ("small", 64, 10, False)),
    "small64cl": (("small", 64, 10), ("small", 64, 10, True)),
    "lean64": (("small", 64, 10), ("lean", 64, 16, False)),
    "seed128": (("seed", 128, 10), ("seed", 128, 10, False)),
    "seed128cl": (("seed", 128, 10), ("seed", 128, 10, True)),
}


def meddiff_stepper(preset: str, size: int, batch: int, micro: int, grad_ckpt: bool, channels_last: bool,
                    precision_flag: str, device_flag: str = "auto",
                    latent: tuple[int, int] | None = None) -> tuple[Callable[[], None], str]:
    """meddiff's training step (as in train.py) on random data → (step, hardware description). `latent`
    (channels, factor): the UNet of a latent run at `size` px, on the (channels, size/factor) latent grid."""
    from meddiff.config import TrainConfig, model_config
    from meddiff.diffusion import alphas_cumprod, diffusion_loss, q_sample
    from meddiff.model import build_unet, denoise
    from meddiff.runtime import autocast, describe, pick_device, pick_precision
    from meddiff.train import ema_update, make_optimizer

    cfg = TrainConfig(data="", out="", preset=preset, size=size, batch_size=batch).resolve()
    device = pick_device(device_flag)
    precision = pick_precision(precision_flag, device)
    channels, factor = latent or (1, 1)
    mcfg = model_config(preset, size // factor, channels=channels, latent_factor=factor)
    unet = build_unet(mcfg).to(device)
    if grad_ckpt:
        unet.enable_gradient_checkpointing()
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = make_optimizer(unet, cfg)
    ab = alphas_cumprod(cfg.beta_schedule, 1000).float().to(device)
    x = torch.randn(batch, channels, size // factor, size // factor, device=device)
    k = [0]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for lo in range(0, batch, micro):
            x0 = x[lo:lo + micro]
            eps, t = torch.randn_like(x0), torch.randint(0, 1000, (len(x0),), device=device)
            with autocast(device, precision):
                pred = denoise(unet, q_sample(x0, eps, ab[t]), t, None, mcfg.patch_size)
            (diffusion_loss(pred, x0, eps, ab[t], cfg.objective, cfg.loss_weighting).sum() / batch).backward()
        opt.step()
        ema_update(ema, unet, cfg.ema_decay, k[0])
        k[0] += 1
    return step, describe(device, precision)


def throughput_case(case: str, steps: int, repeats: int, precision: str) -> tuple[list[dict], dict]:
    (arch, s_size, s_batch), (preset, m_size, m_batch, cl) = THROUGHPUT[case]
    seed_step = seed_stepper(arch, s_size, s_batch)
    med_step, hardware = meddiff_stepper(preset, m_size, m_batch, m_batch, False, cl, precision)

    def block(step: Callable[[], None]) -> Callable[[], None]:
        return lambda: [step() for _ in range(steps)]

    timed = {"seed": R.stopwatch(block(seed_step)), "meddiff": R.stopwatch(block(med_step))}
    # warm-up: one round of single steps (allocator, kernels), then the timed rounds
    seed_step(), med_step()
    runs = R.interleaved(["seed", "meddiff"], timed, repeats, warmup=0, echo=lambda m: print(f"{case}: {m}"))
    for r in runs:
        r.update(case=case, img_per_s=steps * (s_batch if r["setting"] == "seed" else m_batch) / r["seconds"])
    ips = {who: R.per_round(runs, who, "img_per_s") for who in ("seed", "meddiff")}
    summary = dict(seed=dict(arch=arch, size=s_size, batch=s_batch, precision="fp32",
                             img_per_s=R.median_spread(ips["seed"])),
                   meddiff=dict(preset=preset, size=m_size, batch=m_batch, channels_last=cl, hardware=hardware,
                                img_per_s=R.median_spread(ips["meddiff"])),
                   ratio=R.ratio_of_medians(ips["meddiff"], ips["seed"]))
    summary["verdict"] = R.verdict(summary["ratio"]["ci95"], 1.0)
    return runs, summary


def memory_case(mem_batch: int, repeats: int, precision: str, size: int = 128) -> tuple[list[dict], dict]:
    """Peak RSS, each side in fresh processes, alternating: seed recipe batch 10 vs meddiff micro-batch 4."""
    from _results import SEED_SCRIPT

    runs = []
    for r in range(repeats):
        seed = R.last_json([sys.executable, str(SEED_SCRIPT), "speed", "--arch", "seed", "--size", str(size),
                           "--batch", "10", "--steps", "1"])
        med = R.last_json([sys.executable, __file__, "--inner-mem", json.dumps([size, mem_batch, precision])])
        runs += [dict(case="mem128", size=size, setting="seed", round=r, warmup=False, peak_rss_mib=seed["peak_rss_mib"]),
                 dict(case="mem128", size=size, setting="meddiff", round=r, warmup=False, peak_rss_mib=med["peak_rss_mib"],
                      hardware=med["hardware"])]
    mem = {who: R.per_round(runs, who, "peak_rss_mib") for who in ("seed", "meddiff")}
    summary = dict(seed=dict(arch="seed", size=size, batch=10, peak_rss_mib=R.median_spread(mem["seed"])),
                   meddiff=dict(preset="seed", size=size, batch=mem_batch, micro_batch=4, grad_checkpointing=True,
                                peak_rss_mib=R.median_spread(mem["meddiff"])),
                   ratio=dict(ratio=float(R.median_spread(mem["meddiff"])["median"]
                                          / R.median_spread(mem["seed"])["median"]), what="peak RSS meddiff / seed"),
                   peak="each process's own: meddiff's VmHWM, the seed recipe's ru_maxrss under R.fresh's launcher")
    return runs, summary


def _inner_mem(size: int, mem_batch: int, precision: str) -> None:
    from meddiff.train import peak_rss_mib

    # peak memory is set by the micro-batch (4) and checkpointing, not by how many micro-batches accumulate
    step, hardware = meddiff_stepper("seed", size, mem_batch, 4, True, False, precision)
    step()
    print(json.dumps(dict(peak_rss_mib=peak_rss_mib(), hardware=hardware)))


LATENT = (4, 4)  # the latent path's default: 4 channels, 4x smaller (meddiff train-autoencoder's defaults)
SIZE_SIDES = {"seed": "the seed recipe (seed UNet, batch 10, fp32)", "pixel": "meddiff pixel (lean, batch 8)",
              "latent": "meddiff latent (lean on 4 x S/4, batch 8)"}


def _inner_size(side: str, size: int, steps: int, precision: str) -> None:
    """One side of the size table in this fresh process: will it fit, then img/s and peak RSS."""
    import time

    from meddiff.config import model_config
    from meddiff.model import build_unet
    from meddiff.runtime import available_memory
    from meddiff.train import activation_bytes_per_image, peak_rss_mib

    batch = 10 if side == "seed" else 8
    mcfg = model_config("seed", size) if side == "seed" else (
        model_config("lean", size // LATENT[1], channels=LATENT[0], latent_factor=LATENT[1]) if side == "latent"
        else model_config("lean", size))
    with torch.device("meta"):  # shapes only: counting a 512-px seed UNet's activations costs no compute
        probe = build_unet(mcfg)
    need = activation_bytes_per_image(probe, mcfg, torch.device("meta"), "fp32")  # an upper bound: aliases count twice
    need = need * batch * 1.3 + 4 * sum(p.numel() for p in probe.parameters()) * 4  # + weights, grads, Adam
    free = available_memory(torch.device("cpu"))
    del probe
    if need > 0.9 * free:
        print(json.dumps(dict(fits=False, need_gib=need / 2**30, free_gib=free / 2**30, peak_rss_mib=peak_rss_mib())))
        return
    if side == "seed":
        step, hardware = seed_stepper("seed", size, 10), "fp32"
    else:
        step, hardware = meddiff_stepper("lean", size, 8, 8, False, False, precision,
                                         latent=LATENT if side == "latent" else None)
    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(fits=True, need_gib=need / 2**30, img_per_s=[batch / t for t in times],
                          peak_rss_mib=peak_rss_mib(), hardware=hardware)))


def _start_size(side: str, size: int, steps: int, precision: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--inner-size", json.dumps([side, size, steps, precision])],
                            env=one_thread_env(), stdout=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return dict(fits=False, failed=f"exit {proc.returncode}", peak_rss_mib=None)
    return json.loads(lines[-1])


def sizes_case(sizes: list[int], steps: int, precision: str, real_steps: int = 20) -> tuple[list[dict], dict]:
    """The size table (see the module's docstring)."""
    runs, table = [], {}
    for size in sizes:
        pair = {side: _start_size(side, size, steps, precision) for side in ("seed", "pixel")}
        got = {side: _finish(p) for side, p in pair.items()}
        got["latent"] = _finish(_start_size("latent", size, steps, precision))
        row = {}
        for side, g in got.items():
            ips = g.get("img_per_s")
            row[side] = dict(what=SIZE_SIDES[side], fits=g.get("fits"), need_gib=g.get("need_gib"),
                             img_per_s=R.median_spread(ips) if ips else None, peak_rss_mib=g.get("peak_rss_mib"),
                             hardware=g.get("hardware"), failed=g.get("failed"))
            runs.append(dict(case="sizes", size=size, setting=side, warmup=False, **g))
        for side in ("pixel", "latent"):
            if row[side]["img_per_s"] and row["seed"]["img_per_s"]:
                row[side]["vs_seed"] = row[side]["img_per_s"]["median"] / row["seed"]["img_per_s"]["median"]
        table[str(size)] = row
        print(f"sizes {size}: " + "; ".join(
            f"{side} {r['img_per_s']['median']:.2f} img/s, {r['peak_rss_mib']:.0f} MiB" if r["img_per_s"]
            else f"{side} failed ({r['failed']})" if r["failed"]
            else f"{side} does not fit ({r['need_gib']:.1f} GiB)" for side, r in row.items()), flush=True)
    real = {}
    biggest = max(sizes)
    for modality in ("xray", "ct"):
        spec = f"builtin:{modality}?n=200&size={biggest}"
        with tempfile.TemporaryDirectory() as tmp:
            done = R.last_json([sys.executable, "-m", "meddiff.cli", "train", "--data", spec, "--size", str(biggest),
                                "--max-steps", str(real_steps), "--out", f"{tmp}/run", "--no-progress", "--threads",
                                "2", "--precision", precision, "--cache-dir", f"{tmp}/cache"])
        real[modality] = dict(data=spec, steps=done["steps"], train_img_per_s=done["train_img_per_s"],
                              peak_rss_mib=done["peak_rss_mib"])
        runs.append(dict(case="sizes-real", size=biggest, setting=modality, warmup=False, **real[modality]))
        print(f"sizes real {modality} {biggest} px: peak RSS {done['peak_rss_mib']:.0f} MiB", flush=True)
    return runs, dict(table=table, steps=steps, real_training=real, latent=dict(channels=LATENT[0], factor=LATENT[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="small64,lean64,seed128,mem128")
    ap.add_argument("--steps", type=int, default=3, help="training steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per throughput case (after warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mem-batch", type=int, default=64, help="effective batch of the mem128 case")
    ap.add_argument("--mem-size", type=int, default=128, help="image size of the mem128 case (smaller: a smoke test)")
    ap.add_argument("--mem-repeats", type=int, default=2, help="fresh processes per side in the mem128 case")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                    help="meddiff's precision (auto: bf16 only on CUDA or a CPU with AMX/AVX512-BF16); the seed is fp32")
    ap.add_argument("--quick", action="store_true", help="smoke test: small64 and lean64, 1 step, 1 repeat")
    ap.add_argument("--sizes", default="64,128,256,512", help="image sizes of the sizes case")
    ap.add_argument("--inner-mem", help=argparse.SUPPRESS)
    ap.add_argument("--inner-size", help=argparse.SUPPRESS)
    R.add_results_arg(ap, "train_speed")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.inner_mem:
        _inner_mem(*json.loads(a.inner_mem))
        return
    if a.inner_size:
        _inner_size(*json.loads(a.inner_size))
        return
    if a.quick:
        a.cases, a.steps, a.repeats = "small64,lean64", 1, 1
    from meddiff.runtime import pick_device, pick_precision

    mach = R.machine(dict(seed="fp32", meddiff=pick_precision(a.precision, pick_device("auto"))))
    runs, summary = [], {}
    for case in a.cases.split(","):
        if case == "sizes":
            case_runs, summary[case] = sizes_case([int(x) for x in a.sizes.split(",")], a.steps, a.precision)
        elif case == "mem128":
            case_runs, summary[case] = memory_case(a.mem_batch, a.mem_repeats, a.precision, a.mem_size)
            s = summary[case]
            print(f"{case}: peak RSS meddiff {s['meddiff']['peak_rss_mib']['median']:.0f} MiB vs seed "
                  f"{s['seed']['peak_rss_mib']['median']:.0f} MiB (x{s['ratio']['ratio']:.2f})", flush=True)
        elif case in THROUGHPUT:
            case_runs, summary[case] = throughput_case(case, a.steps, a.repeats, a.precision)
            s = summary[case]
            print(f"{case}: meddiff {s['meddiff']['img_per_s']['median']:.2f} img/s vs seed "
                  f"{s['seed']['img_per_s']['median']:.2f}: x{s['ratio']['ratio']:.2f} "
                  f"{s['ratio']['ci95']} ({s['verdict']}); "
                  f"{s['meddiff']['hardware']}", flush=True)
        else:
            raise SystemExit(f"--cases: unknown case {case!r}; choose from {', '.join([*THROUGHPUT, 'mem128', 'sizes'])}")
        runs += case_runs
    R.write_results(a.results, "train_speed", mach, vars(a), runs, dict(cases=summary))


if __name__ == "__main__":
    main()
