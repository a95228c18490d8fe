"""Images → feature vectors for FID, KID and PRDC: (N, H, W) float in [0, 1] → (N, D) float32, with a protocol name.

Two extractors share one interface (`protocol`, `dim`, `__call__`):

- ``RandConvFeatures`` — "meddiff-randconv-v1@{R}px", needs no download. Images are resized
  to R x R (bilinear, antialiased), mapped to [-1, 1] and passed through a fixed three-stage
  conv net whose weights are drawn once from numpy's PCG64 generator seeded with 0 (He-normal
  3x3 filters, 16/32/64 channels, ReLU, 2x2 average pooling between stages). The feature is
  the spatial mean and standard deviation of every channel at every stage (2 * 112 = 224
  numbers): first-stage channels see edges and texture, later ones larger structure, so blur,
  noise and wrong anatomy all move it. Randomly initialised embeddings are a known choice for
  data far from ImageNet (Naeem et al. 2020, "Reliable fidelity and diversity metrics"), but
  their values are on their own scale: never compare them with Inception numbers.
- ``InceptionFeatures`` — "inception-v3-fid@299px-bilinear-gray3": the TF-ported Inception-v3
  FID network of torch-fidelity (the one pytorch-fid, torch-fidelity and torchmetrics share),
  2048-d pool features. The grey channel is repeated 3x, values scaled to uint8, and the
  network resizes to 299 x 299 bilinearly (TF1-compatible interpolation) itself. Its weights
  are read from a local file only (an explicit path or torch's hub cache); nothing is fetched.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .ssim import check_images

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
RANDCONV_VERSION = "meddiff-randconv-v1"


class FeatureExtractor(Protocol):
    """Images (N, H, W) float in [0, 1] → features (N, dim) float32; `protocol` names the recipe."""

    protocol: str
    dim: int

    def __call__(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray: ...


def _map_batches(embed: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int) -> np.ndarray:
    """Apply embed to (B, 1, H, W) float32 batches of checked images → (N, D) float32."""
    images = check_images(images, "images")
    if batch_size < 1:
        raise ConfigError(f"--batch-size: {batch_size}; allowed: 1 or more")
    with torch.no_grad():
        out = [embed(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size]))[:, None])
               for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy().astype(np.float32)


class RandConvFeatures:
    """The offline extractor: a fixed random conv net (see the module docstring), deterministic everywhere."""

    channels = (16, 32, 64)

    def __init__(self, resolution: int = 64) -> None:
        if resolution < 16:
            raise ConfigError(f"feature resolution {resolution}; allowed: 16 px or more")
        self.resolution = resolution
        self.protocol = f"{RANDCONV_VERSION}@{resolution}px"
        self.dim = 2 * sum(self.channels)
        rng = np.random.default_rng(0)  # PCG64: the same weights on every platform and numpy version
        self.weights: list[torch.Tensor] = []
        c_in = 1
        for c_out in self.channels:
            w = rng.standard_normal((c_out, c_in, 3, 3)) * np.sqrt(2.0 / (9 * c_in))
            self.weights.append(torch.from_numpy(w.astype(np.float32)))
            c_in = c_out

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, R, R) in [-1, 1] → (B, dim)."""
        parts = []
        for k, w in enumerate(self.weights):
            if k:
                x = F.avg_pool2d(x, 2)
            x = F.relu(F.conv2d(x, w, padding=1))
            parts += [x.mean(dim=(2, 3)), x.std(dim=(2, 3))]
        return torch.cat(parts[0::2] + parts[1::2], dim=1)  # means of every stage, then stds

    def __call__(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        def embed(x: torch.Tensor) -> torch.Tensor:
            x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", align_corners=False, antialias=True)
            return self._embed(x * 2 - 1)

        return _map_batches(embed, images, batch_size)


def default_inception_weights() -> Path:
    """Where torch (and torch-fidelity) keep the FID Inception weights: <torch hub dir>/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


class InceptionFeatures:
    """The standard FID extractor (torch-fidelity's Inception-v3), from local weights only."""

    protocol = "inception-v3-fid@299px-bilinear-gray3"
    dim = 2048

    def __init__(self, weights: Path | str | None = None) -> None:
        path = Path(weights) if weights is not None else default_inception_weights()
        if not path.is_file():
            raise ConfigError(f"--inception-weights: no file at {path}; expected the torch-fidelity "
                              f"FID weights {INCEPTION_WEIGHTS_FILE}, or use the offline "
                              f"'{RANDCONV_VERSION}' features")
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as exc:
            raise ConfigError("Inception features need torch-fidelity (pip install torch-fidelity); "
                              f"or use the offline '{RANDCONV_VERSION}' features") from exc
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=str(path)).eval()

    def __call__(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        def embed(x: torch.Tensor) -> torch.Tensor:
            x = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)  # (B, 3, H, W) uint8
            return self.net(x)[0].reshape(len(x), -1)

        return _map_batches(embed, images, batch_size)


def get_extractor(name: str = "randconv", resolution: int = 64,
                  inception_weights: Path | str | None = None) -> FeatureExtractor:
    """An extractor by name: "randconv" (offline, at `resolution` px) or "inception" (local weights)."""
    if name == "randconv":
        return RandConvFeatures(resolution)
    if name == "inception":
        return InceptionFeatures(inception_weights)
    raise ConfigError(f"--features: {name!r}; allowed: 'randconv', 'inception'")
