#!/usr/bin/env python3
"""Before/after: training and sampling speed of two meddiff source trees, side by side on one thread each.

    git worktree add /tmp/before <commit>
    python benchmarks/compare_versions.py --before /tmp/before/src --after src --repeats 5

Both trees are driven through the command line only (`meddiff train`, `meddiff sample`), whose flags and
printed JSON have stayed stable, so any two commits compare. Each repeat runs BEFORE and AFTER at the same time,
one thread each (the machine's two cores), and alternates which starts first; the ratio is after/before of the
medians, with a bootstrap interval over repeats. Writes every repeat to --results
(default benchmarks/results/compare_versions.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _env(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src.resolve()), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _start(src: Path, argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "meddiff.cli", *argv], env=_env(src), cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, what: str) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"compare_versions: {what} failed: {err.strip()[-400:]}")
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    sys.exit(f"compare_versions: {what} printed no JSON result")


def _interval(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    ratios = [np.median(rng.choice(b, len(b))) / np.median(rng.choice(a, len(a))) for _ in range(n_boot)]
    return float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="src/ folder of the older tree")
    ap.add_argument("--after", default=str(ROOT / "src"), help="src/ folder of the newer tree")
    ap.add_argument("--data", default="builtin:mni-mri")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=80, help="training steps a repeat")
    ap.add_argument("--n", type=int, default=16, help="images sampled a repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "compare_versions.json"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="meddiff-compare-"))
    trees = {"before": Path(a.before), "after": Path(a.after)}
    rows: list[dict] = []
    try:
        for r in range(a.repeats):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            procs = {}
            for name in order:
                run = work / f"{name}{r}"
                procs[name] = _start(trees[name], ["train", "--data", a.data, "--size", str(a.size), "--out", str(run),
                                                   "--max-steps", str(a.steps), "--no-progress",
                                                   "--cache-dir", str(work / f"cache-{name}")], work)
                time.sleep(0.5)
            train = {name: _result(p, f"train ({name})") for name, p in procs.items()}
            procs = {}
            for name in order:
                procs[name] = _start(trees[name], ["sample", "--run", str(work / f"{name}{r}"), "--out",
                                                   str(work / f"s-{name}{r}"), "--n", str(a.n), "--no-progress"], work)
                time.sleep(0.5)
            sample = {name: _result(p, f"sample ({name})") for name, p in procs.items()}
            for name in trees:
                rows.append(dict(repeat=r, tree=name, first=order[0] == name,
                                 train_img_per_s=train[name]["train_img_per_s"], train_seconds=train[name]["seconds"],
                                 sample_img_per_s=sample[name]["img_per_s"], sample_seconds=sample[name]["seconds"],
                                 hardware=sample[name].get("hardware")))
                shutil.rmtree(work / f"s-{name}{r}", ignore_errors=True)
            print(f"repeat {r}: " + ", ".join(f"{x['tree']} train {x['train_img_per_s']:.2f} img/s sample "
                                              f"{x['sample_img_per_s']:.2f} img/s" for x in rows[-2:]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for key in ("train_img_per_s", "sample_img_per_s"):
        b = np.array([x[key] for x in rows if x["tree"] == "before"])
        f = np.array([x[key] for x in rows if x["tree"] == "after"])
        lo, hi = _interval(b, f)
        ratio = float(np.median(f) / np.median(b))
        summary[key] = dict(before_median=float(np.median(b)), before_range=[float(b.min()), float(b.max())],
                            after_median=float(np.median(f)), after_range=[float(f.min()), float(f.max())],
                            ratio=ratio, interval=[lo, hi], verdict="tie" if lo <= 1 <= hi else
                            ("faster" if lo > 1 else "slower"))
        print(f"{key}: before {np.median(b):.2f} [{b.min():.2f}, {b.max():.2f}], after {np.median(f):.2f} "
              f"[{f.min():.2f}, {f.max():.2f}] → after/before {ratio:.3f} (95 % {lo:.3f}–{hi:.3f}): "
              f"{summary[key]['verdict']}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(json.dumps(dict(
        figure="compare_versions", command=" ".join(["python", *sys.argv]), commit=commit,
        machine=platform.machine(), threads_each=1, data=a.data, size=a.size, steps=a.steps, n=a.n,
        repeats=rows, summary=summary), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
