"""meddiff train --copy-check / --max-copies: the copy audit run on the model as it trains, logged at each
validation; past the limit the run stops and exports the weights of the last check at or under it."""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from meddiff import audit as audit_module
from meddiff import sample as sample_module
from meddiff.cli import main
from meddiff.runfolder import read_log, read_record


def _quiet(_line: str) -> None:
    pass


def _faces(n: int, seed: int, size: int = 32) -> np.ndarray:
    """n distinct smooth images in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    return np.stack([0.5 + 0.4 * np.sin(6 * xx * rng.uniform(0.5, 2) + rng.uniform(0, 6))
                     * np.cos(5 * yy * rng.uniform(0.5, 2) + rng.uniform(0, 6)) for _ in range(n)]).astype(np.float32)


def test_the_training_audit_flags_samples_that_are_training_images_and_passes_new_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    train, held = _faces(20, 0), _faces(10, 1)
    labels = np.array([0, 1, 0, 1])
    check = audit_module.TrainingAudit(train, held, labels, None, [5, 6, 7, 8])
    assert -1 < check.threshold < 1 and check.warning is None
    calls = []

    def copies(run, seeds, label, precision="fp32", masks=None):  # the model returns training images
        calls.append((tuple(seeds), label))
        return train[[s - 5 for s in seeds]]

    monkeypatch.setattr(sample_module, "generate", copies)
    result = check.check(run=None)
    assert result.flagged_share == 1.0
    assert sorted(calls) == [((5, 7), 0), ((6, 8), 1)], "one call per class, each image with its own seed"
    monkeypatch.setattr(sample_module, "generate", lambda run, seeds, *a, **k: _faces(len(seeds), 99))
    assert check.check(run=None).flagged_share == 0.0


def test_held_out_images_that_are_neighbours_of_training_images_are_warned_about() -> None:
    train = _faces(20, 0)
    check = audit_module.TrainingAudit(train, train[:8] + 0.001, None, None, [0, 1])
    assert check.warning and "sees only near-exact copies" in check.warning


def test_each_validation_logs_the_share_of_copies(tmp_path: Path, image_folder: Path, train_config) -> None:
    from meddiff.train import train

    result = train(train_config(image_folder, tmp_path / "run", copy_check=4, val_fraction=0.25), echo=_quiet)
    rows = [r for r in read_log(tmp_path / "run") if "copies" in r]
    assert [r["step"] for r in rows] == [3, 6]
    assert all(0 <= r["copies"] <= 1 and -1 <= r["copy_threshold"] <= 1 for r in rows)
    assert result.stopped == "max-steps"
    assert read_record(tmp_path / "run").train.copy_check == 4


def test_past_the_limit_the_run_stops_and_exports_the_last_weights_under_it(
        tmp_path: Path, image_folder: Path, train_config, monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit is made to find copies from the second check on: the run stops there, and its exported weights
    are those the first check saw."""
    from meddiff.train import train

    seen = []

    def rising(self, run, precision="fp32"):
        seen.append({k: v.detach().clone() for k, v in run.unet.state_dict().items()})
        flagged = len(seen) >= 2
        return dataclasses.replace(_audit(flagged, len(self.seeds)))

    monkeypatch.setattr(audit_module.TrainingAudit, "check", rising)
    lines: list[str] = []
    result = train(train_config(image_folder, tmp_path / "run", copy_check=2, max_copies=0.5, max_steps=12,
                                val_fraction=0.25), echo=lines.append)
    assert result.stopped == "copies" and result.steps == 6 and len(seen) == 2
    exported = load_file(str(tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(exported[k], seen[0][k]) for k in seen[0]), "the weights of the clean check at step 3"
    assert not all(torch.equal(exported[k], seen[1][k]) for k in seen[1])
    assert any("exported weights are step 3's" in line for line in lines)
    assert [r["copies"] for r in read_log(tmp_path / "run") if "copies" in r] == [0.0, 1.0]
    card = (tmp_path / "run" / "README.md").read_text()
    assert "| copy check | 2 images sampled at each validation and audited against the training images; stop " \
           "above 50% |" in card
    assert "| copies found | 2 checks; the last (step 6): 100%; the most (step 6): 100% |" in card
    assert "| exported weights | step 3's, the last check at or under the limit |" in card
    assert "| stopped by | copies |" in card


def _audit(flagged: bool, n: int):
    from meddiff.metrics.memorization import CopyAudit

    return CopyAudit(np.full(n, 0.99 if flagged else 0.2, np.float32), np.zeros(n, np.int64), 0.9, "given", 10,
                     "test")


@pytest.mark.parametrize("flags, message", [
    (["--max-copies", "0.1"], "--max-copies: needs --copy-check N"),
    (["--copy-check", "4", "--val-fraction", "0"], "--copy-check: needs held-out images"),
])
def test_a_copy_check_that_cannot_run_is_one_line_and_leaves_no_folder(
        flags: list[str], message: str, tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--data", str(image_folder), "--out", str(tmp_path / "run"), "--preset", "tiny", "--size",
                 "32", "--max-steps", "2", "--no-progress", "--device", "cpu", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("meddiff: error: " + message)
    assert not (tmp_path / "run").exists()


def test_a_mask_run_is_checked_on_images_drawn_with_training_maps(
        tmp_path: Path, train_config, monkeypatch: pytest.MonkeyPatch) -> None:
    from meddiff.train import train

    drawn = []
    real = sample_module.generate

    def spy(run, seeds, label=None, *a, masks=None, **k):
        out = real(run, seeds, label, *a, masks=masks, **k)
        drawn.append((out.shape, None if masks is None else np.shape(masks)))
        return out

    monkeypatch.setattr(sample_module, "generate", spy)
    train(train_config("builtin:phantoms?n=24&masks=1", tmp_path / "masks", copy_check=2, max_steps=3,
                       val_fraction=0.25), echo=_quiet)
    assert drawn and all(out[1:] == (32, 32) and maps == (out[0], 32, 32) for out, maps in drawn)


def test_a_resumed_run_keeps_its_copy_check_unless_told_otherwise(tmp_path: Path, image_folder: Path,
                                                                  train_config) -> None:
    from meddiff.config import TrainConfig
    from meddiff.train import train

    out = tmp_path / "run"
    train(train_config(image_folder, out, copy_check=2, max_steps=3, val_fraction=0.25), echo=_quiet)
    train(TrainConfig(data="", out=str(out), max_steps=6, progress=False), resume=True, echo=_quiet)
    assert [r["step"] for r in read_log(out) if "copies" in r] == [3, 6]
    train(TrainConfig(data="", out=str(out), max_steps=9, max_copies=0.9, progress=False), resume=True, echo=_quiet)
    assert read_record(out).train.max_copies == 0.9 and read_record(out).train.copy_check == 2


@pytest.mark.parametrize("by", ["group", "contiguous"])
def test_the_validation_split_of_one_volumes_slices_can_hold_out_a_run_of_consecutive_slices(
        by: str, tmp_path: Path, png_writer, train_config, monkeypatch: pytest.MonkeyPatch) -> None:
    T = importlib.import_module("meddiff.train")  # the module: `meddiff.train` is the function

    png_writer(tmp_path / "slices", 30)  # a flat folder: every file is a group of its own
    held = []
    real = T.split

    def spy(*args, **kwargs):
        train_idx, val_idx = real(*args, **kwargs)
        held.append(val_idx)
        return train_idx, val_idx

    monkeypatch.setattr(T, "split", spy)
    T.train(train_config(tmp_path / "slices", tmp_path / "run", val_fraction=0.1, val_split=by, max_steps=1),
            echo=_quiet)
    steps = np.diff(np.sort(held[0]))
    assert len(held[0]) >= 3 and (np.all(steps == 1) if by == "contiguous" else np.any(steps > 1))
    assert read_record(tmp_path / "run").train.val_split == by


def test_a_gallery_kept_at_the_audits_size_gives_the_figures_of_the_full_size_images() -> None:
    from meddiff.metrics.memorization import at_audit_size, nearest_ncc

    train, generated = _faces(12, 0, size=128), _faces(5, 3, size=128)
    generated[0] = train[7]
    small = at_audit_size(train)
    assert small.shape == (12, 64, 64)
    full, kept = nearest_ncc(generated, train), nearest_ncc(generated, small)
    assert np.array_equal(full[0], kept[0]) and np.array_equal(full[1], kept[1]) and kept[1][0] == 7
