"""Tests for meddiff.export: each format written and read back, DICOM conformance and anonymity, grids, manifest."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from meddiff.data.readers import read_file
from meddiff.errors import ConfigError, DataError, RunError
from meddiff.export import (FORMATS, SUFFIX, Manifest, SyntheticInfo, dicom_modality, image_filename, make_grid,
                            save_png, write_image, write_nifti_stack)

INFO = SyntheticInfo(model_id="9f2c01ab", seed=123, class_name="ct/abnormal", sampler="ddim", steps=50, guidance=2.5)


def _image(seed: int = 0, h: int = 24, w: int = 20) -> np.ndarray:
    """(H, W) float32 spanning exactly 0..1 with >0.5 % of pixels at each end (so the NIfTI reader's
    percentile normalisation is the identity), random inside, non-square so that a transpose shows."""
    img = np.random.default_rng(seed).random((h, w)).astype(np.float32)
    img[:3] = 0.0
    img[-3:, : w // 2] = 1.0
    return img


def _write(tmp_path: Path, fmt: str, image: np.ndarray | None = None, info: SyntheticInfo = INFO) -> Path:
    path = tmp_path / image_filename(info.seed, fmt, info.class_name)
    return write_image(_image() if image is None else image, path, fmt, info)


# --- names and modality -------------------------------------------------------------------------------

def test_suffix_covers_every_format():
    assert set(SUFFIX) == set(FORMATS) == {"png", "png16", "dicom", "nifti"}
    assert SUFFIX["nifti"] == ".nii.gz" and SUFFIX["dicom"] == ".dcm"


@pytest.mark.parametrize("seed, fmt, class_name, expected", [
    (123, "png", None, "seed000123.png"),
    (123, "png16", None, "seed000123.png"),
    (0, "dicom", "ct/abnormal", "ct/abnormal/seed000000.dcm"),
    (1234567, "nifti", "mri", "mri/seed1234567.nii.gz"),
])
def test_image_filename(seed, fmt, class_name, expected):
    assert image_filename(seed, fmt, class_name) == expected


@pytest.mark.parametrize("class_name", ["../escape", "/abs", "ct//x", "ct/.hidden", "a\\b", "x\ny"])
def test_image_filename_refuses_class_names_that_leave_the_folder(class_name):
    with pytest.raises(ConfigError, match="cannot be used as an output folder"):
        image_filename(1, "png", class_name)


def test_image_filename_refuses_bad_seed_and_format():
    with pytest.raises(ConfigError, match=r"seed -1 cannot name a file: use a non-negative integer"):
        image_filename(-1, "png")
    with pytest.raises(ConfigError, match=r"output format 'jpg' is not supported: use one of png, png16, dicom, nifti"):
        image_filename(1, "jpg")


def test_model_id_must_not_be_a_path():
    with pytest.raises(ConfigError, match=r"model id '/home/me/run/model.safetensors' is not allowed"):
        SyntheticInfo("/home/me/run/model.safetensors", 1, None, "ddim", 10, 1.0)


@pytest.mark.parametrize("class_name, modality", [
    ("ct/abnormal", "CT"), ("CT", "CT"), ("ct_lung/nodule", "CT"),
    ("xray/pneumonia", "DX"), ("cxr", "DX"), ("chest/normal", "DX"), ("x-ray", "DX"),
    ("mri/t1", "MR"), ("mr", "MR"), ("MRI_flair", "MR"),
    ("us/liver", "US"), ("ultrasound", "US"), ("us_cardiac", "US"),
    ("histology", "OT"), ("usual", "OT"), ("abnormal/ct", "OT"), (None, "OT"), ("", "OT"),
])
def test_dicom_modality(class_name, modality):
    assert dicom_modality(class_name) == modality


# --- grids --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, rows, cols", [(1, 1, 1), (5, 1, 5), (8, 1, 8), (9, 3, 3), (10, 3, 4), (16, 4, 4), (17, 4, 5)])
def test_make_grid_shape(n, rows, cols):
    grid = make_grid(np.zeros((n, 6, 4), np.float32), pad=2)
    assert grid.dtype == np.uint8
    assert grid.shape == (rows * (6 + 2) + 2, cols * (4 + 2) + 2)


def test_make_grid_places_tiles_row_major_and_pads_white():
    images = np.stack([np.full((3, 5), k / 4, np.float32) for k in range(5)])
    grid = make_grid(images, ncols=2, pad=1)
    assert grid.shape == (3 * 4 + 1, 2 * 6 + 1)
    assert grid[1, 1] == 0 and grid[1, 7] == round(255 / 4)  # tiles 0 and 1 on the first row
    assert grid[5, 1] == round(255 / 2)  # tile 2 starts the second row
    assert grid[0].min() == 255 and grid[9, 7] == 255  # padding, and the empty sixth cell
    np.testing.assert_array_equal(make_grid(images[:1], pad=0), np.zeros((3, 5), np.uint8))


def test_make_grid_row_labels_add_a_left_margin_and_keep_the_height():
    images = np.ones((6, 12, 10), np.float32)  # white tiles: only the labels are dark
    plain = make_grid(images, ncols=3, pad=2)
    labelled = make_grid(images, ncols=3, pad=2, row_labels=["ct/normal", "us/abnormal"])
    assert labelled.shape[0] == plain.shape[0] and labelled.shape[1] > plain.shape[1]
    np.testing.assert_array_equal(labelled[:, -plain.shape[1]:], plain)
    margin = labelled[:, :-plain.shape[1]]
    assert margin[2:14].min() < 128 and margin[16:28].min() < 128  # a label level with each row
    with pytest.raises(ConfigError, match=r"grid row_labels: 1 labels for 2 rows of 3 tiles"):
        make_grid(images, ncols=3, row_labels=["ct/normal"])


def test_make_grid_refuses_bad_input():
    with pytest.raises(DataError, match=r"grid images has shape \(4, 4\).*expected a non-empty \(N, H, W\)"):
        make_grid(np.zeros((4, 4), np.float32))
    with pytest.raises(ConfigError, match="ncols must be ≥ 1"):
        make_grid(np.zeros((2, 4, 4), np.float32), ncols=0)


def test_save_png_writes_uint8_and_refuses_other_dtypes(tmp_path):
    grid = make_grid(np.stack([_image(k) for k in range(3)]))
    path = save_png(grid, tmp_path / "grid.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)
    with pytest.raises(DataError, match=r"expected \(H, W\) or \(H, W, 3\) uint8"):
        save_png(grid.astype(np.float32), tmp_path / "bad.png")


# --- PNG ----------------------------------------------------------------------------------------------

def test_png_round_trip_8_bit(tmp_path):
    image = _image()
    path = _write(tmp_path, "png", image)
    with Image.open(path) as img:
        assert img.mode == "L"
        assert "Synthetic image generated by meddiff" in img.text["Description"]
        assert json.loads(img.text["meddiff"])["seed"] == 123
        np.testing.assert_array_equal(np.asarray(img), np.round(image * 255).astype(np.uint8))
    [(back, meta)] = read_file(path)
    assert meta.bit_depth == 8
    assert np.abs(back - image).max() <= 0.5 / 255 + 1e-6


def test_png16_round_trip_is_16_bit(tmp_path):
    image = _image()
    path = _write(tmp_path, "png16", image)
    assert path.read_bytes()[24] == 16  # IHDR bit depth: a real 16-bit greyscale PNG
    with Image.open(path) as img:
        assert img.mode.startswith("I;16") or img.mode == "I"
        stored = np.asarray(img)
    np.testing.assert_array_equal(stored, np.round(image * 65535))
    [(back, meta)] = read_file(path)
    assert meta.bit_depth == 16
    assert np.abs(back - image).max() <= 0.5 / 65535 + 1e-7


# --- DICOM --------------------------------------------------------------------------------------------

def test_dicom_round_trip_is_exact_even_without_full_range(tmp_path):
    image = 0.2 + 0.4 * _image()  # 0.2..0.6: a min-max reader would stretch it; the stored window must not
    [(back, meta)] = read_file(_write(tmp_path, "dicom", image))
    assert (meta.format, meta.modality, meta.bit_depth) == ("dicom", "CT", 16)
    assert back.shape == image.shape
    assert np.abs(back - image).max() <= 1 / 65535


def test_dicom_is_a_synthetic_secondary_capture(tmp_path):
    path = _write(tmp_path, "dicom")
    raw = path.read_bytes()
    assert raw[:128] == b"\0" * 128 and raw[128:132] == b"DICM"
    ds = pydicom.dcmread(path)
    meta = ds.file_meta
    assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert meta.ImplementationClassUID
    assert ds.ConversionType == "SYN" and list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.BurnedInAnnotation == "NO" and ds.Manufacturer == "meddiff" and ds.Modality == "CT"
    assert (ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (
        "MONOCHROME2", 16, 16, 0)
    np.testing.assert_array_equal(ds.pixel_array, np.round(_image() * 65535))
    for text in (ds.ImageComments, ds.DerivationDescription):
        assert "synthetic" in text.lower() and "seed=123" in text and "model=9f2c01ab" in text
        assert "sampler=ddim" in text and "steps=50" in text and "class=ct/abnormal" in text


def test_dicom_holds_no_patient_data(tmp_path):
    ds = pydicom.dcmread(_write(tmp_path, "dicom"))
    keywords = {elem.keyword for elem in ds.iterall()}
    for required in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                     "ReferringPhysicianName", "StudyID", "AccessionNumber", "PatientOrientation"):
        assert required in keywords, required  # Type 2: present...
    for elem in ds.iterall():
        if elem.keyword.startswith(("Patient", "Referring", "Institution", "Operator", "Physician")) or \
                elem.keyword in ("StudyDate", "StudyTime", "StudyID", "AccessionNumber", "OtherPatientIDs"):
            assert elem.value in ("", None) or len(str(elem.value)) == 0, elem  # ...and empty
        assert elem.VR not in ("DA", "DT", "TM") or not elem.value, elem  # no date or time at all


def test_dicom_uids_are_fresh_for_every_file(tmp_path):
    a = pydicom.dcmread(write_image(_image(), tmp_path / "a.dcm", "dicom", INFO))
    b = pydicom.dcmread(write_image(_image(), tmp_path / "b.dcm", "dicom", INFO))
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        assert a[keyword].value != b[keyword].value
    assert len({a.SOPInstanceUID, a.StudyInstanceUID, a.SeriesInstanceUID}) == 3


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed")
@pytest.mark.parametrize("class_name", ["ct/abnormal", "xray/pneumonia", "mri", None])
def test_dicom_passes_dciodvfy(tmp_path, class_name):
    info = SyntheticInfo("9f2c01ab", 5, class_name, "ddim", 50, 1.0)
    path = write_image(_image(), tmp_path / "x.dcm", "dicom", info)
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert "SCImage" in output  # it recognised the IOD
    assert [line for line in output.splitlines() if line.startswith("Error")] == [], output


# --- NIfTI --------------------------------------------------------------------------------------------

def test_nifti_round_trip_keeps_orientation(tmp_path):
    image = _image()
    path = _write(tmp_path, "nifti", image)
    [(back, meta)] = read_file(path, nifti_axis="axial")
    assert meta.format == "nifti"
    assert back.shape == image.shape
    assert np.abs(back - image).max() <= 1 / 65535


def test_nifti_header(tmp_path):
    img = nib.load(_write(tmp_path, "nifti"))
    assert img.shape == (20, 24, 1)  # (W, H, 1): see export._nifti_axes
    assert img.get_data_dtype() == np.uint16
    assert img.dataobj.slope == pytest.approx(1 / 65535) and img.dataobj.inter == 0
    assert img.header.get_zooms() == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(img.affine, np.eye(4))
    assert img.header["descrip"].item().decode().startswith("synthetic meddiff seed=123")
    [ext] = img.header.extensions
    assert json.loads(ext.get_content())["slices"][0]["model_id"] == "9f2c01ab"
    np.testing.assert_allclose(img.get_fdata()[:, :, 0], np.rot90(_image(), -1), atol=0.5 / 65535 + 1e-7)


def test_nifti_stack_reads_back_slice_by_slice(tmp_path):
    images = np.stack([_image(k) for k in range(3)])
    infos = [SyntheticInfo("9f2c01ab", s, "mri", "ddim", 20, 1.0) for s in (4, 5, 6)]
    path = write_nifti_stack(images, tmp_path / "stack.nii.gz", infos)
    assert nib.load(path).shape == (20, 24, 3)
    back = read_file(path, nifti_axis="axial")
    assert [meta.index for _, meta in back] == [0, 1, 2]
    for (slice_, _), image in zip(back, images):
        assert np.abs(slice_ - image).max() <= 1 / 65535
    with pytest.raises(DataError, match=r"3 images but 2 SyntheticInfo: expected one per image"):
        write_nifti_stack(images, tmp_path / "bad.nii.gz", infos[:2])


# --- write_image contract -----------------------------------------------------------------------------

def test_write_image_refuses_bad_input(tmp_path):
    with pytest.raises(ConfigError, match=r"output format 'jpeg' is not supported"):
        write_image(_image(), tmp_path / "x.jpg", "jpeg", INFO)
    with pytest.raises(DataError, match=r"image has shape \(1, 24, 20\).*expected a non-empty \(H, W\) float"):
        write_image(_image()[None], tmp_path / "x.png", "png", INFO)
    bad = _image()
    bad[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN or infinite"):
        write_image(bad, tmp_path / "x.png", "png", INFO)
    assert list(tmp_path.iterdir()) == []


def test_write_image_clips_out_of_range_values(tmp_path):
    image = np.array([[-0.5, 0.5], [1.0, 7.0]], np.float32)
    with Image.open(write_image(image, tmp_path / "x.png", "png", INFO)) as img:
        np.testing.assert_array_equal(np.asarray(img), [[0, 128], [255, 255]])


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path, fmt, monkeypatch):
    path = _write(tmp_path, fmt)
    before = path.read_bytes()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)  # every format fails after its bytes went to the temporary file
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path, fmt, _image(seed=9))
    assert path.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


# --- manifest -----------------------------------------------------------------------------------------

def _info(seed: int) -> SyntheticInfo:
    return SyntheticInfo("9f2c01ab", seed, "xray/pneumonia", "dpm", 25, 3.0)


def _add(folder: Path, manifest: Manifest, seed: int, fmt: str = "png") -> str:
    name = image_filename(seed, fmt, "xray/pneumonia")
    write_image(_image(seed), folder / name, fmt, _info(seed))
    manifest.add(name, _info(seed), fmt)
    return name


def test_manifest_rows_and_header_once(tmp_path):
    names = [_add(tmp_path, Manifest(tmp_path), seed) for seed in (1, 2)]  # two instances, one header
    lines = (tmp_path / "manifest.csv").read_text().splitlines()
    assert lines[0] == "file,class,seed,sampler,steps,guidance,model_id,format,mask"
    assert lines[1] == "xray/pneumonia/seed000001.png,xray/pneumonia,1,dpm,25,3.0,9f2c01ab,png,"
    assert len(lines) == 3
    assert Manifest(tmp_path).done() == set(names)
    assert Manifest(tmp_path).rows()[1]["seed"] == "2"


def test_an_older_manifest_without_the_mask_column_is_read_and_continued(tmp_path):
    old = "file,class,seed,sampler,steps,guidance,model_id,format\na.png,,1,ddim,20,1.0,m1,png\n"
    (tmp_path / "manifest.csv").write_text(old)
    (tmp_path / "a.png").write_bytes(b"x")
    manifest = Manifest(tmp_path)
    assert manifest.done() == {"a.png"} and manifest.rows()[0]["mask"] == ""
    manifest.add("b.png", _info(2), "png")
    assert (tmp_path / "manifest.csv").read_text().splitlines()[2].count(",") == 7  # its own format kept
    with pytest.raises(RunError, match="without a mask column"):
        manifest.add("images/c.png", dataclasses.replace(_info(3), mask="masks/c.png"), "png")


def test_manifest_resume_needs_both_row_and_file(tmp_path):
    manifest = Manifest(tmp_path)
    listed_then_deleted = _add(tmp_path, manifest, 1)
    kept = _add(tmp_path, manifest, 2)
    (tmp_path / listed_then_deleted).unlink()
    unlisted = image_filename(3, "png", "xray/pneumonia")  # written, but the run stopped before its row
    write_image(_image(3), tmp_path / unlisted, "png", _info(3))
    assert Manifest(tmp_path).done() == {kept}


def test_manifest_ignores_and_cuts_a_row_cut_off_by_a_crash(tmp_path):
    manifest = Manifest(tmp_path)
    first = _add(tmp_path, manifest, 1)
    second = _add(tmp_path, manifest, 2)
    csv_path = tmp_path / "manifest.csv"
    csv_path.write_bytes(csv_path.read_bytes()[:-10])  # the last row lost its tail (and newline)
    assert Manifest(tmp_path).done() == {first}
    resumed = Manifest(tmp_path)
    resumed.add(second, _info(2), "png")
    assert resumed.done() == {first, second}
    assert len(csv_path.read_text().splitlines()) == 3


def test_manifest_refuses_a_foreign_csv_and_bad_entries(tmp_path):
    (tmp_path / "manifest.csv").write_text("name,score\na,1\n")
    with pytest.raises(RunError, match=r"manifest.csv: header is 'name,score', expected 'file,class,seed"):
        Manifest(tmp_path).done()
    other = tmp_path / "other"
    with pytest.raises(ConfigError, match=r"manifest entry '../x.png' must be a relative path inside"):
        Manifest(other).add("../x.png", _info(1), "png")
    with pytest.raises(ConfigError, match=r"output format 'tiff' is not supported"):
        Manifest(other).add("x.tiff", _info(1), "tiff")
    assert Manifest(other).done() == set()


def test_manifest_keep_rows_writes_the_rows_of_the_kept_files_as_they_are(tmp_path):
    names = [_add(tmp_path, Manifest(tmp_path), seed) for seed in (1, 2, 3)]
    share = tmp_path / "share"
    share.mkdir()
    assert Manifest(tmp_path).keep_rows([names[0], names[2]], share) == 2
    lines = (tmp_path / "manifest.csv").read_text().splitlines()
    assert (share / "manifest.csv").read_text().splitlines() == [lines[0], lines[1], lines[3]]
    assert Manifest(tmp_path / "none").keep_rows(names, share / "x") == 0   # no manifest: nothing written
    (tmp_path / "manifest.csv").write_text("name,score\na,1\n")
    with pytest.raises(RunError, match=r"header is 'name,score', without a 'file' column"):
        Manifest(tmp_path).keep_rows(names, share)


def test_synthetic_info_takes_numpy_scalars_and_refuses_a_float_seed(tmp_path):
    info = SyntheticInfo("9f2c01ab", np.int64(7), None, "ddim", np.int32(10), np.float32(1.5))
    assert type(info.seed) is int and type(info.steps) is int and type(info.guidance) is float
    with Image.open(write_image(_image(), tmp_path / "x.png", "png", info)) as img:
        assert json.loads(img.text["meddiff"])["seed"] == 7
    with pytest.raises(ConfigError, match=r"seed=1.5.*seed and steps must be integers"):
        SyntheticInfo("9f2c01ab", 1.5, None, "ddim", 10, 1.0)


def test_class_names_from_real_folders_are_kept(tmp_path):
    name = "covid-19, mild (v2)/Lungs & more"
    info = SyntheticInfo("9f2c01ab", 3, name, "ddim", 10, 1.0)
    path = write_image(_image(), tmp_path / image_filename(3, "dicom", name), "dicom", info)
    assert path == tmp_path / "covid-19, mild (v2)" / "Lungs & more" / "seed000003.dcm"
    assert f"class={name}" in pydicom.dcmread(path).ImageComments
    manifest = Manifest(tmp_path)
    manifest.add(image_filename(3, "dicom", name), info, "dicom")
    assert manifest.rows()[0]["class"] == name and manifest.done() == {image_filename(3, "dicom", name)}


def test_a_label_map_tile_shows_the_lesion_white_and_other_structures_grey() -> None:
    from meddiff.export import label_map_tile

    labels = np.array([[0, 1, 2], [3, 2, 0]])
    tile = label_map_tile(labels, lesion=1)
    assert tile[0, 0] == 0.0 and tile[0, 1] == 1.0  # background black, the lesion white
    assert 0.25 <= tile[0, 2] < 1.0 and tile[0, 2] == tile[1, 1] != tile[1, 0]  # a grey level per value
    assert label_map_tile(np.array([[0, 5]]))[0, 1] == 1.0  # a map of one value: that value white
    assert label_map_tile(labels).max() < 1.0  # several values, none named lesion: all grey
