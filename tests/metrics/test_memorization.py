"""Memorisation: shifted, mirrored and noised copies of training images are all caught; independent images are not."""
from __future__ import annotations

import json

import numpy as np
import pytest

from meddiff.errors import ConfigError, DataError
from meddiff.metrics.memorization import copy_threshold, feature_copy_audit, memorization_report, nearest_ncc


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Move image content by (dy, dx) px, filling the uncovered border by edge replication."""
    h, w = x.shape[1:]
    p = max(abs(dy), abs(dx))
    padded = np.pad(x, ((0, 0), (p, p), (p, p)), mode="edge")
    return padded[:, p - dy: p - dy + h, p - dx: p - dx + w]


@pytest.fixture(scope="module")
def sets(blobs):
    """Training, held-out and independent images of one distribution, and a fake set of disguised copies."""
    train, heldout, independent = blobs(80, seed=1), blobs(40, seed=2), blobs(30, seed=3)
    rng = np.random.default_rng(0)
    copies = np.concatenate([
        train[0:5],                                             # exact
        _shift(train[5:10], 2, -2),                             # shifted 2 px both ways
        train[10:15, :, ::-1],                                  # mirrored
        np.clip(train[15:20] + rng.normal(0, 0.02, (5, 32, 32)), 0, 1),  # lightly noised
        _shift(train[20:25, :, ::-1], -1, 2),                   # mirrored and shifted
    ]).astype(np.float32)
    return train, heldout, independent, copies


def test_every_disguised_copy_is_flagged_with_its_source(sets):
    train, heldout, _, copies = sets
    audit = memorization_report(copies, train, heldout)
    assert audit.flagged_share == 1.0 and audit.n_flagged == 25 and not audit.keep.any()
    report = audit.to_json()
    assert sorted((g, t) for g, t, _ in report["pairs"]) == [(i, i) for i in range(25)]
    assert report["train_copied_share"] == 25 / 80
    scores = [s for _, _, s in report["pairs"]]
    assert scores == sorted(scores, reverse=True) and scores[-1] >= report["threshold"]


def test_independent_images_of_the_same_distribution_are_not_flagged(sets):
    train, heldout, independent, _ = sets
    report = memorization_report(independent, train, heldout).to_json()
    assert report["flagged_share"] <= 0.1
    assert report["nearest_ncc_median"] < report["threshold"]


def test_without_flip_or_shift_tolerance_the_disguises_escape(sets):
    train, _, _, copies = sets
    values, _ = nearest_ncc(copies[10:15], train, shift=2, flip=False)
    mirrored_with_flip, _ = nearest_ncc(copies[10:15], train, shift=2, flip=True)
    assert values.max() < 0.99 and mirrored_with_flip.min() > 0.999
    exact_shift, _ = nearest_ncc(copies[5:10], train, shift=0)
    assert exact_shift.max() < 0.99


def test_threshold_comes_from_held_out_data(sets):
    train, heldout, _, _ = sets
    threshold, values = copy_threshold(heldout, train, quantile=0.5)
    assert values.shape == (40,) and threshold == pytest.approx(np.median(values))
    audit = memorization_report(heldout, train, heldout, quantile=0.5)
    assert audit.threshold == pytest.approx(threshold)
    assert audit.flagged_share == pytest.approx(0.5, abs=0.03)
    assert "40 held-out" in audit.threshold_source
    np.testing.assert_allclose(audit.heldout, values)
    # a gallery other than the training set (a held-out part of it compared with the rest) sets the threshold
    gallery = memorization_report(heldout, train, heldout, quantile=0.5, gallery=train[:10])
    assert gallery.threshold == pytest.approx(copy_threshold(heldout, train[:10], quantile=0.5)[0])


def test_given_threshold_and_json_ready_report(sets):
    train, _, independent, _ = sets
    report = json.loads(json.dumps(memorization_report(independent, train, threshold=-1.0).to_json()))
    assert report["flagged_share"] == 1.0 and report["threshold_source"] == "given"
    assert "shifts +-2px, horizontal flip" in report["protocol"]


def test_large_images_are_compared_at_the_working_size(blobs):
    train = blobs(12, size=64, seed=4)
    values, index = nearest_ncc(_shift(train[:4], 4, 0), train, shift=2, size=32)  # 4 px at 64 = 2 px at 32
    np.testing.assert_array_equal(index, [0, 1, 2, 3])
    assert values.min() > 0.99


def test_unusable_settings_are_refused(sets):
    train, _, independent, _ = sets
    with pytest.raises(ConfigError, match="no held-out real images and no --copy-threshold"):
        memorization_report(independent, train)
    with pytest.raises(ConfigError, match=r"--copy-shift: 16 px on \(32, 32\) images"):
        nearest_ncc(independent, train, shift=16)
    with pytest.raises(ConfigError, match=r"--copy-quantile: 1.5; allowed: \(0, 1\]"):
        copy_threshold(independent, train, quantile=1.5)
    with pytest.raises(DataError, match=r"generated: image size \(16, 16\) differs from train \(32, 32\)"):
        nearest_ncc(independent[:, :16, :16], train)


def test_batching_does_not_change_the_result(sets, monkeypatch):
    train, _, independent, copies = sets
    fake = np.concatenate([copies, independent])
    whole = nearest_ncc(fake, train)
    monkeypatch.setattr("meddiff.metrics.memorization._BLOCK", 3000)  # one generated image a batch, 60 training images a block
    small = nearest_ncc(fake, train)
    np.testing.assert_allclose(small[0], whole[0], atol=1e-6)
    np.testing.assert_array_equal(small[1], whole[1])


def test_feature_space_audit_flags_feature_copies_by_the_held_out_quantile():
    rng = np.random.default_rng(5)
    f_train, f_held = rng.normal(size=(60, 16)), rng.normal(size=(30, 16))
    f_fake = np.concatenate([f_train[:4] + rng.normal(0, 1e-3, (4, 16)), rng.normal(size=(8, 16))])
    audit = feature_copy_audit(f_fake, f_train, f_held, f_train, "toy-16", quantile=0.99)
    assert set(audit.flagged[:4]) == {0, 1, 2, 3}
    assert list(audit.index[:4]) == [0, 1, 2, 3] and audit.keep[4:].sum() >= 7
    report = audit.to_json()
    assert report["threshold"] == pytest.approx(np.quantile(audit.heldout, 0.99))
    assert {"flagged_share", "n_flagged", "nearest_similarity_median", "protocol"} <= set(report)
    assert "toy-16 features" in report["protocol"]
