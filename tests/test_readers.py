"""Tests for meddiff.data.readers: every format, its scaling, and every way a file can be unreadable."""
from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import re
import socket
import struct
import threading
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    generate_uid,
)

from meddiff.errors import ConfigError, DataError, UnreadableFile
from meddiff.data.readers import (
    IMAGE_SUFFIXES,
    MAX_SIDE,
    DicomReader,
    Meta,
    NiftiReader,
    PillowReader,
    find_image_files,
    is_dicom_file,
    read_file,
)

PATIENT_NAME = "Doe^Jane"


# ---------------------------------------------------------------------------------------------
# Builders for tiny files
# ---------------------------------------------------------------------------------------------
def _save_pil(path: Path, arr: np.ndarray, **kwargs) -> Path:
    Image.fromarray(arr).save(path, **kwargs)
    return path


def _one(path: Path, **kwargs) -> tuple[np.ndarray, Meta]:
    images = read_file(path, **kwargs)
    assert len(images) == 1
    image, meta = images[0]
    assert image.dtype == np.float32 and image.ndim == 2
    assert 0.0 <= image.min() and image.max() <= 1.0
    return image, meta


def _dicom(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int | None = None, **attrs) -> Dataset:
    """A synthetic Secondary Capture dataset built from scratch, with a fake patient name."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = "SECRET-ID-42"
    ds.Modality = "OT"
    ds.ConversionType = "SYN"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"
    ds.set_pixel_data(pixels, photometric, bits or pixels.dtype.itemsize * 8)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def _write_dicom(path: Path, ds: Dataset) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _testdata(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    if found is None:
        pytest.skip(f"pydicom test file {name} is not bundled with this pydicom")
    return Path(found)


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


# ---------------------------------------------------------------------------------------------
# PNG / JPEG / TIFF / BMP
# ---------------------------------------------------------------------------------------------
def test_png_8bit_is_divided_by_255(tmp_path):
    image, meta = _one(_save_pil(tmp_path / "a.png", np.array([[0, 51], [204, 255]], np.uint8)))
    np.testing.assert_allclose(image, [[0, 0.2], [0.8, 1.0]], atol=1e-6)
    assert meta == Meta("png", 8, None, 0, (2, 2))


def test_png_16bit_is_scaled_by_its_depth_not_clipped(tmp_path):
    pixels = np.array([[0, 4096], [65535, 255]], np.uint16)
    image, meta = _one(_save_pil(tmp_path / "a.png", pixels))
    assert image[1, 0] == 1.0
    assert image[0, 1] == pytest.approx(0.0625, abs=1e-4)
    assert image[1, 1] == pytest.approx(255 / 65535)  # convert("L") would have made this 1.0
    assert meta.bit_depth == 16


def test_rgb_and_rgba_become_bt601_luminance(tmp_path):
    rgb = np.zeros((1, 4, 3), np.uint8)
    rgb[0, 0], rgb[0, 1], rgb[0, 2], rgb[0, 3] = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
    image, meta = _one(_save_pil(tmp_path / "rgb.png", rgb))
    np.testing.assert_allclose(image[0], [0.299, 0.587, 0.114, 1.0], atol=1e-6)
    assert meta.source_shape == (1, 4, 3)
    rgba = np.concatenate([rgb, np.full((1, 4, 1), 7, np.uint8)], axis=-1)  # alpha is ignored
    image, _ = _one(_save_pil(tmp_path / "rgba.png", rgba))
    np.testing.assert_allclose(image[0], [0.299, 0.587, 0.114, 1.0], atol=1e-6)


def test_palette_png_becomes_luminance(tmp_path):
    img = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.save(tmp_path / "p.png")
    image, _ = _one(tmp_path / "p.png")
    np.testing.assert_allclose(image[0], [0.0, 0.587], atol=1e-6)


def test_bilevel_png_is_zero_or_one(tmp_path):
    img = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    img.save(tmp_path / "b.png")
    image, meta = _one(tmp_path / "b.png")
    np.testing.assert_array_equal(image, [[0.0, 1.0]])
    assert meta.bit_depth == 1


def test_tiff_16bit_and_every_page(tmp_path):
    pages = [Image.fromarray(np.array([[0, 65535]], np.uint16)), Image.fromarray(np.array([[4096, 0]], np.uint16))]
    pages[0].save(tmp_path / "s.tif", save_all=True, append_images=pages[1:])
    images = read_file(tmp_path / "s.tif")
    assert [meta.index for _, meta in images] == [0, 1]
    assert all(meta.format == "tiff" and meta.bit_depth == 16 for _, meta in images)
    np.testing.assert_allclose(images[0][0], [[0.0, 1.0]])
    assert images[1][0][0, 0] == pytest.approx(0.0625, abs=1e-4)


def test_float_tiff_is_min_max_scaled(tmp_path):
    image, meta = _one(_save_pil(tmp_path / "f.tiff", np.array([[-2.0, 0.0, 2.0]], np.float32)))
    np.testing.assert_allclose(image, [[0.0, 0.5, 1.0]])
    assert meta.bit_depth == 32


def test_int32_tiff_beyond_16_bits_is_min_max_scaled_not_clipped(tmp_path):
    image, _ = _one(_save_pil(tmp_path / "i.tif", np.array([[0, 35000, 70000]], np.int32)))
    np.testing.assert_allclose(image, [[0.0, 0.5, 1.0]])


def test_bmp_and_jpeg(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1))
    image, meta = _one(_save_pil(tmp_path / "a.bmp", ramp))
    np.testing.assert_allclose(image, ramp / 255.0, atol=1e-6)
    assert meta.format == "bmp"
    image, meta = _one(_save_pil(tmp_path / "a.jpg", ramp, quality=95))
    np.testing.assert_allclose(image, ramp / 255.0, atol=0.05)  # lossy
    assert (meta.format, meta.bit_depth, meta.source_shape) == ("jpeg", 8, (16, 16))


def test_format_comes_from_content_not_suffix(tmp_path):
    _save_pil(tmp_path / "really_png.jpg", np.zeros((2, 2), np.uint8), format="PNG")
    assert _one(tmp_path / "really_png.jpg")[1].format == "png"


def test_pillow_reader_interface(tmp_path):
    reader = PillowReader()
    assert reader.verify_suffix(Path("x.PNG")) and reader.verify_suffix(Path("x.tiff"))
    assert not reader.verify_suffix(Path("x.dcm"))
    images = reader.read(_save_pil(tmp_path / "a.png", np.zeros((3, 2), np.uint8)))
    assert images[0][0].shape == (3, 2)


# ---------------------------------------------------------------------------------------------
# Unreadable files: always UnreadableFile with a human reason, never a library exception
# ---------------------------------------------------------------------------------------------
def _truncated_png(path: Path) -> None:
    _save_pil(path, np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize(
    ("name", "make", "match"),
    [
        ("empty.png", lambda p: p.write_bytes(b""), r"empty file \(0 bytes\)"),
        ("noise.png", lambda p: p.write_bytes(bytes(range(256)) * 4), "not a PNG file: cannot identify image"),
        ("noise.jpg", lambda p: p.write_bytes(b"\xff\x00" * 300), "not a JPEG file: cannot identify image"),
        ("cut.png", _truncated_png, "truncated or corrupt PNG"),
        ("noise.dcm", lambda p: p.write_bytes(bytes(range(256)) * 4), "DICOM"),
        ("fake.nii.gz", lambda p: p.write_bytes(b"plain text, not gzip" * 30), "not a NIfTI file or truncated NIfTI"),
        ("noise.nii", lambda p: p.write_bytes(b"\x00" * 400), "NIfTI"),
        ("notes.txt", lambda p: p.write_text("hello"), r"not an image format: suffix '\.txt'"),
        ("README", lambda p: p.write_text("hello"), "no file extension and no DICOM preamble"),
    ],
)
def test_unreadable_files_raise_unreadable_file(tmp_path, name, make, match):
    path = tmp_path / name
    make(path)
    with pytest.raises(UnreadableFile, match=match) as info:
        read_file(path)
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}: ")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(UnreadableFile, match="no such file"):
        read_file(tmp_path / "gone.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(UnreadableFile, match="not a regular file"):
        read_file(tmp_path / "dir.png")


def test_bad_options_are_config_errors(tmp_path):
    path = _save_pil(tmp_path / "a.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(ConfigError, match=r"nifti_axis: got 'axail'; allowed: axial, coronal, sagittal"):
        read_file(path, nifti_axis="axail")
    with pytest.raises(ConfigError, match=r"min_foreground: got 1\.5"):
        read_file(path, min_foreground=1.5)


# ---------------------------------------------------------------------------------------------
# DICOM built from scratch
# ---------------------------------------------------------------------------------------------
def _linear_window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window onto [0, 1], written independently of pydicom."""
    return np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def test_dicom_rescale_then_window(tmp_path):
    stored = np.array([[0, 1000], [1024, 3000]], np.uint16)
    ds = _dicom(stored, bits=12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400, Modality="CT")
    image, meta = _one(_write_dicom(tmp_path / "ct.dcm", ds))
    np.testing.assert_allclose(image, _linear_window(stored - 1024.0, 40, 400), atol=1e-6)
    assert meta == Meta("dicom", 12, "CT", 0, (2, 2))


def test_dicom_without_window_is_min_max_and_slope_is_applied(tmp_path):
    stored = np.array([[0, 50, 100]], np.uint16)
    ds = _dicom(stored, RescaleSlope=-1, RescaleIntercept=0)  # a negative slope flips the order
    image, _ = _one(_write_dicom(tmp_path / "a.dcm", ds))
    np.testing.assert_allclose(image, [[1.0, 0.5, 0.0]])


def test_dicom_voi_lut_sequence(tmp_path):
    ds = _dicom(np.array([[0, 1, 2, 3]], np.uint16))
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 8])  # LUT Descriptor: 4 entries, first value 0, 8 bits
    item.add_new(0x00283006, "US", [0, 50, 100, 200])  # LUT Data
    ds.VOILUTSequence = [item]
    image, _ = _one(_write_dicom(tmp_path / "lut.dcm", ds))
    np.testing.assert_allclose(image, [[0.0, 0.25, 0.5, 1.0]])


def test_dicom_monochrome1_is_inverted(tmp_path):
    image, _ = _one(_write_dicom(tmp_path / "m1.dcm", _dicom(np.array([[0, 25, 100]], np.uint16), "MONOCHROME1")))
    np.testing.assert_allclose(image, [[1.0, 0.75, 0.0]])


def test_dicom_lone_rescale_term(tmp_path):
    ds = _dicom(np.array([[0, 10]], np.uint16), RescaleSlope=2)
    with pytest.raises(UnreadableFile, match=r"\(0028,1053\) Rescale Slope is 2 but its partner is missing"):
        read_file(_write_dicom(tmp_path / "lone.dcm", ds))
    ds = _dicom(np.array([[0, 10]], np.uint16), RescaleSlope=1)  # the identity: harmless, ignored
    np.testing.assert_allclose(_one(_write_dicom(tmp_path / "ok.dcm", ds))[0], [[0.0, 1.0]])


def test_dicom_bad_window_names_the_tag(tmp_path):
    ds = _dicom(np.array([[0, 10]], np.uint16), WindowCenter=5, WindowWidth=0)
    with pytest.raises(UnreadableFile, match=r"PS3\.3 C\.11\.2.*\(0028,1051\) Window Width"):
        read_file(_write_dicom(tmp_path / "w.dcm", ds))


def test_dicom_multiframe_gives_one_image_per_frame_on_one_scale(tmp_path):
    frames = np.stack([np.full((3, 4), v, np.uint16) for v in (0, 50, 100)])
    images = read_file(_write_dicom(tmp_path / "mf.dcm", _dicom(frames)))
    assert [meta.index for _, meta in images] == [0, 1, 2]
    assert all(meta.source_shape == (3, 3, 4) for _, meta in images)
    np.testing.assert_allclose([img.mean() for img, _ in images], [0.0, 0.5, 1.0])


def test_dicom_rgb_ultrasound_becomes_luminance(tmp_path):
    rgb = np.zeros((2, 1, 3, 3), np.uint8)  # 2 frames, 1 x 3 pixels
    rgb[:, 0, 0], rgb[:, 0, 1], rgb[:, 0, 2] = (255, 0, 0), (0, 255, 0), (255, 255, 255)
    images = read_file(_write_dicom(tmp_path / "us.dcm", _dicom(rgb, "RGB", Modality="US")))
    assert len(images) == 2 and images[1][1] == Meta("dicom", 8, "US", 1, (2, 1, 3, 3))
    np.testing.assert_allclose(images[0][0], [[0.299, 0.587, 1.0]], atol=1e-6)


def test_dicom_unsupported_photometric(tmp_path):
    ds = _dicom(np.zeros((2, 2), np.uint16))
    ds.PhotometricInterpretation = "HSV"
    with pytest.raises(UnreadableFile, match=r"unsupported \(0028,0004\) Photometric Interpretation 'HSV'"):
        read_file(_write_dicom(tmp_path / "hsv.dcm", ds))


def test_extensionless_and_uid_named_dicom_are_found_and_read(tmp_path):
    for name in ("IM0001", "1.2.826.0.1.3680043.99"):
        _write_dicom(tmp_path / name, _dicom(np.array([[0, 9]], np.uint16)))
    (tmp_path / "IM0002").write_bytes(b"\x00" * 200)
    found, ignored = find_image_files(tmp_path)
    assert found == [tmp_path / "1.2.826.0.1.3680043.99", tmp_path / "IM0001"]
    assert ignored == [(tmp_path / "IM0002", "not an image format: no file extension and no DICOM preamble ('DICM' at byte 128)")]
    assert is_dicom_file(tmp_path / "IM0001") and not is_dicom_file(tmp_path / "IM0002")
    assert DicomReader().verify_suffix(tmp_path / "IM0001")
    assert _one(tmp_path / "IM0001")[1].format == "dicom"


def test_bare_dataset_without_preamble_is_read(tmp_path):
    ds = _dicom(np.array([[0, 9]], np.uint16))
    path = tmp_path / "bare.dcm"
    del ds.file_meta
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)  # no preamble, no file meta
    assert not is_dicom_file(path)
    np.testing.assert_allclose(_one(path)[0], [[0.0, 1.0]])


@pytest.mark.parametrize(
    ("cut", "match"),
    [
        (132, r"truncated DICOM or not an image.*no pixel data \(7FE0,0010\)"),  # preamble only
        (400, r"truncated DICOM or not an image.*no pixel data \(7FE0,0010\)"),  # cut in the header
        (-100, "corrupt or truncated pixel data"),  # cut in the pixels
    ],
)
def test_truncated_dicom(tmp_path, cut, match):
    full = _write_dicom(tmp_path / "full.dcm", _dicom(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)))
    path = tmp_path / "cut.dcm"
    path.write_bytes(full.read_bytes()[:cut])
    with pytest.raises(UnreadableFile, match=match) as info:
        read_file(path)
    assert "Doe" not in str(info.value) and "SECRET" not in str(info.value)


def test_dicom_without_pixel_data(tmp_path):
    ds = _dicom(np.zeros((2, 2), np.uint16))
    del ds.PixelData
    with pytest.raises(UnreadableFile, match=r"no pixel data \(7FE0,0010\)"):
        read_file(_write_dicom(tmp_path / "nopix.dcm", ds))


def test_no_patient_data_reaches_meta_messages_warnings_or_logs(tmp_path, caplog, recwarn):
    with pytest.warns(UserWarning, match="Invalid value for VR CS"):  # pydicom quotes the value
        ds = _dicom(np.array([[0, 9]], np.uint16), Modality=PATIENT_NAME)  # free text where a code belongs
    path = _write_dicom(tmp_path / "a.dcm", ds)
    recwarn.clear()
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        _, meta = _one(path)
    assert "Doe" not in caplog.text and not [w for w in recwarn if "Doe" in str(w.message)]
    assert meta.modality is None
    assert "Doe" not in repr(meta) and "SECRET" not in repr(meta)
    ds = _dicom(np.zeros((2, 2), np.uint16), RescaleIntercept=3)  # lone non-identity intercept
    with pytest.raises(UnreadableFile) as info:
        read_file(_write_dicom(tmp_path / "b.dcm", ds))
    assert "Doe" not in str(info.value) and "SECRET" not in str(info.value)


def test_pydicom_warnings_quoting_values_are_silenced(tmp_path, monkeypatch, caplog, recwarn):
    from pydicom.misc import warn_and_log

    path = _write_dicom(tmp_path / "a.dcm", _dicom(np.array([[0, 9]], np.uint16)))
    original = pydicom.dcmread

    def chatty_dcmread(*args, **kwargs):
        warn_and_log(f"Invalid value for VR PN: '{PATIENT_NAME}'")  # as pydicom does for bad values
        return original(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", chatty_dcmread)
    with caplog.at_level(logging.DEBUG):
        _one(path)
    assert "Doe" not in caplog.text and not [w for w in recwarn if "Doe" in str(w.message)]
    assert not logging.getLogger("pydicom").filters  # the silencer is removed afterwards


# ---------------------------------------------------------------------------------------------
# DICOM reference files bundled with pydicom
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "count", "shape", "modality", "bits"),
    [
        ("CT_small.dcm", 1, (128, 128), "CT", 16),
        ("MR_small.dcm", 1, (64, 64), "MR", 16),
        ("MR_small_jp2klossless.dcm", 1, (64, 64), "MR", 16),  # JPEG 2000 through pylibjpeg-openjpeg
        ("MR_small_RLE.dcm", 1, (64, 64), "MR", 16),
        ("MR_small_bigendian.dcm", 1, (64, 64), "MR", 16),
        ("693_J2KI.dcm", 1, (512, 512), "CT", 14),
        ("rtdose.dcm", 15, (10, 10), "RTDOSE", 32),  # multi-frame
        ("examples_ybr_color.dcm", 30, (240, 320), "US", 8),  # multi-frame colour ultrasound, JPEG
        ("examples_jpeg2k.dcm", 1, (480, 640), "US", 8),  # colour J2K
        ("examples_palette.dcm", 1, (350, 800), "US", 8),
    ],
)
def test_pydicom_reference_files(name, count, shape, modality, bits):
    images = read_file(_testdata(name))
    assert len(images) == count
    for i, (image, meta) in enumerate(images):
        assert image.dtype == np.float32 and image.shape == shape
        assert 0.0 <= image.min() <= image.max() <= 1.0
        assert (meta.format, meta.modality, meta.bit_depth, meta.index) == ("dicom", modality, bits, i)
    assert max(image.max() for image, _ in images) > 0.5


def test_lossless_encodings_decode_to_the_same_image():
    reference = read_file(_testdata("MR_small.dcm"))[0][0]
    for name in ("MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm"):
        np.testing.assert_array_equal(read_file(_testdata(name))[0][0], reference)


def test_mr_small_window_is_applied():
    ds = pydicom.dcmread(_testdata("MR_small.dcm"))
    expected = _linear_window(ds.pixel_array.astype(np.float64), float(ds.WindowCenter), float(ds.WindowWidth))
    np.testing.assert_allclose(read_file(_testdata("MR_small.dcm"))[0][0], expected, atol=1e-6)


def test_ybr_ultrasound_luminance_matches_its_y_channel():
    ds = pydicom.dcmread(_testdata("SC_ybr_full_422_uncompressed.dcm"))
    ds.pixel_array_options(as_rgb=False)
    y = ds.pixel_array[..., 0] / 255.0
    np.testing.assert_allclose(read_file(_testdata("SC_ybr_full_422_uncompressed.dcm"))[0][0], y, atol=2.5 / 255)


def test_undecodable_transfer_syntax_is_named():
    if importlib.util.find_spec("libjpeg") or importlib.util.find_spec("gdcm"):
        pytest.skip("a 12-bit JPEG decoder is installed")
    with pytest.raises(UnreadableFile, match=r"cannot decode pixel data compressed as JPEG Extended .*1\.2\.840\.10008\.1\.2\.4\.51"):
        read_file(_testdata("JPEG-lossy.dcm"))


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("MR_truncated.dcm", "corrupt or truncated pixel data"),
        ("rtplan.dcm", r"not an image \(RT Plan Storage\): no pixel data"),
        ("test-SR.dcm", r"a DICOM Structured Report, not an image: \(0008,0016\) SOP Class UID 1\.2\.840\.10008\.5\.1\.4\.1\.1\.88\.33"),
    ],
)
def test_pydicom_files_that_are_not_readable_images(name, match):
    with pytest.raises(UnreadableFile, match=match):
        read_file(_testdata(name))


# ---------------------------------------------------------------------------------------------
# NIfTI
# ---------------------------------------------------------------------------------------------
def _phantom() -> np.ndarray:
    """(X=6, Y=5, Z=4) volume: slices z=1 and z=2 hold a block, z=0 and z=3 are empty."""
    data = np.zeros((6, 5, 4), np.float32)
    data[1:5, 1:4, 1] = 100.0
    data[1:5, 1:4, 2] = 200.0
    return data


def test_nifti_axial_slices_skip_empty_ones_and_share_a_scale(tmp_path):
    images = read_file(_nifti(tmp_path / "v.nii", _phantom()))
    assert [meta.index for _, meta in images] == [1, 2]
    assert all(img.shape == (5, 6) for img, _ in images)  # (Y, X): rows anterior → posterior
    assert images[0][0].max() == pytest.approx(0.5, abs=0.01) and images[1][0].max() == 1.0
    assert images[0][1] == Meta("nifti", 32, None, 1, (6, 5, 4))
    assert len(read_file(tmp_path / "v.nii", min_foreground=0.0)) == 4


@pytest.mark.parametrize(("axis", "count", "shape"), [("axial", 4, (5, 6)), ("coronal", 5, (4, 6)), ("sagittal", 6, (4, 5))])
def test_nifti_axis_choice(tmp_path, axis, count, shape):
    images = read_file(_nifti(tmp_path / "v.nii.gz", _phantom()), nifti_axis=axis, min_foreground=0.0)
    assert len(images) == count and all(img.shape == shape for img, _ in images)
    reader = NiftiReader(axis, 0.0)
    assert reader.verify_suffix(tmp_path / "v.nii.gz") and not reader.verify_suffix(tmp_path / "v.gz")


def test_nifti_is_reoriented_to_ras_and_shown_upright(tmp_path):
    data = np.zeros((6, 5, 4), np.float32)
    data[0, 4, 2] = 1.0  # patient left (x=0), most anterior (y=4)
    upright = read_file(_nifti(tmp_path / "ras.nii", data), min_foreground=0.0)[2][0]
    assert upright[0, 0] == 1.0  # anterior up, patient left on the image's left
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])  # voxel x runs right → left: same anatomy, mirrored array
    image = read_file(_nifti(tmp_path / "las.nii", data[::-1].copy(), flipped), min_foreground=0.0)[2][0]
    np.testing.assert_array_equal(image, upright)


def test_nifti_4d_takes_the_first_volume(tmp_path):
    data = np.stack([_phantom(), np.zeros((6, 5, 4), np.float32)], axis=-1)
    images = read_file(_nifti(tmp_path / "t.nii.gz", data))
    assert [meta.index for _, meta in images] == [1, 2] and images[0][1].source_shape == (6, 5, 4, 2)


def test_nifti_2d_gives_one_image(tmp_path):
    image, meta = _one(_nifti(tmp_path / "flat.nii", np.arange(12, dtype=np.float32).reshape(4, 3)))
    assert image.shape == (3, 4) and meta.index == 0 and image.max() == 1.0


def test_nifti_robust_range_clips_outliers(tmp_path):
    data = np.tile(np.linspace(0, 100, 1000, dtype=np.float32).reshape(10, 10, 10), 1)
    data[0, 0, 5] = 1e6  # one hot voxel must not darken the whole volume
    images = read_file(_nifti(tmp_path / "o.nii", data), min_foreground=0.0)
    assert np.median(np.concatenate([img.ravel() for img, _ in images])) == pytest.approx(0.5, abs=0.02)


def test_nifti_all_empty_and_truncated(tmp_path):
    with pytest.raises(UnreadableFile, match=r"no axial slice has at least 5% foreground voxels \(all 4 slices near-empty\)"):
        read_file(_nifti(tmp_path / "z.nii", np.zeros((6, 5, 4), np.float32)))
    full = _nifti(tmp_path / "full.nii", _phantom()).read_bytes()
    (tmp_path / "cut.nii").write_bytes(full[: len(full) - 100])
    with pytest.raises(UnreadableFile, match="NIfTI"):
        read_file(tmp_path / "cut.nii")
    packed = gzip.compress(full)
    (tmp_path / "cut.nii.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(UnreadableFile, match="NIfTI"):
        read_file(tmp_path / "cut.nii.gz")


# ---------------------------------------------------------------------------------------------
# Finding files
# ---------------------------------------------------------------------------------------------
def test_find_image_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    for name in ("b.PNG", "sub/a.tif", ".hidden.png", ".git/c.png"):
        _save_pil(tmp_path / name, np.zeros((2, 2), np.uint8))
    _nifti(tmp_path / "sub" / "v.nii.gz", _phantom())
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "archive.gz").write_bytes(b"x")
    found, ignored = find_image_files(tmp_path)
    assert found == [tmp_path / "b.PNG", tmp_path / "sub" / "a.tif", tmp_path / "sub" / "v.nii.gz"]
    assert [path.name for path, _ in ignored] == ["archive.gz", "notes.txt"]
    assert all(reason.startswith("not an image format: suffix") for _, reason in ignored)
    assert find_image_files(tmp_path / "b.PNG") == ([tmp_path / "b.PNG"], [])
    with pytest.raises(DataError, match="no such file or folder"):
        find_image_files(tmp_path / "missing")


def test_image_suffixes():
    assert IMAGE_SUFFIXES == {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".nii", ".nii.gz"}


# ---------------------------------------------------------------------------------------------
# Hostile folders and files: nothing blocks, nothing huge is decoded, nothing silently constant
# ---------------------------------------------------------------------------------------------
def _promptly(call, seconds: float = 20.0):
    """Run `call` in a daemon thread; fail (instead of hanging the suite) when it does not return in time."""
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for more than {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_named_pipes_sockets_devices_and_broken_links_are_never_opened(tmp_path):
    _save_pil(tmp_path / "ok.png", np.zeros((2, 2), np.uint8))
    os.mkfifo(tmp_path / "pipe")  # extension-less: the old scan opened it to look for DICM, and blocked
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    (tmp_path / "null.dcm").symlink_to(os.devnull)
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    expected = {
        "gone.png": "broken symbolic link",
        "loop.png": "cannot stat the file (Too many levels of symbolic links)",
        "null.dcm": "not a regular file (a character device)",
        "pipe": "not a regular file (a named pipe)",
        "pipe.png": "not a regular file (a named pipe)",
    }
    sock_dir = Path("/tmp") if len(str(tmp_path)) > 80 else tmp_path  # AF_UNIX paths are short
    sock_path = sock_dir / f"md-{os.getpid()}.sock"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(sock_path))
        if sock_dir == tmp_path:
            expected[sock_path.name] = "not a regular file (a socket)"
        found, ignored = _promptly(lambda: find_image_files(tmp_path))
        assert found == [tmp_path / "ok.png"]
        assert {path.name: reason for path, reason in ignored} == expected
        for name, reason in expected.items():
            with pytest.raises(UnreadableFile, match="^" + re.escape(f"{tmp_path / name}: {reason}")):
                _promptly(lambda: read_file(tmp_path / name))
        assert not _promptly(lambda: is_dicom_file(tmp_path / "pipe"))
        assert not _promptly(lambda: is_dicom_file(sock_path))
    finally:
        server.close()
        sock_path.unlink(missing_ok=True)


def test_a_folder_that_cannot_be_listed_is_reported(tmp_path, monkeypatch):
    _save_pil(tmp_path / "ok.png", np.zeros((2, 2), np.uint8))
    locked = tmp_path / "locked"
    locked.mkdir()
    _save_pil(locked / "hidden_from_us.png", np.zeros((2, 2), np.uint8))
    real_scandir = os.scandir

    def scandir(path):  # as for a folder without read permission (chmod 0 does not stop root)
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found, ignored = find_image_files(tmp_path)
    assert found == [tmp_path / "ok.png"]
    assert ignored == [(locked, "cannot list the folder (Permission denied)")]


def _png_header_only(width: int, height: int, mode_bytes: bytes = b"\x08\x00") -> bytes:
    """A tiny PNG that declares width × height 8-bit grey pixels and holds one row of compressed zeros."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">II", width, height) + mode_bytes + b"\x00\x00\x00"
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 8)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("width", "height", "match"),
    [
        (60000, 1, r"the PNG header declares 1×60000 pixels \(60,000 values in the file\); allowed: 1 to 16384 pixels per side"),
        (1, 60000, r"declares 60000×1 pixels"),
        (60000, 60000, r"PNG image too large: DecompressionBombError"),  # Pillow's own error, as a reason
        (10000, 10000, r"truncated or corrupt PNG"),  # past Pillow's warning level: no console warning
    ],
)
def test_declared_size_bombs_are_refused_before_decoding(tmp_path, recwarn, width, height, match):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(width, height))
    assert path.stat().st_size < 200
    with pytest.raises(UnreadableFile, match=match):
        read_file(path)
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]


def test_dicom_declared_size_bombs(tmp_path):
    ds = _dicom(np.zeros((2, 2), np.uint16))
    ds.Columns = MAX_SIDE + 1
    with pytest.raises(UnreadableFile, match=r"\(0028,0010\) Rows × \(0028,0011\) Columns.*declares 2×16385 pixels"):
        read_file(_write_dicom(tmp_path / "wide.dcm", ds))
    ds = _dicom(np.zeros((64, 64), np.uint16), NumberOfFrames=1_000_000)
    with pytest.raises(UnreadableFile, match=r"NumberOfFrames 1000000\).*\(4,096,000,000 values in the file\)"):
        read_file(_write_dicom(tmp_path / "frames.dcm", ds))
    ds = _dicom(np.zeros((2, 2), np.uint16), NumberOfFrames=-3)
    with pytest.raises(UnreadableFile, match=r"\(0028,0008\) NumberOfFrames -3: must be a whole number ≥ 1"):
        read_file(_write_dicom(tmp_path / "negative.dcm", ds))


def test_nifti_declared_size_bomb(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape((30000, 30000, 30000))
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\x00" * 4 + b"\x00" * 64))
    assert path.stat().st_size < 1000
    with pytest.raises(UnreadableFile, match=r"the NIfTI header declares 30000×30000×30000 pixels"):
        read_file(path)


@pytest.mark.parametrize(
    ("attrs", "match"),
    [
        (dict(RescaleSlope="nan", RescaleIntercept="0"), r"\(0028,1053\) RescaleSlope nan: must be a finite number"),
        (dict(RescaleSlope="inf", RescaleIntercept="0"), r"\(0028,1053\) RescaleSlope inf: must be a finite number"),
        (dict(RescaleSlope="1", RescaleIntercept="-inf"), r"\(0028,1052\) RescaleIntercept -inf: must be a finite"),
        (dict(RescaleSlope="1e999", RescaleIntercept="0"), r"\(0028,1053\) RescaleSlope 1e999: must be a finite"),
        (dict(WindowCenter="40", WindowWidth="NaN"), r"\(0028,1051\) WindowWidth NaN: must be a finite number"),
        (dict(RescaleSlope="0", RescaleIntercept="5"), r"\(0028,1053\) RescaleSlope 0 .* maps every stored value to 5"),
    ],
)
def test_dicom_non_finite_or_collapsing_scaling_is_refused(tmp_path, attrs, match):
    ds = _dicom(np.array([[0, 10, 20]], np.uint16))
    keywords = dict(RescaleSlope=0x00281053, RescaleIntercept=0x00281052, WindowCenter=0x00281050, WindowWidth=0x00281051)
    for keyword, value in attrs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns that these are no valid DS
            ds.add_new(keywords[keyword], "DS", value)  # as a file would hold it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that these are no valid DS when they are set
        path = _write_dicom(tmp_path / "bad.dcm", ds)
    with pytest.raises(UnreadableFile, match=match) as info:
        read_file(path)
    assert "Doe" not in str(info.value)


def test_float_images_without_a_finite_value_are_refused(tmp_path):
    with pytest.raises(UnreadableFile, match="floating-point image gives no finite pixel value"):
        read_file(_save_pil(tmp_path / "nan.tiff", np.full((2, 3), np.nan, np.float32)))
    with pytest.raises(UnreadableFile, match="NIfTI volume .* gives no finite pixel value"):
        read_file(_nifti(tmp_path / "nan.nii", np.full((4, 4, 2), np.nan, np.float32)))
    partly = np.array([[np.nan, 0.0, 2.0]], np.float32)  # a few NaN pixels are fine: they are clipped
    np.testing.assert_allclose(_one(_save_pil(tmp_path / "partly.tiff", partly))[0], [[0.0, 0.0, 1.0]])


@pytest.mark.parametrize(
    ("sop", "modality", "match"),
    [
        (SegmentationStorage, "SEG", r"a DICOM Segmentation \(label map\), not an image: \(0008,0016\) SOP Class UID 1\.2\.840\.10008\.5\.1\.4\.1\.1\.66\.4"),
        (SecondaryCaptureImageStorage, "SEG", r"a DICOM Segmentation \(label map\), not an image: \(0008,0060\) Modality SEG"),
        (SecondaryCaptureImageStorage, "RTSTRUCT", r"a DICOM RT Structure Set \(contours\), not an image"),
        ("1.2.840.10008.5.1.4.1.1.11.1", "PR", r"a DICOM Presentation State, not an image: \(0008,0016\)"),
        ("1.2.840.10008.5.1.4.1.1.88.59", "KO", r"a DICOM Key Object Selection document, not an image"),
    ],
)
def test_dicom_label_maps_and_other_non_images_are_refused(tmp_path, sop, modality, match):
    labels = np.zeros((4, 4), np.uint8)
    labels[1:3, 1:3] = 1
    ds = _dicom(labels, Modality=modality, SOPClassUID=sop)
    ds.file_meta.MediaStorageSOPClassUID = sop
    with pytest.raises(UnreadableFile, match=match):
        read_file(_write_dicom(tmp_path / "seg.dcm", ds))


def test_dicom_media_storage_sop_class_alone_identifies_a_segmentation(tmp_path):
    ds = _dicom(np.zeros((2, 2), np.uint8))
    ds.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    ds.save_as(tmp_path / "seg.dcm")  # not enforce_file_format: that would copy (0008,0016) into (0002,0002)
    assert pydicom.dcmread(tmp_path / "seg.dcm", force=True).file_meta.MediaStorageSOPClassUID == SegmentationStorage
    with pytest.raises(UnreadableFile, match=r"Segmentation.*\(0002,0002\) Media Storage SOP Class UID"):
        read_file(tmp_path / "seg.dcm")


def _palette_dicom(path: Path, little_endian: bool) -> Path:
    """An 8-bit PALETTE COLOR ultrasound with 16-bit LUTs whose entries are i·256 (as scanners write them),
    stored in Explicit VR Little or Big Endian: the OW LUT Data bytes follow the transfer syntax."""
    ds = _dicom(np.array([[0, 64], [128, 255]], np.uint8), "PALETTE COLOR", Modality="US")
    ramp = np.arange(256) * 256
    for colour, scale in (("Red", 1.0), ("Green", 0.5), ("Blue", 0.25)):
        data = (ramp * scale).astype("<u2" if little_endian else ">u2").tobytes()
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        ds.add_new(pydicom.datadict.tag_for_keyword(f"{colour}PaletteColorLookupTableData"), "OW", data)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian
    return _write_dicom(path, ds)


def test_big_endian_palette_colour_decodes_like_its_little_endian_twin(tmp_path):
    little = _one(_palette_dicom(tmp_path / "le.dcm", True))[0]
    big_path = _palette_dicom(tmp_path / "be.dcm", False)
    assert pydicom.dcmread(big_path).file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    big = _one(big_path)[0]
    np.testing.assert_array_equal(big, little)
    luma = 0.299 + 0.587 * 0.5 + 0.114 * 0.25
    np.testing.assert_allclose(little, np.array([[0, 64], [128, 255]]) * 256 * luma / 65535, atol=1e-6)
    assert big.max() > 0.5  # swapped LUT entries (i·256 read as i) made it almost black
