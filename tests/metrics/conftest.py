"""Synthetic images for the metric tests: smooth random blobs, made in memory."""
from __future__ import annotations

import numpy as np
import pytest


def make_blobs(n: int, size: int = 32, seed: int = 0, blobs: int = 4) -> np.ndarray:
    """n smooth images (n, size, size) float32 in [0, 1]: a few Gaussian blobs each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centres = rng.uniform(0.15 * size, 0.85 * size, size=(n, blobs, 2, 1, 1)).astype(np.float32)
    widths = rng.uniform(size / 12, size / 5, size=(n, blobs, 1, 1)).astype(np.float32)
    heights = rng.uniform(0.3, 1.0, size=(n, blobs, 1, 1)).astype(np.float32)
    d2 = (yy - centres[:, :, 0]) ** 2 + (xx - centres[:, :, 1]) ** 2
    images = (heights * np.exp(-0.5 * d2 / widths**2)).sum(axis=1)
    return np.clip(0.1 + 0.8 * images, 0.0, 1.0).astype(np.float32)


@pytest.fixture(scope="session")
def blobs():
    """The blob maker: blobs(n, size=32, seed=0) → (n, size, size) float32 in [0, 1]."""
    return make_blobs
