"""Features → statistics → scores: FeatureStats (mean, covariance, protocol; cached as .npz), FID and KID.

Statistics are computed once per image set and protocol and saved under a name that carries
both (clean-fid's habit), so a number is only ever computed from two statistics of one protocol.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import write_file
from ..errors import ConfigError, DataError
from .features import FeatureExtractor

STATS_FORMAT = 1


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """mu (D,) float64, sigma (D, D) float64, n images, the protocol; features (n, D) float32 kept for KID/PRDC."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    protocol: str
    features: np.ndarray | None = None

    @classmethod
    def from_features(cls, features: np.ndarray, protocol: str, keep_features: bool = True) -> "FeatureStats":
        """(n, D) features, n >= 2 → their mean and unbiased covariance."""
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise DataError(f"features: shape {f.shape}; statistics need (n, D) with n >= 2 images")
        return cls(f.mean(axis=0), np.cov(f, rowvar=False), len(f), protocol,
                   f.astype(np.float32) if keep_features else None)

    def save(self, path: Path | str) -> Path:
        """Write atomically (temporary name in the same folder, then rename) → the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma, "n": np.array(self.n),
                  "protocol": np.array(self.protocol), "format": np.array(STATS_FORMAT)}
        if self.features is not None:
            arrays["features"] = self.features
        return write_file(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: Path | str, protocol: str | None = None) -> "FeatureStats":
        """Read a .npz written by `save`; with `protocol`, refuse statistics of any other protocol."""
        try:
            with np.load(path, allow_pickle=False) as z:
                stats = cls(z["mu"], z["sigma"], int(z["n"]), str(z["protocol"]),
                            z["features"] if "features" in z.files else None)
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"{path}: not a feature statistics file ({exc})") from exc
        if protocol is not None and stats.protocol != protocol:
            raise ConfigError(f"{path}: statistics of protocol {stats.protocol!r}; expected {protocol!r}")
        return stats


def images_key(images: np.ndarray) -> str:
    """A content hash of an image stack (shape, dtype and pixels): 16 hex characters."""
    arr = np.ascontiguousarray(images)
    h = hashlib.sha256(f"{arr.shape}{arr.dtype}".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()[:16]


def stats_file(cache_dir: Path | str, key: str, protocol: str) -> Path:
    """The cache name of one image set's statistics under one protocol: <key>__<protocol, slugged>.npz."""
    slug = re.sub(r"[^A-Za-z0-9.@-]+", "_", protocol)
    return Path(cache_dir) / f"{key}__{slug}.npz"


def compute_stats(images: np.ndarray, extractor: FeatureExtractor, batch_size: int = 64) -> FeatureStats:
    """Images (N, H, W) float in [0, 1] → their FeatureStats under the extractor's protocol."""
    return FeatureStats.from_features(extractor(images, batch_size=batch_size), extractor.protocol)


def cached_stats(images: np.ndarray, extractor: FeatureExtractor, cache_dir: Path | str) -> FeatureStats:
    """`compute_stats`, read from / written to cache_dir, keyed by the images' content and the protocol."""
    path = stats_file(cache_dir, images_key(images), extractor.protocol)
    if path.is_file():
        return FeatureStats.load(path, extractor.protocol)
    stats = compute_stats(images, extractor)
    stats.save(path)
    return stats


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(sigma1 sigma2) for symmetric PSD matrices.

    sigma1 sigma2 is similar to A = sigma1^1/2 sigma2 sigma1^1/2, which is symmetric PSD, so
    the trace is the sum of the square roots of A's (real, non-negative) eigenvalues: no
    complex parts to discard, unlike a general sqrtm.
    """
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    a = root @ sigma2 @ root
    ev = np.linalg.eigvalsh((a + a.T) / 2)
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance of two Gaussians (Heusel et al. 2017, eq. 6; Dowson & Landau 1982):

        d^2 = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^1/2)

    Guard: when the matrix square root fails or is not finite (near-singular covariances, few
    images), eps is added to both diagonals and it is computed again. Result clipped at 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    for name, arr in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} holds NaN or infinite values")
    try:
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        tr_covmean = float("nan")
    if not np.isfinite(tr_covmean):
        offset = np.eye(len(sigma1)) * eps
        tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean))


def _check_protocols(a: FeatureStats, b: FeatureStats) -> None:
    if a.protocol != b.protocol:
        raise ConfigError(f"statistics of protocols {a.protocol!r} and {b.protocol!r}; "
                          "scores are only computed within one protocol")


def fid_score(fake: FeatureStats, real: FeatureStats) -> float:
    """FID of two FeatureStats of the same protocol."""
    _check_protocols(fake, real)
    return frechet_distance(fake.mu, fake.sigma, real.mu, real.sigma)


def kid(feat1: np.ndarray, feat2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD^2, kernel k(x, y) = (x.y / d + 1)^3.

    feat1 (n1, D), feat2 (n2, D) → (mean, std) over `subsets` random subsets of
    m = min(subset_size, n1, n2) rows each, drawn without replacement.
    """
    f1, f2 = np.asarray(feat1, np.float64), np.asarray(feat2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise DataError(f"KID: {min(len(f1), len(f2))} images in the smaller set; needs at least 2")
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[s] = within - 2 * kxy.mean()
    return float(values.mean()), float(values.std())


def feature_scores(fake: FeatureStats, real: FeatureStats, kid_subsets: int = 100,
                   kid_subset_size: int = 1000, seed: int = 0) -> dict:
    """FID and KID of fake against real, plus the same between two random halves of real (a floor).

    → {"fid", "kid", "kid_std", "fid_real_halves", "kid_real_halves", "n_fake", "n_real", "protocol"};
    KID entries are None when either side kept no features, the halves entries when real has < 4.
    """
    _check_protocols(fake, real)
    out = {"fid": fid_score(fake, real), "kid": None, "kid_std": None,
           "fid_real_halves": None, "kid_real_halves": None,
           "n_fake": fake.n, "n_real": real.n, "protocol": real.protocol}
    if fake.features is not None and real.features is not None:
        out["kid"], out["kid_std"] = kid(fake.features, real.features, kid_subsets, kid_subset_size, seed)
        if real.n >= 4:
            order = np.random.default_rng(seed).permutation(real.n)
            a, b = real.features[order[: real.n // 2]], real.features[order[real.n // 2:]]
            sa, sb = FeatureStats.from_features(a, real.protocol), FeatureStats.from_features(b, real.protocol)
            out["fid_real_halves"] = fid_score(sa, sb)
            out["kid_real_halves"] = kid(a, b, kid_subsets, kid_subset_size, seed)[0]
    return out
