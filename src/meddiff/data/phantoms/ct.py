"""Simulated axial CT: (rng, size, abnormal) → ((size, size) float32 image in [0, 1], bool lesion mask).

An anatomy-like attenuation map (HU) of the upper abdomen or lower thorax is forward-projected (Radon
transform), given quantum noise on the projections, reconstructed by filtered back-projection and
shown in a soft-tissue window (W400/L40 by default).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.transform import iradon, radon

from ._geometry import Simulation, blob, grid, harmonics, lesion_generator, paint, pick_inside

# Hounsfield units of the tissues drawn; ENHANCED replaces some in a contrast-enhanced (portal venous) scan.
HU = dict(air=-1000.0, lung=-850.0, fat=-100.0, mix=-40.0, fluid=10.0, bowel=25.0, muscle=50.0,
          liver=60.0, spleen=50.0, kidney=35.0, blood=40.0, cartilage=150.0, cancellous=250.0, cortical=1000.0)
ENHANCED = dict(liver=110.0, spleen=120.0, kidney=180.0, blood=170.0)
# the anatomy map's structures (label k + 1 for STRUCTURES[k]); blood: the heart's chambers, aorta and vena cava
STRUCTURES = ("body", "liver", "spleen", "kidney", "blood", "lung", "bone")


@dataclass(frozen=True)
class CTParams:
    """CT acquisition and display parameters (defaults: a 38 cm body field of view, soft-tissue window)."""

    fov_cm: float = 38.0
    photons: float = 6.0e4  # unattenuated photons per ray: sets the quantum noise
    angles_per_pixel: float = 0.75  # projections over 180 degrees = this x size (96 at 128 px)
    filter_name: str = "hann"
    window_level: float = 40.0
    window_width: float = 400.0
    thorax_fraction: float = 0.4  # share of slices through the lower thorax (the rest: upper abdomen)
    contrast_fraction: float = 0.5  # share of contrast-enhanced scans
    lesion_radius_cm: tuple[float, float] = (3.25, 4.75)
    mu_water: float = 0.19  # cm^-1, about 70 keV


def simulate(rng: np.random.Generator, size: int, abnormal: bool, params: CTParams = CTParams()) -> Simulation:
    """One CT slice, its lesion mask and its anatomy map."""
    x, y = grid(size, params.fov_cm)
    tissue = dict(HU, **ENHANCED) if rng.random() < params.contrast_fraction else dict(HU)
    thorax = rng.random() < params.thorax_fraction
    hu, organs = (_thorax if thorax else _abdomen)(x, y, rng, tissue)
    lesion = np.zeros((size, size), dtype=np.float32)  # HU the lesion adds
    mask = np.zeros((size, size), dtype=bool)
    if abnormal:
        lesion, mask = _add_lesion(lesion_generator(rng), x, y, hu, organs, tissue, params)
    anatomy = _anatomy(hu, organs, tissue)
    recon_hu = _scan(rng, hu, lesion, params)
    low = params.window_level - params.window_width / 2
    image = np.clip((recon_hu - low) / params.window_width, 0.0, 1.0)
    return image.astype(np.float32), mask, anatomy


def _anatomy(hu: np.ndarray, organs: dict, tissue: dict) -> np.ndarray:
    """The slice's anatomy map in STRUCTURES order, read off the HU map the scan was made from."""
    solid = [organs.get(name, np.zeros(hu.shape, bool)) & (hu == tissue[name])
             for name in ("liver", "spleen", "kidney")]
    bone = np.isin(hu, [HU["cortical"], HU["cancellous"], HU["cartilage"]])
    return paint(hu.shape, [hu > HU["air"], *solid, hu == tissue["blood"], hu == HU["lung"], bone])


def _scan(rng: np.random.Generator, hu: np.ndarray, lesion: np.ndarray, params: CTParams) -> np.ndarray:
    """HU maps (anatomy, lesion's change) → projections → noisy projections → filtered back-projection → HU map.

    The lesion is projected and reconstructed with the anatomy, but two approximations keep a twin pair
    apart only at the lesion: the noise amplitude comes from the lesion-free projections (a lesion
    changes a ray's counts by a few per cent), and the lesion's reconstruction is kept within 2 pixels
    of it (beyond, its filtered back-projection tails are ~0.5 HU, 99 % under 5 HU: below the ~10 HU noise).
    """
    size = hu.shape[0]
    pixel_cm = params.fov_cm / size
    theta = np.linspace(0.0, 180.0, max(8, round(params.angles_per_pixel * size)), endpoint=False)
    mu = np.clip(params.mu_water * (1.0 + hu / 1000.0), 0.0, None) * pixel_cm  # attenuation per pixel
    sinogram = radon(mu, theta=theta, circle=True)  # line integrals ∫mu dl, (detectors, angles)
    # Poisson counts N ~ Poisson(N0 exp(-p)), so -log(N/N0) ≈ p + z / sqrt(N0 exp(-p)) (Gaussian approx.).
    z = rng.standard_normal(sinogram.shape)
    counts = np.maximum(params.photons * np.exp(-sinogram), 1.0)
    mu_recon = iradon(sinogram + z / np.sqrt(counts), theta=theta, circle=True, filter_name=params.filter_name)
    if lesion.any():
        near = ndimage.binary_dilation(lesion != 0, iterations=2)
        mu_recon += near * _local_fbp(params.mu_water * lesion / 1000.0 * pixel_cm, theta, params.filter_name)
    return (mu_recon / pixel_cm / params.mu_water - 1.0) * 1000.0


def _local_fbp(image: np.ndarray, theta: np.ndarray, filter_name: str) -> np.ndarray:
    """Project and reconstruct a compact object within a square patch around it (same angles, same filter).

    Equal to projecting and reconstructing the whole field near the object, at a fraction of the cost.
    """
    rows, cols = np.nonzero(image)
    half = max(rows.max() - rows.min(), cols.max() - cols.min()) // 2 + 4
    r0, c0 = (rows.min() + rows.max()) // 2, (cols.min() + cols.max()) // 2  # the patch's corner, once padded
    padded = np.pad(image, half)  # the patch may reach past the field's edge
    patch = padded[r0:r0 + 2 * half, c0:c0 + 2 * half]
    local = iradon(radon(patch, theta=theta, circle=True), theta=theta, circle=True, filter_name=filter_name,
                   output_size=2 * half)
    out = np.zeros_like(padded)
    out[r0:r0 + 2 * half, c0:c0 + 2 * half] = local
    return out[half:-half, half:-half]


def _body(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, fill: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """Skin, subcutaneous fat and the muscle wall; returns (HU map, inner cavity mask, body geometry)."""
    a, b = rng.uniform(13.5, 17.0), rng.uniform(10.0, 12.5)
    fat, wall = rng.uniform(0.8, 3.0), rng.uniform(0.8, 1.4)
    wobble = harmonics(rng, 0.04)
    hu = np.full(x.shape, HU["air"], dtype=np.float32)
    hu[blob(x, y, 0, 0, a, b, 0, wobble) < 1] = HU["fat"]
    hu[blob(x, y, 0, 0, a - fat, b - fat, 0, wobble) < 1] = HU["muscle"]
    ai, bi = a - fat - wall, b - fat - wall
    cavity = blob(x, y, 0, 0, ai, bi, 0, wobble) < 1
    hu[cavity] = fill
    geo = dict(a=ai, b=bi, spine_r=rng.uniform(1.6, 2.1), cartilage_from=0.6)
    geo["spine_y"] = bi - geo["spine_r"] - rng.uniform(1.8, 2.6)
    return hu, cavity, geo


def _spine_and_ribs(x: np.ndarray, y: np.ndarray, hu: np.ndarray, rng: np.random.Generator, geo: dict,
                    n_ribs: int) -> None:
    """Vertebra (cortical ring, cancellous core, canal, spinous process), paraspinal muscles and rib sections."""
    r, cy = geo["spine_r"], geo["spine_y"]
    for side in (-1, 1):
        hu[blob(x, y, side * 1.8 * r, cy + 2.0 * r, 1.3 * r, 1.1 * r) < 1] = HU["muscle"]
    body = blob(x, y, 0, cy, r, 0.9 * r)
    hu[body < 1] = HU["cortical"]
    hu[body < 0.8] = HU["cancellous"]
    hu[blob(x, y, 0, cy + 1.75 * r, 0.75 * r, 0.75 * r) < 1] = HU["cortical"]
    hu[blob(x, y, 0, cy + 2.6 * r, 0.22 * r, 0.9 * r) < 1] = HU["cortical"]
    hu[blob(x, y, 0, cy + 1.7 * r, 0.45 * r, 0.45 * r) < 1] = HU["fluid"]
    for t in np.linspace(-1.0, 1.35, n_ribs) + rng.uniform(-0.06, 0.06, n_ribs):
        for side in (-1, 1):  # rib sections in the wall; anterior ones are costal cartilage in the abdomen
            rx, ry = side * (geo["a"] + 0.5) * np.cos(t), -(geo["b"] + 0.5) * np.sin(t)
            along = np.arctan2(-geo["b"] * np.cos(t), -side * geo["a"] * np.sin(t))
            value = HU["cortical"] if t < geo["cartilage_from"] else HU["cartilage"]
            hu[blob(x, y, rx, ry, 0.75, 0.4, along) < 1] = value


def _abdomen(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, tissue: dict) -> tuple[np.ndarray, dict]:
    """Upper abdomen at the level of liver, spleen and kidneys; returns (HU map, organ masks)."""
    hu, cavity, g = _body(x, y, rng, HU["mix"])
    a, b, r, cy = g["a"], g["b"], g["spine_r"], g["spine_y"]
    for _ in range(rng.integers(5, 10)):  # bowel loops, some with gas
        bx, by, br = rng.uniform(-0.5, 0.6) * a, rng.uniform(-0.8, 0.1) * b, rng.uniform(1.0, 2.2)
        hu[(blob(x, y, bx, by, br, 0.8 * br, rng.uniform(0, 3)) < 1) & cavity] = HU["bowel"]
        if rng.random() < 0.4:
            hu[blob(x, y, bx, by - 0.3 * br, 0.5 * br, 0.3 * br) < 1] = HU["air"]
    sx, sy, sa, sb = 0.3 * a, -0.35 * b, 0.26 * a, 0.3 * b
    stomach = (blob(x, y, sx, sy, sa, sb, 0.3, harmonics(rng, 0.1)) < 1) & cavity
    hu[stomach] = HU["fluid"]
    hu[stomach & (y < sy - rng.uniform(0.2, 0.5) * sb)] = HU["air"]  # air-fluid level
    liver = (blob(x, y, -0.38 * a, -0.05 * b, 0.6 * a, 0.8 * b, rng.uniform(-0.2, 0.2), harmonics(rng, 0.12)) < 1)
    liver &= cavity
    hu[liver] = tissue["liver"]
    spleen = (blob(x, y, 0.62 * a, 0.35 * b, 0.22 * a, 0.36 * b, 0.5, harmonics(rng, 0.1)) < 1) & cavity
    hu[spleen] = tissue["spleen"]
    organs = dict(liver=liver, spleen=spleen)
    if rng.random() < 0.7:
        kidneys = np.zeros_like(cavity)
        for side in (-1, 1):
            kx, ky = side * (r + rng.uniform(3.0, 4.0)), cy - 0.3 * r
            shape = blob(x, y, kx, ky, rng.uniform(2.2, 2.8), rng.uniform(3.3, 4.2), side * 0.5)
            kidneys |= shape < 1
            hu[shape < 1] = tissue["kidney"]
            hu[blob(x, y, kx - side * 1.4, ky, 0.6, 1.0, side * 0.5) < 1] = HU["fat"]  # renal sinus
        organs["kidney"] = kidneys & (hu == tissue["kidney"])
    hu[blob(x, y, 1.2, cy - r - 1.4, 1.1, 1.1) < 1] = tissue["blood"]  # aorta
    hu[blob(x, y, -2.4, cy - r - 1.2, 1.4, 1.0) < 1] = tissue["blood"]  # inferior vena cava
    if rng.random() < 0.5:  # lung bases behind liver and spleen
        for side in (-1, 1):
            base = blob(x, y, side * 0.62 * a, 0.68 * b, 0.24 * a, 0.22 * b, side * 0.6, harmonics(rng, 0.1)) < 1
            hu[base & cavity] = HU["lung"]
    _spine_and_ribs(x, y, hu, rng, g, 7)
    return hu, organs


def _thorax(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, tissue: dict) -> tuple[np.ndarray, dict]:
    """Lower thorax: lungs with vessels, heart, aorta, oesophagus, sternum, scapulae; (HU map, organ masks)."""
    hu, cavity, g = _body(x, y, rng, HU["muscle"])
    a, b, r, cy = g["a"], g["b"], g["spine_r"], g["spine_y"]
    lungs = np.zeros_like(cavity)
    for side in (-1, 1):
        lung = blob(x, y, side * 0.5 * a, 0.02 * b, 0.47 * a, 0.9 * b, side * 0.1, harmonics(rng, 0.06)) < 1
        lungs |= lung & cavity
    hu[lungs] = HU["lung"]
    hx, hy = 0.15 * a, -0.28 * b
    heart = blob(x, y, hx, hy, 0.36 * a, 0.48 * b, -0.6, harmonics(rng, 0.05))
    hu[heart < 1.1] = HU["fat"]  # pericardial fat
    hu[heart < 1] = HU["muscle"] + 10
    hu[heart < 0.75] = tissue["blood"]
    hu[blob(x, y, r * 1.3, cy - 0.6 * r, 1.2, 1.2) < 1] = tissue["blood"]  # descending aorta
    hu[blob(x, y, 0.3, cy - r - 1.0, 0.6, 0.5) < 1] = HU["muscle"]  # oesophagus
    for _ in range(rng.integers(25, 45)):  # pulmonary vessels seen end-on
        vx, vy = rng.uniform(-a, a), rng.uniform(-b, b)
        vr = rng.uniform(0.15, 0.45)
        vessel = (blob(x, y, vx, vy, vr, vr * rng.uniform(1.0, 2.0), rng.uniform(0, 3)) < 1) & lungs
        hu[vessel] = tissue["blood"]
    hu[blob(x, y, 0, -b - 0.3, 1.6, 0.6) < 1] = HU["cortical"]  # sternum
    for side in (-1, 1):  # scapulae in the posterior muscle
        hu[blob(x, y, side * 0.62 * a, 0.95 * b, 4.0, 0.35, -side * 0.45) < 1] = HU["cortical"]
    g["cartilage_from"] = 2.0
    _spine_and_ribs(x, y, hu, rng, g, 9)
    lungs &= hu == HU["lung"]
    return hu, dict(lung=lungs)


def _add_lesion(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, hu: np.ndarray, organs: dict,
                tissue: dict, params: CTParams) -> tuple[np.ndarray, np.ndarray]:
    """A lung nodule (thorax) or a hypo-/hyperdense lesion in liver, spleen or kidney: (HU it adds, bool mask)."""
    names = list(organs)
    weights = np.array([{"liver": 0.7, "spleen": 0.15, "kidney": 0.15, "lung": 1.0}[n] for n in names])
    organ = names[rng.choice(len(names), p=weights / weights.sum())]
    radius = rng.uniform(*params.lesion_radius_cm) * (0.75 if organ == "kidney" else 1.0)
    pixel_cm = params.fov_cm / hu.shape[0]
    row, col = pick_inside(rng, organs[organ], 0.8 * radius / pixel_cm)
    if organ == "lung":
        value = rng.uniform(30.0, 60.0)
    elif rng.random() < 0.6:  # cyst-like or necrotic: near water
        value = rng.uniform(0.0, 15.0)
    else:  # hypervascular
        value = tissue[organ] + rng.uniform(90.0, 130.0)
    shape = blob(x, y, x[row, col], y[row, col], radius, radius * rng.uniform(0.75, 1.0),
                 rng.uniform(0, np.pi), harmonics(rng, 0.15 if organ == "lung" else 0.06))
    # Confined to its organ, with a one-pixel partial-volume edge (a hard edge streaks after back-projection).
    weight = np.clip((1.0 - shape) * radius / pixel_cm + 0.5, 0.0, 1.0) * organs[organ]
    return (weight * (np.float32(value) - hu)).astype(np.float32), weight >= 0.5
