"""Images → SSIM figures: each generated image against its most similar real image, as the seed project measured it.

Definition (Wang, Bovik, Sheikh & Simoncelli 2004, "Image quality assessment: from error
visibility to structural similarity", eq. 13, with the paper's Gaussian window):

    SSIM(x, y) = mean over the valid window positions p of
                 (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))

- mu, sigma^2, sigma_xy: local moments under an 11x11 Gaussian window, sigma 1.5, taps
  normalised to sum 1 (radius int(3.5 * 1.5 + 0.5) = 5, scipy's / scikit-image's truncation);
  population (not sample) covariance.
- C1 = (0.01 L)^2, C2 = (0.03 L)^2 with the data range L = 1: images are float in [0, 1].
- "Valid" positions only: the map is (H - 10) x (W - 10), no padding, so no border
  convention enters the number. This equals scikit-image's
  ``structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1.0)`` and pytorch-msssim's ``ssim(..., win_size=11, win_sigma=1.5)``; torchmetrics'
  default differs (it averages a reflect-padded full-size map).
- Images are compared at the size they are given (the training size); nothing is resized.
- Nearest SSIM of a generated image = max of SSIM over every image of the real set; the
  figure of a generated set is the mean of those maxima.

The per-pair work is one Gaussian blur of x * y: each image's own moments are computed once,
and the blur is a banded matrix product, G_h^T (x * y) G_w, which BLAS runs far faster than
a per-pair convolution.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from .figure import Figure

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03
DATA_RANGE = 1.0
PROTOCOL = (
    "gaussian 11x11 sigma 1.5, K1 0.01, K2 0.03, data_range 1, valid window (no padding), "
    "population covariance, images in [0,1] at training size, max over real set"
)
BANDS = ((0.7, "excellent"), (0.4, "moderate"), (0.1, "low"), (-np.inf, "very poor"))
_PAIR_BUDGET = 2**18  # pixels of a real chunk (1 MiB): small chunks stay in cache, which is 2-3x faster
EXHAUSTIVE_PIXEL_PAIRS = 2**28  # a shortlisted search is exhaustive up to (fake x real pairs) x pixels
MAX_REFERENCE_QUERIES = 256     # real images queried by the real-halves reference


def ssim_band(value: float) -> str:
    """Band of an SSIM figure: excellent >= 0.7, moderate 0.4-0.7, low 0.1-0.4, very poor < 0.1."""
    if not np.isfinite(value):
        raise ValueError(f"SSIM value must be finite, got {value}")
    for lower, name in BANDS:
        if value >= lower:
            return name
    raise AssertionError("unreachable: the last band has no lower bound")


def check_images(images: np.ndarray, name: str) -> np.ndarray:
    """Validate a stack of grayscale images: (N, H, W) float in [0, 1] → float32 array (N, H, W)."""
    arr = np.asarray(images)
    if arr.ndim != 3:
        raise DataError(f"{name}: shape {arr.shape}; expected (N, H, W) grayscale images")
    if arr.shape[0] == 0:
        raise DataError(f"{name}: no images; expected at least one")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{name}: dtype {arr.dtype}; expected float images in [0, 1] (divide 8-bit data by 255)")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise DataError(f"{name}: holds NaN or infinite values; expected finite values in [0, 1]")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise DataError(f"{name}: values in [{lo:.4g}, {hi:.4g}]; expected [0, 1]")
    return arr


def _check_pair(fake: np.ndarray, real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fake, real = check_images(fake, "fake"), check_images(real, "real")
    if fake.shape[1:] != real.shape[1:]:
        raise DataError(f"fake: image size {fake.shape[1:]} differs from real {real.shape[1:]}; "
                        "compare images at the same size")
    if min(fake.shape[1:]) < WINDOW:
        raise DataError(f"fake: image size {fake.shape[1:]}; SSIM needs at least {WINDOW}x{WINDOW} pixels")
    return fake, real


def _band_matrix(n: int) -> torch.Tensor:
    """(n, n - 10) float32 matrix G with (v^T G)[j] = sum_k g[k] v[j + k]: the valid 1-D Gaussian blur."""
    r = WINDOW // 2
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / SIGMA) ** 2)
    taps /= taps.sum()
    g = np.zeros((n, n - 2 * r))
    for j in range(n - 2 * r):
        g[j:j + WINDOW, j] = taps
    return torch.from_numpy(g).float()


class _Blur:
    """Valid 11x11 Gaussian blur of (..., H, W) tensors as G_h^T x G_w."""

    def __init__(self, h: int, w: int) -> None:
        self.gh_t = _band_matrix(h).T.contiguous()  # (H-10, H)
        self.gw = _band_matrix(w)                   # (W, W-10)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.gh_t @ x @ self.gw


def _moments(x: torch.Tensor, blur: _Blur) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W) → local mean and variance, each (B, H-10, W-10)."""
    mu = blur(x)
    var = (blur(x * x) - mu * mu).clamp_min(0.0)
    return mu, var


def _ssim_block(x: torch.Tensor, mu_x: torch.Tensor, var_x: torch.Tensor,
                y: torch.Tensor, mu_y: torch.Tensor, var_y: torch.Tensor, blur: _Blur) -> torch.Tensor:
    """One image x (H, W) with its moments against a chunk y (C, H, W) with theirs → SSIM (C,).

    In-place steps on small chunks: the element-wise part, not the blur, dominates the cost.
    """
    c1, c2 = (K1 * DATA_RANGE) ** 2, (K2 * DATA_RANGE) ** 2
    mu_xy = mu_x * mu_y                                               # (C, H-10, W-10)
    contrast = blur(x * y).sub_(mu_xy).mul_(2).add_(c2)               # 2 sigma_xy + C2
    num = mu_xy.mul_(2).add_(c1).mul_(contrast)                       # (2 mu_x mu_y + C1)(2 sigma_xy + C2)
    den = (mu_y * mu_y + (mu_x * mu_x + c1)).mul_(var_y + (var_x + c2))
    return num.div_(den).mean(dim=(-2, -1))


def pairwise_ssim(fake: np.ndarray, real: np.ndarray) -> np.ndarray:
    """SSIM of every pair: fake (N, H, W), real (M, H, W) float in [0, 1] → (N, M) float32 in [-1, 1]."""
    fake, real = _check_pair(fake, real)
    out = np.empty((len(fake), len(real)), np.float32)
    for i, j, block in _blocks(fake, real, chunk=None):
        out[i, j:j + len(block)] = block
    return out


def paired_ssim(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """SSIM of each image with its partner: x (N, H, W), y (N, H, W) float in [0, 1] → (N,) float32 (an
    autoencoder's reconstructions against their originals)."""
    x, y = _check_pair(x, y)
    if len(x) != len(y):
        raise DataError(f"paired SSIM needs as many images on each side ({len(x)} and {len(y)})")
    blur = _Blur(*x.shape[1:])
    out = np.empty(len(x), np.float32)
    with torch.no_grad():
        a, b = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
        (mu_a, var_a), (mu_b, var_b) = _moments(a, blur), _moments(b, blur)
        for i in range(len(a)):
            out[i] = float(_ssim_block(a[i], mu_a[i], var_a[i], b[i:i + 1], mu_b[i:i + 1], var_b[i:i + 1], blur)[0])
    return out


def _blocks(fake: np.ndarray, real: np.ndarray, chunk: int | None) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (fake index, first real index, SSIM of that fake image against a chunk of reals)."""
    h, w = fake.shape[1:]
    blur = _Blur(h, w)
    chunk = chunk or max(1, _PAIR_BUDGET // (h * w))
    with torch.no_grad():
        xs = torch.from_numpy(np.ascontiguousarray(fake))
        mu_xs, var_xs = _moments(xs, blur)
        for j in range(0, len(real), chunk):
            y = torch.from_numpy(np.ascontiguousarray(real[j:j + chunk]))
            mu_y, var_y = _moments(y, blur)
            for i in range(len(xs)):
                yield i, j, _ssim_block(xs[i], mu_xs[i], var_xs[i], y, mu_y, var_y, blur).numpy()


def nearest_ssim(fake: np.ndarray, real: np.ndarray, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each generated image its most similar real image.

    fake (N, H, W) and real (M, H, W), float in [0, 1] at the same size →
    (values (N,) float32: max SSIM over real, indices (N,) int64: the argmax in real).
    `chunk` real images are compared at a time (default: as many as fit 1 MiB of pixels).
    """
    fake, real = _check_pair(fake, real)
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    best = np.full(len(fake), -np.inf, np.float32)
    index = np.zeros(len(fake), np.int64)
    for i, j, block in _blocks(fake, real, chunk):
        k = int(block.argmax())
        if block[k] > best[i]:
            best[i], index[i] = block[k], j + k
    return best, index


def _shortlist(fake: torch.Tensor, real: torch.Tensor, k: int, proxy: int) -> torch.Tensor:
    """(N, k) indices of the k real images most correlated (Pearson, over all pixels) with each generated one at
    `proxy` px: on smooth images it ranks the best SSIM match higher than the mean squared difference does."""
    def small(t: torch.Tensor) -> torch.Tensor:
        if max(t.shape[1:]) > proxy:
            t = F.interpolate(t[:, None], size=(proxy, proxy), mode="bilinear", antialias=True,
                              align_corners=False)[:, 0]
        t = t.reshape(len(t), -1)
        t = t - t.mean(dim=1, keepdim=True)
        return t / t.norm(dim=1, keepdim=True).clamp_min(1e-8)

    return (small(fake) @ small(real).T).topk(k, dim=1).indices   # (N, k)


def nearest_ssim_shortlist(fake: np.ndarray, real: np.ndarray, k: int = 32,
                           proxy: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Nearest real image by SSIM, searched among each generated image's k most correlated real images at
    `proxy` px (cheap), with exact SSIM on those k. With k >= M it is exhaustive.

    fake (N, H, W), real (M, H, W) float in [0, 1] → (max SSIM (N,) float32, index in real (N,) int64).
    The value is a lower bound of the exhaustive maximum, and equal to it whenever the best match is
    on the shortlist. Memory: the moments of every real image, 2 M (H - 10)(W - 10) floats.
    """
    fake, real = _check_pair(fake, real)
    if k < 1:
        raise ConfigError(f"SSIM shortlist: {k}; allowed: 1 or more")
    k = min(k, len(real))
    blur = _Blur(*fake.shape[1:])
    best, index = np.empty(len(fake), np.float32), np.empty(len(fake), np.int64)
    with torch.no_grad():
        ys = torch.from_numpy(real)
        mu_ys, var_ys = _moments(ys, blur)
        xs = torch.from_numpy(fake)
        cand = _shortlist(xs, ys, k, proxy)                                               # (N, k)
        for i in range(len(fake)):  # one image against its k candidates: small temporaries stay in cache
            c = cand[i]
            mu_x, var_x = _moments(xs[i:i + 1], blur)
            scores = _ssim_block(xs[i], mu_x[0], var_x[0], ys[c], mu_ys[c], var_ys[c], blur)   # (k,)
            j = int(scores.argmax())
            best[i], index[i] = float(scores[j]), int(c[j])
    return best, index


def bootstrap_ci(values: np.ndarray, seed: int = 0, n_boot: int = 1000, level: float = 0.95) -> list[float]:
    """Percentile bootstrap over images of the mean: values (N,) → [lo, hi]."""
    rng = np.random.default_rng(seed)
    values = np.asarray(values, np.float64)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]


def nearest_ssim_search(fake: np.ndarray, real: np.ndarray,
                        shortlist: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """`nearest_ssim`, or `nearest_ssim_shortlist` with k = `shortlist` when that is given, shorter than the real
    set and the pairs' pixels exceed EXHAUSTIVE_PIXEL_PAIRS → (values (N,), indices (N,), how it searched)."""
    fake, real = _check_pair(fake, real)
    pixel_pairs = len(fake) * len(real) * fake.shape[1] * fake.shape[2]
    if shortlist is None or pixel_pairs <= EXHAUSTIVE_PIXEL_PAIRS or shortlist >= len(real):
        return (*nearest_ssim(fake, real), "exhaustive: every real image")
    values, index = nearest_ssim_shortlist(fake, real, shortlist)
    return values, index, (f"shortlist: exact SSIM against the {shortlist} real images most correlated "
                           "with it at 32 px")


def real_halves_reference(real: np.ndarray, seed: int = 0, max_queries: int = MAX_REFERENCE_QUERIES,
                          shortlist: int | None = None) -> tuple[float, int, int]:
    """What a perfect generator reaches: real images of one random half against the other half.

    real (M, H, W) float in [0, 1], M >= 2 → (mean nearest SSIM, images queried, gallery size). At most
    `max_queries` images of the first half are queried, which bounds the cost; the gallery is the whole second
    half (M/2 images, against M for the generated set, so the reference is a slight underestimate). `shortlist`
    as in `nearest_ssim_search`.
    """
    real = check_images(real, "real")
    if len(real) < 2:
        raise DataError(f"real: {len(real)} image; the halves reference needs at least 2")
    order = np.random.default_rng(seed).permutation(len(real))
    half = len(real) // 2
    query, gallery = real[order[:half][:max_queries]], real[order[half:]]
    values, _, _ = nearest_ssim_search(query, gallery, shortlist)
    return float(values.mean()), len(query), len(gallery)


def ssim_figure(fake: np.ndarray, real: np.ndarray, seed: int = 0, n_boot: int = 1000,
                shortlist: int | None = None) -> tuple[Figure, np.ndarray, np.ndarray]:
    """The SSIM figure of a generated set: the mean of each generated image's nearest-real SSIM, a percentile
    bootstrap interval over images, the real-halves reference (None for one real image), the band.

    fake (N, H, W), real (M, H, W) float in [0, 1] at one size → (figure, nearest SSIM (N,), real index (N,)).
    `shortlist`: see `nearest_ssim_search` (None: always exhaustive).
    """
    values, index, search = nearest_ssim_search(fake, real, shortlist)
    mean = float(values.mean())
    reference, n_query, n_gallery = (real_halves_reference(real, seed, shortlist=shortlist) if len(real) >= 2
                                     else (None, 0, 0))
    fig = Figure(mean, tuple(bootstrap_ci(values, seed=seed, n_boot=n_boot)), reference,
                 {"n_fake": len(fake), "n_real": len(real), "reference_n_query": n_query,
                  "reference_n_gallery": n_gallery}, PROTOCOL,
                 {"median": float(np.median(values)), "band": ssim_band(mean), "search": search})
    return fig, values, index
