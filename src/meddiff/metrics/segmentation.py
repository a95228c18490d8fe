"""Images with label maps → a small segmenter and its Dice figures: whether generated images show their requested
lesion where the map says (mask adherence), and whether a segmenter trained on synthetic pairs serves on real ones
(segmentation utility). Arrays in, numbers out, like the other metrics.

The segmenter: a three-level convolutional U-Net (16-32-64 channels, two 3x3 convolutions with group norm and SiLU a
level, skip connections), binary (lesion / not), trained with Adam on Dice + cross-entropy for a fixed number of
steps (learning rate decayed on a cosine to a tenth) with random flips; the same network in every figure, so figures
compare with each other. A mixed training set (a few real pairs among many synthetic ones) can be drawn with
`weights`, so each part fills its share of every batch whatever its size. Dice is computed per image on images
whose reference map has a lesion, and averaged with a 95 % bootstrap interval over images; two segmenters scored on
the same images are compared image by image (`dice_comparison`), so their difference and ratio carry a paired
interval. Mask adherence (`adherence_figures`) is the Dice of the generated images' segmentations against the maps
they were asked for, per group (class or modality), beside the same segmenter's Dice on real images against their
true maps: its ceiling. A detector (`train_detector`, `detect`: the segmenter's encoder with a one-number head,
trained in the same loop on image-level labels) says whether an image holds a lesion at all: what reads an
inpainted lesion. Above `WORK_SIZE` px the pairs are scaled down to it first (`to_work_size`), so the cost
of a figure does not grow with the image size.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DataError
from .ssim import bootstrap_ci

WORK_SIZE = 128  # the largest side the segmenter works at: 600 steps take ~8 one-thread minutes there
PROTOCOL = ("3-level conv U-Net (16-32-64), Adam 2e-3 cosine-decayed to 2e-4, Dice + BCE, random flips, "
            "threshold 0.5; Dice per image with a lesion in its reference map, 95 % bootstrap over images")
DETECTOR = ("the segmenter's 3-level conv encoder (16-32-64), mean + max pooled, one linear layer; Adam 2e-3 "
            "cosine-decayed to 2e-4, BCE on image labels (abnormal / normal), random flips; threshold 0.5")


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())


class _Encoder(nn.Module):
    """The three levels (16-32-64 channels at width 16) the segmenter and the detector share."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.down1, self.down2, self.mid = _block(1, w), _block(w, 2 * w), _block(2 * w, 4 * w)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.down1(x)
        b = self.down2(F.avg_pool2d(a, 2))
        return a, b, self.mid(F.avg_pool2d(b, 2))


class Segmenter(_Encoder):
    """(B, 1, H, W) images in [0, 1] → (B, 1, H, W) lesion logits; H and W multiples of 4."""

    def __init__(self, width: int = 16) -> None:
        super().__init__(width)
        w = width
        self.up2, self.up1 = _block(6 * w, 2 * w), _block(3 * w, w)
        self.head = nn.Conv2d(w, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, m = self.encode(x)
        b = self.up2(torch.cat([F.interpolate(m, scale_factor=2.0), b], 1))
        return self.head(self.up1(torch.cat([F.interpolate(b, scale_factor=2.0), a], 1)))


def _check(images: np.ndarray, masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = np.asarray(images, np.float32), np.asarray(masks)
    if images.ndim != 3 or images.shape != masks.shape or len(images) == 0:
        raise DataError(f"segmentation: images {images.shape} and maps {masks.shape} must be (N, H, W) alike, N ≥ 1")
    if images.shape[1] % 4 or images.shape[2] % 4:
        raise DataError(f"segmentation: images of {images.shape[1]}x{images.shape[2]} px; sides must be multiples of 4")
    return torch.from_numpy(images)[:, None], torch.from_numpy((masks > 0).astype(np.float32))[:, None]


def _draws(n: int, weights: np.ndarray | None) -> torch.Tensor | None:
    """Each pair's chance of being drawn, from optional non-negative weights (None: uniform)."""
    if weights is None:
        return None
    weights = np.asarray(weights, np.float64)
    if weights.shape != (n,) or not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise DataError(f"segmentation: weights {weights.shape} must be {n} finite values ≥ 0, not all 0")
    return torch.from_numpy(weights / weights.sum())


def _fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, steps: int, batch: int, seed: int,
         weights: np.ndarray | None = None) -> nn.Module:
    """The one training loop of the segmenter and the detector: Adam 2e-3 decayed on a cosine to 2e-4, batches
    drawn uniformly or by `weights`, each image flipped left-right at random (its map with it when y is a map)."""
    draw = _draws(len(x), weights)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=2e-4)
    for _ in range(steps):
        n = min(batch, len(x))
        idx = (torch.randint(0, len(x), (n,), generator=g) if draw is None
               else torch.multinomial(draw, n, replacement=True, generator=g))
        xb, yb = x[idx], y[idx]
        flip = (torch.rand(len(idx), generator=g) < 0.5).view(-1, 1, 1, 1)
        xb = torch.where(flip, xb.flip(-1), xb)
        if yb.ndim == 4:
            yb = torch.where(flip, yb.flip(-1), yb)
        loss = loss_fn(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
    return net.eval()


def _dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice


def train_segmenter(images: np.ndarray, masks: np.ndarray, steps: int = 600, batch: int = 16,
                    seed: int = 0, weights: np.ndarray | None = None) -> Segmenter:
    """Fit a Segmenter to images (N, H, W) in [0, 1] and label maps (N, H, W) (non-zero = lesion).

    weights (N,), optional: each pair's chance of being drawn (any non-negative scale); default uniform."""
    x, y = _check(images, masks)
    torch.manual_seed(seed)
    return _fit(Segmenter(), x, y, _dice_bce, steps, batch, seed, weights)


class Detector(_Encoder):
    """(B, 1, H, W) images in [0, 1] → (B,) logits of "this image holds a lesion": the segmenter's encoder (three
    levels, 16-32-64 channels), then the deepest features' mean and maximum over the image (the maximum keeps a
    small lesion from being averaged away) and one linear layer."""

    def __init__(self, width: int = 16) -> None:
        super().__init__(width)
        self.head = nn.Linear(8 * width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.encode(x)[2]
        return self.head(torch.cat([m.mean((2, 3)), m.amax((2, 3))], 1))[:, 0]


def train_detector(images: np.ndarray, abnormal: np.ndarray, steps: int = 600, batch: int = 16,
                   seed: int = 0) -> Detector:
    """Fit a Detector to images (N, H, W) in [0, 1] and their image-level labels (N,) (true = holds a lesion; both
    values present), with binary cross-entropy in the segmenter's training loop."""
    abnormal = np.asarray(abnormal).astype(bool)
    x, _ = _check(images, np.zeros(np.shape(images)))
    if abnormal.shape != (len(x),) or abnormal.all() or not abnormal.any():
        raise DataError(f"detector: {abnormal.shape} labels for {len(x)} images; needs one each, both values present")
    torch.manual_seed(seed)
    return _fit(Detector(), x, torch.from_numpy(abnormal.astype(np.float32)), F.binary_cross_entropy_with_logits,
                steps, batch, seed)


@torch.no_grad()
def detect(net: Detector, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Images (N, H, W) in [0, 1] → (N,) bool: the detector calls the image abnormal."""
    x = torch.from_numpy(np.asarray(images, np.float32))[:, None]
    return np.concatenate([(net(x[i:i + batch]) > 0).numpy() for i in range(0, len(x), batch)])


@torch.no_grad()
def segment(net: Segmenter, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Images (N, H, W) in [0, 1] → (N, H, W) bool lesion maps."""
    x = torch.from_numpy(np.asarray(images, np.float32))[:, None]
    return np.concatenate([(net(x[i:i + batch]) > 0)[:, 0].numpy() for i in range(0, len(x), batch)])


def dice_per_image(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Dice of each predicted map against its reference, for the images whose reference has a lesion: (M,)."""
    pred, target = np.asarray(pred) > 0, np.asarray(target) > 0
    keep = target.reshape(len(target), -1).any(1)
    if not keep.any():
        return np.zeros(0)
    p, t = pred[keep].reshape(int(keep.sum()), -1), target[keep].reshape(int(keep.sum()), -1)
    return 2 * (p & t).sum(1) / np.maximum(p.sum(1) + t.sum(1), 1)


def dice_figure(pred: np.ndarray, target: np.ndarray, seed: int = 0, n_boot: int = 1000) -> dict:
    """Mean Dice over images with a lesion, its 95 % bootstrap interval and the count."""
    d = dice_per_image(pred, target)
    if len(d) == 0:
        return dict(dice=None, dice_ci95=None, images=0, protocol=PROTOCOL)
    return dict(dice=float(d.mean()), dice_ci95=bootstrap_ci(d, seed, n_boot), images=int(len(d)), protocol=PROTOCOL)


def dice_comparison(pred_a: np.ndarray, pred_b: np.ndarray, target: np.ndarray, seed: int = 0,
                    n_boot: int = 1000) -> dict:
    """Two segmenters' maps of the same images against the same references, compared image by image: the mean
    Dice difference b − a and ratio b / a, each with a 95 % paired bootstrap interval (the same resampled images
    for both). The difference's interval excluding 0 is what "b beats a" means."""
    a, b = dice_per_image(pred_a, target), dice_per_image(pred_b, target)
    if len(a) == 0:
        return dict(difference=None, difference_ci95=None, ratio=None, ratio_ci95=None, images=0)
    # the mean of per-image differences is the difference of means: bootstrap_ci's resamples pair them already
    rows = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))  # the same draws, for the ratio
    ma, mb = a[rows].mean(1), b[rows].mean(1)
    has_ratio = bool((ma > 0).all())  # a ratio only where a scores above 0 in every resample
    ratios = mb / np.where(ma > 0, ma, 1.0)
    return dict(difference=float(b.mean() - a.mean()), difference_ci95=bootstrap_ci(b - a, seed, n_boot),
                ratio=float(b.mean() / a.mean()) if a.mean() > 0 else None,
                ratio_ci95=[float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))] if has_ratio
                else None,
                images=int(len(a)))


def to_work_size(images: np.ndarray, masks: np.ndarray, size: int = WORK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (N, S, S) larger than `size` → (N, size, size): images by area averaging, maps by nearest neighbour
    (no label value is invented); pairs at or below `size` come back as they are."""
    images, masks = np.asarray(images, np.float32), np.asarray(masks)
    if images.shape[-1] <= size:
        return images, masks
    x = F.interpolate(torch.from_numpy(images)[:, None], size=(size, size), mode="area")[:, 0].numpy()
    m = F.interpolate(torch.from_numpy(masks.astype(np.float32))[:, None], size=(size, size), mode="nearest")
    return x, m[:, 0].numpy().astype(masks.dtype)


def adherence_figures(net: Segmenter, generated: np.ndarray, requested: np.ndarray, real: np.ndarray,
                      real_masks: np.ndarray, generated_groups: list[str] | None = None,
                      real_groups: list[str] | None = None, overall: bool = True, seed: int = 0,
                      n_boot: int = 1000) -> dict[str, dict]:
    """Mask adherence: `net` segments the generated images (N, H, W) and the real ones (M, H, W); Dice of the
    generated against the maps they were asked for (`requested`), of the real against their true maps (the
    segmenter's ceiling). Per group (a class or modality name per image; a group with no real image has no
    ceiling) and, with `overall`, for all images as group "all" → {group: {"generated": dice_figure,
    "real": dice_figure | None}}."""
    gen_maps, real_maps = segment(net, generated), segment(net, real)
    gen_groups = np.asarray(generated_groups if generated_groups is not None else ["all"] * len(gen_maps))
    ref_groups = np.asarray(real_groups if real_groups is not None else ["all"] * len(real_maps))
    names = (["all"] if overall else []) + [g for g in dict.fromkeys(gen_groups.tolist()) if g != "all"]
    out = {}
    for name in names:
        g = np.ones(len(gen_maps), bool) if name == "all" else gen_groups == name
        r = np.ones(len(real_maps), bool) if name == "all" else ref_groups == name
        out[name] = dict(generated=dice_figure(gen_maps[g], np.asarray(requested)[g], seed, n_boot),
                         real=dice_figure(real_maps[r], np.asarray(real_masks)[r], seed, n_boot) if r.any() else None)
    return out
