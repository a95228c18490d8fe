#!/usr/bin/env python3
"""Which objective, schedule and loss weighting should be the default? Same preset, same data, same time
budget, one CPU thread each (two runs at a time), then the same validation loss (eps-MSE at fixed noise and
timesteps, v-predictions converted) and the same sampler (DDIM 20) and metrics for each.

    python benchmarks/objectives.py --data builtin:mni-mri --minutes 3 --n 32 --out bench_out/objectives
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_per_compute import last_json, meddiff_samples, score, start_meddiff, val_loss_of  # noqa: E402

VARIANTS = {
    "eps, linear, no weighting (the seed's objective)": ["--objective", "eps", "--beta-schedule", "linear",
                                                         "--loss-weighting", "none"],
    "eps, cosine, min-SNR-5": ["--objective", "eps", "--beta-schedule", "cosine", "--loss-weighting", "min-snr"],
    "v, cosine, no weighting (default)": ["--objective", "v", "--beta-schedule", "cosine", "--loss-weighting", "none"],
    "v, cosine, min-SNR-5": ["--objective", "v", "--beta-schedule", "cosine", "--loss-weighting",
                                       "min-snr"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="builtin:mni-mri")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--minutes", type=float, default=3)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--out", default="bench_out/objectives")
    ap.add_argument("--variants", default=None,
                    help="comma-separated indices into the variant list (default all): "
                         + "; ".join(f"{i}: {n}" for i, n in enumerate(VARIANTS)))
    a = ap.parse_args()
    from meddiff.data.dataset import load_data, split
    from meddiff.runtime import cpu_model

    out = Path(a.out)
    data = load_data(a.data, a.size)
    train_idx, val_idx = split(data, 0.1, 0)
    images01 = ((data.images[:, 0] + 1) / 2).numpy()
    real, heldout = images01[train_idx], images01[val_idx]
    names = list(VARIANTS)
    if a.variants:
        try:
            names = [names[int(i)] for i in a.variants.split(",")]
        except (ValueError, IndexError):
            raise SystemExit(f"--variants {a.variants}: expected indices 0-{len(names) - 1}, comma-separated")
    stats = {}
    for i in range(0, len(names), 2):  # two runs side by side, one thread each
        procs = {n: start_meddiff(a.data, a.size, a.minutes, out / f"v{list(VARIANTS).index(n)}", VARIANTS[n])
                 for n in names[i:i + 2]}
        stats.update({n: last_json(p) for n, p in procs.items()})
    rows = {}
    for n in names:
        run = out / f"v{list(VARIANTS).index(n)}"
        rec = json.loads((run / "meddiff.json").read_text())
        imgs, _ = meddiff_samples(run, a.n)
        q = score(imgs, real, heldout)
        q.update(val_loss_of(run / "unet", data.images[val_idx], rec["train"]["objective"],
                             rec["train"]["beta_schedule"], rec["model"]["patch_size"]))
        q["steps"] = stats[n]["steps"]
        rows[n] = q
        print(n, json.dumps(q), flush=True)
    (out / "objectives.json").write_text(json.dumps(dict(cpu=cpu_model(), minutes=a.minutes, precision=stats[names[0]].get("precision"), rows=rows), indent=2))


if __name__ == "__main__":
    main()
