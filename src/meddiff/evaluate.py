"""Real and generated image sets (folders or builtin:…) → metric figures: the orchestration behind `meddiff evaluate`.

Loads both sets with the project's readers at one size, in [0, 1], and hands arrays to `meddiff.metrics`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .data.dataset import load_data
from .data.readers import find_image_files, read_file
from .errors import DataError


SAMPLE_EXTRAS = ("grid.png",)


def images01(spec: str, size: int, cache_dir: str | Path | None = None) -> np.ndarray:
    """(N, size, size) float32 in [0, 1] from a data spec (a sample folder's grid.png left out)."""
    data = load_data(spec, size, cache_dir=cache_dir, exclude=SAMPLE_EXTRAS)
    return ((data.images[:, 0] + 1) / 2).clamp(0, 1).numpy()


def native_size(folder: str) -> int:
    """The size of the first readable image in a folder (generated images are square at the training size)."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"--fake {folder!r}: not a folder")
    files, _ = find_image_files(root)
    for f in files:
        if f.name in SAMPLE_EXTRAS:
            continue
        image, _meta = read_file(f)[0]
        return int(max(image.shape))
    raise DataError(f"--fake {folder!r}: no images found")


def evaluate_ssim(real: str, fake: str, size: int | None = None, seed: int = 0,
                  cache_dir: str | Path | None = None) -> dict[str, Any]:
    """SSIM of each generated image against its most similar real image (see meddiff.metrics.ssim)."""
    from .metrics.ssim import ssim_report

    size = size or native_size(fake)
    fake_images = images01(fake, size, None)
    real_images = images01(real, size, cache_dir)
    report = ssim_report(fake_images, real_images, seed=seed)
    report["size"] = size
    return report
