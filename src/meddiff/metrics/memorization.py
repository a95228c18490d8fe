"""Generated and training images → copies: each generated image's nearest training image by shift- and
flip-tolerant normalised cross-correlation, a copy threshold set on held-out real images, flags and index pairs.

Definition. Images are brought to at most `size` px a side (antialiased bilinear; smaller
images stay as they are). For a generated image g and a training image t, with s the shift
tolerance in those pixels:

    NCC(g, t) = max over |dy|, |dx| <= s and g' in {g, g flipped left-right} of
                corr( g'[s+dy : H-s+dy, s+dx : W-s+dx],  t[s : H-s, s : W-s] )

where corr is the Pearson correlation of the two crops (zero-mean, unit-norm dot product;
a constant crop correlates 0 with anything). A copy shifted by up to s px, mirrored or
lightly noised scores close to 1. All shifts of all generated images against a chunk of
training images are one matrix product.

Threshold. Real images that are not copies say how close an honest image comes to the
training set: the threshold is the `quantile` (default 0.99) of the nearest-NCC of held-out
real images against the training set. A generated image at or above it is flagged.
Memorisation has been measured at tens of per cent in small medical sets (Dar et al. 2024):
it is measured here, never assumed away.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from .ssim import check_images

_BLOCK = 2**24  # floats of one block (variants of a generated batch, or their scores): 64 MiB
NEAR_DUPLICATE_NCC = 0.99  # a real image this close to a training image is its neighbour: an adjacent slice, a twin


def protocol(shift: int, size: int, flip: bool) -> str:
    """The recipe behind an NCC figure, recorded with it."""
    return (f"ncc: pearson over central crop, shifts +-{shift}px, "
            f"{'horizontal flip, ' if flip else ''}images at <= {size}px (antialiased bilinear)")


def _prepare(images: np.ndarray, name: str, size: int) -> torch.Tensor:
    """(N, H, W) float in [0, 1] → (N, h, w) float32 tensor with max(h, w) <= size."""
    x = torch.from_numpy(np.ascontiguousarray(check_images(images, name)))
    h, w = x.shape[1:]
    if max(h, w) > size:
        scale = size / max(h, w)
        hw = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = F.interpolate(x[:, None], size=hw, mode="bilinear", align_corners=False, antialias=True)[:, 0]
    return x


def at_audit_size(images: np.ndarray, size: int = 64) -> np.ndarray:
    """(N, H, W) in [0, 1] → the images as the audit compares them (at most `size` px a side): a gallery kept at
    that size gives the same figures as the full-size images, in a fraction of the memory."""
    return _prepare(images, "images", size).numpy()


def _normalise(rows: torch.Tensor) -> torch.Tensor:
    """(..., P) → zero-mean, unit-norm rows; constant rows become 0."""
    rows = rows - rows.mean(dim=-1, keepdim=True)
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def _variants(x: torch.Tensor, shift: int, flip: bool) -> torch.Tensor:
    """(N, H, W) → (N, V, P): every shifted crop of every image (and of its mirror), normalised."""
    h, w = x.shape[1:]
    sources = [x, x.flip(-1)] if flip else [x]
    crops = [src[:, shift + dy: h - shift + dy, shift + dx: w - shift + dx].reshape(len(x), -1)
             for src in sources for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)]
    return _normalise(torch.stack(crops, dim=1))


def _centres(x: torch.Tensor, shift: int) -> torch.Tensor:
    """(M, H, W) → (M, P): the normalised central crops."""
    h, w = x.shape[1:]
    return _normalise(x[:, shift: h - shift, shift: w - shift].reshape(len(x), -1))


def nearest_ncc(generated: np.ndarray, train: np.ndarray, shift: int = 2, flip: bool = True,
                size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """generated (N, H, W), train (M, H, W) float in [0, 1] → (NCC (N,) float32 in [-1, 1], train index (N,) int64)."""
    if shift < 0:
        raise ConfigError(f"--copy-shift: {shift}; allowed: 0 or more pixels")
    g, t = _prepare(generated, "generated", size), _prepare(train, "train", size)
    if g.shape[1:] != t.shape[1:]:
        raise DataError(f"generated: image size {tuple(generated.shape[1:])} differs from train "
                        f"{tuple(train.shape[1:])}; compare images at the same size")
    if min(g.shape[1:]) <= 2 * shift + 1:
        raise ConfigError(f"--copy-shift: {shift} px on {tuple(g.shape[1:])} images; "
                          "allowed: less than half the image side")
    with torch.no_grad():
        centres = _centres(t, shift)                                     # (M, P)
        v = (2 if flip else 1) * (2 * shift + 1) ** 2
        per = max(1, _BLOCK // (v * centres.shape[1]))                    # generated images per batch
        parts = [_nearest_block(_variants(g[i:i + per], shift, flip), centres) for i in range(0, len(g), per)]
    best = torch.cat([b for b, _ in parts]).clamp(-1.0, 1.0)  # rounding can overshoot 1 by ~1e-6
    return best.numpy(), torch.cat([k for _, k in parts]).numpy()


def _nearest_block(variants: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """variants (n, V, P), centres (M, P), both normalised → (best NCC (n,), index in centres (n,))."""
    n, v, p = variants.shape
    flat = variants.reshape(n * v, p)
    best = torch.full((n,), -2.0)
    index = torch.zeros(n, dtype=torch.long)
    chunk = max(1, _BLOCK // (n * v))
    for j in range(0, len(centres), chunk):
        scores = (flat @ centres[j:j + chunk].T).reshape(n, v, -1).amax(dim=1)  # (n, C)
        value, k = scores.max(dim=1)
        better = value > best
        best[better], index[better] = value[better], k[better] + j
    return best, index


def near_duplicate_share(nearest: np.ndarray, level: float = NEAR_DUPLICATE_NCC) -> float:
    """The share of images (K,) whose nearest NCC to the training set is at least `level`. Held-out real images of
    other patients sit well below 0.99 (MedPhantom-4 of another seed: 7 %; one brain held out in slabs of 8
    slices: 21 %, at 64 px); slices of one volume held out one by one mostly above it (78 %): when most of the
    held-out images are near-duplicates, they set the copy threshold near 1 and the audit cannot see copies."""
    return float((np.asarray(nearest) >= level).mean())


def copy_threshold(heldout: np.ndarray, train: np.ndarray, quantile: float = 0.99, shift: int = 2,
                   flip: bool = True, size: int = 64) -> tuple[float, np.ndarray]:
    """Held-out real images (K, H, W), never trained on → (the quantile of their nearest NCC, those NCCs (K,))."""
    if not 0 < quantile <= 1:
        raise ConfigError(f"--copy-quantile: {quantile}; allowed: (0, 1]")
    values, _ = nearest_ncc(heldout, train, shift, flip, size)
    return float(np.quantile(values, quantile)), values


@dataclass(frozen=True, eq=False)
class CopyAudit:
    """Which generated images copy a training image: each one's nearest similarity to the training set (`nearest`
    (N,), `index` (N,) the training image), the copy `threshold` and where it came from, and the held-out real
    images' own nearest similarity (`heldout` (K,); None when the threshold was given). `measure` names the
    similarity in the JSON ("ncc", or "similarity" in feature space)."""

    nearest: np.ndarray
    index: np.ndarray
    threshold: float
    threshold_source: str
    n_train: int
    protocol: str
    heldout: np.ndarray | None = None
    measure: str = "ncc"

    @property
    def keep(self) -> np.ndarray:
        """(N,) bool: False for a flagged copy; the images that may be shared."""
        return self.nearest < self.threshold

    @property
    def flagged(self) -> np.ndarray:
        """Indices of the flagged generated images, most similar first."""
        flagged = np.flatnonzero(self.nearest >= self.threshold)
        return flagged[np.argsort(-self.nearest[flagged], kind="stable")]

    @property
    def n_flagged(self) -> int:
        return int((self.nearest >= self.threshold).sum())

    @property
    def flagged_share(self) -> float:
        return self.n_flagged / len(self.nearest)

    @property
    def train_copied_share(self) -> float:
        return len(np.unique(self.index[self.flagged])) / self.n_train

    def to_json(self) -> dict[str, Any]:
        """{"flagged_share", "n_flagged", "train_copied_share", "threshold", "threshold_source", "pairs": [[generated
        i, train j, similarity], ...] (flagged only, most similar first), the medians, the counts, "protocol"}."""
        flagged = self.flagged
        out: dict[str, Any] = {} if self.heldout is None else {
            f"heldout_{self.measure}_median": float(np.median(self.heldout)), "n_heldout": len(self.heldout)}
        out.update({
            "flagged_share": self.flagged_share, "n_flagged": len(flagged),
            "train_copied_share": self.train_copied_share, "n_generated": len(self.nearest), "n_train": self.n_train,
            "threshold": float(self.threshold), "threshold_source": self.threshold_source,
            f"nearest_{self.measure}_median": float(np.median(self.nearest)),
            "pairs": [[int(i), int(self.index[i]), float(self.nearest[i])] for i in flagged],
            "protocol": self.protocol,
        })
        return out


def memorization_report(generated: np.ndarray, train: np.ndarray, heldout: np.ndarray | None = None,
                        threshold: float | None = None, quantile: float = 0.99, shift: int = 2,
                        flip: bool = True, size: int = 64, gallery: np.ndarray | None = None) -> CopyAudit:
    """Flag generated images that copy a training image.

    generated (N, H, W), train (M, H, W), heldout (K, H, W): float in [0, 1] at one size.
    The threshold is `threshold` when given, else the `quantile` of the held-out images' nearest NCC against
    `gallery` (default: train; a held-out part of the training set is compared with the rest).
    """
    if threshold is None and heldout is None:
        raise ConfigError("memorization: no held-out real images and no --copy-threshold; "
                          "give held-out images (the usual way) or a threshold in [-1, 1]")
    values, index = nearest_ncc(generated, train, shift, flip, size)
    held = None
    if threshold is None:
        threshold, held = copy_threshold(heldout, train if gallery is None else gallery, quantile, shift, flip, size)
        source = f"quantile {quantile} of nearest NCC of {len(held)} held-out real images"
    else:
        source = "given"
    return CopyAudit(values, index, float(threshold), source, len(train), protocol(shift, size, flip), held)


def feature_copy_audit(f_fake: np.ndarray, f_train: np.ndarray, f_held: np.ndarray, f_gallery: np.ndarray,
                       feature_protocol: str, quantile: float = 0.99) -> CopyAudit:
    """The same audit in feature space: features (N, D), (M, D), (K, D), (G, D) of the generated, training,
    held-out and gallery images; cosine similarity of features standardised by the training set's mean and
    spread; threshold: the `quantile` of the held-out images' nearest similarity to the gallery."""
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6

    def unit(f: np.ndarray) -> np.ndarray:
        z = (np.asarray(f, np.float64) - mu) / sd
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)

    def nearest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sims = [unit(a[i:i + 1024]) @ unit(b).T for i in range(0, len(a), 1024)]
        return np.concatenate([s.max(1) for s in sims]), np.concatenate([s.argmax(1) for s in sims])

    held, _ = nearest(f_held, f_gallery)
    threshold = float(np.quantile(held, quantile))
    values, index = nearest(f_fake, f_train)
    return CopyAudit(values, index, threshold, f"quantile {quantile} of nearest similarity of {len(held)} held-out "
                     "real images", len(f_train), f"cosine similarity of {feature_protocol} features standardised "
                     f"by --train; threshold: quantile {quantile} of {len(f_held)} held-out real images' nearest "
                     "similarity", held, measure="similarity")
