"""Features of a generated and a real set → 95 % bootstrap intervals (images resampled with replacement) for
FID, KID and precision/recall/density/coverage; percentile intervals, seeded, `n_boot` resamples.

- FID: both sets resampled, the Fréchet distance of each resample's mean and covariance. FID is
  biased upwards at finite counts (Chong & Forsyth 2020), and a resample, whose duplicates leave
  about 63 % distinct images, more so: the percentile interval would sit above the estimate. So the
  interval is the normal bootstrap interval (Efron & Tibshirani 1993, ch. 13), FID +- 1.96 times the
  standard deviation of the resamples' FIDs: how much the figure moves with the images drawn.
- KID: a resample with duplicates would put k(x, x) terms into the unbiased MMD^2 and bias it
  upwards, so each resample is the weighted U-statistic with the resampling counts c (fake) and
  e (real) over the kernel matrices of the original images, pairs of one image with itself left out:
  sum_{i != j} c_i c_j k(x_i, x_j) / ((sum c)^2 - sum c_i^2) + (the same for real) - 2 c' K_xy e / (n m).
  With all counts 1 it is exactly the unbiased MMD^2 over all images.
- PRDC: the k-NN radii would shrink to 0 on duplicated images, so the balls stay those of the
  full sets; what is resampled are the per-image terms (a fake image inside some real ball, the
  number of balls it sits in, a real image with a fake one inside its ball or inside a fake ball),
  whose means are exactly `prdc_scores`.
"""
from __future__ import annotations

import numpy as np

from ..errors import DataError
from .fid import frechet_distance
from .prdc import _distances, kth_neighbour_radii
from .ssim import bootstrap_ci

_KID_MAX = 2000  # images per side in the KID interval: kernel matrices stay <= 32 MB


def _percentile_interval(samples: np.ndarray, level: float = 0.95) -> list[float]:
    samples = np.asarray(samples, np.float64)
    samples = samples[np.isfinite(samples)]
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail))]


def _check(fake: np.ndarray, real: np.ndarray, need: int) -> tuple[np.ndarray, np.ndarray]:
    f, r = np.asarray(fake, np.float64), np.asarray(real, np.float64)
    if f.ndim != 2 or r.ndim != 2 or f.shape[1] != r.shape[1]:
        raise DataError(f"features: shapes {f.shape} (fake) and {r.shape} (real); expected (N, D) and (M, D)")
    if min(len(f), len(r)) < need:
        raise DataError(f"features: {len(f)} fake and {len(r)} real images; the interval needs {need} of each")
    return f, r


def fid_from_features(fake: np.ndarray, real: np.ndarray) -> float:
    """FID of two feature sets (N, D), (M, D), N, M >= 2, by the cheaper of two exact routes.

    With A, B the centred features divided by sqrt(n - 1), sigma1 = A'A and sigma2 = B'B, and the
    non-zero eigenvalues of sigma1 sigma2 are the squared singular values of A B' (N x M), so
    tr (sigma1 sigma2)^1/2 = the sum of the singular values of A B': an N x M problem instead of a
    D x D one, used when both sets are smaller than D (per-class figures, Inception's 2048-d)."""
    if max(len(fake), len(real)) >= fake.shape[1]:
        return frechet_distance(fake.mean(0), np.cov(fake, rowvar=False), real.mean(0), np.cov(real, rowvar=False))
    a = (fake - fake.mean(0)) / np.sqrt(len(fake) - 1)
    b = (real - real.mean(0)) / np.sqrt(len(real) - 1)
    tr_covmean = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    diff = fake.mean(0) - real.mean(0)
    return max(0.0, float(diff @ diff + (a * a).sum() + (b * b).sum() - 2 * tr_covmean))


def fid_interval(fake: np.ndarray, real: np.ndarray, n_boot: int = 200, seed: int = 0) -> list[float]:
    """fake (N, D), real (M, D) features, N, M >= 2 → [lo, hi]: FID +- 1.96 bootstrap standard deviations
    (both sets resampled), the lower end clipped at 0."""
    f, r = _check(fake, real, 2)
    rng = np.random.default_rng([seed, 11])
    values = [fid_from_features(f[rng.integers(0, len(f), len(f))], r[rng.integers(0, len(r), len(r))])
              for _ in range(n_boot)]
    centre, spread = fid_from_features(f, r), 1.959964 * float(np.std(values, ddof=1))
    return [max(0.0, centre - spread), centre + spread]


def _within(kernel: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean kernel value over pairs of distinct images, weighted by resampling counts (B, n) → (B,); NaN for a
    resample that drew one image only."""
    diag = np.diag(kernel)
    total = ((counts @ kernel) * counts).sum(1) - (counts**2) @ diag
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample of one distinct image has no pairs: NaN, dropped
        return total / (counts.sum(1) ** 2 - (counts**2).sum(1))


def kid_interval(fake: np.ndarray, real: np.ndarray, n_boot: int = 200, seed: int = 0) -> list[float]:
    """fake (N, D), real (M, D) features, N, M >= 2 → [lo, hi] of KID (cubic polynomial kernel MMD^2)
    over bootstrap resamples; at most 2000 images per side (a seeded random subset beyond that)."""
    f, r = _check(fake, real, 2)
    rng = np.random.default_rng([seed, 13])
    if len(f) > _KID_MAX:
        f = f[rng.choice(len(f), _KID_MAX, replace=False)]
    if len(r) > _KID_MAX:
        r = r[rng.choice(len(r), _KID_MAX, replace=False)]
    d = f.shape[1]
    kff, krr, kfr = (f @ f.T / d + 1) ** 3, (r @ r.T / d + 1) ** 3, (f @ r.T / d + 1) ** 3
    c = rng.multinomial(len(f), np.full(len(f), 1 / len(f)), size=n_boot).astype(np.float64)   # (B, N)
    e = rng.multinomial(len(r), np.full(len(r), 1 / len(r)), size=n_boot).astype(np.float64)   # (B, M)
    cross = ((c @ kfr) * e).sum(1) / (len(f) * len(r))
    return _percentile_interval(_within(kff, c) + _within(krr, e) - 2 * cross)


def prdc_terms(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, np.ndarray]:
    """Per-image PRDC terms (Naeem et al. 2020): real (M, D), fake (N, D), k < M, N →
    {"precision": (N,) 0/1, "density": (N,) count / k, "recall": (M,) 0/1, "coverage": (M,) 0/1}."""
    f, r = _check(fake, real, k + 1)
    r_real, r_fake = kth_neighbour_radii(r, k), kth_neighbour_radii(f, k)
    d = _distances(r, f)                                  # (M, N)
    inside_real = d < r_real[:, None]
    return {"precision": inside_real.any(axis=0).astype(np.float64),
            "density": inside_real.sum(axis=0) / k,
            "recall": (d < r_fake[None, :]).any(axis=1).astype(np.float64),
            "coverage": (d.min(axis=1) < r_real).astype(np.float64)}


def prdc_intervals(real: np.ndarray, fake: np.ndarray, k: int = 5, n_boot: int = 200,
                   seed: int = 0) -> dict[str, dict]:
    """{"precision" | "recall" | "density" | "coverage": {"value", "ci95"}}: the means of `prdc_terms` and
    percentile bootstrap intervals over the images they are terms of (fake for P/D, real for R/C)."""
    terms = prdc_terms(real, fake, k)
    return {name: {"value": float(v.mean()), "ci95": bootstrap_ci(v, seed=seed, n_boot=n_boot)}
            for name, v in terms.items()}
