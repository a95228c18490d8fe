"""Images with their label maps (issue 21): data with masks, mask-conditioned training and sampling into
images/ + masks/ pairs, and lesion inpainting that leaves every pixel outside the region as it was."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meddiff.errors import ConfigError, DataError, RunError


def _quiet(_line: str) -> None:
    pass


def write_pairs(root: Path, n: int = 8, size: int = 32) -> None:
    """n images with a bright square and its map (label 1 on it, label 2 on a corner patch of every other one)."""
    for sub in ("images/a", "masks/a"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = (rng.random((size, size)) * 40).astype(np.uint8)
        top, left = rng.integers(2, size // 2, 2)
        img[top:top + 10, left:left + 10] = 220
        lab = np.zeros((size, size), np.uint8)
        lab[top:top + 10, left:left + 10] = 1
        if i % 2:
            lab[:4, :4] = 2
        Image.fromarray(img).save(root / "images" / "a" / f"{i:03d}.png")
        Image.fromarray(lab).save(root / "masks" / "a" / f"{i:03d}.png")


# ---------------------------------------------------------------- data

def test_phantom_maps_mark_the_lesions_of_abnormal_images_only(tmp_path: Path) -> None:
    from meddiff.data.dataset import load_data

    data = load_data("builtin:phantoms?n=16&masks=1", 32)
    assert data.has_masks and data.mask_values == (1,)
    maps = data.take_masks(range(16))[:, 0]
    abnormal = torch.tensor(["abnormal" in data.class_names[k] for k in data.labels])
    assert (maps.flatten(1).amax(1) > 0).tolist() == abnormal.tolist()
    cached = load_data("builtin:phantoms?n=16&masks=1", 32, cache_dir=tmp_path)
    again = load_data("builtin:phantoms?n=16&masks=1", 32, cache_dir=tmp_path)
    assert torch.equal(again.take_masks(range(16)), maps[:, None]) and torch.equal(cached.take(range(16)),
                                                                                   data.take(range(16)))
    assert not load_data("builtin:phantoms?n=16", 32, cache_dir=tmp_path).has_masks


def test_phantom_label_maps_add_anatomy_under_the_same_lesions(tmp_path: Path) -> None:
    from meddiff.data.dataset import load_data
    from meddiff.data.phantoms import LABELS, LESION

    lesions = load_data("builtin:phantoms?n=16&masks=1", 32, cache_dir=tmp_path)
    full = load_data("builtin:phantoms?n=16&masks=2", 32, cache_dir=tmp_path)  # same cache: its own entry
    maps = full.take_masks(range(16))[:, 0]
    assert torch.equal(maps == LESION, lesions.take_masks(range(16))[:, 0] == LESION)
    assert torch.equal(full.take(range(16)), lesions.take(range(16)))  # the same images
    assert full.mask_values == tuple(sorted(set(torch.unique(maps).tolist()) - {0}))
    assert set(full.mask_values) - {LESION} <= set(LABELS) and len(full.mask_values) > 10  # four modalities' anatomy
    for k in range(16):  # each image's anatomy is its own modality's
        modality = full.class_names[int(full.labels[k])].split("/")[0]
        assert {LABELS[v].split("/")[0] for v in torch.unique(maps[k]).tolist() if v > LESION} == {modality}
    with pytest.raises(DataError, match="masks"):
        load_data("builtin:phantoms?n=16&masks=3", 32)


def test_a_pair_folder_keeps_label_values_and_skips_what_cannot_be_paired(tmp_path: Path) -> None:
    from meddiff.data.dataset import load_data

    write_pairs(tmp_path / "d")
    (tmp_path / "d/masks/a/002.png").unlink()  # an image without its map
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "d/masks/a/003.png")  # the wrong size
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "d/masks/a/004.png")  # colour: no labels
    data = load_data(str(tmp_path / "d"), 24, cache_dir=tmp_path / "cache")
    assert len(data) == 5 and len(data.skipped) == 3 and data.mask_values == (1, 2)
    reasons = " ".join(r for _p, r in data.skipped)
    assert "no label map" in reasons and "16x16 px for an image of 32x32" in reasons and "mode RGB" in reasons
    maps = data.take_masks(range(len(data)))
    assert set(torch.unique(maps).tolist()) == {0, 1, 2}  # nearest neighbour: no value between labels
    bright = data.take(range(len(data))) > 0  # [-1, 1]: brighter than mid-grey
    on_lesion = (maps == 1)
    assert (bright & on_lesion).sum() >= 0.8 * on_lesion.sum()  # the map lies on its image's square


def test_labels_follow_the_images_padding(tmp_path: Path) -> None:
    from meddiff.data.dataset import labels_to_square, to_square

    image = np.zeros((20, 40), np.float32)
    image[5:10, 30:35] = 1.0
    labels = (image > 0).astype(np.uint16) * 7
    sq_img, sq_lab = to_square(image, 40), labels_to_square(labels, 40)
    assert sq_lab.dtype == np.uint16 and set(np.unique(sq_lab)) == {0, 7}
    assert np.array_equal(sq_img > 0.5, sq_lab == 7)


# ---------------------------------------------------------------- training and sampling

def test_a_mask_run_has_one_input_channel_per_label_value(mask_run: Path) -> None:
    from meddiff.runfolder import read_record

    record = read_record(mask_run)
    assert record.model.mask_values == (1,) and record.model.cond_channels == 1
    config = json.loads((mask_run / "unet" / "config.json").read_text())
    assert config["in_channels"] == 2 and config["out_channels"] == 1  # tiny: patch 1


def test_the_map_steers_the_image_and_guidance_runs_both_branches(mask_run: Path) -> None:
    from meddiff.sample import generate, load_run, make_denoiser

    run = load_run(mask_run)
    empty, lesion = np.zeros((1, 32, 32), np.int64), np.zeros((1, 32, 32), np.int64)
    lesion[:, 8:20, 8:20] = 1
    a = generate(run, [5], 0, "ddim", 4, masks=empty)
    b = generate(run, [5], 0, "ddim", 4, masks=lesion)
    assert not np.allclose(a, b)
    assert np.allclose(generate(run, [5], 0, "ddim", 4, masks=lesion), b)
    assert make_denoiser(run, None, 1, 2.0, masks=torch.as_tensor(lesion)[:, None]).guided
    assert not make_denoiser(run, None, 1, 2.0).guided  # no class, no map: nothing to guide


def test_sampling_from_maps_writes_pairs_that_load_as_data(mask_run: Path, tmp_path: Path) -> None:
    from meddiff.config import SampleConfig
    from meddiff.data.dataset import load_data
    from meddiff.sample import sample_to_folder

    maps = tmp_path / "maps"
    maps.mkdir()
    for i in range(3):
        lab = np.zeros((48, 48), np.uint8)  # another size: brought to the model's by nearest neighbour
        lab[6 * i:6 * i + 12, 10:30] = 1
        Image.fromarray(lab).save(maps / f"m{i}.png")
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(maps / "unknown.png")
    lines: list[str] = []
    result = sample_to_folder(SampleConfig(run=str(mask_run), out=str(tmp_path / "out"), masks=str(maps),
                                           class_name="ct/abnormal", sampler="ddim", steps=3, progress=False,
                                           precision="fp32", device="cpu"), echo=lines.append)
    assert result["written"] == 3 and "skipped 1 of 4 label images" in lines[0]
    rows = [r.split(",") for r in (tmp_path / "out/manifest.csv").read_text().splitlines()[1:]]
    assert [r[-1] for r in rows] == [f"masks/seed00000{i}.png" for i in range(3)]
    pairs = load_data(str(tmp_path / "out"), 32)
    assert len(pairs) == 3 and pairs.has_masks and pairs.mask_values == (1,)
    assert int(pairs.take_masks([2]).sum()) == int((np.asarray(Image.open(tmp_path / "out/masks/seed000002.png"))
                                                    > 0).sum())


def test_a_sampled_pair_folder_is_what_evaluate_adherence_reads(mask_run: Path, tmp_path: Path) -> None:
    """sample --masks → evaluate --adherence, per requested class, beside real phantom pairs (the whole chain)."""
    from meddiff.config import SampleConfig
    from meddiff.evaluate import EvalConfig, evaluate
    from meddiff.sample import sample_to_folder

    out = tmp_path / "pairs"
    sample_to_folder(SampleConfig(run=str(mask_run), out=str(out), masks="builtin:ct?n=6&seed=3&masks=1",
                                  per_class=1, class_name="ct/abnormal", sampler="ddim", steps=2, progress=False,
                                  precision="fp32", device="cpu"), echo=_quiet)
    ev = evaluate(EvalConfig(real="builtin:phantoms?n=24&seed=1&masks=1", fake=str(out), adherence=True,
                             segmenter_steps=2, n_boot=20))
    adh = ev.results["adherence"]
    lesions = sum(1 for f in (out / "masks" / "ct" / "abnormal").iterdir()
                  if np.asarray(Image.open(f)).any())
    assert set(adh["figures"]) == {"all", "ct/abnormal"} and lesions > 0
    assert adh["figures"]["ct/abnormal"]["generated"]["images"] == lesions  # every requested lesion, scored once
    assert adh["figures"]["ct/abnormal"]["real"]["images"] > 0  # the ceiling: held-out real CT lesions


def test_adherence_on_maps_of_anatomy_reads_the_lesion_the_real_set_names(anatomy_run: Path, tmp_path: Path) -> None:
    from meddiff.config import SampleConfig
    from meddiff.evaluate import EvalConfig, evaluate
    from meddiff.sample import sample_to_folder

    out = tmp_path / "pairs"
    sample_to_folder(SampleConfig(run=str(anatomy_run), out=str(out), masks="builtin:ct?n=6&seed=3&masks=2",
                                  per_class=1, class_name="ct/abnormal", sampler="ddim", steps=2, progress=False,
                                  precision="fp32", device="cpu"), echo=_quiet)
    maps = [np.asarray(Image.open(f)) for f in sorted((out / "masks" / "ct" / "abnormal").iterdir())]
    assert all((m > 1).any() for m in maps) and 0 < sum((m == 1).any() for m in maps) < len(maps)
    ev = evaluate(EvalConfig(real="builtin:phantoms?n=24&seed=1&masks=2", fake=str(out), adherence=True,
                             segmenter_steps=2, n_boot=20))
    adh = ev.results["adherence"]
    assert adh["lesion_label"] == 1  # named by the real set: the anatomy is not read as lesion
    assert adh["figures"]["ct/abnormal"]["generated"]["images"] == sum((m == 1).any() for m in maps)


def test_maps_for_a_model_without_them_are_one_error(trained_run: Path, tmp_path: Path) -> None:
    from meddiff.config import SampleConfig
    from meddiff.sample import sample_to_folder

    (tmp_path / "maps").mkdir()
    with pytest.raises(ConfigError, match="--masks .*not trained on label maps"):
        sample_to_folder(SampleConfig(run=str(trained_run), out=str(tmp_path / "o"), masks=str(tmp_path / "maps"),
                                      progress=False), echo=_quiet)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- weighting the loss inside the maps

def test_the_mask_loss_weight_falls_on_labelled_pixels_of_the_maps_the_model_is_shown(
        tmp_path: Path, train_config, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from meddiff.runfolder import read_record

    T = importlib.import_module("meddiff.train")
    maps, weights = [], []
    real_map_weight, real_loss = T.label_map_weight, T.diffusion_loss

    def map_weight(masks: torch.Tensor, *a: object) -> torch.Tensor:
        maps.append(masks.clone())
        return real_map_weight(masks, *a)

    def loss(*a: object, **k: object) -> torch.Tensor:
        weights.append(a[7])
        return real_loss(*a, **k)
    monkeypatch.setattr(T, "label_map_weight", map_weight)
    monkeypatch.setattr(T, "diffusion_loss", loss)
    out = tmp_path / "run"
    T.train(train_config("builtin:phantoms?n=24&masks=1", out, mask_loss_weight=3.0, cond_drop_prob=0.3,
                         max_steps=8), echo=_quiet)
    assert len(maps) == len(weights) == 8
    shown = dropped = 0
    for m, w in zip(maps, weights):
        for mi, wi in zip(m, w):
            if torch.equal(wi, torch.ones_like(wi)) and (mi != 0).any():
                dropped += 1  # the condition was dropped: p(x) is weighted evenly
            else:
                assert torch.equal(wi, 1 + 3.0 * (mi != 0).float())
                shown += int((mi != 0).any())
    assert shown > 0 and dropped > 0  # both cases were seen, with lesions in their maps
    assert read_record(out).train.mask_loss_weight == 3.0
    assert "weighted 4x" in (out / "README.md").read_text()


def test_on_maps_of_anatomy_the_mask_loss_weight_falls_on_the_lesion_alone(
        tmp_path: Path, train_config, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    T = importlib.import_module("meddiff.train")
    pairs, real_loss = [], T.diffusion_loss
    monkeypatch.setattr(T, "diffusion_loss", lambda *a, **k: (pairs.append(a[7]), real_loss(*a, **k))[1])
    maps, real_map_weight = [], T.label_map_weight
    monkeypatch.setattr(T, "label_map_weight", lambda m, *a: (maps.append(m.clone()), real_map_weight(m, *a))[1])
    said: list[str] = []
    T.train(train_config("builtin:phantoms?n=24&masks=2", tmp_path / "run", mask_loss_weight=3.0, cond_drop_prob=0.0,
                         max_steps=3), echo=said.append)
    assert any("the loss inside the lesion (label value 1)" in line for line in said), said
    assert all(len(m.unique()) > 3 for m in maps), "maps of anatomy: many labelled structures"
    for m, w in zip(maps, pairs):
        assert torch.equal(w, 1 + 3.0 * (m == 1).float())  # the body, organs and bone weigh as the background
    assert any((m == 1).any() for m in maps)
    assert "| loss inside the lesion (label value 1) | weighted 4x |" in (tmp_path / "run" / "README.md").read_text()


def test_the_mask_loss_weight_without_maps_is_one_error_and_no_run(tmp_path: Path, image_folder: Path,
                                                                   train_config) -> None:
    from meddiff.train import train

    with pytest.raises(ConfigError, match="--mask-loss-weight: .*this run has none"):
        train(train_config(image_folder, tmp_path / "run", mask_loss_weight=2.0), echo=_quiet)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- inpainting

def test_inpainting_changes_only_the_region(mask_run: Path, tmp_path: Path) -> None:
    from meddiff.data.phantoms import render_with_mask

    image, _ = render_with_mask("ct", 3, 0, 32, False)
    _, region = render_with_mask("ct", 5, 0, 32, True)
    Image.fromarray((image * 255).round().astype(np.uint8)).save(tmp_path / "healthy.png")
    Image.fromarray(region.astype(np.uint8) * 255).save(tmp_path / "region.png")
    cmd = [sys.executable, "-m", "meddiff.cli", "inpaint", "--run", str(mask_run), "--image",
           str(tmp_path / "healthy.png"), "--mask", str(tmp_path / "region.png"), "--class", "ct/abnormal", "--n",
           "2", "--steps", "4", "--out", str(tmp_path / "out"), "--threads", "1", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    before = np.asarray(Image.open(tmp_path / "healthy.png")).astype(int)
    for seed in (0, 1):
        path = tmp_path / "out" / "images" / f"healthy_seed00000{seed}.png"
        after = np.asarray(Image.open(path)).astype(int)
        assert np.abs(after - before)[~region].max() == 0
        assert np.abs(after - before)[region].mean() > 1
        assert "one region generated by meddiff" in Image.open(path).text["Description"]
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out/masks" / path.name)) > 0, region)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "small.png")
    bad_cmd = list(cmd)
    bad_cmd[cmd.index("--mask") + 1], bad_cmd[cmd.index("--out") + 1] = str(tmp_path / "small.png"), str(tmp_path / "bad")
    bad = subprocess.run(bad_cmd, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "--mask" in bad.stderr
    assert "16x16 px for an image of 32x32 px" in bad.stderr and not (tmp_path / "bad").exists()


def test_inpainting_with_a_map_of_anatomy_regenerates_its_lesion_only(anatomy_run: Path, tmp_path: Path) -> None:
    from meddiff.config import InpaintConfig
    from meddiff.data.phantoms import LESION, render_with_maps
    from meddiff.sample import inpaint_to_folder

    run = anatomy_run
    healthy, _ = render_with_maps("ct", 5, 0, 32, False)
    _, labels = render_with_maps("ct", 5, 0, 32, True)  # its twin's map: the same anatomy, and a lesion
    Image.fromarray((healthy * 255).round().astype(np.uint8)).save(tmp_path / "healthy.png")
    Image.fromarray(labels).save(tmp_path / "map.png")
    inpaint_to_folder(InpaintConfig(run=str(run), image=str(tmp_path / "healthy.png"), mask=str(tmp_path / "map.png"),
                                    out=str(tmp_path / "out"), class_name="ct/abnormal", steps=3, precision="fp32",
                                    device="cpu", progress=False), echo=_quiet)
    lesion = labels == LESION
    before = np.asarray(Image.open(tmp_path / "healthy.png")).astype(int)
    after = np.asarray(Image.open(tmp_path / "out/images/healthy_seed000000.png")).astype(int)
    assert np.abs(after - before)[~lesion].max() == 0 and np.abs(after - before)[lesion].mean() > 1
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out/masks/healthy_seed000000.png")), labels)
    Image.fromarray(np.where(lesion, 2, labels).astype(np.uint8)).save(tmp_path / "no_lesion.png")  # anatomy only
    with pytest.raises(ConfigError, match="no lesion in the label map"):
        inpaint_to_folder(InpaintConfig(run=str(run), image=str(tmp_path / "healthy.png"),
                                        mask=str(tmp_path / "no_lesion.png"), out=str(tmp_path / "bad"), steps=3,
                                        device="cpu", progress=False), echo=_quiet)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("fmt", ["dicom", "nifti"])
def test_paired_exports_dicom_seg_references_its_image_and_nifti_labels_share_the_grid(mask_run: Path, tmp_path: Path,
                                                                                      fmt: str) -> None:
    import shutil

    import nibabel as nib
    import pydicom

    from meddiff.config import SampleConfig
    from meddiff.sample import sample_to_folder

    maps = tmp_path / "maps"
    maps.mkdir()
    lab = np.zeros((32, 32), np.uint8)
    lab[4:14, 6:20] = 1
    Image.fromarray(lab).save(maps / "m.png")
    sample_to_folder(SampleConfig(run=str(mask_run), out=str(tmp_path / "out"), masks=str(maps), fmt=fmt,
                                  sampler="ddim", steps=2, progress=False, precision="fp32", device="cpu"), echo=_quiet)
    suffix = ".dcm" if fmt == "dicom" else ".nii.gz"
    image, label = tmp_path / "out/images" / f"seed000000{suffix}", tmp_path / "out/masks" / f"seed000000{suffix}"
    if fmt == "dicom":
        seg, src = pydicom.dcmread(label), pydicom.dcmread(image)
        assert seg.Modality == "SEG" and seg.StudyInstanceUID == src.StudyInstanceUID
        assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert int(seg.pixel_array.sum()) == int(lab.sum()) and not str(seg.get("PatientName", ""))
        if shutil.which("dciodvfy"):
            check = subprocess.run(["dciodvfy", str(label)], capture_output=True, text=True, timeout=60)
            assert not [line for line in check.stderr.splitlines() if line.startswith("Error")], check.stderr
    else:
        img, seg = nib.load(image), nib.load(label)
        assert np.allclose(img.affine, seg.affine) and img.shape == seg.shape
        assert int(np.asarray(seg.dataobj).sum()) == int(lab.sum()) and seg.header["intent_code"] == 1002


def test_a_segmentation_names_and_codes_each_label_the_run_named(tmp_path: Path) -> None:
    import shutil

    import pydicom

    from meddiff import export

    info = export.SyntheticInfo("9f2c01ab", 3, "ct/abnormal", "ddim", 2, 1.0)
    image = export.write_image(np.random.default_rng(0).random((32, 32)).astype(np.float32), tmp_path / "i.dcm",
                               "dicom", info)
    labels = np.zeros((32, 32), np.uint8)
    labels[2:30, 2:30], labels[8:20, 4:16], labels[10:14, 8:12], labels[24:28, 20:26] = 2, 3, 1, 9
    path = export.write_label_map(labels, tmp_path / "m.dcm", "dicom", info, image=image,
                                  names={1: "lesion", 2: "ct/body", 3: "ct/liver"})  # 9: a value never named
    got = {s.SegmentLabel: (s.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning,
                            s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning)
           for s in pydicom.dcmread(path).SegmentSequence}
    assert got == {"lesion": ("Morphologically Abnormal Structure", "Lesion"),
                   "ct/body": ("Anatomical Structure", "Tissue"), "ct/liver": ("Anatomical Structure", "Liver"),
                   "label 9": ("Morphologically Abnormal Structure", "Lesion")}
    if shutil.which("dciodvfy"):
        check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        assert not [line for line in check.stderr.splitlines() if line.startswith("Error")], check.stderr


def test_a_run_trained_on_named_label_values_keeps_their_names(mask_run: Path) -> None:
    from meddiff.modelcard import model_card_text
    from meddiff.runfolder import read_record

    record = read_record(mask_run)
    assert record.mask_names() == {1: "lesion"}
    assert "each label value (1 lesion)" in model_card_text(mask_run)
    record.data["mask_names"] = ["not", "a", "dict"]  # a hand-edited record: the values go unnamed
    assert record.mask_names() == {}


def test_a_nifti_volume_and_its_label_volume_are_sliced_together(tmp_path: Path) -> None:
    import nibabel as nib

    from meddiff.data.dataset import load_data

    vol = np.zeros((24, 24, 6), np.float32)
    lab = np.zeros((24, 24, 6), np.uint8)
    for k in range(1, 5):  # slices 0 and 5 are empty: the reader skips them, and their labels with them
        vol[4:20, 4:20, k] = 100 + k
        vol[6 + k:10 + k, 8:12, k] = 400
        lab[6 + k:10 + k, 8:12, k] = k  # a different label on each slice tells them apart
    (tmp_path / "d/images").mkdir(parents=True)
    (tmp_path / "d/masks").mkdir()
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "d/images/vol.nii.gz")
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "d/masks/vol.nii.gz")
    data = load_data(str(tmp_path / "d"), 24)
    assert len(data) == 4 and data.mask_values == (1, 2, 3, 4)
    maps, images = data.take_masks(range(4))[:, 0], data.take(range(4))[:, 0]
    for k in range(4):
        assert set(torch.unique(maps[k]).tolist()) == {0, k + 1}
        assert float(images[k][maps[k] > 0].mean()) > float(images[k][maps[k] == 0].mean())  # on the bright spot


def test_generated_dicom_pairs_read_back_as_data_through_their_segmentations(mask_run: Path, tmp_path: Path) -> None:
    from meddiff.config import SampleConfig
    from meddiff.data.dataset import load_data
    from meddiff.sample import sample_to_folder

    maps = tmp_path / "maps"
    maps.mkdir()
    for i in range(2):
        lab = np.zeros((32, 32), np.uint8)
        lab[4 + 8 * i:14 + 8 * i, 6:20] = 1
        Image.fromarray(lab).save(maps / f"m{i}.png")
    sample_to_folder(SampleConfig(run=str(mask_run), out=str(tmp_path / "out"), masks=str(maps), fmt="dicom",
                                  sampler="ddim", steps=2, progress=False, precision="fp32", device="cpu"), echo=_quiet)
    data = load_data(str(tmp_path / "out"), 32)
    assert len(data) == 2 and not data.skipped and data.mask_values == (1,)
    for i in range(2):
        want = np.asarray(Image.open(maps / f"m{i}.png")).astype(np.int64)
        assert np.array_equal(data.take_masks([i])[0, 0].numpy(), want)


def test_the_pipeline_takes_maps_and_the_audit_keeps_pairs_whole(mask_run: Path, tmp_path: Path) -> None:
    from meddiff.audit import write_shareable
    from meddiff.config import SampleConfig
    from meddiff.imagesets import read_generated
    from meddiff.pipeline import MeddiffPipeline
    from meddiff.sample import class_index, generate, load_run, sample_to_folder

    lab = np.zeros((2, 32, 32), np.int64)
    lab[:, 5:15, 5:15] = 1
    run = load_run(mask_run)
    want = generate(run, [0, 1], class_index(run, "ct/abnormal"), "ddim", 3, masks=lab)
    pipe = MeddiffPipeline.from_pretrained(mask_run)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(batch_size=2, class_name="ct/abnormal", num_inference_steps=3, masks=lab, output_type="np",
               generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images[..., 0]
    assert np.allclose(got, want, atol=1e-5)
    maps = tmp_path / "maps"
    maps.mkdir()
    Image.fromarray(lab[0].astype(np.uint8)).save(maps / "m0.png")
    Image.fromarray(np.roll(lab[0], 8, axis=1).astype(np.uint8)).save(maps / "m1.png")
    sample_to_folder(SampleConfig(run=str(mask_run), out=str(tmp_path / "out"), masks=str(maps), sampler="ddim",
                                  steps=2, progress=False, precision="fp32", device="cpu"), echo=_quiet)
    files, images = read_generated(str(tmp_path / "out"))
    assert [f.parent.name for f in files] == ["images", "images"] and images.shape == (2, 32, 32)
    write_shareable(tmp_path / "out", [Path("images/seed000001.png")], tmp_path / "share")
    kept = sorted(str(p.relative_to(tmp_path / "share")) for p in (tmp_path / "share").rglob("*.png"))
    assert kept == ["images/seed000001.png", "masks/seed000001.png"]


def test_maps_can_come_from_a_data_set_with_label_maps(mask_run: Path, tmp_path: Path) -> None:
    from meddiff.config import SampleConfig
    from meddiff.data.dataset import load_data
    from meddiff.sample import sample_to_folder

    spec = "builtin:phantoms?n=4&masks=1&seed=3"
    result = sample_to_folder(SampleConfig(run=str(mask_run), out=str(tmp_path / "out"), masks=spec, sampler="ddim",
                                           steps=2, progress=False, precision="fp32", device="cpu"), echo=_quiet)
    assert result["written"] == 4
    source, made = load_data(spec, 32), load_data(str(tmp_path / "out"), 32)
    assert torch.equal(made.take_masks(range(4)), source.take_masks(range(4)))
    with pytest.raises(ConfigError, match="have no label maps"):
        sample_to_folder(SampleConfig(run=str(mask_run), out=str(tmp_path / "o2"), masks="builtin:phantoms?n=2",
                                      progress=False), echo=_quiet)


def test_a_jittered_map_keeps_its_labels_and_follows_its_seed() -> None:
    from meddiff.data.dataset import jitter_label_map

    labels = np.zeros((32, 32), np.uint16)
    labels[8:20, 6:14], labels[22:26, 20:30] = 1, 2
    a, b, again = jitter_label_map(labels, 3), jitter_label_map(labels, 4), jitter_label_map(labels, 3)
    assert np.array_equal(a, again) and not np.array_equal(a, b)  # a function of the seed, and it varies
    for out in (a, b):
        assert out.dtype == labels.dtype and set(np.unique(out).tolist()) == {0, 1, 2}  # nearest: never blended
        for v in (1, 2):  # scaled 0.85-1.15 in each direction: the area stays within 0.85² .. 1.15² (± edge pixels)
            assert 0.6 < (out == v).sum() / (labels == v).sum() < 1.5
    assert not any(np.array_equal(jitter_label_map(labels, s), labels) for s in range(5))


def test_a_jittered_image_moves_with_its_jittered_map() -> None:
    from meddiff.data.dataset import jitter_image, jitter_label_map

    labels = np.zeros((32, 32), np.uint16)
    labels[6:18, 4:12] = 1
    image = labels.astype(np.float32) * 0.8 + 0.1  # bright where the label is
    for seed in range(4):
        moved, mapped = jitter_image(image, seed), jitter_label_map(labels, seed)
        assert moved.shape == image.shape and moved.dtype == np.float32
        inside, outside = moved[mapped == 1], moved[(mapped == 0) & (moved > 0)]
        assert inside.mean() > 0.75 and outside.mean() < 0.2  # the same draw: the bright square lands on its label
    assert not np.allclose(jitter_image(image, 0), jitter_image(image, 1))


def test_augmented_maps_give_n_new_pairs_from_fewer_maps(mask_run: Path, tmp_path: Path) -> None:
    from meddiff.config import SampleConfig
    from meddiff.data.dataset import jitter_label_map, load_data
    from meddiff.sample import sample_to_folder

    spec = "builtin:phantoms?n=2&masks=1&seed=3"
    cfg = SampleConfig(run=str(mask_run), out=str(tmp_path / "out"), masks=spec, augment_masks=True, n=5,
                       sampler="ddim", steps=2, progress=False, precision="fp32", device="cpu")
    assert sample_to_folder(cfg, echo=_quiet)["written"] == 5
    source = load_data(spec, 32).take_masks(range(2))[:, 0].numpy()
    made = sorted((tmp_path / "out" / "masks").glob("*.png"))
    assert [p.stem for p in made] == [f"seed{s:06d}" for s in range(5)]
    for k, path in enumerate(made):  # image k's map is map k % 2 jittered by its seed k
        assert np.array_equal(np.asarray(Image.open(path)), jitter_label_map(source[k % 2], k))
    with pytest.raises(ConfigError, match="--augment-masks: draws new maps from the --masks ones"):
        SampleConfig(run=str(mask_run), out=str(tmp_path / "o2"), augment_masks=True)


# ---------------------------------------------------------------- a model of label maps (--learn maps)

@pytest.fixture(scope="module")
def map_run(tmp_path_factory: pytest.TempPathFactory, train_config) -> Path:
    """A tiny model of the phantoms' label maps of lesion and anatomy (masks=2), 6 steps. Read-only."""
    from meddiff.train import train

    out = tmp_path_factory.mktemp("runs") / "maps"
    train(train_config("builtin:phantoms?n=24&masks=2", out, learn="maps"), echo=_quiet)
    return out


def test_a_map_is_one_channel_per_value_and_comes_back_by_the_highest_channel() -> None:
    from meddiff.model import mask_channels, maps_from_channels

    values = (0, 1, 4, 7)
    maps = torch.tensor([[0, 1], [4, 7]]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    channels = mask_channels(maps, values)
    assert channels.shape == (2, 4, 2, 2) and set(channels.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(maps_from_channels(channels, values), maps)
    noisy = channels + 0.4 * torch.randn(channels.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(maps_from_channels(noisy, values), maps)  # a sample near the map decodes to it


def test_a_model_of_label_maps_learns_the_maps_as_its_channels(map_run: Path, train_config) -> None:
    from meddiff.data.dataset import load_data
    from meddiff.model import maps_from_channels
    from meddiff.runfolder import read_record
    from meddiff.train import _map_data

    record = read_record(map_run)
    data = load_data("builtin:phantoms?n=24&masks=2", 32)
    assert record.model.map_values == (0, *data.mask_values) and record.model.in_channels == len(data.mask_values) + 1
    assert record.model.mask_values == () and record.model.cond_channels == 0  # conditioned on the class alone
    assert record.train.objective == "x0"  # the clean map: with v, every pixel of a drawn map came out noise
    assert record.train.shift == (0.0, -3.0)  # noisier where the layout is chosen, as an image's at the clean end
    learnt, values = _map_data(train_config("builtin:phantoms?n=24&masks=2", map_run, learn="maps"), data, None,
                               _quiet)
    assert not learnt.has_masks and learnt.class_names == data.class_names
    assert torch.equal(maps_from_channels(learnt.take(range(24)), values), data.take_masks(range(24)))
    card = (map_run / "README.md").read_text()
    assert "generates label maps" in card and "--mask-run THIS_FOLDER" in card
    assert "1 lesion" in card and "2 ct/body" in card  # the values keep the names the data gave them


def test_a_model_of_label_maps_shifts_its_noisy_end_unless_told_otherwise() -> None:
    import math

    from meddiff.config import MAP_NOISE_SHIFT, TrainConfig

    assert TrainConfig(data="x", out="y", size=64, learn="maps").resolve().shift == (0.0, MAP_NOISE_SHIFT)
    big = 2 * math.log(64 / 256)  # above 64 px the size's own shift comes first, at both ends
    assert TrainConfig(data="x", out="y", size=256, learn="maps").resolve().shift == \
        (pytest.approx(big), pytest.approx(big + MAP_NOISE_SHIFT))
    assert TrainConfig(data="x", out="y", size=64, learn="maps", noise_shift=0.0).resolve().shift == 0.0
    assert TrainConfig(data="x", out="y", size=64, learn="maps", noise_shift_clean=1.0).resolve().shift == (1.0, 0.0)
    assert TrainConfig(data="x", out="y", size=64).resolve().shift == 0.0  # images keep their schedule


def test_maps_drawn_for_sampling_make_pairs_and_follow_the_seed(map_run: Path, anatomy_run: Path,
                                                                tmp_path: Path) -> None:
    from meddiff.config import SampleConfig
    from meddiff.sample import class_index, draw_maps, load_run, sample_to_folder

    cfg = SampleConfig(run=str(anatomy_run), mask_run=str(map_run), out=str(tmp_path / "out"), n=3, seed=5,
                       class_name="ct/abnormal", sampler="ddim", steps=2, progress=False, precision="fp32",
                       device="cpu")
    result = sample_to_folder(cfg, echo=_quiet)
    maps = load_run(map_run, maps=True)
    assert result["written"] == 3 and result["mask_model_id"] == maps.model_id
    made = sorted((tmp_path / "out" / "masks").glob("*.png"))
    assert [p.stem for p in made] == [f"seed{s:06d}" for s in (5, 6, 7)]
    assert sorted(p.stem for p in (tmp_path / "out" / "images").glob("*.png")) == [p.stem for p in made]
    label = class_index(maps, "ct/abnormal")
    together = draw_maps(maps, [5, 6, 7], label)
    for k, path in enumerate(made):  # the image's seed draws its map, whatever else is in the batch
        assert np.array_equal(np.asarray(Image.open(path)), together[k])
        assert np.array_equal(draw_maps(maps, [5 + k], label)[0], together[k])
    assert set(np.unique(together).tolist()) <= set(maps.model.map_values)
    assert not np.array_equal(draw_maps(maps, [5], label)[0], draw_maps(maps, [6], label)[0])
    rows = (tmp_path / "out" / "manifest.csv").read_text().splitlines()
    assert rows[1].startswith("images/seed000005.png,ct/abnormal,5,") and rows[1].endswith(",masks/seed000005.png")
    grid = np.asarray(Image.open(tmp_path / "out" / "grid.png"))  # each map left of its image, one row of 3 pairs
    assert grid.shape == (32 + 4, 6 * (32 + 2) + 2)
    from meddiff.export import label_map_tile
    assert np.array_equal(grid[2:34, 2:34], np.round(label_map_tile(together[0], 1) * 255).astype(np.uint8))
    image = np.asarray(Image.open(tmp_path / "out" / "images" / "seed000005.png"))
    assert np.array_equal(grid[2:34, 36:68], image)


def test_per_class_pairs_draw_each_class_its_own_maps_at_their_guidance(map_run: Path, anatomy_run: Path,
                                                                        tmp_path: Path) -> None:
    from meddiff.config import SampleConfig
    from meddiff.sample import class_index, draw_maps, load_run, sample_to_folder

    cfg = SampleConfig(run=str(anatomy_run), mask_run=str(map_run), out=str(tmp_path / "out"), per_class=1,
                       mask_guidance=3.0, sampler="ddim", steps=2, progress=False, precision="fp32", device="cpu")
    sample_to_folder(cfg, echo=_quiet)
    maps = load_run(map_run, maps=True)
    for path in sorted((tmp_path / "out" / "masks").rglob("*.png")):
        name = str(path.parent.relative_to(tmp_path / "out" / "masks"))
        seed = int(path.stem.removeprefix("seed"))
        got = np.asarray(Image.open(path))
        assert np.array_equal(got, draw_maps(maps, [seed], class_index(maps, name), guidance=3.0)[0])
        assert not np.array_equal(got, draw_maps(maps, [seed], class_index(maps, name))[0])
    assert len(list((tmp_path / "out" / "images").rglob("*.png"))) == 8


def test_a_model_of_maps_and_a_model_of_images_are_not_taken_for_each_other(
        map_run: Path, anatomy_run: Path, mask_run: Path, trained_run: Path, tmp_path: Path) -> None:
    from meddiff.config import SampleConfig
    from meddiff.pipeline import MeddiffPipeline, export_diffusers
    from meddiff.sample import sample_to_folder

    def sample(**kw: object) -> None:
        sample_to_folder(SampleConfig(out=str(tmp_path / "o"), n=2, progress=False, device="cpu", **kw), echo=_quiet)

    with pytest.raises(ConfigError, match="--run .*a model of label maps .*--mask-run"):
        sample(run=str(map_run))
    with pytest.raises(ConfigError, match="--mask-run .*a model of images"):
        sample(run=str(anatomy_run), mask_run=str(anatomy_run))
    with pytest.raises(ConfigError, match="--mask-run .*not trained on label maps"):
        sample(run=str(trained_run), mask_run=str(map_run))
    with pytest.raises(ConfigError, match=r"--mask-run .*draws label value\(s\) \[2, 3"):  # mask_run knows 1 alone
        sample(run=str(mask_run), mask_run=str(map_run))
    with pytest.raises(ConfigError, match="--mask-guidance: guides the maps --mask-run draws"):
        SampleConfig(run=str(anatomy_run), mask_guidance=2.0, out=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="--mask-run: draws each image's map, --masks gives them"):
        SampleConfig(run=str(anatomy_run), mask_run=str(map_run), masks=str(tmp_path), out=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="RUN .*a model of label maps"):
        export_diffusers(map_run, tmp_path / "exported")
    with pytest.raises(ConfigError, match="a model of label maps"):
        MeddiffPipeline.from_pretrained(map_run)
    assert not (tmp_path / "o").exists() and not (tmp_path / "exported").exists()


@pytest.mark.parametrize("changes, message", [
    (dict(data="IMAGES"), "--learn maps: --data .* has no label maps"),
    (dict(copy_check=4), "--copy-check: audits sampled images"),
    (dict(mask_loss_weight=2.0), "--mask-loss-weight: .*--learn maps"),
    (dict(autoencoder="AE"), "--learn maps: .*leave out --autoencoder"),
])
def test_learning_maps_from_what_cannot_give_them_is_one_error_and_no_run(
        changes: dict, message: str, tmp_path: Path, image_folder: Path, train_config) -> None:
    from meddiff.train import train

    data = str(image_folder) if changes.get("data") == "IMAGES" else "builtin:phantoms?n=8&masks=2"
    cfg = train_config(data, tmp_path / "run", learn="maps",
                       **{k: v for k, v in changes.items() if k not in ("data", "autoencoder")})
    if "autoencoder" in changes:
        cfg = dataclasses.replace(cfg, autoencoder=str(tmp_path / "ae"))
    with pytest.raises((ConfigError, DataError, RunError), match=message):
        train(cfg, echo=_quiet)
    assert not (tmp_path / "run").exists()


def test_a_model_of_label_maps_resumes_with_its_own_values(tmp_path: Path, train_config) -> None:
    from meddiff.runfolder import read_record
    from meddiff.train import train

    from meddiff.data.dataset import load_data

    cfg = train_config("builtin:phantoms?n=8&masks=1", tmp_path / "run", learn="maps", max_steps=2)
    train(cfg, echo=_quiet)
    assert read_record(tmp_path / "run").model.map_values == (0, 1)
    result = train(dataclasses.replace(cfg, max_steps=4), resume=True, echo=_quiet)
    assert result.steps == 4 and read_record(tmp_path / "run").model.map_values == (0, 1)
    anatomy = load_data("builtin:phantoms?n=8&masks=2", 32)  # the same classes, maps with values it never learnt
    with pytest.raises(RunError, match=r"maps hold value\(s\) \[2, 3.* the run does not learn \(it learns 0, 1\)"):
        train(dataclasses.replace(cfg, max_steps=6), anatomy, resume=True, echo=_quiet)
