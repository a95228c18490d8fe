"""Tests for meddiff.pipeline: `export-diffusers` folders load in diffusers' DDIMPipeline (unconditional) and in
MeddiffPipeline (class-conditional, patched), and give the same images as `meddiff sample` for the same seeds."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UniPCMultistepScheduler

from meddiff.cli import main as cli_main
from meddiff.config import ModelConfig
from meddiff.errors import ConfigError, RunError
from meddiff.model import build_unet
from meddiff.pipeline import MeddiffPipeline, export_diffusers
from meddiff.sample import generate, load_run

SEEDS = [3, 11]
STEPS = 3


def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_unconditional_export_loads_in_ddim_pipeline(uncond_run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "export"
    assert cli_main(["export-diffusers", str(uncond_run), str(out)]) == 0
    assert '"pipeline": "DDIMPipeline"' in capsys.readouterr().out
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DDIMPipeline"
    assert (out / "README.md").read_text() == (uncond_run / "README.md").read_text()
    pipe = DDIMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=STEPS, generator=_generators(SEEDS), output_type="np").images
    assert images.shape == (2, 32, 32, 1)
    expected = generate(load_run(uncond_run), SEEDS, None, "ddim", STEPS)
    np.testing.assert_allclose(images[..., 0], expected, atol=1e-5)


def test_conditional_export_loads_in_meddiff_pipeline_and_matches_sample(trained_run: Path, tmp_path: Path) -> None:
    out, pipeline = export_diffusers(trained_run, tmp_path / "export")
    index = json.loads((out / "model_index.json").read_text())
    assert pipeline == "MeddiffPipeline" and index["class_names"] == ["a", "b"] and index["patch_size"] == 1
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"
    pipe = MeddiffPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(batch_size=2, class_name="b", guidance_scale=2.0, num_inference_steps=STEPS,
               generator=_generators(SEEDS), output_type="np").images
    expected = generate(load_run(trained_run), SEEDS, 1, "ddim", STEPS, guidance=2.0)
    np.testing.assert_allclose(got[..., 0], expected, atol=1e-5)
    pil = pipe(batch_size=1, class_name="a", num_inference_steps=2).images[0]
    assert pil.mode == "L" and pil.size == (32, 32)


@pytest.mark.parametrize("scheduler", [UniPCMultistepScheduler, DDPMScheduler])
def test_a_swapped_in_scheduler_gives_the_images_of_meddiff_sample(trained_run: Path, tmp_path: Path,
                                                                   scheduler: type) -> None:
    pipe = MeddiffPipeline.from_pretrained(export_diffusers(trained_run, tmp_path / "export")[0])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)  # the same loop drives any diffusers sampler
    got = pipe(batch_size=2, class_name="a", guidance_scale=1.5, num_inference_steps=STEPS,
               generator=_generators(SEEDS), output_type="pt").images
    name = "unipc" if scheduler is UniPCMultistepScheduler else "ddpm"  # ddpm: step noise from the generators
    expected = generate(load_run(trained_run), SEEDS, 0, name, STEPS, guidance=1.5)
    np.testing.assert_array_equal(got[:, 0].numpy(), expected)  # one loop, one denoiser: bit for bit


def test_the_run_folder_itself_loads_in_meddiff_pipeline(trained_run: Path) -> None:
    pipe = MeddiffPipeline.from_pretrained(trained_run)
    assert list(pipe.config.class_names) == ["a", "b"] and pipe.config.patch_size == 1
    with pytest.raises(ConfigError, match=r"class_name c: unknown; this model knows a, b"):
        pipe(batch_size=1, class_name="c", num_inference_steps=1)
    with pytest.raises(ConfigError, match=r"class_name: 3 names for batch_size 2"):
        pipe(batch_size=2, class_name=["a", "b", "a"], num_inference_steps=1)


def test_a_patched_model_round_trips_through_save_pretrained(tmp_path: Path) -> None:
    cfg = ModelConfig(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, sample_size=16,
                      norm_num_groups=4, num_classes=2, patch_size=2)
    torch.manual_seed(0)
    pipe = MeddiffPipeline(build_unet(cfg), DDIMScheduler(num_train_timesteps=50), class_names=["x", "y"],
                           patch_size=2)
    pipe.set_progress_bar_config(disable=True)
    first = pipe(batch_size=1, class_name="y", num_inference_steps=2, generator=_generators([5]), output_type="pt")
    assert first.images.shape == (1, 1, 16, 16)  # the UNet works on (4, 8, 8) patches
    pipe.save_pretrained(tmp_path / "saved")
    again = MeddiffPipeline.from_pretrained(tmp_path / "saved")
    again.set_progress_bar_config(disable=True)
    assert again.config.patch_size == 2 and list(again.config.class_names) == ["x", "y"]
    second = again(batch_size=1, class_name="y", num_inference_steps=2, generator=_generators([5]), output_type="pt")
    torch.testing.assert_close(first.images, second.images)


def test_export_refuses_a_used_folder_and_an_unfinished_run(uncond_run: Path, tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"OUT_DIR .*used: exists and is not an empty folder"):
        export_diffusers(uncond_run, tmp_path / "used")
    assert (tmp_path / "used" / "x.txt").read_text() == "keep me"
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(uncond_run / "meddiff.json", partial / "meddiff.json")
    with pytest.raises(RunError, match=r"partial: unet/ is missing; has training finished"):
        export_diffusers(partial, tmp_path / "out")
    with pytest.raises(RunError, match=r"meddiff.json: missing; is this a meddiff run folder"):
        export_diffusers(tmp_path / "nothing", tmp_path / "out")


def test_loading_a_pipeline_asks_for_no_accelerate(trained_run: Path, tmp_path: Path, capfd: pytest.CaptureFixture,
                                                    diffusers_log_to_capture) -> None:
    """diffusers' 'install accelerate' warning on every load (issue 19): the user should see only meddiff's words."""
    export_diffusers(trained_run, tmp_path / "exported")
    for folder in (trained_run, tmp_path / "exported"):
        MeddiffPipeline.from_pretrained(folder)
    assert "accelerate" not in capfd.readouterr().err


def test_a_missing_folder_is_not_looked_up_on_the_hub(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="no such folder .*local_files_only=False"):
        MeddiffPipeline.from_pretrained(str(tmp_path / "no-such-run"))
