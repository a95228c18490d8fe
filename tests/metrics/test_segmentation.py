"""metrics.segmentation: Dice as defined, and a segmenter that learns an easy lesion."""
from __future__ import annotations

import numpy as np
import pytest

from meddiff.errors import DataError
from meddiff.metrics.segmentation import (adherence_figures, detect, dice_comparison, dice_figure, dice_per_image,
                                         segment, to_work_size, train_detector, train_segmenter)


def _squares(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.random((n, 32, 32)).astype(np.float32) * 0.3
    masks = np.zeros((n, 32, 32), np.uint8)
    for i in range(n):
        top, left = rng.integers(2, 20, 2)
        images[i, top:top + 9, left:left + 9] += 0.6
        masks[i, top:top + 9, left:left + 9] = 1
    return images.clip(0, 1), masks


def test_dice_is_one_for_a_match_zero_for_a_miss_and_skips_images_without_a_lesion() -> None:
    t = np.zeros((3, 8, 8), bool)
    t[0, :4], t[1, :4] = True, True
    p = np.zeros_like(t)
    p[0, :4], p[1, 4:] = True, True
    assert dice_per_image(p, t).tolist() == [1.0, 0.0]  # image 2 has no lesion: not counted
    f = dice_figure(p, t)
    assert f["dice"] == 0.5 and f["images"] == 2 and f["dice_ci95"][0] <= 0.5 <= f["dice_ci95"][1]
    assert dice_figure(p, np.zeros_like(t))["dice"] is None


def test_the_segmenter_learns_bright_squares() -> None:
    x, y = _squares(48, 0)
    net = train_segmenter(x, y, steps=150)
    xt, yt = _squares(16, 1)
    assert dice_figure(segment(net, xt), yt)["dice"] > 0.8


def test_the_detector_tells_a_small_lesion_from_none() -> None:
    """Half the images hold a small faint square somewhere, half only noise: a detector trained on 64 of them calls
    held-out ones right; trained on shuffled labels it cannot."""
    def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        x = rng.random((n, 32, 32)).astype(np.float32) * 0.3
        has = np.arange(n) % 2 == 1
        for i in np.flatnonzero(has):
            top, left = rng.integers(2, 26, 2)
            x[i, top:top + 4, left:left + 4] += 0.4
        return x.clip(0, 1), has

    x, y = images(64, 0)
    xt, yt = images(64, 1)
    assert (detect(train_detector(x, y, steps=200), xt) == yt).mean() > 0.9
    shuffled = np.random.default_rng(2).permutation(y)
    assert (detect(train_detector(x, shuffled, steps=200), xt) == yt).mean() < 0.8
    with pytest.raises(DataError, match="both values"):
        train_detector(x, np.ones(64, bool), steps=1)
    with pytest.raises(DataError, match="labels for"):
        train_detector(x, y[:10], steps=1)


def test_images_and_maps_must_match() -> None:
    with pytest.raises(DataError, match="must be"):
        train_segmenter(np.zeros((2, 32, 32)), np.zeros((3, 32, 32)), steps=1)


def test_weights_decide_which_pairs_teach_it() -> None:
    """Half the pairs have their maps moved off the squares; weight 0 on them leaves a working segmenter, weight 0 on
    the true ones leaves one that learnt the wrong maps."""
    x, y = _squares(48, 0)
    wrong = np.roll(y, 12, axis=2)
    images, maps = np.concatenate([x, x]), np.concatenate([y, wrong])
    true_only = np.r_[np.ones(48), np.zeros(48)]
    xt, yt = _squares(16, 1)
    good = dice_figure(segment(train_segmenter(images, maps, steps=150, weights=true_only), xt), yt)["dice"]
    bad = dice_figure(segment(train_segmenter(images, maps, steps=150, weights=1 - true_only), xt), yt)["dice"]
    assert good > 0.8 > 0.3 > bad
    with pytest.raises(DataError, match="weights"):
        train_segmenter(x, y, steps=1, weights=np.zeros(48))
    with pytest.raises(DataError, match="weights"):
        train_segmenter(x, y, steps=1, weights=np.ones(47))


def test_the_paired_comparison_sees_a_consistent_gain_and_a_tie() -> None:
    t = np.zeros((40, 8, 8), bool)
    t[:, :4] = True
    half = t.copy()
    half[:, 2:4] = False  # Dice 2*2/(2+4) = 2/3 on every image
    c = dice_comparison(half, t, t)
    assert c["images"] == 40 and abs(c["difference"] - 1 / 3) < 1e-9 and c["difference_ci95"][0] > 0
    assert abs(c["ratio"] - 1.5) < 1e-9 and c["ratio_ci95"][0] > 1
    tie = dice_comparison(t, t, t)
    assert tie["difference"] == 0 and tie["difference_ci95"] == [0.0, 0.0]
    assert dice_comparison(t, t, np.zeros_like(t))["difference"] is None
    miss = dice_comparison(np.zeros_like(t), t, t)  # a scores 0 everywhere: a gain of 1, no ratio
    assert miss["difference"] == 1 and miss["ratio"] is None and miss["ratio_ci95"] is None


def test_adherence_scores_images_against_the_maps_they_were_asked_for_per_group() -> None:
    """Images that show their requested lesion score like real ones; images whose requested map sits elsewhere
    score near 0; each group is scored on its own, beside the real images of that group."""
    x, y = _squares(48, 0)
    net = train_segmenter(x, y, steps=150)
    xt, yt = _squares(16, 1)
    asked = np.concatenate([yt[:8], np.roll(yt[8:], 14, axis=(1, 2))])  # the second half shows another place
    groups = ["kept"] * 8 + ["moved"] * 8
    f = adherence_figures(net, xt, asked, xt, yt, groups, groups)
    assert list(f) == ["all", "kept", "moved"]
    assert f["kept"]["generated"]["dice"] > 0.8 and f["kept"]["generated"]["images"] == 8
    assert f["moved"]["generated"]["dice"] < 0.3 < f["moved"]["real"]["dice"]
    assert f["moved"]["generated"]["dice"] < f["all"]["generated"]["dice"] < f["kept"]["generated"]["dice"]
    assert f["kept"]["real"]["images"] == 8 and f["all"]["real"]["images"] == 16
    only = adherence_figures(net, xt, yt, xt[:8], yt[:8], groups, ["kept"] * 8, overall=False)
    assert list(only) == ["kept", "moved"] and only["moved"]["real"] is None  # no real image of that group


def test_work_size_shrinks_large_pairs_and_keeps_label_values() -> None:
    images = np.zeros((2, 256, 256), np.float32)
    maps = np.zeros((2, 256, 256), np.uint16)
    images[:, 64:128, 64:128], maps[:, 64:128, 64:128] = 1.0, 3
    x, m = to_work_size(images, maps, 128)
    assert x.shape == m.shape == (2, 128, 128) and m.dtype == np.uint16
    assert set(np.unique(m).tolist()) == {0, 3} and m[:, 32:64, 32:64].all() and not m[:, :32].any()
    assert np.allclose(x[:, 32:64, 32:64], 1.0)
    small = np.zeros((1, 64, 64), np.float32)
    same = to_work_size(small, small.astype(np.uint8), 128)
    assert same[0].shape == (1, 64, 64) and same[1].dtype == np.uint8  # at or below the work size: as given
