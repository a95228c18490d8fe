"""MedPhantom-4, the built-in simulated data set: (modality, index, seed, size, abnormal) → float32 image (+ lesion
mask, + label map of lesion and anatomy).

Four simulators (CT, chest X-ray, brain MRI, B-mode ultrasound), each deterministic in its arguments.
An abnormal image and its normal twin (same modality, index, seed and size) share every anatomy and
noise draw: they differ only where the lesion is. Simulated data for development and benchmarking,
not a substitute for clinical validation.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ...errors import ConfigError
from . import ct, mri, ultrasound, xray
from ._geometry import MAX_SIZE, MIN_SIZE, check_size

MODALITIES: tuple[str, ...] = ("ct", "xray", "mri", "us")

_SIMULATORS: dict[str, Callable[[np.random.Generator, int, bool], tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
    "ct": ct.simulate,
    "xray": xray.simulate,
    "mri": mri.simulate,
    "us": ultrasound.simulate,
}
_STRUCTURES = dict(ct=ct.STRUCTURES, xray=xray.STRUCTURES, mri=mri.STRUCTURES, us=ultrasound.STRUCTURES)

LESION = 1  # the lesion's value in every label map
# The label maps' values: 1 the lesion, then each modality's structures in turn (CT's body is 2, …); one numbering
# for the whole set, so a model trained on all four modalities reads every map alike.
LABELS: dict[int, str] = dict(enumerate(["lesion", *(f"{m}/{s}" for m in MODALITIES for s in _STRUCTURES[m])], 1))
_OFFSET = {m: min(v for v, name in LABELS.items() if name.startswith(m + "/")) - 1 for m in MODALITIES}

__all__ = ["LABELS", "LESION", "MODALITIES", "MIN_SIZE", "MAX_SIZE", "render", "render_with_maps", "render_with_mask"]


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"phantom {name}: got {value!r}; allowed: an integer >= 0")


def render_with_mask(modality: str, index: int, seed: int, size: int,
                     abnormal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Image i of a modality and its lesion mask: ((size, size) float32 in [0, 1], (size, size) bool).

    Deterministic in (modality, index, seed, size, abnormal); the mask is all False when `abnormal`
    is False (for ultrasound it also covers the acoustic shadow or enhancement behind the mass). The generator is seeded from (seed, modality number, index), so images are independent
    of the order and batch in which they are asked for.
    """
    image, mask, _anatomy = _simulate(modality, index, seed, size, abnormal)
    return image, mask


def render_with_maps(modality: str, index: int, seed: int, size: int,
                     abnormal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Image i of a modality and its label map: ((size, size) float32 in [0, 1], (size, size) uint8 of `LABELS`
    values: 0 background, `LESION` where the lesion is (over the structure it lies in), else the modality's
    anatomy (CT: body, liver, spleen, kidney, blood, lung, bone; X-ray: body, bone, lung fields; MRI: grey and
    white matter, CSF, bone, scalp; ultrasound: fat, muscle, organ, vessel, 0 outside the fan).

    The image is `render_with_mask`'s, and an abnormal image's map equals its normal twin's outside the lesion."""
    image, mask, anatomy = _simulate(modality, index, seed, size, abnormal)
    labels = np.where(anatomy > 0, anatomy + _OFFSET[modality], 0).astype(np.uint8)
    labels[mask] = LESION
    return image, labels


def _simulate(modality: str, index: int, seed: int, size: int,
              abnormal: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if modality not in _SIMULATORS:
        raise ConfigError(f"phantom modality: got {modality!r}; allowed: {', '.join(MODALITIES)}")
    check_size(size)
    _check_count("index", index)
    _check_count("seed", seed)
    rng = np.random.default_rng([int(seed), MODALITIES.index(modality), int(index)])
    image, mask, anatomy = _SIMULATORS[modality](rng, int(size), bool(abnormal))
    assert image.shape == mask.shape == anatomy.shape == (size, size) and image.dtype == np.float32
    return image, mask, anatomy


def render(modality: str, index: int, seed: int, size: int, abnormal: bool) -> np.ndarray:
    """Image i of a modality: (size, size) float32 in [0, 1]; see `render_with_mask`."""
    return render_with_mask(modality, index, seed, size, abnormal)[0]
