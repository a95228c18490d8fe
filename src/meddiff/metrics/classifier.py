"""Labelled images → a small classifier and its figures: class consistency of generated images and the
train-on-synthetic / test-on-real utility study. Features (N, D) and labels (N,) in, JSON-ready dicts out.

The classifier: each image is described by its random-conv features (see `meddiff.metrics.features`,
224 numbers of texture and structure) and an 8x8 average-pooled thumbnail (64 numbers of where
things are); the features are standardised and fed to an L2-regularised multinomial logistic
regression (scikit-learn, C = 1, lbfgs). It trains in about a second on a thousand images on a
CPU, and it is the same classifier in every figure, so the figures can be compared with each other.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from ..errors import ConfigError, DataError
from .ssim import bootstrap_ci, check_images

THUMBNAIL = 8
DESCRIPTION = ("standardised [random-conv features (224) + 8x8 thumbnail (64)] -> multinomial "
               "logistic regression (L2, C=1)")


def classifier_features(images: np.ndarray, conv_features: np.ndarray) -> np.ndarray:
    """images (N, H, W) float in [0, 1] and their random-conv features (N, D) → (N, D + 64) float32."""
    images = check_images(images, "images")
    if len(conv_features) != len(images):
        raise DataError(f"features: {len(conv_features)} rows for {len(images)} images")
    with torch.no_grad():
        thumbs = F.adaptive_avg_pool2d(torch.from_numpy(images)[:, None], THUMBNAIL).reshape(len(images), -1)
    return np.concatenate([np.asarray(conv_features, np.float32), thumbs.numpy()], axis=1)


def fit_classifier(x: np.ndarray, y: np.ndarray, seed: int = 0) -> Pipeline:
    """features (N, D), labels (N,) int with >= 2 distinct values → a fitted scikit-learn pipeline."""
    if len(np.unique(y)) < 2:
        raise ConfigError(f"classifier: training images of {len(np.unique(y))} class; needs at least 2 classes")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))
    return model.fit(x, y)


def probabilities(model: Pipeline, x: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, n_classes) class probabilities; classes the model never saw get 0."""
    out = np.zeros((len(x), n_classes))
    out[:, model.classes_] = model.predict_proba(x)
    return out


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic: the chance that a random positive scores above a random
    negative, ties counting 1/2 (average ranks). positive (N,) bool with both values present, scores (N,)."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _macro_auc(y: np.ndarray, prob: np.ndarray) -> float:
    """Mean one-vs-rest ROC AUC over the classes that have both positives and negatives in y; NaN if none."""
    aucs = [binary_auc(y == k, prob[:, k]) for k in range(prob.shape[1]) if 0 < (y == k).sum() < len(y)]
    return float(np.mean(aucs)) if aucs else float("nan")


def _auc_figure(y: np.ndarray, prob: np.ndarray, seed: int, n_boot: int) -> dict:
    """{"value", "ci95", "n"}: macro one-vs-rest AUC (binary: the usual AUC) with a bootstrap interval."""
    value = _macro_auc(y, prob)
    if not np.isfinite(value):
        return {"value": None, "ci95": None, "n": len(y)}
    rng = np.random.default_rng([seed, 17])
    draws = [_macro_auc(y[i], prob[i]) for i in rng.integers(0, len(y), size=(n_boot, len(y)))]
    draws = np.array([d for d in draws if np.isfinite(d)])
    tail = 2.5
    return {"value": value, "ci95": [float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))],
            "n": len(y)}


def _accuracy(correct: np.ndarray, seed: int, n_boot: int) -> dict:
    correct = correct.astype(np.float64)
    return {"value": float(correct.mean()), "ci95": bootstrap_ci(correct, seed=seed, n_boot=n_boot), "n": len(correct)}


def accuracy_figures(model: Pipeline, x: np.ndarray, y: np.ndarray, class_names: tuple[str, ...],
                     seed: int = 0, n_boot: int = 200) -> dict:
    """Accuracy of a fitted model on (x, y), overall and per true class, each {"value", "ci95", "n"}."""
    correct = model.predict(x) == y
    per = {name: _accuracy(correct[y == k], seed, n_boot) for k, name in enumerate(class_names) if (y == k).any()}
    return {**_accuracy(correct, seed, n_boot), "per_class": per}


def class_consistency(x_lab: np.ndarray, y_lab: np.ndarray, x_fake: np.ndarray, y_fake: np.ndarray,
                      class_names: tuple[str, ...], heldout: np.ndarray | None = None,
                      seed: int = 0, n_boot: int = 200) -> dict:
    """Does a generated image of class c look like class c? A classifier fitted on all labelled real
    images (x_lab, y_lab) classifies the generated ones (x_fake, y_fake: the requested classes).

    heldout: a boolean mask over the labelled images; when given, the same classifier fitted on the
    others and scored on them is the real-image reference ("reference": {"value", "ci95", "n"}).
    """
    model = fit_classifier(x_lab, y_lab, seed)
    out = {"classifier": DESCRIPTION, "n_labelled": len(y_lab), **accuracy_figures(model, x_fake, y_fake,
                                                                                  class_names, seed, n_boot)}
    out["reference"] = None
    if heldout is not None and heldout.any() and len(np.unique(y_lab[~heldout])) >= 2:
        ref = fit_classifier(x_lab[~heldout], y_lab[~heldout], seed)
        ref_fig = accuracy_figures(ref, x_lab[heldout], y_lab[heldout], class_names, seed, n_boot)
        out["reference"] = {k: ref_fig[k] for k in ("value", "ci95", "n")}
    return out


def utility_study(x_real: np.ndarray, y_real: np.ndarray, heldout: np.ndarray, x_fake: np.ndarray,
                  y_fake: np.ndarray, class_names: tuple[str, ...], seed: int = 0, n_boot: int = 200) -> dict:
    """Train the classifier on real training images, on synthetic images only and on both; score each on
    the held-out real images (heldout: boolean mask over the real ones).

    → {"real" | "synthetic" | "real+synthetic": {"accuracy", "auc", "n_train"} (or {"error", "n_train"}
    when that training set holds one class), "n_heldout", "classifier"}.
    """
    if not heldout.any() or heldout.all():
        raise ConfigError(f"--utility: {int(heldout.sum())} held-out of {len(heldout)} real images; "
                          "needs images on both sides of the split")
    x_test, y_test = x_real[heldout], y_real[heldout]
    sets = {"real": (x_real[~heldout], y_real[~heldout]), "synthetic": (x_fake, y_fake),
            "real+synthetic": (np.concatenate([x_real[~heldout], x_fake]), np.concatenate([y_real[~heldout], y_fake]))}
    out: dict = {"n_heldout": len(y_test), "classifier": DESCRIPTION}
    for name, (x, y) in sets.items():
        if len(np.unique(y)) < 2:
            out[name] = {"error": f"training images of {len(np.unique(y))} class; needs 2 or more", "n_train": len(y)}
            continue
        model = fit_classifier(x, y, seed)
        prob = probabilities(model, x_test, len(class_names))
        out[name] = {"accuracy": _accuracy(prob.argmax(1) == y_test, seed, n_boot),
                     "auc": _auc_figure(y_test, prob, seed, n_boot), "n_train": len(y)}
    return out
