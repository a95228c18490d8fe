"""The HTML report: self-contained, with the metrics table, pictures, pairs saved beside it, the loss curve, and no
input file names; the training log reader and the printed summary."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meddiff.errors import RunError
from meddiff.evaluate import EvalConfig, evaluate
from meddiff.report import MAX_PAIRS, read_loss_log, summary_lines, write_report


def _pngs(folder: Path, n: int, seed: int, stem: str = "img") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    for i in range(n):
        cy, cx, r = rng.uniform(8, 24), rng.uniform(8, 24), rng.uniform(3, 7)
        im = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) + 0.1 * rng.random((32, 32))
        Image.fromarray(np.round(np.clip(im, 0, 1) * 255).astype(np.uint8)).save(folder / f"{stem}{i:02d}.png")


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("rep")
    for k, cls in enumerate(("a&b", "c")):
        _pngs(root / "real" / cls, 8, 10 + k, stem="patient_smith_")
        _pngs(root / "train" / cls, 8, 20 + k, stem="patient_jones_")
        _pngs(root / "fake" / cls, 8, 30 + k)
    run = root / "run"
    run.mkdir()
    log = [{"step": s, "loss": 1 / s} for s in (1, 10, 20)] + [{"step": 20, "val_loss": 0.1}]
    (run / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log) + '{"step": 30, "lo')  # cut off
    ev = evaluate(EvalConfig(real=str(root / "real"), fake=str(root / "fake"), train=str(root / "train"), n_boot=20))
    return ev, root


@pytest.fixture(scope="module")
def page(evaluation) -> tuple[str, Path]:
    ev, root = evaluation
    path = write_report(ev, root / "report", run_dir=root / "run")
    return path.read_text(encoding="utf-8"), root / "report"


def test_the_page_is_self_contained_with_table_pictures_and_protocol(page):
    text, _ = page
    assert text.startswith("<!DOCTYPE html>") and "<style>" in text
    assert "<table>" in text and "real vs real" in text and "FID" in text and "MS-SSIM" in text
    assert "meddiff-randconv-v1@64px" in text and "16 generated, 16 real, 16 training images" in text
    assert text.count('<img src="data:image/png;base64,') >= 6   # grids, histogram, pairs, loss curve
    assert not re.search(r'src="(?!data:)', text), "every picture is inline"


def test_class_names_are_escaped_and_input_file_names_never_appear(page):
    text, _ = page
    assert "a&amp;b" in text and "a&b<" not in text
    assert "patient_" not in text


def test_sections_for_classes_privacy_histograms_and_loss(page):
    text, _ = page
    for heading in ("Per class", "Privacy audit", "Intensity histograms", "Samples per class", "Nearest real images",
                    "Training loss"):
        assert f">{heading}" in text, heading
    assert "3 loss lines, 1 validation lines" in text


def test_closest_pairs_are_saved_beside_the_page(page):
    _, folder = page
    pairs = sorted((folder / "pairs").glob("*.png"))
    assert len(pairs) == min(16, MAX_PAIRS)
    assert pairs[0].name.startswith("00_generated")
    with Image.open(pairs[0]) as im:
        assert im.size == (2 * 32 + 3 * 2, 32 + 2 * 2)   # two tiles side by side, 2 px padding


def test_without_a_run_there_is_no_loss_curve(evaluation, tmp_path):
    ev, _ = evaluation
    text = write_report(ev, tmp_path / "r").read_text()
    assert "Training loss" not in text and (tmp_path / "r" / "index.html").exists()


def test_loss_log_reader_keeps_loss_and_validation_lines(evaluation, tmp_path):
    _, root = evaluation
    log = read_loss_log(root / "run")
    assert log == {"step": [1, 10, 20], "loss": [1.0, 0.1, 0.05], "val_step": [20], "val_loss": [0.1]}
    with pytest.raises(RunError, match="no log.jsonl; expected a run folder"):
        read_loss_log(tmp_path)
    (tmp_path / "log.jsonl").write_text('{"step": 1, "val_loss": 0.2}\n')
    with pytest.raises(RunError, match="holds no loss lines yet"):
        read_loss_log(tmp_path)


def test_summary_lines_name_counts_figures_and_the_audit(evaluation):
    ev, _ = evaluation
    lines = summary_lines(ev.figures)
    assert lines[0].startswith("16 generated vs 16 real images at 32 px, 16 training images")
    assert any(line.strip().startswith("SSIM to the nearest real image") for line in lines)
    assert any(line.strip().startswith("FID") and "real-vs-real" in line for line in lines)
    assert lines[-1].startswith("  privacy: ") and "NCC threshold" in lines[-1]
