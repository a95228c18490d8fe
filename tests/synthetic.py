"""Small synthetic image sets written as PNG folders, shared by the evaluation and audit tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def textured(n: int, seed: int, size: int = 32) -> np.ndarray:
    """(n, size, size) uint8: four random Gaussian blobs each, different per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = rng.uniform(0.15 * size, 0.85 * size, (n, 4, 2, 1, 1))
    w = rng.uniform(size / 12, size / 5, (n, 4, 1, 1))
    h = rng.uniform(0.3, 1.0, (n, 4, 1, 1))
    img = (h * np.exp(-0.5 * ((yy - c[:, :, 0]) ** 2 + (xx - c[:, :, 1]) ** 2) / w**2)).sum(1)
    return np.round(np.clip(0.1 + 0.8 * img, 0, 1) * 255).astype(np.uint8)


def write(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    return folder


def disguised(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Copies of uint8 images: exact, mirrored, shifted 1 px, lightly noised, in turn."""
    rng = np.random.default_rng(seed)
    out = []
    for i, im in enumerate(images):
        kind = i % 4
        if kind == 1:
            im = im[:, ::-1]
        elif kind == 2:
            im = np.pad(im, 1, mode="edge")[2:, 1:-1]   # content moved up 1 px
        elif kind == 3:
            im = np.clip(im + rng.normal(0, 3, im.shape), 0, 255)
        out.append(np.asarray(im, np.uint8))
    return np.stack(out)


def volume(n: int, seed: int, size: int = 32, blobs: int = 40) -> np.ndarray:
    """(n, size, size) uint8: the axial slices of one smooth random 3-D volume (Gaussian blobs 3-6 slices deep), so
    that adjacent slices are near-duplicates (NCC ≈ 0.995) and slices 5 apart are not (≈ 0.85)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.1 * size, 0.9 * size, (2, blobs, 1, 1))
    cz, depth = rng.uniform(0, n, blobs), rng.uniform(3, 6, blobs)
    width, height = rng.uniform(size / 12, size / 6, (blobs, 1, 1)), rng.uniform(0.3, 1.0, blobs)
    shapes = np.exp(-0.5 * ((yy - cy) ** 2 + (xx - cx) ** 2) / width**2)                    # (blobs, size, size)
    z = np.arange(n)[:, None]
    amp = height * np.exp(-0.5 * ((z - cz) / depth) ** 2)                                  # (n, blobs)
    vol = np.einsum("nb,bhw->nhw", amp, shapes)
    return np.round((0.05 + 0.9 * vol / vol.max()) * 255).astype(np.uint8)
