"""FID and KID: the formulas against references, the statistics cache, and the random-conv features behaving as a metric must."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from scipy.ndimage import gaussian_filter

from meddiff.errors import ConfigError, DataError
from meddiff.metrics import fid as fid_module
from meddiff.metrics.features import RandConvFeatures
from meddiff.metrics.fid import (
    FeatureStats,
    cached_stats,
    feature_scores,
    fid_score,
    frechet_distance,
    images_key,
    kid,
    stats_file,
)


def _random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d)


def test_frechet_distance_matches_the_sqrtm_formula():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = _random_cov(rng, 6), _random_cov(rng, 6)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_frechet_distance_closed_form_in_one_dimension():
    # (mu1 - mu2)^2 + (sd1 - sd2)^2 = 9 + (2 - 1)^2
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(10.0)
    assert frechet_distance([1.0, 2.0], np.eye(2), [1.0, 2.0], np.eye(2)) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_of_singular_covariances_is_finite():
    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(5, 20)), rng.normal(size=(5, 20))  # 5 samples in 20 dims: rank 4
    value = frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert np.isfinite(value) and value > 0


def test_guard_adds_eps_when_the_square_root_is_not_finite(monkeypatch):
    rng = np.random.default_rng(2)
    s1, s2 = _random_cov(rng, 4), _random_cov(rng, 4)
    exact = frechet_distance(np.zeros(4), s1, np.ones(4), s2)
    real_trace, calls = fid_module._trace_sqrt_product, []

    def fails_first(a, b):
        calls.append(a.copy())
        return float("nan") if len(calls) == 1 else real_trace(a, b)

    monkeypatch.setattr(fid_module, "_trace_sqrt_product", fails_first)
    assert frechet_distance(np.zeros(4), s1, np.ones(4), s2, eps=1e-6) == pytest.approx(exact, rel=1e-5)
    np.testing.assert_allclose(calls[1] - calls[0], np.eye(4) * 1e-6)


def test_frechet_distance_refuses_bad_statistics():
    with pytest.raises(ValueError, match="sigma2 holds NaN"):
        frechet_distance([0.0], [[1.0]], [0.0], [[np.nan]])
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_kid_matches_a_direct_unbiased_mmd():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 3)), rng.normal(loc=0.5, size=(6, 3))
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / 30
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(6)) / 36
    mean, std = kid(x, y, subsets=3, subset_size=6)  # whole sets: every subset is the same
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std == pytest.approx(0.0, abs=1e-12)


def test_kid_needs_two_images():
    with pytest.raises(DataError, match="KID: 1 images in the smaller set; needs at least 2"):
        kid(np.zeros((1, 3)), np.zeros((5, 3)))


def test_stats_round_trip_and_protocol_check(tmp_path):
    rng = np.random.default_rng(4)
    stats = FeatureStats.from_features(rng.normal(size=(10, 3)), "proto-a@32px")
    path = stats.save(tmp_path / "s.npz")
    back = FeatureStats.load(path, "proto-a@32px")
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    np.testing.assert_array_equal(back.features, stats.features)
    assert (back.n, back.protocol) == (10, "proto-a@32px")
    with pytest.raises(ConfigError, match=r"s\.npz: statistics of protocol 'proto-a@32px'; expected 'proto-b'"):
        FeatureStats.load(path, "proto-b")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"bad\.npz: not a feature statistics file"):
        FeatureStats.load(tmp_path / "bad.npz")
    with pytest.raises(ConfigError, match="scores are only computed within one protocol"):
        fid_score(stats, FeatureStats.from_features(rng.normal(size=(10, 3)), "proto-b"))


def test_cached_stats_computes_once_per_images_and_protocol(tmp_path, blobs):
    images = blobs(6, seed=5)
    extractor, calls = RandConvFeatures(32), []

    class Counting:
        protocol, dim = extractor.protocol, extractor.dim

        def __call__(self, x, batch_size=64):
            calls.append(len(x))
            return extractor(x, batch_size)

    first = cached_stats(images, Counting(), tmp_path)
    second = cached_stats(images, Counting(), tmp_path)
    assert calls == [6]
    np.testing.assert_array_equal(first.sigma, second.sigma)
    path = stats_file(tmp_path, images_key(images), extractor.protocol)
    assert path.is_file() and "meddiff-randconv-v1@32px" in path.name
    assert images_key(images) != images_key(images[:5]) and images_key(images) == images_key(images.copy())


@pytest.fixture(scope="module")
def blob_features(blobs):
    """Random-conv features of 400 smooth blob images (two halves of one set) and of degraded copies."""
    extractor = RandConvFeatures(32)
    real = blobs(400, seed=1)
    rng = np.random.default_rng(0)
    probe = real[:200]
    degraded = {
        **{f"blur{s}": np.stack([gaussian_filter(x, s) for x in probe]) for s in (1.0, 2.0, 3.0)},
        **{f"noise{s}": np.clip(probe + rng.normal(0, s, probe.shape), 0, 1) for s in (0.05, 0.1, 0.2)},
        "other": blobs(200, seed=2, blobs=1),
    }
    feats = {name: extractor(x.astype(np.float32)) for name, x in degraded.items()}
    return extractor.protocol, extractor(real[:200]), extractor(real[200:]), feats


def _scores(protocol, fake, real):
    s = feature_scores(FeatureStats.from_features(fake, protocol), FeatureStats.from_features(real, protocol),
                       kid_subsets=10, kid_subset_size=100)
    return s["fid"], s["kid"]


def test_halves_of_one_set_score_near_zero_against_another_distribution(blob_features):
    protocol, half_a, half_b, feats = blob_features
    fid_same, kid_same = _scores(protocol, half_a, half_b)
    fid_other, kid_other = _scores(protocol, feats["other"], half_b)
    assert fid_same < 0.05 * fid_other
    assert abs(kid_same) < 0.05 * kid_other


@pytest.mark.parametrize("kind, levels", [("blur", (1.0, 2.0, 3.0)), ("noise", (0.05, 0.1, 0.2))])
def test_scores_rise_monotonically_with_degradation(blob_features, kind, levels):
    protocol, half_a, half_b, feats = blob_features
    scores = [_scores(protocol, half_a, half_b)] + [_scores(protocol, feats[f"{kind}{s}"], half_b) for s in levels]
    fids, kids = zip(*scores)
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert all(a < b for a, b in zip(kids, kids[1:])), kids


def test_feature_scores_report(blob_features):
    protocol, half_a, half_b, feats = blob_features
    real = FeatureStats.from_features(half_b, protocol)
    report = feature_scores(FeatureStats.from_features(feats["blur2.0"], protocol), real, kid_subsets=5,
                            kid_subset_size=50)
    assert (report["n_fake"], report["n_real"], report["protocol"]) == (200, 200, protocol)
    assert 0 <= report["fid_real_halves"] < report["fid"] and report["kid_real_halves"] < report["kid"]
    no_feats = FeatureStats(real.mu, real.sigma, real.n, protocol)
    bare = feature_scores(no_feats, real)
    assert bare["kid"] is None and bare["fid"] == pytest.approx(0.0, abs=1e-6)
