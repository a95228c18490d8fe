"""What every benchmark records and how it summarises repeats: the machine and code a figure came from, the
raw results file `benchmarks/results/<figure>.json`, interleaved repeats, median/spread and bootstrap intervals.

Shared by the scripts in benchmarks/ (run as `python benchmarks/<script>.py`, so this imports as `_results`);
`render.py` reads the files written here. A results file holds:

    figure     the figure's name (the file's stem by default)
    command    the exact command line that produced it, run from the repository root
    machine    CPU, GPU, threads, OMP_NUM_THREADS, precision, python/torch/diffusers versions, git commit + dirty
    settings   the parsed options
    runs       every run and every repeat, raw (seconds, img/s, per-sample scores …)
    summary    what the docs' tables show: medians, spreads, ratios with intervals, scores with intervals
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# ../shared/baselines/seed_recipe.py beside the checkout (one level further up from a git worktree under wt/)
SEED_SCRIPT = next((p / "shared" / "baselines" / "seed_recipe.py" for p in ROOT.parents
                    if (p / "shared" / "baselines" / "seed_recipe.py").exists()),
                   ROOT.parent / "shared" / "baselines" / "seed_recipe.py")


def add_results_arg(ap: argparse.ArgumentParser, figure: str) -> None:
    """--results PATH (default benchmarks/results/<figure>.json) and --repeats on a script's parser."""
    ap.add_argument("--results", default=str(RESULTS / f"{figure}.json"),
                    help=f"raw results file (default benchmarks/results/{figure}.json, what render.py reads)")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def command_line() -> str:
    """This process's command line as it would be typed from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_arg = str(script.relative_to(ROOT))
    except ValueError:
        script_arg = sys.argv[0]
    return shlex.join(["python", script_arg, *sys.argv[1:]])


def machine(precision: str | dict[str, str]) -> dict[str, Any]:
    """The machine, software and code a figure was measured with (call once, at the start)."""
    import diffusers
    import torch

    from meddiff.runtime import cpu_model

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return dict(cpu=cpu_model(), cpu_capability=torch.backends.cpu.get_cpu_capability(), cores=os.cpu_count(),
                gpu=gpu, precision=precision, torch_threads=torch.get_num_threads(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"), python=platform.python_version(),
                torch=torch.__version__, diffusers=diffusers.__version__, platform=platform.platform(),
                commit=_git("rev-parse", "HEAD") or None, dirty=bool(dirty), command=command_line(),
                started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def write_results(path: str | Path, figure: str, mach: dict[str, Any], settings: dict[str, Any],
                  runs: list[dict[str, Any]], summary: dict[str, Any]) -> Path:
    """Write the raw results file atomically (a temporary name, then rename); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(figure=figure, command=mach["command"], machine=mach, settings=settings, runs=runs,
               summary=summary, finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}", flush=True)
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


# ---------------------------------------------------------------- repeats

def interleaved(names: Sequence[str], timed: dict[str, Callable[[], float]], repeats: int, warmup: int = 1,
                echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Round-robin timing: round r runs every setting once, in order, before round r + 1 runs any, so a machine
    that speeds up or slows down partway affects all settings alike. `timed[name]()` does one repeat and
    returns its seconds. The first `warmup` rounds are recorded with warmup=True and left out of summaries."""
    runs = []
    for r in range(warmup + repeats):
        for name in names:
            seconds = timed[name]()
            runs.append(dict(setting=name, round=r, warmup=r < warmup, seconds=seconds))
            echo(f"round {r}{' (warm-up)' if r < warmup else ''}: {name}: {seconds:.3f} s")
    return runs


def per_round(runs: list[dict[str, Any]], name: str, key: str = "seconds") -> np.ndarray:
    """The timed (non-warm-up) values of one setting, ordered by round."""
    rows = sorted((r for r in runs if r["setting"] == name and not r["warmup"]), key=lambda r: r["round"])
    return np.array([r[key] for r in rows], np.float64)


def median_spread(values: Sequence[float]) -> dict[str, float | int]:
    """Median, min, max and quartiles of repeated measurements."""
    v = np.asarray(values, np.float64)
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return dict(n=len(v), median=float(med), min=float(v.min()), max=float(v.max()), q1=float(q1), q3=float(q3))


def ratio_of_medians(num: Sequence[float], den: Sequence[float], paired: bool = True, n_boot: int = 4000,
                     seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """median(num) / median(den) with a percentile bootstrap interval over repeats. paired: num[i] and den[i]
    come from the same interleaved round, and a resample draws whole rounds (keeps the pairing)."""
    a, b = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if min(len(a), len(b)) < 3:  # a bootstrap over 1 or 2 repeats is no interval at all
        return dict(ratio=float(np.median(a) / np.median(b)), ci95=None, n=[len(a), len(b)],
                    method="ratio of medians; fewer than 3 repeats: no interval")
    rng = np.random.default_rng([seed, 17])
    if paired:
        if len(a) != len(b):
            raise ValueError(f"paired ratio needs equal repeats, got {len(a)} and {len(b)}")
        idx = rng.integers(0, len(a), (n_boot, len(a)))
        boots = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    else:
        boots = (np.median(a[rng.integers(0, len(a), (n_boot, len(a)))], axis=1)
                 / np.median(b[rng.integers(0, len(b), (n_boot, len(b)))], axis=1))
    tail = (1 - level) / 2 * 100
    return dict(ratio=float(np.median(a) / np.median(b)),
                ci95=[float(np.percentile(boots, tail)), float(np.percentile(boots, 100 - tail))],
                n=[len(a), len(b)], method="ratio of medians, percentile bootstrap over "
                + ("interleaved rounds (paired)" if paired else "repeats"))


def bootstrap_mean(values: Sequence[float], n_boot: int = 4000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of per-sample values (e.g. 0/1 'judged right') with a percentile bootstrap interval."""
    v = np.asarray(values, np.float64)
    rng = np.random.default_rng([seed, 19])
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return dict(value=float(v.mean()), n=len(v),
                ci95=[float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))])


def verdict(ci95: Sequence[float] | None, baseline: float, higher_is_better: bool = True) -> str:
    """'win', 'loss' or 'tie': a figure whose interval contains the baseline is a tie, never a win;
    'no interval' when there is none (fewer than 3 repeats)."""
    if ci95 is None:
        return "no interval"
    lo, hi = ci95
    if lo <= baseline <= hi:
        return "tie"
    better = lo > baseline if higher_is_better else hi < baseline
    return "win" if better else "loss"


def stopwatch(fn: Callable[[], Any]) -> Callable[[], float]:
    """A zero-argument callable → one that runs it and returns the seconds it took."""
    def timed() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return timed


# A child keeps its parent's getrusage ru_maxrss across fork and exec (Linux), so a program that reports its peak
# RSS that way (the seed recipe does) reports this benchmark's own peak when that is the larger: a seed128 case
# run in this process first made both sides of mem128 report its 14 GB. Started from a small launcher instead,
# the program inherits only the launcher's few MiB. The launcher forwards SIGTERM/SIGINT and returns the code.
_LAUNCHER = ("import signal, subprocess, sys\n"
             "p = subprocess.Popen(sys.argv[1:])\n"
             "for s in (signal.SIGTERM, signal.SIGINT):\n"
             "    signal.signal(s, lambda n, f: p.send_signal(n))\n"
             "sys.exit(p.wait())\n")


def fresh(argv: Sequence[str]) -> list[str]:
    """argv started through a small launcher, so its reported peak RSS is its own (see _LAUNCHER)."""
    return [sys.executable, "-c", _LAUNCHER, *argv]


def last_json(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a process (through `fresh`, so the peak RSS it reports is its own) and return the last JSON object line
    it printed; SystemExit with its stderr's tail when it fails."""
    out = subprocess.run(fresh(argv), capture_output=True, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if out.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
