"""Tests for meddiff.data.dataset and meddiff.data.cache: folders → labelled images, skipping, specs, cache, split."""
from __future__ import annotations

import os
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import meddiff.data.readers as readers
from meddiff.data import cache, dataset
from meddiff.data.dataset import (ImageSet, contiguous_runs, export_builtin, load_data, parse_spec, skipped_listing,
                                  split, to_square)
from meddiff.errors import ConfigError, DataError


def test_class_folders_give_labels_and_sorted_class_names(image_folder: Path) -> None:
    data = load_data(str(image_folder), 32)
    assert data.class_names == ("a", "b")
    assert data.images.shape == (16, 1, 32, 32) and data.images.dtype == torch.float32
    assert float(data.images.min()) >= -1 and float(data.images.max()) <= 1
    assert float(data.images.min()) < -0.8 and float(data.images.max()) > 0.8  # really spans the range
    assert data.labels.tolist() == [0] * 8 + [1] * 8
    assert data.summary["classes"] == {"a": 8, "b": 8}
    assert data.summary["formats"] == {"png": 16}
    assert data.skipped == []
    assert len(np.unique(data.groups)) == 16  # one file, one group


def test_pixel_values_survive_loading(tmp_path: Path) -> None:
    img = np.zeros((32, 32), np.uint8)
    img[:, 16:] = 255
    img[0, 0] = 128
    Image.fromarray(img).save(tmp_path / "x.png")
    data = load_data(str(tmp_path), 32)
    x = data.images[0, 0]
    assert float(x[5, 5]) == -1.0 and float(x[5, 20]) == 1.0
    assert float(x[0, 0]) == pytest.approx(128 / 255 * 2 - 1, abs=1e-4)


def test_flat_folder_is_one_class(tmp_path: Path, png_writer) -> None:
    png_writer(tmp_path, 3)
    data = load_data(str(tmp_path), 16)
    assert data.class_names == ("all",)
    assert data.images.shape == (3, 1, 16, 16)
    assert data.labels.tolist() == [0, 0, 0]


def test_label_depth_two_names_classes_by_two_levels(tmp_path: Path, png_writer) -> None:
    png_writer(tmp_path / "xray" / "normal", 2)
    png_writer(tmp_path / "xray" / "pneumonia", 3, seed=1)
    data = load_data(str(tmp_path), 32, label_depth=2)
    assert data.class_names == ("xray/normal", "xray/pneumonia")
    assert data.summary["classes"] == {"xray/normal": 2, "xray/pneumonia": 3}


def test_corrupt_and_misplaced_files_are_skipped_with_path_and_reason(tmp_path: Path, png_writer) -> None:
    png_writer(tmp_path / "a", 3)
    png_writer(tmp_path / "b", 2, seed=1)
    broken = tmp_path / "a" / "broken.png"
    broken.write_bytes(b"this is not a png")
    stray = tmp_path / "loose.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(stray)
    (tmp_path / "b" / "notes.txt").write_text("hello")
    data = load_data(str(tmp_path), 32)
    assert len(data) == 5 and data.summary["classes"] == {"a": 3, "b": 2}
    reasons = dict(data.skipped)
    assert set(reasons) == {str(broken), str(stray), str(tmp_path / "b" / "notes.txt")}
    assert "PNG" in reasons[str(broken)]
    assert "not inside a class folder" in reasons[str(stray)]
    assert "not an image format" in reasons[str(tmp_path / "b" / "notes.txt")]
    assert data.summary["skipped"] == 3


def test_summary_holds_no_file_names(tmp_path: Path, png_writer) -> None:
    png_writer(tmp_path, 2)
    data = load_data(str(tmp_path), 16)
    assert set(data.summary) == {"images", "classes", "formats", "source_shapes", "size", "files", "skipped",
                                 "upsampled"}
    assert "000.png" not in repr(data.summary) and "001.png" not in repr(data.summary)


def test_no_readable_images_is_a_data_error_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=rf"--data '{tmp_path}': no readable images found \(skipped 1: "
                                        rf"{tmp_path}/x.png: "):
        load_data(str(tmp_path), 32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=rf"--data '{empty}': no readable images found$"):
        load_data(str(empty), 32, cache_dir=tmp_path / "cache")


def test_missing_folder_and_plain_file_are_data_errors(tmp_path: Path, png_writer) -> None:
    with pytest.raises(DataError, match=r"--data '.*nowhere': no such file or folder"):
        load_data(str(tmp_path / "nowhere"), 32)
    (path,) = png_writer(tmp_path, 1)
    with pytest.raises(DataError, match=r"not a folder \(give a folder of images, or builtin:…\)"):
        load_data(str(path), 32)


@pytest.mark.parametrize("spec, match", [
    ("builtin:cats", r"--data 'builtin:cats': unknown built-in data set 'cats'; choose from builtin:mni-mri"),
    ("builtin:phantoms?n=0", r"n='0' must be a whole number from 1 to 1000000"),
    ("builtin:phantoms?n=ten", r"n='ten' must be a whole number from 1 to 1000000"),
    ("builtin:phantoms?n=-3", r"n='-3' must be a whole number from 1 to 1000000"),
    ("builtin:phantoms?n=", r"n='' must be a whole number"),
    ("builtin:phantoms?n=1e12", r"--data 'builtin:phantoms\?n=1e12': n='1e12' must be a whole number from 1 to"),
    ("builtin:phantoms?n=1000001", r"n='1000001' must be a whole number from 1 to 1000000"),
    ("builtin:phantoms?n=nan", r"n='nan' must be a whole number"),
    ("builtin:phantoms?n=²", r"n='²' must be a whole number"),
    ("builtin:ct?size=100000", r"size='100000' must be a whole number from 32 to 512"),
    ("builtin:ct?seed=99999999999999999999", r"seed='99999999999999999999' must be a whole number from 0 to "
                                             r"9223372036854775807"),
    ("builtin:ct?count=3", r"unknown parameter\(s\) count; allowed: n, size, seed"),
    ("builtin:ct?n", r"--data 'builtin:ct\?n': malformed parameters"),
])
def test_builtin_spec_errors(spec: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        parse_spec(spec)


def test_errors_name_the_flag_the_spec_came_from(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^--real 'builtin:cats': unknown built-in data set"):
        parse_spec("builtin:cats", flag="--real")
    with pytest.raises(DataError, match=r"^--train 'builtin:xray\?n=2&size=16': size='16' must be a whole number from 32"):
        load_data("builtin:xray?n=2&size=16", 32, flag="--train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"^--fake '.*empty': no readable images found"):
        load_data(str(tmp_path / "empty"), 32, flag="--fake")


def test_spec_parsing() -> None:
    assert parse_spec("builtin:phantoms?n=200&seed=3") == ("builtin", "phantoms", {"n": "200", "seed": "3"})
    assert parse_spec("builtin:mni-mri") == ("builtin", "mni-mri", {})
    assert parse_spec("some/folder") == ("folder", "some/folder", {})


def test_phantom_render_size_is_checked() -> None:
    with pytest.raises(DataError, match=r"size='16' must be a whole number from 32 to 512"):
        load_data("builtin:xray?n=2&size=16", 32)
    assert parse_spec("builtin:ct?seed=0")[2] == {"seed": "0"}


def test_memory_is_estimated_before_rendering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataset, "available_memory", lambda device: 2**30)
    monkeypatch.setattr(dataset, "render_phantoms", _must_not_render)
    # the whole set in memory (evaluation) is refused before rendering; so is an uncached set
    with pytest.raises(DataError, match=r"--data 'builtin:ct\?n=100000': 100000 images need about 2\.3 GiB of "
                                        r"memory and 1\.0 GiB are available"):
        load_data("builtin:ct?n=100000", 64, cache_dir=tmp_path / "cache", whole=True)
    with pytest.raises(DataError, match=r"100000 images need about 0\.8 GiB of memory and 0\.5 GiB"):
        monkeypatch.setattr(dataset, "available_memory", lambda device: 2**29)
        load_data("builtin:ct?n=100000", 64)
    assert not (tmp_path / "cache").exists()


def test_a_cached_set_is_read_whole_only_when_memory_allows(tmp_path: Path, png_writer,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    png_writer(tmp_path / "data", 4)
    data = load_data(str(tmp_path / "data"), 16, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(dataset, "available_memory", lambda device: 100)
    assert data.take([0]).shape == (1, 1, 16, 16)  # a batch needs no such check
    with pytest.raises(DataError, match=r"the data set: 4 images need about"):
        data.images


def _must_not_render(*_args: object, **_kw: object) -> None:
    raise AssertionError("rendered although the memory estimate should have refused")


@pytest.mark.parametrize("change, match", [
    (dict(n=0), r"--n 0: must be a whole number from 1 to 1000000"),
    (dict(size=600), r"--size 600: must be a whole number from 32 to 512"),
    (dict(seed=-1), r"--seed -1: must be a whole number from 0 to"),
])
def test_export_builtin_checks_its_numbers(tmp_path: Path, change: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        export_builtin("builtin:ct", tmp_path / "out", **{"n": 2, "size": 32, **change})
    assert not (tmp_path / "out").exists()


def test_second_load_hits_the_cache_and_a_changed_file_invalidates_it(tmp_path: Path, png_writer,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache_dir = tmp_path / "data", tmp_path / "cache"
    paths = png_writer(root / "a", 3) + png_writer(root / "b", 2, seed=1)
    first = load_data(str(root), 32, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("*.npy"))) == 1 and len(list(cache_dir.glob("*.json"))) == 1

    real_read = readers.read_file

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("the cache should have answered")
    monkeypatch.setattr(readers, "read_file", refuse)
    second = load_data(str(root), 32, cache_dir=cache_dir)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.class_names == first.class_names and second.summary == first.summary

    # a different size is another entry, not a stale hit
    with pytest.raises(AssertionError, match="the cache should have answered"):
        load_data(str(root), 16, cache_dir=cache_dir)

    monkeypatch.setattr(readers, "read_file", real_read)
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(paths[0])
    st = paths[0].stat()
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = load_data(str(root), 32, cache_dir=cache_dir)
    assert float(third.images[0].min()) == 1.0
    assert torch.equal(third.images[1:], first.images[1:])


def test_a_damaged_cache_entry_is_rebuilt(tmp_path: Path, png_writer) -> None:
    root, cache_dir = tmp_path / "data", tmp_path / "cache"
    png_writer(root, 2)
    first = load_data(str(root), 32, cache_dir=cache_dir)
    (meta,) = cache_dir.glob("*.json")
    meta.write_text("{not json")
    again = load_data(str(root), 32, cache_dir=cache_dir)
    assert torch.equal(first.images, again.images)


def test_uint16_storage_round_trip() -> None:
    x = np.linspace(0, 1, 1000, dtype=np.float32).reshape(10, 10, 10)
    back = cache.from_uint16(cache.to_uint16(x))
    assert back.dtype == np.float32 and np.abs(back - x).max() <= 0.5 / 65535 + 1e-7
    assert cache.to_uint16(np.array([-0.5, 1.5])).tolist() == [0, 65535]
    assert cache.cache_key("a", 1) == cache.cache_key("a", 1) != cache.cache_key("a", 2)


# ---------------------------------------------------------------- split

def _set(groups: list[int]) -> ImageSet:
    n = len(groups)
    return ImageSet(torch.zeros(n, 1, 16, 16), torch.zeros(n, dtype=torch.long), ("all",), np.asarray(groups))


def test_patient_subfolders_stay_on_one_side_of_the_split(tmp_path: Path, png_writer) -> None:
    for c in ("a", "b"):
        for p in range(3):
            png_writer(tmp_path / c / f"patient{p}", 3, seed=p)
    data = load_data(str(tmp_path), 16)
    assert len(data) == 18 and len(np.unique(data.groups)) == 6
    for seed in range(5):
        train_idx, val_idx = split(data, 0.3, seed)
        assert len(val_idx) > 0 and len(train_idx) > 0
        assert set(data.groups[train_idx]).isdisjoint(data.groups[val_idx])
        assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(18))


def test_split_is_deterministic_in_the_seed() -> None:
    data = _set(list(range(20)))
    a, b = split(data, 0.25, seed=1), split(data, 0.25, seed=1)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert len(a[1]) == 5
    others = [split(data, 0.25, seed=s)[1].tolist() for s in range(2, 6)]
    assert any(o != a[1].tolist() for o in others)


@pytest.mark.parametrize("groups, fraction, n_train", [
    ([0, 1], 0.49, 1),           # two groups: one each side
    ([0, 0, 0], 0.4, 3),         # one group: nothing held out
    ([0, 1, 2, 3], 0.0, 4),      # no validation asked
    (list(range(10)), 0.01, 9),  # tiny fraction: still one group held out
])
def test_split_never_empties_train(groups: list[int], fraction: float, n_train: int) -> None:
    train_idx, val_idx = split(_set(groups), fraction, seed=0)
    assert len(train_idx) == n_train and len(val_idx) == len(groups) - n_train


def test_contiguous_runs_cut_consecutive_images_only_where_the_group_changes() -> None:
    np.testing.assert_array_equal(contiguous_runs(np.arange(20), 4), np.repeat(np.arange(4), 5))
    groups = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])            # a patient or a volume is never cut
    runs = contiguous_runs(groups, 3)
    np.testing.assert_array_equal(runs, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    assert all(len(set(runs[groups == g])) == 1 for g in np.unique(groups))


def test_a_contiguous_split_holds_out_runs_of_consecutive_images() -> None:
    data = _set(list(range(100)))                                 # a flat folder: every slice its own group
    _, single = split(data, 0.2, seed=0)
    train, runs = split(data, 0.2, seed=0, by="contiguous")
    assert len(runs) == 20 and np.count_nonzero(np.diff(runs) > 1) == 1   # two runs of 10 consecutive slices
    assert np.count_nonzero(np.diff(single) > 1) > 5                      # single slices scattered over the set
    # a guard band: no training slice within a quarter of a run (here 2 slices) of a held-out one
    gap = np.abs(train[:, None] - runs[None, :]).min()
    assert list(runs[[0, -1]]) == [0, 89]  # the runs 0-9 and 80-89: the first has no slice before it
    assert gap == 3 and len(train) == 100 - 20 - 3 * 2
    assert not set(train) & set(runs)
    with pytest.raises(ConfigError, match=r"split by 'random'; allowed: group, contiguous"):
        split(data, 0.2, seed=0, by="random")


def test_the_guard_band_never_takes_the_last_training_images() -> None:
    train, held = split(_set(list(range(4))), 0.5, seed=0, by="contiguous")   # runs of 1: the guard would take all
    assert len(train) and len(held) and len(train) + len(held) == 4


# ---------------------------------------------------------------- to_square

def test_to_square_pads_keeping_aspect() -> None:
    img = np.ones((8, 16), np.float32)
    sq = to_square(img, 16)
    assert sq.shape == (16, 16) and sq.dtype == np.float32
    assert np.all(sq[4:12] == 1) and np.all(sq[:4] == 0) and np.all(sq[12:] == 0)


def test_to_square_crops_the_centre() -> None:
    img = np.zeros((8, 16), np.float32)
    img[:, 4:12] = 1.0
    sq = to_square(img, 8, crop=True)
    assert sq.shape == (8, 8) and np.all(sq == 1)


def test_to_square_resizes_into_unit_range() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((40, 30)).astype(np.float32)
    sq = to_square(img, 16)
    assert sq.shape == (16, 16) and sq.min() >= 0 and sq.max() <= 1
    up = to_square(np.eye(8, dtype=np.float32), 32)
    assert up.shape == (32, 32) and up.min() >= 0 and up.max() <= 1


# ---------------------------------------------------------------- builtin export

def test_export_builtin_writes_class_folders(tmp_path: Path) -> None:
    pytest.importorskip("meddiff.data.phantoms")
    counts = export_builtin("builtin:xray", tmp_path, n=4, size=32, seed=0)
    assert counts == {"xray/normal": 2, "xray/abnormal": 2}
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert len(files) == 4 and all(f.startswith(("xray/normal/", "xray/abnormal/")) for f in files)
    assert not list(tmp_path.rglob("*.tmp"))
    with Image.open(tmp_path / files[0]) as im:
        assert im.size == (32, 32) and im.mode == "L"
    data = load_data(str(tmp_path), 32, label_depth=2)
    assert data.class_names == ("xray/abnormal", "xray/normal")


def test_export_builtin_refuses_folders_and_inline_parameters(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'some/folder': data export takes a built-in data set"):
        export_builtin("some/folder", tmp_path, n=2, size=32)
    with pytest.raises(DataError, match=r"give --n, --size and --seed as flags"):
        export_builtin("builtin:xray?n=3", tmp_path, n=2, size=32)


def _fail_after(seconds: int):
    """Make a blocked call fail the test (SIGALRM) instead of hanging the suite; cancel with signal.alarm(0)."""
    def expire(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"blocked for more than {seconds} s")
    signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not hasattr(signal, "SIGALRM"), reason="POSIX only")
def test_hostile_files_are_skipped_counted_and_listed(tmp_path: Path, png_writer, recwarn) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage, generate_uid

    root = tmp_path / "data"
    png_writer(root / "a", 3)
    os.mkfifo(root / "a" / "IM0001")  # a named pipe without extension: opening it to look for DICM blocks
    ihdr = struct.pack(">II", 60000, 1) + b"\x08\x00\x00\x00\x00"  # 1×60000 px: a 60000² square once padded
    chunks = [(b"IHDR", ihdr), (b"IDAT", zlib.compress(b"\x00" * 8)), (b"IEND", b"")]
    (root / "a" / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d)) for k, d in chunks))
    seg = Dataset()
    seg.file_meta = FileMetaDataset()
    seg.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    seg.SOPClassUID, seg.SOPInstanceUID, seg.Modality = SegmentationStorage, generate_uid(), "SEG"
    seg.set_pixel_data(np.eye(8, dtype=np.uint8), "MONOCHROME2", 8)
    seg.save_as(root / "a" / "labels.dcm", enforce_file_format=True)
    _fail_after(30)
    try:
        data = load_data(str(root), 16, cache_dir=tmp_path / "cache")
    finally:
        signal.alarm(0)
    assert len(data) == 3 and data.summary["files"] == 6 and data.summary["skipped"] == 3
    reasons = {Path(p).name: r for p, r in data.skipped}
    assert reasons["IM0001"] == "not a regular file (a named pipe)"
    assert reasons["bomb.png"].startswith("the PNG header declares 1×60000 pixels")
    assert reasons["labels.dcm"].startswith("a DICOM Segmentation (label map), not an image")
    listing = skipped_listing(data, str(root))
    assert listing.splitlines() == [f"a/{name}: {reasons[name]}" for name in ("IM0001", "bomb.png", "labels.dcm")]
    assert str(tmp_path) not in listing
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]


def test_skipped_listing_is_empty_without_skipped_files_and_keeps_foreign_paths(image_folder: Path) -> None:
    data = load_data(str(image_folder), 16)
    assert skipped_listing(data, str(image_folder)) == ""
    data.skipped = [("/elsewhere/x.png", "odd\nname")]
    assert skipped_listing(data, str(image_folder)) == "/elsewhere/x.png: odd\\nname\n"
