"""Tests for meddiff.modelcard: the README.md model card that training writes into every run folder, and the card
the web page shows."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from meddiff.errors import RunError
from meddiff.modelcard import describe_source, model_card_text, shown_card, write_model_card


def _copy_run(run: Path, dest: Path) -> Path:
    dest.mkdir()
    shutil.copy(run / "meddiff.json", dest / "meddiff.json")
    shutil.copytree(run / "unet", dest / "unet")
    return dest


def test_training_writes_a_card_with_model_data_and_settings(trained_run: Path, image_folder: Path) -> None:
    card = (trained_run / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n")
    for text in ("class-conditional, 2 classes", "| preset | tiny |", "| a | 8 |", "| b | 8 |", "| png | 16 |",
                 "| 32x32 | 16 |", "| steps | 6 |", "| objective | v |", "MeddiffPipeline.from_pretrained",
                 "## Intended use", "Not for diagnosis", "## Limitations", "**synthetic**", "parameters"):
        assert text in card, text
    assert str(image_folder) not in card and image_folder.name not in card  # no data path
    assert ".png" not in card                                                 # no file names


def test_an_unconditional_card_points_to_ddim_pipeline(uncond_run: Path) -> None:
    card = (uncond_run / "README.md").read_text()
    assert "unconditional" in card and "DDIMPipeline.from_pretrained" in card and "MeddiffPipeline" not in card


def test_metrics_are_listed_when_given(trained_run: Path, tmp_path: Path) -> None:
    run = _copy_run(trained_run, tmp_path / "run")
    without = write_model_card(run).read_text()
    assert "No evaluation of generated images was recorded" in without
    card = write_model_card(run, {"ssim_mean": 0.41234, "protocol": {"size": 32, "feature": "ssim"}})
    text = card.read_text()
    assert card == run / "README.md"
    assert "| ssim_mean | 0.4123 |" in text and "| protocol.size | 32 |" in text
    assert "| best validation loss (eps-MSE at fixed noise) |" in text


def test_an_unfinished_run_says_so(trained_run: Path, tmp_path: Path) -> None:
    run = _copy_run(trained_run, tmp_path / "run")
    record = json.loads((run / "meddiff.json").read_text())
    del record["result"]
    (run / "meddiff.json").write_text(json.dumps(record))
    assert "Training had not finished when this card was written." in model_card_text(run)


def test_data_sources_never_show_a_local_path() -> None:
    assert "builtin:phantoms" in describe_source("builtin:phantoms?n=80")
    public = describe_source("/home/dr/pt_smith/pneumoniamnist_64.npz")
    assert "pt_smith" not in public and "local image folder" in public
    medmnist = describe_source("medmnist:/home/dr/pt_smith/pneumoniamnist_64.npz?split=all")
    assert "MedMNIST+ PneumoniaMNIST (`pneumoniamnist_64.npz`, all split" in medmnist and "pt_smith" not in medmnist
    assert "pt_smith" not in describe_source("medmnist:/data/pt_smith_scan.npz")


def test_a_folder_without_a_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"meddiff.json: missing; is this a meddiff run folder"):
        write_model_card(tmp_path)


def test_shown_card_is_the_readme_or_else_the_card_built_from_the_record(trained_run: Path, image_folder: Path,
                                                                        tmp_path: Path) -> None:
    shutil.copy(trained_run / "meddiff.json", tmp_path / "meddiff.json")  # a run folder without README.md
    card, source = shown_card(tmp_path, 200_000)
    assert source == "meddiff.json" and card == model_card_text(tmp_path)
    assert "class-conditional, 2 classes" in card and "| a | 8 |" in card and "**synthetic**" in card
    assert str(image_folder) not in card and str(trained_run) not in card and not re.search(r"\d{3}\.png", card)
    (tmp_path / "README.md").write_text("# My model\nIntended use: research.\n")
    assert shown_card(tmp_path, 200_000) == ("# My model\nIntended use: research.\n", "README.md")
    assert shown_card(tmp_path, 4) == ("# My", "README.md"), "cut at max_chars"


def test_shown_card_never_follows_a_link_or_opens_a_fifo(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run / "meddiff.json", run / "meddiff.json")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    built = model_card_text(run)
    (run / "README.md").symlink_to(secret)  # a link out of the run folder: the card from the record instead
    assert shown_card(run, 200_000) == (built, "meddiff.json")
    (run / "README.md").unlink()
    os.mkfifo(run / "README.md")  # would block a reader for ever
    assert shown_card(run, 200_000) == (built, "meddiff.json")
