"""Tests for meddiff.demo: the whole demo end to end at a tiny budget, the held-out spec, the fixed amount of
training and the time budget's safety stop."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meddiff.cli import main
import meddiff.demo
from meddiff.demo import (DEMO_MINUTES, DEMO_STEPS, EVAL_SECONDS, SAMPLE_SECONDS, DemoConfig, heldout_spec, run_demo,
                          train_minutes)
from meddiff.errors import ConfigError, DataError

CLASSES = [f"{m}/{f}" for m in ("ct", "mri", "us", "xray") for f in ("abnormal", "normal")]


def _tiny_demo(tmp_path: Path, steps: int) -> tuple[Path, int]:
    """`meddiff demo` on 16 tiny phantoms, one sample a class → (its folder, its exit code)."""
    out = tmp_path / "demo"
    return out, main(["demo", "--data", "builtin:phantoms?n=16", "--preset", "tiny", "--max-steps", str(steps),
                      "--per-class", "1", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--device",
                      "cpu", "--no-progress"])


def test_demo_end_to_end_writes_a_row_per_class_grid_samples_report_and_figures(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, code = _tiny_demo(tmp_path, steps=2)
    printed = capsys.readouterr().out
    assert code == 0
    with Image.open(out / "grid.png") as im:
        grid = np.asarray(im)
    assert grid.shape[0] == len(CLASSES) * (32 + 2) + 2  # one row of one 32 px tile per class, 2 px apart
    assert sorted(str(p.parent.relative_to(out / "samples")) for p in (out / "samples").glob("*/*/seed*.png")) \
        == CLASSES
    assert (out / "samples" / "manifest.csv").exists() and (out / "report" / "index.html").exists()
    figures = json.loads((out / "eval.json").read_text())
    assert figures["counts"]["fake"] == len(CLASSES) and figures["counts"]["real"] == 16
    assert figures["privacy"]["n_generated"] == len(CLASSES)
    assert figures["training"] == dict(steps=2, planned_steps=2, minutes=pytest.approx(figures["training"]["minutes"]),
                                       stopped="max-steps", warning=None)
    assert "WARNING" not in printed
    for text in ("demo: 2 training steps", "SSIM to the nearest real image", "real vs real", "KID",
                 "class consistency", "per class: ct/abnormal", "flagged as training copies", str(out / "grid.png")):
        assert text in printed, text


@pytest.mark.parametrize("data, expected", [
    ("builtin:phantoms?n=800", "builtin:phantoms?n=400&seed=1"),
    ("builtin:phantoms?n=16&size=32", "builtin:phantoms?n=16&size=32&seed=1"),
    ("builtin:ct?seed=4", "builtin:ct?seed=5&n=400"),
    ("some/folder", "some/folder"),
])
def test_heldout_spec_renders_images_the_model_never_saw(data: str, expected: str) -> None:
    assert heldout_spec(data) == expected


def test_training_gets_what_the_budget_leaves() -> None:
    left = train_minutes(DemoConfig(minutes=10), 48, spent_s=30)
    assert left == pytest.approx(10 - 0.5 - (48 * SAMPLE_SECONDS + EVAL_SECONDS) / 60)
    with pytest.raises(ConfigError, match=r"--minutes 2: too short; .* give --minutes 3\.\d or more"):
        train_minutes(DemoConfig(minutes=2), 48, spent_s=30)


def test_demo_refuses_data_with_one_class(tmp_path: Path, png_writer) -> None:
    png_writer(tmp_path / "flat", 4)
    cfg = DemoConfig(out=str(tmp_path / "demo"), data=str(tmp_path / "flat"), preset="tiny", max_steps=1)
    with pytest.raises(ConfigError, match=r"1 class \(all\); the demo trains a class-conditional model"):
        run_demo(cfg, echo=lambda _line: None)
    assert not (tmp_path / "demo").exists()


def test_demo_checks_real_images_before_training(tmp_path: Path, png_writer) -> None:
    for k, name in enumerate(("a", "b")):
        png_writer(tmp_path / "data" / name, 2, seed=k)
    cfg = DemoConfig(out=str(tmp_path / "demo"), data=str(tmp_path / "data"), real=str(tmp_path / "nowhere"),
                     preset="tiny", max_steps=1)
    with pytest.raises(DataError, match=r"--real '.*nowhere': no such folder"):
        run_demo(cfg, echo=lambda _line: None)
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("change, match", [
    (dict(per_class=0), r"--per-class 0: must be a whole number from 1 to 1000000"),
    (dict(guidance=-1.0), r"--guidance -1.0: must be a number from 0 to 100"),
    (dict(minutes=0.0), r"--minutes 0.0: must be a number in \(0, 1000000\]"),
])
def test_demo_refuses_bad_settings_before_any_work(tmp_path: Path, change: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), **change), echo=lambda _line: None)


class _Stop(Exception):
    pass


def test_the_demo_trains_a_fixed_number_of_steps_with_the_minutes_as_a_safety_stop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def fake_train(cfg, **_kw):
        seen.append(cfg)
        raise _Stop

    monkeypatch.setattr(importlib.import_module("meddiff.train"), "train", fake_train)  # the module
    cfg = DemoConfig(out=str(tmp_path / "demo"), data="builtin:phantoms?n=16", preset="tiny",
                     cache_dir=str(tmp_path / "cache"))
    assert (cfg.max_steps, cfg.minutes) == (DEMO_STEPS, DEMO_MINUTES)
    with pytest.raises(_Stop):
        run_demo(cfg, echo=lambda _line: None)
    assert seen[0].max_steps == DEMO_STEPS  # the same work on any machine: not what the minutes leave
    after = (len(CLASSES) * cfg.per_class * SAMPLE_SECONDS + EVAL_SECONDS) / 60  # sampling and evaluation
    assert seen[0].max_minutes == pytest.approx(DEMO_MINUTES - after, abs=0.5)  # less the data's seconds


@pytest.mark.parametrize("argv, steps, minutes", [([], DEMO_STEPS, DEMO_MINUTES),
                                                  (["--max-steps", "500", "--minutes", "20"], 500, 20.0)])
def test_demo_flags_set_the_steps_and_the_safety_stop_together(argv: list[str], steps: int, minutes: float,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def fake_run_demo(cfg, **_kw):
        seen.append(cfg)
        raise _Stop

    monkeypatch.setattr(meddiff.demo, "run_demo", fake_run_demo)
    with pytest.raises(_Stop):
        main(["demo", *argv])
    assert (seen[0].max_steps, seen[0].minutes) == (steps, minutes)


def test_the_safety_stop_says_the_model_is_under_trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(meddiff.demo, "train_minutes", lambda *_a: 1e-3)  # 60 ms: a machine far too slow for 50 steps
    out, code = _tiny_demo(tmp_path, steps=50)
    printed = capsys.readouterr().out
    assert code == 0
    training = json.loads((out / "eval.json").read_text())["training"]
    assert training["stopped"] == "max-minutes" and training["steps"] < 50
    expected = (f"stopped by the --minutes 60 safety limit after {training['steps']} of 50 steps: the samples are "
                "from an under-trained model")
    assert training["warning"].startswith(expected)
    assert printed.count(f"demo: WARNING: {expected}") == 2  # when training stops, and again below the figures
    assert printed.rstrip().splitlines()[-1].startswith("demo: WARNING: ")
