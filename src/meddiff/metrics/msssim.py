"""Image pairs → MS-SSIM and the diversity figure of a generated set (mean MS-SSIM of random pairs, with the same
among real images as its reference): (N, H, W) float in [0, 1] → figures.

MS-SSIM (Wang, Simoncelli & Bovik 2003, "Multi-scale structural similarity for image quality
assessment", eq. 7):

    MS-SSIM(x, y) = [l_M(x, y)]^beta_M * prod_{j=1..M} [cs_j(x, y)]^beta_j

l (luminance) and cs (contrast-structure) are SSIM's two factors (see `meddiff.metrics.ssim`: same
11x11 Gaussian window, sigma 1.5, K1, K2, data range 1, valid positions, population covariance),
averaged over the map at scale j, the image 2x2-average-pooled j - 1 times. As in pytorch-msssim, the
last scale uses the mean of l * cs (its SSIM), and negative means are clipped to 0 before the
fractional powers. beta = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), the paper's weights.

Scales. Five scales need >= 11 px at the coarsest, so images of >= 176 px. Images here are
32-128 px: M is the largest number of scales <= 5 whose coarsest image is >= 11 px (32 px: 2,
64 px: 3, 128 px: 4, 176 px and more: 5), and the first M weights are renormalised to sum to 1.
M is part of the protocol; figures computed with different M are not comparable.

Diversity (Odena et al. 2017, AC-GAN): the mean MS-SSIM over random distinct pairs of one set;
lower is more diverse. The same figure on real images is the reference a model should reach.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from .figure import Figure
from .ssim import DATA_RANGE, K1, K2, WINDOW, _Blur, _check_pair, _moments, bootstrap_ci, check_images

SCALE_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_PIXEL_BUDGET = 2**21  # pixels of one batch of pairs (8 MiB per temporary)


def n_scales(h: int, w: int) -> int:
    """How many MS-SSIM scales an H x W image supports: coarsest side >= 11 px, at most 5."""
    side = min(h, w)
    if side < WINDOW:
        raise DataError(f"images of {h}x{w} px; MS-SSIM needs at least {WINDOW}x{WINDOW}")
    m = 1
    while m < len(SCALE_WEIGHTS) and side // 2**m >= WINDOW:
        m += 1
    return m


def protocol(scales: int) -> str:
    """The recipe behind an MS-SSIM figure, recorded with it."""
    return (f"ms-ssim: {scales} scale(s), weights {SCALE_WEIGHTS[:scales]} renormalised, SSIM window of "
            "meddiff.metrics.ssim at each scale, 2x2 average pooling, negative terms clipped to 0")


def _terms(x: torch.Tensor, y: torch.Tensor, blur: _Blur) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs x, y (P, H, W) → (mean cs (P,), mean l * cs = SSIM (P,)) over the valid window positions."""
    c1, c2 = (K1 * DATA_RANGE) ** 2, (K2 * DATA_RANGE) ** 2
    mu_x, var_x = _moments(x, blur)
    mu_y, var_y = _moments(y, blur)
    cov = blur(x * y) - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    lum = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    return cs.mean(dim=(-2, -1)), (lum * cs).mean(dim=(-2, -1))


def paired_ms_ssim(x: np.ndarray, y: np.ndarray, scales: int | None = None) -> np.ndarray:
    """MS-SSIM of x[i] with y[i]: x, y (P, H, W) float in [0, 1] → (P,) float32 in [0, 1].

    `scales` None: as many as the size allows (see the module docstring); 1 gives SSIM clipped at 0.
    """
    x, y = _check_pair(x, y)
    if len(x) != len(y):
        raise DataError(f"pairs: {len(x)} and {len(y)} images; expected the same number")
    m = scales or n_scales(*x.shape[1:])
    if not 1 <= m <= n_scales(*x.shape[1:]):
        raise ConfigError(f"MS-SSIM scales: {m}; allowed for {x.shape[1]}x{x.shape[2]} px: 1 to "
                          f"{n_scales(*x.shape[1:])}")
    beta = torch.tensor(SCALE_WEIGHTS[:m], dtype=torch.float64)
    beta = (beta / beta.sum()).float()
    per = max(1, _PIXEL_BUDGET // (x.shape[1] * x.shape[2]))
    blurs: dict[tuple[int, int], _Blur] = {}
    out = []
    with torch.no_grad():
        for i in range(0, len(x), per):
            a, b = torch.from_numpy(x[i:i + per]), torch.from_numpy(y[i:i + per])
            value = torch.ones(len(a))
            for j in range(m):
                blur = blurs.setdefault(a.shape[1:], _Blur(*a.shape[1:]))
                cs, ssim = _terms(a, b, blur)
                value *= (cs if j < m - 1 else ssim).clamp_min(0.0) ** beta[j]
                if j < m - 1:
                    a, b = F.avg_pool2d(a[:, None], 2)[:, 0], F.avg_pool2d(b[:, None], 2)[:, 0]
            out.append(value)
    return torch.cat(out).numpy()


def random_pairs(n: int, n_pairs: int, seed: int = 0) -> np.ndarray:
    """(P, 2) int64 distinct unordered pairs i < j of range(n): all of them when there are <= n_pairs."""
    if n < 2:
        raise DataError(f"{n} image(s); pairs need at least 2")
    total = n * (n - 1) // 2
    if total <= n_pairs:
        return np.stack(np.triu_indices(n, 1), axis=1).astype(np.int64)
    rng = np.random.default_rng([seed, 31])
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < n_pairs:
        i, j = rng.integers(0, n, size=2)
        if i != j:
            chosen.add((int(min(i, j)), int(max(i, j))))
    return np.array(sorted(chosen), dtype=np.int64)


def diversity(images: np.ndarray, n_pairs: int = 500, seed: int = 0, n_boot: int = 1000) -> dict:
    """Mean MS-SSIM of random distinct pairs of one set (lower = more diverse).

    images (N, H, W) float in [0, 1], N >= 2 → {"value", "ci95" (percentile bootstrap over pairs),
    "n_pairs", "n_images", "scales", "protocol"}.
    """
    images = check_images(images, "images")
    pairs = random_pairs(len(images), n_pairs, seed)
    values = paired_ms_ssim(images[pairs[:, 0]], images[pairs[:, 1]])
    m = n_scales(*images.shape[1:])
    return {"value": float(values.mean()), "ci95": bootstrap_ci(values, seed=seed, n_boot=n_boot),
            "n_pairs": len(pairs), "n_images": len(images), "scales": m, "protocol": protocol(m)}


def diversity_figure(fake: np.ndarray, real: np.ndarray, n_pairs: int = 500, seed: int = 0,
                     n_boot: int = 1000) -> Figure | None:
    """The diversity figure of a generated set: `diversity` of fake (N, H, W), with the same among real (M, H, W)
    images as the reference (None for one real image); None when N < 2."""
    if len(fake) < 2:
        return None
    out = diversity(fake, n_pairs, seed, n_boot)
    counts = {"n_fake": out["n_images"], "n_real": len(real)}
    details = {"n_pairs": out["n_pairs"], "scales": out["scales"], "reference_ci95": None, "reference_n_pairs": 0}
    reference = None
    if len(real) >= 2:
        ref = diversity(real, n_pairs, seed, n_boot)
        reference = ref["value"]
        details.update(reference_ci95=ref["ci95"], reference_n_pairs=ref["n_pairs"])
    return Figure(out["value"], tuple(out["ci95"]), reference, counts, out["protocol"], details)
