#!/usr/bin/env python3
"""Which objective, schedule and loss weighting should be the default? Same preset, same data, same time
budget, one CPU thread each (two runs at a time), then the same validation loss (eps-MSE at fixed noise and
timesteps, v-predictions converted) and the same sampler (DDIM 20) and metrics for each, all on the held-out
MNI slabs of benchmarks/_heldout.py (training on the training slices only), with intervals.

    python benchmarks/objectives.py --minutes 3 --n 64
Writes benchmarks/results/objectives.json. With `--study size-rules --size S`, the same for the rules that
follow the image size (noise shift, patch), written to benchmarks/results/size_rules_<S>.json.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import _results as R
from _heldout import mni_split, reference_rows, score_heldout
from quality_per_compute import last_json, record_shift, sample, start_meddiff, val_losses, write_training_data

VARIANTS = {
    "eps, linear, no weighting (the seed's objective)": ["--objective", "eps", "--beta-schedule", "linear",
                                                         "--loss-weighting", "none"],
    "eps, cosine, min-SNR-5": ["--objective", "eps", "--beta-schedule", "cosine", "--loss-weighting", "min-snr"],
    "v, cosine, no weighting (default)": ["--objective", "v", "--beta-schedule", "cosine", "--loss-weighting", "none"],
    "v, cosine, min-SNR-5": ["--objective", "v", "--beta-schedule", "cosine", "--loss-weighting",
                                       "min-snr"],
}


def size_rule_variants(size: int) -> dict[str, list[str]]:
    """The rules that follow the image size (issue 20), each spelt out in flags so that a label stays true
    whatever the default is: the "simple diffusion" shift held constant, the same shift interpolated to none at
    the clean end, no shift, the rule's shift with half the rule's patch (the UNet on a 64-px grid), and both
    patches with the UNet predicting the clean image (x0, with the v-loss) instead of v."""
    from meddiff.config import patch_for

    shift, patch = 2 * math.log(64 / size), patch_for("lean", size)
    return {f"shift {shift:.2f} constant, patch {patch}": ["--noise-shift", f"{shift}", "--patch", f"{patch}"],
            f"shift {shift:.2f} at noise to 0 at clean, patch {patch}": ["--noise-shift", f"{shift}",
                                                                       "--noise-shift-clean", "0", "--patch",
                                                                       f"{patch}"],
            f"no shift, patch {patch}": ["--noise-shift", "0", "--patch", f"{patch}"],
            f"shift {shift:.2f} constant, patch {patch // 2}": ["--noise-shift", f"{shift}", "--patch",
                                                                f"{patch // 2}"],
            f"x0-prediction, shift {shift:.2f} constant, patch {patch}": ["--objective", "x0", "--noise-shift",
                                                                        f"{shift}", "--patch", f"{patch}"],
            f"x0-prediction, shift {shift:.2f} constant, patch {patch // 2}": ["--objective", "x0", "--noise-shift",
                                                                             f"{shift}", "--patch", f"{patch // 2}"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--minutes", type=float, default=3)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--out", default="bench_out/objectives")
    ap.add_argument("--study", choices=("objectives", "size-rules"), default="objectives",
                    help="objectives: the objective/schedule/weighting variants; size-rules: the noise shift and "
                         "patch at --size (results default to size_rules_<size>.json)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated indices into the variant list (default all); objectives: "
                         + "; ".join(f"{i}: {n}" for i, n in enumerate(VARIANTS)))
    ap.add_argument("--reuse", action="store_true",
                    help="score the variants an earlier call trained in --out for the same --minutes, train the rest")
    R.add_results_arg(ap, "objectives")
    a = ap.parse_args()
    variants = VARIANTS if a.study == "objectives" else size_rule_variants(a.size)
    if a.study == "size-rules" and a.results == str(R.RESULTS / "objectives.json"):
        a.results = str(R.RESULTS / f"size_rules_{a.size}.json")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    split = mni_split(a.size)
    _npy, png = write_training_data(split, out)
    held = torch.from_numpy(split.images[split.heldout])[:, None] * 2 - 1
    names = list(variants)
    if a.variants:
        try:
            names = [names[int(i)] for i in a.variants.split(",")]
        except (ValueError, IndexError):
            raise SystemExit(f"--variants {a.variants}: expected indices 0-{len(names) - 1}, comma-separated")
    stats = {}
    run_of = {n: out / f"v{list(variants).index(n)}" for n in names}
    if a.reuse:  # variants trained by an earlier call (same --out, --minutes): scored again, not retrained
        for n in names:
            rec = run_of[n] / "meddiff.json"
            result = json.loads(rec.read_text()).get("result") if rec.exists() else None
            if result and json.loads(rec.read_text())["train"].get("max_minutes") == a.minutes:
                stats[n] = result
    todo = [n for n in names if n not in stats]
    for i in range(0, len(todo), 2):  # two runs side by side, one thread each
        procs = {n: start_meddiff(png, a.size, a.minutes, run_of[n], variants[n]) for n in todo[i:i + 2]}
        stats.update({n: last_json(p) for n, p in procs.items()})
    rows = {}
    mach = None
    summary_extra = dict(study=a.study, variants={n: variants[n] for n in names})
    for n in names:
        run = out / f"v{list(variants).index(n)}"
        rec = json.loads((run / "meddiff.json").read_text())
        mach = mach or R.machine(rec.get("hardware") or "auto")
        q = score_heldout(sample(dict(who="meddiff", run=run), a.n), split, n_boot=a.bootstrap)
        q.update(val_losses(run / "unet", held, rec["train"]["objective"], rec["train"]["beta_schedule"],
                            rec["model"]["patch_size"], record_shift(rec["train"])))
        q["steps"] = stats[n]["steps"]
        rows[n] = q
        print(n, json.dumps({k: v for k, v in q.items() if k != "ssim_per_sample"}), flush=True)
    summary = dict(rows=rows, reference=reference_rows(split, a.bootstrap), heldout=split.description,
                   **summary_extra)
    R.write_results(a.results, "objectives", mach, vars(a), list(stats.values()), summary)


if __name__ == "__main__":
    main()
