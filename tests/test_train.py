"""Tests for meddiff.train: the run folder, diffusers compatibility, exact resume, interruption, failures."""
from __future__ import annotations

import errno
import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from meddiff import runfolder
from meddiff.cli import main as cli_main
from meddiff.config import TrainConfig, model_config
from meddiff.data.dataset import ImageSet
from meddiff.errors import ConfigError, DataError, OutputError, RunError
from meddiff.model import build_unet

T = importlib.import_module("meddiff.train")  # the module: `meddiff.train` is the function

UNET_FILE = "diffusion_pytorch_model.safetensors"


def _quiet(_line: str) -> None:
    pass


def _unet_weights(run: Path, folder: str = "unet") -> dict[str, torch.Tensor]:
    return load_file(str(run / folder / UNET_FILE))


def _raw_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(runfolder.latest_checkpoint(run) / "model.safetensors"))


def _assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---------------------------------------------------------------- the run folder

def test_run_folder_layout_and_no_pickles(trained_run: Path) -> None:
    assert (trained_run / "unet" / "config.json").is_file()
    assert (trained_run / "unet" / UNET_FILE).is_file()
    assert (trained_run / "scheduler" / "scheduler_config.json").is_file()
    index = json.loads((trained_run / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"][0] == "diffusers"
    pickles = [p for p in trained_run.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert pickles == []
    assert not [p for p in trained_run.rglob("*") if ".tmp" in p.name], "temporary files left behind"


def test_run_record_and_log(trained_run: Path) -> None:
    record = json.loads((trained_run / "meddiff.json").read_text())
    assert record["train"]["preset"] == "tiny" and record["train"]["size"] == 32
    assert record["train"]["lr"] is not None, "the stored config is the resolved one"
    assert record["class_names"] == ["a", "b"]
    assert record["model"]["num_classes"] == 2
    assert record["split"]["train"] + record["split"]["val"] == 16 and record["split"]["val"] > 0
    assert record["result"]["steps"] == 6 and record["result"]["stopped"] == "max-steps"
    lines = [json.loads(x) for x in (trained_run / "log.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    val_lines = [x for x in lines if "val_loss" in x]
    assert train_lines[0]["step"] == 1 and math.isfinite(train_lines[0]["loss"])
    assert [x["step"] for x in val_lines] == [3, 6]
    assert all(math.isfinite(x["val_loss"]) for x in val_lines)
    assert (trained_run / "best" / UNET_FILE).is_file()
    assert runfolder.latest_checkpoint(trained_run).name == "step_00000006"


def test_unconditional_run_has_no_class_embedding(uncond_run: Path) -> None:
    record = json.loads((uncond_run / "meddiff.json").read_text())
    assert record["model"]["num_classes"] == 0
    assert json.loads((uncond_run / "unet" / "config.json").read_text())["num_class_embeds"] is None


def test_ddim_pipeline_loads_the_run_folder(uncond_run: Path) -> None:
    from diffusers import DDIMPipeline

    pipe = DDIMPipeline.from_pretrained(str(uncond_run))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 32, 32, 1)
    assert images.min() >= 0 and images.max() <= 1


def test_patched_model_folder_gives_full_size_images(tmp_path: Path) -> None:
    from meddiff.pipeline import MeddiffPipeline

    cfg = TrainConfig(data="unused", out=str(tmp_path), preset="lean", size=16).resolve()
    mcfg = model_config("lean", 16)
    record = runfolder.RunRecord(train=cfg, model=mcfg, class_names=("all",))
    runfolder.write_record(tmp_path, record)
    torch.manual_seed(0)
    runfolder.save_model_folder(tmp_path, build_unet(mcfg), record)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "MeddiffPipeline"
    pipe = MeddiffPipeline.from_pretrained(str(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 1)


def test_conditional_run_folder_pipeline_matches_meddiff_sample(trained_run: Path) -> None:
    from meddiff.pipeline import MeddiffPipeline
    from meddiff.sample import generate, load_run

    pipe = MeddiffPipeline.from_pretrained(str(trained_run))
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    images = pipe(batch_size=2, class_name="b", num_inference_steps=3, generator=gens, output_type="np").images
    assert images.shape == (2, 32, 32, 1)
    ours = generate(load_run(trained_run), [3, 4], 1, "ddim", 3)
    np.testing.assert_allclose(images[..., 0], ours, atol=1e-5, rtol=0)


def test_existing_run_is_refused_with_a_resume_hint(trained_run: Path, image_folder: Path, train_config) -> None:
    before = (trained_run / "meddiff.json").read_text()
    with pytest.raises(ConfigError, match=rf"--out {trained_run}: already holds a meddiff run; continue it with "
                                          rf"`meddiff train --resume {trained_run}`"):
        T.train(train_config(image_folder, trained_run), echo=_quiet)
    assert (trained_run / "meddiff.json").read_text() == before


def test_size_mismatch_between_data_and_config_is_refused(tmp_path: Path, train_config) -> None:
    data = ImageSet(torch.zeros(4, 1, 16, 16), torch.zeros(4, dtype=torch.long), ("all",), torch.arange(4).numpy())
    with pytest.raises(ConfigError, match=r"--size 32: the data given are 16 px"):
        T.train(train_config("unused", tmp_path / "run"), data=data, echo=_quiet)


def test_failed_start_leaves_no_run_folder(tmp_path: Path, train_config) -> None:
    out = tmp_path / "run"
    with pytest.raises(DataError, match="no such file or folder"):
        T.train(train_config(tmp_path / "nowhere", out), echo=_quiet)
    assert not out.exists()


# ---------------------------------------------------------------- pure helpers

def test_skipped_files_are_counted_on_the_console_and_listed_in_the_run(tmp_path: Path, png_writer,
                                                                       train_config) -> None:
    data = tmp_path / "data"
    png_writer(data / "a", 4)
    (data / "a" / "broken.png").write_bytes(b"not a png")
    (data / "a" / "notes.txt").write_text("hello")
    out, lines = tmp_path / "run", []
    T.train(train_config(data, out, max_steps=1, val_every=1), echo=lines.append)
    assert f"skipped 2 of 6 files (unreadable or not images); listed in {out / runfolder.SKIPPED_FILE}" in lines
    listing = (out / runfolder.SKIPPED_FILE).read_text().splitlines()
    assert listing[0] == "a/broken.png: not a PNG file: cannot identify image"
    assert listing[1].startswith("a/notes.txt: not an image format") and len(listing) == 2


def test_batch_indices_cover_each_epoch_once() -> None:
    n, b = 14, 4
    per_epoch = math.ceil(n / b)
    for epoch in range(2):
        seen = torch.cat([T.batch_indices(n, b, epoch * per_epoch + j, seed=0) for j in range(per_epoch)])
        assert sorted(seen.tolist()) == list(range(n))
    assert torch.equal(T.batch_indices(n, b, 5, 0), T.batch_indices(n, b, 5, 0))
    assert not torch.equal(T.batch_indices(n, b, 0, 0), T.batch_indices(n, b, per_epoch, 0))


def test_step_draws_depend_on_seed_and_step_only() -> None:
    a = T.step_draws(7, 0, 4, 16, 1000, 0.1)
    torch.randn(100)  # the global RNG must not matter
    b = T.step_draws(7, 0, 4, 16, 1000, 0.1)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["eps"], T.step_draws(8, 0, 4, 16, 1000, 0.1)["eps"])
    assert not torch.equal(a["eps"], T.step_draws(7, 1, 4, 16, 1000, 0.1)["eps"])
    assert a["eps"].shape == (4, 1, 16, 16) and int(a["t"].max()) < 1000


def test_lr_schedule() -> None:
    cfg = TrainConfig(data="d", out="o", lr=1e-3, warmup_steps=10, lr_schedule="cosine")
    assert T.lr_at(cfg, 0, 0.0) == pytest.approx(1e-4)
    assert T.lr_at(cfg, 9, 0.1) == pytest.approx(1e-3)
    assert T.lr_at(cfg, 10, 0.0) == pytest.approx(1e-3)
    assert T.lr_at(cfg, 50, 0.5) == pytest.approx(1e-3 * (0.1 + 0.45))
    assert T.lr_at(cfg, 99, 1.0) == pytest.approx(1e-4)
    const = TrainConfig(data="d", out="o", lr=1e-3, warmup_steps=0, lr_schedule="constant")
    assert T.lr_at(const, 99, 1.0) == 1e-3
    by_fraction = TrainConfig(data="d", out="o", lr=1e-3, warmup_steps=0, warmup_fraction=0.1,
                              lr_schedule="constant")
    assert T.lr_at(by_fraction, 5, 0.05) == pytest.approx(5e-4)
    assert T.lr_at(by_fraction, 20, 0.2) == 1e-3


def test_rewarmed_ramps_from_where_the_run_stood_to_the_schedule() -> None:
    assert T.rewarmed(8e-4, 0.25, 0.25, 1e-4, 0.05, 1e-3) == pytest.approx(1e-4)  # the first step: where it stood
    assert T.rewarmed(8e-4, 0.275, 0.25, 1e-4, 0.05, 1e-3) == pytest.approx(4.5e-4)  # half way
    assert T.rewarmed(8e-4, 0.30, 0.25, 1e-4, 0.05, 1e-3) == 8e-4 == T.rewarmed(8e-4, 0.9, 0.25, 1e-4, 0.05, 1e-3)
    assert T.rewarmed(8e-4, 0.25, 0.25, 1e-4, 0.0, 1e-3) == 8e-4  # no span: the schedule as it is
    assert T.rewarmed(8e-4, 0.275, 0.25, 1e-4, 0.05, 5e-4) == pytest.approx(3e-4)  # climbing to the cap
    assert T.rewarmed(8e-4, 0.5, 0.25, 1e-4, 0.05, 5e-4) == 5e-4 and T.rewarmed(2e-4, 0.9, 0.25, 1e-4, 0.05, 5e-4) == 2e-4


def test_only_a_moved_goal_starts_a_new_warm_up() -> None:
    warm = TrainConfig(data="d", out="o", lr=1e-3, warmup_steps=4, lr_schedule="constant", max_steps=8)
    # resumed at step 1 inside the first warm-up: the rate doubles, on the schedule the checkpoint trained on
    assert not T.goal_moved_up(warm, 1, 0 / 8, T.lr_at(warm, 1, 1 / 8), T.lr_at(warm, 0, 0.0), None)
    cosine = TrainConfig(data="d", out="o", lr=1e-3, warmup_steps=0, warmup_fraction=0.05, max_steps=24)
    finished = T.lr_at(cosine, 5, 5 / 6)  # the last step of a 6-step run, now aimed at 24
    assert T.goal_moved_up(cosine, 6, 5 / 24, T.lr_at(cosine, 6, 6 / 24), finished, None)
    climbing = (0.25, finished, 0.25)  # a resume inside that climb carries on with it, no new one
    then = T.rewarmed(T.lr_at(cosine, 9, 9 / 24), 9 / 24, *climbing, 5e-4)
    assert not T.goal_moved_up(cosine, 10, 9 / 24, T.rewarmed(T.lr_at(cosine, 10, 10 / 24), 10 / 24, *climbing,
                                                                      5e-4), then, climbing)


def test_a_cosine_run_resumed_towards_a_farther_goal_warms_up_again(tmp_path: Path, image_folder: Path,
                                                                    train_config) -> None:
    """Stretching a finished cosine from 6 to 24 steps would jump the rate from 10 % of the peak to ~80 %: the
    resumed run starts where it stood and climbs back over the recipe's warm-up share, and a second resume
    inside that climb carries on with it."""
    out = tmp_path / "run"
    T.train(train_config(image_folder, out, max_steps=6, lr=1e-3, lr_schedule="cosine", warmup_steps=0,
                         warmup_fraction=0.25, checkpoint_every=1), echo=_quiet)
    lines: list[str] = []
    T.train(TrainConfig(data="", out=str(out), max_steps=24, progress=False), resume=True, echo=lines.append)
    assert any("warms up again" in line for line in lines)
    rates = {r["step"]: r["lr"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "lr" in r}
    recipe = TrainConfig(data="d", out="o", lr=1e-3, warmup_steps=0, warmup_fraction=0.25)
    end_of_first, stretched = T.lr_at(recipe, 5, 5 / 6), T.lr_at(recipe, 6, 6 / 24)
    assert stretched > 5 * end_of_first  # what the jump would have been
    # step 10 logs the rate step 9 trained at: half way up the climb to half the peak; past it, the stretched
    # schedule below half the peak
    cap = T.EXTENDED_PEAK * 1e-3
    assert end_of_first < rates[10] == pytest.approx(end_of_first + (cap - end_of_first) * (9 / 24 - 0.25) / 0.25)
    assert rates[20] == pytest.approx(min(cap, T.lr_at(recipe, 19, 19 / 24)))
    state = json.loads(sorted(out.glob("checkpoints/*/state.json"))[-1].read_text())
    assert state["lr_rewarm"][0] == pytest.approx(0.25) and state["lr_rewarm"][2] == pytest.approx(0.25)
    assert T._stored_rewarm(state) == tuple(state["lr_rewarm"]) and T._stored_rewarm({"lr_rewarm": "x"}) is None


# ---------------------------------------------------------------- exact resume

# constant lr: a cosine schedule is defined over the run's length, so a run extended from 4 to 8 steps
# legitimately differs from one planned for 8; warm-up, EMA, flips, label dropout and an epoch boundary
# (14 training images, batch 4) are all exercised.
RESUME = dict(max_steps=8, lr_schedule="constant", warmup_steps=2, lr=1e-3)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, image_folder: Path, train_config) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    result = T.train(train_config(image_folder, out, **RESUME), echo=_quiet)
    assert result.steps == 8
    return out


def test_resume_after_extending_max_steps_is_bit_exact(tmp_path: Path, image_folder: Path, train_config,
                                                       reference_run: Path) -> None:
    out = tmp_path / "run"
    first = T.train(train_config(image_folder, out, **{**RESUME, "max_steps": 4}), echo=_quiet)
    assert first.steps == 4
    lines: list[str] = []
    result = T.train(TrainConfig(data="", out=str(out), max_steps=8, progress=False), resume=True,
                     echo=lines.append)
    assert lines[0] == f"resuming {out} at step 4"
    assert result.steps == 8 and result.images_seen == 28  # two epochs of 4 + 4 + 4 + 2
    _assert_bit_equal(_unet_weights(out), _unet_weights(reference_run))
    _assert_bit_equal(_raw_weights(out), _raw_weights(reference_run))


def test_sigterm_mid_run_checkpoints_and_resume_is_bit_exact(tmp_path: Path, image_folder: Path, train_config,
                                                             reference_run: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    real_draws = T.step_draws

    def draws_then_signal(step: int, *args: object) -> dict[str, torch.Tensor]:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step; the loop must finish the step, save and stop
        return real_draws(step, *args)
    monkeypatch.setattr(T, "step_draws", draws_then_signal)
    result = T.train(train_config(image_folder, out, **RESUME), echo=_quiet)
    monkeypatch.setattr(T, "step_draws", real_draws)
    assert result.stopped == "interrupted" and result.steps == 3
    assert runfolder.latest_checkpoint(out).name == "step_00000003"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))

    result = T.train(TrainConfig(data="", out=str(out), progress=False), resume=True, echo=_quiet)
    assert result.steps == 8 and result.stopped == "max-steps"
    _assert_bit_equal(_unet_weights(out), _unet_weights(reference_run))
    _assert_bit_equal(_raw_weights(out), _raw_weights(reference_run))


def test_an_extension_survives_a_second_interruption(tmp_path: Path, image_folder: Path, train_config,
                                                     reference_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    T.train(train_config(image_folder, out, **{**RESUME, "max_steps": 4}), echo=_quiet)
    real_draws = T.step_draws

    def draws_then_signal(step: int, *args: object) -> dict[str, torch.Tensor]:
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_draws(step, *args)
    monkeypatch.setattr(T, "step_draws", draws_then_signal)
    extended = T.train(TrainConfig(data="", out=str(out), max_steps=8, progress=False), resume=True, echo=_quiet)
    assert extended.steps == 6 and extended.stopped == "interrupted"
    monkeypatch.setattr(T, "step_draws", real_draws)
    result = T.train(TrainConfig(data="", out=str(out), progress=False), resume=True, echo=_quiet)
    assert result.steps == 8
    _assert_bit_equal(_unet_weights(out), _unet_weights(reference_run))


def test_resuming_a_finished_run_changes_nothing(tmp_path: Path, reference_run: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    record = json.loads((out / "meddiff.json").read_text())
    record["train"]["out"] = str(out)  # as if it had been trained here
    (out / "meddiff.json").write_text(json.dumps(record))
    before = _unet_weights(out)
    result = T.train(TrainConfig(data="", out=str(out), progress=False), resume=True, echo=_quiet)
    assert result.steps == 8
    _assert_bit_equal(_unet_weights(out), before)


def test_resume_uses_the_folder_given_not_the_stored_path(tmp_path: Path, image_folder: Path, train_config,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    real_draws = T.step_draws

    def draws_then_signal(step: int, *args: object) -> dict[str, torch.Tensor]:
        if step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_draws(step, *args)
    monkeypatch.setattr(T, "step_draws", draws_then_signal)
    assert T.train(train_config(image_folder, old, max_steps=3), echo=_quiet).steps == 1
    monkeypatch.setattr(T, "step_draws", real_draws)
    shutil.move(str(old), str(new))
    result = T.train(TrainConfig(data="", out=str(new), progress=False), resume=True, echo=_quiet)
    assert result.steps == 3 and Path(result.run) == new
    assert not old.exists()
    assert runfolder.latest_checkpoint(new).name == "step_00000003"


def _cut_model(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:200])


def _drop_images_seen(folder: Path) -> None:
    state = json.loads((folder / "state.json").read_text())
    del state["images_seen"]
    (folder / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("damage, why", [(_cut_model, "model.safetensors: unreadable checkpoint weights ("),
                                         (_drop_images_seen, "state.json: no images_seen")])
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies_bit_exactly(
        tmp_path: Path, image_folder: Path, train_config, reference_run: Path, damage, why: str) -> None:
    out = tmp_path / "run"
    T.train(train_config(image_folder, out, **{**RESUME, "max_steps": 6}), echo=_quiet)  # checkpoints 3 and 6
    damage(runfolder.checkpoint_folder(out, 6))
    killed = [out / ".best.tmp12345", out / ".unet.4242.ab12cd34.old", out / "checkpoints" / ".step_00000009.1.ab.tmp"]
    for folder in killed:
        folder.mkdir()
    lines: list[str] = []
    result = T.train(TrainConfig(data="", out=str(out), max_steps=8, progress=False), resume=True,
                     echo=lines.append)
    assert [ln for ln in lines if ln.startswith("removed ")] == [
        f"removed {p}, left behind by an interrupted save" for p in sorted(killed[:2]) + killed[2:]]
    said = [ln for ln in lines if ln.startswith("checkpoint ")]
    assert len(said) == 1 and said[0].startswith(f"checkpoint step_00000006 is damaged ({why}")
    assert said[0].endswith("; resuming from step_00000003")
    assert f"resuming {out} at step 3" in lines
    assert result.steps == 8 and not any(p.exists() for p in killed)
    _assert_bit_equal(_unet_weights(out), _unet_weights(reference_run))
    _assert_bit_equal(_raw_weights(out), _raw_weights(reference_run))


def test_resume_when_no_checkpoint_verifies_is_one_error_naming_each(tmp_path: Path, trained_run: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    for folder in runfolder.complete_checkpoints(out):
        _cut_model(folder)
    with pytest.raises(RunError, match=r"run: no checkpoint can be resumed from: step_00000006 is damaged \(model\."
                                       r"safetensors: .*\); step_00000003 is damaged \(model.safetensors: .*\)$"):
        T.train(TrainConfig(data="", out=str(out), max_steps=8, progress=False), resume=True, echo=_quiet)


def test_a_new_run_whose_first_save_fails_leaves_no_folder(tmp_path: Path, image_folder: Path, train_config,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A half-made run folder would refuse the next attempt ("already holds a meddiff run")."""
    def disk_full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(runfolder, "write_json", disk_full)
    out = tmp_path / "new" / "run"
    with pytest.raises(OutputError, match=r"no space left on the device while writing .*run/meddiff.json \(No space "
                                          r"left on device\); the previous one is intact"):
        T.train(train_config(image_folder, out), echo=_quiet)
    assert not out.exists()
    monkeypatch.undo()
    assert T.train(train_config(image_folder, out, max_steps=1), echo=_quiet).steps == 1


def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_nothing_behind(
        tmp_path: Path, image_folder: Path, train_config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T, "diffusion_loss", lambda pred, *a, **k: pred.sum(dim=(1, 2, 3)) * float("nan"))
    given = tmp_path / "given"
    given.mkdir()
    (given / "notes.txt").write_text("the user's")
    for out in (tmp_path / "run", given):
        with pytest.raises(RunError, match=r"step 0: the loss is nan"):
            T.train(train_config(image_folder, out), echo=_quiet)
    assert not (tmp_path / "run").exists()
    assert [p.name for p in given.iterdir()] == ["notes.txt"]


def _cli_train_args(data: Path, out: Path, cache: Path) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--size", "32", "--batch-size", "4",
            "--max-steps", "16", "--val-every", "5", "--precision", "fp32", "--device", "cpu", "--no-progress",
            "--cache-dir", str(cache)]


def test_sigterm_to_the_cli_saves_a_checkpoint_and_resume_matches(tmp_path: Path, image_folder: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    out, ref, cache = tmp_path / "run", tmp_path / "ref", tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "meddiff.cli", *_cli_train_args(image_folder, out, cache)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    signalled: list[float] = []

    def terminate_after_first_log_line() -> None:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if (out / "log.jsonl").exists():
                proc.send_signal(signal.SIGTERM)
                signalled.append(time.time())
                return
            time.sleep(0.01)
    watcher = threading.Thread(target=terminate_after_first_log_line)
    watcher.start()
    try:
        # the uninterrupted reference trains here while the subprocess imports torch
        assert cli_main(_cli_train_args(image_folder, ref, cache)) == 0
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        watcher.join(timeout=5)
        if proc.poll() is None:
            proc.kill()
    assert signalled, f"the run never wrote a log line: {stderr}"
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    result = json.loads(stdout.splitlines()[-2])
    assert result["stopped"] == "interrupted" and 1 <= result["steps"] < 16
    assert f"interrupted at step {result['steps']}; a checkpoint is saved. Continue with: meddiff train --resume" \
        in stdout
    assert runfolder.latest_checkpoint(out).name == f"step_{result['steps']:08d}"

    assert cli_main(["train", "--resume", str(out)]) == 0
    capsys.readouterr()
    assert json.loads((out / "meddiff.json").read_text())["result"]["steps"] == 16
    _assert_bit_equal(_unet_weights(out), _unet_weights(ref))


# ---------------------------------------------------------------- failures and micro-batches

def test_non_finite_loss_raises_and_keeps_the_last_checkpoint(tmp_path: Path, image_folder: Path, train_config,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    snapshots: list[dict[str, bytes]] = []
    real_loss = T.diffusion_loss

    def loss_and_snapshot(*args: object, **kwargs: object) -> torch.Tensor:
        snapshots.append({str(p): p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()})
        return real_loss(*args, **kwargs)
    monkeypatch.setattr(T, "diffusion_loss", loss_and_snapshot)
    # a huge learning rate (past what --lr accepts, so set inside the loop): step 0 is finite and checkpointed,
    # its update blows the weights up
    monkeypatch.setattr(T, "lr_at", lambda *_args: 1e30)
    with pytest.raises(RunError, match=r"step 1: the loss is nan \(not finite\); stopped without saving\. The last "
                                       r"good checkpoint is .*step_00000001; lower --lr"):
        T.train(train_config(image_folder, out, warmup_steps=0, checkpoint_every=1, val_every=100), echo=_quiet)
    after = {str(p): p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert after == snapshots[-1] and after, "the checkpoint before the failure must be untouched"
    assert [p.name for p in runfolder.complete_checkpoints(out)] == ["step_00000001"]
    assert not (out / "unet").exists()


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path: Path, image_folder: Path, train_config,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T, "diffusion_loss", lambda pred, *a, **k: pred.sum(dim=(1, 2, 3)) * float("inf"))
    with pytest.raises(RunError, match=r"step 0: the loss is (inf|nan|-inf) .*last good checkpoint is none yet"):
        T.train(train_config(image_folder, tmp_path / "run"), echo=_quiet)


def test_micro_batches_give_the_same_weights_as_the_full_batch(tmp_path: Path, image_folder: Path,
                                                              train_config) -> None:
    full = tmp_path / "full"
    micro = tmp_path / "micro"
    T.train(train_config(image_folder, full, max_steps=3, val_every=100), echo=_quiet)
    T.train(train_config(image_folder, micro, max_steps=3, val_every=100, micro_batch=2), echo=_quiet)
    assert _max_diff(_raw_weights(full), _raw_weights(micro)) < 1e-5
    assert _max_diff(_unet_weights(full), _unet_weights(micro)) < 1e-5


# --- validation loss across schedules -------------------------------------------------------------------------

def test_timesteps_at_inverts_the_own_schedule_and_maps_another_monotonically() -> None:
    from meddiff.diffusion import alphas_cumprod
    cos, lin = alphas_cumprod("cosine", 1000).float(), alphas_cumprod("linear", 1000).float()
    idx = torch.tensor([0, 37, 500, 998, 999])
    assert torch.allclose(T.timesteps_at(cos, cos[idx]), idx.float(), atol=1e-3)
    t = T.timesteps_at(cos, lin)
    assert bool((t[1:] >= t[:-1]).all()) and 0 <= float(t.min()) and float(t.max()) <= 999
    assert 700 < float(t[500]) < 900  # the linear schedule is far noisier at mid t than the cosine one


class _OracleEps(torch.nn.Module):
    """For all-zero images x_t = sqrt(1 - ab) eps, so the perfect noise estimate is x_t / sqrt(1 - ab(t)), with
    ab(t) read off the model's own schedule at the (possibly fractional) timestep it is given."""

    def __init__(self, alpha_bar: torch.Tensor) -> None:
        super().__init__()
        self.ab = alpha_bar.double()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, class_labels=None):
        t = t.double()
        lo = t.floor().long().clamp(0, len(self.ab) - 2)
        a = self.ab[lo] + (t - lo) * (self.ab[lo + 1] - self.ab[lo])
        out = x / (1 - a).sqrt().view(-1, 1, 1, 1).to(x.dtype)
        return type("Out", (), {"sample": out})()


def test_validation_loss_at_reference_noise_levels_tells_the_model_its_own_timestep() -> None:
    from meddiff.diffusion import alphas_cumprod
    cos, lin = alphas_cumprod("cosine", 1000).float(), alphas_cumprod("linear", 1000).float()
    images = torch.zeros(8, 1, 8, 8)
    oracle = _OracleEps(cos)
    own = T.validation_loss(oracle, images, None, cos, "eps")
    same = T.validation_loss(oracle, images, None, cos, "eps", noise_levels=cos)
    mapped = T.validation_loss(oracle, images, None, cos, "eps", noise_levels=lin)
    assert own < 1e-4 and abs(same - own) < 1e-6
    assert mapped < 1e-2  # linear interpolation of ab in t inside the oracle: small, not zero
    # told the reference's timestep instead of its own, the same oracle is badly wrong
    wrong = T.validation_loss(_OracleEps(lin), images, None, lin, "eps", noise_levels=None)
    assert wrong < 1e-4
    assert T.validation_loss(_OracleEps(cos), images, None, lin, "eps") > 100 * mapped


def test_validation_losses_are_per_draw_with_evenly_spaced_timesteps() -> None:
    from meddiff.diffusion import alphas_cumprod
    cos, lin = alphas_cumprod("cosine", 1000).float(), alphas_cumprod("linear", 1000).float()
    images = torch.zeros(4, 1, 8, 8)
    wrong = _OracleEps(cos)  # told a linear-schedule timestep, it scales x_t by the cosine schedule's sigma
    t, losses = T.validation_losses(wrong, images, None, lin, "eps", reps=8)
    assert t.shape == losses.shape == (32,)
    assert sorted(t.tolist()) == [k * 1000 // 32 for k in range(32)]
    # x_t = sigma_lin(t) eps and the estimate is x_t / sigma_cos(t): each draw's MSE is about (ratio - 1)^2
    expected = ((1 - lin[t]).sqrt() / (1 - cos[t]).sqrt() - 1).pow(2).double()
    assert float(torch.corrcoef(torch.stack([losses, expected]))[0, 1]) > 0.95
    _, default = T.validation_losses(wrong, images, None, lin, "eps")
    assert abs(float(default.mean()) - T.validation_loss(wrong, images, None, lin, "eps")) < 1e-9


# ---------------------------------------------------------------- the ETA

@pytest.mark.parametrize("step, left, expected", [
    (40, None, "step 40 of 3000: 0.150 s a step, about 7.4 min to go"),
    (40, 600.0, "step 40 of 3000: 0.150 s a step, about 7.4 min to go"),   # the limit leaves enough
    (40, 300.0, "step 40 of 3000: 0.150 s a step, about 7.4 min to go; the time limit (5.0 min left) will stop "
                "training near step 2040"),
])
def test_eta_line(step: int, left: float | None, expected: str) -> None:
    assert T.eta_line(step, 3000, 0.15, left) == expected


def test_training_prints_an_eta_after_its_first_steps(image_folder: Path, tmp_path: Path, train_config,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T, "ETA_STEPS", (1, 3))
    lines: list[str] = []
    T.train(train_config(image_folder, tmp_path / "run", max_steps=5, max_minutes=30.0), echo=lines.append)
    eta = [line for line in lines if line.startswith("step ")]
    assert len(eta) == 1 and eta[0].startswith("step 3 of 5: ") and eta[0].endswith(" min to go"), lines


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_a_run_started_by_a_large_process_reports_its_own_peak_memory() -> None:
    # the parent holds 1.5 GiB when it starts the child; getrusage's ru_maxrss would hand the child that peak
    child = "from meddiff.train import peak_rss_mib; print(peak_rss_mib())"
    parent = ("import subprocess, sys\n"
              "big = bytearray(1536 * 2**20)\n"
              "big[::4096] = b'x' * len(big[::4096])\n"
              f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True).stdout)\n"
              "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    own, parents = (float(v) for v in out.stdout.split())
    assert parents > 1536 and 10 < own < 1024, (own, parents)
