"""Run folder → generated images: the one sampling loop (`sample_loop`, any diffusers scheduler driving a
`model.Denoiser`), the default sampler, per-image seeds, bulk output.

Image i's starting noise (and a stochastic sampler's noise) comes from its own generator seeded with its
seed, so the same seed gives the same image at any batch size, and files are named by their seed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as td
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, UNet2DModel, UniPCMultistepScheduler)

from . import export, runfolder
from .atomic import check_out_dir, no_space_is_an_error
from .config import (MAX_IMAGES, SAMPLERS, SEEDS, STEPS, InpaintConfig, ModelConfig, SampleConfig, TrainConfig,
                     check_value,
                     default_sampler)
from .data import cache
from .data.dataset import (PAIR_FOLDERS, jitter_label_map, labels_to_square, lesion_value, load_data, pair_layout,
                           to_square)
from .data.readers import read_file, read_label_map
from .errors import ConfigError, UnreadableFile
from .latent import decode as decode_latents
from .model import Denoiser, mask_channels, maps_from_channels, null_class, with_meddiff_attention
from .runtime import Dist, describe, pick_device, pick_precision, progress_bar

_SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
    "unipc": (UniPCMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
}
GRID_MAX_IMAGES = 256  # grid.png is written for requests of up to this many images
GRID_ROW_MAX = 32  # a per-class grid keeps one row per class up to this many images a class


@dataclass
class LoadedRun:
    """A trained model ready to sample: the UNet, its schedule and what its labels mean."""

    unet: UNet2DModel
    scheduler_config: dict[str, Any]
    class_names: tuple[str, ...]
    model: ModelConfig
    train: TrainConfig
    model_id: str
    vae: Any = None  # a latent run's autoencoder (RUN/vae/): samples are decoded through it
    mask_names: dict[int, str] = field(default_factory=dict)  # label value → name, where the training data named it

    @property
    def conditional(self) -> bool:
        return self.model.num_classes > 0

    def noise_shape(self) -> tuple[int, int, int]:
        """What the sampler starts from for one image: (1, S, S) pixels, or a latent run's (C, h, w) grid."""
        return (self.model.in_channels, self.model.sample_size, self.model.sample_size)


def model_id(weights_file: Path) -> str:
    """'meddiff-' + 12 hex digits of the weights' SHA-256: names the model in manifests without a path."""
    h = hashlib.sha256()
    with open(weights_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "meddiff-" + h.hexdigest()[:12]


def load_run(run: str | Path, weights: str = "ema", device: torch.device | str = "cpu", maps: bool = False,
             flag: str = "--run") -> LoadedRun:
    """Load a run folder. weights: "ema" (the exported model: EMA weights when the run kept an EMA), "best"
    (lowest validation loss) or "raw" (the last checkpoint's non-averaged weights). `maps`: the caller wants a
    model of label maps (`--mask-run`), else one of images; the other kind is a ConfigError naming `flag`."""
    record = runfolder.read_record(run)
    record.check_kind(run, maps, flag)
    unet, wfile = runfolder.load_unet(run, weights, record)
    vae = runfolder.load_run_vae(run, record.model)[0].to(device).eval() if record.model.latent else None
    return LoadedRun(with_meddiff_attention(unet).to(device).eval(), runfolder.scheduler_config(run, record),
                     record.class_names, record.model, record.train, model_id(wfile), vae, record.mask_names())


def make_scheduler(name: str, config: dict[str, Any], steps: int) -> Any:
    """A diffusers scheduler of the named kind sharing the run's noise schedule, set to `steps` steps."""
    check_value("--sampler", name, choices=SAMPLERS)
    check_value("--steps", steps, bounds=STEPS)
    cls, extra = _SCHEDULERS[name]
    sched = cls.from_config(config, **extra)
    sched.set_timesteps(steps)
    return sched


def class_index(run: LoadedRun, name: str | None) -> int | None:
    """The label index of a class name; None → the unconditional (null) class or an unconditional model."""
    if name is None:
        return run.model.num_classes if run.conditional else None
    if not run.conditional:
        raise ConfigError(f"--class {name!r}: this model is unconditional (trained without class labels); "
                          "sample it without --class")
    if name not in run.class_names:
        raise ConfigError(f"--class {name!r}: unknown class; this model knows {', '.join(run.class_names)}")
    return run.class_names.index(name)


def class_name(run: LoadedRun, label: int | None) -> str | None:
    """The class name of a label index; None for no label or the null (unconditional) class."""
    return run.class_names[label] if label is not None and label < len(run.class_names) else None


def sampler_and_steps(run: LoadedRun, sampler: str | None = None, steps: int | None = None) -> tuple[str, int]:
    """The sampler and step count to use: those asked for, else `config.default_sampler` for the run's preset."""
    default_name, default_steps = default_sampler(run.train.preset)
    return sampler or default_name, default_steps if steps is None else steps


def sampler_label(sampler: str, guidance_cutoff: float) -> str:
    """The sampler as a file's metadata and the manifest name it: with the guidance cutoff where one was set."""
    return sampler if not guidance_cutoff else f"{sampler}+guidance-cutoff-{guidance_cutoff:g}"


def make_denoiser(run: LoadedRun, label: int | None, batch: int, guidance: float = 1.0, precision: str = "fp32",
                  cache_interval: int = 1, masks: torch.Tensor | None = None,
                  guidance_cutoff: float = 0.0) -> Denoiser:
    """The run's Denoiser for `batch` images of one label (None: an unconditional model) and, for a model
    trained on label maps, their maps (B, 1, S, S) (None: no map, the unconditional branch's zero channels)."""
    device = next(run.unet.parameters()).device
    labels = None if label is None else torch.full((batch,), label, dtype=torch.long, device=device)
    cond = None
    if run.model.cond_channels:
        grid, size = run.model.sample_size, run.model.image_size  # a latent model's grid is coarser than its maps
        cond = (torch.zeros(batch, run.model.cond_channels, grid, grid, device=device) if masks is None else
                mask_channels(torch.as_tensor(masks).view(batch, 1, size, size).to(device), run.model.mask_values,
                              run.model.latent_factor))
    elif masks is not None:
        raise ConfigError("--masks: this model was not trained on label maps (its data had none)")
    return Denoiser(run.unet, labels, null_class(run.model), guidance, run.model.patch_size, cache_interval,
                    precision, cond, guidance_cutoff, run.scheduler_config["num_train_timesteps"])


def initial_noise(seeds: list[int], shape: int | tuple[int, int, int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """x_T for each seed from its own CPU generator → ((B, C, S, S) float32, the generators, which then feed a
    stochastic sampler's step noise): image i does not depend on the other seeds of the batch. `shape`: one
    image's (C, S, S), or S for (1, S, S)."""
    shape = (1, shape, shape) if isinstance(shape, int) else tuple(shape)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return torch.cat([torch.randn(1, *shape, generator=g) for g in generators]), generators


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """A finished pixel-space sample, about [-1, 1], → images in [0, 1] float32."""
    return ((x.clamp(-1, 1) + 1) / 2).float()


def decoder(run: LoadedRun, precision: str = "fp32") -> Callable[[torch.Tensor], torch.Tensor]:
    """What turns the sampler's final x_0 into images in [0, 1]: clamping for a pixel run, the autoencoder's
    decoder for a latent run; for a model of label maps, its maps (label values, as floats), each pixel the value
    whose channel is highest (`model.maps_from_channels`)."""
    if run.model.makes_maps:
        return lambda x: maps_from_channels(x, run.model.map_values).float()
    if run.vae is None:
        return to_unit
    return lambda z: to_unit(decode_latents(run.vae, z.float(), precision))


@torch.no_grad()
def sample_loop(scheduler: Any, denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                generators: torch.Generator | list[torch.Generator] | None = None, eta: float = 0.0,
                progress: Callable[[Any], Any] = iter,
                decode: Callable[[torch.Tensor], torch.Tensor] = to_unit) -> torch.Tensor:
    """The one denoising loop: a diffusers scheduler (timesteps already set) driving `denoiser(x_t, t)` from
    `noise` (B, C, h, w) → images (B, 1, H, W) float32 in [0, 1], on the noise's device, through `decode` (pixels:
    clamped to [-1, 1] and mapped to [0, 1]; a latent run: the autoencoder's decoder, `decoder`).

    The sampler's state runs in float64, as EDM's sampler does: Euler/Heun start from x * sigma_max, which would
    amplify the UNet's float32, batch-size-dependent rounding into visible differences. `generators` (one per
    image, or one for the batch) and `eta` go to the steps that take them: DDPM draws its step noise from them,
    and diffusers draws it on the generators' device, so the noise does not depend on where the UNet runs.
    `progress` wraps the timesteps (a progress bar)."""
    takes = set(inspect.signature(scheduler.step).parameters)
    extra = {k: v for k, v in (("eta", eta), ("generator", generators)) if k in takes and v is not None}
    # DDPM (and DDIM with eta > 0) draw step noise in the model output's dtype: they get the output in float32, as
    # in diffusers' pipelines, so that a seed gives their image (float64 draws are another random stream); the
    # others get float64, which Euler and Heun need at sigma_max
    noisy = isinstance(scheduler, DDPMScheduler) or (eta > 0 and "eta" in takes)
    x = noise.double() * scheduler.init_noise_sigma
    for t in progress(scheduler.timesteps):
        out = denoiser(scheduler.scale_model_input(x, t), t.to(x.device).expand(len(x)))
        x = scheduler.step(out.float() if noisy else out.double(), t, x, **extra).prev_sample
    return decode(x)


@torch.no_grad()
def generate(run: LoadedRun, seeds: list[int], label: int | None = None, sampler: str | None = None,
             steps: int | None = None, guidance: float = 1.0, precision: str = "fp32",
             cache_interval: int = 1, masks: np.ndarray | torch.Tensor | None = None,
             guidance_cutoff: float = 0.0) -> np.ndarray:
    """Images for the given seeds: (len(seeds), H, W) float32 in [0, 1] (a model of label maps: its maps'
    values; `draw_maps`). sampler/steps None: the run's default
    (`config.default_sampler`). cache_interval > 1 turns on DeepCache feature reuse (faster, approximate).
    masks: one label map per seed, (B, S, S) integers, for a model trained on label maps; guidance applies to
    the maps as to the class (the unconditional branch has neither), at timesteps from guidance_cutoff x T up
    (`model.Denoiser`)."""
    sampler, steps = sampler_and_steps(run, sampler, steps)
    if masks is not None:
        masks = torch.as_tensor(np.asarray(masks, dtype=np.int64)).reshape(len(seeds), 1, *np.shape(masks)[-2:])
    if sampler == "heun" and len(seeds) > 1:
        # Heun's endpoint derivative divides by the next sigma, amplifying the UNet's batch-size-dependent float32
        # rounding into visible differences: one image per call keeps "same seed, same image" (rule 5)
        return np.concatenate([generate(run, [s], label, sampler, steps, guidance, precision, cache_interval,
                                        None if masks is None else masks[k:k + 1], guidance_cutoff)
                               for k, s in enumerate(seeds)])
    scheduler = make_scheduler(sampler, run.scheduler_config, steps)
    denoiser = make_denoiser(run, label, len(seeds), guidance, precision, cache_interval, masks, guidance_cutoff)
    noise, generators = initial_noise(seeds, run.noise_shape())
    device = next(run.unet.parameters()).device
    return sample_loop(scheduler, denoiser, noise.to(device), generators,
                       decode=decoder(run, precision))[:, 0].cpu().numpy()


MAP_SEED_OFFSET = 2**63  # a map's noise is seeded by its image's seed plus this: never the same stream as an image's


def draw_maps(run: LoadedRun, seeds: list[int], label: int | None = None, sampler: str | None = None,
              steps: int | None = None, guidance: float = 1.0, precision: str = "fp32") -> np.ndarray:
    """A model of label maps' maps for the given seeds, sampled as `generate` samples images, each from seed +
    MAP_SEED_OFFSET, so an image and its map never share noise: (len(seeds), S, S) int64 label values."""
    offset = [int(s) + MAP_SEED_OFFSET for s in seeds]
    return generate(run, offset, label, sampler, steps, guidance, precision).astype(np.int64)


def map_class(images: LoadedRun, maps: LoadedRun, label: int | None) -> int | None:
    """The label a model of label maps draws an image's map with: the image's class by name (None, its null
    class, where the image has none)."""
    if not maps.conditional:
        return None
    name = class_name(images, label)
    if name is not None and name not in maps.class_names:
        raise ConfigError(f"--mask-run: its model of label maps does not know class {name!r} (it knows "
                          f"{', '.join(maps.class_names)})")
    return class_index(maps, name)


def load_mask_run(cfg: SampleConfig, images: LoadedRun, device: torch.device) -> LoadedRun:
    """--mask-run: the model of label maps that draws each image's map; its values must be ones the image model
    was trained on."""
    maps = load_run(cfg.mask_run, "ema", device, maps=True, flag="--mask-run")
    if not images.model.cond_channels:
        raise ConfigError(f"--mask-run {cfg.mask_run}: the --run model was not trained on label maps (its data had "
                          "none)")
    unknown = sorted(set(maps.model.map_values) - set(images.model.mask_values) - {0})
    if unknown:
        raise ConfigError(f"--mask-run {cfg.mask_run}: draws label value(s) {unknown} the --run model does not know "
                          f"(it knows {', '.join(map(str, images.model.mask_values))})")
    if maps.model.image_size != images.model.image_size:
        raise ConfigError(f"--mask-run {cfg.mask_run}: draws {maps.model.image_size}-px maps, the --run model makes "
                          f"{images.model.image_size}-px images")
    return maps


@torch.no_grad()
def inpaint_loop(scheduler: DDIMScheduler, denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 known: torch.Tensor, region: torch.Tensor, generators: list[torch.Generator],
                 resample: int = 2) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022, Alg. 1) on DDIM steps: the region (B, 1, H, W bool) is denoised by the model
    while every other pixel is, at each noise level, the known image (B, 1, H, W in [-1, 1]) noised to that level;
    each step is redone `resample` times after diffusing its result back up one step, so the region agrees with
    its surroundings. → (B, 1, H, W) in [0, 1] with the known pixels exactly as given."""
    ab = scheduler.alphas_cumprod.double().to(known.device)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64, device=known.device)
    known, region = known.double(), region.to(known.device)

    def draw() -> torch.Tensor:
        return torch.cat([torch.randn(1, *known.shape[1:], generator=g, dtype=torch.float64)
                          for g in generators]).to(known.device)

    x = draw() * scheduler.init_noise_sigma
    steps = list(scheduler.timesteps)
    for i, t in enumerate(steps):
        a_prev = ab[steps[i + 1]] if i + 1 < len(steps) else final
        for r in range(resample + 1):
            out = denoiser(x, t.to(x.device).expand(len(x)))
            x_prev = scheduler.step(out.double(), t, x).prev_sample
            noised = a_prev.sqrt() * known + (1 - a_prev).sqrt() * draw() if i + 1 < len(steps) else known
            x_prev = torch.where(region, x_prev, noised)
            if r < resample and i + 1 < len(steps):  # back up to step t's noise level, and denoise again
                ratio = ab[t] / a_prev
                x = ratio.sqrt() * x_prev + (1 - ratio).sqrt() * draw()
        x = x_prev
    return torch.where(region, to_unit(x), (known.float() + 1) / 2)


def inpaint(run: LoadedRun, image: np.ndarray, region: np.ndarray, seeds: list[int], label: int | None = None,
            steps: int = 25, resample: int = 2, guidance: float = 1.0, precision: str = "fp32",
            cond_mask: np.ndarray | None = None, guidance_cutoff: float = 0.0) -> np.ndarray:
    """Versions of a real image (S, S) in [0, 1] with the region (S, S bool) regenerated, one per seed →
    (len(seeds), S, S) float32 in [0, 1]; outside the region every pixel is the input's. A model trained on label
    maps is given `cond_mask` (S, S label values; default the region as label value 1's map) for the region."""
    if run.vae is not None:
        raise ConfigError(f"inpaint: {run.model_id} is a latent model; inpainting works on pixel-space runs")
    size = run.model.sample_size
    if image.shape != (size, size) or region.shape != (size, size):
        raise ConfigError(f"inpaint: the image and mask must be {size} x {size} px (the model's size)")
    scheduler = make_scheduler("ddim", run.scheduler_config, steps)
    masks = None
    if run.model.cond_channels:
        labels = cond_mask if cond_mask is not None else region.astype(np.int64) * run.model.mask_values[0]
        masks = np.repeat(np.asarray(labels, np.int64)[None], len(seeds), axis=0)
    denoiser = make_denoiser(run, label, len(seeds), guidance, precision, 1,
                             None if masks is None else torch.as_tensor(masks)[:, None], guidance_cutoff)
    device = next(run.unet.parameters()).device
    known = (torch.as_tensor(image, dtype=torch.float32) * 2 - 1).expand(len(seeds), 1, size, size).to(device)
    where = torch.as_tensor(region, dtype=torch.bool).expand(len(seeds), 1, size, size).to(device)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return inpaint_loop(scheduler, denoiser, known, where, generators, resample)[:, 0].cpu().numpy()


def inpaint_region(run: LoadedRun, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """--mask's map (S, S) → (the region to regenerate, the map written beside each result). A plain mask: every
    non-zero pixel, written as it is made (value 1). A label map of anatomy and lesion for a run whose data named
    a "lesion" value (`builtin:phantoms?masks=2`): only the lesion is regenerated, the anatomy around it is what it
    is asked with, and the whole map is written: the result's own label map."""
    lesion = lesion_value(run.mask_names)
    values = set(np.unique(labels).tolist()) - {0}
    if run.model.cond_channels and len(values) > 1 and values <= set(run.model.mask_values) and lesion is not None:
        return labels == lesion, labels
    region = labels > 0
    return region, region.astype(np.uint8)


def inpaint_to_folder(cfg: InpaintConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """`meddiff inpaint`: read the image and its region mask at the model's size, write each version with the
    mask as images/ + masks/ pairs and a manifest; files already complete are skipped."""
    check_out_dir(cfg.out, "--out")
    device = pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device)
    run = load_run(cfg.run, "ema", device)
    if run.vae is not None:
        raise ConfigError(f"--run {cfg.run}: a latent model; inpainting works on pixel-space runs")
    size = run.model.image_size
    try:
        items = read_file(Path(cfg.image))
        labels = read_label_map(Path(cfg.mask))
    except UnreadableFile as err:
        raise ConfigError(f"{'--image' if str(err.path) == str(cfg.image) else '--mask'} {err.path}: "
                          f"{err.reason}") from None
    if len(items) != 1:
        raise ConfigError(f"--image {cfg.image}: holds {len(items)} images; give one 2-D image")
    picture = items[0][0]
    if labels.shape != picture.shape:
        raise ConfigError(f"--mask {cfg.mask}: {labels.shape[1]}x{labels.shape[0]} px for an image of "
                          f"{picture.shape[1]}x{picture.shape[0]} px; they must match")
    image = cache.from_uint16(cache.to_uint16(to_square(picture, size)))
    mask_labels = labels_to_square(labels, size)
    region, written = inpaint_region(run, mask_labels)
    if not region.any():
        raise ConfigError(f"--mask {cfg.mask}: no pixel is inside the region (all zero"
                          + (", or no lesion in the label map)" if written is mask_labels else ")"))
    if run.model.cond_channels and not set(np.unique(mask_labels).tolist()) <= set(run.model.mask_values) | {0}:
        mask_labels = region.astype(np.uint16) * run.model.mask_values[0]  # a plain region: the first label value
    label = class_index(run, cfg.class_name)
    out = Path(cfg.out)
    manifest, done = _manifests(out, Dist())
    suffix = export.SUFFIX[cfg.fmt]
    stem = Path(cfg.image).name.split(".")[0] or "image"
    jobs = [(f"{PAIR_FOLDERS[0]}/{stem}_seed{cfg.seed + i:06d}", cfg.seed + i) for i in range(cfg.n)]
    todo = [j for j in jobs if f"{j[0]}{suffix}" not in done]
    echo(f"inpainting {len(todo)} of {len(jobs)} version(s) ({region.mean():.1%} of the image) with DDIM "
         f"{cfg.steps} x {cfg.resample + 1}; {describe(device, precision)}")
    t0 = time.time()
    existed = next(p for p in (out, *out.parents) if p.exists())
    name = class_name(run, label)
    for lo in range(0, len(todo), 8):
        part = todo[lo:lo + 8]
        results = inpaint(run, image, region, [s for _stem, s in part], label, cfg.steps, cfg.resample,
                          cfg.guidance, precision, mask_labels.astype(np.int64) if run.model.cond_channels else None,
                          cfg.guidance_cutoff)
        for (job_stem, seed), img in zip(part, results):
            mask = mask_file(job_stem, cfg.fmt)
            info = export.SyntheticInfo(run.model_id, seed, name, sampler_label("repaint-ddim", cfg.guidance_cutoff),
                                        cfg.steps, cfg.guidance, mask,
                                        inpainted=True)
            _write_sample(img, out, f"{job_stem}{suffix}", cfg.fmt, info, manifest, existed, written, run.mask_names)
    seconds = time.time() - t0
    return dict(out=str(out), written=len(todo), skipped=len(jobs) - len(todo), seconds=seconds,
                region_share=float(region.mean()), model_id=run.model_id, hardware=describe(device, precision))


Job = tuple[str, int, "int | None", "int | None"]  # (file stem, seed, label, index of its label map or None)


def plan(run: LoadedRun, cfg: SampleConfig, n_maps: int = 0, drawn: bool = False) -> list[Job]:
    """(relative file stem, seed, label, label map) for every image of a request; seeds are cfg.seed + position.
    With `n_maps` label maps (--masks) one image per map (per map and class with --per-class), stems under
    images/ and their maps under masks/ with the same name; `drawn` (--mask-run): --n pairs, each map drawn for
    its image."""
    if drawn:
        return [(PAIR_FOLDERS[0] + "/" + stem, seed, label, None)
                for stem, seed, label, _m in plan(run, cfg)]
    maps = list(range(n_maps)) if n_maps else [None]
    each_map = n_maps and not cfg.augment_masks  # one image per map; --augment-masks draws --n from them instead
    if cfg.per_class is not None:
        names = [cfg.class_name] if cfg.class_name else list(run.class_names)
        if not run.conditional:
            raise ConfigError("--per-class: this model is unconditional; use --n")
        per = cfg.per_class * (len(maps) if each_map else 1)
        total = per * len(names)
        if total > MAX_IMAGES or cfg.seed + total - 1 > SEEDS.hi:
            raise ConfigError(f"--per-class {cfg.per_class}: {total} images for {len(names)} classes; at most "
                              f"{MAX_IMAGES} in all, with seeds up to {SEEDS.hi}")
        return [(_stem(f"{c}/", cfg.seed + k * per + j, n_maps), cfg.seed + k * per + j, class_index(run, c),
                 maps[j % len(maps)]) for k, c in enumerate(names) for j in range(per)]
    label = class_index(run, cfg.class_name)
    count = n_maps if each_map else cfg.n
    if cfg.seed + count - 1 > SEEDS.hi:
        raise ConfigError(f"--seed {cfg.seed}: with {count} images the seeds run past the largest, {SEEDS.hi}")
    return [(_stem("", cfg.seed + i, n_maps), cfg.seed + i, label, maps[i % len(maps)]) for i in range(count)]


def _stem(prefix: str, seed: int, n_maps: int) -> str:
    return f"{PAIR_FOLDERS[0]}/{prefix}seed{seed:06d}" if n_maps else f"{prefix}seed{seed:06d}"


def read_masks(folder: str | Path, run: LoadedRun, echo: Callable[[str], None] = print) -> list[np.ndarray]:
    """--masks: every label image in a folder (sorted by path), each brought to the model's size by nearest
    neighbour → (S, S) int64 maps. A file that is no label image, or holds a label value the model does not know,
    is skipped and counted; none left is a ConfigError naming the folder. A data set with label maps instead (a
    folder of images/ + masks/, or builtin:phantoms?masks=1): its maps, e.g. the training set's, to make new
    images for maps like those the model learnt."""
    root = Path(str(folder)).expanduser()
    if not run.model.cond_channels:
        raise ConfigError(f"--masks {folder}: this model was not trained on label maps (its data had none)")
    if str(folder).startswith("builtin:") or (root.is_dir() and pair_layout(root)):
        data = load_data(str(folder), run.model.image_size, flag="--masks")
        if not data.has_masks:
            raise ConfigError(f"--masks {folder}: these images have no label maps (builtin:phantoms?masks=1 has)")
        maps = [m[0].numpy() for m in data.take_masks(np.arange(len(data)))]
        unknown = sorted(set(np.unique(np.stack(maps)).tolist()) - set(run.model.mask_values) - {0})
        if unknown:
            raise ConfigError(f"--masks {folder}: label value(s) {unknown} this model does not know (it knows "
                              f"{', '.join(map(str, run.model.mask_values))})")
        return maps
    if not root.is_dir():
        raise ConfigError(f"--masks {folder}: not a folder of label images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".tif", ".tiff", ".bmp"))
    known, maps, skipped = set(run.model.mask_values) | {0}, [], []
    for path in files:
        try:
            labels = read_label_map(path)
        except UnreadableFile as err:
            skipped.append(f"{path.relative_to(root)}: {err.reason}")
            continue
        unknown = sorted(set(np.unique(labels).tolist()) - known)
        if unknown:
            skipped.append(f"{path.relative_to(root)}: label value(s) {unknown} this model does not know (it knows "
                           f"{', '.join(map(str, run.model.mask_values))})")
            continue
        maps.append(labels_to_square(labels, run.model.image_size).astype(np.int64))
    if skipped:
        echo(f"skipped {len(skipped)} of {len(files)} label images: " + "; ".join(skipped[:3])
             + (" …" if len(skipped) > 3 else ""))
    if not maps:
        raise ConfigError(f"--masks {folder}: no usable label images (PNG, TIFF or BMP of the model's label values)")
    return maps


def _manifests(out: Path, dist: Dist) -> tuple[Any, set[str]]:
    """This process's manifest and the files already done according to every manifest in the folder (the
    merged one and per-rank parts a cut-off multi-process run left), so resume works at any world size."""
    parts = [export.Manifest(out, p.name) for p in sorted(out.glob("manifest*.csv"))]
    done = set().union(*(m.done() for m in parts)) if parts else set()
    mine = export.Manifest(out) if not dist.active else export.Manifest(out, f"manifest.rank{dist.rank}.csv")
    return mine, done


def _merge_manifests(out: Path) -> None:
    """Rank 0, after every rank finished: fold the per-rank parts into manifest.csv, sorted by file."""
    parts = sorted(out.glob("manifest.rank*.csv"))
    merged = export.Manifest(out)
    seen = {r["file"] for r in merged.rows()}
    rows = sorted((r for p in parts for r in export.Manifest(out, p.name).rows() if r["file"] not in seen),
                  key=lambda r: r["file"])
    for r in rows:
        info = export.SyntheticInfo(r["model_id"], int(r["seed"]), r["class"] or None, r["sampler"],
                                    int(r["steps"]), float(r["guidance"]))
        merged.add(r["file"], info, r["format"])
    for p in parts:
        p.unlink()


def _check_out_in_turn(out: Path, dist: Dist) -> Path:
    """Check --out on rank 0, then on the other ranks: each check makes and removes the folders missing, so checks
    that overlapped would see each other's. Returns the nearest folder that existed before, which a failed write
    keeps; the ranks write nothing until all have read the folder."""

    def check() -> Path:
        check_out_dir(out, "--out")
        return next(p for p in (out, *out.parents) if p.exists())

    existed = check() if dist.main else None
    if dist.active:
        td.barrier()
    return existed or check()


def sample_to_folder(cfg: SampleConfig, echo: Callable[[str], None] = print, dist: Dist = Dist(),
                     device: torch.device | None = None) -> dict[str, Any]:
    """Generate a request into cfg.out, streaming batches to disk; files already complete are skipped.
    Under torchrun each rank takes every world-th remaining image; the images do not depend on the split."""
    existed = _check_out_in_turn(Path(cfg.out), dist)
    device = device or pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device)
    if not dist.main:
        echo = _quiet
    run = load_run(cfg.run, cfg.weights, device)
    sampler, steps = sampler_and_steps(run, cfg.sampler, cfg.steps)
    cfg = dataclasses.replace(cfg, sampler=sampler, steps=steps)
    make_scheduler(cfg.sampler, run.scheduler_config, cfg.steps)  # validate before any work
    out = Path(cfg.out)  # made by the first image written: a request that fails before it leaves no folder
    manifest, done = _manifests(out, dist)
    if dist.active:  # every rank must split the same list: none may start writing before all have read the folder
        td.barrier()
    maps = read_masks(cfg.masks, run, echo) if cfg.masks else []
    map_run = load_mask_run(cfg, run, device) if cfg.mask_run else None
    jobs = plan(run, cfg, len(maps), drawn=map_run is not None)
    suffix = export.SUFFIX[cfg.fmt]
    remaining = [j for j in jobs if f"{j[0]}{suffix}" not in done]
    todo = remaining[dist.rank::dist.world]
    echo(f"sampling {len(remaining)} of {len(jobs)} images ({len(jobs) - len(remaining)} already done) with "
         f"{sampler_label(cfg.sampler, cfg.guidance_cutoff)}, {cfg.steps} steps, guidance {cfg.guidance}; "
         f"{describe(device, precision)}")
    bar = progress_bar(cfg.progress, len(jobs), len(jobs) - len(remaining), "img") if dist.main else None
    t0 = time.time()
    for lo in range(0, len(todo), cfg.batch_size):
        chunk = todo[lo:lo + cfg.batch_size]
        for label in sorted({j[2] for j in chunk}, key=lambda v: -1 if v is None else v):
            part = [j for j in chunk if j[2] == label]
            part_maps = np.stack([jitter_label_map(maps[j[3]], j[1]) if cfg.augment_masks else maps[j[3]]
                                  for j in part]) if maps else None
            if map_run is not None:
                part_maps = draw_maps(map_run, [j[1] for j in part], map_class(run, map_run, label),
                                      guidance=cfg.mask_guidance, precision=precision)
            imgs = generate(run, [j[1] for j in part], label, cfg.sampler, cfg.steps, cfg.guidance, precision,
                            cfg.cache_interval, part_maps, cfg.guidance_cutoff)
            for k, ((stem, seed, lab, _m), img) in enumerate(zip(part, imgs)):
                name = class_name(run, lab)
                mask = None if part_maps is None else mask_file(stem, cfg.fmt)
                info = export.SyntheticInfo(run.model_id, seed, name, sampler_label(cfg.sampler, cfg.guidance_cutoff),
                                            cfg.steps, cfg.guidance, mask)
                _write_sample(img, out, f"{stem}{suffix}", cfg.fmt, info, manifest, existed,
                              None if mask is None else part_maps[k], run.mask_names)
        if bar is not None:
            bar.update(len(chunk) * dist.world)
    if bar is not None:
        bar.close()
    seconds = time.time() - t0
    if dist.active:
        td.barrier()
        if dist.main:
            _merge_manifests(out)
    if cfg.grid and len(jobs) <= GRID_MAX_IMAGES and dist.main:
        pairs = (bool(maps) or map_run is not None) and export.label_map_suffix(cfg.fmt) == ".png"
        _write_grid(out, jobs, suffix, cfg.per_class * max(1, len(maps)) if cfg.per_class else None,
                    lesion_value(run.mask_names) if pairs else False)
    drawn_by = {} if map_run is None else dict(mask_model_id=map_run.model_id)
    return dict(out=str(out), written=len(remaining), skipped=len(jobs) - len(remaining), seconds=seconds,
                img_per_s=len(remaining) / seconds if remaining and seconds > 0 else None, model_id=run.model_id,
                **drawn_by, hardware=describe(device, precision))


def _write_sample(image: np.ndarray, out: Path, name: str, fmt: str, info: Any, manifest: Any, existed: Path,
                  labels: np.ndarray | None = None, names: dict[int, str] | None = None) -> None:
    """One image, its label map (`labels`, at info.mask, its values' `names` for a DICOM SEG) and its manifest
    row, in that order, so that a listed
    image always has its map; a full disk is one OutputError, and the folders below `existed` (the nearest one
    that was there before) that it leaves empty are removed."""
    try:
        with no_space_is_an_error(f"{out / name}", "the images written before it are complete; the same command "
                                  "continues after them once there is space"):
            export.write_image(image, out / name, fmt, info)
            if labels is not None:
                export.write_label_map(labels, out / info.mask, fmt, info, image=out / name, names=names)
            manifest.add(name, info, fmt)
    except BaseException:
        for folder in (out / name).parents:  # only empty folders go (the first image's class folder and out)
            if folder == existed or not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()
        raise


def mask_file(stem: str, fmt: str) -> str:
    """images/<name> → masks/<name> with the label map's suffix."""
    return PAIR_FOLDERS[1] + stem[len(PAIR_FOLDERS[0]):] + export.label_map_suffix(fmt)


def _write_grid(out: Path, jobs: list[Job], suffix: str, per_class: int | None,
                lesion: int | None | bool = False) -> None:
    """grid.png of every image of the request; a per-class request gets one row per class, labelled with it. Pairs
    (`lesion` not False: the value named lesion, or None) show each image's label map left of it
    (`export.label_map_tile`, the lesion white)."""
    images = [read_file(out / f"{stem}{suffix}")[0][0] for stem, *_rest in jobs]
    ncols = per_class if per_class is not None and per_class <= GRID_ROW_MAX else None
    labels = ([jobs[k][0].rpartition("/")[0].removeprefix(PAIR_FOLDERS[0] + "/") for k in range(0, len(jobs), ncols)]
              if ncols else None)
    if lesion is not False:  # a pair per grid cell: ncols pairs a row
        maps = [export.label_map_tile(read_label_map(out / mask_file(stem, "png")), lesion) for stem, *_r in jobs]
        images = [tile for pair in zip(maps, images) for tile in pair]
        ncols = 2 * (ncols or (len(jobs) if len(jobs) <= 4 else math.ceil(math.sqrt(len(jobs)))))
    export.save_png(export.make_grid(np.stack(images), ncols=ncols, row_labels=labels), out / "grid.png")


def _quiet(_message: str) -> None:
    pass

