"""Tests for meddiff.cli: help texts, one-line errors without tracebacks, info, sample → evaluate, data export."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meddiff.cli import _parser, main
from meddiff.config import SampleConfig, TrainConfig, options
from meddiff.demo import DemoConfig


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's default cache is XDG_CACHE_HOME/meddiff: keep it out of the user's home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """main(argv) → (exit code, stdout, stderr); argparse's exits become codes too."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code: int, err: str, match: str) -> None:
    assert code != 0
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("meddiff: error: ")
    assert match in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [[], ["train"], ["sample"], ["evaluate"], ["info"], ["data"], ["data", "export"],
                                  ["demo"]])
def test_help_exits_zero_and_shows_examples(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    code, out, err = _run([*argv, "--help"], capsys)
    assert code == 0 and err == ""
    assert "examples:" in out
    assert "usage: meddiff" in out


@pytest.mark.parametrize("argv, match", [
    (["train", "--data", "D", "--out", "O", "--preset", "huge"], "--preset 'huge': choose from seed, small, lean"),
    (["sample", "--run", "r", "--out", "o", "--steps", "0"], "--steps 0: must be a whole number from 1 to 1000"),
    (["sample", "--run", "r", "--out", "o", "--sampler", "plms"], "--sampler 'plms': choose from ddpm, ddim"),
    (["sample", "--run", "r", "--out", "o", "--n", "two"], "--n 'two': must be a whole number"),
    (["train", "--data", "DATA", "--out", "OUT", "--max-steps", "5", "--epochs", "2"], "not allowed with argument"),
    ([], "the following arguments are required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["data"], "data: the following arguments are required: ACTION"),
])
def test_usage_errors_are_one_line(argv: list[str], match: str, capsys: pytest.CaptureFixture) -> None:
    code, out, err = _run(argv, capsys)
    assert code == 2
    _assert_one_line_error(code, err, match)


def test_missing_data_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _out, err = _run(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"),
                            "--preset", "tiny", "--no-progress"], capsys)
    _assert_one_line_error(code, err, f"--data '{tmp_path / 'nowhere'}': no such file or folder")


def test_train_needs_data_and_out(capsys: pytest.CaptureFixture) -> None:
    code, _out, err = _run(["train", "--preset", "tiny"], capsys)
    _assert_one_line_error(code, err, "train: --data and --out are required (or --resume RUN_DIR)")


def test_resume_refuses_flags_it_would_ignore(trained_run: Path, capsys: pytest.CaptureFixture) -> None:
    before = (trained_run / "meddiff.json").read_text()
    code, _out, err = _run(["train", "--resume", str(trained_run), "--max-steps", "20", "--lr", "0.1",
                            "--preset", "seed"], capsys)
    _assert_one_line_error(code, err, f"train --resume {trained_run}: takes no other flags than --epochs, --max-steps, "
                                      "--max-minutes, --patience")
    assert "(got --preset, --lr)" in err
    assert (trained_run / "meddiff.json").read_text() == before


def test_resume_of_a_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _out, err = _run(["train", "--resume", str(tmp_path)], capsys)
    _assert_one_line_error(code, err, "meddiff.json: missing; is this a meddiff run folder?")


def test_sample_errors_are_one_line(trained_run: Path, uncond_run: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    base = ["sample", "--out", str(tmp_path / "o"), "--no-progress", "--steps", "1"]
    code, _out, err = _run([*base, "--run", str(trained_run), "--class", "zebra"], capsys)
    _assert_one_line_error(code, err, "--class 'zebra': unknown class; this model knows a, b")
    code, _out, err = _run([*base, "--run", str(uncond_run), "--class", "a"], capsys)
    _assert_one_line_error(code, err, "--class 'a': this model is unconditional")
    code, _out, err = _run([*base, "--run", str(trained_run), "--format", "gif"], capsys)
    _assert_one_line_error(code, err, "--format 'gif': choose from png, png16, dicom, nifti")
    code, _out, err = _run([*base, "--run", str(tmp_path / "missing")], capsys)
    _assert_one_line_error(code, err, "meddiff.json: missing")


@pytest.mark.parametrize("value", ["0", "-2"])
@pytest.mark.parametrize("command", ["train", "sample", "evaluate", "demo", "serve"])
def test_threads_below_one_are_refused_in_one_line(command: str, value: str, capsys: pytest.CaptureFixture) -> None:
    code, _out, err = _run([command, "--threads", value], capsys)
    _assert_one_line_error(code, err, f"--threads {value}: must be a whole number from 1 to 1024")


@pytest.mark.parametrize("argv, omp, expected", [
    (["--threads", "3"], "1", 3),   # the flag wins over OMP_NUM_THREADS
    ([], "1", None),                # OMP_NUM_THREADS: torch follows it already, meddiff leaves it alone
    ([], None, 7),                  # neither: what the load leaves (runtime.threads_from_load)
])
def test_threads_come_from_the_flag_the_environment_or_the_load(
        argv: list[str], omp: str | None, expected: int | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    import torch

    import meddiff.runtime

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(meddiff.runtime, "threads_from_load", lambda: 7)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    code, _out, _err = _run(["sample", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), *argv],
                            capsys)
    assert code == 1  # the missing run: the threads were set before the command ran
    assert calls == ([] if expected is None else [expected])


@pytest.mark.parametrize("weights", ["ema", "best", "raw"])
def test_sample_prints_only_meddiffs_own_words(trained_run: Path, tmp_path: Path, weights: str,
                                               capfd: pytest.CaptureFixture, diffusers_log_to_capture) -> None:
    """No 'install accelerate' or other diffusers log lines (issue 19)."""
    code = main(["sample", "--run", str(trained_run), "--out", str(tmp_path / "o"), "--n", "1", "--steps", "1",
                 "--weights", weights, "--no-progress", "--device", "cpu"])
    out, err = capfd.readouterr()
    assert code == 0
    assert err == "", err
    assert "accelerate" not in out and out.startswith("sampling 1 of 1 images")


def test_evaluate_on_missing_folders_is_one_line(image_folder: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("meddiff.report")
    code, _out, err = _run(["evaluate", "--real", str(image_folder), "--fake", str(tmp_path / "nofake")], capsys)
    _assert_one_line_error(code, err, f"--fake '{tmp_path / 'nofake'}': ")
    code, _out, err = _run(["evaluate", "--real", str(tmp_path / "noreal"), "--fake", str(image_folder / "a")],
                           capsys)
    _assert_one_line_error(code, err, f"'{tmp_path / 'noreal'}': no such")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _out, err = _run(["evaluate", "--real", str(image_folder), "--fake", str(empty)], capsys)
    _assert_one_line_error(code, err, "no images found")


def test_a_real_subprocess_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("meddiff")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "meddiff.cli"]
    proc = subprocess.run([*cmd, "sample", "--run", str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "meddiff: error: --steps 0: must be a whole number from 1 to 1000"]


def test_info_lists_classes_formats_and_skipped_files(tmp_path: Path, png_writer,
                                                      capsys: pytest.CaptureFixture) -> None:
    png_writer(tmp_path / "normal", 3)
    png_writer(tmp_path / "pneumonia", 2, seed=1)
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "normal" / "wide.tif")
    (tmp_path / "pneumonia" / "bad.png").write_bytes(b"nope")
    code, out, err = _run(["info", str(tmp_path), "--size", "32"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "6 images in 2 class(es)"
    assert "  class normal: 4" in lines and "  class pneumonia: 2" in lines
    assert "  format png: 5" in lines and "  format tiff: 1" in lines
    assert "skipped 1 file(s)" in lines
    assert any(line.startswith(f"  {tmp_path / 'pneumonia' / 'bad.png'}: ") for line in lines)


def _keys(tree: object) -> set[str]:
    if isinstance(tree, dict):
        return set(tree) | set().union(*(_keys(v) for v in tree.values()))
    if isinstance(tree, list):
        return set().union(*(_keys(v) for v in tree))
    return set()


def test_sample_then_evaluate_writes_json(trained_run: Path, image_folder: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    fake = tmp_path / "fake"
    code, out, err = _run(["sample", "--run", str(trained_run), "--out", str(fake), "--n", "3", "--steps", "2",
                           "--class", "a", "--no-progress", "--precision", "fp32", "--device", "cpu"], capsys)
    assert code == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["written"] == 3 and summary["out"] == str(fake)
    assert (fake / "grid.png").exists() and (fake / "manifest.csv").exists()

    pytest.importorskip("meddiff.report")
    report = tmp_path / "ssim.json"
    code, out, err = _run(["evaluate", "--real", str(image_folder), "--fake", str(fake), "--json", str(report)],
                          capsys)
    assert code == 0, err
    assert "SSIM" in out
    figures = json.loads(report.read_text())
    keys = _keys(figures)
    assert any("ssim" in k for k in keys), sorted(keys)
    n_fake = figures["counts"]["fake"] if "counts" in figures else figures["n_fake"]
    assert n_fake == 3, "grid.png must not count as a generated image"
    assert figures["size"] == 32


def test_evaluate_with_a_single_real_image(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("meddiff.report")
    real = tmp_path / "real"
    real.mkdir()
    shutil.copy(image_folder / "a" / "000.png", real / "only.png")
    code, out, err = _run(["evaluate", "--real", str(real), "--fake", str(image_folder / "b"), "--json",
                           str(tmp_path / "r.json")], capsys)
    # one real image is enough for SSIM to the nearest real image and the fakes' diversity; the figures that need
    # a real distribution (FID, KID, the real-vs-real references) are reported as unavailable, not made up
    assert code == 0 and "Traceback" not in err, err
    assert "SSIM to the nearest real image" in out and "real-vs-real n/a" in out
    figures = json.loads((tmp_path / "r.json").read_text())
    assert figures["counts"]["real"] == 1 and figures["counts"]["fake"] == len(list((image_folder / "b").glob("*.png")))
    assert 0 < figures["ssim"]["value"] <= 1 and figures["ssim"]["n_real"] == 1
    assert figures["ssim"]["reference"] is None and figures["ms_ssim"]["reference"] is None
    assert figures["fid"] is None and figures["kid"] is None


def test_data_export_prints_counts_and_the_training_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("meddiff.data.phantoms")
    out_dir = tmp_path / "xr"
    code, out, err = _run(["data", "export", "builtin:xray", "--n", "4", "--size", "32", "--out", str(out_dir)],
                          capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert json.loads(lines[0]) == {"out": str(out_dir), "classes": {"xray/normal": 2, "xray/abnormal": 2}}
    assert lines[1] == f"train on it with: meddiff train --data {out_dir} --label-depth 2 --out RUN_DIR"
    assert len(list(out_dir.rglob("*.png"))) == 4


def test_data_export_bad_spec_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _out, err = _run(["data", "export", "builtin:cats", "--out", str(tmp_path)], capsys)
    _assert_one_line_error(code, err, "unknown built-in data set 'cats'")


def test_train_flags_reach_the_run_record(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    code, _, err = _run(["train", "--data", str(image_folder), "--out", str(out), "--preset", "tiny", "--size", "32",
                         "--max-steps", "2", "--batch-size", "4", "--precision", "fp32", "--no-progress",
                         "--loss-weighting", "min-snr", "--min-snr-gamma", "2.5"], capsys)
    assert code == 0, err
    recorded = json.loads((out / "meddiff.json").read_text())["train"]
    assert (recorded["loss_weighting"], recorded["min_snr_gamma"]) == ("min-snr", 2.5)
    code, _, err = _run(["train", "--data", str(image_folder), "--out", str(tmp_path / "bad"), "--preset", "tiny",
                         "--min-snr-gamma", "-1"], capsys)
    _assert_one_line_error(code, err, "--min-snr-gamma -1.0: must be a number in (0, 10000]")


@pytest.mark.parametrize("argv, cls, required", [
    (["train"], TrainConfig, dict(data="d", out="o")),
    (["sample", "--run", "r", "--out", "o"], SampleConfig, dict(run="r", out="o")),
    (["demo"], DemoConfig, {}),
])
def test_flags_are_derived_from_the_config_table(argv: list[str], cls: type, required: dict) -> None:
    args = vars(_parser().parse_args(argv))
    offered = {f.name: f for f, opt in options(cls) if opt.cli}
    hidden = {f.name for f, opt in options(cls) if not opt.cli}
    assert hidden.isdisjoint(args)
    values = {name: args[name] for name in offered}
    if cls is not SampleConfig:
        values.update(required)
    assert cls(**values) == cls(**required)  # every default comes from the dataclass
    for name, f in offered.items():
        assert f.metadata["option"].help, f"{name} has no help text"


def test_micro_batch_auto_and_flip_flags_reach_the_config() -> None:
    args = _parser().parse_args(["train", "--micro-batch", "auto", "--no-flip", "--no-progress"])
    assert (args.micro_batch, args.flip, args.progress) == (0, False, False)
    assert _parser().parse_args(["train", "--flip"]).flip is True


_TRAIN = ["train", "--data", "builtin:ct?n=8", "--out", "OUT", "--preset", "tiny", "--no-progress"]
_SAMPLE = ["sample", "--run", "RUN", "--out", "OUT", "--no-progress"]
_DEMO = ["demo", "--out", "OUT", "--no-progress"]


@pytest.mark.parametrize("argv, match", [
    *[([*_TRAIN, flag, value], f"{flag} {shown}: must be") for flag, value, shown in [
        ("--lr", "nan", "nan"), ("--lr", "inf", "inf"), ("--lr", "-1", "-1.0"), ("--lr", "1e9", "1000000000.0"),
        ("--max-minutes", "nan", "nan"), ("--max-minutes", "inf", "inf"), ("--max-minutes", "-5", "-5.0"),
        ("--min-snr-gamma", "nan", "nan"), ("--ema-decay", "inf", "inf"), ("--ema-decay", "1", "1.0"),
        ("--val-fraction", "nan", "nan"), ("--val-fraction", "-0.1", "-0.1"),
        ("--seed", "1e20", "'1e20'"), ("--seed", "-1", "-1"),
        ("--seed", "18446744073709551616", "18446744073709551616"),
        ("--size", "100000", "100000"), ("--size", "20", "20"), ("--batch-size", "0", "0"),
        ("--batch-size", "1000000", "1000000"), ("--micro-batch", "-1", "-1"), ("--micro-batch", "0", "0"),
        ("--epochs", "1e30", "'1e30'"),
        ("--max-steps", "99999999999", "99999999999"), ("--warmup-steps", "-1", "-1"),
        ("--num-train-timesteps", "0", "0"), ("--label-depth", "100", "100"), ("--val-every", "0", "0"),
        ("--patience", "-1", "-1")]],
    ([*_TRAIN, "--device", "tpu"], "--device 'tpu': choose from auto, cpu, cuda, cuda:N"),
    ([*_TRAIN, "--size", "40", "--preset", "lean"], "--size 40: preset 'lean' reduces the image by 16"),
    ([*_TRAIN[:2], "builtin:ct?n=1e12", *_TRAIN[3:]], "n='1e12' must be a whole number from 1 to 1000000"),
    ([*_TRAIN[:2], "builtin:ct?n=99999999999", *_TRAIN[3:]], "n='99999999999' must be a whole number"),
    ([*_TRAIN[:2], "builtin:ct?size=100000", *_TRAIN[3:]], "size='100000' must be a whole number from 32 to 512"),
    *[([*_SAMPLE, flag, value], f"{flag} {shown}: must be") for flag, value, shown in [
        ("--n", "1e11", "'1e11'"), ("--n", "0", "0"), ("--n", "99999999999", "99999999999"),
        ("--steps", "nan", "'nan'"), ("--steps", "5000", "5000"), ("--guidance", "nan", "nan"),
        ("--guidance", "inf", "inf"), ("--guidance", "-1", "-1.0"), ("--guidance", "1e9", "1000000000.0"),
        ("--seed", "1e20", "'1e20'"), ("--seed", "-1", "-1"), ("--batch-size", "0", "0"),
        ("--cache-interval", "0", "0")]],
    ([*_SAMPLE, "--seed", str(2**63 - 1), "--n", "2"], f"--seed {2**63 - 1}: with --n 2 the seeds run past"),
    *[([*_DEMO, flag, value], f"{flag} {shown}: must be") for flag, value, shown in [
        ("--minutes", "nan", "nan"), ("--minutes", "inf", "inf"), ("--minutes", "0", "0.0"),
        ("--per-class", "0", "0"), ("--guidance", "nan", "nan"), ("--seed", "-1", "-1"), ("--max-steps", "0", "0")]],
    (["evaluate", "--real", "OUT", "--fake", "OUT", "--size", "100000"], "--size 100000: must be"),
    (["evaluate", "--real", "OUT", "--fake", "OUT", "--bootstrap", "1e9"], "--bootstrap '1e9': must be"),
    (["evaluate", "--real", "OUT", "--fake", "OUT", "--seed", "nan"], "--seed 'nan': must be"),
    (["audit", "--fake", "F", "--train", "T", "--real", "R", "--out", "OUT", "--size", "0"], "--size 0: must be"),
    (["info", "builtin:ct?n=1e12"], "n='1e12' must be a whole number"),
    (["info", "builtin:ct?n=8", "--size", "100000"], "--size 100000: must be"),
    (["data", "export", "builtin:ct", "--out", "OUT", "--n", "1e11"], "--n '1e11': must be"),
    (["data", "export", "builtin:ct", "--out", "OUT", "--n", "0"], "--n 0: must be"),
    (["data", "export", "builtin:ct", "--out", "OUT", "--size", "600"], "--size 600: must be a whole number from 32"),
    (["data", "export", "builtin:ct", "--out", "OUT", "--seed", "-1"], "--seed -1: must be"),
    (["data", "fetch", "pneumoniamnist", "--out", "OUT", "--retries", "0"], "--retries 0: must be"),
    (["serve", "--run", "RUN", "--port", "-1"], "--port -1: must be a whole number from 0 to 65535"),
])
def test_bad_numbers_stop_at_the_edge_in_one_line(argv: list[str], match: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import meddiff.data.dataset as dataset

    monkeypatch.setattr(dataset, "available_memory", lambda device: 2**30)  # 1 GiB free, on any machine
    out = tmp_path / "out"
    argv = [str(out) if a == "OUT" else str(tmp_path / "run") if a == "RUN" else a for a in argv]
    code, _out, err = _run(argv, capsys)
    _assert_one_line_error(code, err, match)
    assert not out.exists(), "nothing may be written before a bad number is refused"


def test_every_flag_of_every_command_has_a_help_text() -> None:
    def walk(parser: argparse.ArgumentParser, where: str) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    missing += walk(sub, f"{where} {name}")
            elif not action.help:
                missing.append(f"{where}: {'/'.join(action.option_strings) or action.dest}")
        return missing

    assert walk(_parser(), "meddiff") == []


# ---------------------------------------------------------------- output paths, checked before any work

def _out_commands(run: Path, data: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """command → (its argv without the output path, the flag that names it): every command that writes."""
    d, r = str(data), str(run)
    return {
        "train": (["train", "--data", d, "--preset", "tiny", "--size", "32", "--max-steps", "1", "--no-progress",
                   "--out"], "--out"),
        "sample": (["sample", "--run", r, "--n", "1", "--steps", "1", "--no-progress", "--out"], "--out"),
        "audit": (["audit", "--fake", d, "--train", d, "--real", d, "--out"], "--out"),
        "data export": (["data", "export", "builtin:phantoms", "--n", "8", "--size", "32", "--out"], "--out"),
        "data fetch": (["data", "fetch", "pneumoniamnist", "--url-base", "http://127.0.0.1:9/", "--download-dir",
                        str(tmp / "downloads"), "--out"], "--out"),
        "demo": (["demo", "--preset", "tiny", "--max-steps", "1", "--no-progress", "--out"], "--out"),
        "evaluate --report": (["evaluate", "--real", d, "--fake", d, "--report"], "--report"),
        "evaluate --json": (["evaluate", "--real", d, "--fake", d, "--json"], "--json"),
        "export-diffusers": (["export-diffusers", r], "OUT_DIR"),
        "serve": (["serve", "--run", r, "--port", "0", "--out"], "--out"),
    }


@pytest.mark.parametrize("where, says", [
    ("afile", "exists and is not a folder"),
    ("afile/sub", "afile is not a folder, so nothing can be made under it"),
    ("/proc/meddiff-cannot/x", "cannot be created ("),
])
@pytest.mark.parametrize("command", list(_out_commands(Path("r"), Path("d"), Path("t"))))
def test_an_output_path_that_cannot_be_written_is_one_line_before_any_work(
        command: str, where: str, says: str, trained_run: Path, image_folder: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "afile").write_text("a user's file\n")
    argv, flag = _out_commands(trained_run, image_folder, tmp_path)[command]
    if command == "evaluate --json":  # a file: one that exists is overwritten, a folder is not a file
        where, says = {"afile": ("adir", "is a folder; give a file name")}.get(where, (where, says))
        (work / "adir").mkdir()
    before = sorted(tmp_path.rglob("*"))
    code, _out, err = _run([*argv, where], capsys)
    _assert_one_line_error(code, err, f"{flag} {where}: ")
    assert says in err
    assert (work / "afile").read_text() == "a user's file\n"
    assert sorted(tmp_path.rglob("*")) == before, "nothing written, nothing created"


def test_stdout_closed_by_the_reader_ends_quietly_with_sigpipes_status(image_folder: Path, tmp_path: Path) -> None:
    """`meddiff info DIR | head -0`: the reader is gone before the first line; like a well-kept Unix tool, no
    BrokenPipeError traceback, exit status 141 (128 + SIGPIPE)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "meddiff.cli", "info", str(image_folder), "--size", "32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == "", err


def test_a_broken_pipe_in_process_returns_141(image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Gone:
        def write(self, _text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(sys, "stdout", Gone())
    assert main(["info", str(image_folder), "--size", "32"]) == 141


def test_a_model_of_label_maps_trains_and_draws_maps_from_the_command_line(tmp_path: Path, anatomy_run: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    maps = tmp_path / "maps"
    code, out, _err = _run(["train", "--data", "builtin:phantoms?n=16&masks=2", "--size", "32", "--preset", "tiny",
                            "--max-steps", "2", "--learn", "maps", "--precision", "fp32", "--no-progress",
                            "--out", str(maps)], capsys)
    assert code == 0 and json.loads(out.splitlines()[-1])["steps"] == 2
    code, _out, err = _run(["sample", "--run", str(maps), "--n", "2", "--out", str(tmp_path / "o")], capsys)
    _assert_one_line_error(code, err, "a model of label maps (trained with --learn maps)")
    code, out, _err = _run(["sample", "--run", str(anatomy_run), "--mask-run", str(maps), "--n", "2", "--steps", "2",
                            "--precision", "fp32", "--no-progress", "--out", str(tmp_path / "pairs")], capsys)
    assert code == 0 and json.loads(out.splitlines()[-1])["written"] == 2
    assert len(list((tmp_path / "pairs" / "masks").glob("*.png"))) == 2
    code, _out, err = _run(["train", "--data", "builtin:phantoms?n=16", "--size", "32", "--learn", "maps",
                            "--out", str(tmp_path / "none")], capsys)
    _assert_one_line_error(code, err, "--learn maps: --data builtin:phantoms?n=16 has no label maps")
    assert not (tmp_path / "none").exists()
