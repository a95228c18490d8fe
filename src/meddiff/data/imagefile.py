"""What every reader shares: Meta, the ImageReader interface, [0, 1] scaling helpers, and the checks made before
anything is decoded: a path is a regular file (never opened otherwise, so nothing blocks), a declared size is sane."""
from __future__ import annotations

import importlib
import os
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import ClassVar

import numpy as np

from meddiff.errors import ConfigError, UnreadableFile

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".nii", ".nii.gz"}
)
# ITU-R BT.601 luma weights for R, G, B: the same Y that DICOM YBR_FULL and Pillow's "L" use.
LUMA_601 = np.array([0.299, 0.587, 0.114], dtype=np.float64)
# Declared sizes are checked before anything is decoded: a 140-byte PNG may declare 60000 columns, and every
# image is later padded to a square of its longest side. MAX_VALUES bounds one file's frames × rows × columns
# × samples (4 GiB as float32).
MAX_SIDE = 16384
MAX_VALUES = 2**30



@dataclass(frozen=True)
class Meta:
    """Safe metadata of one image: never patient data."""

    format: str  # "png" | "jpeg" | "tiff" | "bmp" | "dicom" | "nifti"
    bit_depth: int | None  # stored bits (1, 8, 12, 16, 32...) where known
    modality: str | None  # DICOM (0008,0060) Modality code only (CT, MR, DX, US...)
    index: int  # frame (multi-frame DICOM, multi-page TIFF) or slice (NIfTI); 0 for single images
    source_shape: tuple[int, ...]  # shape of the stored pixel data


Images = list[tuple[np.ndarray, Meta]]


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------
def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _first_line(exc: BaseException, limit: int = 160) -> str:
    """`TypeName: message` on one line, cut to `limit` characters."""
    text = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _import_backend(module: str, package: str, purpose: str, path: Path) -> ModuleType:
    """Import an optional backend lazily; a missing one makes the file unreadable, with a hint."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UnreadableFile(path, f"reading {purpose} needs {package}: pip install {package}") from exc


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in any numeric dtype → (...) float64 luma, ITU-R BT.601, same units as input."""
    return rgb[..., :3].astype(np.float64) @ LUMA_601


def _scale_to_unit(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly onto [0, 1] as float32; values outside are clipped; hi == lo → zeros."""
    arr = np.nan_to_num(arr.astype(np.float64), nan=lo, posinf=hi, neginf=lo)
    if not hi > lo:
        return np.zeros(arr.shape, dtype=np.float32)
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _min_max_to_unit(arr: np.ndarray) -> np.ndarray:
    """Map the finite min..max of `arr` onto [0, 1] (float32); a constant image gives zeros."""
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return np.zeros(arr.shape, dtype=np.float32)
    return _scale_to_unit(arr, float(finite.min()), float(finite.max()))


# ---------------------------------------------------------------------------------------------
# The reader interface
# ---------------------------------------------------------------------------------------------
class ImageReader(ABC):
    """One backend: `verify_suffix` says whether it takes a path, `read` returns its images.

    `read` raises `UnreadableFile(path, reason)` for anything wrong with the file and never lets a
    library exception escape; subclasses implement `_read` and may raise anything.
    """

    format_name: ClassVar[str]  # used in messages: "not a {format_name} file"
    suffixes: ClassVar[frozenset[str]]

    def verify_suffix(self, path: Path) -> bool:
        """Whether this reader handles `path` (by its suffix, case-insensitive)."""
        return _suffix(Path(path)) in self.suffixes

    def read(self, path: Path) -> Images:
        """`path` → list of ((H, W) float32 in [0, 1], Meta); raises UnreadableFile."""
        path = Path(path)
        _check_regular_file(path)
        try:
            images = self._read(path)
        except (UnreadableFile, ConfigError):
            raise
        except MemoryError as exc:
            raise UnreadableFile(path, f"{self.format_name} file too large to decode in memory") from exc
        except Exception as exc:  # noqa: BLE001 - the contract: no library exception escapes
            reason = f"cannot read {self.format_name} file ({self._describe(exc)})"
            raise UnreadableFile(path, reason) from exc
        for image, _ in images:
            assert image.dtype == np.float32 and image.ndim == 2, (image.dtype, image.shape)
        return images

    @abstractmethod
    def _read(self, path: Path) -> Images: ...

    def _describe(self, exc: Exception) -> str:
        """How an unexpected library exception is named in the reason."""
        return _first_line(exc)


_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
)


def _not_regular_reason(path: Path) -> str | None:
    """Why `path` cannot be opened safely as an image, or None for a non-empty regular file (links followed).
    Only `stat` is used: opening a named pipe or a device could block forever."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "broken symbolic link" if os.path.islink(path) else "no such file"
    except OSError as exc:
        return f"cannot stat the file ({exc.strerror or type(exc).__name__})"
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "a special file")
        return f"not a regular file ({kind})"
    if st.st_size == 0:
        return "empty file (0 bytes)"
    return None


def _check_regular_file(path: Path) -> None:
    reason = _not_regular_reason(path)
    if reason is not None:
        raise UnreadableFile(path, reason)


def _check_declared_size(path: Path, source: str, sides: tuple[int, ...], total: int) -> None:
    """Refuse, before decoding, a file whose header declares an image or volume with a side beyond MAX_SIDE
    pixels, or `total` values (frames × rows × columns × samples) beyond MAX_VALUES."""
    if all(0 < side <= MAX_SIDE for side in sides) and 0 < total <= MAX_VALUES:
        return
    raise UnreadableFile(
        path,
        f"{source} declares {'×'.join(map(str, sides))} pixels ({total:,} values in the file); allowed: 1 to "
        f"{MAX_SIDE} pixels per side and at most {MAX_VALUES:,} values per file (a corrupt header or a "
        "decompression bomb)",
    )


def _require_finite(values: np.ndarray, path: Path, what: str) -> None:
    """A decoded image with no finite value would become a constant image: refuse it, naming `what`."""
    if values.size and not np.isfinite(values).any():
        raise UnreadableFile(path, f"{what} gives no finite pixel value (all NaN or infinite)")


def is_dicom_file(path: Path) -> bool:
    """Whether `path` is a regular file with the DICOM preamble: b"DICM" at byte offset 128 (PS3.10 7.1).
    Never blocks: a named pipe or a device is opened non-blocking, found not regular and not read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        head = os.read(fd, 132)
    except OSError:
        return False
    finally:
        os.close(fd)
    return len(head) == 132 and head[128:] == b"DICM"
