"""Tests for meddiff.model: preset architectures, conditioning, space-to-depth patches, the Denoiser (guidance,
DeepCache)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from meddiff.config import model_config
from meddiff.errors import ConfigError
from meddiff.model import Denoiser, build_unet, cached_unet_forward, count_parameters, denoise, null_class


def test_tiny_unet_is_under_a_million_parameters_and_keeps_shape() -> None:
    unet = build_unet(model_config("tiny", 16))
    assert count_parameters(unet) < 1_000_000
    x = torch.randn(2, 1, 16, 16)
    out = denoise(unet, x, torch.tensor([0, 999]))
    assert out.shape == (2, 1, 16, 16) and out.dtype == torch.float32


def test_seed_preset_is_the_slides_architecture() -> None:
    with torch.device("meta"):
        unet = build_unet(model_config("seed", 128))
    c = unet.config
    assert c.layers_per_block == 3
    assert tuple(c.block_out_channels) == (128, 128, 256, 256, 512, 512)
    assert tuple(c.down_block_types) == ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D")
    assert tuple(c.up_block_types) == ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4
    assert (c.in_channels, c.out_channels, c.sample_size) == (1, 1, 128)
    assert c.num_class_embeds is None


def test_conditional_model_has_a_null_class_row() -> None:
    mcfg = model_config("tiny", 16, num_classes=3)
    unet = build_unet(mcfg)
    assert unet.config.num_class_embeds == 4
    assert null_class(mcfg) == 3
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([10, 10])
    a = denoise(unet, x, t, torch.tensor([0, 0]))
    b = denoise(unet, x, t, torch.tensor([0, 3]))
    assert not torch.equal(a[1], b[1]), "the class label must change the output"
    torch.testing.assert_close(a[0], b[0])


def test_patch_size_two_is_pixel_unshuffle_unet_pixel_shuffle() -> None:
    mcfg = model_config("lean", 16)
    assert mcfg.patch_size == 2
    torch.manual_seed(0)
    unet = build_unet(mcfg).eval()
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (4, 4, 8)
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([5, 500])
    with torch.no_grad():
        out = denoise(unet, x, t, patch_size=2)
        ref = F.pixel_shuffle(unet(F.pixel_unshuffle(x, 2), t).sample, 2)
    assert out.shape == (2, 1, 16, 16)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_space_to_depth_is_lossless() -> None:
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).view(2, 1, 16, 16)
    assert torch.equal(F.pixel_shuffle(F.pixel_unshuffle(x, 2), 2), x)


def test_self_attention_matches_diffusers_in_fp32_and_runs_sdpa_in_fp32_under_cpu_bf16(monkeypatch) -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    unet = build_unet(model_config("tiny", 16, 2))
    blocks = [m for m in unet.modules() if isinstance(m, Attention)]
    assert blocks and all(type(m.processor).__name__ == "SelfAttention" for m in blocks)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.tensor([0, 1])
    ours = unet(x, t, class_labels=y).sample
    seen: list[torch.dtype] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(q.dtype)
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", torch.bfloat16):
        low = unet(x, t, class_labels=y).sample
    assert seen and set(seen) == {torch.float32}  # the attention product ran in fp32
    assert low.dtype == torch.bfloat16 and (low.float() - ours).abs().max() < 0.1
    for m in blocks:
        m.set_processor(AttnProcessor2_0())
    torch.testing.assert_close(unet(x, t, class_labels=y).sample, ours, rtol=0, atol=0)


def _conditional_unet(patch_size: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    preset = "lean" if patch_size == 2 else "tiny"
    return build_unet(model_config(preset, 16, num_classes=2)).eval()


@torch.no_grad()
def test_full_deepcache_pass_equals_the_plain_unet_exactly() -> None:
    unet = _conditional_unet()
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([5, 400, 999]), torch.tensor([0, 1, 2])
    plain = unet(x, t, class_labels=y).sample
    out, deep = cached_unet_forward(unet, x, t, y)
    assert torch.equal(out, plain) and deep.shape[0] == 3
    again, _ = cached_unet_forward(unet, x, t, y, deep)  # reused features of the same input: the same output
    assert torch.equal(again, plain)
    x2 = torch.randn_like(x)  # a new input with old deep features: an approximation
    other, _ = cached_unet_forward(unet, x2, t, y, deep)
    assert not torch.equal(other, unet(x2, t, class_labels=y).sample)


@pytest.mark.parametrize("patch_size", [1, 2])
@torch.no_grad()
def test_denoiser_at_cache_interval_one_is_the_plain_unet(patch_size: int) -> None:
    unet = _conditional_unet(patch_size)
    labels = torch.tensor([1, 0])
    plain = Denoiser(unet, labels, null_class=2, patch_size=patch_size)
    cached = Denoiser(unet, labels, null_class=2, patch_size=patch_size, cache_interval=3)
    for step in range(4):  # DeepCache refreshes on calls 0 and 3: then its output is the plain UNet's
        x, t = torch.randn(2, 1, 16, 16), torch.tensor([900 - 200 * step] * 2)
        ref = denoise(unet, x, t, labels, patch_size)
        assert torch.equal(plain(x, t), ref)
        assert torch.equal(cached(x, t), ref) == (step % 3 == 0)
    assert plain.calls == cached.calls == 4


@torch.no_grad()
def test_denoiser_guidance_is_u_plus_w_times_c_minus_u() -> None:
    unet = _conditional_unet()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([300, 300])
    labels = torch.tensor([0, 1])
    c = denoise(unet, x, t, labels)
    u = denoise(unet, x, t, torch.tensor([2, 2]))
    guided = Denoiser(unet, labels, null_class=2, guidance=3.0)
    assert guided.guided
    torch.testing.assert_close(guided(x, t), u + 3.0 * (c - u), atol=1e-5, rtol=0)
    assert not Denoiser(unet, torch.tensor([2, 2]), null_class=2, guidance=3.0).guided  # only the null class
    assert not Denoiser(unet, labels, null_class=2, guidance=1.0).guided
    with pytest.raises(ConfigError, match=r"--cache-interval 0: must be a whole number ≥ 1"):
        Denoiser(unet, labels, null_class=2, cache_interval=0)


@torch.no_grad()
def test_a_guidance_cutoff_guides_the_noisy_steps_only_and_refreshes_deepcache_when_it_stops() -> None:
    unet = _conditional_unet()
    labels = torch.tensor([0, 1])
    d = Denoiser(unet, labels, null_class=2, guidance=3.0, guidance_cutoff=0.5, timesteps=1000)
    cached = Denoiser(unet, labels, null_class=2, guidance=3.0, cache_interval=3, guidance_cutoff=0.5, timesteps=1000)
    for t_val, guided in ((900, True), (700, True), (300, False), (100, False)):
        x, t = torch.randn(2, 1, 16, 16), torch.tensor([t_val, t_val])
        c = denoise(unet, x, t, labels)
        u = denoise(unet, x, t, torch.tensor([2, 2]))
        torch.testing.assert_close(d(x, t), u + 3.0 * (c - u) if guided else c, atol=1e-5, rtol=0)
        out = cached(x, t)
        if t_val == 300:  # the first unguided call: the cached features of both branches are not reused
            torch.testing.assert_close(out, c, atol=1e-5, rtol=0)
