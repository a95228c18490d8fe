"""Simulated frontal (PA) chest radiograph: (rng, size, abnormal) → ((size, size) float32 in [0, 1], bool mask,
uint8 anatomy map).

A 3-D chest phantom of analytic solids (torso, lungs, heart, diaphragm, spine, ribs, clavicles, scapulae,
vessels, trachea, gastric bubble) is integrated along the beam as thickness maps, attenuated by Beer–Lambert's law
I = I0 exp(-∫mu dl), given scatter (a broad blur of the primary) and quantum noise, and shown like a
radiograph: attenuating structures bright, lungs dark. The patient's right is on the image's left.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ._geometry import Simulation, grid, lesion_generator, paint, pick_inside, smooth_field

# the anatomy map's structures (label k + 1 for STRUCTURES[k]), by path length: the body, bone outside the
# lungs (spine, clavicles, shoulders), the lung fields (ribs over them included, as lung-field maps draw them)
STRUCTURES = ("body", "bone", "lung")


@dataclass(frozen=True)
class XrayParams:
    """Beam, tissue and display parameters of the chest radiograph (attenuation in cm^-1, about 60 keV)."""

    fov_cm: float = 40.0
    mu_tissue: float = 0.20
    mu_lung: float = 0.06  # aerated lung, about 0.3 g/cm^3
    mu_bone: float = 0.48
    scatter_to_primary: float = 0.35
    scatter_sigma_cm: float = 4.0
    photons: float = 3.0e4  # detected photons per pixel without attenuation: sets the quantum noise
    display_max: float = 4.2  # -log(I/I0) shown as white
    display_gamma: float = 1.2
    nodule_radius_cm: tuple[float, float] = (3.25, 4.25)
    consolidation_radius_cm: tuple[float, float] = (5.0, 7.5)


def simulate(rng: np.random.Generator, size: int, abnormal: bool, params: XrayParams = XrayParams()) -> Simulation:
    """One chest radiograph, its lesion mask and its anatomy map."""
    x, y = grid(size, params.fov_cm)
    body, lung, bone, gas = _thicknesses(x, y, rng)
    anatomy = paint(x.shape, [body > 1.0, bone > 0.8, lung > 1.0])
    dmu_lung = params.mu_tissue - params.mu_lung
    line = params.mu_tissue * body - dmu_lung * lung + (params.mu_bone - params.mu_tissue) * bone
    line -= params.mu_tissue * gas
    primary = np.exp(-line)
    # Scatter: a broad blur of the lesion-free primary behind the patient (the unattenuated beam around the
    # body scatters nothing); a lesion changes it by well under 1 %.
    sigma_px = params.scatter_sigma_cm * size / params.fov_cm
    source = primary * (body > 1.0)
    scatter = params.scatter_to_primary * ndimage.gaussian_filter(source, sigma_px, mode="constant")
    mask = np.zeros((size, size), dtype=bool)
    if abnormal:
        extra, mask = _lesion(lesion_generator(rng), x, y, lung, params)
        primary = np.exp(-(line + dmu_lung * extra))
    z = rng.standard_normal((size, size))
    detected = primary + scatter
    detected = np.maximum(detected + z * np.sqrt(detected / params.photons), 1e-4)
    density = np.clip(-np.log(detected) / params.display_max, 0.0, 1.0)
    return (density ** params.display_gamma).astype(np.float32), mask, anatomy


def _chord(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, depth: float) -> np.ndarray:
    """Path length through an axis-aligned ellipsoid (semi-axes a, b in the image, depth/2 along the beam)."""
    q = 1.0 - ((x - cx) / a) ** 2 - ((y - cy) / b) ** 2
    return depth * np.sqrt(np.clip(q, 0.0, None))


def _tube(x: np.ndarray, y: np.ndarray, curve_y: np.ndarray, slope: np.ndarray, radius: float,
          shell: float = 1.0) -> np.ndarray:
    """Path length through a tube whose axis runs at height curve_y(x) with slope dy/dx; shell < 1 hollows it."""
    d2 = (y - curve_y) ** 2 / (1.0 + slope ** 2)
    outer = 2.0 * np.sqrt(np.clip(radius ** 2 - d2, 0.0, None))
    inner = 2.0 * np.sqrt(np.clip((0.6 * radius) ** 2 - d2, 0.0, None))
    return outer - (1.0 - shell) * inner


def _thicknesses(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Path lengths (cm) through soft tissue, aerated lung, bone and bowel gas: four (size, size) maps."""
    half_w, shoulder_y = rng.uniform(13.5, 16.5), rng.uniform(-15.0, -12.5)
    dome_y = rng.uniform(5.0, 9.0)  # the right hemidiaphragm's top; the left one sits lower
    neck = 5.5 + 1.0 * rng.random()
    width = neck + (half_w - neck) / (1.0 + np.exp(-(y - shoulder_y + 1.5) / 1.6))
    depth = 2.0 * rng.uniform(9.5, 12.0) * np.clip(width / half_w, 0.5, 1.0)
    body = depth * np.sqrt(np.clip(1.0 - (x / width) ** 2, 0.0, None))
    lung = np.zeros_like(x)
    for side in (-1, 1):
        lung += _lung(x, y, rng, side, half_w, shoulder_y, dome_y + (1.5 if side > 0 else 0.0))
    heart_x, heart_y = rng.uniform(1.5, 3.0), dome_y - rng.uniform(2.5, 4.0)
    heart = _chord(x, y, heart_x, heart_y, rng.uniform(5.5, 7.0), rng.uniform(4.5, 5.5), 15.0)
    heart += _chord(x, y, 2.5, shoulder_y + 6.0, 2.2, 2.0, 5.0)  # aortic knob
    heart += _chord(x, y, 0.5, 0.0, 3.6, 30.0, 9.0)  # mediastinum
    lung = np.clip(lung - heart, 0.0, None)
    lung += _vessels(x, y, rng, lung, dome_y)
    gas = _chord(x, y, rng.uniform(5.0, 8.0), dome_y + 4.0, 3.0, 1.8, 3.0)  # gastric bubble
    carina = dome_y - rng.uniform(9.0, 11.0)
    gas += 1.8 * np.sqrt(np.clip(1.0 - (x / 0.9) ** 2, 0.0, None)) * (y < carina)  # trachea
    bone = _spine(x, y, rng) + _ribs(x, y, rng, half_w, shoulder_y, dome_y)
    bone += _shoulders(x, y, rng, half_w, shoulder_y)
    return body, lung, bone, gas


def _lung(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, side: int, half_w: float,
          shoulder_y: float, dome_y: float) -> np.ndarray:
    """One lung: a half-ellipsoid widening downwards, its base shaped by the diaphragm dome (with costophrenic angle)."""
    apex = shoulder_y - rng.uniform(1.0, 2.0)
    centre_x = side * half_w * rng.uniform(0.46, 0.5)
    tall = np.clip((y - apex) / (dome_y - apex), 0.0, None)
    reach = half_w * rng.uniform(0.41, 0.45) * np.sqrt(np.clip(0.02 + 1.3 * tall, 0.0, 1.0))
    u = (x - centre_x) / reach
    dome = dome_y + 3.0 * np.clip(u, -1.2, 1.2) ** 2
    base = np.clip((dome - y) / 1.5, 0.0, 1.0) * (y > apex)
    return rng.uniform(13.0, 16.0) * np.clip(1.0 - u ** 2, 0.0, None) ** 0.35 * base


def _vessels(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, lung: np.ndarray, dome_y: float) -> np.ndarray:
    """Negative lung thickness where branching pulmonary vessels (soft tissue) displace air, radiating from the hila."""
    out = np.zeros_like(x)
    step = x[0, 1] - x[0, 0]
    for side in (-1, 1):
        for _ in range(3):
            start = (side * rng.uniform(3.5, 5.0), dome_y - rng.uniform(7.0, 10.0))
            angle = np.arctan2(rng.uniform(-1.0, 1.0), side * 1.0)
            _branch(out, x, y, rng, start, angle, 5.0, 0.6, 3, step)
    return -np.minimum(out, lung)


def _branch(out: np.ndarray, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, start: tuple[float, float],
            angle: float, length: float, radius: float, depth: int, step: float) -> None:
    """Add one vessel segment's path length to `out`, then recurse into two thinner daughter branches."""
    end = (start[0] + length * np.cos(angle), start[1] + length * np.sin(angle))
    lo_x, hi_x = min(start[0], end[0]) - radius, max(start[0], end[0]) + radius
    lo_y, hi_y = min(start[1], end[1]) - radius, max(start[1], end[1]) + radius
    cols = slice(*np.searchsorted(x[0], [lo_x - step, hi_x + step]))
    rows = slice(*np.searchsorted(y[:, 0], [lo_y - step, hi_y + step]))
    px, py = x[rows, cols] - start[0], y[rows, cols] - start[1]
    dx, dy = end[0] - start[0], end[1] - start[1]
    t = np.clip((px * dx + py * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    d2 = (px - t * dx) ** 2 + (py - t * dy) ** 2
    out[rows, cols] += 2.0 * np.sqrt(np.clip(radius ** 2 - d2, 0.0, None))
    if depth > 1:
        for turn in (-1, 1):
            spread = turn * rng.uniform(0.25, 0.6)
            _branch(out, x, y, rng, end, angle + spread, length * rng.uniform(0.65, 0.85), radius * 0.7,
                    depth - 1, step)


def _spine(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Vertebral column: a midline bone cylinder, denser in the vertebral bodies than in the discs."""
    period, phase = rng.uniform(2.6, 3.0), rng.uniform(0, 3.0)
    bodies = 0.55 + 0.45 * (np.cos(2 * np.pi * (y - phase) / period) > -0.6)
    return 0.35 * bodies * 2.0 * np.sqrt(np.clip(2.2 ** 2 - x ** 2, 0.0, None))


def _ribs(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, half_w: float, shoulder_y: float,
          dome_y: float) -> np.ndarray:
    """Posterior ribs (arching out from the spine and down) and fainter anterior ribs (sloping down to the midline)."""
    bone = np.zeros_like(x)
    u = np.abs(x)
    chest = np.clip(half_w - 0.6 - u, 0.0, 1.0)  # ribs stop at the chest wall
    spacing = (dome_y + 4.0 - shoulder_y) / 10.0
    for i in range(11):
        top = shoulder_y + 0.3 + i * spacing * rng.uniform(0.92, 1.08)
        rise, fall = rng.uniform(0.25, 0.4), rng.uniform(0.035, 0.05) * (1.0 + 0.04 * i)
        s = np.clip(u - 1.5, 0.0, None)
        curve = top - rise * s + fall * s ** 2
        bone += 1.4 * _tube(x, y, curve, -rise + 2 * fall * s, 0.55, shell=0.4) * chest * (u > 1.5)
        front = top + 1.2 * spacing + 0.45 * (half_w - u)  # anterior rib, lower near the midline
        bone += 0.8 * _tube(x, y, front, 0.45 * np.sign(x), 0.5, shell=0.4) * chest * (u > 4.0)
    return bone


def _shoulders(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, half_w: float, shoulder_y: float) -> np.ndarray:
    """Clavicles (S-curved tubes from the sternum to the shoulders) and scapulae."""
    bone = np.zeros_like(x)
    u = np.abs(x)
    tilt = rng.uniform(0.05, 0.15)
    curve = shoulder_y + 2.0 - tilt * u + 0.5 * np.sin(u / half_w * np.pi)
    bone += 2.0 * _tube(x, y, curve, -tilt + 0.5 * np.pi / half_w * np.cos(u / half_w * np.pi), 0.7, 0.5)
    bone *= (u > 1.5) & (u < half_w - 0.5)
    for side in (-1, 1):
        bone += 0.6 * _chord(x, y, side * (half_w - 3.5), shoulder_y + 7.0, 2.5, 6.0, 1.2)  # scapula
    return bone


def _lesion(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, lung: np.ndarray,
            params: XrayParams) -> tuple[np.ndarray, np.ndarray]:
    """A round nodule or a fluffy consolidation in a lung field: (lung cm it fills, bool mask)."""
    pixel = params.fov_cm / x.shape[0]
    nodule = rng.random() < 0.5
    radius = rng.uniform(*(params.nodule_radius_cm if nodule else params.consolidation_radius_cm))
    row, col = pick_inside(rng, lung > 0.5 * lung.max(), 0.6 * radius / pixel)
    cx, cy = x[row, col], y[row, col]
    if nodule:
        fill = _chord(x, y, cx, cy, radius, radius * rng.uniform(0.85, 1.0), 2.0 * radius * rng.uniform(1.3, 1.8))
    else:
        rho2 = ((x - cx) ** 2 + ((y - cy) / rng.uniform(0.7, 1.0)) ** 2) / radius ** 2
        mottle = 1.0 + 0.3 * smooth_field(rng, x.shape, 12)
        fill = lung * np.exp(-2.0 * rho2 ** 2) * mottle
    fill = np.clip(np.minimum(fill, lung), 0.0, None)
    return fill, fill > 0.25 * fill.max()
