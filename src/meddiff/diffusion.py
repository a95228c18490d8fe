"""Noise schedules, objectives (eps, v) and loss weighting: pure tensor maths, named as in the papers.

Notation (Ho et al. 2020, "DDPM"): x_0 clean image, eps ~ N(0, I), t in {0..T-1},
alpha_bar_t = prod_{s<=t} (1 - beta_s), x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (eq. 4).
Schedules are computed in float64; callers take a float32 copy, never recasting the original in place.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIFFUSERS_BETA_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
X0_MIN_NOISE = 0.0025  # x0-prediction's v-space loss divides by 1 - alpha_bar, never by less (noise std 0.05)


Shift = float | tuple[float, float]


def betas_for(beta_schedule: str, T: int, shift: Shift = 0.0) -> torch.Tensor:
    """(T,) float64 betas: DDPM's linear 1e-4..0.02 (Ho et al. §4) or the cosine schedule (Nichol & Dhariwal 2021,
    eq. 17), with its log-SNR shifted by `shift` (`shift_log_snr`)."""
    if beta_schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    elif beta_schedule == "cosine":
        def f(t: float) -> float:  # eq. 17 with s = 0.008
            return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)],  # clipped at 0.999 as in §3.2
                             dtype=torch.float64)
    else:
        raise ValueError(f"unknown beta schedule {beta_schedule!r}")
    if shift in (0.0, (0.0, 0.0)):
        return betas
    ab = shift_log_snr(torch.cumprod(1 - betas, 0), shift)
    return (1 - ab / torch.cat([ab.new_ones(1), ab[:-1]])).clamp(max=0.999)


def shift_log_snr(alpha_bar: torch.Tensor, shift: Shift) -> torch.Tensor:
    """alpha_bar with log SNR moved by `shift`: log SNR'(t) = log SNR(t) + shift. "Simple diffusion" (Hoogeboom et
    al. 2023, §3.1) shifts by 2 log(64 / d) at resolution d, so that an image of d px is as noisy at step t as one
    of 64 px: neighbouring pixels average the noise away, and an unshifted schedule leaves large images too clean
    for too long. A pair (at_clean, at_noise) interpolates the shift linearly in t, from `at_clean` at the first
    step to `at_noise` at the last (the paper's "interpolated" schedule, §3.1): the coarse, noisy steps are shifted
    for the image's size while the last, fine-detail steps keep the noise levels a small image has.
    `config.noise_shift_for` is the rule meddiff's recipes use."""
    if isinstance(shift, tuple):
        at_clean, at_noise = shift
        u = torch.arange(1, len(alpha_bar) + 1, dtype=torch.float64) / len(alpha_bar)
        shift = at_clean + (at_noise - at_clean) * u
    return torch.sigmoid(torch.logit(alpha_bar.double()) + shift)



def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(alpha_bar) so that the last step has SNR exactly 0."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def alphas_cumprod(beta_schedule: str, T: int, zero_terminal_snr: bool = False, shift: Shift = 0.0) -> torch.Tensor:
    """(T,) float64 alpha_bar_t: the schedule, its log SNR shifted, then (optionally) rescaled to zero terminal SNR."""
    betas = betas_for(beta_schedule, T, shift)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1 - betas, 0)


def q_sample(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t from x_0 in one jump (Ho et al. eq. 4). x0, eps: (B, C, H, W); alpha_bar: (B,)."""
    a = alpha_bar.to(x0.dtype).view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def v_target(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022, §4)."""
    a = alpha_bar.to(x0.dtype).view(-1, 1, 1, 1)
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar)."""
    return alpha_bar / (1 - alpha_bar).clamp(min=1e-20)


def loss_weight(alpha_bar: torch.Tensor, objective: str, weighting: str, gamma: float = 5.0) -> torch.Tensor:
    """(B,) per-sample weights. min-SNR-gamma (Hang et al. 2023, eq. 6/§3.4): min(SNR, gamma) divided by
    SNR for eps-prediction and by SNR + 1 for v-prediction, so that both equal the x_0-loss weight min(SNR, gamma).
    x0-prediction without weighting is measured in v-space, as in Li & He 2025 ("Back to Basics: Let Denoising
    Generative Models Denoise", x-prediction with v-loss): ||x0_hat - x0||² / (1 - alpha_bar) is exactly the
    v-MSE of the v that x0_hat implies, so its weighting over noise levels is the v default's; 1 - alpha_bar is
    clamped at X0_MIN_NOISE."""
    s = snr(alpha_bar)
    if objective == "x0":
        return (1 / (1 - alpha_bar).clamp(min=X0_MIN_NOISE) if weighting == "none" else s.clamp(max=gamma))
    if weighting == "none":
        return torch.ones_like(alpha_bar)
    clipped = s.clamp(max=gamma)
    return clipped / (s + 1) if objective == "v" else clipped / s.clamp(min=1e-8)


def diffusion_loss(pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor,
                   objective: str, weighting: str = "none", gamma: float = 5.0,
                   pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) weighted MSE between the network output and its target (eps, v or x0), averaged over pixels;
    `pixel_weight` (B, 1, H, W), where given, weights each pixel's error first (`label_map_weight`)."""
    target = {"eps": eps, "x0": x0}.get(objective)
    target = v_target(x0, eps, alpha_bar) if target is None else target
    err = (pred.float() - target.float()).pow(2)
    mse = (err if pixel_weight is None else err * pixel_weight.float()).mean(dim=(1, 2, 3))
    return mse * loss_weight(alpha_bar, objective, weighting, gamma).to(mse.dtype)


def label_map_weight(masks: torch.Tensor, weight: float, factor: int = 1,
                     values: tuple[int, ...] | None = None) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H / factor, W / factor) from label maps (B, 1, H, W): 1 + `weight` where the
    map holds one of `values` (default: anything but background, a lesion or a labelled organ), 1 elsewhere.
    Lesions cover a few per cent of an image, so the plain MSE spends almost nothing on drawing them where the map
    asks; this weights them up (a map of anatomy labels nearly every pixel: there `values` names the lesion). A
    latent model (`factor` > 1) weights a latent cell by the largest weight among the pixels it covers."""
    hit = masks != 0 if values is None else torch.isin(masks, torch.as_tensor(values, device=masks.device))
    w = 1 + weight * hit.float()
    return w if factor == 1 else F.max_pool2d(w, factor)


def diffusers_scheduler_config(beta_schedule: str, T: int, objective: str, zero_terminal_snr: bool,
                               timestep_spacing: str = "leading", shift: Shift = 0.0, latent: bool = False) -> dict:
    """The same schedule in diffusers' vocabulary, so that its samplers and pipelines match training.
    Predicted pixels x_0 are clipped to [-1, 1] as diffusers' DDIM does by default (the seed's behaviour); a
    latent model's x_0 is never clipped (`latent`): its latents have unit variance, so about a third of their
    values lie outside [-1, 1], and clipping them at every step washes the decoded images out. A shifted
    schedule travels as `trained_betas` (every diffusers scheduler takes them, and rescales them to zero
    terminal SNR after, as `alphas_cumprod` does)."""
    config = dict(num_train_timesteps=T, beta_schedule=DIFFUSERS_BETA_SCHEDULE[beta_schedule],
                  prediction_type=DIFFUSERS_PREDICTION[objective], rescale_betas_zero_snr=zero_terminal_snr,
                  clip_sample=not latent, timestep_spacing="trailing" if zero_terminal_snr else timestep_spacing)
    if shift not in (0.0, (0.0, 0.0)):
        config["trained_betas"] = betas_for(beta_schedule, T, shift).tolist()
    return config


def predicted_eps(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, objective: str) -> torch.Tensor:
    """The network's noise estimate whatever it predicts: eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t for v
    (Salimans & Ho 2022, §4), eps = (x_t - sqrt(alpha_bar) x0) / sqrt(1 - alpha_bar) for x0, so that validation
    losses of eps-, v- and x0-models are on one scale."""
    if objective == "eps":
        return pred
    a = alpha_bar.to(x_t.dtype).view(-1, 1, 1, 1)
    if objective == "x0":
        return (x_t - a.sqrt() * pred) / (1 - a).sqrt()
    return a.sqrt() * pred + (1 - a).sqrt() * x_t
