"""Simulated B-mode ultrasound (curvilinear sector): (rng, size, abnormal) → ((size, size) float32 in [0, 1], bool
mask, uint8 anatomy map).

An echogenicity and attenuation map (skin, fat, muscle, an organ with vessels, maybe a cyst) is scanned
along the beams of a fan; random scatterers weighted by echogenicity are convolved with a pulse
point-spread function in beam coordinates, envelope-detected (Hilbert), attenuated along each beam
(time-gain compensated for average tissue, so fluid enhances and dense tissue shadows what lies behind),
log-compressed and scan-converted to the fan.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, signal

from ._geometry import Simulation, blob, grid, harmonics, lesion_generator, paint, smooth_field

# the anatomy map's structures (label k + 1 for STRUCTURES[k]) inside the fan: skin and fat, muscle, the organ,
# its vessels
STRUCTURES = ("fat", "muscle", "organ", "vessel")


@dataclass(frozen=True)
class USParams:
    """Probe, pulse, attenuation, display and lesion parameters of the B-mode simulator (lengths in cm)."""

    depth_cm: tuple[float, float] = (9.0, 14.0)
    sector_deg: float = 65.0
    probe_radius_cm: float = 3.5  # apex-to-skin distance of the curvilinear probe
    samples_per_pixel: float = 2.0  # axial samples along a beam, per output pixel of depth
    pulse_wavelength: float = 3.0  # in axial samples
    pulse_sigma: float = 2.0  # axial envelope of the pulse, in axial samples
    beam_sigma: float = 1.4  # lateral width of the beam, in beams
    attenuation_np_cm: float = 0.35  # round-trip amplitude loss per cm per unit of relative attenuation
    dynamic_range_db: float = 50.0
    lesion_radius_cm: tuple[float, float] = (1.0, 1.7)


def simulate(rng: np.random.Generator, size: int, abnormal: bool, params: USParams = USParams()) -> Simulation:
    """One B-mode image: ((size, size) float32 in [0, 1], (size, size) bool mask, all False if normal).

    The mask marks the mass and the acoustic shadow or enhancement it casts behind it: the region
    the finding changes.
    """
    geo = _geometry(rng, params)
    x, y = grid(size, geo["fov"])
    y = y + geo["fov"] / 2 - geo["apex"]  # y: cm below the fan's apex (x: cm right of it)
    echo, atten, anatomy = _anatomy(rng, x, y, geo)
    n_r = int(round(params.samples_per_pixel * size))  # depth samples; one beam per pixel column
    rows, cols = _polar_to_grid(geo, n_r, size, size)
    scatter = rng.standard_normal((n_r, size)).astype(np.float32)
    gain_slope = rng.uniform(-0.03, 0.03)  # imperfect time-gain compensation, Np/cm
    mask = np.zeros((size, size), dtype=bool)
    if abnormal:
        echo, atten, mass, delta = _lesion(lesion_generator(rng), x, y, geo, echo, atten, params)

    def along_beams(a: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(a, [rows, cols], order=1, mode="nearest")

    polar = _bmode(scatter, along_beams(echo), along_beams(atten), gain_slope, geo["depth"], params)
    image = _scan_convert(polar, geo, x, y)
    if abnormal:
        loss = np.abs(np.cumsum(along_beams(delta), axis=0) * geo["depth"] / n_r) * params.attenuation_np_cm
        mask = mass | (_scan_convert((loss > 0.15).astype(np.float32), geo, x, y) > 0.5)
    r, theta = np.sqrt(x ** 2 + y ** 2), np.arctan2(x, y)
    fan = (r >= geo["r0"]) & (r <= geo["r0"] + geo["depth"]) & (np.abs(theta) <= geo["half"])
    return image.astype(np.float32), mask, np.where(fan, anatomy, 0).astype(np.uint8)


def _bmode(scatter: np.ndarray, echo: np.ndarray, atten: np.ndarray, gain_slope: float, depth: float,
           params: USParams) -> np.ndarray:
    """Beam data (n_r, n_b): scatterers → RF → envelope → attenuation and TGC → log compression, in [0, 1]."""
    step = depth / scatter.shape[0]
    # Round-trip loss relative to average tissue (which TGC removes): fluid enhances, dense tissue shadows.
    loss = np.cumsum((atten - 1.0) * step, axis=0) * params.attenuation_np_cm
    loss -= gain_slope * step * np.arange(scatter.shape[0])[:, None]
    rf = _beamform(scatter * np.sqrt(echo), params)
    envelope = np.abs(signal.hilbert(rf, axis=0)) * np.exp(-loss)
    db = 20.0 * np.log10(envelope / _reference(params) + 1e-6)
    return np.clip(1.0 + db / params.dynamic_range_db, 0.0, 1.0)


def _geometry(rng: np.random.Generator, params: USParams) -> dict:
    """Fan geometry in cm: depth, half-angle, apex position and the square field of view that holds the fan."""
    depth = rng.uniform(*params.depth_cm)
    half = np.deg2rad(params.sector_deg / 2)
    outer = params.probe_radius_cm + depth
    height = outer - params.probe_radius_cm * np.cos(half)
    fov = max(2 * outer * np.sin(half), height) * 1.04
    apex = (fov - height) / 2 - params.probe_radius_cm * np.cos(half)  # below the image's top: < 0, above it
    return dict(depth=depth, half=half, r0=params.probe_radius_cm, fov=fov, apex=apex)


def _polar_to_grid(geo: dict, n_r: int, n_b: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Fractional (row, col) on the Cartesian grid of every (depth sample, beam): two (n_r, n_b) arrays."""
    r = geo["r0"] + (np.arange(n_r) + 0.5) / n_r * geo["depth"]
    theta = np.linspace(-geo["half"], geo["half"], n_b)
    rr, tt = np.meshgrid(r, theta, indexing="ij")
    px = geo["fov"] / size
    cols = (rr * np.sin(tt) + geo["fov"] / 2) / px - 0.5
    rows = (rr * np.cos(tt) + geo["apex"]) / px - 0.5
    return rows.astype(np.float32), cols.astype(np.float32)


def _scan_convert(polar: np.ndarray, geo: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Beam data (n_r, n_b) → the fan on the Cartesian grid; outside the fan is 0."""
    n_r, n_b = polar.shape
    r = np.sqrt(x ** 2 + y ** 2)
    theta = np.arctan2(x, y)
    ir = (r - geo["r0"]) / geo["depth"] * n_r - 0.5
    ib = (theta + geo["half"]) / (2 * geo["half"]) * (n_b - 1)
    inside = (r >= geo["r0"]) & (r <= geo["r0"] + geo["depth"]) & (np.abs(theta) <= geo["half"])
    out = ndimage.map_coordinates(polar, [ir, ib], order=1, mode="nearest")
    return np.where(inside, out, 0.0)


def _beamform(weights: np.ndarray, params: USParams) -> np.ndarray:
    """Radio-frequency lines: scatterer strengths convolved with the pulse (axially) and the beam (laterally)."""
    k = np.arange(-int(4 * params.pulse_sigma) - 1, int(4 * params.pulse_sigma) + 2)
    pulse = np.cos(2 * np.pi * k / params.pulse_wavelength) * np.exp(-0.5 * (k / params.pulse_sigma) ** 2)
    rf = ndimage.convolve1d(weights, pulse.astype(np.float32), axis=0, mode="constant")
    return ndimage.gaussian_filter1d(rf, params.beam_sigma, axis=1, mode="nearest")


def _reference(params: USParams) -> float:
    """Envelope amplitude of fully developed speckle from tissue of echogenicity 1 (≈ 0 dB on screen)."""
    k = np.arange(-int(4 * params.pulse_sigma) - 1, int(4 * params.pulse_sigma) + 2)
    pulse = np.exp(-0.5 * (k / params.pulse_sigma) ** 2)
    beam = 1.0 / np.sqrt(2 * np.sqrt(np.pi) * params.beam_sigma)
    return float(np.sqrt(np.sum(pulse ** 2)) * beam * 6.0)


def _layer(x: np.ndarray, rng: np.random.Generator, base: float, wobble: float) -> np.ndarray:
    """A wavy boundary depth (cm) as a function of lateral position: base + smooth random undulation."""
    coeff = rng.uniform(-1.0, 1.0, 3) * wobble
    u = x[0] / max(float(np.abs(x).max()), 1e-6)
    profile = base + coeff[0] * u + coeff[1] * np.cos(np.pi * u) + coeff[2] * np.sin(2.5 * np.pi * u)
    return np.broadcast_to(profile, x.shape)


def _anatomy(rng: np.random.Generator, x: np.ndarray, y: np.ndarray,
             geo: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Echogenicity and relative attenuation maps: skin, fat with septa, striated muscle, an organ with vessels;
    and the anatomy map (STRUCTURES order) they were drawn from."""
    d = np.sqrt(x ** 2 + y ** 2) - geo["r0"]  # depth below the skin
    fat_end = _layer(x, rng, rng.uniform(0.8, 1.8), 0.3)
    muscle_end = fat_end + _layer(x, rng, rng.uniform(1.0, 2.2), 0.4)
    organ = rng.uniform(0.7, 1.0)
    echo = np.full(x.shape, organ, dtype=np.float32) * (1.0 + 0.15 * smooth_field(rng, x.shape, 6))
    atten = np.ones(x.shape, dtype=np.float32)
    fibres = np.sin(2 * np.pi * (y * np.cos(0.2) + x * np.sin(rng.uniform(-0.4, 0.4))) / rng.uniform(0.25, 0.4))
    echo = np.where(d < muscle_end, 0.55 * (1.0 + 0.5 * fibres), echo)
    echo = np.where(d < fat_end, 0.3, echo)
    atten = np.where(d < fat_end, 0.8, atten)
    septa = np.abs(np.sin(2 * np.pi * (x * rng.uniform(-0.5, 0.5) + y) / rng.uniform(0.4, 0.7))) > 0.96
    echo = np.where((d < fat_end) & septa, 1.2, echo)
    for boundary, strength in ((np.zeros_like(d) + 0.1, 3.0), (fat_end, 2.5), (muscle_end, 3.0)):
        echo = np.where(np.abs(d - boundary) < 0.08, strength, echo)  # skin and fascial interfaces
    vessels = np.zeros(x.shape, dtype=bool)
    for _ in range(rng.integers(1, 4)):  # vessels: anechoic, low attenuation, bright walls when portal
        vx, vy = rng.uniform(-0.4, 0.4) * geo["depth"], rng.uniform(0.45, 0.85) * geo["depth"] + geo["r0"]
        size = rng.uniform(0.3, 0.7)
        shape = blob(x, y, vx, vy, size * rng.uniform(1.0, 3.0), size, rng.uniform(-0.5, 0.5))
        if rng.random() < 0.5:
            echo = np.where(shape < 1.25, 2.0, echo)
        echo = np.where(shape < 1, 0.01, echo)
        atten = np.where(shape < 1, 0.1, atten)
        vessels |= shape < 1
    anatomy = paint(x.shape, [d < fat_end, (d >= fat_end) & (d < muscle_end), d >= muscle_end, vessels])
    return echo.astype(np.float32), atten.astype(np.float32), anatomy


def _lesion(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, geo: dict, echo: np.ndarray,
            atten: np.ndarray, params: USParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A hypoechoic, irregular mass that shadows (solid) or enhances (fluid-rich) behind it.

    Returns (echogenicity, attenuation, bool mass mask, attenuation change), all on the Cartesian grid.
    """
    depth = geo["depth"]
    radius = rng.uniform(*params.lesion_radius_cm) * depth / 12.0
    theta = rng.uniform(-0.55, 0.55) * geo["half"]
    r = geo["r0"] + rng.uniform(0.4, 0.7) * depth
    shape = blob(x, y, r * np.sin(theta), r * np.cos(theta), radius, radius * rng.uniform(0.65, 1.0),
                 rng.uniform(0, np.pi), harmonics(rng, 0.2))
    inside = np.clip((1.05 - shape) / 0.1, 0.0, 1.0)
    value = rng.uniform(0.04, 0.15)
    shadow = rng.random() < 0.6
    lesion_atten = rng.uniform(3.0, 4.5) if shadow else rng.uniform(0.05, 0.3)
    new_echo = echo * (1 - inside) + value * inside
    new_atten = atten * (1 - inside) + lesion_atten * inside
    return new_echo, new_atten, shape < 1, new_atten - atten
