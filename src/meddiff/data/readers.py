"""One file → list of ((H, W) float32 image in [0, 1], safe Meta) for PNG/JPEG/TIFF/BMP, DICOM and NIfTI;
a folder → (candidate image files, ignored files with a reason). No patient data reaches Meta or a message.
The shared interface and pre-decoding checks live in imagefile.py, the DICOM reader in dicom.py."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from meddiff.errors import ConfigError, DataError, UnreadableFile

from .dicom import DicomReader
from .imagefile import (IMAGE_SUFFIXES, LUMA_601, MAX_SIDE, MAX_VALUES, ImageReader, Images, Meta, _check_declared_size,
                        _check_regular_file, _first_line, _import_backend, _luminance, _min_max_to_unit,
                        _not_regular_reason, _require_finite, _scale_to_unit, _suffix, is_dicom_file)

__all__ = [
    "IMAGE_SUFFIXES",
    "LUMA_601",
    "MAX_SIDE",
    "MAX_VALUES",
    "NIFTI_AXES",
    "DicomReader",
    "ImageReader",
    "Meta",
    "NiftiReader",
    "PillowReader",
    "find_image_files",
    "is_dicom_file",
    "read_file",
]

NIFTI_AXES: tuple[str, ...] = ("axial", "coronal", "sagittal")
# A NIfTI voxel counts as foreground above this fraction of the volume's robust intensity range.
FOREGROUND_LEVEL = 0.1


# ---------------------------------------------------------------------------------------------
# PNG / JPEG / TIFF / BMP through Pillow
# ---------------------------------------------------------------------------------------------
_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "TIFF": "tiff", "BMP": "bmp"}
_SUFFIX_FORMAT = {
    ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"
}


class PillowReader(ImageReader):
    """PNG, JPEG, TIFF (every page) and BMP; 16-bit data is scaled by its bit depth, never clipped.

    Modes: "1" → {0, 1}; "L" → /255; "I;16*" → /65535; "I" → /(2**bits - 1) with the declared
    bits when unsigned and ≤ 16, else min–max; "F" (float TIFF) → min–max; colour (RGB, RGBA, P,
    CMYK, YCbCr...) → BT.601 luminance / 255; "LA" → its L channel / 255. Alpha is ignored.
    """

    format_name = "PNG/JPEG/TIFF/BMP"
    suffixes = frozenset(_SUFFIX_FORMAT)

    def _read(self, path: Path) -> Images:
        expected = _SUFFIX_FORMAT.get(_suffix(path), "PNG/JPEG/TIFF/BMP")
        with warnings.catch_warnings():
            # The declared-size check in _pages replaces Pillow's DecompressionBombWarning (printed to the
            # console otherwise); its DecompressionBombError still refuses the file.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(path, formats=["PNG", "JPEG", "TIFF", "BMP"])  # JPEG may come back as "MPO"
            except UnidentifiedImageError as exc:
                raise UnreadableFile(path, f"not a {expected} file: cannot identify image") from exc
            except Image.DecompressionBombError as exc:
                raise UnreadableFile(path, f"{expected} image too large: {_first_line(exc)}") from exc
            with img:
                return _pages(img, path)


def _pages(img: Image.Image, path: Path) -> Images:
    """An opened (header-only) Pillow image → its pages (every TIFF page, else the first), each size checked
    against MAX_SIDE / MAX_VALUES before its pixels are decoded."""
    fmt = _PIL_FORMATS[img.format]
    pages = getattr(img, "n_frames", 1) if fmt == "tiff" else 1
    images: Images = []
    declared = 0
    for page in range(pages):
        img.seek(page)
        bands = len(img.getbands())
        declared += img.width * img.height * bands
        _check_declared_size(path, f"the {img.format} header", (img.height, img.width), declared)
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as exc:
            reason = f"truncated or corrupt {img.format} file ({_first_line(exc)})"
            raise UnreadableFile(path, reason) from exc
        arr, bits = _pil_to_unit(img, path)
        shape = (img.height, img.width) + ((bands,) if bands > 1 else ())
        images.append((arr, Meta(fmt, bits, None, page, shape)))
    return images


def _pil_to_unit(img: Image.Image, path: Path) -> tuple[np.ndarray, int | None]:
    """A loaded Pillow image → ((H, W) float32 in [0, 1], stored bits per sample)."""
    mode = img.mode
    if mode == "1":
        return np.asarray(img, dtype=np.float32), 1
    if mode == "L":
        return (np.asarray(img, dtype=np.float32) / 255.0).astype(np.float32), 8
    if mode in ("LA", "La"):
        return (np.asarray(img.getchannel("L"), dtype=np.float32) / 255.0).astype(np.float32), 8
    if mode.startswith("I;16"):
        arr = np.asarray(img)
        if mode == "I;16S" or arr.dtype.kind == "i":
            return _min_max_to_unit(arr), 16
        return _scale_to_unit(arr, 0.0, 65535.0), 16
    if mode == "I":
        arr = np.asarray(img)
        bits = _declared_bits(img)
        if bits <= 16 and arr.min() >= 0 and arr.max() <= 2**bits - 1:
            return _scale_to_unit(arr, 0.0, float(2**bits - 1)), bits
        return _min_max_to_unit(arr), bits
    if mode == "F":
        arr = np.asarray(img)
        _require_finite(arr, path, "the floating-point image")
        return _min_max_to_unit(arr), 32
    rgb = np.asarray(img.convert("RGB"))
    return _scale_to_unit(_luminance(rgb), 0.0, 255.0), 8


def _declared_bits(img: Image.Image) -> int:
    """Bits per sample of a mode-"I" image: TIFF BitsPerSample (258), 16 for PNG, else 32."""
    if img.format == "TIFF":
        value = img.tag_v2.get(258, (32,))
        return int(value[0] if isinstance(value, tuple) else value)
    return 16 if img.format == "PNG" else 32


# ---------------------------------------------------------------------------------------------
# NIfTI through nibabel
# ---------------------------------------------------------------------------------------------
class NiftiReader(ImageReader):
    """NIfTI-1/2 volumes → 2-D slices along `axis` in RAS+ orientation (`nib.as_closest_canonical`).

    Slices are shown upright (anterior or superior up, patient left on the image's left).
    Intensities are normalised once per volume, the 0.5th–99.5th percentile → [0, 1] (clipped),
    so slices of one volume share a scale. Slices whose fraction of voxels above
    `FOREGROUND_LEVEL` is below `min_foreground` are skipped. 4-D+ → the first volume;
    2-D → one image. `Meta.index` is the slice number along the axis.
    """

    format_name = "NIfTI"
    suffixes = frozenset({".nii", ".nii.gz"})

    def __init__(self, axis: str = "axial", min_foreground: float = 0.05) -> None:
        _check_nifti_options(axis, min_foreground)
        self.axis = axis
        self.min_foreground = min_foreground

    def _read(self, path: Path) -> Images:
        volume, source_shape, bits = _load_nifti(path)
        _require_finite(volume, path, "the NIfTI volume (with its scl_slope/scl_inter)")
        unit = _robust_to_unit(volume)
        if unit.ndim == 2:
            image = np.ascontiguousarray(np.rot90(unit), dtype=np.float32)
            return [(image, Meta("nifti", bits, None, 0, source_shape))]
        axis = {"sagittal": 0, "coronal": 1, "axial": 2}[self.axis]
        images: Images = []
        for k in range(unit.shape[axis]):
            plane = np.take(unit, k, axis=axis)
            if np.mean(plane > FOREGROUND_LEVEL) >= self.min_foreground:
                image = np.ascontiguousarray(np.rot90(plane), dtype=np.float32)
                images.append((image, Meta("nifti", bits, None, k, source_shape)))
        if not images:
            raise UnreadableFile(
                path,
                f"no {self.axis} slice has at least {self.min_foreground:.0%} foreground voxels "
                f"(all {unit.shape[axis]} slices near-empty)",
            )
        return images


def _load_nifti(path: Path) -> tuple[np.ndarray, tuple[int, ...], int]:
    """A NIfTI file → (its first volume in RAS+ orientation as float, the stored shape, the stored bits), the
    declared size checked before anything is decoded; UnreadableFile when it is no NIfTI file."""
    nib = _import_backend("nibabel", "nibabel", "NIfTI", path)
    try:
        img = nib.load(path)  # reads the header only
        source_shape = tuple(int(n) for n in img.shape)
        bits = int(img.get_data_dtype().itemsize * 8)
    except Exception as exc:  # noqa: BLE001 - nibabel, gzip and zlib raise many kinds
        raise UnreadableFile(path, f"not a NIfTI file or truncated NIfTI ({_first_line(exc)})") from exc
    _check_nifti_size(path, source_shape)
    try:
        return _canonical_volume(nib, img), source_shape, bits
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel, gzip and zlib raise many kinds
        raise UnreadableFile(path, f"not a NIfTI file or truncated NIfTI ({_first_line(exc)})") from exc


def _check_nifti_size(path: Path, shape: tuple[int, ...]) -> None:
    """The first 3-D volume (or the 2-D image), the part that is decoded, against MAX_SIDE / MAX_VALUES."""
    sides = shape[:3]
    _check_declared_size(path, "the NIfTI header", sides, int(np.prod(sides, dtype=np.float64)))


def _canonical_volume(nib: ModuleType, img: Any) -> np.ndarray:
    """The first 3-D volume in RAS+ voxel order (or the 2-D image) as float32 with scaling applied."""
    if len(img.shape) > 3:
        img = img.slicer[(slice(None),) * 3 + (0,) * (len(img.shape) - 3)]
    if len(img.shape) == 3:
        img = nib.as_closest_canonical(img)
    return np.asarray(img.get_fdata(dtype=np.float32))


def _robust_to_unit(volume: np.ndarray) -> np.ndarray:
    """0.5th–99.5th percentile of the finite voxels → [0, 1], clipped; falls back to min–max when
    that range is empty (mostly-zero volumes)."""
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        return np.zeros(volume.shape, dtype=np.float32)
    lo, hi = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    if not hi > lo:
        lo, hi = float(finite.min()), float(finite.max())
    return _scale_to_unit(volume, lo, hi)


def _check_nifti_options(axis: str, min_foreground: float) -> None:
    if axis not in NIFTI_AXES:
        raise ConfigError(f"nifti_axis: got {axis!r}; allowed: {', '.join(NIFTI_AXES)}")
    if not 0.0 <= min_foreground <= 1.0:
        raise ConfigError(f"min_foreground: got {min_foreground!r}; allowed: a fraction in [0, 1]")


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def read_file(path: Path, *, nifti_axis: str = "axial", min_foreground: float = 0.05) -> Images:
    """One file → list of ((H, W) float32 in [0, 1], Meta), picking the reader by suffix (or the
    DICOM preamble). Raises UnreadableFile(path, reason) for any unreadable file and ConfigError
    for a bad `nifti_axis` ("axial", "coronal", "sagittal") or `min_foreground` (in [0, 1])."""
    path = Path(path)
    readers = (NiftiReader(nifti_axis, min_foreground), DicomReader(), PillowReader())
    _check_regular_file(path)
    for reader in readers:
        if reader.verify_suffix(path):
            return reader.read(path)
    raise UnreadableFile(path, _ignore_reason(path))


LABEL_MODES = ("1", "L", "P", "I;16", "I;16L", "I;16B", "I")  # single-channel integer images: label values as stored


def read_label_map(path: Path) -> np.ndarray:
    """A label image (PNG, TIFF or BMP: one channel of integer label values, 0 = background; a palette image's
    indices) → (H, W) uint16 label values exactly as stored, never scaled. UnreadableFile when the file is no
    such image: colour, floating point, negative or above 65535 values, several pages."""
    _check_regular_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path, formats=["PNG", "TIFF", "BMP"])
        except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise UnreadableFile(path, f"not a PNG/TIFF/BMP label image ({_first_line(exc)})") from exc
        with img:
            if getattr(img, "n_frames", 1) != 1:
                raise UnreadableFile(path, "a label image must have one page")
            _check_declared_size(path, f"the {img.format} header", (img.height, img.width), img.width * img.height)
            if img.mode not in LABEL_MODES:
                raise UnreadableFile(path, f"a label image must have one channel of integer labels (mode {img.mode}: "
                                     "save it as 8- or 16-bit grey or palette)")
            try:
                arr = np.asarray(img)  # mode "1": booleans, 0 and 1
            except (OSError, SyntaxError, ValueError) as exc:
                raise UnreadableFile(path, f"truncated or corrupt {img.format} file ({_first_line(exc)})") from exc
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() > 65535:
        raise UnreadableFile(path, f"label values from {arr.min()} to {arr.max()}; allowed 0 to 65535")
    return arr.astype(np.uint16)


def read_label_slices(path: Path, axis: str, indices: list[int]) -> list[np.ndarray]:
    """A NIfTI label volume → its slices number `indices` along `axis`, oriented as `NiftiReader` orients its
    image's slices (RAS+, upright), as (H, W) uint16 label values. UnreadableFile when it is no label volume:
    non-integer or negative values, or fewer slices than asked for."""
    _check_regular_file(path)
    volume = _load_nifti(path)[0]
    if not np.isfinite(volume).all() or (volume != np.round(volume)).any() or volume.min() < 0 or volume.max() > 65535:
        raise UnreadableFile(path, "a label volume must hold whole numbers from 0 to 65535")
    if volume.ndim == 2:
        return [np.ascontiguousarray(np.rot90(volume)).astype(np.uint16)] if indices == [0] else []
    k_axis = {"sagittal": 0, "coronal": 1, "axial": 2}[axis]
    if indices and max(indices) >= volume.shape[k_axis]:
        raise UnreadableFile(path, f"{volume.shape[k_axis]} {axis} slices; its image has more")
    return [np.ascontiguousarray(np.rot90(np.take(volume, k, axis=k_axis))).astype(np.uint16) for k in indices]


def read_segmentation(path: Path, image: Path) -> np.ndarray:
    """A DICOM Segmentation (read with highdicom) → the label map of the single-frame DICOM image at `image`:
    (H, W) uint16, each pixel the number of the segment that covers it (0: none). UnreadableFile when the file
    is no Segmentation, does not reference that image, or its segments overlap there."""
    _check_regular_file(path)
    _check_regular_file(image)
    import highdicom as hd
    import pydicom

    try:
        uid = str(pydicom.dcmread(image, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        seg = hd.seg.segread(path)
    except Exception as exc:  # noqa: BLE001 - pydicom and highdicom raise many kinds on a foreign file
        raise UnreadableFile(path, f"not a DICOM Segmentation of its image ({_first_line(exc)})") from exc
    try:
        labels = seg.get_pixels_by_source_instance([uid], combine_segments=True, assert_missing_frames_are_empty=True)
    except Exception as exc:  # noqa: BLE001
        raise UnreadableFile(path, f"no segmentation of its image {image.name} ({_first_line(exc)})") from exc
    return np.asarray(labels[0]).astype(np.uint16)


def _ignore_reason(path: Path) -> str:
    suffix = _suffix(path)
    if not suffix:
        return "not an image format: no file extension and no DICOM preamble ('DICM' at byte 128)"
    allowed = ", ".join(sorted(IMAGE_SUFFIXES))
    return f"not an image format: suffix {suffix!r} is not one of {allowed}, and no DICOM preamble"


def find_image_files(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """All files under `root` (recursive, sorted, hidden files and folders skipped) →
    (candidate image files, [(ignored file, reason)]). Candidates are regular files with a suffix in
    IMAGE_SUFFIXES or, whatever their name, the DICOM preamble. Named pipes, sockets, devices, broken links,
    empty files and folders that cannot be listed are ignored with a reason, and never opened. Raises
    DataError when `root` does not exist."""
    root = Path(root)
    unlisted: list[tuple[Path, str]] = []
    if root.is_file():
        paths = [root]
    elif root.is_dir():
        paths = []

        def note(exc: OSError) -> None:
            unlisted.append((Path(exc.filename or root), f"cannot list the folder ({exc.strerror or exc})"))

        for folder, dirs, files in os.walk(root, onerror=note):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            paths.extend(Path(folder, name) for name in files if not name.startswith("."))
    elif os.path.lexists(root):
        raise DataError(f"{root}: {_not_regular_reason(root)}; expected a folder of images or one image file")
    else:
        raise DataError(f"{root}: no such file or folder; expected a folder of images or one image file")
    candidates: list[Path] = []
    ignored: list[tuple[Path, str]] = list(unlisted)
    for path in sorted(paths):
        reason = _not_regular_reason(path)
        if reason is not None:
            ignored.append((path, reason))
        elif _suffix(path) in IMAGE_SUFFIXES or is_dicom_file(path):
            candidates.append(path)
        else:
            ignored.append((path, _ignore_reason(path)))
    return candidates, sorted(ignored)
