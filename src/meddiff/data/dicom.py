"""DICOM through pydicom: one file → one ((H, W) float32 in [0, 1], Meta) per frame, displayed as a viewer would.
Label maps, contours, reports and presentation states are refused; no patient data reaches Meta or a message."""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import numpy as np

from meddiff.errors import UnreadableFile

from .imagefile import (IMAGE_SUFFIXES, ImageReader, Images, Meta, _check_declared_size, _first_line, _import_backend,
                        _luminance, _min_max_to_unit, _require_finite, _scale_to_unit, _suffix, is_dicom_file)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
# Objects that carry pixel data (or not) but are no image to learn from (PS3.4 B.5 SOP Classes, PS3.3 C.7.3.1.1.1
# Modality): refused by SOP Class UID (or its family's prefix) or by Modality. A deny-list, so that any image
# storage class, present or future, is still read.
_NOT_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "a DICOM Segmentation (label map)",
    "1.2.840.10008.5.1.4.1.1.66.5": "a DICOM Surface Segmentation",
    "1.2.840.10008.5.1.4.1.1.481.3": "a DICOM RT Structure Set (contours)",
    "1.2.840.10008.5.1.4.1.1.88.59": "a DICOM Key Object Selection document",
}
_NOT_IMAGE_SOP_FAMILIES = {
    "1.2.840.10008.5.1.4.1.1.11.": "a DICOM Presentation State",
    "1.2.840.10008.5.1.4.1.1.88.": "a DICOM Structured Report",
}
_NOT_IMAGE_MODALITIES = {
    "SEG": "a DICOM Segmentation (label map)",
    "RTSTRUCT": "a DICOM RT Structure Set (contours)",
    "PR": "a DICOM Presentation State",
    "SR": "a DICOM Structured Report",
    "KO": "a DICOM Key Object Selection document",
}
# Rescale and window values that must be finite numbers (PS3.3 C.11.1.1.2, C.11.2.1.2).
_FINITE_KEYWORDS = (
    ("(0028,1053)", "RescaleSlope"), ("(0028,1052)", "RescaleIntercept"),
    ("(0028,1050)", "WindowCenter"), ("(0028,1051)", "WindowWidth"),
)
_DECODER_HINT = (
    "install a decoder for it (pylibjpeg-libjpeg for JPEG/JPEG-LS, pylibjpeg-openjpeg for JPEG 2000, "
    "pylibjpeg-rle for RLE, or python-gdcm)"
)


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
            _check_is_image(ds, path)
            _check_image_module(ds, path)
            _check_finite_scaling(ds, path)
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


def _check_is_image(ds: Any, path: Path) -> None:
    """Refuse label maps, contours, reports and presentation states by SOP Class UID or Modality."""
    for keyword, where in (("SOPClassUID", ds), ("MediaStorageSOPClassUID", getattr(ds, "file_meta", {}))):
        uid = str(where.get(keyword) or "")
        kind = _NOT_IMAGE_SOP_CLASSES.get(uid) or next(
            (name for prefix, name in _NOT_IMAGE_SOP_FAMILIES.items() if uid.startswith(prefix)), None)
        if kind:
            tag = "(0008,0016) SOP Class UID" if keyword == "SOPClassUID" else "(0002,0002) Media Storage SOP Class UID"
            raise UnreadableFile(path, f"{kind}, not an image: {tag} {uid}")
    modality = ds.get("Modality")
    kind = _NOT_IMAGE_MODALITIES.get(modality.strip().upper()) if isinstance(modality, str) else None
    if kind:
        raise UnreadableFile(path, f"{kind}, not an image: (0008,0060) Modality {modality.strip().upper()}")


def _check_image_module(ds: Any, path: Path) -> None:
    """A header cut short loads without error as a near-empty dataset: require what we decode, and refuse a
    declared size beyond MAX_SIDE / MAX_VALUES before any pixel is decoded."""
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
    frames = ds.get("NumberOfFrames") or 1
    if not (isinstance(frames, int) and frames >= 1):
        raise UnreadableFile(path, f"(0028,0008) NumberOfFrames {str(frames)[:32]}: must be a whole number ≥ 1")
    rows, cols, samples = int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel") or 1)
    source = f"the header ((0028,0010) Rows × (0028,0011) Columns; (0028,0008) NumberOfFrames {frames})"
    _check_declared_size(path, source, (rows, cols), frames * rows * cols * samples)


def _check_finite_scaling(ds: Any, path: Path) -> None:
    """Rescale Slope/Intercept and Window Center/Width must be finite numbers: a NaN slope would silently
    give a constant image. The message names the tag, keyword and value, as pydicom's do."""
    for tag, keyword in _FINITE_KEYWORDS:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        for item in value if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value]:
            try:
                number = float(item)
            except (TypeError, ValueError):
                number = float("nan")
            if not np.isfinite(number):
                raise UnreadableFile(path, f"{tag} {keyword} {str(item)[:32]}: must be a finite number")


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
        rgb = _apply_palette(raw, ds)
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


def _apply_palette(raw: np.ndarray, ds: Any) -> np.ndarray:
    """(F, R, C) indices → (F, R, C, 3) RGB through the Palette Color LUTs (PS3.3 C.7.6.3.1.5-6), uint8 or
    uint16 by the LUT's bits. pydicom's `apply_color_lut` reads 16-bit LUT Data (OW) in the machine's byte
    order; in a big-endian file it is stored big-endian (PS3.5 7.3), so it is given swapped to little-endian
    (else the image decodes almost black)."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_color_lut

    if ds.file_meta.TransferSyntaxUID.is_little_endian or "RedPaletteColorLookupTableData" not in ds:
        return apply_color_lut(raw, ds)
    luts = Dataset()  # the palette elements only, so that the file's own dataset is left as read
    for elem in ds:
        if "PaletteColorLookupTable" in elem.keyword:
            luts.add_new(elem.tag, elem.VR, elem.value)
    entries = int(luts.RedPaletteColorLookupTableDescriptor[0]) or 2**16
    for colour in ("Red", "Green", "Blue", "Alpha"):
        keyword = f"{colour}PaletteColorLookupTableData"
        data = luts.get(keyword)
        if data is not None and len(data) == 2 * entries:  # 16-bit entries; 8-bit ones have no byte order
            setattr(luts, keyword, np.frombuffer(data, ">u2").astype("<u2").tobytes())
    return apply_color_lut(raw, luts)


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
    values = apply_modality_lut(raw, ds)
    if ds.get("ModalityLUTSequence"):
        how = "the Modality LUT (0028,3000)"
    elif slope is not None:
        how = f"(0028,1053) RescaleSlope {slope} with (0028,1052) RescaleIntercept {intercept}"
    else:
        how = "the stored pixel data"
    _require_finite(values, path, how)
    if values.size and np.nanmin(raw) != np.nanmax(raw) and np.nanmin(values) == np.nanmax(values):
        raise UnreadableFile(path, f"{how} maps every stored value to {float(np.nanmin(values)):g} (a constant image)")
    return values


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
