"""Shapes and random fields the simulators share: coordinate grids, organic blobs, smooth fields, lesion seeding.

Coordinates are physical (cm or mm), x to the image's right, y down the image; arrays are float32.
"""
from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from ...errors import ConfigError

MIN_SIZE, MAX_SIZE = 32, 512


def check_size(size: int) -> None:
    """Raise ConfigError unless `size` is an int in MIN_SIZE..MAX_SIZE."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(f"phantom size: got {size!r}; allowed: an integer from {MIN_SIZE} to {MAX_SIZE} pixels")


# What every simulator returns: ((size, size) float32 image in [0, 1], (size, size) bool lesion mask, all False
# for a normal image, (size, size) uint8 anatomy map: 0 background, k the simulator's STRUCTURES[k - 1], the same
# for an image and its normal twin).
Simulation = tuple[np.ndarray, np.ndarray, np.ndarray]


def paint(shape: tuple[int, int], layers: list[np.ndarray]) -> np.ndarray:
    """Bool maps in a simulator's STRUCTURES order → its uint8 anatomy map (label k + 1 for layers[k]; a later
    layer covers an earlier one, as the simulators paint their tissues)."""
    out = np.zeros(shape, dtype=np.uint8)
    for k, layer in enumerate(layers):
        out[layer] = k + 1
    return out


def grid(size: int, fov: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) of a `size`² image spanning `fov` units, origin at the centre; `size` is
    checked here (`check_size`), where a simulator first turns it into pixels."""
    check_size(size)
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size - 0.5) * fov
    return np.meshgrid(c, c)


def lesion_generator(rng: np.random.Generator) -> np.random.Generator:
    """A child generator for lesion draws: spawning leaves `rng`'s own stream untouched, so twins stay twins, and
    the first spawn is the same child wherever in a simulator it happens."""
    return rng.spawn(1)[0]


def harmonics(rng: np.random.Generator, amplitude: float, orders: int = 4) -> np.ndarray:
    """Random boundary wobble: (orders, 2) rows of (relative amplitude, phase) for orders 2, 3, ..."""
    amps = amplitude * rng.uniform(0.2, 1.0, orders) / np.arange(1, orders + 1)
    return np.stack([amps, rng.uniform(0, 2 * np.pi, orders)], axis=1).astype(np.float32)


def blob(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float,
         angle: float = 0.0, wobble: np.ndarray | None = None) -> np.ndarray:
    """Normalised radius of a (wobbly) ellipse on a `grid`: < 1 inside, 1 on its boundary, 2 far outside."""
    wobble = np.zeros((0, 2), np.float32) if wobble is None else wobble
    reach = 1.5 * max(a, b) * (1.0 + float(np.abs(wobble[:, 0]).sum()))
    cols = slice(*np.searchsorted(x[0], [cx - reach, cx + reach]))
    rows = slice(*np.searchsorted(y[:, 0], [cy - reach, cy + reach]))
    out = np.full(x.shape, 2.0, dtype=np.float32)
    xs, ys = x[rows, cols] - cx, y[rows, cols] - cy
    ca, sa = np.cos(angle), np.sin(angle)
    u = (xs * ca + ys * sa) / a
    v = (ys * ca - xs * sa) / b
    rho = np.sqrt(u * u + v * v)
    if len(wobble):
        unit = (u + 1j * v) / np.maximum(rho, 1e-6)  # e^{i phi}
        power, edge = unit, np.ones_like(rho)
        for amp, phase in wobble:  # orders 2, 3, ...: amp cos(k phi + phase) = Re(amp e^{i phase} e^{i k phi})
            power = power * unit
            edge += (amp * np.exp(1j * phase) * power).real
        rho /= np.maximum(edge, 0.3)
    out[rows, cols] = np.minimum(rho, 2.0)
    return out


def soft(rho: np.ndarray, width: float) -> np.ndarray:
    """A soft-edged indicator from a normalised radius: 1 inside, 0 outside, a linear ramp `width` wide."""
    return np.clip((1.0 - rho) / width + 0.5, 0.0, 1.0)


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], nodes: int) -> np.ndarray:
    """A smooth random field of unit-ish amplitude: `nodes`² Gaussian values cubically upsampled to `shape`."""
    coarse = rng.standard_normal((nodes, nodes)).astype(np.float32)
    return _upsampler(shape[0], nodes) @ coarse @ _upsampler(shape[1], nodes).T


@functools.lru_cache(maxsize=32)
def _upsampler(size: int, nodes: int) -> np.ndarray:
    """(size, nodes) float32 matrix of cubic-spline zoom weights: A @ v zooms a length-`nodes` vector to `size`."""
    weights = ndimage.zoom(np.eye(nodes), (size / nodes, 1), order=3, mode="nearest", grid_mode=True)
    return weights[:size].astype(np.float32)


def pick_inside(rng: np.random.Generator, region: np.ndarray, margin_px: float) -> tuple[int, int]:
    """A random (row, col) inside `region` at least `margin_px` from its edge (its deepest point if none is)."""
    depth = ndimage.distance_transform_edt(region)
    assert depth.max() > 0, "pick_inside needs a non-empty region"
    rows, cols = np.nonzero(depth >= min(margin_px, depth.max()))
    i = rng.integers(rows.size)
    return int(rows[i]), int(cols[i])
