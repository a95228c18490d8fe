"""The small classifier: AUC against scikit-learn, class consistency of right and wrong classes, the utility study."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from meddiff.errors import ConfigError
from meddiff.metrics.classifier import (
    binary_auc,
    class_consistency,
    classifier_features,
    utility_study,
)
from meddiff.metrics.features import RandConvFeatures

NAMES = ("bright-left", "dark-right")


def _two_classes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images per class, 32 px: a bright blob on the left, or a dim one on the right, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    images, labels = [], []
    for label, (cx, height) in enumerate(((9, 0.9), (23, 0.45))):
        for _ in range(n):
            cy, r = rng.uniform(10, 22), rng.uniform(3, 6)
            blob = height * np.exp(-((yy - cy) ** 2 + (xx - cx - rng.uniform(-2, 2)) ** 2) / (2 * r * r))
            images.append(np.clip(blob + rng.normal(0.1, 0.04, (32, 32)), 0, 1))
            labels.append(label)
    return np.stack(images).astype(np.float32), np.array(labels)


@pytest.fixture(scope="module")
def data():
    conv = RandConvFeatures(32)
    (real, y_real), (fake, y_fake) = _two_classes(20, seed=1), _two_classes(10, seed=2)
    return classifier_features(real, conv(real)), y_real, classifier_features(fake, conv(fake)), y_fake


def test_auc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50).astype(bool)
    scores = np.round(rng.random(50) + 0.3 * y, 1)  # rounded: many ties
    assert binary_auc(y, scores) == pytest.approx(roc_auc_score(y, scores))


def test_generated_images_of_the_requested_class_are_consistent(data):
    x_real, y_real, x_fake, y_fake = data
    held = np.arange(len(y_real)) % 4 == 0
    right = class_consistency(x_real, y_real, x_fake, y_fake, NAMES, held)
    assert right["value"] == 1.0 and right["n"] == 20
    assert set(right["per_class"]) == set(NAMES) and right["per_class"][NAMES[0]]["n"] == 10
    assert right["reference"]["n"] == int(held.sum()) and right["reference"]["value"] == 1.0
    swapped = class_consistency(x_real, y_real, x_fake, 1 - y_fake, NAMES)
    assert swapped["value"] == 0.0 and swapped["reference"] is None


def test_utility_of_good_bad_and_one_class_synthetic_sets(data):
    x_real, y_real, x_fake, y_fake = data
    held = np.arange(len(y_real)) % 3 == 0
    good = utility_study(x_real, y_real, held, x_fake, y_fake, NAMES)
    assert good["n_heldout"] == int(held.sum())
    for name in ("real", "synthetic", "real+synthetic"):
        assert good[name]["accuracy"]["value"] == 1.0 and good[name]["auc"]["value"] == 1.0
    assert good["real+synthetic"]["n_train"] == int((~held).sum()) + len(y_fake)
    bad = utility_study(x_real, y_real, held, x_fake, 1 - y_fake, NAMES)
    assert bad["synthetic"]["accuracy"]["value"] == 0.0 and bad["synthetic"]["auc"]["value"] == 0.0
    lo, hi = bad["synthetic"]["auc"]["ci95"]
    assert lo <= 0.0 <= hi
    one = utility_study(x_real, y_real, held, x_fake[y_fake == 0], y_fake[y_fake == 0], NAMES)
    assert one["synthetic"] == {"error": "training images of 1 class; needs 2 or more", "n_train": 10}
    assert "accuracy" in one["real+synthetic"]


def test_unusable_splits_and_single_class_training_are_refused(data):
    x_real, y_real, x_fake, y_fake = data
    with pytest.raises(ConfigError, match="0 held-out of 40 real images"):
        utility_study(x_real, y_real, np.zeros(40, bool), x_fake, y_fake, NAMES)
    with pytest.raises(ConfigError, match="training images of 1 class; needs at least 2 classes"):
        class_consistency(x_real[y_real == 0], y_real[y_real == 0], x_fake, y_fake, NAMES)
