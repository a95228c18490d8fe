"""Tests under the sampling paths the published figures rest on: every sampler against exact answers and against
diffusers' own loops on the same weights and seeds, DeepCache against the full UNet, and `sample --format png16`
end to end. Each test says which bug it would catch."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (DDIMPipeline, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, UniPCMultistepScheduler)
from diffusers.models.unets.unet_2d import UNet2DOutput
from PIL import Image

from meddiff.cli import main as cli_main
from meddiff.config import SAMPLERS
from meddiff.diffusion import alphas_cumprod
from meddiff.sample import LoadedRun, generate, load_run

DETERMINISTIC = tuple(s for s in SAMPLERS if s != "ddpm")
SEEDS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def uncond(uncond_run: Path) -> LoadedRun:
    return load_run(uncond_run)


@pytest.fixture(scope="module")
def cond(trained_run: Path) -> LoadedRun:
    return load_run(trained_run)


def _noise(seeds: list[int], size: int) -> torch.Tensor:
    """The starting noise meddiff documents: image i's from its own generator seeded with its seed. (B, 1, S, S)"""
    return torch.cat([torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds])


def _to_unit(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] model space → the [0, 1] images generate() returns, (B, S, S)."""
    return ((x.double().clamp(-1, 1) + 1) / 2)[:, 0].numpy()


# ---------------------------------------------------------------- an exact denoiser: samplers against closed forms

class GaussianOracle(torch.nn.Module):
    """The ideal network for data x_0 ~ N(mu, s^2 I) under the run's training schedule and objective, in place of
    the UNet: E[x_0 | x_t] = mu + a s^2 / (a^2 s^2 + b^2) (x_t - a mu) with a = sqrt(alpha_bar_t),
    b = sqrt(1 - alpha_bar_t), turned into what train() teaches the UNet to output (eps or v). It computes
    alpha_bar from the timestep it is given and expects x_t at the variance-preserving scale, so a sampler that
    passes the wrong timestep, skips scale_model_input or reads the output as the wrong objective gets a wrong
    answer. For s = 0 (one image) every correct sampler returns mu at any step count; for s > 0 the probability
    flow ODE keeps (x_t - a mu) / sqrt(a^2 s^2 + b^2) constant, so x_0 = mu + s (x_T - a_T mu) / sqrt(...) exactly."""

    def __init__(self, run: LoadedRun, mu: torch.Tensor, s: float) -> None:
        super().__init__()
        cfg = run.train
        self.alpha_bar = alphas_cumprod(cfg.beta_schedule, cfg.num_train_timesteps, cfg.zero_terminal_snr)
        self.objective, self.mu, self.s = cfg.objective, mu.double(), s
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so that the sampler finds a device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a, b at (possibly fractional) timesteps t, as (B, 1, 1, 1) float64."""
        t = t.double().clamp(0, len(self.alpha_bar) - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=len(self.alpha_bar) - 1)
        ab = self.alpha_bar[lo] + (t - lo) * (self.alpha_bar[hi] - self.alpha_bar[lo])
        return ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)

    def endpoint(self, x_T: torch.Tensor) -> torch.Tensor:
        """Where the probability flow ODE started at the first (largest) timestep ends: x_0, (B, 1, S, S) float64."""
        a, b = self.coefficients(torch.tensor([len(self.alpha_bar) - 1]))
        return self.mu + self.s * (x_T.double() - a * self.mu) / (a**2 * self.s**2 + b**2).sqrt()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                return_dict: bool = True, **_: object) -> UNet2DOutput | tuple[torch.Tensor]:
        t = torch.as_tensor(timestep).reshape(-1).expand(sample.shape[0])
        a, b = self.coefficients(t)
        x = sample.double()
        x0 = self.mu + a * self.s**2 / (a**2 * self.s**2 + b**2) * (x - a * self.mu)
        eps = (x - a * x0) / b
        out = (a * eps - b * x0 if self.objective == "v" else eps).to(sample.dtype)  # Salimans & Ho 2022, §4
        return UNet2DOutput(sample=out) if return_dict else (out,)


def _oracle_run(run: LoadedRun, s: float) -> tuple[LoadedRun, GaussianOracle]:
    size = run.model.sample_size
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    mu = (0.6 * xx * yy).view(1, 1, size, size)  # a pattern, so that a flipped or shifted image is wrong
    oracle = GaussianOracle(run, mu, s)
    return dataclasses.replace(run, unet=oracle), oracle


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_returns_the_one_image_an_exact_model_knows(uncond: LoadedRun, sampler: str) -> None:
    # Catches, for every sampler: a timestep off by one (or an index passed instead of the timestep value),
    # error ~3e-3; a dropped scale_model_input (Euler, Heun), ~5e-2; output read as eps by a v-model, ~0.1-0.75;
    # a wrong mapping from [-1, 1] to [0, 1]. A correct chain is exact to float32 rounding (~4e-7).
    run, oracle = _oracle_run(uncond, s=0.0)
    want = _to_unit(oracle.mu.expand(len(SEEDS), -1, -1, -1))
    for steps in (3, 10):
        np.testing.assert_allclose(generate(run, SEEDS, None, sampler, steps), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_deterministic_samplers_converge_to_the_exact_ode_solution(uncond: LoadedRun, sampler: str) -> None:
    # Catches: starting noise not scaled by init_noise_sigma (Euler, Heun: error 0.41 at any step count), a
    # sampler solving another ODE than the trained schedule's (wrong prediction type, schedule or first timestep),
    # and the starting noise not being the seed's own. Measured errors at 50 steps: DDIM and Euler 0.028 (first
    # order), DPM-Solver++ 0.004, UniPC 0.005, Heun 0.0006; at 5 steps all are 0.2-0.65.
    run, oracle = _oracle_run(uncond, s=0.2)
    want = _to_unit(oracle.endpoint(_noise(SEEDS, uncond.model.sample_size)))
    few, many = (np.abs(generate(run, SEEDS, None, sampler, n) - want).max() for n in (5, 50))
    assert many < 0.04, f"{sampler}: 50 steps end {many:.4f} from the exact ODE solution"
    assert many < few / 5, f"{sampler}: error {few:.4f} at 5 steps, {many:.4f} at 50: not converging"


def test_ddpm_draws_from_the_data_distribution_an_exact_model_knows(uncond: LoadedRun) -> None:
    # DDPM is stochastic, so its reference is a distribution: with the ideal denoiser for N(mu, 0.2^2) data,
    # (x - mu) / 0.2 over 4 x 32 x 32 pixels must be ~N(0, 1) (measured mean 0.00, std 0.95 at 50 steps).
    # Catches missing or doubled step noise (std far from 1) and a bias from a wrong timestep or objective.
    s = 0.2
    run, oracle = _oracle_run(uncond, s=s)
    images = generate(run, SEEDS, None, "ddpm", 50)
    z = (images * 2 - 1 - oracle.mu[0, 0].numpy()) / s
    assert abs(z.mean()) < 0.1 and 0.85 < z.std() < 1.1, (z.mean(), z.std())


# ---------------------------------------------------------------- diffusers' own pipelines and loops, same weights

def test_ddim_equals_diffusers_ddim_pipeline(uncond_run: Path, uncond: LoadedRun) -> None:
    # Catches any departure from diffusers' DDIM on the run's own scheduler config: another timestep spacing or
    # eta, a changed clip_sample, another noise draw order for a seed.
    pipe = DDIMPipeline.from_pretrained(str(uncond_run))
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    want = pipe(batch_size=len(SEEDS), num_inference_steps=4, generator=gens, eta=0.0, output_type="np").images
    np.testing.assert_allclose(generate(uncond, SEEDS, None, "ddim", 4), want[..., 0], atol=1e-5, rtol=0)


def test_ddpm_equals_diffusers_ddpm_pipeline(uncond_run: Path, uncond: LoadedRun) -> None:
    # Catches step noise drawn from another generator or in another order than diffusers' DDPMPipeline with one
    # generator per image (the "same seed, same image" rule for the stochastic sampler), and a changed variance.
    pipe = DDPMPipeline(unet=uncond.unet, scheduler=DDPMScheduler.from_pretrained(str(uncond_run / "scheduler")))
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    want = pipe(batch_size=len(SEEDS), num_inference_steps=4, generator=gens, output_type="np").images
    np.testing.assert_allclose(generate(uncond, SEEDS, None, "ddpm", 4), want[..., 0], atol=1e-5, rtol=0)


def test_stochastic_ddim_through_meddiffs_pipeline_equals_diffusers(uncond_run: Path, uncond: LoadedRun) -> None:
    # DDIM with eta = 1 draws step noise like DDPM: catches noise drawn in another dtype or order than diffusers'
    # DDIMPipeline draws it for the same per-image generators.
    from diffusers import DDIMScheduler

    from meddiff.pipeline import MeddiffPipeline

    scheduler = DDIMScheduler.from_pretrained(str(uncond_run / "scheduler"))
    images = {}
    for name, pipe in (("diffusers", DDIMPipeline(unet=uncond.unet, scheduler=scheduler)),
                       ("meddiff", MeddiffPipeline(unet=uncond.unet, scheduler=scheduler))):
        pipe.set_progress_bar_config(disable=True)
        gens = [torch.Generator().manual_seed(s) for s in SEEDS]
        images[name] = pipe(batch_size=len(SEEDS), num_inference_steps=4, generator=gens, eta=1.0,
                            output_type="np").images
    np.testing.assert_allclose(images["meddiff"], images["diffusers"], atol=1e-5, rtol=0)


REFERENCE_SCHEDULERS = {
    "dpmpp-2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
    "unipc": (UniPCMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
}


@pytest.mark.parametrize("sampler", sorted(REFERENCE_SCHEDULERS))
def test_sampler_equals_the_diffusers_loop(uncond_run: Path, uncond: LoadedRun, sampler: str) -> None:
    # The loop diffusers documents for its schedulers, written out here on the run's scheduler/ folder, one image
    # at a time. Catches a scheduler built from another config than the run's (spacing, prediction type), the
    # sampler's extra options (DPM-Solver++ order 2), a dropped scale_model_input or init_noise_sigma, a skipped or
    # repeated timestep. The state runs in float64 as meddiff's does: in float32, Euler and Heun start from
    # noise x sigma_max (2e4 on this schedule) and end 1e-3 apart.
    cls, extra = REFERENCE_SCHEDULERS[sampler]
    steps, seeds = 4, [0, 1]
    want = []
    for x in _noise(seeds, uncond.model.sample_size):
        sched = cls.from_pretrained(str(uncond_run / "scheduler"), **extra)
        sched.set_timesteps(steps)
        x = x[None].double() * sched.init_noise_sigma
        for t in sched.timesteps:
            with torch.no_grad():
                out = uncond.unet(sched.scale_model_input(x, t).float(), t).sample
            x = sched.step(out.double(), t, x).prev_sample
        want.append(_to_unit(x)[0])
    np.testing.assert_allclose(generate(uncond, seeds, None, sampler, steps), np.stack(want), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- DeepCache

class _Counter:
    """Forward calls of a module, counted with a forward hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()


def test_deepcache_refresh_step_equals_the_full_unet(cond: LoadedRun) -> None:
    # One step makes one model call, which is a refresh: DeepCache's own forward (embedding, down, mid and up
    # blocks, skip connections) must give the full UNet's output. Catches a skip connection taken from the wrong
    # level, a missing class embedding or a mis-ordered residual stack in the cached forward.
    for guidance in (1.0, 2.0):
        full = generate(cond, SEEDS, 0, "ddim", 1, guidance=guidance)
        cached = generate(cond, SEEDS, 0, "ddim", 1, guidance=guidance, cache_interval=2)
        np.testing.assert_allclose(cached, full, atol=1e-6, rtol=0)


def test_deepcache_at_interval_2_stays_close_to_the_full_unet(cond: LoadedRun) -> None:
    # Catches a cache that is never used (equal images), features reused from the wrong level or a stale cache
    # carried from another image (images far apart: as far as an unrelated seed's).
    full = generate(cond, SEEDS, 0, "unipc", 10)
    cached = generate(cond, SEEDS, 0, "unipc", 10, cache_interval=2)
    unrelated = generate(cond, [s + 100 for s in SEEDS], 0, "unipc", 10)
    gap, spread = np.abs(cached - full).mean(), np.abs(unrelated - full).mean()
    assert gap > 0, "cache_interval=2 gave the full UNet's images: the cache is not used"
    assert gap < spread / 5, f"DeepCache moved the images by {gap:.4f}; an unrelated seed is {spread:.4f} away"


@pytest.mark.parametrize("sampler, steps, interval", [("ddim", 10, 2), ("ddim", 10, 3), ("unipc", 7, 3),
                                                      ("heun", 4, 2), ("dpmpp-2m", 5, 1)])
def test_deepcache_runs_the_full_unet_once_every_interval_calls(cond: LoadedRun, sampler: str, steps: int,
                                                                interval: int) -> None:
    # The deepest block (mid_block) runs only in a full forward; the first convolution runs on every model call.
    # With guidance both branches share one batched call. Heun calls the model twice a step but once on the last.
    # Catches a refresh schedule off by one (a full call too many or too few) or a cache that never refreshes.
    calls = 2 * steps - 1 if sampler == "heun" else steps
    deep, first = _Counter(cond.unet.mid_block), _Counter(cond.unet.conv_in)
    try:
        generate(cond, [7], 1, sampler, steps, guidance=2.0, cache_interval=interval)
    finally:
        deep.remove()
        first.remove()
    assert first.calls == calls
    assert deep.calls == math.ceil(calls / interval)


def test_deepcache_keeps_same_seed_same_image_at_any_batch_size(cond: LoadedRun) -> None:
    # Catches a feature cache shared across images or kept from one batch to the next.
    batch = generate(cond, SEEDS, 1, "unipc", 6, guidance=2.0, cache_interval=3)
    single = generate(cond, [SEEDS[2]], 1, "unipc", 6, guidance=2.0, cache_interval=3)
    np.testing.assert_allclose(single[0], batch[2], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- sample --format png16 through the CLI

def test_sample_png16_end_to_end(uncond_run: Path, uncond: LoadedRun, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    # Catches 16-bit output quantised to 8 bits on the way (<= 256 levels, or values a multiple of 257), files not
    # named by their seed, a manifest that misses files or their format, and pixels that are not the generated ones.
    out = tmp_path / "png16"
    code = cli_main(["sample", "--run", str(uncond_run), "--out", str(out), "--n", "3", "--seed", "5", "--steps", "3",
                     "--sampler", "ddim", "--format", "png16", "--batch-size", "2", "--no-progress",
                     "--precision", "fp32", "--device", "cpu"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert json.loads(stdout.splitlines()[-1])["written"] == 3
    names = sorted(p.name for p in out.glob("seed*.png"))
    assert names == ["seed000005.png", "seed000006.png", "seed000007.png"]
    expected = generate(uncond, [5, 6, 7], None, "ddim", 3)
    for name, image in zip(names, expected):
        with Image.open(out / name) as im:
            assert im.mode == "I;16"
            pixels = np.asarray(im).astype(np.int64)
        assert pixels.shape == (32, 32)
        # round(x * 65535) of the generated image; one level of slack for the batch-size-dependent float32 rounding
        # of the UNet (the CLI ran batches of 2, generate() one of 3)
        assert np.abs(pixels - np.round(image.astype(np.float64) * 65535)).max() <= 1
        levels = np.unique(pixels)
        assert len(levels) > 256 and np.any(levels % 257), "16-bit file holds only 8-bit values"
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["file"], r["seed"], r["format"], r["sampler"], r["steps"]) for r in rows] == [
        (f"seed{s:06d}.png", str(s), "png16", "ddim", "3") for s in (5, 6, 7)]
    assert {r["model_id"] for r in rows} == {uncond.model_id}
