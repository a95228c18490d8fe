"""Bootstrap intervals: FID's two exact routes agree, KID's weighted U-statistic is the unbiased MMD^2, PRDC's
per-image terms average to prdc_scores, and the intervals contain their figures and narrow with more images."""
from __future__ import annotations

import numpy as np
import pytest

from meddiff.errors import DataError
from meddiff.metrics.fid import FeatureStats, fid_score, kid
from meddiff.metrics.intervals import (
    _within,
    fid_from_features,
    fid_interval,
    kid_interval,
    prdc_intervals,
    prdc_terms,
)
from meddiff.metrics.prdc import prdc_scores


def _features(n: int, d: int = 16, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) * np.linspace(0.5, 2, d) + shift).astype(np.float32)


@pytest.mark.parametrize("n_fake, n_real", [(8, 12), (40, 30)])  # the Gram route (n < D) and the D x D route
def test_fid_routes_agree_with_fid_score(n_fake, n_real):
    f, r = _features(n_fake, d=32, shift=0.3, seed=1), _features(n_real, d=32, seed=2)
    want = fid_score(FeatureStats.from_features(f, "p"), FeatureStats.from_features(r, "p"))
    assert fid_from_features(f.astype(np.float64), r.astype(np.float64)) == pytest.approx(want, rel=1e-6)


def test_fid_interval_holds_the_figure_and_narrows_with_more_images():
    small = fid_interval(_features(30, shift=0.5, seed=3), _features(30, seed=4), n_boot=100)
    large = fid_interval(_features(300, shift=0.5, seed=3), _features(300, seed=4), n_boot=100)
    value = fid_from_features(_features(300, shift=0.5, seed=3).astype(np.float64),
                              _features(300, seed=4).astype(np.float64))
    assert large[0] <= value <= large[1]
    assert large[1] - large[0] < small[1] - small[0]


def _kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.astype(np.float64) @ b.T.astype(np.float64) / a.shape[1] + 1) ** 3


def test_kid_weights_of_one_give_kid():
    f, r = _features(20, seed=5), _features(20, shift=0.4, seed=6)
    ones = np.ones((1, 20))
    mmd = _within(_kernel(f, f), ones) + _within(_kernel(r, r), ones) - 2 * _kernel(f, r).mean()
    # one subset as large as both sets holds every image once: the unbiased MMD^2 over all of them
    assert float(mmd[0]) == pytest.approx(kid(f, r, subsets=1, subset_size=20)[0], rel=1e-9)


def test_kid_resample_leaves_out_pairs_of_an_image_with_itself():
    f = _features(6, seed=12)
    draw = np.array([0, 0, 2, 3, 3, 3])                       # a resample with duplicates
    counts = np.bincount(draw, minlength=6)[None].astype(np.float64)
    k = _kernel(f, f)
    pairs = [(a, b) for a in draw for b in draw if a != b]    # distinct original images only
    assert float(_within(k, counts)[0]) == pytest.approx(np.mean([k[a, b] for a, b in pairs]))


def test_kid_interval_holds_the_figure_and_separates_distributions():
    f, r = _features(200, seed=7), _features(200, seed=8)
    lo, hi = kid_interval(f, r, n_boot=100)
    assert lo <= kid(f, r, subsets=1, subset_size=200)[0] <= hi
    far = kid_interval(_features(200, shift=1.0, seed=9), r, n_boot=100)
    assert far[0] > hi


def test_prdc_terms_average_to_prdc_scores():
    real, fake = _features(40, seed=10), _features(30, shift=0.3, seed=11)
    terms = prdc_terms(real, fake, k=3)
    want = prdc_scores(real, fake, k=3)
    for name in ("precision", "recall", "density", "coverage"):
        assert terms[name].mean() == pytest.approx(want[name])
    assert len(terms["precision"]) == 30 and len(terms["recall"]) == 40
    figs = prdc_intervals(real, fake, k=3, n_boot=100)
    assert all(f["ci95"][0] <= f["value"] <= f["ci95"][1] for f in figs.values())


def test_too_few_images_are_refused():
    with pytest.raises(DataError, match="needs 2 of each"):
        fid_interval(_features(1), _features(5))
    with pytest.raises(DataError, match="needs 6 of each"):
        prdc_terms(_features(5), _features(10), k=5)
    with pytest.raises(DataError, match=r"shapes \(4, 16\) \(fake\) and \(4, 8\) \(real\)"):
        kid_interval(_features(4), _features(4, d=8))
