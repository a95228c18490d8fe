"""SSIM figures: parity with scikit-image, nearest-image search (exhaustive and shortlisted), bands, the figure."""
from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from meddiff.errors import ConfigError, DataError
from meddiff.metrics.ssim import (
    PROTOCOL,
    nearest_ssim,
    nearest_ssim_search,
    nearest_ssim_shortlist,
    pairwise_ssim,
    real_halves_reference,
    ssim_band,
    ssim_figure,
)


def test_pairwise_matches_scikit_image_reference(blobs):
    rng = np.random.default_rng(1)
    a = blobs(3, size=24, seed=1)
    b = np.clip(blobs(2, size=24, seed=2) + rng.normal(0, 0.05, (2, 24, 24)), 0, 1).astype(np.float32)
    got = pairwise_ssim(a, b)
    want = np.array([[structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                                            use_sample_covariance=False, data_range=1.0)
                      for y in b] for x in a])
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_pairwise_is_symmetric_and_non_square_images_work(blobs):
    a = blobs(3, size=40, seed=3)[:, :, 5:33]   # (3, 40, 28)
    b = blobs(4, size=40, seed=4)[:, :, 5:33]
    np.testing.assert_allclose(pairwise_ssim(a, b), pairwise_ssim(b, a).T, atol=1e-6)


def test_identical_sets_score_one_and_find_themselves(blobs):
    real = blobs(12, seed=5)
    values, index = nearest_ssim(real, real)
    np.testing.assert_allclose(values, 1.0, atol=1e-5)
    np.testing.assert_array_equal(index, np.arange(12))
    assert ssim_figure(real, real)[0].value == pytest.approx(1.0, abs=1e-5)


def test_copies_of_reals_point_to_their_source(blobs):
    real = blobs(20, seed=6)
    picks = np.array([7, 0, 19, 7, 3])
    rng = np.random.default_rng(0)
    fake = np.clip(real[picks] + rng.normal(0, 0.01, real[picks].shape), 0, 1).astype(np.float32)
    values, index = nearest_ssim(fake, real, chunk=3)  # chunks that split the real set unevenly
    np.testing.assert_array_equal(index, picks)
    assert values.min() > 0.9


def test_chunk_size_does_not_change_the_result(blobs):
    fake, real = blobs(4, seed=7), blobs(10, seed=8)
    v1, i1 = nearest_ssim(fake, real, chunk=1)
    v2, i2 = nearest_ssim(fake, real)
    np.testing.assert_allclose(v1, v2, atol=1e-6)
    np.testing.assert_array_equal(i1, i2)


def test_noise_against_structured_images_is_very_poor(blobs):
    real = blobs(16, seed=9)
    noise = np.random.default_rng(0).uniform(0, 1, (8, 32, 32)).astype(np.float32)
    fig, _, _ = ssim_figure(noise, real)
    assert fig.value < 0.1
    assert fig.details["band"] == "very poor"


def test_real_halves_reference_of_smooth_data_lies_between_noise_and_copies(blobs):
    real = blobs(40, seed=10)
    value, n_query, n_gallery = real_halves_reference(real, seed=0)
    assert 0.1 < value < 0.99
    assert n_query == 20 and n_gallery == 20
    assert real_halves_reference(real, seed=0, max_queries=5)[1] == 5


@pytest.mark.parametrize("value, band", [
    (1.0, "excellent"), (0.7, "excellent"), (0.6999, "moderate"), (0.4, "moderate"),
    (0.3999, "low"), (0.1, "low"), (0.0999, "very poor"), (-0.3, "very poor"),
])
def test_bands(value, band):
    assert ssim_band(value) == band


def test_band_of_nan_is_refused():
    with pytest.raises(ValueError, match="finite"):
        ssim_band(float("nan"))


def test_figure_is_json_ready_and_complete(blobs):
    fake, real = blobs(10, seed=11), blobs(30, seed=12)
    fig, values, index = ssim_figure(fake, real, seed=3)
    report = json.loads(json.dumps(fig.to_json()))
    lo, hi = report["ci95"]
    assert lo <= report["value"] <= hi and report["value"] == pytest.approx(values.mean())
    assert (report["n_fake"], report["n_real"]) == (10, 30) and index.shape == (10,)
    assert report["band"] == ssim_band(report["value"]) and report["search"] == "exhaustive: every real image"
    assert 0 < report["reference"] <= 1 and report["reference_n_query"] == 15
    assert report["protocol"] == PROTOCOL and "11x11 sigma 1.5" in PROTOCOL
    assert ssim_figure(fake, real, seed=3)[0].to_json() == report  # same seed, same figures


def test_single_real_image_has_no_halves_reference(blobs):
    fig, _, _ = ssim_figure(blobs(2, seed=13), blobs(1, seed=14))
    assert fig.reference is None and fig.counts["reference_n_query"] == 0


def test_search_is_shortlisted_only_above_the_pixel_pair_budget(blobs, monkeypatch):
    fake, real = blobs(3, seed=15), blobs(40, seed=16)
    exhaustive = "exhaustive: every real image"
    assert nearest_ssim_search(fake, real, shortlist=4)[2] == exhaustive  # few pixel pairs
    monkeypatch.setattr("meddiff.metrics.ssim.EXHAUSTIVE_PIXEL_PAIRS", 0)
    values, index, search = nearest_ssim_search(fake, real, shortlist=4)
    assert search.startswith("shortlist: exact SSIM against the 4 real images")
    short_values, short_index = nearest_ssim_shortlist(fake, real, 4)
    np.testing.assert_array_equal(values, short_values)
    np.testing.assert_array_equal(index, short_index)
    assert nearest_ssim_search(fake, real, shortlist=40)[2] == exhaustive  # the shortlist holds every image
    assert nearest_ssim_search(fake, real)[2] == exhaustive               # no shortlist asked for


@pytest.mark.parametrize("fake, real, match", [
    (np.zeros((2, 16, 16), np.uint8), np.zeros((2, 16, 16), np.float32), r"fake: dtype uint8; expected float"),
    (np.zeros((2, 16, 16), np.float32), np.full((2, 16, 16), 255.0, np.float32), r"real: values in \[255, 255\]; expected \[0, 1\]"),
    (np.zeros((2, 16, 16), np.float32), np.zeros((2, 16, 20), np.float32), r"fake: image size \(16, 16\) differs from real \(16, 20\)"),
    (np.zeros((2, 8, 8), np.float32), np.zeros((2, 8, 8), np.float32), r"SSIM needs at least 11x11"),
    (np.zeros((16, 16), np.float32), np.zeros((2, 16, 16), np.float32), r"fake: shape \(16, 16\); expected \(N, H, W\)"),
    (np.zeros((0, 16, 16), np.float32), np.zeros((2, 16, 16), np.float32), r"fake: no images"),
    (np.full((1, 16, 16), np.nan, np.float32), np.zeros((2, 16, 16), np.float32), r"fake: holds NaN"),
])
def test_unusable_inputs_raise_data_errors(fake, real, match):
    with pytest.raises(DataError, match=match):
        ssim_figure(fake, real)


def test_shortlist_finds_copies_and_is_exhaustive_when_it_holds_every_image(blobs):
    real = blobs(60, size=32, seed=6)
    rng = np.random.default_rng(2)
    picks = [4, 40, 59, 0]
    copies = np.clip(real[picks] + rng.normal(0, 0.02, (4, 32, 32)), 0, 1).astype(np.float32)
    values, index = nearest_ssim_shortlist(copies, real, k=4)
    v_all, i_all = nearest_ssim(copies, real)
    assert list(index) == picks and list(i_all) == picks
    np.testing.assert_allclose(values, v_all, atol=1e-5)
    others = blobs(10, size=32, seed=7)
    v_all, i_all = nearest_ssim(others, real)
    v_full, i_full = nearest_ssim_shortlist(others, real, k=60)
    np.testing.assert_array_equal(i_full, i_all)
    np.testing.assert_allclose(v_full, v_all, atol=1e-5)
    v_short, _ = nearest_ssim_shortlist(others, real, k=8)
    assert (v_short <= v_all + 1e-6).all() and v_short.mean() > v_all.mean() - 0.05
    with pytest.raises(ConfigError, match="shortlist: 0"):
        nearest_ssim_shortlist(real, real, k=0)
