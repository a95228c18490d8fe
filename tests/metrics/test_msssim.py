"""MS-SSIM of pairs and the diversity figure with its real-image reference."""
from __future__ import annotations

import numpy as np
import pytest

from meddiff.errors import ConfigError, DataError
from meddiff.metrics.msssim import diversity, diversity_figure, n_scales, paired_ms_ssim, random_pairs
from meddiff.metrics.ssim import pairwise_ssim


@pytest.mark.parametrize("side, scales", [(11, 1), (21, 1), (22, 2), (32, 2), (64, 3), (128, 4), (175, 4), (176, 5),
                                          (512, 5)])
def test_scales_follow_the_coarsest_side(side, scales):
    assert n_scales(side, side + 7) == scales


def test_one_scale_is_ssim_and_identical_pairs_score_one(blobs):
    a, b = blobs(5, seed=1), blobs(5, seed=2)
    want = np.clip(np.diag(pairwise_ssim(a, b)), 0, None)
    np.testing.assert_allclose(paired_ms_ssim(a, b, scales=1), want, atol=1e-5)
    np.testing.assert_allclose(paired_ms_ssim(a, a), 1.0, atol=1e-5)


def _reference_terms(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean cs, mean SSIM) of one pair from scipy's Gaussian filter, cropped to the valid positions."""
    from scipy.ndimage import gaussian_filter

    def blur(z: np.ndarray) -> np.ndarray:
        return gaussian_filter(z.astype(np.float64), 1.5, truncate=3.5)[5:-5, 5:-5]  # radius 5: the 11x11 window

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    cs = (2 * cxy + c2) / (vx + vy + c2)
    lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    return float(cs.mean()), float((lum * cs).mean())


def test_two_scales_match_an_independent_reference(blobs):
    """MS-SSIM with 2 scales = cs_1^b1 * SSIM_2^b2 (Wang et al. 2003, eq. 7), b the first two weights renormalised."""
    rng = np.random.default_rng(0)
    a = blobs(1, size=32, seed=3)[0]
    b = np.clip(a + rng.normal(0, 0.08, a.shape), 0, 1).astype(np.float32)
    pool = lambda x: x.reshape(16, 2, 16, 2).mean(axis=(1, 3))  # noqa: E731
    cs1, _ = _reference_terms(a, b)
    _, ssim2 = _reference_terms(pool(a), pool(b))
    beta = np.array([0.0448, 0.2856]) / (0.0448 + 0.2856)
    want = cs1 ** beta[0] * ssim2 ** beta[1]
    assert paired_ms_ssim(a[None], b[None], scales=2)[0] == pytest.approx(want, abs=1e-5)
    assert want < 0.99


def test_more_noise_scores_lower(blobs):
    rng = np.random.default_rng(1)
    a = blobs(6, size=64, seed=4)
    scores = [paired_ms_ssim(a, np.clip(a + rng.normal(0, s, a.shape), 0, 1).astype(np.float32)).mean()
              for s in (0.01, 0.05, 0.2)]
    assert scores[0] > scores[1] > scores[2]


def test_random_pairs_are_distinct_and_unordered():
    pairs = random_pairs(40, 100, seed=3)
    assert pairs.shape == (100, 2) and (pairs[:, 0] < pairs[:, 1]).all()
    assert len({tuple(p) for p in pairs}) == 100
    assert len(random_pairs(5, 100)) == 10  # all of them
    with pytest.raises(DataError, match="pairs need at least 2"):
        random_pairs(1, 10)


def test_a_collapsed_set_is_less_diverse_than_the_real_one(blobs):
    real = blobs(30, size=32, seed=5)
    collapsed = np.repeat(real[:3], 10, axis=0)
    d_real, d_fake = diversity(real, n_pairs=200), diversity(collapsed, n_pairs=200)
    assert d_fake["value"] > d_real["value"] + 0.1
    assert d_real["ci95"][0] <= d_real["value"] <= d_real["ci95"][1]
    assert d_real["n_pairs"] == 200 and d_real["n_images"] == 30 and d_real["scales"] == 2
    assert diversity(np.repeat(real[:1], 4, axis=0))["value"] == pytest.approx(1.0, abs=1e-5)


def test_unusable_settings_are_refused(blobs):
    a = blobs(2, size=32)
    with pytest.raises(ConfigError, match="scales: 3; allowed for 32x32 px: 1 to 2"):
        paired_ms_ssim(a, a, scales=3)
    with pytest.raises(DataError, match="2 and 1 images"):
        paired_ms_ssim(a, a[:1])


def test_the_diversity_figure_carries_the_real_reference_and_its_counts(blobs):
    real, fake = blobs(30, size=32, seed=1), np.repeat(blobs(3, size=32, seed=2), 4, axis=0)
    fig = diversity_figure(fake, real, n_pairs=50, seed=0, n_boot=50)
    assert fig.value == pytest.approx(diversity(fake, 50, 0, 50)["value"])
    assert fig.reference == pytest.approx(diversity(real, 50, 0, 50)["value"]) and fig.reference < fig.value
    assert fig.counts == {"n_fake": 12, "n_real": 30} and fig.details["reference_n_pairs"] == 50
    assert fig.to_json()["ci95"] == list(fig.interval) and "2 scale(s)" in fig.protocol
    one = diversity_figure(fake, real[:1], n_pairs=50)
    assert one.reference is None and one.details["reference_n_pairs"] == 0
    assert diversity_figure(fake[:1], real) is None
