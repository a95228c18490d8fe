"""Tests for meddiff.sample: per-image seeds, samplers, classes and guidance, bulk output with resume and grid."""
from __future__ import annotations

import csv
import dataclasses
import errno
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meddiff.config import SAMPLERS, SampleConfig, TrainConfig, model_config
from meddiff.diffusion import diffusers_scheduler_config
from meddiff.errors import ConfigError, OutputError, RunError
from meddiff.model import build_unet
from meddiff.sample import (LoadedRun, class_index, generate, initial_noise, load_run, make_denoiser, make_scheduler,
                            model_id, plan, sample_loop, sample_to_folder, sampler_and_steps)


@pytest.fixture(scope="module")
def cond(trained_run: Path):
    return load_run(trained_run)


@pytest.fixture(scope="module")
def uncond(uncond_run: Path):
    return load_run(uncond_run)


def _quiet(_line: str) -> None:
    pass


def _cfg(run: Path, out: Path, **changes: object) -> SampleConfig:
    return dataclasses.replace(SampleConfig(run=str(run), out=str(out), n=2, steps=2, progress=False,
                                            precision="fp32", device="cpu"), **changes)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_load_run_knows_classes_and_model(cond, uncond) -> None:
    assert cond.class_names == ("a", "b") and cond.conditional and cond.model.num_classes == 2
    assert not uncond.conditional
    assert cond.model_id.startswith("meddiff-") and len(cond.model_id) == len("meddiff-") + 12
    assert cond.model_id != uncond.model_id
    assert not cond.unet.training


def test_same_seed_gives_identical_images(cond) -> None:
    a = generate(cond, [5, 6], 0, "ddim", 2)
    b = generate(cond, [5, 6], 0, "ddim", 2)
    assert a.shape == (2, 32, 32) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.array_equal(a[0], a[1]), "different seeds must give different images"


@pytest.fixture(scope="module")
def fixed_run() -> LoadedRun:
    """An untrained tiny UNet with fixed weights and the default recipe's schedule (cosine, v, trailing): a
    sampling test that does not move when training changes."""
    torch.manual_seed(0)
    mcfg = model_config("tiny", 32)
    return LoadedRun(build_unet(mcfg).eval(), diffusers_scheduler_config("cosine", 1000, "v", False, "trailing"),
                     ("all",), mcfg, TrainConfig(data="", out=""), "meddiff-000000000000")


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_seed_same_image_at_any_batch_size(fixed_run: LoadedRun, sampler: str) -> None:
    seeds = list(range(8))
    batch = generate(fixed_run, seeds, None, sampler, 2)
    single = np.concatenate([generate(fixed_run, [s], None, sampler, 2) for s in seeds])
    np.testing.assert_allclose(single, batch, atol=1e-5, rtol=0)


def test_same_seed_same_image_at_any_batch_size_with_classes_and_guidance(cond) -> None:
    batch = generate(cond, [0, 1, 2, 3], 1, "ddim", 3, guidance=2.0)
    single = generate(cond, [2], 1, "ddim", 3, guidance=2.0)
    np.testing.assert_allclose(single[0], batch[2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_gives_finite_images_in_unit_range(uncond, sampler: str) -> None:
    images = generate(uncond, [0, 1], None, sampler, 2)
    assert images.shape == (2, 32, 32)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0


def test_default_sampler_comes_from_the_runs_preset(fixed_run: LoadedRun) -> None:
    assert sampler_and_steps(fixed_run) == ("unipc", 10)  # a tiny-preset run
    seed_run = dataclasses.replace(fixed_run, train=TrainConfig(data="", out="", preset="seed"))
    assert sampler_and_steps(seed_run) == ("ddim", 20)
    assert sampler_and_steps(seed_run, "euler") == ("euler", 20) and sampler_and_steps(seed_run, None, 3) == ("ddim", 3)
    np.testing.assert_array_equal(generate(fixed_run, [4]), generate(fixed_run, [4], None, "unipc", 10))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "unipc"])
def test_generate_is_the_sample_loop_with_the_runs_denoiser(cond, sampler: str) -> None:
    seeds = [1, 2]
    noise, generators = initial_noise(seeds, cond.model.sample_size)
    loop = sample_loop(make_scheduler(sampler, cond.scheduler_config, 3), make_denoiser(cond, 0, 2, 2.0), noise,
                       generators)
    assert loop.shape == (2, 1, 32, 32) and loop.dtype == torch.float32
    np.testing.assert_array_equal(loop[:, 0].numpy(), generate(cond, seeds, 0, sampler, 3, 2.0))


@pytest.mark.parametrize("interval, steps, full", [(1, 5, 5), (2, 5, 3), (3, 5, 2), (3, 7, 3), (2, 1, 1)])
def test_deepcache_runs_the_full_unet_every_interval_th_call(cond, interval: int, steps: int, full: int) -> None:
    counts = {"calls": 0, "full": 0}

    def count(key: str):
        def hook(*_args) -> None:
            counts[key] += 1
        return hook
    hooks = [cond.unet.conv_in.register_forward_hook(count("calls")),  # every UNet pass, cached or not
             cond.unet.mid_block.register_forward_hook(count("full"))]  # only the full ones
    try:
        generate(cond, [0, 1], 1, "ddim", steps, guidance=2.0, cache_interval=interval)  # guided: still 1 pass a call
    finally:
        for h in hooks:
            h.remove()
    assert counts == {"calls": steps, "full": full}


def test_guidance_changes_conditional_images(cond) -> None:
    plain = generate(cond, [0], 1, "ddim", 2, guidance=1.0)
    guided = generate(cond, [0], 1, "ddim", 2, guidance=3.0)
    null = generate(cond, [0], class_index(cond, None), "ddim", 2, guidance=3.0)
    assert np.isfinite(guided).all()
    assert not np.array_equal(plain, guided)
    assert not np.array_equal(plain, null)


def test_class_errors(cond, uncond) -> None:
    assert class_index(cond, "b") == 1
    assert class_index(cond, None) == 2  # the null class
    assert class_index(uncond, None) is None
    with pytest.raises(ConfigError, match=r"--class 'c': unknown class; this model knows a, b"):
        class_index(cond, "c")
    with pytest.raises(ConfigError, match=r"--class 'a': this model is unconditional"):
        class_index(uncond, "a")
    with pytest.raises(ConfigError, match=r"--per-class: this model is unconditional; use --n"):
        plan(uncond, _cfg(Path("r"), Path("o"), per_class=2))


def test_unconditional_error_does_not_misstate_the_classes(uncond) -> None:
    with pytest.raises(ConfigError) as info:
        class_index(uncond, "a")
    assert "one class" not in str(info.value)


def test_scheduler_errors() -> None:
    config = dict(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    with pytest.raises(ConfigError, match=r"--sampler 'plms': choose from ddpm, ddim, dpmpp-2m, unipc, euler, heun"):
        make_scheduler("plms", config, 10)
    with pytest.raises(ConfigError, match=r"--steps 0: must be a whole number from 1 to 1000"):
        make_scheduler("ddim", config, 0)
    with pytest.raises(ConfigError, match=r"--steps 1001"):
        make_scheduler("ddim", config, 1001)
    assert len(make_scheduler("ddim", config, 7).timesteps) == 7


@pytest.mark.parametrize("changes, match", [
    (dict(fmt="jpeg"), r"--format 'jpeg': choose from png, png16, dicom, nifti"),
    (dict(n=0), r"--n 0: must be a whole number from 1 to 1000000"),
    (dict(guidance=-1.0), r"--guidance -1.0: must be a number from 0 to 100"),
    (dict(weights="last"), r"--weights 'last': choose from ema, best, raw"),
    (dict(class_name="zebra"), r"--class 'zebra': unknown class"),
])
def test_sample_to_folder_validates_before_writing(trained_run: Path, tmp_path: Path, changes: dict,
                                                   match: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=match):
        sample_to_folder(_cfg(trained_run, out, **changes), echo=_quiet)
    assert not out.exists() or not any(out.rglob("*.png"))


def test_sampling_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"meddiff\.json: missing; is this a meddiff run folder\?"):
        sample_to_folder(_cfg(tmp_path, tmp_path / "out"), echo=_quiet)


def test_files_are_named_by_seed_and_reproducible_one_by_one(trained_run: Path, tmp_path: Path) -> None:
    many = sample_to_folder(_cfg(trained_run, tmp_path / "many", n=4, seed=10, class_name="a", batch_size=4),
                            echo=_quiet)
    assert many["written"] == 4 and many["skipped"] == 0
    names = sorted(p.name for p in (tmp_path / "many").glob("seed*.png"))
    assert names == [f"seed{s:06d}.png" for s in range(10, 14)]
    sample_to_folder(_cfg(trained_run, tmp_path / "one", n=1, seed=12, class_name="a"), echo=_quiet)
    assert np.array_equal(_pixels(tmp_path / "many" / "seed000012.png"), _pixels(tmp_path / "one" / "seed000012.png"))


def test_per_class_writes_class_folders_and_a_manifest(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = sample_to_folder(_cfg(trained_run, out, per_class=2, batch_size=3), echo=_quiet)
    assert result["written"] == 4 and result["model_id"].startswith("meddiff-")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("seed*.png")) == [
        "a/seed000000.png", "a/seed000001.png", "b/seed000002.png", "b/seed000003.png"]
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["file"], r["class"], r["seed"]) for r in rows] == [
        ("a/seed000000.png", "a", "0"), ("a/seed000001.png", "a", "1"),
        ("b/seed000002.png", "b", "2"), ("b/seed000003.png", "b", "3")]
    assert {r["sampler"] for r in rows} == {"unipc"} and {r["model_id"] for r in rows} == {result["model_id"]}


def test_a_guidance_cutoff_changes_the_images_and_is_recorded_with_them(trained_run: Path, tmp_path: Path) -> None:
    run = load_run(trained_run)
    full = generate(run, [0], 1, "ddim", 4, guidance=4.0)
    cut = generate(run, [0], 1, "ddim", 4, guidance=4.0, guidance_cutoff=0.5)
    plain = generate(run, [0], 1, "ddim", 4, guidance=1.0)
    assert not np.allclose(cut, full) and not np.allclose(cut, plain)
    out = tmp_path / "out"
    lines: list[str] = []
    sample_to_folder(_cfg(trained_run, out, n=2, guidance=4.0, guidance_cutoff=0.5), echo=lines.append)
    with open(out / "manifest.csv", newline="") as f:
        assert {r["sampler"] for r in csv.DictReader(f)} == {"unipc+guidance-cutoff-0.5"}
    assert "unipc+guidance-cutoff-0.5" in lines[0]
    with pytest.raises(ConfigError, match=r"--guidance-cutoff 1(\.0)?: must be"):
        _cfg(trained_run, out, guidance_cutoff=1.0)


def test_rerun_skips_completed_files(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    sample_to_folder(_cfg(trained_run, out, n=3), echo=_quiet)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("seed*.png")}
    again = sample_to_folder(_cfg(trained_run, out, n=3), echo=_quiet)
    assert (again["written"], again["skipped"]) == (0, 3)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("seed*.png")} == first
    (out / "seed000001.png").unlink()  # as if cut off: only the missing file is redone
    lines: list[str] = []
    third = sample_to_folder(_cfg(trained_run, out, n=4), echo=lines.append)
    assert (third["written"], third["skipped"]) == (2, 2)
    assert lines[0].startswith("sampling 2 of 4 images (2 already done)")
    assert sorted(p.name for p in out.glob("seed*.png")) == [f"seed{s:06d}.png" for s in range(4)]


def test_a_disk_that_fills_up_while_writing_samples_is_one_error_and_a_rerun_continues(
        trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from meddiff import atomic, export

    real_write, calls = export.write_image, []

    def full_on_the_third(image: np.ndarray, path: Path, fmt: str, info: object) -> Path:
        calls.append(path.name)
        if len(calls) == 3:  # as the kernel does: part of the file, then ENOSPC
            return atomic.write_file(path, lambda f: (f.write(b"\x89PNG half"),
                                                               _raise(OSError(errno.ENOSPC, "No space left"))))
        return real_write(image, path, fmt, info)
    monkeypatch.setattr(export, "write_image", full_on_the_third)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"^no space left on the device while writing .*out/b/seed000002.png \(No "
                                          r"space left on device\); the images written before it are complete"):
        sample_to_folder(_cfg(trained_run, out, per_class=2, steps=1), echo=_quiet)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "a", "a/seed000000.png", "a/seed000001.png", "manifest.csv"], "no half file, no temporary, no empty b/"
    monkeypatch.undo()
    again = sample_to_folder(_cfg(trained_run, out, per_class=2, steps=1), echo=_quiet)
    assert (again["written"], again["skipped"]) == (2, 2)


def test_a_disk_full_at_the_first_image_leaves_no_folder(trained_run: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from meddiff import export

    def full(image: np.ndarray, path: Path, fmt: str, info: object) -> Path:
        path.parent.mkdir(parents=True)
        raise OSError(errno.EFBIG, "File too large")
    monkeypatch.setattr(export, "write_image", full)
    out = tmp_path / "new" / "out"
    with pytest.raises(OutputError, match=r"\(File too large\)"):
        sample_to_folder(_cfg(trained_run, out, per_class=1, steps=1), echo=_quiet)
    assert list(tmp_path.iterdir()) == []


def _raise(err: Exception) -> None:
    raise err


@pytest.mark.parametrize("n", [1, 3, 8])
def test_grid_is_one_row_for_up_to_eight_images(trained_run: Path, tmp_path: Path, n: int) -> None:
    sample_to_folder(_cfg(trained_run, tmp_path, n=n, steps=1, batch_size=8), echo=_quiet)
    grid = _pixels(tmp_path / "grid.png")
    pad = 2
    assert grid.shape == (32 + 2 * pad, n * (32 + pad) + pad)
    assert grid.dtype == np.uint8


def test_per_class_grid_has_one_labelled_row_per_class(trained_run: Path, tmp_path: Path) -> None:
    sample_to_folder(_cfg(trained_run, tmp_path, per_class=3, steps=1), echo=_quiet)
    grid = _pixels(tmp_path / "grid.png")
    pad, tiles = 2, 3 * (32 + 2) + 2
    assert grid.shape[0] == 2 * (32 + pad) + pad  # classes a and b, one row each
    margin = grid[:, :grid.shape[1] - tiles]
    assert margin.shape[1] > 0  # the class names, dark on a white margin, one level with each row:
    assert margin[:pad + 32].min() < 128 and margin[pad + 32 + pad:].min() < 128


def test_no_grid_when_turned_off(trained_run: Path, tmp_path: Path) -> None:
    sample_to_folder(_cfg(trained_run, tmp_path, n=1, steps=1, grid=False), echo=_quiet)
    assert not (tmp_path / "grid.png").exists()


def test_weights_best_and_raw_load_and_differ_from_ema(trained_run: Path, cond) -> None:
    raw = load_run(trained_run, weights="raw")
    best = load_run(trained_run, weights="best")
    ema_w = dict(cond.unet.named_parameters())
    assert any(not np.array_equal(p.detach().numpy(), ema_w[k].detach().numpy())
               for k, p in raw.unet.named_parameters())
    assert best.class_names == cond.class_names
    assert raw.model_id != cond.model_id


def test_best_weights_missing_is_a_run_error(tmp_path: Path, trained_run: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("best", "checkpoints"))
    with pytest.raises(RunError, match=r"best/ is missing"):
        load_run(run, weights="best")
    with pytest.raises(RunError, match=r"no complete checkpoint for --weights raw"):
        load_run(run, weights="raw")


def test_loading_a_run_logs_no_warnings(trained_run: Path) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)
    logger = logging.getLogger("diffusers")  # diffusers' loggers print to stderr and do not propagate
    handler = Keep(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        load_run(trained_run)
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == []


def test_model_id_is_a_hash_of_the_weights(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"weights")
    b.write_bytes(b"weights")
    assert model_id(a) == model_id(b)
    b.write_bytes(b"weightz")
    assert model_id(a) != model_id(b)


def test_loaded_runs_use_meddiffs_attention_processor(cond) -> None:
    from diffusers.models.attention_processor import Attention

    from meddiff.model import SelfAttention

    unet = cond.unet
    blocks = [m for m in unet.modules() if isinstance(m, Attention)]
    assert blocks and all(isinstance(m.processor, SelfAttention) for m in blocks)
