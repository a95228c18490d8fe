#!/usr/bin/env python3
"""Render the benchmark tables from the raw results: benchmarks/results/<figure>.json → the blocks between
`<!-- render:<figure> -->` and `<!-- /render -->` in docs/benchmarks.md, and `<!-- render:readme -->` in
README.md ("What it reaches"). Tables are never typed by hand.

    python benchmarks/render.py            # rewrite the blocks in place
    python benchmarks/render.py --check    # exit 1 when a block is not what the results give (for CI)

Rules: every figure is shown with its interval; a figure whose interval holds the baseline (a ratio of 1, or
the other side's value) reads "tie" and is never bold; every table names the one command that reproduces it;
a figure without a results file reads "not yet rerun — run `<command>`".
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def qpc_command(figure: str, out: str, args: str) -> str:
    """A quality-per-compute run's command: its work folder bench_out/OUT, its grid docs/OUT_grid.png."""
    return (f"python benchmarks/quality_per_compute.py {args} --out bench_out/{out} --grid docs/{out}_grid.png "
            f"--results benchmarks/results/{figure}.json")


# figure → the one command (from a clean checkout, at the repository root) that writes its results file
COMMANDS = {
    "quality_per_compute": "python benchmarks/quality_per_compute.py --minutes 2,4,20",
    "train_speed": "python benchmarks/train_speed.py",
    "train_memory": "python benchmarks/train_speed.py --cases mem128 --mem-batch 16 "
                    "--results benchmarks/results/train_memory.json",
    "sampling_speed": "python benchmarks/sampling_speed.py --unet bench_out/qpc/seed/unet",
    "sampler_quality": "python benchmarks/sampler_quality.py --run bench_out/qpc/meddiff_20min",
    "conditional_classes": "python benchmarks/conditional_classes.py",
    "data_scale": "python benchmarks/data_scale.py",
    "gpu_check": "python benchmarks/gpu_check.py",
    "quality_per_compute_128": "python benchmarks/quality_per_compute.py --size 128 --minutes 3,30 --n 48 "
                               "--out bench_out/qpc128 --grid docs/qpc128_grid.png "
                               "--results benchmarks/results/quality_per_compute_128.json",
    "quality_per_compute_256": "python benchmarks/quality_per_compute.py --size 256 --systems meddiff,latent "
                               "--minutes 30 --n 48 --out bench_out/qpc256 --grid docs/qpc256_grid.png "
                               "--results benchmarks/results/quality_per_compute_256.json",
    "size_table": "python benchmarks/train_speed.py --cases sizes --steps 2 "
                  "--results benchmarks/results/size_table.json",
    "masks": "python benchmarks/masks.py",
    "masks_guidance1": "python benchmarks/masks.py --reuse --guidance 1 --grid docs/masks_guidance1_grid.png "
                       "--results benchmarks/results/masks_guidance1.json",
    "masks_spade": "python benchmarks/masks.py --conditioning spade --minutes 20 --out bench_out/masks_spade "
                   "--grid docs/masks_spade_grid.png --results benchmarks/results/masks_spade.json",
    "masks_controlnet": "python benchmarks/masks.py --conditioning controlnet --minutes 20 "
                        "--out bench_out/masks_controlnet --grid docs/masks_controlnet_grid.png "
                        "--results benchmarks/results/masks_controlnet.json",
    "masks_seg2000": "python benchmarks/masks.py --reuse --seg-steps 2000 --inpaint 100 "
                     "--grid docs/masks_seg2000_grid.png --results benchmarks/results/masks_seg2000.json",
    "masks_spade_guidance1": "python benchmarks/masks.py --conditioning spade --reuse --guidance 1 "
                             "--out bench_out/masks_spade --grid docs/masks_spade_guidance1_grid.png "
                             "--results benchmarks/results/masks_spade_guidance1.json",
    "masks_guidance_sweep": "python benchmarks/masks.py --reuse --parts adherence --seg-steps 2000 "
                            "--guidance 2,1,1.5,3,4,6 --grid docs/masks_guidance_sweep_grid.png "
                            "--results benchmarks/results/masks_guidance_sweep.json",
    "masks_lw4": "python benchmarks/masks.py --steps 4269 '--meddiff-args=--mask-loss-weight 4' --seg-steps 2000 "
                 "--inpaint 100 --guidance 2,1 --out bench_out/masks_lw4 --grid docs/masks_lw4_grid.png "
                 "--results benchmarks/results/masks_lw4.json",
    "masks_steps2x": "python benchmarks/masks.py --steps 8538 --seg-steps 2000 --inpaint 100 --guidance 3,2 "
                     "--guidance-cutoff 0.5 --out bench_out/masks_steps2x --grid docs/masks_steps2x_grid.png "
                     "--results benchmarks/results/masks_steps2x.json",
    "masks_steps4x": "python benchmarks/masks.py --reuse --steps 17076 --seg-steps 2000 --inpaint 100 --guidance 3,2 "
                     "--guidance-cutoff 0.5 --out bench_out/masks_steps4x --grid docs/masks_steps4x_grid.png "
                     "--results benchmarks/results/masks_steps4x.json",
    "masks_anatomy": "python benchmarks/masks.py --maps anatomy --steps 4269 --seg-steps 2000 --inpaint 100 "
                     "--guidance 2 --out bench_out/masks_anatomy --grid docs/masks_anatomy_grid.png "
                     "--results benchmarks/results/masks_anatomy.json",
    "masks_anatomy_4x": "python benchmarks/masks.py --maps anatomy --reuse --steps 17076 --parts adherence,utility,copies "
                        "--seg-steps 2000 --guidance 2 --out bench_out/masks_anatomy_4x "
                        "--grid docs/masks_anatomy_4x_grid.png --results benchmarks/results/masks_anatomy_4x.json",
    "masks_anatomy_copies": "python benchmarks/masks.py --maps anatomy --reuse --parts copies --guidance 2 "
                            "--out bench_out/masks_anatomy --grid docs/masks_anatomy_copies_grid.png "
                            "--results benchmarks/results/masks_anatomy_copies.json",
    "masks_steps8x_copies": "python benchmarks/masks.py --reuse --parts copies --guidance 2 --out bench_out/masks_steps8x "
                            "--grid docs/masks_steps8x_copies_grid.png "
                            "--results benchmarks/results/masks_steps8x_copies.json",
    "masks_anatomy_4x_guidance": "python benchmarks/masks.py --maps anatomy --reuse --parts adherence --seg-steps 2000 "
                                 "--guidance 1,1.25,1.5,2 --out bench_out/masks_anatomy_4x "
                                 "--grid docs/masks_anatomy_4x_guidance_grid.png "
                                 "--results benchmarks/results/masks_anatomy_4x_guidance.json",
    "masks_anatomy_4x_newmaps": "python benchmarks/masks.py --maps anatomy --reuse --parts utility,copies "
                                "--utility-maps new --seg-steps 2000 --guidance 2 --out bench_out/masks_anatomy_4x "
                                "--grid docs/masks_anatomy_4x_newmaps_grid.png "
                                "--results benchmarks/results/masks_anatomy_4x_newmaps.json",
    "masks_anatomy_4x_newmaps_g1": "python benchmarks/masks.py --maps anatomy --reuse --parts utility,copies "
                                   "--utility-maps new --seg-steps 2000 --guidance 1 --out bench_out/masks_anatomy_4x "
                                   "--grid docs/masks_anatomy_4x_newmaps_g1_grid.png "
                                   "--results benchmarks/results/masks_anatomy_4x_newmaps_g1.json",
    "masks_anatomy_4x_modelmaps": "python benchmarks/masks.py --maps anatomy --reuse --parts utility,copies "
                                  "--utility-maps model --seg-steps 2000 --guidance 1 --out bench_out/masks_anatomy_4x "
                                  "--grid docs/masks_anatomy_4x_modelmaps_grid.png "
                                  "--results benchmarks/results/masks_anatomy_4x_modelmaps.json",
    "masks_anatomy_4x_modelmaps_2x": "python benchmarks/masks.py --maps anatomy --reuse --parts utility,copies "
                                     "--utility-maps model --map-steps 8538 --seg-steps 2000 --guidance 1 "
                                     "--out bench_out/masks_anatomy_4x "
                                     "--grid docs/masks_anatomy_4x_modelmaps_2x_grid.png "
                                     "--results benchmarks/results/masks_anatomy_4x_modelmaps_2x.json",
    "masks_anatomy_4x_modelmaps_shift": "python benchmarks/masks.py --maps anatomy --reuse --parts utility,copies "
                                        "--utility-maps model --seg-steps 2000 --guidance 1 "
                                        "--out bench_out/masks_anatomy_4x "
                                        "--grid docs/masks_anatomy_4x_modelmaps_shift_grid.png "
                                        "--results benchmarks/results/masks_anatomy_4x_modelmaps_shift.json",
    "masks_anatomy_4x_modelmaps_shift_2x": "python benchmarks/masks.py --maps anatomy --reuse --parts "
                                           "utility,copies --utility-maps model --map-steps 8538 --seg-steps 2000 "
                                           "--guidance 1 --out bench_out/masks_anatomy_4x "
                                           "--grid docs/masks_anatomy_4x_modelmaps_shift_2x_grid.png "
                                           "--results benchmarks/results/masks_anatomy_4x_modelmaps_shift_2x.json",
    "masks_steps8x_newmaps": "python benchmarks/masks.py --reuse --parts utility,copies --utility-maps new "
                             "--seg-steps 2000 --guidance 2 --out bench_out/masks_steps8x "
                             "--grid docs/masks_steps8x_newmaps_grid.png "
                             "--results benchmarks/results/masks_steps8x_newmaps.json",
    "masks_anatomy_lw4": "python benchmarks/masks.py --maps anatomy --steps 4269 '--meddiff-args=--mask-loss-weight 4' "
                         "--parts adherence --seg-steps 2000 --guidance 2,1 --out bench_out/masks_anatomy_lw4 "
                         "--grid docs/masks_anatomy_lw4_grid.png --results benchmarks/results/masks_anatomy_lw4.json",
    "masks_anatomy_4x_n1600": "python benchmarks/masks.py --maps anatomy --reuse --parts adherence --n-test 1600 "
                              "--seg-steps 2000 --guidance 2,1.25 --out bench_out/masks_anatomy_4x "
                              "--grid docs/masks_anatomy_4x_n1600_grid.png "
                              "--results benchmarks/results/masks_anatomy_4x_n1600.json",
    "masks_anatomy_n1600": "python benchmarks/masks.py --maps anatomy --reuse --parts adherence --n-test 1600 "
                           "--seg-steps 2000 --guidance 2 --out bench_out/masks_anatomy "
                           "--grid docs/masks_anatomy_n1600_grid.png "
                           "--results benchmarks/results/masks_anatomy_n1600.json",
    "masks_anatomy_ishift": "python benchmarks/masks.py --maps anatomy --reuse --parts adherence --n-test 1600 "
                            "--seg-steps 2000 --guidance 2 '--meddiff-args=--noise-shift -3 --noise-shift-clean 0' "
                            "--out bench_out/masks_anatomy_ishift "
                            "--grid docs/masks_anatomy_ishift_grid.png "
                            "--results benchmarks/results/masks_anatomy_ishift.json",
    "masks_anatomy_8x": "python benchmarks/masks.py --maps anatomy --reuse "
                        "--parts adherence,inpainting,copies --n-test 1600 --seg-steps 2000 --inpaint 100 "
                        "--guidance 2,1 --out bench_out/masks_anatomy_8x --grid docs/masks_anatomy_8x_grid.png "
                        "--results benchmarks/results/masks_anatomy_8x.json",
    "masks_anatomy_8x_newmaps": "python benchmarks/masks.py --maps anatomy --reuse --parts utility,copies "
                                "--utility-maps new --seg-steps 2000 --guidance 2 --out bench_out/masks_anatomy_8x "
                                "--grid docs/masks_anatomy_8x_newmaps_grid.png "
                                "--results benchmarks/results/masks_anatomy_8x_newmaps.json",
    "masks_anatomy_4x_inpaint": "python benchmarks/masks.py --maps anatomy --reuse --parts inpainting --seg-steps 2000 "
                                "--inpaint 100 --guidance 2 --out bench_out/masks_anatomy_4x "
                                "--grid docs/masks_anatomy_4x_inpaint_grid.png "
                                "--results benchmarks/results/masks_anatomy_4x_inpaint.json",
    "masks_steps4x_inpaint_g3": "python benchmarks/masks.py --reuse --parts inpainting --seg-steps 2000 --inpaint 100 "
                                "--guidance 3 --out bench_out/masks_steps4x "
                                "--grid docs/masks_steps4x_inpaint_g3_grid.png "
                                "--results benchmarks/results/masks_steps4x_inpaint_g3.json",
    "masks_steps8x": "python benchmarks/masks.py --reuse --steps 34152 --seg-steps 2000 --inpaint 100 --guidance 3,2 "
                     "--guidance-cutoff 0.5 --out bench_out/masks_steps8x --grid docs/masks_steps8x_grid.png "
                     "--results benchmarks/results/masks_steps8x.json",
    "masks_steps8x_g2": "python benchmarks/masks.py --reuse --parts adherence,utility,copies --seg-steps 2000 "
                        "--guidance 2 --out bench_out/masks_steps8x --grid docs/masks_steps8x_g2_grid.png "
                        "--results benchmarks/results/masks_steps8x_g2.json",
    "masks_cutoff05": "python benchmarks/masks.py --reuse --parts adherence --seg-steps 2000 --guidance 2,3,4,6 "
                      "--guidance-cutoff 0.5 --grid docs/masks_cutoff05_grid.png "
                      "--results benchmarks/results/masks_cutoff05.json",
    "masks_lw4_cutoff05": "python benchmarks/masks.py --reuse --parts adherence --seg-steps 2000 --guidance 2,3 "
                          "--guidance-cutoff 0.5 --out bench_out/masks_lw4 --grid docs/masks_lw4_cutoff05_grid.png "
                          "--results benchmarks/results/masks_lw4_cutoff05.json",
    "masks_g3_cutoff05": "python benchmarks/masks.py --reuse --seg-steps 2000 --inpaint 100 --guidance 3 "
                         "--guidance-cutoff 0.5 --grid docs/masks_g3_cutoff05_grid.png "
                         "--results benchmarks/results/masks_g3_cutoff05.json",
    "size_rules_256": "python benchmarks/objectives.py --study size-rules --size 256 --minutes 10 --n 48 "
                      "--out bench_out/sr256",
    "quality_per_compute_256_60": "python benchmarks/quality_per_compute.py --size 256 --systems meddiff --minutes 60 "
                                  "--threads 2 --n 48 --out bench_out/qpc256_60 --grid docs/qpc256_60_grid.png "
                                  "--results benchmarks/results/quality_per_compute_256_60.json",
    "quality_per_compute_128_2core": "python benchmarks/quality_per_compute.py --size 128 --systems meddiff "
                                     "--minutes 30 --threads 2 --n 48 --out bench_out/qpc128_30 "
                                     "--grid docs/qpc128_30_grid.png "
                                     "--results benchmarks/results/quality_per_compute_128_2core.json",
    "quality_per_compute_phantoms_256_60": "python benchmarks/quality_per_compute.py --data phantoms --size 256 "
                                           "--systems meddiff --minutes 60 --threads 2 --n 64 "
                                           "--out bench_out/qpc_ph256_60 --grid docs/qpc_ph256_60_grid.png "
                                           "--results benchmarks/results/quality_per_compute_phantoms_256_60.json",
    "quality_per_compute_phantoms_512_30": "python benchmarks/quality_per_compute.py --data phantoms --modalities "
                                           "ct,xray --size 512 --systems meddiff --minutes 30 --threads 2 --n 32 "
                                           "--n-train 400 --n-heldout 64 --out bench_out/qpc_ph512_30 "
                                           "--grid docs/qpc_ph512_30_grid.png "
                                           "--results benchmarks/results/quality_per_compute_phantoms_512_30.json",
    "quality_per_compute_128_table": "python benchmarks/quality_per_compute.py --size 128 --systems meddiff,latent "
                                     "--minutes 10 --n 48 --out bench_out/qpc128_table --grid docs/qpc128_table_grid.png "
                                     "--results benchmarks/results/quality_per_compute_128_table.json",
    "quality_per_compute_256_table": "python benchmarks/quality_per_compute.py --size 256 --systems meddiff,latent "
                                     "--minutes 10,30 --n 48 --out bench_out/qpc256_table "
                                     "--grid docs/qpc256_table_grid.png "
                                     "--results benchmarks/results/quality_per_compute_256_table.json",
    "quality_per_compute_64_seed": qpc_command("quality_per_compute_64_seed", "qpc64_seed", "--size 64 --systems "
                                               "seed --minutes 10,30 --n 64"),
    "quality_per_compute_64_meddiff": qpc_command("quality_per_compute_64_meddiff", "qpc64_meddiff", "--size 64 "
                                                  "--systems meddiff --minutes 10,30 --n 64"),
    "quality_per_compute_64_latent": qpc_command("quality_per_compute_64_latent", "qpc64_latent", "--size 64 "
                                                 "--systems latent --minutes 10 --n 64"),
    "quality_per_compute_128_seed": qpc_command("quality_per_compute_128_seed", "qpc128_seed", "--size 128 --systems "
                                                "seed --minutes 10,30 --n 48"),
    "quality_per_compute_128_latent30": qpc_command("quality_per_compute_128_latent30", "qpc128_latent30",
                                                    "--size 128 --systems latent --minutes 30 --n 48"),
    "quality_per_compute_64_latent30": qpc_command("quality_per_compute_64_latent30", "qpc64_latent30", "--size 64 "
                                                   "--systems latent --minutes 30 --n 64"),
    "quality_per_compute_64_copycheck": qpc_command("quality_per_compute_64_copycheck", "qpc64_copycheck",
                                                    "--size 64 --systems meddiff --minutes 30 --n 64 '--meddiff-args="
                                                    "--copy-check 16 --max-copies 0.1 --val-split contiguous'"),
    "quality_per_compute_64_copycheck_guard": qpc_command(
        "quality_per_compute_64_copycheck_guard", "qpc64_copycheck_guard", "--size 64 --systems meddiff --minutes 30 "
        "--n 64 '--meddiff-args=--copy-check 16 --max-copies 0.1 --val-split contiguous'"),
    "quality_per_compute_512_table": qpc_command("quality_per_compute_512_table", "qpc512_table", "--size 512 "
                                                 "--systems meddiff,latent --minutes 10,30 --n 32"),
    "quality_per_compute_phantoms_256_60_guidance3":
        "python benchmarks/quality_per_compute.py --data phantoms --size 256 --systems meddiff --minutes 60 --threads 2 "
        "--n 64 --out bench_out/qpc_ph256_60 --guidance 3 --grid docs/qpc_ph256_60_guidance3_grid.png "
        "--results benchmarks/results/quality_per_compute_phantoms_256_60_guidance3.json",
    "quality_per_compute_phantoms_512_30_guidance3":
        "python benchmarks/quality_per_compute.py --data phantoms --modalities ct,xray --size 512 --systems meddiff "
        "--minutes 30 --threads 2 --n 32 --n-train 400 --n-heldout 64 --out bench_out/qpc_ph512_30 --guidance 3 "
        "--grid docs/qpc_ph512_30_guidance3_grid.png "
        "--results benchmarks/results/quality_per_compute_phantoms_512_30_guidance3.json",
}
WHO = {"seed": "seed recipe", "meddiff": "meddiff pixel (default)", "latent": "meddiff latent"}
TRAIN_SPEED_CASES = {"seed128": "training img/s, `seed` UNet @ 128 px, batch 10, same UNet",
                     "mem128": "peak memory, `seed` UNet at 128 px"}


def ci(value: float | None, interval: list[float] | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    text = f"{value:.{digits}g}"
    if not interval:
        return text + " (no interval)"
    return f"{text} [{interval[0]:.{digits}g}, {interval[1]:.{digits}g}]"


def spread(s: dict[str, float], digits: int = 3) -> str:
    return f"{s['median']:.{digits}g} ({s['min']:.{digits}g}–{s['max']:.{digits}g}, n={s['n']})"


def ratio_cell(r: dict[str, Any], verdict: str | None = None) -> str:
    """'1.13x [1.05, 1.20]', bold only when the interval excludes 1 in meddiff's favour; else named a tie."""
    lo_hi = r.get("ci95")
    text = f"{r['ratio']:.3g}x" + (f" [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi else " (no interval)")
    verdict = verdict or ("no interval" if not lo_hi else "tie" if lo_hi[0] <= 1 <= lo_hi[1]
                          else "win" if lo_hi[0] > 1 else "loss")
    return f"**{text}**" if verdict == "win" else f"{text}, {verdict}"


def compare(mine: dict, other: dict, key: str, lower_is_better: bool) -> str:
    """A score cell for meddiff against the seed at the same budget: bold only when meddiff's interval excludes
    the seed's value on the better side and the seed's interval excludes meddiff's; else marked a tie."""
    cell = ci(mine[key], mine.get(key + "_ci95"))
    a, b = mine[key], other[key]
    ia, ib = mine.get(key + "_ci95"), other.get(key + "_ci95")
    if not ia or not ib or ia[0] <= b <= ia[1] or ib[0] <= a <= ib[1]:
        return cell + ", tie"
    better = a < b if lower_is_better else a > b
    return f"**{cell}**" if better else cell


def reproduce(doc: dict[str, Any]) -> str:
    """The command that makes the file from a clean checkout: a --score-only rescoring, or a --reuse call that
    scored runs an earlier call trained, names the full command."""
    return doc["command"].replace(" --score-only", "").replace(" --reuse", "")


def masks_train_flags(doc: dict[str, Any]) -> str:
    """The meddiff train flags a masks run was trained with: the call's --meddiff-args, or for a --reuse scoring
    what the run's record says (its --mask-loss-weight)."""
    flags = (doc["settings"].get("meddiff_args") or "").strip()
    weight = doc["summary"].get("mask_loss_weight")
    return flags or (f"--mask-loss-weight {weight:g}" if weight else "")


def masks_commands(doc: dict[str, Any]) -> str:
    """A masks file's command; for a `--reuse` scoring, the training call before it too (inside one code span:
    "first`, then `second")."""
    st = doc["settings"]
    if not st.get("reuse"):
        return doc["command"]
    variant = st.get("conditioning", "channel")
    how = f" --conditioning {variant}" if variant != "channel" else ""
    maps = " --maps anatomy" if st.get("maps") == "anatomy" else ""
    how += maps
    trained = doc["summary"]["training"]
    budget = (f"--steps {trained.get('extended_from', trained['steps'])}" if trained.get("stopped") == "max-steps" else
              f"--minutes {round(trained['seconds'] / 60):g}")
    out = f" --out {st['out']}" if how or st["out"] != "bench_out/masks" else ""
    flags = masks_train_flags(doc)
    flags = f" '--meddiff-args={flags}'" if flags else ""
    calls = [f"python benchmarks/masks.py{how} {budget}{flags}{out}"]
    if trained.get("extended_from"):  # every goal it was trained on to, the last unless this file's own call
        own = doc["command"].split()
        own_goal = own[own.index("--steps") + 1] if "--steps" in own[:-1] else None
        goals = [*trained.get("extended_through", []), *([] if own_goal == str(trained["steps"]) else [trained["steps"]])]
        calls += [f"python benchmarks/masks.py{maps} --reuse --steps {g} --out {st['out']}" for g in goals]
    return "`, then `".join([*calls, doc["command"]])


def command_line(doc: dict[str, Any], figure: str) -> str:
    m = doc["machine"]
    dirty = " (uncommitted changes)" if m.get("dirty") else ""
    if doc.get("figure") == "masks" and doc["settings"].get("reuse"):  # one run, trained by an earlier call
        return (f"*Reproduce: `{masks_commands(doc)}` (this file: the last, at the commit below, on the run the "
                f"earlier calls trained) — {m['cpu']}, "
                f"{m.get('gpu') or 'no GPU'}, {m['torch_threads']} thread(s), precision {m['precision']}, commit "
                f"{str(m.get('commit'))[:10]}{dirty}, {m['started']}; raw results: `benchmarks/results/{figure}.json`.*")
    rescored = (" (this file: the runs that command trained, rescored with `--score-only` at the commit below)"
                if "--score-only" in doc["command"] else
                " (this file: the variants added last trained by the call at the commit below, the others by the "
                "same command at an earlier commit and scored again with `--reuse`)" if "--reuse" in doc["command"]
                else "")
    return (f"*Reproduce: `{reproduce(doc)}`{rescored} — {m['cpu']}, {m.get('gpu') or 'no GPU'}, {m['torch_threads']} "
            f"thread(s), precision {m['precision']}, commit {str(m.get('commit'))[:10]}{dirty}, {m['started']}; "
            f"raw results: `benchmarks/results/{figure}.json`.*")


# ---------------------------------------------------------------- one renderer per figure

def _num(value: float | None, fmt: str) -> str:
    """A number, or — where the results file has none (e.g. the seed's training figures after --score-only)."""
    return "—" if value is None else format(value, fmt)


def render_quality_per_compute(doc: dict) -> list[str]:
    """One row per model: meddiff's rows are compared with the seed recipe's at the same budget where the seed
    was trained (bold: better, intervals apart); the latent rows add their autoencoder's held-out figures."""
    s = doc["summary"]
    guided = f", classifier-free guidance {s['guidance']:g}" if s.get("guidance", 1) != 1 else ""
    lines = [f"Held-out set: {s['heldout']}. Sampler: {s['sampler']}{guided}, n = {doc['settings']['n']} per model.",
             "",
             "| model | training | train img/s | peak RSS MiB | KID ↓ | FID (randconv) ↓ | SSIM to nearest held-out | "
             "pixel detail / real's (1 = real; grain ≫ 1) | held-out eps-MSE at the seed's levels ↓ | "
             "copies of training images ↓ |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    latent_notes, stale_eps = [], False
    for name in s["order"]:
        r = s["rows"][name]
        other = s["rows"].get(f"seed_{r['minutes']:g}min")
        keys = (("kid", True), ("fid", True), ("ssim", False), ("val_eps_mse", True))
        cells = [compare(r, other, k, low) if r["who"] != "seed" and other and r.get(k) is not None
                 else ci(r.get(k), r.get(k + "_ci95")) for k, low in keys]
        if r["who"] == "meddiff" and doc["settings"].get("size", 64) > 64 and "fine_energy_ratio" not in r:
            cells[3] = "not valid †"  # scored before the figure told a shifted model its own timesteps
            stale_eps = True
        cells.insert(3, _fine(r))
        steps = f" ({r['steps']:,} steps{_stopped_early(r)})" if r.get("steps") else ""
        lines.append(f"| {_who(r)} | {r['minutes']:g} min{steps} | "
                     f"{_num(r.get('train_img_per_s'), '.3g')} | {_num(r.get('peak_rss_mib'), ',.0f')} | "
                     + " | ".join(cells) + f" | {r['copies_share']:.0%} |")
        if r["who"] == "latent":
            ae = r.get("autoencoder_train") or {}
            latent_notes.append(
                f"meddiff latent, {r['minutes']:g} min: its autoencoder ({ae.get('steps', '?')} steps, "
                f"{_num(ae.get('seconds'), '.0f')} s, peak RSS {_num(ae.get('peak_rss_mib'), ',.0f')} MiB) "
                f"reconstructs the held-out slices at PSNR {ci(r['autoencoder_psnr_db'], r['autoencoder_psnr_ci95'])} "
                f"dB, SSIM {ci(r['autoencoder_ssim'], r['autoencoder_ssim_ci95'])}.")
    for name, r in s["reference"].items():
        lines.append(f"| {name} | — | — | — | {_sample_cells(r)} | {_fine(r)} | — | {_copies(r)} |")
    lines += [""] + latent_notes if latent_notes else []
    judged = [(name, s["rows"][name]["class_consistency"]) for name in s["order"]
              if s["rows"][name].get("class_consistency")]
    if judged:
        lines += ["", "Classes: sample i asks for class i mod (the classes); meddiff's classifier "
                  f"({judged[0][1]['classifier']}), fitted on the real images, judges each sample:", ""]
        for name, c in judged:
            ref = c.get("reference") or {}
            per = "; ".join(f"{k} {v['value']:.2f}" for k, v in c["per_class"].items())
            lines.append(f"- {WHO[s['rows'][name]['who']]}, {s['rows'][name]['minutes']:g} min: "
                         f"{ci(c['value'], c['ci95'])} judged the class asked for ({per}); the same classifier "
                         f"on held-out real images: {ci(ref.get('value'), ref.get('ci95'))}.")
    if stale_eps:
        lines += ["", "† This file was scored before the held-out eps-MSE told a model trained on a shifted schedule "
                  "(meddiff above 64 px) its own timesteps for the seed's noise levels; its meddiff eps-MSE is not a "
                  "valid figure. The other figures do not depend on it."]
    grid = Path(s["grid"])
    return lines + (["", f"![one row of samples per model]({grid.name})"] if grid.parent.name == "docs" else [])


def _clipped_latents(r: dict) -> bool:
    """A latent row sampled with its latents clipped to [-1, 1] at every step (scored before the fix of
    `diffusion.diffusers_scheduler_config`; the file then recorded no `clip_sample`): not the latent path's
    figure."""
    return r["who"] == "latent" and r.get("clip_sample", True)


def _who(r: dict) -> str:
    return f"{WHO['latent']} (latents clipped at sampling: before the fix)" if _clipped_latents(r) else WHO[r["who"]]


def _stopped_early(r: dict) -> str:
    """", stopped by the copy check after N min" for a run its copy check ended before its budget."""
    return f", stopped by the copy check after {r['seconds'] / 60:.0f} min" if r.get("stopped") == "copies" else ""


def _sample_cells(r: dict) -> str:
    """KID | FID | SSIM to the nearest held-out image, each with its interval: the cells every quality table has."""
    return f"{ci(r['kid'], r['kid_ci95'])} | {ci(r['fid'], r['fid_ci95'])} | {ci(r['ssim'], r['ssim_ci95'])}"


def _fine(r: dict) -> str:
    """The fine-energy ratio (`_heldout.fine_energy_ratio`), or — for results scored before it existed."""
    return ci(r["fine_energy_ratio"], r.get("fine_energy_ratio_ci95"), 3) if "fine_energy_ratio" in r else "—"


def _copies(r: dict) -> str:
    """A reference row's share flagged by the copy audit, or — for results scored before references had it."""
    return f"{r['copies_share']:.0%}" if "copies_share" in r else "—"


def render_size_rules(doc: dict) -> list[str]:
    """One row per variant of the rules that follow the image size, trained side by side for the same minutes."""
    s, st = doc["summary"], doc["settings"]
    lines = [f"Held-out set: {s['heldout']}. {st['minutes']:g} min per variant, one thread each, two at a time; "
             f"DDIM 20, n = {st['n']} per variant.", "",
             "| variant (flags) | steps | KID ↓ | FID (randconv) ↓ | SSIM to nearest held-out | pixel detail / real's "
             "(1 = real; grain ≫ 1) | copies |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in s["rows"].items():
        flags = " ".join(s.get("variants", {}).get(name, []))
        lines.append(f"| {name} (`{flags}`) | {r['steps']:,} | {_sample_cells(r)} | {_fine(r)} | "
                     f"{r['copies_share']:.0%} |")
    lines += [f"| {name} | — | {_sample_cells(r)} | {_fine(r)} | {_copies(r)} |" for name, r in s["reference"].items()]
    return lines


def pct(share: float) -> str:
    """A share as a percentage: to one decimal below 1 % (1 image of 200 is 0.5 %, not 0 %)."""
    return f"{share:.0%}" if share == 0 or share >= 0.01 else f"{share:.1%}"


def map_schedule(mm: dict) -> str:
    """How the model of label maps' noise schedule was shifted (results from before it was recorded had none)."""
    noisy, clean = mm.get("noise_shift") or 0.0, mm.get("noise_shift_clean")
    if clean is None or clean == noisy:
        return f"its schedule's log SNR shifted {noisy:+g}" if noisy else "its noise schedule unshifted"
    return f"its schedule's log SNR shifted {clean:+g} at the clean end to {noisy:+g} at the noisy end"


def render_masks(doc: dict) -> list[str]:
    """Mask adherence per modality, segmentation utility, inpainting, copies."""
    s = doc["summary"]
    dice = lambda f: ci(f["dice"], f["dice_ci95"]) + f" (n={f['images']})" if f and f.get("dice") is not None else "—"
    how = {"spade": " (input channels and SPADE in every residual block, benchmarks/_mask_conditioning.py)",
           "controlnet": " (input channels and a ControlNet encoder copy, benchmarks/_mask_conditioning.py)"
           }.get(s.get("conditioning"), "")
    params = f", {s['parameters'] / 1e6:.1f} M parameters" if s.get("parameters") else ""
    flags = masks_train_flags(doc)
    how += f" with `{flags}`" if flags else ""
    budget = ("a step budget: its minutes, shared with other work on the machine, are not a figure"
              if s["training"].get("stopped") == "max-steps" else f"{s['training']['seconds'] / 60:.0f} min")
    anatomy = s.get("maps") == "anatomy"
    maps = "label maps of lesion and anatomy (`--maps anatomy`, `builtin:phantoms?masks=2`)" if anatomy else "maps"
    reads = "; every Dice reads the lesion" if anatomy else ""
    lines = [f"Model: meddiff's default recipe conditioned on the {maps}{how}{reads}{params}, "
             f"{s['training']['steps']:,} steps "
             f"({budget}"
             + (f"; trained {s['training']['extended_from']:,} steps by an earlier call of the same command, then "
                + "".join(f"on to {g:,}, then " for g in s["training"].get("extended_through", []))
                + "on to these with `--reuse --steps`, which resumes the run towards the new "
                "goal, `meddiff train --resume --max-steps`)" if s["training"].get("extended_from") else
                "; trained by an earlier call of the same command, scored again with `--reuse`" if
                doc["settings"].get("reuse") else "")
             + f"); sampler: {s['sampler']}, guidance "
             + (f"{s['guidance']:g}" if not s.get("adherence_by_guidance") else
                f"{', '.join(sorted(s['adherence_by_guidance'], key=float))} for adherence"
                + (f", {s['guidance']:g} for the rest" if set(s.get("parts") or ["utility"]) - {"adherence"} else ""))
             + (f", guided at timesteps from {s['guidance_cutoff']:g} T up" if s.get("guidance_cutoff") else "")
             + "; the segmenters (adherence, utility) "
             f"trained {doc['settings'].get('seg_steps', 600):,} steps."]
    if s.get("parts") and set(s["parts"]) != {"adherence", "utility", "inpainting", "copies"}:
        lines[-1] += f" Scored: {', '.join(s['parts'])} only (`--parts`)."
    lines.append("")
    if s.get("adherence_by_guidance"):
        sweep = s["adherence_by_guidance"]
        mods = list(next(iter(sweep.values())))
        lines += ["| guidance | " + " | ".join(mods) + " |", "| --- |" + " --- |" * len(mods)]
        lines += [f"| {g} | " + " | ".join(dice(r[m]["generated"]) for m in mods) + " |"
                  for g, r in sorted(sweep.items(), key=lambda kv: float(kv[0]))]
        lines += ["| real test images (the segmenter's ceiling) | "
                  + " | ".join(dice(next(iter(sweep.values()))[m]["real"]) for m in mods) + " |"]
    elif s.get("adherence"):
        lines += ["| modality | Dice of generated images against their requested maps | the same segmenter on real "
                  "test images |", "| --- | --- | --- |"]
        lines += [f"| {m} | {dice(r['generated'])} | {dice(r['real'])} |" for m, r in s["adherence"].items()]
    if s.get("ct_phase"):
        gap = next(iter(s["ct_phase"].values()))  # the gap and the real images' shares are the same at every scale
        by_scale = lambda key: ", ".join(f"{f[key]:.0%} at guidance {g}" for g, f in sorted(
            s["ct_phase"].items(), key=lambda kv: float(kv[0])))
        lines += ["", f"CT's contrast phase (half the CT phantoms are contrast-enhanced, which brightens the liver): "
                  f"the training slices' livers fall below {gap['gap'][0]:.3f} or above {gap['gap'][1]:.3f} of the "
                  f"window ({gap['training_slices']} slices with a liver). Generated CT slices with their liver "
                  f"in the middle half of that gap ({gap['middle'][0]:.3f}–{gap['middle'][1]:.3f}), a hedge between "
                  f"the phases: {by_scale('generated_in_gap')}, of {gap['slices']} abnormal CT test maps with a "
                  f"liver; the real test images on the same maps {gap['real_in_gap']:.0%}. Livers of the plain phase "
                  f"(below the gap): {by_scale('generated_below')}; real {gap['real_below']:.0%}."]
    u = s.get("utility") or {}
    if u:
        lines += ["", "| segmenter trained on | Dice on held-out real pairs |", "| --- | --- |"]
        lines += [f"| {name.replace('_', ' ')} | {dice(f)} |" for name, f in u.items()]
    paired = s.get("utility_paired")
    if paired:  # paired over the same test images
        r, d = paired["synthetic_vs_real"], paired["plus_synthetic_vs_few"]
        few = next(k for k in u if k.endswith("_plus_synthetic")).removesuffix("_plus_synthetic").replace("_", " ")
        mm = s.get("map_model") or {}
        source = {"new": " The synthetic pairs are made from new maps: each training map jittered by its own seed "
                         "(`--utility-maps new`, as `meddiff sample --augment-masks` draws them).",
                  "model": " The synthetic pairs are made from maps drawn by a model of label maps trained on the "
                           f"training maps (`--utility-maps model`: `meddiff train --learn maps`, "
                           f"{mm.get('steps', 0):,} steps"
                           + (f" (trained {mm['extended_from']:,} by an earlier call, then on to these)"
                              if mm.get("extended_from") else "")
                           + f", {mm.get('parameters', 0) / 1e6:.1f} M parameters, {map_schedule(mm)}; one map "
                           "per training pair's class, as `meddiff sample --mask-run` draws them)."
                  }.get(s.get("utility_maps"), "")
        lines += ["", f"Synthetic-only / real-only Dice: {ci(r['ratio'], r['ratio_ci95'])} (paired over the "
                  f"same {r['images']} test images). {few} + synthetic against {few} alone (the real pairs fill "
                  f"{s.get('real_share', 0.5):.0%} of each batch): Dice difference "
                  f"{d['difference']:+.3f} [{d['difference_ci95'][0]:+.3f}, {d['difference_ci95'][1]:+.3f}]"
                  + (", a gain." if d["difference_ci95"][0] > 0 else
                     ", a loss." if d["difference_ci95"][1] < 0 else ", a tie (the interval holds 0).") + source]
        if s.get("utility_by_modality"):
            lines[-1] += " Synthetic-only / real-only by modality: " + ", ".join(
                f"{m} {ci(f['ratio'], f['ratio_ci95'])} (n={f['images']})" for m, f in s["utility_by_modality"].items()) + "."
    elif s.get("utility_ratio") is not None:
        lines += ["", f"Synthetic-only / real-only Dice: {s['utility_ratio']:.2f}."]
    ip = s.get("inpainting") or {}
    if ip.get("images"):
        reach = lambda r: "".join(f"; {what}: {ci(f['share'], f['ci95'])} (n={f['images']})" for what, f in (
            ("real abnormal test images it calls abnormal (the reference)", r.get("real_abnormal_called")),
            ("the healthy images before inpainting", r.get("healthy_before_called"))) if f)
        reader = ("a lesion detector trained on real phantoms (the segmenter's encoder with a one-number head)"
                  if ip.get("detector") else "a classifier trained on real phantoms (random-conv features + "
                  "logistic regression)")
        fc = ip.get("feature_classifier")
        lines += [f"Inpainting ({ip['images']} healthy test images, a lesion region each): largest change outside the "
                  f"region {ip['max_change_outside']:g}; called abnormal by {reader}: "
                  f"{ci(ip['detected_abnormal'], ip['detected_ci95'])}"
                  + (" (by modality, inpainted against real lesions: " + ", ".join(
                      f"{m} {f['inpainted']['share']:.2f} of {f['inpainted']['images']} against "
                      f"{f['real']['share']:.2f}" for m, f in ip["detected_by_modality"].items()) + ")"
                     if ip.get("detected_by_modality") else "")
                  + reach(ip)
                  + (f". The random-conv feature classifier of earlier files on the same images: "
                     f"{ci(fc['inpainted']['share'], fc['inpainted']['ci95'])}{reach(fc)}" if fc else "")
                  + f". Gradient energy on the region's border {ip['seam_gradient_generated']:.3f} against "
                  f"{ip['seam_gradient_real_lesions']:.3f} on real lesions'"
                  + (f"; the contrast across it (inside against outside) {ip['edge_contrast_generated']:.3f} against "
                     f"{ip['edge_contrast_real_lesions']:.3f}" if ip.get("edge_contrast_generated") is not None else "")
                  + "."]
    if s.get("copies"):
        c = s["copies"]
        own, new, drawn = c.get("from_training_maps"), c.get("from_new_maps"), c.get("from_model_maps")
        lines += [f"Copies of training images among the generated adherence images: {pct(c['share'])}."
                  + (f" Among {own['images']} images generated from training maps (what the utility figures train "
                     f"on): {pct(own['share'])} flagged (same threshold, NCC {c['threshold']:.3f}); median nearest NCC "
                     f"{own['median_ncc']:.3f}; the nearest training image is the map's own image for "
                     f"{own['nearest_is_source']:.0%}." if own else "")
                  + (f" Among {new['images']} images generated from new maps jittered from training maps (what the "
                     f"utility figures train on), against the training images and each source image moved as its "
                     f"map was: {pct(new['share'])} flagged (same threshold, NCC {c['threshold']:.3f}); median nearest "
                     f"NCC {new['median_ncc']:.3f}; the nearest is the map's own source for "
                     f"{new['nearest_is_source']:.0%}; a source image moved with its map for {new['nearest_is_moved_source']:.0%}."
                     if new else "")
                  + (f" Among {drawn['images']} images generated from maps the model of label maps drew (what the "
                     f"utility figures train on), against the training images: {pct(drawn['share'])} flagged (same "
                     f"threshold, NCC {c['threshold']:.3f}); median nearest NCC {drawn['median_ncc']:.3f}."
                     if drawn else "")]
    mc = s.get("map_copies")
    if mc:
        rates = lambda r: (f"a lesion in {r['abnormal_with_lesion']:.0%} of abnormal-class maps and "
                           f"{pct(r['normal_with_lesion'])} of normal ones, covering {r['lesion_area_abnormal']:.1%} "
                           "of an abnormal map")
        lines += [f"The drawn maps against the training maps ({mc['maps']} maps, each against every training map as "
                  f"it is and mirrored; agreement: the share of the pixels labelled in either map that hold the same "
                  f"label in both): median nearest agreement {mc['median_nearest']:.3f}, held-out real maps "
                  f"{mc['heldout_median_nearest']:.3f}"
                  + ("".join(f"; {m} {f['median_nearest']:.3f} (held-out {f['heldout_median_nearest']:.3f})"
                             for m, f in mc.get("by_modality", {}).items()))
                  + f"; {pct(mc['share_flagged'])} above the held-out maps' 0.99 "
                  f"quantile ({mc['threshold']:.3f}). Drawn: {rates(mc['drawn'])}; training maps: "
                  f"{rates(mc['training'])}."]
    grid = Path(s["grid"])
    what = {"new": "a new (jittered) map and the image generated on it, as the synthetic-only segmenter trains on them",
            "model": "a map the model of label maps drew and the image generated on it, as the synthetic-only "
                     "segmenter trains on them"}.get(s.get("grid_shows"), "requested map and generated image")
    return lines + (["", f"![{what}, one pair per modality]({grid.name})"] if grid.parent.name == "docs" else [])


def render_size_table(doc: dict) -> list[str]:
    """The size table: img/s and peak RSS of the seed recipe and meddiff's two paths at each size."""
    s = doc["summary"]["cases"]["sizes"]
    lines = ["| size | " + " | ".join(f"{WHO[k]}: img/s, peak RSS" for k in ("seed", "meddiff", "latent"))
             + " |", "| --- | --- | --- | --- |"]
    for size, row in s["table"].items():
        cells = []
        for side in ("seed", "pixel", "latent"):
            r = row[side]
            if r.get("img_per_s"):
                vs = f", {r['vs_seed']:.3g}x the seed" if r.get("vs_seed") else ""
                cells.append(f"{spread(r['img_per_s'])}{vs}; {r['peak_rss_mib']:,.0f} MiB")
            elif r.get("failed"):
                cells.append(f"failed ({r['failed']})")
            else:
                cells.append(f"does not fit: needs ~{r['need_gib']:.0f} GiB (saved-tensor count, an upper bound)")
        lines.append(f"| {size} px | " + " | ".join(cells) + " |")
    real = s.get("real_training") or {}
    if real:
        lines += ["", "Real training (`meddiff train`, default pixel recipe, data and validation included, 2 threads): "
                  + "; ".join(f"`{r['data']}`, {r['steps']} steps: peak RSS {r['peak_rss_mib']:,.0f} MiB"
                              for r in real.values()) + "."]
    return lines


def render_train_speed(doc: dict) -> list[str]:
    """The throughput cases (meddiff's step against the seed recipe's) and the memory case, each where present."""
    cases, lines = doc["summary"]["cases"], []
    speed = {case: c for case, c in cases.items() if case != "mem128"}
    if speed:
        lines += ["| case | seed recipe img/s, median (min–max) | meddiff img/s, median (min–max) | meddiff / seed "
                  "[95 % CI] |", "| --- | --- | --- | --- |"]
    for case, c in speed.items():
        m = c["meddiff"]
        what = (f"`{m['preset']}` @ {m['size']} px, batch {m['batch']}{', channels-last' if m['channels_last'] else ''}"
                f" vs seed `{c['seed']['arch']}` @ {c['seed']['size']}, batch {c['seed']['batch']}; {m['hardware']}")
        lines.append(f"| {what} | {spread(c['seed']['img_per_s'])} | {spread(m['img_per_s'])} | "
                     f"{ratio_cell(c['ratio'], c.get('verdict'))} |")
    c = cases.get("mem128")
    if c and not own_peaks(c):
        lines += ["", "This file's memory case (mem128) is not shown: it was measured before each process reported "
                  "its own peak (both sides inherited this script's own, 14 GB after its seed128 case); the memory "
                  "figure is the next one."]
    elif c:
        lines += ["", "| memory case | seed recipe peak RSS MiB | meddiff peak RSS MiB | meddiff / seed |",
                  "| --- | --- | --- | --- |",
                  f"| `seed` @ {c['seed']['size']} px: seed batch 10 vs meddiff effective batch "
                  f"{c['meddiff']['batch']} (micro-batch 4 + gradient checkpointing) | "
                  f"{spread(c['seed']['peak_rss_mib'], 5)} | {spread(c['meddiff']['peak_rss_mib'], 5)} | "
                  f"{c['ratio']['ratio']:.2f}x |"]
    return lines[1:] if lines and not lines[0] else lines


def own_peaks(mem128: dict) -> bool:
    """Whether a mem128 case measured each process's own peak RSS (train_speed.memory_case records how since)."""
    return bool(mem128.get("peak"))


def render_sampling_speed(doc: dict) -> list[str]:
    s = doc["summary"]
    lines = [f"One thread; settings interleaved, {doc['settings']['repeats']} timed rounds of "
             f"{doc['settings']['n_time']} images after a warm-up; quality: n = {doc['settings']['n']} against "
             f"{s['heldout']}.", "",
             "| setting | UNet calls (full) | img/s, median (min–max) | speed-up [95 % CI] | call-ratio limit | "
             "KID ↓ | SSIM to nearest held-out |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in s["rows"].items():
        flag = " ⚠ exceeds the limit" if r["exceeds_call_ratio"] else ""
        speed = "1.0x (baseline)" if name == s["baseline"] else ratio_cell(r["speedup"], r.get("verdict")) + flag
        lines.append(f"| {name} | {r['unet_calls']} ({r['full_unet_calls']}) | {spread(r['img_per_s'])} | {speed} | {r['speedup_limit']:.2f}x | "
                     f"{ci(r['kid'], r['kid_ci95'])} | {ci(r['ssim'], r['ssim_ci95'])} |")
    for name, r in s["reference"].items():
        lines.append(f"| {name} | — | — | — | — | {ci(r['kid'], r['kid_ci95'])} | {ci(r['ssim'], r['ssim_ci95'])} |")
    return lines + [f"\nWarning: {w}" for w in s["warnings"]]


def render_sampler_quality(doc: dict) -> list[str]:
    s = doc["summary"]
    lines = [f"Run `{s['run']}`, n = {doc['settings']['n']} per setting, against {s['heldout']}.", "",
             "| sampler | steps | KID ↓ | FID (randconv) ↓ | SSIM to nearest held-out | img/s (one pass) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in s["rows"]:
        lines.append(f"| {r['sampler']} | {r['steps']} | {_sample_cells(r)} | {r['img_per_s']:.3g} |")
    lines += [f"| {name} | — | {_sample_cells(r)} | — |" for name, r in s["reference"].items()]
    return lines


def render_conditional_classes(doc: dict) -> list[str]:
    s = doc["summary"]
    acc, mean = s["cnn_accuracy"], s["sample_accuracy_mean"]["cnn"]
    return ["| judged the requested class (CNN) [95 % CI] | right modality | right finding, given modality | "
            "CNN on held-out real phantoms |", "| --- | --- | --- | --- |",
            f"| {ci(acc['value'], acc['ci95'])} of {acc['n']} | {mean['modality']:.1%} | "
            f"{mean['finding_given_modality']:.1%} | {s['classifier_accuracy_on_real']['cnn']:.1%} |"]


def render_data_scale(doc: dict) -> list[str]:
    lines = ["| images | PNGs | float32 set | cache (uint16) | cache build, img/s | build peak RSS (workers) | "
             "training peak RSS |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["runs"]:
        lines.append(f"| {r['n']:,} at {r['size']} px | {r['png_gib']:.2f} GiB | {r['float32_set_gib']:.1f} GiB | "
                     f"{r['cache_gib']:.1f} GiB | {r['build_img_per_s']:.0f} | {r['build_peak_rss_mib']:,.0f} MiB "
                     f"({r['build_workers_peak_rss_mib']:,.0f} MiB) | {r['train_peak_rss_mib']:,.0f} MiB |")
    s = doc["summary"]
    return lines + ["", f"Training peak RSS, largest over smallest set: {s['train_rss_growth']:.3f}x "
                        f"({doc['machine']['cpu']}, {s['cpus']} CPUs)."]


def render_gpu_check(doc: dict) -> list[str]:
    s, gpu = doc["summary"], doc["machine"]["gpu"]
    lines = [f"{gpu}, meddiff precision {doc['machine']['precision']}.", "",
             "| part | seed recipe (fp32, its way) | meddiff | ratio [95 % CI] |", "| --- | --- | --- | --- |"]
    if "train128" in s:
        t = s["train128"]
        lines.append(f"| training img/s, `seed` UNet @ {t['seed']['size']} px, batch {t['seed']['batch']} | "
                     f"{spread(t['seed']['img_per_s'])} | {spread(t['meddiff']['img_per_s'])} | "
                     f"{ratio_cell(t['ratio'], t.get('verdict'))} |")
    if "big" in s:
        b = s["big"]
        share = f"{b['share_of_peak']:.1%} of {b['peak_bf16_tflops']:g} TFLOP/s bf16" if b["share_of_peak"] else "—"
        lines.append(f"| training at batch {b['batch']}: img/s; achieved TFLOP/s (share of peak) | — | "
                     f"{spread(b['img_per_s'])}; {b['achieved_tflops']:.1f} ({share}) | — |")
    if "sample" in s:
        x = s["sample"]
        (seed_name, seed_ips), (med_name, med_ips) = list(x["img_per_s"].items())
        lines.append(f"| sampling img/s, batch {x['batch']}: {seed_name} vs {med_name} | {spread(seed_ips)} | "
                     f"{spread(med_ips)} | {ratio_cell(x['ratio'], x.get('verdict'))} (calls {x['most_from_calls']:.1f}x) |")
    if "quality" in s:
        q = s["quality"]
        m, ref = q["meddiff"], next(v for k, v in q["reference"].items() if k.startswith("real vs real"))
        lines.append(f"| quality after {q['minutes']:g} GPU-min at {q['size']} px ({q['steps']} steps): KID; SSIM to "
                     f"nearest held-out; copies | — | {ci(m['kid'], m['kid_ci95'])}; {ci(m['ssim'], m['ssim_ci95'])}; "
                     f"{m['copies_share']:.0%} | real vs real: {ci(ref['kid'], ref['kid_ci95'])}; "
                     f"{ci(ref['ssim'], ref['ssim_ci95'])} |")
    return lines


RENDERERS: dict[str, Callable[[dict], list[str]]] = {
    "quality_per_compute": render_quality_per_compute, "train_speed": render_train_speed,
    "train_memory": render_train_speed,
    "sampling_speed": render_sampling_speed, "sampler_quality": render_sampler_quality,
    "conditional_classes": render_conditional_classes, "data_scale": render_data_scale,
    "gpu_check": render_gpu_check,
    "size_table": render_size_table,
    "masks": render_masks,
    "size_rules_256": render_size_rules,
}


def renderer(figure: str) -> Callable[[dict], list[str]]:
    """A figure's table: its own renderer, or its family's (quality_per_compute_<run>, masks_<variant>)."""
    family = next((f for f in ("quality_per_compute", "masks") if figure.startswith(f + "_")), figure)
    return RENDERERS.get(figure) or RENDERERS[family]


def load(figure: str, results: Path) -> dict | None:
    path = results / f"{figure}.json"
    return json.loads(path.read_text()) if path.exists() else None


def not_yet(figure: str) -> list[str]:
    return [f"*Not yet rerun — run `{COMMANDS[figure]}`.*"]


def render_figure(figure: str, results: Path) -> str:
    doc = load(figure, results)
    if doc is None:
        return "\n".join(not_yet(figure))
    return "\n".join([*renderer(figure)(doc), "", command_line(doc, figure)])


# ---------------------------------------------------------------- the README's "What it reaches" rows

def _not_rerun(what: str, figure: str, seed: str = "—") -> str:
    """A README row for a figure without a results file: what it is and the command that produces it."""
    return f"| {what} | {seed} | — | not yet rerun — run `{COMMANDS[figure]}` |"


# the label-map files the README's table shows: the first (20-minute) run and the longest-trained run's; every other
# masks file (conditioning paths, loss weights, guidance and cutoff sweeps, 2x and 4x budgets) is in
# docs/benchmarks.md, where the story that leads to these is told
README_MASKS = ("masks", "masks_steps8x", "masks_steps8x_g2", "masks_anatomy_4x", "masks_anatomy_4x_newmaps_g1",
                "masks_anatomy_8x_newmaps", "masks_anatomy_4x_modelmaps_shift_2x")
README_MASK_SWEEPS = ("masks_steps8x", "masks_anatomy_8x")


def readme_rows(results: Path) -> list[str]:
    rows = ["| what | seed recipe | meddiff | reproduce |", "| --- | --- | --- | --- |"]
    q = load("quality_per_compute", results)
    if q:
        s = q["summary"]
        for key, what, low in (("kid", "brain MRI, 64 px, KID against held-out slabs ↓", True),
                               ("ssim", "same: SSIM to the nearest held-out slice", False),
                               ("val_eps_mse", "same: held-out eps-MSE at the seed's noise levels ↓", True)):
            seed = "; ".join(f"{ci(s['rows'][f'seed_{m:g}min'][key], s['rows'][f'seed_{m:g}min'].get(key + '_ci95'))}"
                             f" after {m:g} min" for m in s["budgets"])
            med = "; ".join(f"{compare(s['rows'][f'meddiff_{m:g}min'], s['rows'][f'seed_{m:g}min'], key, low)} after "
                            f"{m:g} min" for m in s["budgets"])
            rows.append(f"| {what} | {seed} | {med} | `{reproduce(q)}` |")
        last = s["budgets"][-1]
        rows.append(f"| same: samples that copy a training slice | "
                    f"{s['rows'][f'seed_{last:g}min']['copies_share']:.0%} | "
                    + ", ".join(f"{s['rows'][f'meddiff_{m:g}min']['copies_share']:.0%} after {m:g} min"
                                for m in s["budgets"]) + f" | `{reproduce(q)}` |")
    else:
        rows.append(_not_rerun("brain MRI quality per compute (KID, SSIM, held-out loss, copies)",
                               "quality_per_compute"))
    q128 = load("quality_per_compute_128", results)
    if q128:
        s128 = q128["summary"]
        first, last = s128["budgets"][0], s128["budgets"][-1]
        seed, med = s128["rows"][f"seed_{last:g}min"], s128["rows"][f"meddiff_{first:g}min"]
        ref = s128["reference"].get("real vs real (held-out half A vs half B)", {})
        for key, what, low in (("kid", "KID ↓", True), ("ssim", "SSIM to the nearest held-out slice", False)):
            rows.append(f"| brain MRI, 128 px: {what}, meddiff after {first:g} min against the seed after {last:g} | "
                        f"{ci(seed[key], seed.get(key + '_ci95'))} | {compare(med, seed, key, low)} (real vs real "
                        f"{ci(ref.get(key), ref.get(key + '_ci95'))}) | `{reproduce(q128)}` |")
    else:
        rows.append(_not_rerun("brain MRI at 128 px: meddiff after 3 min against the seed after 30",
                               "quality_per_compute_128"))
    q256 = load("quality_per_compute_256_table", results) or load("quality_per_compute_256", results)
    if q256:  # the pair at today's default where it exists, else the first (v-prediction) one
        s256 = q256["summary"]
        cells = []
        for m in s256["budgets"]:
            pix, lat = s256["rows"].get(f"meddiff_{m:g}min"), s256["rows"].get(f"latent_{m:g}min")
            if pix and lat:
                cells.append(f"{m:g} min: pixel {ci(pix['kid'], pix['kid_ci95'])}, latent "
                             f"{ci(lat['kid'], lat['kid_ci95'])} (autoencoder PSNR {lat['autoencoder_psnr_db']:.1f} dB)")
        ref = s256["reference"]["real vs real (held-out half A vs half B)"]
        rows.append(f"| brain MRI, 256 px, one thread each: KID ↓ of the pixel and latent paths | — | "
                    f"{'; '.join(cells)} (real vs real {ci(ref['kid'], ref['kid_ci95'])}) | `{reproduce(q256)}` |")
    else:
        rows.append(_not_rerun("brain MRI at 256 px: pixel against latent path", "quality_per_compute_256"))
    sr = load("size_rules_256", results)
    if sr:
        # the first variant is the rule (v, constant shift, the rule's patch); its x0 twin is named after it
        first = next(iter(sr["summary"]["rows"]))
        v, x0 = sr["summary"]["rows"][first], sr["summary"]["rows"].get(f"x0-prediction, {first}")
        if x0:
            rows.append(f"| brain MRI, 256 px, 10 one-thread min: KID ↓; pixel detail / real's (grain ≫ 1) of v- and "
                        f"x0-prediction (the default since) | — | v {ci(v['kid'], v['kid_ci95'])}; "
                        f"{v['fine_energy_ratio']:.0f}; x0 {ci(x0['kid'], x0['kid_ci95'])}; "
                        f"{x0['fine_energy_ratio']:.2f} | `{reproduce(sr)}` |")
    else:
        rows.append(_not_rerun("brain MRI at 256 px: the size rules (shift, patch, objective)", "size_rules_256"))
    for figure, what in (("quality_per_compute_256_60", "brain MRI, 256 px"),
                         ("quality_per_compute_128_2core", "brain MRI, 128 px"),
                         ("quality_per_compute_phantoms_256_60", "phantoms (4 modalities, normal and abnormal), 256 px"),
                         ("quality_per_compute_phantoms_512_30", "CT and X-ray phantoms (normal and abnormal), 512 px"),
                         ("quality_per_compute_phantoms_256_60_guidance3", "same phantoms, 256 px"),
                         ("quality_per_compute_phantoms_512_30_guidance3", "same CT and X-ray phantoms, 512 px")):
        qc = load(figure, results)
        if figure.endswith("_guidance3"):  # the run of the row above, sampled again: what guidance changes
            r = qc and qc["summary"]["rows"][f"meddiff_{qc['summary']['budgets'][-1]:g}min"]
            cls = r and r.get("class_consistency")
            if cls:
                per = ", ".join(f"{k.replace('_abnormal', '')} {v['value']:.2f}" for k, v in cls["per_class"].items()
                                if k.endswith("_abnormal"))
                rows.append(f"| {what}, the same run sampled at guidance {qc['summary']['guidance']:g}: class; abnormal "
                            f"samples judged abnormal; SSIM to nearest held-out; copies | — | "
                            f"{ci(cls['value'], cls['ci95'])} judged the class asked for; {per}; "
                            f"{ci(r['ssim'], r['ssim_ci95'])}; {r['copies_share']:.0%} | `{reproduce(qc)}` |")
            continue
        if not qc:
            rows.append(_not_rerun(f"{what}, default pixel path on 2 cores against real vs real", figure))
            continue
        sq = qc["summary"]
        m = sq["budgets"][-1]
        r, ref = sq["rows"][f"meddiff_{m:g}min"], sq["reference"]["real vs real (held-out half A vs half B)"]
        cls = r.get("class_consistency")
        judged = (f"; {ci(cls['value'], cls['ci95'])} judged the class asked for (held-out real: "
                  f"{ci(cls['reference']['value'], cls['reference']['ci95'])})") if cls and cls.get("reference") else ""
        rows.append(f"| {what}, {m:g} min on {qc['settings'].get('threads', 1)} cores: KID; FID; SSIM "
                    f"to nearest held-out; copies; peak RSS{'; class' if judged else ''} | — | "
                    f"{ci(r['kid'], r['kid_ci95'])}; "
                    f"{ci(r['fid'], r['fid_ci95'])}; {ci(r['ssim'], r['ssim_ci95'])}; {r['copies_share']:.0%}; "
                    f"{_num(r.get('peak_rss_mib'), ',.0f')} MiB{judged} (real vs real: "
                    f"{ci(ref['kid'], ref['kid_ci95'])}; "
                    f"{ci(ref['fid'], ref['fid_ci95'])}; {ci(ref['ssim'], ref['ssim_ci95'])}) | `{reproduce(qc)}` |")
    st = load("size_table", results)
    if st:
        table = st["summary"]["cases"]["sizes"]
        real = table.get("real_training") or {}
        biggest = max(int(k) for k in table["table"])
        seed_big = table["table"][str(biggest)]["seed"]
        seed_cell = (f"does not fit at {biggest} px (needs ~{seed_big['need_gib']:.0f} GiB)" if not seed_big.get("fits")
                     else f"{seed_big['peak_rss_mib']:,.0f} MiB")
        rows.append(f"| training peak memory at {biggest} px (X-ray and CT phantoms, data included) | {seed_cell} | "
                    + ", ".join(f"{k}: {r['peak_rss_mib']:,.0f} MiB" for k, r in real.items()) + f" | `{reproduce(st)}` |")
    else:
        rows.append(_not_rerun("training img/s and peak memory at 64-512 px", "size_table"))
    shown = set()
    for figure in ("train_speed", "train_memory"):  # train_memory: the memory case on its own, where rerun so
        t = load(figure, results)
        for case, c in (t["summary"]["cases"].items() if t else ()):
            if case == "mem128" and own_peaks(c) and case not in shown:
                rows.append(f"| peak memory, `seed` UNet at {c['seed']['size']} px | batch 10: "
                            f"{c['seed']['peak_rss_mib']['median']:,.0f} MiB | effective batch {c['meddiff']['batch']} "
                            f"(micro-batch 4 + gradient checkpointing): {c['meddiff']['peak_rss_mib']['median']:,.0f} MiB"
                            f" ({c['ratio']['ratio']:.2f}x) | `{t['command']}` |")
            elif case != "mem128" and case not in shown:
                rows.append(f"| training img/s, `{c['meddiff']['preset']}` vs seed `{c['seed']['arch']}` @ "
                            f"{c['meddiff']['size']} px ({c['meddiff']['hardware']}) | 1.0x | "
                            f"{ratio_cell(c['ratio'], c.get('verdict'))} | `{t['command']}` |")
            else:
                continue
            shown.add(case)
    rows += [_not_rerun(what, "train_memory" if case == "mem128" else "train_speed")
             for case, what in TRAIN_SPEED_CASES.items() if case not in shown]
    sp = load("sampling_speed", results)
    if sp:
        for name, r in sp["summary"]["rows"].items():
            if name != sp["summary"]["baseline"]:
                rows.append(f"| sampling, same weights: {name} (KID {ci(r['kid'], r['kid_ci95'])}) | DDIM 20, 1.0x | "
                            f"{ratio_cell(r['speedup'], r.get('verdict'))} (limit {r['speedup_limit']:.2f}x) | "
                            f"`{sp['command']}` |")
    else:
        rows.append(_not_rerun("sampling speed, same weights", "sampling_speed"))
    c = load("conditional_classes", results)
    if c:
        acc = c["summary"]["cnn_accuracy"]
        rows.append(f"| 8 classes, one model: samples judged the requested class | cannot condition | "
                    f"{ci(acc['value'], acc['ci95'])} | `{c['command']}` |")
    else:
        rows.append(_not_rerun("8 classes, one model: samples judged the requested class", "conditional_classes",
                               seed="cannot condition"))
    for name in README_MASKS:
        m = load(name, results)
        if m and m["summary"].get("utility_paired"):
            sm = m["summary"]
            adh = ", ".join(f"{k} {v['generated']['dice']:.2f} (real {v['real']['dice']:.2f})"
                            for k, v in (sm.get("adherence") or {}).items()) or "adherence not scored in this call"
            r, d = sm["utility_paired"]["synthetic_vs_real"], sm["utility_paired"]["plus_synthetic_vs_few"]
            few = m["settings"]["few"]
            how = {"spade": ", maps through SPADE too", "controlnet": ", maps through a ControlNet copy too"
                   }.get(sm.get("conditioning"), "")
            how += ", maps of lesion and anatomy" if sm.get("maps") == "anatomy" else ""
            seg_steps = m["settings"].get("seg_steps", 600)
            by_steps = m["settings"].get("steps") or sm["training"].get("stopped") == "max-steps"
            how += f", trained {sm['training']['steps']:,} steps" if by_steps else ""
            flags = masks_train_flags(m)
            how += f", `{flags}`" if flags else ""
            how += f", segmenters trained {seg_steps:,} steps" if seg_steps != 600 else ""
            how += f", guidance cutoff {sm['guidance_cutoff']:g}" if sm.get("guidance_cutoff") else ""
            copies = sm.get("copies") or {}
            kind = sm.get("utility_maps", "training")
            own = copies.get(f"from_{kind}_maps")  # what the synthetic pairs copy
            how += {"new": ", synthetic pairs from new (jittered) maps",
                    "model": ", synthetic pairs from maps a model of label maps drew"}.get(kind, "")
            own_head = (f"; images made from {dict(model='drawn').get(kind, kind)} maps flagged as copies"
                        if own else "")
            own_cell = f"; {pct(own['share'])}" if own else ""
            rows.append(f"| label maps (phantoms, {m['settings']['size']} px, guidance {sm['guidance']:g}{how}): lesion "
                        f"Dice of generated images against the requested map; synthetic-only / real-only segmenter "
                        f"Dice; {few} real + synthetic minus {few} real{own_head} | cannot condition on a map | {adh}; "
                        f"{ci(r['ratio'], r['ratio_ci95'])}; {d['difference']:+.3f} [{d['difference_ci95'][0]:+.3f}, "
                        f"{d['difference_ci95'][1]:+.3f}]{own_cell} | `{masks_commands(m)}` |")
    for name in README_MASK_SWEEPS:
        sweep = load(name, results)
        if not (sweep and sweep["summary"].get("adherence_by_guidance")):
            continue
        sm = sweep["summary"]
        by_g = sm["adherence_by_guidance"]
        cells = "; ".join(f"{g}: " + ", ".join(f"{k} {v['generated']['dice']:.2f}" for k, v in r.items())
                          for g, r in sorted(by_g.items(), key=lambda kv: float(kv[0])))
        real = ", ".join(f"{k} {v['real']['dice']:.2f}" for k, v in next(iter(by_g.values())).items())
        flags = masks_train_flags(sweep)
        which = ("the same recipe trained " + f"{sm['training']['steps']:,} steps" + (f" with `{flags}`" if flags else "")
                 if sm["training"].get("stopped") == "max-steps" else "the guidance-2 run above")
        which += " on maps of lesion and anatomy" if sm.get("maps") == "anatomy" else ""
        cut = f", guided from {sm['guidance_cutoff']:g} T up" if sm.get("guidance_cutoff") else ""
        ip = sm.get("inpainting") or {}
        inpainted = (f"; inpainted lesions called abnormal at guidance {sm['guidance']:g} "
                     f"{ci(ip['detected_abnormal'], ip['detected_ci95'])} (real lesions "
                     f"{ip['real_abnormal_called']['share']:.2f}), largest change outside the region "
                     f"{ip['max_change_outside']:g}" if ip.get("real_abnormal_called") else "")
        rows.append(f"| label maps (phantoms, {sweep['settings']['size']} px, {which}{cut}): lesion Dice of generated "
                    f"images by guidance scale{'; inpainting' if inpainted else ''} | cannot condition on a map | "
                    f"{cells} (real images: {real}){inpainted} | `{masks_commands(sweep)}` |")
    d = load("data_scale", results)
    if d:
        r0, r1 = d["runs"][0], d["runs"][-1]
        rows.append(f"| data larger than memory: training peak RSS at {r0['n']:,} and {r1['n']:,} images of "
                    f"{r1['size']} px ({r1['float32_set_gib']:.0f} GiB as float32) | holds the set in memory | "
                    f"{r0['train_peak_rss_mib']:,.0f} and {r1['train_peak_rss_mib']:,.0f} MiB; cache built at "
                    f"{r1['build_img_per_s']:.0f} img/s | `{d['command']}` |")
    else:
        rows.append(_not_rerun("data larger than memory: training peak RSS against the set's size", "data_scale"))
    g = load("gpu_check", results)
    if g:
        rows.append(f"| one GPU ({g['machine']['gpu']}): see docs/benchmarks.md | — | — | `{g['command']}` |")
    else:
        rows.append("| one GPU: training, large-batch share of the bf16 peak, sampling, 2-minute quality at 256 px | "
                    f"— | — | no GPU lent yet — run `{COMMANDS['gpu_check']}` on one |")
    return rows


# ---------------------------------------------------------------- quality by size: every run, one table

ASKED_SIZES, ASKED_MINUTES = (64, 128, 256, 512), (10, 30)  # issue 20's table: each path, one thread each


def size_quality_rows(results: Path) -> list[str]:
    """Issue 20's table assembled from every quality-per-compute results file: one row per (size, data, path,
    budget, threads) with its sample figures beside that file's real-vs-real reference, and then the cells the
    issue asks for (each path at 10 and 30 one-thread minutes at every size) that no file holds yet."""
    lines = ["| size | data | path | training | KID ↓ | FID (randconv) ↓ | SSIM to nearest held-out | pixel detail / "
             "real's | copies | real vs real: KID; SSIM | results file |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows: dict[str, tuple[tuple, list[str]]] = {}
    have = set()
    for path in sorted(results.glob("quality_per_compute*.json")):
        doc = json.loads(path.read_text())
        s, st = doc["summary"], doc["settings"]
        size, data, threads = st.get("size", 64), st.get("data") or "mni", st.get("threads") or 1
        ref = s["reference"].get("real vs real (held-out half A vs half B)", {})
        guided = f", guidance {s['guidance']:g}" if s.get("guidance", 1) != 1 else ""
        flags = (st.get("meddiff_args") or "").strip() if not st.get("quick") else ""
        for name in s["order"]:
            r = s["rows"][name]
            # scored before the pixel detail existed: above 64 px, the v-prediction default x0 has replaced since
            earlier = r["who"] == "meddiff" and size > 64 and "fine_energy_ratio" not in r
            extra = flags if r["who"] != "seed" else ""  # meddiff trained with other flags: not the default's cell
            if data == "mni" and threads == 1 and not earlier and not _clipped_latents(r) and not extra:
                have.add((size, r["who"], r["minutes"]))
            steps = f", {r['steps']:,} steps{_stopped_early(r)}" if r.get("steps") else ""
            who = "meddiff pixel (v-prediction: the default before x0)" if earlier else _who(r)
            who += f", `{extra}`" if extra else ""
            figures = (f"| {size} px | {'brain MRI (MNI)' if data == 'mni' else 'phantoms'} | {who} | "
                       f"{r['minutes']:g} min on {threads} thread{'s' if threads > 1 else ''}{steps}{guided} | "
                       f"{_sample_cells(r)} | {_fine(r)} | {r['copies_share']:.0%} | "
                       f"{ci(ref.get('kid'), ref.get('kid_ci95'))}; {ci(ref.get('ssim'), ref.get('ssim_ci95'))} |")
            rows.setdefault(figures, ((size, data, r["who"], r["minutes"], guided), []))[1].append(f"`{path.name}`")
    # one row per measurement: a run a later file reused (its --reuse) is listed once, with both files
    lines += [f"{figures} {', '.join(files)} |" for figures, (_, files) in sorted(rows.items(), key=lambda kv: kv[1][0])]
    why = _why_unmeasured(results)
    missing = [f"{size} px {WHO[who]} {m} min{why.get((size, who), '')}" for size in ASKED_SIZES
               for who in ("seed", "meddiff", "latent") for m in ASKED_MINUTES if (size, who, m) not in have]
    if missing:
        lines += ["", f"Not yet measured of the issue's one-thread brain-MRI table ({len(missing)} of "
                  f"{len(ASKED_SIZES) * 3 * len(ASKED_MINUTES)} cells): " + "; ".join(missing) + "."]
    return lines


def _why_unmeasured(results: Path) -> dict[tuple[int, str], str]:
    """{(size, who): reason} for the table's cells the size table shows cannot be measured: the seed recipe's
    own `seed` UNet does not fit in memory at that size (its saved-tensor count)."""
    doc = load("size_table", results)
    if doc is None:
        return {}
    table = doc["summary"]["cases"]["sizes"]["table"]
    return {(int(size), "seed"):
            f" (its `seed` UNet does not fit: needs ~{row['seed']['need_gib']:.0f} GiB, size table)"
            for size, row in table.items() if row["seed"].get("need_gib") and not row["seed"].get("img_per_s")}


# ---------------------------------------------------------------- the blocks in the files

BLOCK = re.compile(r"(<!-- render:(?P<name>[a-z0-9_]+) -->\n)(?P<body>.*?)(<!-- /render -->)", re.S)


def fill(text: str, results: Path) -> str:
    def body(m: re.Match) -> str:
        name = m.group("name")
        if name == "readme":
            content = "\n".join(readme_rows(results))
        elif name == "size_quality":
            content = "\n".join(size_quality_rows(results))
        elif name in COMMANDS:
            content = render_figure(name, results)
        else:
            raise SystemExit(f"unknown render block {name!r}; known: readme, size_quality, {', '.join(COMMANDS)}")
        return f"{m.group(1)}{content}\n{m.group(4)}"
    return BLOCK.sub(body, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(RESULTS), help="folder of <figure>.json files")
    ap.add_argument("--files", default="docs/benchmarks.md,README.md", help="files with render blocks")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a block is out of date")
    a = ap.parse_args()
    stale = []
    for name in a.files.split(","):
        path = ROOT / name
        old = path.read_text()
        new = fill(old, Path(a.results))
        if new != old:
            stale.append(name)
            if not a.check:
                path.write_text(new)
    print(("out of date: " if a.check else "rewrote: ") + (", ".join(stale) or "nothing"))
    sys.exit(1 if a.check and stale else 0)


if __name__ == "__main__":
    main()
