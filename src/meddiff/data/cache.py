"""The preprocessed cache: (N, S, S) uint16 images in a .npy file + a JSON sidecar, keyed by a content hash,
built image by image and read image by image.

A key is built from everything that changes the result (paths, sizes, mtimes, options); a changed input
gives a new key, so a stale entry is never read. Entries are written to a temporary name and renamed.

Data sets larger than memory: a builder hands its images to a `Sink` in chunks, which writes them straight
into the entry (the .npy header, whose shape is known only at the end, is written last over a fixed-size
placeholder), so building never holds more than a chunk. `StoredImages` reads the images a batch needs with
`os.pread`, so neither the set nor its file's pages count in the process's memory; only a set asked for whole
(`StoredImages.all`) is read into memory.

Images with label maps (issue 21): a set built with `masks=True` has a second entry, `<key>.masks.npy`, of the same
shape holding each image's label map as raw uint16 label values (0 = background), written beside the images by the
same `Sink` and read the same way (`StoredImages.masks`).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from ..atomic import write_bytes, write_file

CACHE_VERSION = 2  # 2: readers skip non-regular files, size bombs, non-finite scaling, DICOM SEG/SR/PR/KO
HEADER_BYTES = 128  # an entry's .npy header: magic, version, length, the dict padded with spaces (64-byte aligned)
DTYPE = np.dtype("<u2")


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


def npy_header(n: int, size: int) -> bytes:
    """A version 1.0 .npy header for (n, size, size) little-endian uint16, exactly HEADER_BYTES long."""
    body = "{'descr': '<u2', 'fortran_order': False, 'shape': (%d, %d, %d), }" % (n, size, size)
    body = body.ljust(HEADER_BYTES - 10 - 1) + "\n"
    if len(body) != HEADER_BYTES - 10:
        raise ValueError(f"{n} images of {size} px do not fit a {HEADER_BYTES}-byte .npy header")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")


class Sink:
    """Where a builder puts its images, in order: (k, S, S) floats in [0, 1] (or uint16) per `add`, written to a
    file as they come (a cache entry being built) or, without a file, kept in memory. With `masks` (another Sink)
    every `add` also takes the images' label maps, (k, S, S) uint16 label values, stored as they are."""

    def __init__(self, size: int, file: BinaryIO | None = None, masks: "Sink | None" = None) -> None:
        self.size, self.file, self.n, self._chunks, self.masks = size, file, 0, [], masks

    def add(self, images: np.ndarray | list[np.ndarray], masks: np.ndarray | list[np.ndarray] | None = None) -> None:
        arr = np.asarray(images)
        if self.masks is not None:
            labels = np.asarray(masks if masks is not None else [], dtype=DTYPE)
            if labels.shape != arr.shape:
                raise ValueError(f"{len(arr)} image(s) with label maps of shape {labels.shape}; one map an image")
            self.masks.add(labels)
        elif masks is not None:
            raise ValueError("label maps given to a sink of images without masks")
        if len(arr) == 0:
            return
        stored = (arr if arr.dtype == np.uint16 else to_uint16(arr)).astype(DTYPE, copy=False)
        stored = stored.reshape(-1, self.size, self.size)
        if self.file is not None:
            self.file.write(np.ascontiguousarray(stored).tobytes())
        else:
            self._chunks.append(stored)
        self.n += len(stored)

    def array(self) -> np.ndarray:
        """The images added, in memory (a sink without a file)."""
        return (np.concatenate(self._chunks) if self._chunks else np.zeros((0, self.size, self.size), DTYPE))


class StoredImages:
    """(N, S, S) uint16 images, in memory or in a cache entry read image by image."""

    def __init__(self, array: np.ndarray | None = None, path: Path | None = None, n: int = 0, size: int = 0,
                 offset: int = 0) -> None:
        self._array, self.path, self._offset = array, path, offset
        self.n, self.size = (array.shape[0], array.shape[-1]) if array is not None else (n, size)
        self._fd: int | None = None
        self._fd_pid = -1
        self.masks: StoredImages | None = None  # the images' label maps, where the set has them

    @classmethod
    def open(cls, path: Path) -> "StoredImages":
        """An entry on disk, checked: a 3-d little-endian uint16 .npy of square images, complete. ValueError else."""
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"{path}: .npy version {version}")
            offset = f.tell()
        if dtype != DTYPE or fortran or len(shape) != 3 or shape[1] != shape[2]:
            raise ValueError(f"{path}: not (N, S, S) uint16")
        if os.stat(path).st_size != offset + shape[0] * shape[1] * shape[2] * DTYPE.itemsize:
            raise ValueError(f"{path}: truncated")
        return cls(path=path, n=shape[0], size=shape[1], offset=offset)

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        return self.n * self.size * self.size * DTYPE.itemsize

    def _descriptor(self) -> int:
        if self._fd is None or self._fd_pid != os.getpid():  # a forked process opens its own
            self._fd, self._fd_pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, indices: Any) -> np.ndarray:
        """(k, S, S) uint16: the images at `indices` (any int sequence), in that order; only they are read."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self._array is not None:
            return np.asarray(self._array[idx])
        out = np.empty((len(idx), self.size, self.size), DTYPE)
        one = self.size * self.size * DTYPE.itemsize
        fd = self._descriptor()
        for j, i in enumerate(idx):
            if not 0 <= i < self.n:
                raise IndexError(f"image {i} of {self.n}")
            buf = os.pread(fd, one, self._offset + int(i) * one)
            if len(buf) != one:
                raise OSError(f"{self.path}: shorter than its header says")
            out[j] = np.frombuffer(buf, DTYPE).reshape(self.size, self.size)
        return out

    def all(self) -> np.ndarray:
        """(N, S, S) uint16, the whole set in memory."""
        if self._array is not None:
            return np.asarray(self._array)
        return np.fromfile(self.path, DTYPE, count=self.n * self.size * self.size,
                           offset=self._offset).reshape(self.n, self.size, self.size)

    def close(self) -> None:
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass


def _sidecar_fits(sidecar: Any, n: int) -> bool:
    """A sidecar as the builders write it, for n images (anything else is rebuilt, never trusted)."""
    return (isinstance(sidecar, dict) and all(isinstance(sidecar.get(k), list) and len(sidecar[k]) == n
                                              for k in ("classes", "groups"))
            and isinstance(sidecar.get("skipped"), list) and isinstance(sidecar.get("formats"), dict)
            and isinstance(sidecar.get("source_shapes"), dict))


def load_or_build(cache_dir: Path | None, key: str, size: int, build: Callable[[Sink], dict[str, Any]],
                  masks: bool = False) -> tuple[StoredImages, dict[str, Any]]:
    """Return (images, sidecar dict) from the cache, or build, store and return them. `build(sink)` adds the images
    to the sink in order and returns the sidecar. Without a cache folder the images are built in memory. With
    `masks` the sink takes label maps too and the images come back with them (`StoredImages.masks`)."""
    if cache_dir is None:
        sink = Sink(size, masks=Sink(size) if masks else None)
        sidecar = build(sink)
        stored = StoredImages(sink.array())
        if masks:
            stored.masks = StoredImages(sink.masks.array())
        return stored, sidecar
    cache_dir = Path(cache_dir)
    arr_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    mask_path = cache_dir / f"{key}.masks.npy"
    if arr_path.exists() and meta_path.exists() and (mask_path.exists() or not masks):
        try:
            stored, sidecar = StoredImages.open(arr_path), json.loads(meta_path.read_text())
            if masks:
                stored.masks = StoredImages.open(mask_path)
            if (stored.size == size and _sidecar_fits(sidecar, len(stored))
                    and (not masks or (len(stored.masks) == len(stored) and stored.masks.size == size))):
                return stored, sidecar
        except (OSError, ValueError, UnicodeDecodeError):
            pass  # a damaged entry is rebuilt below
    built: list[dict[str, Any]] = []

    def fill(f: BinaryIO, g: BinaryIO | None) -> None:
        for out in (f, g) if g is not None else (f,):
            out.write(npy_header(0, size))  # a placeholder of the same length: the count is known at the end
        sink = Sink(size, f, masks=Sink(size, g) if g is not None else None)
        built.append(build(sink))
        for out in (f, g) if g is not None else (f,):
            out.seek(0)
            out.write(npy_header(sink.n, size))
            out.seek(0, os.SEEK_END)

    if masks:  # the label maps' entry is complete before the images' is: images without maps are never read
        write_file(arr_path, lambda f: write_file(mask_path, lambda g: fill(f, g)))
    else:
        write_file(arr_path, lambda f: fill(f, None))
    write_bytes(meta_path, json.dumps(built[0]).encode())
    stored = StoredImages.open(arr_path)
    if masks:
        stored.masks = StoredImages.open(mask_path)
    return stored, built[0]
