#!/usr/bin/env python3
"""Training throughput and peak memory per process: 1 process with every thread (or 1 GPU) against N processes
under torchrun (gloo on CPU, NCCL on N GPUs), the same `meddiff train` command and global batch in each.

    python benchmarks/scaling.py                          # lean@64: 1 process x 2 threads vs 2 x 1 thread
    python benchmarks/scaling.py --cases lean64,tiny64 --steps 50
    python benchmarks/scaling.py --procs 4                # a 4-GPU machine: 1 GPU vs 4 GPUs (NCCL)

Each case is a real `meddiff train` run on builtin:mni-mri (offline) with a fixed number of steps, no validation
and one checkpoint; the data cache is built before the first case, so no case pays for it. Throughput is taken
from the run's log.jsonl between step 1 and the last step, so start-up and the first (warm-up) step are left out.
Peak memory is the resident set (RSS): rank 0's own peak, and the largest process of the launch (os.wait4
reports the maximum over the process tree). Prints the CPU model, the precision and the load average before
and after each case (the machine may be shared); writes OUT (default bench_out/scaling.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {"lean64": ("lean", 64), "tiny64": ("tiny", 64)}


def train_command(preset: str, size: int, batch: int, steps: int, data: str, out: Path, cache: Path,
                  device: str) -> list[str]:
    """`meddiff train` arguments: no validation, so the only checkpoint is written at the last step."""
    return ["meddiff", "train", "--data", data, "--out", str(out), "--preset", preset, "--size", str(size),
            "--batch-size", str(batch), "--max-steps", str(steps), "--val-fraction", "0", "--val-every", str(steps),
            "--device", device, "--no-progress", "--cache-dir", str(cache)]


def launch(argv: list[str], procs: int, threads: int, log: Path) -> dict:
    """Run one launch to its end (exit on failure): wall seconds and the peak RSS (MiB) of its largest process."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    launcher = [torchrun, "--standalone", "--nproc_per_node", str(procs), "--no-python"] if procs > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen([*launcher, *argv], env=env, stdout=f, stderr=subprocess.STDOUT)
        _pid, status, usage = os.wait4(proc.pid, 0)  # unlike Popen.wait, also returns the tree's peak RSS
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    if proc.returncode:
        raise SystemExit(f"{' '.join(launcher + argv)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return dict(wall_s=time.time() - t0, peak_rss_mib_largest_process=usage.ru_maxrss / 1024)


def measure(run: Path, batch: int) -> dict:
    """Steady images/s from the run's log (step 1 → last step), rank 0's peak RSS and the hardware line."""
    from meddiff.runfolder import read_json

    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    first, last = steps[0], steps[-1]
    record = read_json(run / "meddiff.json")
    return dict(img_per_s=(last["step"] - first["step"]) * batch / (last["elapsed"] - first["elapsed"]),
                steps_timed=last["step"] - first["step"], peak_rss_mib_rank0=record["result"]["peak_rss_mib"],
                hardware=record["hardware"], processes=record["processes"])


def run_case(preset: str, size: int, procs: int, threads: int, a: argparse.Namespace, work: Path) -> dict:
    run = work / f"{preset}{size}_p{procs}"
    load_before = os.getloadavg()
    argv = train_command(preset, size, a.batch_size, a.steps, a.data, run, work / "cache", a.device)
    figures = launch(argv, procs, threads, work / f"{run.name}.log")
    return dict(preset=preset, size=size, procs=procs, threads_per_proc=threads, batch=a.batch_size, **figures,
                **measure(run, a.batch_size), load_avg_before=load_before, load_avg_after=os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="lean64", help=", ".join(CASES))
    ap.add_argument("--procs", type=int, help="processes of the multi-process case (default: GPUs, or 2 on CPU)")
    ap.add_argument("--threads", type=int, help="CPU threads in all (default --procs): 1 x T against N x T/N")
    ap.add_argument("--steps", type=int, default=20, help="training steps per run (throughput over steps 1..last)")
    ap.add_argument("--batch-size", type=int, default=16, help="global batch, the same in every case")
    ap.add_argument("--data", default="builtin:mni-mri")
    ap.add_argument("--device", choices=["auto", "cpu"], default="auto",
                    help="cpu: compare CPU processes on a GPU host")
    ap.add_argument("--out", default="bench_out/scaling.json")
    a = ap.parse_args()
    if a.steps < 10 or a.steps % 10:
        raise SystemExit(f"--steps {a.steps}: give a multiple of 10 (the training log has a line every 10 steps)")
    import torch

    from meddiff.data.dataset import load_data
    from meddiff.runtime import cpu_model, pick_device, pick_precision

    device = pick_device(a.device)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    procs = a.procs or gpus or 2
    threads = a.threads or procs
    if gpus and not 2 <= procs <= gpus:
        raise SystemExit(f"--procs {procs}: {gpus} GPU(s) visible and NCCL needs one per process (at least 2); "
                         "use --device cpu to compare CPU processes")
    results: dict = dict(cpu=cpu_model(), device=device.type, gpus=gpus, precision=pick_precision("auto", device),
                         backend="nccl" if gpus else "gloo", threads_total=threads, steps=a.steps, data=a.data,
                         command=" ".join(sys.argv), cases={})
    print(f"{results['cpu']}; {device.type}, precision {results['precision']}, {results['backend']}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="meddiff_scaling_") as tmp:
        work = Path(tmp)
        for case in a.cases.split(","):
            if case not in CASES:
                raise SystemExit(f"unknown case {case!r} (known: {', '.join(CASES)})")
            preset, size = CASES[case]
            load_data(a.data, size, cache_dir=str(work / "cache"))
            one = run_case(preset, size, 1, threads, a, work)
            many = run_case(preset, size, procs, max(1, threads // procs), a, work)
            results["cases"][case] = dict(one=one, many=many, img_per_s_ratio=many["img_per_s"] / one["img_per_s"])
            for r in (one, many):
                print(f"{case}: {r['procs']} x {r['threads_per_proc']} thread(s): {r['img_per_s']:.2f} img/s, "
                      f"peak RSS rank 0 {r['peak_rss_mib_rank0']:.0f} MiB (largest process "
                      f"{r['peak_rss_mib_largest_process']:.0f}), load {r['load_avg_before'][0]:.2f}"
                      f"→{r['load_avg_after'][0]:.2f}; {r['hardware']}", flush=True)
            print(f"{case}: {procs} processes / 1 process = x{results['cases'][case]['img_per_s_ratio']:.2f} img/s",
                  flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
