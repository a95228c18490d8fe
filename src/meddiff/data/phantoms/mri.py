"""Simulated axial brain MRI: (rng, size, abnormal) → ((size, size) float32 in [0, 1], bool lesion mask, uint8
anatomy map).

Real anatomy from the MNI152 grey/white-matter and brain-mask templates that ship inside nilearn (read
from the installed package, never downloaded): a random axial slice, a synthetic meninges/skull/scalp
ring, a random smooth deformation, a T1/T2/PD/FLAIR-like tissue contrast, a bias field and Rician noise.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ._geometry import (Simulation, blob, check_size, grid, harmonics, lesion_generator, paint, pick_inside,
                        smooth_field)

# Relative signal of each tissue class: grey matter, white matter, CSF, cortical bone, diploe (marrow), scalp fat,
# and the lesion relative to the brightest brain tissue (hyperintense in every contrast: enhancing tumour on T1,
# oedema or demyelination on the others).
CONTRASTS = {
    "t1": (0.55, 0.80, 0.12, 0.04, 0.55, 0.95, 1.4),
    "t2": (0.60, 0.45, 1.00, 0.04, 0.30, 0.65, 1.4),
    "pd": (0.80, 0.66, 0.88, 0.04, 0.50, 0.90, 1.4),
    "flair": (0.62, 0.45, 0.08, 0.04, 0.35, 0.70, 1.4),
}


# the anatomy map's structures (label k + 1 for STRUCTURES[k]); bone: cortical bone and marrow (diploe)
STRUCTURES = ("grey matter", "white matter", "csf", "bone", "scalp")


@dataclass(frozen=True)
class MRIParams:
    """Slice choice, geometry, contrast, artefact and lesion parameters of the brain MRI simulator."""

    fov_mm: float = 240.0
    slice_range: tuple[float, float] = (0.35, 0.8)  # axial level as a fraction of the brain's height
    rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.92, 1.08)
    warp_mm: float = 4.0  # amplitude of the smooth random deformation
    contrast_jitter: float = 0.06
    bias_strength: float = 0.12  # log-amplitude of the multiplicative bias field
    noise_sigma: tuple[float, float] = (0.01, 0.035)  # Rician sigma relative to the brightest tissue
    lesion_radius_mm: tuple[float, float] = (12.0, 20.0)


@functools.lru_cache(maxsize=1)
def mni_template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grey matter, white matter, brain mask) of MNI152 at 1 mm: three (197, 233, 189) float32 arrays in [0, 1]."""
    from nilearn import datasets  # slow to import: only when an MRI phantom is first asked for

    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1)
    brain = datasets.load_mni152_brain_mask(resolution=1)
    return tuple(np.asarray(img.dataobj, dtype=np.float32) for img in (gm, wm, brain))


def simulate(rng: np.random.Generator, size: int, abnormal: bool, params: MRIParams = MRIParams()) -> Simulation:
    """One brain slice, its lesion mask and its anatomy map."""
    check_size(size)
    tissues = _head_slice(_level(rng.uniform(*params.slice_range))).astype(np.float32) / 255.0
    name = list(CONTRASTS)[rng.integers(len(CONTRASTS))]
    values = np.array(CONTRASTS[name], dtype=np.float32)
    values *= 1.0 + params.contrast_jitter * rng.uniform(-1.0, 1.0, values.size).astype(np.float32)
    # Interpolation is linear, so mixing the tissues before the warp equals warping each tissue map.
    signal, *parts = _warp(rng, np.concatenate([np.tensordot(values[:6], tissues, axes=1)[None], tissues]), size,
                           params)
    wm = parts[1]
    bias = np.exp(params.bias_strength * smooth_field(rng, (size, size), 4))
    sigma = rng.uniform(*params.noise_sigma) * values[:6].max()
    z = rng.standard_normal((2, size, size)).astype(np.float32)
    # Scaled from the lesion-free slice, so twins share it, with headroom for a lesion brighter than any tissue.
    scale = float(np.percentile(signal * bias, 99.5)) * 1.3
    mask = np.zeros((size, size), dtype=bool)
    if abnormal:
        weight, mask = _lesion(lesion_generator(rng), wm, params)
        signal = signal * (1.0 - weight) + values[6] * values[:6].max() * weight
    magnitude = np.sqrt((signal * bias + sigma * z[0]) ** 2 + (sigma * z[1]) ** 2)  # Rician
    return np.clip(magnitude / scale, 0.0, 1.0).astype(np.float32), mask, _anatomy(np.stack(parts))


def _anatomy(parts: np.ndarray) -> np.ndarray:
    """Warped partial volumes (GM, WM, CSF, bone, marrow, scalp) → the anatomy map in STRUCTURES order: each pixel
    the structure with the largest share, where the tissues fill at least half of it."""
    shares = np.stack([parts[0], parts[1], parts[2], parts[3] + parts[4], parts[5]])
    largest = shares.argmax(0)
    return paint(largest.shape, [(largest == k) & (shares.sum(0) >= 0.5) for k in range(len(STRUCTURES))])


def _level(fraction: float) -> int:
    """The axial template slice at `fraction` of the brain's height (0: its lowest slice, 1: its top)."""
    low, high = _brain_extent()
    return int(round(low + fraction * (high - low)))


@functools.lru_cache(maxsize=1)
def _brain_extent() -> tuple[int, int]:
    z_any = np.nonzero(mni_template()[2].any(axis=(0, 1)))[0]
    return int(z_any[0]), int(z_any[-1])


@functools.lru_cache(maxsize=None)
def _head_slice(z: int) -> np.ndarray:
    """Partial volumes (GM, WM, CSF, bone, marrow, scalp) of axial slice z: (6, 233, 197) uint8 (255 = 1), anterior up."""
    gm, wm, brain = mni_template()
    g, w, b = (np.rot90(v[:, :, z]) for v in (gm, wm, brain))
    csf = np.clip(b - g - w, 0.0, 1.0)
    head = ndimage.binary_fill_holes(b >= 0.5)  # gaps round the brainstem hold CSF, not skull
    csf = np.maximum(csf, (head & (b < 0.5)).astype(np.float32))
    outside = ndimage.distance_transform_edt(~head)  # mm from the brain's surface
    meninges = (outside > 0) & (outside <= 2.5)
    bone = (outside > 2.5) & (outside <= 9.0)
    marrow = bone & (outside > 4.5) & (outside <= 7.0)
    scalp = (outside > 9.0) & (outside <= 14.0)
    stack = np.stack([g, w, csf + meninges, bone & ~marrow, marrow, scalp]).astype(np.float32)
    return np.round(stack * 255).astype(np.uint8)


def _warp(rng: np.random.Generator, maps: np.ndarray, size: int, params: MRIParams) -> np.ndarray:
    """Maps (k, H, W) at 1 mm, rotated, scaled, shifted and smoothly deformed onto a size² grid: (k, size, size)."""
    x, y = grid(size, params.fov_mm)
    angle = np.deg2rad(rng.uniform(-params.rotation_deg, params.rotation_deg))
    scale = rng.uniform(*params.scale_range)
    shift = rng.uniform(-6.0, 6.0, 2)
    warp = params.warp_mm * np.stack([smooth_field(rng, (size, size), 5) for _ in range(2)])
    ca, sa = np.cos(angle) / scale, np.sin(angle) / scale
    col = ca * x - sa * y + shift[0] + warp[0] + (maps.shape[2] - 1) / 2
    row = sa * x + ca * y + shift[1] + warp[1] + (maps.shape[1] - 1) / 2
    out = [ndimage.map_coordinates(m, [row, col], order=1, mode="constant", cval=0.0) for m in maps]
    return np.stack(out).astype(np.float32)


def _lesion(rng: np.random.Generator, wm: np.ndarray, params: MRIParams) -> tuple[np.ndarray, np.ndarray]:
    """A tumour-like blob or a few MS-like plaques centred in white matter: (soft weight in [0, 1], bool mask)."""
    size = wm.shape[0]
    pixel = params.fov_mm / size
    x, y = grid(size, params.fov_mm)
    weight = np.zeros((size, size), dtype=np.float32)
    count = 1 if rng.random() < 0.6 else int(rng.integers(2, 4))
    for _ in range(count):
        radius = rng.uniform(*params.lesion_radius_mm) * (1.0 if count == 1 else 0.7)
        row, col = pick_inside(rng, wm > 0.5, 0.3 * radius / pixel)
        shape = blob(x, y, x[row, col], y[row, col], radius, radius * rng.uniform(0.6, 1.0),
                     rng.uniform(0, np.pi), harmonics(rng, 0.12))
        weight = np.maximum(weight, np.clip((1.15 - shape) / 0.3, 0.0, 1.0))
    return weight, weight > 0.5
