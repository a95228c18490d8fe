"""Features → precision, recall, density and coverage (Naeem et al. 2020, "Reliable fidelity and diversity metrics").

With B(x, r) the ball around x whose radius r is the distance to x's k-th nearest neighbour
in its own set (itself excluded), Euclidean distance in feature space:

    precision = share of fake samples inside some B(real_i, r_i)                     (fidelity)
    recall    = share of real samples inside some B(fake_j, r'_j)                   (diversity)
    density   = 1/(k N) sum_j #{i : fake_j in B(real_i, r_i)}      (fidelity, can exceed 1)
    coverage  = share of real samples whose ball holds at least one fake sample     (diversity)

"Inside" is a strict inequality, as in the authors' reference code.
"""
from __future__ import annotations

import numpy as np

from ..errors import DataError

_ROWS = 1024  # rows of a distance block: bounds memory at _ROWS x M float64


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (n, D), b (m, D) float64 → Euclidean distances (n, m)."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(d2, 0.0, None))


def kth_neighbour_radii(features: np.ndarray, k: int) -> np.ndarray:
    """(n, D) → (n,) distance of each row to its k-th nearest other row."""
    f = np.asarray(features, np.float64)
    radii = np.empty(len(f))
    for i in range(0, len(f), _ROWS):
        d = _distances(f[i:i + _ROWS], f)
        radii[i:i + _ROWS] = np.partition(d, k, axis=1)[:, k]  # column 0 of the order is the row itself
    return radii


def prdc_scores(real_features: np.ndarray, fake_features: np.ndarray, k: int = 5) -> dict:
    """real (M, D), fake (N, D) features of one protocol → {"precision", "recall", "density", "coverage", "k", ...}."""
    real = np.asarray(real_features, np.float64)
    fake = np.asarray(fake_features, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise DataError(f"PRDC: feature shapes {real.shape} (real) and {fake.shape} (fake); expected (M, D) and (N, D)")
    if k < 1 or min(len(real), len(fake)) <= k:
        raise DataError(f"PRDC: k = {k} with {len(real)} real and {len(fake)} fake samples; "
                        "allowed: 1 <= k < the size of each set")
    r_real = kth_neighbour_radii(real, k)
    r_fake = kth_neighbour_radii(fake, k)
    d = _distances(real, fake)                      # (M, N)
    inside_real = d < r_real[:, None]               # fake_j in B(real_i)
    return {
        "precision": float(inside_real.any(axis=0).mean()),
        "recall": float((d < r_fake[None, :]).any(axis=1).mean()),
        "density": float(inside_real.sum(axis=0).mean() / k),
        "coverage": float((d.min(axis=1) < r_real).mean()),
        "k": k, "n_real": len(real), "n_fake": len(fake),
    }
