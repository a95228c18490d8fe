"""Shared fixtures: tiny PNG folders made with numpy + PIL, and tiny trained run folders reused across tests.

Torch runs on one thread: on a shared 2-core machine, two OpenMP threads competing with other processes run
10-30x slower, and one thread makes results bit-reproducible between in-process and subprocess runs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import diffusers  # noqa: F401  imported before any test captures stderr: its log handler keeps the stream it saw
import numpy as np
import pytest
import torch
from PIL import Image

SIZE = 32
CLASSES = ("a", "b")
PER_CLASS = 8


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(1)


@pytest.fixture
def diffusers_log_to_capture(capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers' log handler writes to the stderr it saw at import, before this test's capture: point it at the
    captured one, so that capfd sees diffusers' warnings."""
    import logging
    import sys

    for handler in logging.getLogger("diffusers").handlers:
        if type(handler) is logging.StreamHandler:  # not pytest's own capture handlers
            monkeypatch.setattr(handler, "stream", sys.stderr)


def blob_image(seed: int, size: int = SIZE, height: int | None = None) -> np.ndarray:
    """(height or size, size) uint8: a bright Gaussian blob on a dark background, different per seed."""
    rng = np.random.default_rng(seed)
    h = height or size
    yy, xx = np.mgrid[0:h, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * size
    r = rng.uniform(0.1, 0.25) * size
    img = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) + 0.05 * rng.random((h, size))
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_pngs(folder: Path, n: int, seed: int = 0, size: int = SIZE) -> list[Path]:
    """n PNGs named 000.png … in `folder` (created); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:03d}.png"
        Image.fromarray(blob_image(seed * 1000 + i, size)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def png_writer() -> Callable[..., list[Path]]:
    """write_pngs(folder, n, seed=0, size=32) → paths: tiny PNGs for tests that build their own folders."""
    return write_pngs


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only folder with class folders a/ and b/, 8 PNGs each, 32 px. Do not modify."""
    root = tmp_path_factory.mktemp("images")
    for k, c in enumerate(CLASSES):
        write_pngs(root / c, PER_CLASS, seed=k + 1)
    return root


@pytest.fixture(scope="session")
def train_config() -> Callable[..., "object"]:
    """train_config(data, out, **changes) → a tiny, fast, deterministic TrainConfig (fp32 on CPU, no cache)."""
    from meddiff.config import TrainConfig

    def make(data: Path | str, out: Path | str, **changes: object) -> TrainConfig:
        base = TrainConfig(data=str(data), out=str(out), preset="tiny", size=SIZE, batch_size=4, max_steps=6,
                           val_every=3, progress=False, cache_dir=None, precision="fp32", device="cpu", seed=0)
        return dataclasses.replace(base, **changes)
    return make


def _quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, image_folder: Path, train_config) -> Path:
    """A finished conditional run (classes a, b), tiny preset, 6 steps. Read-only: sample into other folders."""
    from meddiff.train import train

    out = tmp_path_factory.mktemp("runs") / "cond"
    train(train_config(image_folder, out), echo=_quiet)
    return out


@pytest.fixture(scope="session")
def mask_run(tmp_path_factory: pytest.TempPathFactory, train_config) -> Path:
    """A tiny run conditioned on the phantoms' lesion maps (label values 1 and 2), 6 steps, fp32. Read-only."""
    from meddiff.train import train

    out = tmp_path_factory.mktemp("runs") / "masks"
    train(train_config("builtin:phantoms?n=24&masks=1", out, cache_dir=None), echo=_quiet)
    return out


@pytest.fixture(scope="session")
def anatomy_run(tmp_path_factory: pytest.TempPathFactory, train_config) -> Path:
    """A tiny run conditioned on the phantoms' label maps of lesion and anatomy (masks=2), 6 steps. Read-only."""
    from meddiff.train import train

    out = tmp_path_factory.mktemp("runs") / "anatomy"
    train(train_config("builtin:phantoms?n=24&masks=2", out, cache_dir=None), echo=_quiet)
    return out


@pytest.fixture(scope="session")
def uncond_run(tmp_path_factory: pytest.TempPathFactory, image_folder: Path, train_config) -> Path:
    """A finished unconditional run on the same images, 4 steps. Read-only."""
    from meddiff.train import train

    out = tmp_path_factory.mktemp("runs") / "uncond"
    train(train_config(image_folder, out, conditional="off", max_steps=4), echo=_quiet)
    return out
