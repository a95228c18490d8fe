"""Feature extractors: the offline random-conv recipe is fixed, deterministic and batch-independent; Inception never fetches."""
from __future__ import annotations

import importlib.util
import numpy as np
import pytest

from meddiff.errors import ConfigError
from meddiff.metrics.features import InceptionFeatures, RandConvFeatures, get_extractor


def _patterns() -> np.ndarray:
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    return np.stack([xx * yy, 0.5 + 0.4 * np.sin(6 * xx) * np.cos(4 * yy)]).astype(np.float32)


def test_randconv_v1_values_are_pinned():
    # A change here changes every published randconv number: bump RANDCONV_VERSION instead.
    got = RandConvFeatures(32)(_patterns())[:, [0, 1, 50, 111, 112, 223]]
    want = [[0.0451996, 1.8150963, 0.0778868, 0.3588438, 0.1354046, 0.1789492],
            [0.1662484, 0.5888105, 0.0537960, 0.2425374, 0.2340346, 0.2413174]]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_randconv_shape_protocol_and_batch_independence(blobs):
    images = blobs(7, size=40, seed=1)
    extractor = get_extractor("randconv", resolution=32)
    assert extractor.protocol == "meddiff-randconv-v1@32px"
    whole = extractor(images)
    assert whole.shape == (7, extractor.dim) == (7, 224) and whole.dtype == np.float32
    np.testing.assert_allclose(extractor(images, batch_size=3), whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(RandConvFeatures(32)(images), whole)  # fresh instance, same weights


def test_randconv_tells_images_apart(blobs):
    f = RandConvFeatures(32)(blobs(2, seed=2))
    assert np.linalg.norm(f[0] - f[1]) > 1e-3


def test_randconv_refuses_tiny_resolution():
    with pytest.raises(ConfigError, match=r"feature resolution 8; allowed: 16 px or more"):
        RandConvFeatures(8)


def test_unknown_extractor_is_refused():
    with pytest.raises(ConfigError, match=r"--features: 'vgg'; allowed: 'randconv', 'inception'"):
        get_extractor("vgg")


def test_inception_without_local_weights_fails_without_fetching(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(ConfigError, match=r"--inception-weights: no file at .*nowhere\.pth"):
        InceptionFeatures(missing)


def test_inception_without_torch_fidelity_names_the_package(tmp_path):
    if importlib.util.find_spec("torch_fidelity") is not None:
        pytest.skip("torch-fidelity is installed here")
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not used")
    with pytest.raises(ConfigError, match=r"need torch-fidelity \(pip install torch-fidelity\)"):
        InceptionFeatures(weights)
