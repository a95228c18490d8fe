"""meddiff models as diffusers pipelines: a run folder → an exported pipeline folder (`export_diffusers`), loaded by
`diffusers.DDIMPipeline` (unconditional, patch size 1) or by `MeddiffPipeline` (class-conditional or patched).

`MeddiffPipeline` is ordinary code in this package, never code shipped inside a model folder: loading a folder
runs nothing from it. It runs `sample.sample_loop` with a `model.Denoiser`, the loop and denoiser of `meddiff sample`:
its images equal `meddiff sample --sampler ddim` (or any sampler swapped in) for the same per-image generators.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils import is_accelerate_available
from diffusers.utils.torch_utils import randn_tensor

from . import runfolder
from .atomic import atomic_folder, check_out_dir, no_space_is_an_error, write_json, write_text
from .errors import ConfigError, RunError
from .latent import decode as decode_latents
from .latent import latent_factor
from .model import Denoiser, mask_channels
from .modelcard import model_card_text
from .sample import sample_loop, to_unit


class MeddiffPipeline(DiffusionPipeline):
    """unet + scheduler (+ vae) + the run's class names and patch size → (B, H, W) single-channel images.

    `class_names` (empty: unconditional) index the UNet's class embedding; index len(class_names) is the null
    class of classifier-free guidance. `patch_size` > 1: the UNet sees space-to-depth patches. `vae` (a latent
    run's autoencoder): the UNet denoises its latents and the result is decoded through it."""

    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]

    def __init__(self, unet: UNet2DModel, scheduler: Any, class_names: list[str] | None = None,
                 patch_size: int = 1, vae: AutoencoderKL | None = None, mask_values: list[int] | None = None) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.register_to_config(class_names=list(class_names or []), patch_size=int(patch_size),
                                mask_values=[int(v) for v in mask_values or []])

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> "MeddiffPipeline":
        """diffusers' loader. A local folder (a meddiff run or an exported pipeline) is loaded from its own files
        only: the UNet and scheduler through `runfolder` (safetensors and JSON, checked against the run's
        meddiff.json when there is one), nothing asked of the Hugging Face Hub; a damaged folder is a RunError
        naming the file. On a run folder the class names and patch size come from its meddiff.json."""
        path = pretrained_model_name_or_path
        if os.path.isdir(path):
            record = runfolder.read_record(path) if runfolder.has_record(path) else None
            if record is not None:
                record.check_kind(path, flag="MeddiffPipeline.from_pretrained")
            if record is not None and "class_names" not in kwargs:
                kwargs["class_names"] = list(record.class_names) if record.conditional else []
                kwargs.setdefault("patch_size", record.model.patch_size)
                kwargs.setdefault("mask_values", list(record.model.mask_values))
            if "unet" not in kwargs:
                kwargs["unet"] = (runfolder.load_unet(path, "ema", record) if record else
                                  runfolder.load_unet_folder(Path(path) / runfolder.UNET_DIR))[0]
            if "vae" not in kwargs:
                latent = record.model.latent if record else (Path(path) / runfolder.VAE_DIR).is_dir()
                kwargs["vae"] = None if not latent else (
                    runfolder.load_run_vae(path, record.model) if record else
                    runfolder.load_vae_folder(Path(path) / runfolder.VAE_DIR))[0]
            if "scheduler" not in kwargs:
                kwargs["scheduler"] = DDIMScheduler.from_config(
                    runfolder.scheduler_config(path, record) if record else
                    runfolder.read_scheduler_config(Path(path) / runfolder.SCHEDULER_DIR))
        # diffusers asks users without `accelerate` to install it on every load unless told not to use it
        kwargs.setdefault("low_cpu_mem_usage", is_accelerate_available())
        if not os.path.isdir(path):  # nothing leaves the machine unasked: the Hub only with local_files_only=False
            if kwargs.get("local_files_only", True):
                raise RunError(f"{path}: no such folder (to download a pipeline from the Hugging Face Hub, pass "
                               "local_files_only=False)")
            return super().from_pretrained(path, **kwargs)  # the caller passed local_files_only=False: Hub asked
        try:
            return super().from_pretrained(path, **{**kwargs, "local_files_only": True, "use_safetensors": True})
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise RunError(f"{path}: cannot be loaded as a pipeline ({runfolder.one_line(err)})") from None

    def _labels(self, class_name: str | list[str] | None, batch_size: int) -> torch.Tensor | None:
        names = list(self.config.class_names)
        if not names:
            if class_name is not None:
                raise ConfigError(f"class_name {class_name!r}: this model is unconditional")
            return None
        wanted = class_name if isinstance(class_name, list) else [class_name] * batch_size
        if len(wanted) != batch_size:
            raise ConfigError(f"class_name: {len(wanted)} names for batch_size {batch_size}")
        unknown = sorted({str(c) for c in wanted if c is not None and c not in names})
        if unknown:
            raise ConfigError(f"class_name {', '.join(unknown)}: unknown; this model knows {', '.join(names)}")
        null = len(names)  # None → the unconditional (null) class
        return torch.tensor([null if c is None else names.index(c) for c in wanted], device=self._execution_device)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_name: str | list[str | None] | None = None,
                 guidance_scale: float = 1.0, num_inference_steps: int = 50,
                 generator: torch.Generator | list[torch.Generator] | None = None, eta: float = 0.0,
                 output_type: str = "pil", return_dict: bool = True,
                 masks: Any = None) -> ImagePipelineOutput | tuple:
        """Generate `batch_size` images. class_name: one name, one per image, or None (unconditional branch).
        A list of generators gives each image its own noise, as `meddiff sample` does with per-image seeds.
        output_type: "pil" (grey PIL images), "np" ((B, H, W, 1) float in [0, 1]) or "pt" ((B, 1, H, W)).
        masks: for a model trained on label maps, one (H, W) map of label values per image (None: no map)."""
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ConfigError(f"generator: {len(generator)} generators for batch_size {batch_size}")
        if output_type not in ("pil", "np", "pt"):
            raise ConfigError(f"output_type {output_type!r}: choose from pil, np, pt")
        labels = self._labels(class_name, batch_size)
        p, values = self.config.patch_size, tuple(self.config.get("mask_values", []) or [])
        size, channels = self.unet.config.sample_size * p, self.unet.config.out_channels // (p * p)
        noise = randn_tensor((batch_size, channels, size, size), generator=generator, device=self._execution_device,
                             dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        cond, vae = None, getattr(self, "vae", None)
        if values:  # the maps at the images' resolution; a latent model takes them folded onto its grid
            f = 1 if vae is None else latent_factor(vae)
            cond = (torch.zeros(batch_size, len(values) * f * f, size, size, device=self._execution_device)
                    if masks is None else
                    mask_channels(torch.as_tensor(np.asarray(masks, np.int64)).view(batch_size, 1, size * f, size * f)
                                  .to(self._execution_device), values, f))
        elif masks is not None:
            raise ConfigError("masks: this model was not trained on label maps")
        denoiser = Denoiser(self.unet, labels, len(self.config.class_names), guidance_scale, p, cond=cond)
        decode = to_unit if vae is None else (lambda z: to_unit(decode_latents(vae, z.float())))
        image = sample_loop(self.scheduler, denoiser, noise, generator, eta, self.progress_bar, decode)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)


def export_diffusers(run: str | Path, out: str | Path, weights: str = "ema") -> tuple[Path, str]:
    """Write a run's model as a diffusers folder (unet/, scheduler/ as DDIMScheduler, model_index.json, the model
    card README.md) → (folder, pipeline class name). weights: "ema" (the run's exported model) or "best".
    The run is loaded (and so checked) first: a damaged run is a RunError and nothing is written."""
    run, out = Path(run), Path(out)
    check_out_dir(out, "OUT_DIR", empty=True)
    record = runfolder.read_record(run)
    record.check_kind(run, flag="RUN")
    _unet, source = runfolder.load_unet(run, weights, record)
    schedule = runfolder.scheduler_config(run, record)
    pipeline, index = runfolder.model_index(record.model, record.class_names)
    with no_space_is_an_error(f"{out}", "nothing was exported"), atomic_folder(out) as tmp:
        unet_dir = tmp / runfolder.UNET_DIR  # only the two files that were checked: never a stray pickle
        unet_dir.mkdir()
        for name in (runfolder.UNET_CONFIG_FILE, runfolder.UNET_WEIGHTS_FILE):
            shutil.copyfile(source.parent / name, unet_dir / name)
        if record.model.latent:  # the autoencoder, checked the same way
            vae_source = runfolder.load_run_vae(run, record.model)[1].parent
            (tmp / runfolder.VAE_DIR).mkdir()
            for name in (runfolder.UNET_CONFIG_FILE, runfolder.UNET_WEIGHTS_FILE):
                shutil.copyfile(vae_source / name, tmp / runfolder.VAE_DIR / name)
        DDIMScheduler.from_config(schedule).save_pretrained(tmp / runfolder.SCHEDULER_DIR)
        write_json(tmp / runfolder.MODEL_INDEX_FILE, index)
        card = runfolder.card_path(run)
        if card.is_file() and not card.is_symlink():
            shutil.copyfile(card, tmp / runfolder.CARD_FILE)
        else:
            write_text(tmp / runfolder.CARD_FILE, model_card_text(run, record=record))
    return out, pipeline
