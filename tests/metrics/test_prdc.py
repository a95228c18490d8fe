"""Precision, recall, density and coverage: a hand-worked case and the two extremes."""
from __future__ import annotations

import numpy as np
import pytest

from meddiff.errors import DataError
from meddiff.metrics.prdc import kth_neighbour_radii, prdc_scores


def test_hand_worked_one_dimensional_case():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    # k = 1: real radii all 1; fake radii 9.5 (each other).
    np.testing.assert_allclose(kth_neighbour_radii(real, 1), [1, 1, 1, 1])
    np.testing.assert_allclose(kth_neighbour_radii(fake, 1), [9.5, 9.5])
    got = prdc_scores(real, fake, k=1)
    assert got["precision"] == 0.5   # 0.5 lies in the balls of 0 and 1; 10 in none
    assert got["recall"] == 1.0      # every real lies within 9.5 of 0.5
    assert got["density"] == 1.0     # (2 + 0) / (1 * 2)
    assert got["coverage"] == 0.5    # reals 0 and 1 have a fake in their ball
    assert (got["k"], got["n_real"], got["n_fake"]) == (1, 4, 2)


def test_same_distribution_scores_high_and_a_distant_one_zero():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    same = prdc_scores(real, fake, k=5)
    assert min(same["precision"], same["recall"], same["coverage"]) > 0.8
    assert 0.7 < same["density"] < 1.3
    far = prdc_scores(real, fake + 20.0, k=5)
    assert far == {**far, "precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_mode_collapse_keeps_precision_but_loses_recall_and_coverage():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(300, 4))
    collapsed = real[:3].repeat(100, axis=0) + rng.normal(scale=0.01, size=(300, 4))
    got = prdc_scores(real, collapsed, k=5)
    assert got["precision"] > 0.9
    assert got["recall"] < 0.2 and got["coverage"] < 0.2


def test_unusable_inputs_are_refused():
    with pytest.raises(DataError, match=r"feature shapes \(4, 2\) \(real\) and \(4, 3\) \(fake\)"):
        prdc_scores(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(DataError, match=r"k = 5 with 4 real and 9 fake samples; allowed: 1 <= k"):
        prdc_scores(np.zeros((4, 2)), np.zeros((9, 2)), k=5)
