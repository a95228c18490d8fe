"""The latent path (issue 20): meddiff train-autoencoder, train --autoencoder, and sampling, the pipeline and export
decoding through the run's own autoencoder."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from meddiff.config import AutoencoderConfig
from meddiff.errors import ConfigError, RunError


def _quiet(_line: str) -> None:
    pass


def ae_config(data: Path | str, out: Path | str, **changes: object) -> AutoencoderConfig:
    base = AutoencoderConfig(data=str(data), out=str(out), size=32, factor=4, width=8, patch_px=16, batch_size=4,
                             max_steps=30, progress=False, cache_dir=None, precision="fp32", device="cpu",
                             val_fraction=0.25)
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Path:
    """An autoencoder folder trained 30 steps on the shared 32-px image folder. Read-only."""
    from meddiff.train_autoencoder import train_autoencoder

    out = tmp_path_factory.mktemp("ae") / "ae"
    train_autoencoder(ae_config(image_folder, out), echo=_quiet)
    return out


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory: pytest.TempPathFactory, image_folder: Path, autoencoder: Path,
               train_config) -> Path:
    """A conditional latent run on that autoencoder, 6 steps, fp32. Read-only."""
    from meddiff.train import train

    out = tmp_path_factory.mktemp("runs") / "latent"
    train(train_config(image_folder, out, autoencoder=str(autoencoder)), echo=_quiet)
    return out


# ---------------------------------------------------------------- the autoencoder

def test_the_autoencoder_folder_holds_safetensors_a_record_and_held_out_figures(autoencoder: Path) -> None:
    assert sorted(p.name for p in (autoencoder / "vae").iterdir()) == ["config.json",
                                                                      "diffusion_pytorch_model.safetensors"]
    record = json.loads((autoencoder / "autoencoder.json").read_text())
    rec = record["heldout_reconstruction"]
    assert record["split"]["heldout"] >= 1 and rec["images"] == record["split"]["heldout"]
    assert rec["psnr_ci95"][0] <= rec["psnr_db"] <= rec["psnr_ci95"][1]
    assert -1 <= rec["ssim"] <= 1 and record["result"]["steps"] == 30
    assert (autoencoder / "reconstructions.png").stat().st_size > 0
    assert "/" not in json.dumps(record["data"])  # the data summary names no file


def test_training_improves_the_held_out_reconstruction(tmp_path: Path, image_folder: Path, autoencoder: Path) -> None:
    from meddiff.train_autoencoder import train_autoencoder

    barely = train_autoencoder(ae_config(image_folder, tmp_path / "one", max_steps=1), echo=_quiet)
    trained = json.loads((autoencoder / "autoencoder.json").read_text())["result"]
    assert trained["psnr_db"] > barely.psnr_db + 1.0


def test_psnr_and_paired_ssim_have_their_textbook_values() -> None:
    from meddiff.latent import psnr
    from meddiff.metrics.ssim import paired_ssim, pairwise_ssim

    a = np.full((2, 16, 16), 0.5, np.float32)
    assert psnr(a, a + 0.1) == pytest.approx([20.0, 20.0])
    rng = np.random.default_rng(0)
    x = rng.random((4, 24, 24)).astype(np.float32)
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    assert np.allclose(paired_ssim(x, y), np.diag(pairwise_ssim(x, y)))
    assert np.allclose(paired_ssim(x, x), 1.0)


@pytest.mark.parametrize("changes, flag", [(dict(factor=3), "--factor"), (dict(size=40, factor=16), "--size"),
                                           (dict(patch_px=24), "--patch-px"), (dict(width=12), "--width")])
def test_bad_autoencoder_options_are_refused_by_name(changes: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        ae_config("x", "y", **changes)


def test_a_failed_autoencoder_run_leaves_nothing_and_a_used_folder_is_refused(tmp_path: Path, image_folder: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    ta = importlib.import_module("meddiff.train_autoencoder")

    def broken(*_a, **_k):
        raise RunError("scoring failed")

    monkeypatch.setattr(ta, "reconstruction_figures", broken)
    with pytest.raises(RunError):
        ta.train_autoencoder(ae_config(image_folder, tmp_path / "ae", max_steps=2), echo=_quiet)
    assert not (tmp_path / "ae").exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="--out"):
        ta.train_autoencoder(ae_config(image_folder, tmp_path / "used"), echo=_quiet)
    assert (tmp_path / "used" / "mine.txt").read_text() == "keep"


def test_mirror_latents_are_the_mirror_images_encoded(autoencoder: Path, image_folder: Path) -> None:
    from meddiff.data.dataset import load_data
    from meddiff.latent import encode, encode_set, load_autoencoder

    vae, _ = load_autoencoder(autoencoder)
    data = load_data(str(image_folder), 32)
    flipped = encode_set(vae, data, torch.device("cpu"), flip=True, batch=5)
    assert flipped.shape == (len(data), 4, 8, 8)
    assert torch.allclose(flipped[3:4], encode(vae, data.take([3]).flip(-1)), atol=1e-5)


# ---------------------------------------------------------------- latent diffusion

def test_a_latent_run_diffuses_unit_scaled_latents_and_keeps_its_own_autoencoder(latent_run: Path,
                                                                                  autoencoder: Path) -> None:
    from meddiff.runfolder import read_record

    record = read_record(latent_run)
    assert record.model.latent and record.model.in_channels == 4 and record.model.sample_size == 8
    assert record.model.image_size == 32 and record.model.latent_factor == 4
    assert record.autoencoder["heldout_reconstruction"]["psnr_db"] > 0
    own = json.loads((latent_run / "vae" / "config.json").read_text())
    assert own["scaling_factor"] == pytest.approx(record.autoencoder["scaling_factor"])
    assert json.loads((autoencoder / "vae" / "config.json").read_text())["scaling_factor"] == 1.0
    index = json.loads((latent_run / "model_index.json").read_text())
    assert index["_class_name"] == "MeddiffPipeline" and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert "latent" in (latent_run / "README.md").read_text()


def test_the_scale_makes_the_training_latents_unit_variance(latent_run: Path, image_folder: Path) -> None:
    from meddiff.data.dataset import load_data, split
    from meddiff.latent import encode_set
    from meddiff.runfolder import load_run_vae, read_record

    record = read_record(latent_run)
    vae, _ = load_run_vae(latent_run, record.model)
    data = load_data(str(image_folder), 32)
    train_idx, _ = split(data, record.train.val_fraction, record.train.seed)
    z = encode_set(vae, data, torch.device("cpu"))[torch.as_tensor(train_idx)] * vae.config.scaling_factor
    assert float(z.std()) == pytest.approx(1.0, rel=1e-4)


def test_latent_samples_are_images_at_full_size_and_the_seed_fixes_each(latent_run: Path) -> None:
    from meddiff.sample import generate, load_run

    run = load_run(latent_run)
    both = generate(run, [3, 4], label=0, sampler="ddim", steps=4)
    alone = generate(run, [4], label=0, sampler="ddim", steps=4)
    assert both.shape == (2, 32, 32) and both.min() >= 0 and both.max() <= 1
    assert np.allclose(both[1], alone[0], atol=1e-5)
    assert not np.allclose(both[0], both[1])


def test_a_latent_runs_predicted_latents_are_never_clipped_to_the_pixel_range(latent_run: Path,
                                                                               tmp_path: Path) -> None:
    from meddiff.runfolder import read_scheduler_config, scheduler_config
    from meddiff.sample import generate, load_run

    assert read_scheduler_config(latent_run / "scheduler")["clip_sample"] is False  # as saved
    old = tmp_path / "old"  # a run saved before the rule: its folder says clip; it is read without
    shutil.copytree(latent_run, old)
    path = old / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "clip_sample": True}))
    assert scheduler_config(old)["clip_sample"] is False
    run = load_run(latent_run)
    want = generate(run, [0, 1], label=0, sampler="ddim", steps=4)
    assert np.array_equal(generate(load_run(old), [0, 1], label=0, sampler="ddim", steps=4), want)
    clipped = dataclasses.replace(run, scheduler_config={**run.scheduler_config, "clip_sample": True})
    assert not np.allclose(generate(clipped, [0, 1], label=0, sampler="ddim", steps=4), want, atol=1e-3)


def test_the_pipeline_and_an_export_give_meddiffs_latent_images(latent_run: Path, tmp_path: Path) -> None:
    from meddiff.pipeline import MeddiffPipeline, export_diffusers
    from meddiff.sample import generate, load_run

    want = generate(load_run(latent_run), [0, 1], label=1, sampler="ddim", steps=4)
    folder, kind = export_diffusers(latent_run, tmp_path / "export")
    assert kind == "MeddiffPipeline" and (folder / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    for source in (latent_run, folder):
        pipe = MeddiffPipeline.from_pretrained(source)
        pipe.set_progress_bar_config(disable=True)
        got = pipe(batch_size=2, class_name="b", num_inference_steps=4, output_type="np",
                   generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images[..., 0]
        assert np.allclose(got, want, atol=1e-5)


def test_a_latent_run_samples_and_resumes_without_its_autoencoder_folder(tmp_path: Path, image_folder: Path,
                                                                         autoencoder: Path, train_config) -> None:
    from meddiff.config import TrainConfig
    from meddiff.sample import generate, load_run
    from meddiff.train import train

    ae = tmp_path / "ae_copy"
    shutil.copytree(autoencoder, ae)
    same = dict(autoencoder=str(ae), val_every=2, lr_schedule="constant", warmup_steps=1)  # LR not tied to the end
    straight = train(train_config(image_folder, tmp_path / "straight", max_steps=4, **same), echo=_quiet)
    train(train_config(image_folder, tmp_path / "cut", max_steps=2, **same), echo=_quiet)
    shutil.rmtree(ae)  # the runs must not need it any more
    resumed = train(TrainConfig(data="", out=str(tmp_path / "cut"), max_steps=4, progress=False), resume=True,
                    echo=_quiet)
    assert resumed.steps == straight.steps == 4
    a = generate(load_run(tmp_path / "straight"), [0], label=0, sampler="ddim", steps=3)
    b = generate(load_run(tmp_path / "cut"), [0], label=0, sampler="ddim", steps=3)
    assert np.array_equal(a, b)  # resume is bit-exact on the latent path too (fp32, CPU)


def test_the_copy_check_of_a_latent_run_audits_decoded_images_in_pixels(tmp_path: Path, image_folder: Path,
                                                                      autoencoder: Path, train_config,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from meddiff import audit
    from meddiff.runfolder import read_log
    from meddiff.train import train

    audited = []
    real = audit.TrainingAudit.check

    def spy(self, run, precision="fp32"):
        result = real(self, run, precision)
        audited.append((run.vae is not None, self.train.shape[1:], result.flagged_share))
        return result

    monkeypatch.setattr(audit.TrainingAudit, "check", spy)
    train(train_config(image_folder, tmp_path / "run", autoencoder=str(autoencoder), copy_check=2,
                       val_fraction=0.25), echo=_quiet)
    assert audited and all(vae and shape == (32, 32) for vae, shape, _ in audited), "decoded, against pixels"
    assert [r["copies"] for r in read_log(tmp_path / "run") if "copies" in r] == [a[2] for a in audited]


def test_the_run_takes_the_autoencoders_size_unless_told(tmp_path: Path, image_folder: Path, autoencoder: Path,
                                                         train_config) -> None:
    from meddiff.runfolder import read_record
    from meddiff.train import train

    train(train_config(image_folder, tmp_path / "r", autoencoder=str(autoencoder), size=None, max_steps=1),
          echo=_quiet)
    assert read_record(tmp_path / "r").train.size == 32


@pytest.mark.parametrize("damage, message", [
    ("channels", r"vae/config.json: latent_channels is 2; expected 4"),
    ("pickle", r"vae/diffusion_pytorch_model.bin: a pickle"),
    ("missing", r"vae: missing"),
])
def test_a_damaged_run_autoencoder_is_one_error_naming_the_file(latent_run: Path, tmp_path: Path, damage: str,
                                                               message: str) -> None:
    from meddiff.sample import load_run

    run = tmp_path / "run"
    shutil.copytree(latent_run, run)
    vae = run / "vae"
    if damage == "channels":
        config = json.loads((vae / "config.json").read_text())
        (vae / "config.json").write_text(json.dumps({**config, "latent_channels": 2}))
    elif damage == "pickle":
        (vae / "diffusion_pytorch_model.safetensors").rename(vae / "diffusion_pytorch_model.bin")
    else:
        shutil.rmtree(vae)
    with pytest.raises(RunError, match=message):
        load_run(run)


def test_the_cli_trains_both_stages_and_refuses_a_missing_autoencoder_in_one_line(tmp_path: Path,
                                                                                   image_folder: Path) -> None:
    cli = [sys.executable, "-m", "meddiff.cli"]
    env_args = dict(capture_output=True, text=True, timeout=300)
    done = subprocess.run([*cli, "train-autoencoder", "--data", str(image_folder), "--size", "32", "--width", "8",
                           "--patch-px", "16", "--max-steps", "3", "--out", str(tmp_path / "ae"), "--no-progress",
                           "--threads", "1"], **env_args)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-2])["steps"] == 3
    bad = subprocess.run([*cli, "train", "--autoencoder", str(tmp_path / "nope"), "--data", str(image_folder),
                          "--out", str(tmp_path / "run"), "--threads", "1"], **env_args)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "nope" in bad.stderr and "train-autoencoder" in bad.stderr
    assert not (tmp_path / "run").exists()
    wrong = subprocess.run([*cli, "train-autoencoder", "--data", str(image_folder), "--factor", "3", "--out",
                            str(tmp_path / "ae3")], **env_args)
    assert wrong.returncode != 0 and "--factor 3" in wrong.stderr and "Traceback" not in wrong.stderr
    assert not (tmp_path / "ae3").exists()


@pytest.mark.parametrize("damage, message", [("not_ae", "not an autoencoder folder"),
                                             ("size", "config.size is 'abc'"), ("kind", "not a meddiff autoencoder")])
def test_a_folder_that_is_no_autoencoder_is_one_error(tmp_path: Path, autoencoder: Path, image_folder: Path,
                                                      train_config, damage: str, message: str) -> None:
    from meddiff.train import train

    folder = tmp_path / "ae"
    shutil.copytree(autoencoder, folder)
    record = json.loads((folder / "autoencoder.json").read_text())
    if damage == "not_ae":
        (folder / "autoencoder.json").unlink()
    elif damage == "size":
        record["config"]["size"] = "abc"
    else:
        record["kind"] = "something-else"
    if damage != "not_ae":
        (folder / "autoencoder.json").write_text(json.dumps(record))
    with pytest.raises(RunError, match=message):
        train(train_config(image_folder, tmp_path / "run", autoencoder=str(folder), size=None), echo=_quiet)
    assert not (tmp_path / "run").exists()


def test_maps_fold_onto_the_latent_grid_pixel_for_pixel() -> None:
    from meddiff.model import mask_channels

    maps = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    maps[0, 0, 5, 2] = 2  # one pixel: smaller than a latent cell of 4 x 4
    folded = mask_channels(maps, (1, 2), factor=4)
    assert folded.shape == (1, 2 * 16, 2, 2)
    assert torch.equal(F.pixel_shuffle(folded, 4), mask_channels(maps, (1, 2)))  # nothing lost
    assert int((folded > 0).sum()) == 1 and folded[0, 16 + 1 * 4 + 2, 1, 0] == 1  # value 2's channel, cell (1, 0)


def test_a_latent_run_learns_from_label_maps_and_samples_pairs(tmp_path: Path, autoencoder: Path,
                                                               train_config) -> None:
    from meddiff.config import SampleConfig
    from meddiff.data.dataset import load_data
    from meddiff.pipeline import MeddiffPipeline
    from meddiff.runfolder import read_record
    from meddiff.sample import class_index, generate, load_run, sample_to_folder
    from meddiff.train import train

    run = tmp_path / "run"
    train(train_config("builtin:phantoms?n=24&masks=1", run, autoencoder=str(autoencoder)), echo=_quiet)
    model = read_record(run).model
    assert model.latent_factor == 4 and model.mask_values and model.cond_channels == len(model.mask_values) * 16
    loaded = load_run(run)
    label = class_index(loaded, "mri/abnormal")
    maps = np.zeros((2, 32, 32), np.int64)
    maps[0, 4:12, 4:12] = model.mask_values[0]
    maps[1, 20:30, 18:28] = model.mask_values[-1]
    both = generate(loaded, [3, 3], label, "ddim", 3, masks=maps)
    assert both.shape == (2, 32, 32) and not np.allclose(both[0], both[1])  # the map steers the image
    assert np.allclose(generate(loaded, [3], label, "ddim", 3, masks=maps[1:])[0], both[1], atol=1e-5)
    pipe = MeddiffPipeline.from_pretrained(run)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(batch_size=1, class_name="mri/abnormal", num_inference_steps=3, output_type="np", masks=maps[1:],
               generator=[torch.Generator().manual_seed(3)]).images[..., 0]
    assert np.allclose(got[0], both[1], atol=1e-5)
    out = tmp_path / "pairs"
    sample_to_folder(SampleConfig(run=str(run), out=str(out), masks="builtin:phantoms?n=3&masks=1&seed=5", steps=2,
                                  progress=False, precision="fp32", device="cpu"), echo=_quiet)
    pairs = load_data(str(out), 32)
    assert len(pairs) == 3 and pairs.has_masks
