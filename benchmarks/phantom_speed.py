"""MedPhantom-4 speed: render N mixed-modality phantoms with W worker processes → one JSON line on stdout.

    python benchmarks/phantom_speed.py                     # 1000 images at 128 px, 2 workers
    python benchmarks/phantom_speed.py --gallery docs/phantom_gallery.png

The target: 1000 images at 128 px in under 60 s on a 2-core machine. Per-modality times are measured
serially in this process after a warm-up (the MNI template load and imports are not counted there);
the wall time of the parallel run counts everything, worker start-up included. On a shared machine the
wall time depends on the other load: `idle_estimate_s` (the workers' CPU seconds / workers) does not.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import time
from pathlib import Path

import numpy as np
from PIL import Image

from meddiff.data.phantoms import MODALITIES, render

_WORKER = {"seed": 0, "size": 128}  # set in each worker process by _init


def _init(seed: int, size: int) -> None:
    _WORKER.update(seed=seed, size=size)


def _job(k: int) -> int:
    """Image k of the mixed set: modality k % 4, index k // 4, every other index abnormal."""
    modality, index = MODALITIES[k % len(MODALITIES)], k // len(MODALITIES)
    return int(render(modality, index, _WORKER["seed"], _WORKER["size"], index % 2 == 1).size)


def parallel_run(count: int, size: int, workers: int, seed: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the workers) to render `count` mixed images, pool start-up included.

    The CPU seconds do not depend on what else the machine runs: divided by the number of workers they
    estimate the wall time on an otherwise idle machine.
    """
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    pool = mp.get_context("spawn").Pool(workers, initializer=_init, initargs=(seed, size))  # fresh interpreters
    done = sum(1 for _ in pool.imap_unordered(_job, range(count), chunksize=8))
    pool.close()
    pool.join()
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done == count
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    return wall, cpu


def per_modality_ms(size: int, seed: int, repeats: int) -> dict[str, dict[str, float]]:
    """Serial wall and CPU milliseconds per image for each modality (half normal, half abnormal), after a warm-up."""
    out = {}
    for modality in MODALITIES:
        render(modality, 0, seed, size, False)
        start, cpu = time.perf_counter(), time.process_time()
        for index in range(repeats):
            render(modality, index, seed, size, index % 2 == 1)
        out[modality] = {"wall_ms": round((time.perf_counter() - start) / repeats * 1000, 1),
                         "cpu_ms": round((time.process_time() - cpu) / repeats * 1000, 1)}
    return out


def write_gallery(path: Path, size: int = 96, seed: int = 0, gap: int = 2) -> None:
    """One row per modality: 4 normal then 4 abnormal tiles of `size` px, as an 8-bit greyscale PNG."""
    rows = len(MODALITIES)
    canvas = np.full((rows * (size + gap) - gap, 8 * (size + gap) - gap), 255, dtype=np.uint8)
    for r, modality in enumerate(MODALITIES):
        for c in range(8):
            tile = render(modality, c, seed, size, c >= 4)
            top, left = r * (size + gap), c * (size + gap)
            canvas[top:top + size, left:left + size] = np.round(tile * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas, mode="L").save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=20, help="images per modality for the serial timings")
    parser.add_argument("--gallery", type=Path, help="write the gallery PNG here and exit")
    args = parser.parse_args()
    from meddiff.runtime import cpu_model  # imports torch: kept out of the workers' start-up

    if args.gallery:
        write_gallery(args.gallery)
        print(json.dumps({"gallery": str(args.gallery)}))
        return
    serial = per_modality_ms(args.size, args.seed, args.repeats)
    wall, cpu = parallel_run(args.count, args.size, args.workers, args.seed)
    target = 60.0 * args.count / 1000
    print(json.dumps({
        "benchmark": "phantom_speed",
        "images": args.count,
        "size": args.size,
        "workers": args.workers,
        "wall_s": round(wall, 2),
        "images_per_s": round(args.count / wall, 1),
        "workers_cpu_s": round(cpu, 2),
        "idle_estimate_s": round(cpu / args.workers, 2),
        "target_s": target,
        "meets_target": bool(wall < target),
        "per_modality": serial,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }))

if __name__ == "__main__":
    main()
