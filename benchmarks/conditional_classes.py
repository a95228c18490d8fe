#!/usr/bin/env python3
"""Does a class-conditional model make the class it is asked for? One model on all four MedPhantom-4
modalities × {normal, abnormal}; a classifier trained on real phantoms labels the model's samples.

    python benchmarks/conditional_classes.py --minutes 15 --n-train 1600 --per-class 24 --out bench_out/cond

Trains `meddiff train --data builtin:phantoms?n=N` (class-conditional, label dropout 0.1), samples
--per-class images of every class with classifier-free guidance, and reports the share of each class's
samples that two classifiers trained on real phantoms the model never saw (another seed) assign to the
requested class, with each classifier's accuracy on held-out real images:
  cnn        a small CNN (4 conv layers, ~60 k parameters, flips as the only augmentation) — the judge;
  histogram  logistic regression on intensity histograms + gradient statistics (the phantom tests' kind),
             which keys on texture and so under-rates smooth samples; kept as a second opinion.
Also reported: modality accuracy (the right modality, whatever the finding) and, within the right modality,
finding accuracy (normal vs abnormal). The judge's overall share comes with a 95 % bootstrap interval over
samples. Writes benchmarks/results/conditional_classes.json (and OUT/conditional.json).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import _results as R


def features(images: np.ndarray) -> np.ndarray:
    """(N, H, W) in [0, 1] → histogram of intensities and of gradient magnitudes, plus spatial-thirds means."""
    gy, gx = np.gradient(images, axis=(1, 2))
    grad = np.hypot(gx, gy)
    hist = np.stack([np.histogram(im, bins=32, range=(0, 1), density=True)[0] for im in images])
    ghist = np.stack([np.histogram(g, bins=16, range=(0, 0.5), density=True)[0] for g in grad])
    h, w = images.shape[1:]
    blocks = images.reshape(len(images), 4, h // 4, 4, w // 4).mean(axis=(2, 4)).reshape(len(images), -1)
    return np.concatenate([hist, ghist, blocks], axis=1)


class SmallCNN(torch.nn.Module):
    """(B, 1, S, S) in [0, 1] → (B, n_classes) logits: four 3x3 conv + BN + ReLU stages, global average pool."""

    def __init__(self, n_classes: int, width: int = 24) -> None:
        super().__init__()
        layers, c = [], 1
        for k in (1, 2, 2, 4):
            layers += [torch.nn.Conv2d(c, width * k, 3, padding=1), torch.nn.BatchNorm2d(width * k),
                       torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
            c = width * k
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2 - 1).mean(dim=(2, 3)))


def train_cnn(x: np.ndarray, y: np.ndarray, n_classes: int, epochs: int = 8, seed: int = 0) -> SmallCNN:
    """x (N, S, S) in [0, 1], y (N,) → a trained SmallCNN (Adam 2e-3, batch 64, random horizontal flips)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = SmallCNN(n_classes)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x).float()[:, None], torch.from_numpy(y).long()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * ((len(x) + 63) // 64))
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            xb = xt[idx]
            xb = torch.where(torch.rand(len(idx), 1, 1, 1, generator=g) < 0.5, xb.flip(-1), xb)
            loss = torch.nn.functional.cross_entropy(net(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def cnn_predict(net: SmallCNN, x: np.ndarray) -> np.ndarray:
    return np.concatenate([net(torch.from_numpy(c).float()[:, None]).argmax(1).numpy()
                           for c in np.array_split(x, max(1, len(x) // 128))])


def breakdown(pred: np.ndarray, k: int, names: tuple[str, ...]) -> dict[str, float]:
    """Share of predictions equal to class k; with the right modality; and, among those, the right finding."""
    modality = np.array([n.split("/")[0] for n in names])
    right_mod = modality[pred] == modality[k]
    return dict(accuracy=float((pred == k).mean()), modality=float(right_mod.mean()),
                finding_given_modality=float((pred[right_mod] == k).mean()) if right_mod.any() else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=15)
    ap.add_argument("--n-train", type=int, default=1600)
    ap.add_argument("--per-class", type=int, default=24)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", default="bench_out/cond")
    ap.add_argument("--run", help="reuse a trained conditional run instead of training")
    ap.add_argument("--sampler", default=None, help="default: the run's default (UniPC 10 steps)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--n-real", type=int, default=4000,
                    help="real phantoms for the classifiers (a quarter held out to report their accuracy)")
    ap.add_argument("--judge-epochs", type=int, default=20,
                    help="CNN judge epochs (20 on 3,000 phantoms: 95.6 %% on held-out real, ~3.5 min on 2 threads)")
    ap.add_argument("--train-extra", default="",
                    help="extra flags for meddiff train, one quoted string after '=': --train-extra='--loss-weighting min-snr'")
    R.add_results_arg(ap, "conditional_classes")
    a = ap.parse_args()
    mach = R.machine("auto (meddiff train --precision auto)")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from meddiff.config import SampleConfig
    from meddiff.data.dataset import load_data
    from meddiff.imagesets import images01
    from meddiff.runtime import cpu_model
    from meddiff.sample import sample_to_folder

    out = Path(a.out)
    run = Path(a.run) if a.run else out / "run"
    if not a.run:
        subprocess.run([sys.executable, "-m", "meddiff.cli", "train", "--data", f"builtin:phantoms?n={a.n_train}",
                        "--size", str(a.size), "--max-minutes", str(a.minutes), "--out", str(run), "--no-progress",
                        *a.train_extra.split()],
                       check=True)
    # the classifiers learn from real phantoms the model never saw (another seed)
    real = load_data(f"builtin:phantoms?n={a.n_real}&seed=99", a.size)
    x_real = ((real.images[:, 0] + 1) / 2).numpy()
    y_real = real.labels.numpy()
    n_fit = len(x_real) * 3 // 4  # training share of the classifiers
    names = real.class_names
    hist = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
    hist.fit(features(x_real[:n_fit]), y_real[:n_fit])
    t0 = time.time()
    cnn = train_cnn(x_real[:n_fit], y_real[:n_fit], len(names), epochs=a.judge_epochs)
    cnn_seconds = time.time() - t0
    real_acc = dict(cnn=float((cnn_predict(cnn, x_real[n_fit:]) == y_real[n_fit:]).mean()),
                    histogram=float((hist.predict(features(x_real[n_fit:])) == y_real[n_fit:]).mean()))
    samples = out / "samples"
    scfg = SampleConfig(run=str(run), out=str(samples), per_class=a.per_class, guidance=a.guidance,
                        sampler=a.sampler, steps=a.steps, progress=False)
    sample_to_folder(scfg)
    per_class: dict[str, dict] = {"cnn": {}, "histogram": {}}
    judged = []  # (class, cnn prediction) of every sample
    for k, name in enumerate(names):
        imgs = images01(str(samples / name), a.size)
        pred = cnn_predict(cnn, imgs)
        judged += [dict(requested=name, cnn=names[int(p)]) for p in pred]
        per_class["cnn"][name] = breakdown(pred, k, names)
        per_class["histogram"][name] = breakdown(hist.predict(features(imgs)), k, names)
    summary = {who: {m: float(np.mean([v[m] for v in d.values()])) for m in next(iter(d.values()))}
               for who, d in per_class.items()}
    result = dict(cpu=cpu_model(), run=str(run), guidance=a.guidance, sampler=a.sampler or "default",
                  steps=a.steps, per_class_n=a.per_class, classifier_accuracy_on_real=real_acc,
                  cnn_train_seconds=cnn_seconds, sample_accuracy_per_class=per_class, sample_accuracy_mean=summary)
    result["cnn_accuracy"] = R.bootstrap_mean([j["requested"] == j["cnn"] for j in judged])
    out.mkdir(parents=True, exist_ok=True)
    (out / "conditional.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    R.write_results(a.results, "conditional_classes", mach, vars(a), judged, result)


if __name__ == "__main__":
    main()
