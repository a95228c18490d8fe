#!/usr/bin/env python3
"""Does a class-conditional model make the class it is asked for? One model on all four MedPhantom-4
modalities × {normal, abnormal}; a classifier trained on real phantoms labels the model's samples.

    python benchmarks/conditional_classes.py --minutes 15 --n-train 1600 --per-class 24 --out bench_out/cond

Trains `meddiff train --data builtin:phantoms?n=N` (class-conditional, label dropout 0.1), samples
--per-class images of every class with classifier-free guidance, and reports the share of each class's
samples that a classifier (logistic regression on intensity histograms + gradient statistics, trained on
held-out real phantoms) assigns to the requested class, plus the classifier's accuracy on real images.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def features(images: np.ndarray) -> np.ndarray:
    """(N, H, W) in [0, 1] → histogram of intensities and of gradient magnitudes, plus spatial-thirds means."""
    gy, gx = np.gradient(images, axis=(1, 2))
    grad = np.hypot(gx, gy)
    hist = np.stack([np.histogram(im, bins=32, range=(0, 1), density=True)[0] for im in images])
    ghist = np.stack([np.histogram(g, bins=16, range=(0, 0.5), density=True)[0] for g in grad])
    h, w = images.shape[1:]
    blocks = images.reshape(len(images), 4, h // 4, 4, w // 4).mean(axis=(2, 4)).reshape(len(images), -1)
    return np.concatenate([hist, ghist, blocks], axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=15)
    ap.add_argument("--n-train", type=int, default=1600)
    ap.add_argument("--per-class", type=int, default=24)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", default="bench_out/cond")
    ap.add_argument("--run", help="reuse a trained conditional run instead of training")
    a = ap.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from meddiff.config import SampleConfig
    from meddiff.data.dataset import load_data
    from meddiff.evaluate import images01
    from meddiff.runtime import cpu_model
    from meddiff.sample import sample_to_folder

    out = Path(a.out)
    run = Path(a.run) if a.run else out / "run"
    if not a.run:
        subprocess.run([sys.executable, "-m", "meddiff.cli", "train", "--data", f"builtin:phantoms?n={a.n_train}",
                        "--size", str(a.size), "--max-minutes", str(a.minutes), "--out", str(run), "--no-progress"],
                       check=True)
    # the classifier learns from real phantoms the model never saw (another seed)
    real = load_data(f"builtin:phantoms?n=800&seed=99", a.size)
    x_real = ((real.images[:, 0] + 1) / 2).numpy()
    y_real = real.labels.numpy()
    half = len(x_real) // 2
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
    clf.fit(features(x_real[:half]), y_real[:half])
    real_acc = float((clf.predict(features(x_real[half:])) == y_real[half:]).mean())
    samples = out / "samples"
    sample_to_folder(SampleConfig(run=str(run), out=str(samples), per_class=a.per_class, guidance=a.guidance,
                                  steps=20, sampler="ddim", progress=False))
    per_class = {}
    for k, name in enumerate(real.class_names):
        imgs = images01(str(samples / name), a.size)
        pred = clf.predict(features(imgs))
        per_class[name] = float((pred == k).mean())
    result = dict(cpu=cpu_model(), run=str(run), guidance=a.guidance, per_class_n=a.per_class,
                  classifier_accuracy_on_real=real_acc, sample_accuracy_per_class=per_class,
                  sample_accuracy_mean=float(np.mean(list(per_class.values()))))
    out.mkdir(parents=True, exist_ok=True)
    (out / "conditional.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
