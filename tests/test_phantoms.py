"""MedPhantom-4: determinism, ranges, argument errors, twin pairs and how well a plain classifier tells images apart."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.ensemble import RandomForestClassifier

from meddiff.data import phantoms
from meddiff.data.phantoms import (LABELS, LESION, MODALITIES, ct, mri, render, render_with_maps, render_with_mask,
                                   ultrasound, xray)
from meddiff.errors import ConfigError

SIMULATORS = {"ct": ct.simulate, "xray": xray.simulate, "mri": mri.simulate, "us": ultrasound.simulate}


@pytest.mark.parametrize("modality", MODALITIES)
def test_render_is_deterministic_and_seed_dependent(modality: str) -> None:
    first = render(modality, 3, 11, 48, True)
    assert np.array_equal(first, render(modality, 3, 11, 48, True))
    assert not np.array_equal(first, render(modality, 3, 12, 48, True))
    assert not np.array_equal(first, render(modality, 4, 11, 48, True))


def test_modalities_of_the_same_index_and_seed_differ() -> None:
    images = [render(m, 0, 0, 32, False) for m in MODALITIES]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not np.allclose(images[i], images[j])


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("size", [32, 64, 128])
def test_shape_dtype_range_and_mask(modality: str, size: int) -> None:
    image, mask = render_with_mask(modality, 1, 0, size, True)
    assert image.shape == mask.shape == (size, size)
    assert image.dtype == np.float32 and mask.dtype == bool
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
    assert image.std() > 0.05  # an image, not a flat field
    assert 0 < mask.sum() < 0.5 * size * size
    normal, normal_mask = render_with_mask(modality, 1, 0, size, False)
    assert not normal_mask.any()


def test_largest_size_renders() -> None:
    image = render("us", 0, 0, 256, True)
    assert image.shape == (256, 256) and image.dtype == np.float32


@pytest.mark.parametrize("modality", MODALITIES)
def test_simulate_takes_a_generator_and_matches_render(modality: str) -> None:
    k = MODALITIES.index(modality)
    image, mask, anatomy = SIMULATORS[modality](np.random.default_rng([5, k, 2]), 40, True)
    expected, expected_mask = render_with_mask(modality, 2, 5, 40, True)
    assert np.array_equal(image, expected) and np.array_equal(mask, expected_mask)
    assert anatomy.dtype == np.uint8 and anatomy.shape == (40, 40)


def test_label_numbering_is_one_table() -> None:
    assert LABELS[LESION] == "lesion" and sorted(LABELS) == list(range(1, len(LABELS) + 1))
    assert len(set(LABELS.values())) == len(LABELS)
    for m in MODALITIES:  # each modality's structures, under its name, in one run of values
        values = [v for v, name in LABELS.items() if name.startswith(m + "/")]
        assert len(values) >= 3 and values == list(range(values[0], values[-1] + 1))


def _values(modality: str) -> set[int]:
    return {v for v, name in LABELS.items() if name.startswith(modality + "/")}


@pytest.mark.parametrize("modality", MODALITIES)
def test_label_maps_hold_lesion_and_anatomy_of_the_image(modality: str) -> None:
    for index in range(3):
        image, labels = render_with_maps(modality, index, 4, 64, True)
        same_image, mask = render_with_mask(modality, index, 4, 64, True)
        assert labels.dtype == np.uint8 and np.array_equal(image, same_image)
        assert np.array_equal(labels == LESION, mask)  # the lesion over whatever structure it lies in
        present = set(np.unique(labels).tolist()) - {0, LESION}
        assert present <= _values(modality) and len(present) >= 3
        _, twin = render_with_maps(modality, index, 4, 64, False)
        assert not (twin == LESION).any() and np.array_equal(labels[~mask], twin[~mask])  # twins share anatomy
        assert (labels > 0).mean() > 0.2  # the map covers the object, not a corner of it


@pytest.mark.parametrize("modality, dark, bright", [("ct", "lung", "bone"), ("xray", "lung", "bone"),
                                                    ("us", "vessel", "organ"), ("mri", "bone", "white matter")])
def test_label_maps_lie_on_the_structures_they_name(modality: str, dark: str, bright: str) -> None:
    """A map drawn from other draws, or shifted or flipped, would put these structures' pixels elsewhere."""
    value = {name: v for v, name in LABELS.items()}
    gaps = []
    for index in range(6):
        image, labels = render_with_maps(modality, index, 0, 64, False)
        d, b = labels == value[f"{modality}/{dark}"], labels == value[f"{modality}/{bright}"]
        if d.sum() > 3 and b.sum() > 3:
            gaps.append(image[b].mean() - image[d].mean())
    assert len(gaps) >= 3 and min(gaps) > 0.05


@pytest.mark.parametrize("modality", MODALITIES)
def test_twins_differ_only_around_the_lesion(modality: str) -> None:
    for index in range(4):
        abnormal, mask = render_with_mask(modality, index, 2, 64, True)
        normal = render(modality, index, 2, 64, False)
        diff = np.abs(abnormal - normal)
        near = ndimage.binary_dilation(mask, iterations=3)
        assert diff.sum() > 0.5  # the lesion shows
        assert diff[near].sum() >= 0.9 * diff.sum(), (modality, index, diff[near].sum() / diff.sum())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(modality="pet"), r"phantom modality: got 'pet'; allowed: ct, xray, mri, us"),
        (dict(size=31), r"phantom size: got 31; allowed: an integer from 32 to 512"),
        (dict(size=513), r"phantom size: got 513; allowed: an integer from 32 to 512"),
        (dict(size=64.0), r"phantom size: got 64.0"),
        (dict(index=-1), r"phantom index: got -1; allowed: an integer >= 0"),
        (dict(seed=-3), r"phantom seed: got -3; allowed: an integer >= 0"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict, match: str) -> None:
    args = dict(modality="ct", index=0, seed=0, size=64, abnormal=False)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        render(**args)


def test_simulate_checks_size_too() -> None:
    with pytest.raises(ConfigError, match="phantom size: got 16"):
        xray.simulate(np.random.default_rng(0), 16, False)


def test_mni_template_is_read_from_the_installed_package(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the MNI template must not be downloaded")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("NILEARN_DATA", str(tmp_path))
    mri.mni_template.cache_clear()
    gm, wm, brain = mri.mni_template()
    assert gm.shape == wm.shape == brain.shape == (197, 233, 189)
    assert 0.0 <= gm.min() and gm.max() <= 1.0 and brain.max() == 1.0
    assert list(tmp_path.iterdir()) == []


def _features(image: np.ndarray) -> np.ndarray:
    """Intensity histograms (as is and lightly smoothed) and gradient-magnitude statistics at two scales."""
    parts = []
    for smoothed in (image, ndimage.gaussian_filter(image, 2.0)):
        parts.append(np.histogram(smoothed, bins=32, range=(0, 1))[0] / image.size)
    for sigma in (1.0, 3.0):
        grad = ndimage.gaussian_gradient_magnitude(image, sigma)
        parts.append(np.histogram(grad, bins=16, range=(0, 0.25))[0] / image.size)
        parts.append(np.percentile(grad, [50, 90, 99]))
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def feature_sets() -> dict:
    """Per modality: training features (normal/abnormal twin pairs) and held-out features (other indices)."""
    sets = {}
    for modality in MODALITIES:
        train = [(i, ab) for i in range(100) for ab in (False, True)]
        held_out = [(10_000 + i, i % 2 == 1) for i in range(80)]
        sets[modality] = [
            (np.array([_features(render(modality, i, 0, 64, ab)) for i, ab in pairs]),
             np.array([ab for _, ab in pairs]))
            for pairs in (train, held_out)
        ]
    return sets


def test_a_plain_classifier_tells_the_modalities_apart(feature_sets: dict) -> None:
    x_train = np.concatenate([feature_sets[m][0][0][::3] for m in MODALITIES])
    y_train = np.concatenate([[k] * len(feature_sets[m][0][0][::3]) for k, m in enumerate(MODALITIES)])
    x_test = np.concatenate([feature_sets[m][1][0] for m in MODALITIES])
    y_test = np.concatenate([[k] * len(feature_sets[m][1][0]) for k, m in enumerate(MODALITIES)])
    model = RandomForestClassifier(200, random_state=0).fit(x_train, y_train)
    assert (model.predict(x_test) == y_test).mean() >= 0.95


@pytest.mark.parametrize("modality", MODALITIES)
def test_a_plain_classifier_finds_the_lesions(feature_sets: dict, modality: str) -> None:
    (x_train, y_train), (x_test, y_test) = feature_sets[modality]
    model = RandomForestClassifier(300, random_state=0).fit(x_train, y_train)
    assert (model.predict(x_test) == y_test).mean() >= 0.75


def test_public_names() -> None:
    assert phantoms.MODALITIES == ("ct", "xray", "mri", "us")
    assert (phantoms.MIN_SIZE, phantoms.MAX_SIZE) == (32, 512)
