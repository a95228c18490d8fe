"""Issue 20's scaling rules and data path: the log-SNR shift and the patch that grow with the image size, the
cache built and read image by image (sets larger than memory), decoding in worker processes, upsampling noted."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meddiff.config import PATCH_GRID, TrainConfig, model_config, noise_shift_for, patch_for
from meddiff.data import cache, dataset
from meddiff.data.dataset import ImageSet, decode_in_order, load_data
from meddiff.diffusion import alphas_cumprod, betas_for, diffusers_scheduler_config, shift_log_snr
from meddiff.errors import RunError
from meddiff.sample import SAMPLERS, make_scheduler


# ---------------------------------------------------------------- the schedule shift

@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_a_shift_moves_every_log_snr_by_the_same_amount(schedule: str) -> None:
    plain, shifted = alphas_cumprod(schedule, 1000), alphas_cumprod(schedule, 1000, shift=-2.0)
    log_snr = lambda ab: torch.log(ab / (1 - ab))  # noqa: E731
    diff = log_snr(shifted) - log_snr(plain)
    # exact wherever the 0.999 clip of the betas did not bite (the cosine schedule's last steps)
    assert torch.allclose(diff[:900], torch.full_like(diff[:900], -2.0), atol=1e-6)
    assert bool((shifted < plain).all())  # a negative shift means noisier at every step
    assert torch.equal(betas_for(schedule, 1000, 0.0), betas_for(schedule, 1000))


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s != "heun"])
def test_every_sampler_sees_the_shifted_schedule_that_training_used(sampler: str, zero_snr: bool) -> None:
    shift = 2 * math.log(64 / 256)
    config = diffusers_scheduler_config("cosine", 1000, "v", zero_snr, "trailing", shift)
    sched = make_scheduler(sampler, config, 10)
    want = alphas_cumprod("cosine", 1000, zero_snr, shift)
    assert torch.allclose(sched.alphas_cumprod.double(), want, atol=2e-6)


def test_an_unshifted_config_carries_no_betas() -> None:
    assert "trained_betas" not in diffusers_scheduler_config("cosine", 1000, "v", False, "trailing", 0.0)


def test_an_interpolated_shift_moves_from_its_clean_value_to_its_noisy_value() -> None:
    plain = alphas_cumprod("cosine", 1000)
    interp = alphas_cumprod("cosine", 1000, shift=(0.0, -2.0))
    log_snr = lambda ab: torch.log(ab / (1 - ab))  # noqa: E731
    diff = log_snr(interp) - log_snr(plain)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    assert torch.allclose(diff[:900], -2.0 * t[:900], atol=1e-6)  # linear in t: ~0 at the clean end, -2 at noise
    assert abs(float(diff[0])) < 0.01 and bool((interp[1:] <= plain[1:]).all())
    # a run records it as --noise-shift-clean, and its scheduler carries the same betas
    cfg = TrainConfig(data="x", out="y", size=256, noise_shift_clean=0.0).resolve()
    assert cfg.shift == (0.0, pytest.approx(2 * math.log(64 / 256)))
    config = diffusers_scheduler_config("cosine", 1000, "v", False, "trailing", cfg.shift)
    assert np.allclose(config["trained_betas"], betas_for("cosine", 1000, cfg.shift).numpy())
    assert TrainConfig(data="x", out="y", size=256).resolve().shift == pytest.approx(2 * math.log(64 / 256))


def test_shift_log_snr_keeps_the_ends() -> None:
    ab = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    out = shift_log_snr(ab, -1.0)
    assert out[0] == 0 and out[2] == 1 and abs(float(out[1]) - 1 / (1 + math.e)) < 1e-12


# ---------------------------------------------------------------- the size rules

def test_the_patch_grows_with_the_size_so_the_unet_grid_stays_fixed() -> None:
    assert [patch_for("lean", s) for s in (32, 64, 96, 128, 256, 512)] == [2, 2, 2, 4, 8, 16]
    for size in (128, 256, 512):
        m = model_config("lean", size)
        assert size // m.patch_size == PATCH_GRID
    assert patch_for("seed", 512) == 1 and patch_for("small", 256) == 1  # presets without patches keep none
    assert model_config("lean", 256, patch=4).patch_size == 4  # --patch overrides the rule


def test_the_recipe_shifts_the_schedule_above_64_px_and_never_for_the_seed() -> None:
    assert noise_shift_for("lean", 64) == 0 and noise_shift_for("lean", 32) == 0
    assert noise_shift_for("lean", 256) == pytest.approx(2 * math.log(64 / 256))
    assert noise_shift_for("seed", 256) == 0
    cfg = TrainConfig(data="x", out="y", size=128).resolve()
    assert cfg.noise_shift == pytest.approx(-2 * math.log(2))
    assert TrainConfig(data="x", out="y", size=128, noise_shift=0.5).resolve().noise_shift == 0.5


def test_large_patches_predict_the_clean_image_unless_told_otherwise() -> None:
    resolved = lambda **kw: TrainConfig(data="x", out="y", **kw).resolve().objective  # noqa: E731
    assert [resolved(size=s) for s in (32, 64, 128, 256, 512)] == ["v", "v", "x0", "x0", "x0"]
    assert resolved(size=256, preset="seed") == "eps"           # the student recipe stays as it was
    assert resolved(size=256, objective="v") == "v"             # a choice is kept
    assert resolved(size=256, patch=2) == "v"                   # the rule follows the patch, not the size
    assert resolved(size=256, preset="small") == "v"            # presets without patches keep their recipe


def test_a_run_at_128_px_keeps_its_shift_and_patch_and_samples_with_them(tmp_path: Path) -> None:
    from meddiff.runfolder import read_record, scheduler_config
    from meddiff.sample import generate, load_run
    from meddiff.train import train

    images = torch.rand(6, 1, 128, 128) * 2 - 1
    data = ImageSet(images, torch.zeros(6, dtype=torch.long), ("all",), np.arange(6))
    cfg = TrainConfig(data="mem", out=str(tmp_path / "run"), size=128, max_steps=2, batch_size=2,
                      progress=False, precision="fp32", val_fraction=0.0).resolve()
    train(cfg, data=data, echo=lambda _m: None)
    record = read_record(tmp_path / "run")
    assert record.model.patch_size == 4 and record.train.noise_shift == pytest.approx(-2 * math.log(2))
    config = scheduler_config(tmp_path / "run")
    assert record.train.objective == "x0" and config["prediction_type"] == "sample"
    assert np.allclose(config["trained_betas"], betas_for("cosine", 1000, record.train.noise_shift).numpy())
    out = generate(load_run(tmp_path / "run"), [0, 1], steps=2)
    assert out.shape == (2, 128, 128) and np.isfinite(out).all()


def test_a_scheduler_whose_betas_differ_from_the_record_is_refused(tmp_path: Path) -> None:
    import json

    from meddiff.runfolder import scheduler_config
    from meddiff.train import train

    data = ImageSet(torch.rand(4, 1, 128, 128) * 2 - 1, torch.zeros(4, dtype=torch.long), ("all",), np.arange(4))
    cfg = TrainConfig(data="mem", out=str(tmp_path / "run"), size=128, max_steps=1, batch_size=2,
                      progress=False, precision="fp32", val_fraction=0.0).resolve()
    train(cfg, data=data, echo=lambda _m: None)
    path = tmp_path / "run" / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    for tampered in (None, [b * 1.5 for b in config["trained_betas"]], "abc"):
        path.write_text(json.dumps({**config, "trained_betas": tampered}))
        with pytest.raises(RunError, match="trained_betas"):
            scheduler_config(tmp_path / "run")


# ---------------------------------------------------------------- the cache, built and read image by image

def test_a_sink_writes_its_images_as_they_come(tmp_path: Path) -> None:
    sizes = []

    def build(sink: cache.Sink) -> dict:
        for k in range(5):
            sink.add(np.full((3, 16, 16), k / 4, np.float32))
            sink.file.flush()
            sizes.append(os.fstat(sink.file.fileno()).st_size)
        return dict(classes=["a"] * 15)

    stored, side = cache.load_or_build(tmp_path, "key", 16, build)
    one = 16 * 16 * 2
    # the entry grows by each chunk as it is added: nothing waits in memory for the end
    assert sizes == [cache.HEADER_BYTES + 3 * one * (k + 1) for k in range(5)]
    assert len(stored) == 15 and side["classes"] == ["a"] * 15
    assert np.load(tmp_path / "key.npy").shape == (15, 16, 16)  # a plain .npy for any other tool
    assert stored.read([14, 0]).tolist() == [np.full((16, 16), 65535).tolist(), np.zeros((16, 16)).tolist()]


def test_stored_images_read_only_what_is_asked(tmp_path: Path) -> None:
    arr = np.arange(7 * 8 * 8, dtype=np.uint16).reshape(7, 8, 8)
    np.save(tmp_path / "x.npy", arr)
    stored = cache.StoredImages.open(tmp_path / "x.npy")
    assert np.array_equal(stored.read([5, 1, 5]), arr[[5, 1, 5]])
    assert np.array_equal(stored.all(), arr)
    with pytest.raises(IndexError):
        stored.read([7])


@pytest.mark.parametrize("damage", ["truncate", "float32", "non-square"])
def test_a_damaged_entry_is_refused_on_open(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "x.npy"
    if damage == "truncate":
        np.save(path, np.zeros((4, 8, 8), np.uint16))
        path.write_bytes(path.read_bytes()[:-10])
    else:
        np.save(path, np.zeros((4, 8, 8), np.float32) if damage == "float32" else np.zeros((4, 8, 6), np.uint16))
    with pytest.raises(ValueError):
        cache.StoredImages.open(path)


def test_a_cached_set_stays_on_disk_and_take_matches_the_whole(tmp_path: Path, png_writer) -> None:
    png_writer(tmp_path / "data", 6)
    data = load_data(str(tmp_path / "data"), 16, cache_dir=tmp_path / "cache")
    assert not data.in_memory and data.size == 16 and len(data) == 6
    part = data.take([4, 0])
    assert not data.in_memory  # reading a batch does not load the set
    assert torch.equal(part, data.images[[4, 0]])


def test_training_reads_batches_from_the_cache_without_loading_the_set(tmp_path: Path, png_writer,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from meddiff.train import train

    png_writer(tmp_path / "data", 8)
    data = load_data(str(tmp_path / "data"), 16, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(cache.StoredImages, "all", lambda self: pytest.fail("the whole set was loaded"))
    cfg = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), preset="tiny", size=16, max_steps=2,
                      batch_size=4, progress=False, precision="fp32").resolve()
    result = train(cfg, data=data, echo=lambda _m: None)
    assert result.steps == 2


def test_decoding_in_workers_keeps_the_order(tmp_path: Path) -> None:
    items = list(range(150))
    assert list(decode_in_order(items, _square, workers=2, window=32)) == [i * i for i in items]


def _square(i: int) -> int:
    return i * i


def test_a_bad_file_among_many_decoded_in_workers_is_skipped_and_counted(tmp_path: Path, png_writer) -> None:
    png_writer(tmp_path / "data", 70)  # ≥ 64 files: decoded by worker processes
    (tmp_path / "data" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    data = load_data(str(tmp_path / "data"), 16, cache_dir=tmp_path / "cache")
    assert len(data) == 70 and data.summary["skipped"] == 1
    assert [Path(p).name for p, _r in data.skipped] == ["broken.png"]
    serial = load_data(str(tmp_path / "data"), 16)  # no cache: built in memory, same images
    assert torch.equal(serial.images, data.images)


def test_images_smaller_than_the_size_are_counted_as_upsampled(tmp_path: Path) -> None:
    for i, side in enumerate((12, 40)):
        Image.fromarray(np.full((side, side), 100 + i, np.uint8)).save(tmp_path / f"{i}.png")
    assert load_data(str(tmp_path), 32).summary["upsampled"] == 1
    assert dataset.upsampled({"233x197": 10, "junk": 3}, 256) == 10
    assert dataset.upsampled({"233x197": 10}, 128) == 0


def test_phantoms_render_natively_at_512(tmp_path: Path) -> None:
    data = load_data("builtin:xray?n=2&size=512", 512)
    assert data.size == 512 and data.summary["source_shapes"] == {"512x512": 2}
    assert dataset.parse_spec("builtin:ct?size=512")[2] == {"size": "512"}


def test_evaluation_sets_too_large_for_memory_are_refused_before_rendering(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from meddiff.errors import DataError
    from meddiff.imagesets import load_images

    monkeypatch.setattr(dataset, "available_memory", lambda device: 2**30)
    monkeypatch.setattr(dataset, "render_phantoms", lambda *a, **k: pytest.fail("rendered"))
    with pytest.raises(DataError, match=r"--real 'builtin:ct\?n=100000': 100000 images need about"):
        load_images("builtin:ct?n=100000", "--real", 64, 1, tmp_path / "cache")


@pytest.mark.parametrize("sidecar", ['{"classes": 3}', '[1, 2]', '{"classes": ["a"], "groups": [1]}', '\xff'])
def test_a_cache_sidecar_that_does_not_fit_is_rebuilt(tmp_path: Path, png_writer, sidecar: str) -> None:
    png_writer(tmp_path / "data", 3)
    first = load_data(str(tmp_path / "data"), 16, cache_dir=tmp_path / "cache")
    (meta,) = (tmp_path / "cache").glob("*.json")
    meta.write_bytes(sidecar.encode("latin1"))
    again = load_data(str(tmp_path / "data"), 16, cache_dir=tmp_path / "cache")
    assert len(again) == 3 and torch.equal(again.images, first.images) and again.class_names == first.class_names


def test_conditioning_every_sampler_deepcache_and_every_format_work_at_256_px(tmp_path: Path) -> None:
    from meddiff.config import FORMATS, SampleConfig
    from meddiff.sample import generate, load_run, sample_to_folder
    from meddiff.train import train

    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.rand(4, 1, 256, 256, generator=g) * 2 - 1, torch.tensor([0, 1, 0, 1]), ("a", "b"),
                    np.arange(4))
    run = tmp_path / "run"
    cfg = TrainConfig(data="mem", out=str(run), size=256, max_steps=1, batch_size=2, micro_batch=1,
                      grad_checkpointing=True, progress=False, precision="fp32", val_fraction=0.0).resolve()
    train(cfg, data=data, echo=lambda _m: None)
    loaded = load_run(run)
    assert loaded.model.patch_size == 8 and loaded.conditional
    for sampler in SAMPLERS:
        out = generate(loaded, [3], label=1, sampler=sampler, steps=2, guidance=2.0,
                       cache_interval=2 if sampler != "heun" else 1)
        assert out.shape == (1, 256, 256) and np.isfinite(out).all(), sampler
    for fmt in FORMATS:
        folder = tmp_path / fmt
        sample_to_folder(SampleConfig(run=str(run), out=str(folder), n=1, steps=2, class_name="b", fmt=fmt,
                                      guidance=2.0, progress=False), echo=lambda _m: None)
        written = [f for f in folder.rglob("*") if f.is_file() and f.name not in ("manifest.csv", "grid.png")]
        assert written, fmt
        if fmt.startswith("png"):
            assert Image.open(written[0]).size == (256, 256)


@pytest.mark.parametrize("size", [128, 512])
def test_micro_batch_auto_and_checkpointing_train_at_every_size(tmp_path: Path, size: int) -> None:
    from meddiff.runfolder import read_record
    from meddiff.train import train

    images = torch.rand(4, 1, size, size) * 2 - 1
    data = ImageSet(images, torch.zeros(4, dtype=torch.long), ("all",), np.arange(4))
    cfg = TrainConfig(data="mem", out=str(tmp_path / "run"), size=size, max_steps=1, batch_size=4, micro_batch=0,
                      grad_checkpointing=True, progress=False, precision="fp32", val_fraction=0.0).resolve()
    lines: list[str] = []
    result = train(cfg, data=data, echo=lines.append)
    assert result.steps == 1 and any(line.startswith("micro-batch auto:") for line in lines)
    assert read_record(tmp_path / "run").model.patch_size == patch_for("lean", size)
