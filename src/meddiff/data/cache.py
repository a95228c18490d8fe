"""The preprocessed cache: (N, S, S) uint16 images + a JSON sidecar, memory-mapped, keyed by a content hash.

A key is built from everything that changes the result (paths, sizes, mtimes, options); a changed input
gives a new key, so a stale entry is never read. Entries are written to a temporary name and renamed.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..atomic import write_bytes, write_file

CACHE_VERSION = 2  # 2: readers skip non-regular files, size bombs, non-finite scaling, DICOM SEG/SR/PR/KO


def cache_key(*parts: object) -> str:
    """A short stable hash of the parts' reprs (sorted lists of file stats, options, ...)."""
    h = hashlib.sha256(repr((CACHE_VERSION,) + parts).encode())
    return h.hexdigest()[:24]


def to_uint16(images: np.ndarray) -> np.ndarray:
    """(N, S, S) float in [0, 1] → uint16, 16 bits so that 12- and 16-bit sources keep their precision."""
    return np.round(np.clip(images, 0.0, 1.0) * 65535.0).astype(np.uint16)


def from_uint16(stored: np.ndarray) -> np.ndarray:
    """uint16 → float32 in [0, 1]."""
    return stored.astype(np.float32) / 65535.0


def load_or_build(cache_dir: Path | None, key: str,
                  build: Callable[[], tuple[np.ndarray, dict[str, Any]]]) -> tuple[np.ndarray, dict[str, Any]]:
    """Return (uint16 images, sidecar dict) from the cache, or build, store and return them.
    Without a cache folder, just build."""
    if cache_dir is None:
        return build()
    cache_dir = Path(cache_dir)
    arr_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if arr_path.exists() and meta_path.exists():
        try:
            return np.load(arr_path, mmap_mode="r"), json.loads(meta_path.read_text())
        except (OSError, ValueError):
            pass  # a damaged entry is rebuilt below
    images, sidecar = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_file(arr_path, lambda f: np.save(f, images))
    write_bytes(meta_path, json.dumps(sidecar).encode())
    return np.load(arr_path, mmap_mode="r"), sidecar
