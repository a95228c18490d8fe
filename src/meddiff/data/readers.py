"""One file → list of ((H, W) float32 image in [0, 1], safe Meta) for PNG/JPEG/TIFF/BMP, DICOM and NIfTI;
a folder → (candidate image files, ignored files with a reason). No patient data reaches Meta or a message."""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from meddiff.errors import ConfigError, DataError, UnreadableFile

__all__ = [
    "IMAGE_SUFFIXES",
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

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".nii", ".nii.gz"}
)
NIFTI_AXES: tuple[str, ...] = ("axial", "coronal", "sagittal")
# ITU-R BT.601 luma weights for R, G, B: the same Y that DICOM YBR_FULL and Pillow's "L" use.
LUMA_601 = np.array([0.299, 0.587, 0.114], dtype=np.float64)
# A NIfTI voxel counts as foreground above this fraction of the volume's robust intensity range.
FOREGROUND_LEVEL = 0.1


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


def _check_regular_file(path: Path) -> None:
    if not path.exists():
        raise UnreadableFile(path, "no such file")
    if not path.is_file():
        raise UnreadableFile(path, "not a regular file")
    if path.stat().st_size == 0:
        raise UnreadableFile(path, "empty file (0 bytes)")


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
        try:
            img = Image.open(path, formats=["PNG", "JPEG", "TIFF", "BMP"])  # JPEG may come back as "MPO"
        except UnidentifiedImageError as exc:
            raise UnreadableFile(path, f"not a {expected} file: cannot identify image") from exc
        except Image.DecompressionBombError as exc:
            raise UnreadableFile(path, f"{expected} image too large: {_first_line(exc)}") from exc
        with img:
            fmt = _PIL_FORMATS[img.format]
            pages = getattr(img, "n_frames", 1) if fmt == "tiff" else 1
            images: Images = []
            for page in range(pages):
                img.seek(page)
                try:
                    img.load()
                except (OSError, SyntaxError, ValueError) as exc:
                    reason = f"truncated or corrupt {img.format} file ({_first_line(exc)})"
                    raise UnreadableFile(path, reason) from exc
                arr, bits = _pil_to_unit(img)
                shape = (img.height, img.width) + ((len(img.getbands()),) if len(img.getbands()) > 1 else ())
                images.append((arr, Meta(fmt, bits, None, page, shape)))
        return images


def _pil_to_unit(img: Image.Image) -> tuple[np.ndarray, int | None]:
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
        return _min_max_to_unit(np.asarray(img)), 32
    rgb = np.asarray(img.convert("RGB"))
    return _scale_to_unit(_luminance(rgb), 0.0, 255.0), 8


def _declared_bits(img: Image.Image) -> int:
    """Bits per sample of a mode-"I" image: TIFF BitsPerSample (258), 16 for PNG, else 32."""
    if img.format == "TIFF":
        value = img.tag_v2.get(258, (32,))
        return int(value[0] if isinstance(value, tuple) else value)
    return 16 if img.format == "PNG" else 32


# ---------------------------------------------------------------------------------------------
# DICOM through pydicom
# ---------------------------------------------------------------------------------------------
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_DECODER_HINT = (
    "install a decoder for it (pylibjpeg-libjpeg for JPEG/JPEG-LS, pylibjpeg-openjpeg for JPEG 2000, "
    "pylibjpeg-rle for RLE, or python-gdcm)"
)


def is_dicom_file(path: Path) -> bool:
    """Whether `path` is a file with the DICOM preamble: b"DICM" at byte offset 128 (PS3.10 7.1)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


class DicomReader(ImageReader):
    """DICOM images, one per frame, displayed as a viewer would (PS3.3 C.11 and C.7.6.3).

    Greyscale: stored values → Modality LUT or Rescale Slope/Intercept (PS3.3 C.11.1) → VOI LUT
    or Window Center/Width (PS3.3 C.11.2) → [0, 1] (the VOI output range when one was applied,
    else the min–max of all frames, so frames share a scale) → inverted for MONOCHROME1
    (PS3.3 C.7.6.3.1.2). Colour (RGB, YBR_*, PALETTE COLOR) → BT.601 luminance scaled by the
    bit depth. A lone Rescale Slope or Intercept (PS3.3 C.11.1 requires both) is ignored when it is
    the identity (slope 1, intercept 0) and otherwise makes the file unreadable. Per-frame
    functional groups of enhanced multi-frame objects are not read: the top-level values apply.
    """

    format_name = "DICOM"
    suffixes = frozenset({".dcm", ".dicom"})

    def verify_suffix(self, path: Path) -> bool:
        """`.dcm`/`.dicom`, or any other name whose content starts with the DICOM preamble."""
        path = Path(path)
        if _suffix(path) in self.suffixes:
            return True
        return _suffix(path) not in IMAGE_SUFFIXES and is_dicom_file(path)

    def _describe(self, exc: Exception) -> str:
        # pydicom's messages about a header may quote element values (names, dates): keep only the type.
        return type(exc).__name__

    def _read(self, path: Path) -> Images:
        pydicom = _import_backend("pydicom", "pydicom", "DICOM", path)
        with _silenced_pydicom():
            ds = _dcmread(pydicom, path)
            _check_image_module(ds, path)
            frames, source_shape = _decode_frames(ds, path)
            images = _frames_to_unit(frames, ds, path)
            modality, bits = ds.get("Modality"), ds.get("BitsStored")
        # Only a well-formed (0008,0060) code string can leave: anything else might be free text.
        if not (isinstance(modality, str) and re.fullmatch(r"[A-Z0-9_ ]{1,16}", modality)):
            modality = None
        bit_depth = int(bits) if isinstance(bits, int) else None
        return [
            (img, Meta("dicom", bit_depth, modality.strip() if modality else None, i, source_shape))
            for i, img in enumerate(images)
        ]


@contextlib.contextmanager
def _silenced_pydicom() -> Iterator[None]:
    """pydicom warns and logs about invalid element values by quoting them, and they may be
    patient data: drop its warnings and the records of its "pydicom" logger (where value
    validation logs) while a file is read."""
    logger = logging.getLogger("pydicom")

    def drop_all(record: logging.LogRecord) -> bool:
        return False

    logger.addFilter(drop_all)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.removeFilter(drop_all)


def _dcmread(pydicom: ModuleType, path: Path) -> Any:
    """Read a dataset: as a conformant Part 10 file first, then (for .dcm files without the
    preamble) as a bare dataset; a file without a Transfer Syntax gets the one it was read with."""
    try:
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # noqa: BLE001 - a header pydicom cannot parse
        reason = f"not a DICOM file or corrupt DICOM header ({type(exc).__name__})"
        raise UnreadableFile(path, reason) from exc
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" not in meta and ds.original_encoding[0] is not None:
        implicit, little = ds.original_encoding
        uid = pydicom.uid
        explicit = uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian
        ds.file_meta.TransferSyntaxUID = uid.ImplicitVRLittleEndian if implicit else explicit
    return ds


def _check_image_module(ds: Any, path: Path) -> None:
    """A header cut short loads without error as a near-empty dataset: require what we decode."""
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        sop = ds.get("SOPClassUID")
        # A standard SOP Class name says what the object is; a private UID is not shown.
        known = sop is not None and getattr(sop, "name", "") and sop.name != str(sop)
        kind = f" ({sop.name})" if known else ""
        raise UnreadableFile(path, f"truncated DICOM or not an image{kind}: no pixel data (7FE0,0010)")
    required = (("(0028,0010)", "Rows"), ("(0028,0011)", "Columns"), ("(0028,0004)", "PhotometricInterpretation"))
    for tag, keyword in required:
        if ds.get(keyword) in (None, "", 0):
            raise UnreadableFile(path, f"truncated or invalid DICOM: no {tag} {keyword}")
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        raise UnreadableFile(path, "no (0002,0010) Transfer Syntax UID: cannot decode the pixel data")


def _decode_frames(ds: Any, path: Path) -> tuple[np.ndarray, tuple[int, ...]]:
    """Decode pixel data (YBR converted to RGB by pydicom) → ((frames, rows, columns[, samples])
    array, the shape pydicom decoded)."""
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoder plugins raise anything
        reason = _first_line(exc, limit=240)
        if syntax.is_compressed:
            reason = f"cannot decode pixel data compressed as {syntax.name} ({syntax}): {reason}; {_DECODER_HINT}"
            raise UnreadableFile(path, reason) from exc
        raise UnreadableFile(path, f"corrupt or truncated pixel data ({syntax.name}): {reason}") from exc
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    rows, cols = int(ds.Rows), int(ds.Columns)
    expected = frames * rows * cols * samples
    if arr.size != expected:
        raise UnreadableFile(
            path,
            f"pixel data holds {arr.size} values, expected frames×rows×columns×samples = "
            f"{frames}×{rows}×{cols}×{samples} = {expected}",
        )
    return arr.reshape((frames, rows, cols) + ((samples,) if samples > 1 else ())), tuple(map(int, arr.shape))


def _frames_to_unit(raw: np.ndarray, ds: Any, path: Path) -> list[np.ndarray]:
    """(F, R, C[, S]) decoded frames → one (R, C) float32 image in [0, 1] per frame (PS3.3 C.7.6.3.1.2)."""
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric in _MONOCHROME and raw.ndim == 3:
        unit = _monochrome_to_unit(raw, ds, path)
    elif photometric == "PALETTE COLOR" and raw.ndim == 3:
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(raw, ds)  # uint8 or uint16 by the LUT's bits (PS3.3 C.7.6.3.1.5)
        unit = _scale_to_unit(_luminance(rgb), 0.0, float(np.iinfo(rgb.dtype).max))
    elif photometric in _COLOUR and raw.ndim == 4 and raw.shape[-1] == 3:
        bits = int(ds.get("BitsStored") or raw.dtype.itemsize * 8)
        unit = _scale_to_unit(_luminance(raw), 0.0, float(2**bits - 1))
    else:
        allowed = ", ".join(_MONOCHROME + ("PALETTE COLOR",) + _COLOUR)
        shown = photometric[:32]
        samples = raw.shape[-1] if raw.ndim == 4 else 1
        raise UnreadableFile(
            path,
            f"unsupported (0028,0004) Photometric Interpretation {shown!r} with {samples} sample(s) "
            f"per pixel; allowed: {allowed}",
        )
    return [np.ascontiguousarray(frame, dtype=np.float32) for frame in unit]


def _monochrome_to_unit(raw: np.ndarray, ds: Any, path: Path) -> np.ndarray:
    """(F, R, C) stored values → (F, R, C) float32 display values in [0, 1], white = 1."""
    values = _apply_modality(raw, ds, path)
    values, window = _apply_voi(values, ds, path)
    if window is None:
        unit = _min_max_to_unit(values)
    else:
        unit = _scale_to_unit(values, *window)
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        unit = 1.0 - unit  # PS3.3 C.7.6.3.1.2: minimum value is white
    return unit


def _apply_modality(raw: np.ndarray, ds: Any, path: Path) -> np.ndarray:
    """Modality LUT or Rescale Slope/Intercept (PS3.3 C.11.1) via pydicom; a lone rescale term
    that is not the identity is refused rather than guessed."""
    from pydicom.pixels import apply_modality_lut

    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if not ds.get("ModalityLUTSequence") and (slope is None) != (intercept is None):
        if slope is not None:
            lone, value, identity = "(0028,1053) Rescale Slope", float(slope), 1.0
        else:
            lone, value, identity = "(0028,1052) Rescale Intercept", float(intercept), 0.0
        if value != identity:
            raise UnreadableFile(
                path,
                f"{lone} is {value:g} but its partner is missing; PS3.3 C.11.1 requires both "
                "(0028,1052) Rescale Intercept and (0028,1053) Rescale Slope",
            )
    return apply_modality_lut(raw, ds)


def _apply_voi(values: np.ndarray, ds: Any, path: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    """VOI LUT Sequence, else Window Center/Width (PS3.3 C.11.2), as pydicom's `apply_voi_lut`
    chooses; returns the values and the VOI output range, or None when no VOI is present."""
    from pydicom.pixels import apply_voi, apply_windowing

    sequence = ds.get("VOILUTSequence")
    has_lut = bool(sequence) and all(sequence[0].get(k) is not None for k in ("LUTDescriptor", "LUTData"))
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    try:
        if has_lut:
            first, entries = int(sequence[0].LUTDescriptor[1]), int(sequence[0].LUTDescriptor[0] or 2**16)
            table = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds)
            return apply_voi(np.rint(values).astype(np.int64), ds), (float(table.min()), float(table.max()))
        if has_window:
            # The window maps everything below it to its lowest output and above it to its highest.
            lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds)
            return apply_windowing(values, ds), (float(lo), float(hi))
    except Exception as exc:  # noqa: BLE001 - pydicom names the offending tag and the allowed values
        reason = f"cannot apply the VOI LUT / window (PS3.3 C.11.2): {_first_line(exc)}"
        raise UnreadableFile(path, reason) from exc
    return values, None


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
        nib = _import_backend("nibabel", "nibabel", "NIfTI", path)
        try:
            img = nib.load(path)
            source_shape = tuple(int(n) for n in img.shape)
            bits = int(img.get_data_dtype().itemsize * 8)
            volume = _canonical_volume(nib, img)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - nibabel, gzip and zlib raise many kinds
            raise UnreadableFile(path, f"not a NIfTI file or truncated NIfTI ({_first_line(exc)})") from exc
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


def _ignore_reason(path: Path) -> str:
    suffix = _suffix(path)
    if not suffix:
        return "not an image format: no file extension and no DICOM preamble ('DICM' at byte 128)"
    allowed = ", ".join(sorted(IMAGE_SUFFIXES))
    return f"not an image format: suffix {suffix!r} is not one of {allowed}, and no DICOM preamble"


def find_image_files(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """All files under `root` (recursive, sorted, hidden files and folders skipped) →
    (candidate image files, [(ignored file, reason)]). Candidates have a suffix in IMAGE_SUFFIXES
    or, whatever their name, the DICOM preamble. Raises DataError when `root` does not exist."""
    root = Path(root)
    if root.is_file():
        paths = [root]
    elif root.is_dir():
        paths = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            paths.extend(Path(folder, name) for name in files if not name.startswith("."))
    else:
        raise DataError(f"{root}: no such file or folder; expected a folder of images or one image file")
    candidates: list[Path] = []
    ignored: list[tuple[Path, str]] = []
    for path in sorted(paths):
        if _suffix(path) in IMAGE_SUFFIXES or is_dicom_file(path):
            candidates.append(path)
        else:
            ignored.append((path, _ignore_reason(path)))
    return candidates, ignored
