"""Tests for meddiff.diffusion: schedules against diffusers, the eps/v/x0 identities, min-SNR weights, the loss."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from meddiff.diffusion import (X0_MIN_NOISE, alphas_cumprod, betas_for, diffusers_scheduler_config, diffusion_loss,
                               loss_weight, predicted_eps, q_sample, snr, v_target)


@pytest.mark.parametrize("ours, theirs", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_match_diffusers(ours: str, theirs: str, zero_snr: bool) -> None:
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, rescale_betas_zero_snr=zero_snr)
    ab = alphas_cumprod(ours, 1000, zero_snr)
    assert ab.dtype == torch.float64 and ab.shape == (1000,)
    torch.testing.assert_close(ab, ref.alphas_cumprod.double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_zero_terminal_snr_makes_last_alpha_bar_zero_and_keeps_first(schedule: str) -> None:
    plain = alphas_cumprod(schedule, 1000)
    zero = alphas_cumprod(schedule, 1000, zero_terminal_snr=True)
    assert plain[-1] > 0
    assert zero[-1] == 0
    assert snr(zero)[-1] == 0
    torch.testing.assert_close(zero[0], plain[0], atol=1e-12, rtol=0)
    assert bool((zero[1:] <= zero[:-1]).all()), "alpha_bar must decrease monotonically"


def test_betas_are_float64_and_cosine_clipped() -> None:
    cos = betas_for("cosine", 1000)
    assert cos.dtype == torch.float64
    assert float(cos.max()) == pytest.approx(0.999)
    lin = betas_for("linear", 1000)
    assert float(lin[0]) == pytest.approx(1e-4) and float(lin[-1]) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="unknown beta schedule 'sigmoid'"):
        betas_for("sigmoid", 10)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_diffusers_scheduler_config_reproduces_our_schedule(schedule: str, objective: str, zero_snr: bool) -> None:
    cfg = diffusers_scheduler_config(schedule, 1000, objective, zero_snr, "leading")
    sched = DDPMScheduler(**cfg)
    torch.testing.assert_close(sched.alphas_cumprod.double(), alphas_cumprod(schedule, 1000, zero_snr),
                               atol=1e-6, rtol=0)
    assert sched.config.prediction_type == {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[objective]
    # zero terminal SNR needs trailing spacing so that sampling starts from pure noise (Lin et al. 2024, §3.3)
    assert sched.config.timestep_spacing == ("trailing" if zero_snr else "leading")


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(3, 1, 8, 8, generator=g)
    alpha_bar = torch.tensor([0.999, 0.5, 0.01], dtype=torch.float64)
    return x0, eps, alpha_bar


def test_q_sample_matches_eq4_and_keeps_dtype() -> None:
    x0, eps, ab = _batch()
    x_t = q_sample(x0, eps, ab)
    assert x_t.dtype == torch.float32
    expected = ab.sqrt().float().view(-1, 1, 1, 1) * x0 + (1 - ab).sqrt().float().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(x_t, expected)
    assert ab.dtype == torch.float64, "the schedule must not be recast in place"


def test_v_target_and_predicted_eps_identities() -> None:
    x0, eps, ab = _batch(1)
    x_t = q_sample(x0, eps, ab)
    v = v_target(x0, eps, ab)
    # predicted_eps of the true v gives back eps (Salimans & Ho 2022, §4)
    torch.testing.assert_close(predicted_eps(v, x_t, ab, "v"), eps, atol=1e-5, rtol=1e-5)
    # and the true x_0 back as sqrt(a) x_t - sqrt(1 - a) v
    a = ab.float().view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, atol=1e-5, rtol=1e-5)
    # eps-models pass through unchanged
    assert predicted_eps(eps, x_t, ab, "eps") is eps


@pytest.mark.parametrize("snr_value, eps_w, v_w", [
    (0.5, 1.0, 0.5 / 1.5),        # below gamma: eps weight 1, v weight SNR / (SNR + 1)
    (5.0, 1.0, 5.0 / 6.0),        # at gamma
    (20.0, 5.0 / 20.0, 5.0 / 21.0),  # above gamma: clipped to gamma
])
def test_min_snr_weights_by_hand(snr_value: float, eps_w: float, v_w: float) -> None:
    ab = torch.tensor([snr_value / (1 + snr_value)], dtype=torch.float64)
    assert float(snr(ab)[0]) == pytest.approx(snr_value)
    assert float(loss_weight(ab, "eps", "min-snr", 5.0)[0]) == pytest.approx(eps_w)
    assert float(loss_weight(ab, "v", "min-snr", 5.0)[0]) == pytest.approx(v_w)
    assert float(loss_weight(ab, "v", "none")[0]) == 1.0


def test_min_snr_weight_at_zero_snr_is_finite_zero() -> None:
    ab = torch.tensor([0.0], dtype=torch.float64)
    for objective in ("eps", "v"):
        w = loss_weight(ab, objective, "min-snr")
        assert torch.isfinite(w).all() and float(w[0]) == 0.0


@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
@pytest.mark.parametrize("weighting", ["none", "min-snr"])
def test_loss_is_zero_for_the_exact_target_and_positive_otherwise(objective: str, weighting: str) -> None:
    x0, eps, ab = _batch(2)
    target = {"eps": eps, "v": v_target(x0, eps, ab), "x0": x0}[objective]
    loss = diffusion_loss(target, x0, eps, ab, objective, weighting)
    assert loss.shape == (3,)
    assert torch.all(loss.abs() < 1e-12)
    wrong = diffusion_loss(target + 0.1, x0, eps, ab, objective, weighting)
    assert torch.all(wrong > 0)


def test_x0_prediction_is_trained_with_the_v_loss_it_implies_and_gives_back_eps() -> None:
    x0, eps, ab = _batch(4)
    ab = torch.tensor([0.99, 0.5, 0.01], dtype=torch.float64)  # 1 - alpha_bar above the clamp everywhere
    x_t = q_sample(x0, eps, ab)
    guess = x0 + 0.1 * torch.randn_like(x0)
    a = ab.float().view(-1, 1, 1, 1)
    implied_v = (a.sqrt() * x_t - guess) / (1 - a).sqrt()
    torch.testing.assert_close(diffusion_loss(guess, x0, eps, ab, "x0"),
                               (implied_v - v_target(x0, eps, ab)).pow(2).mean(dim=(1, 2, 3)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(predicted_eps(x0, x_t, ab, "x0"), eps, atol=1e-4, rtol=1e-4)
    # nearly clean: the weight stops at 1 / X0_MIN_NOISE instead of growing without bound
    clean = torch.tensor([1 - 1e-6], dtype=torch.float64)
    assert float(loss_weight(clean, "x0", "none")[0]) == pytest.approx(1 / X0_MIN_NOISE)
    assert float(loss_weight(torch.tensor([0.5], dtype=torch.float64), "x0", "min-snr", 5.0)[0]) == 1.0


def test_loss_is_per_sample_mse_times_weight() -> None:
    x0, eps, ab = _batch(3)
    pred = torch.zeros_like(eps)
    loss = diffusion_loss(pred, x0, eps, ab, "eps", "min-snr", 5.0)
    expected = eps.pow(2).mean(dim=(1, 2, 3)) * loss_weight(ab, "eps", "min-snr", 5.0).float()
    torch.testing.assert_close(loss, expected)


def test_a_pixel_weight_weights_each_pixels_error_and_label_maps_give_it() -> None:
    from meddiff.diffusion import label_map_weight

    x0, eps, ab = _batch(3)
    masks = torch.zeros(3, 1, *eps.shape[-2:], dtype=torch.int64)
    masks[0, 0, :2, :2], masks[1, 0, -1, -1] = 1, 2
    w = label_map_weight(masks, 4.0)
    assert w.shape == masks.shape and set(w.unique().tolist()) == {1.0, 5.0}
    assert float(w[0, 0, 0, 0]) == 5.0 and float(w[1, 0, -1, -1]) == 5.0 and float(w[2].max()) == 1.0
    pred = torch.zeros_like(eps)
    torch.testing.assert_close(diffusion_loss(pred, x0, eps, ab, "eps", pixel_weight=w),
                               (eps.pow(2) * w).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(diffusion_loss(pred, x0, eps, ab, "eps", pixel_weight=torch.ones_like(w)),
                               diffusion_loss(pred, x0, eps, ab, "eps"))
    # a latent grid 2x coarser: a cell with one labelled pixel takes its weight
    coarse = label_map_weight(masks, 4.0, factor=2)
    assert coarse.shape == (3, 1, eps.shape[-2] // 2, eps.shape[-1] // 2)
    assert float(coarse[1, 0, -1, -1]) == 5.0 and float(coarse[1].sum()) == coarse[1].numel() + 4.0
    only = label_map_weight(masks, 4.0, values=(2,))  # the lesion alone among other labelled structures
    assert float(only[1, 0, -1, -1]) == 5.0 and float(only[0].max()) == 1.0
