"""The copy audit: generated images against the training set, the threshold set on real images the model never
saw (which ones: `heldout_split`) → the privacy figures of `meddiff evaluate`, and `meddiff audit`'s shareable folder
holding only the generated files that are not copies (written whole or not at all). The maths is in
meddiff.metrics.memorization.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_folder, check_out_dir
from .config import HELDOUT_SPLITS
from .data.dataset import guard_note, split
from .errors import ConfigError, DataError, RunError
from .export import Manifest
from .imagesets import LabelledImages, load_images, read_generated
from .metrics.memorization import (NEAR_DUPLICATE_NCC, CopyAudit, at_audit_size, copy_threshold,
                                   feature_copy_audit, memorization_report, near_duplicate_share)

MIN_HELDOUT = 10        # held-out real images needed to set the copy threshold from --real
HELDOUT_FRACTION = 0.2  # of --train, held out when --real holds too few images the model never saw
BLIND_SHARE = 0.5       # held-out images that are near-duplicates of training images, above which the audit is blind


@dataclass(frozen=True)
class HeldOut:
    """The real images that set the copy threshold: `mask` over the --real images (side "real") or over the
    --train images (side "train"), the training images they are compared with (`gallery`, a mask over --train),
    and how they were chosen."""

    side: str
    mask: np.ndarray
    gallery: np.ndarray
    how: str

    def images(self, real: LabelledImages, train: LabelledImages) -> np.ndarray:
        return (real if self.side == "real" else train).images[self.mask]


def _image_key(image: np.ndarray) -> bytes:
    return hashlib.sha256(np.round(image * 65535).astype(np.uint16).tobytes()).digest()


def check_split(by: str) -> None:
    if by not in HELDOUT_SPLITS:
        raise ConfigError(f"--heldout-split {by!r}; allowed: {', '.join(HELDOUT_SPLITS)}")


def heldout_split(real: LabelledImages, train: LabelledImages, seed: int, by: str = "group") -> HeldOut:
    """Real images that are not training images, to set the copy threshold.

    The held-out images are the --real images not found (pixel for pixel) in --train; when fewer than 10
    remain, 20 % of --train is held out (`by` "group": whole groups; "contiguous": whole runs of consecutive
    images, see meddiff.data.dataset.split) and compared with the rest."""
    keys = {_image_key(im) for im in train.images}
    novel = np.array([_image_key(im) not in keys for im in real.images])
    if novel.sum() >= MIN_HELDOUT:
        return HeldOut("real", novel, np.ones(len(train.images), bool),
                       f"{int(novel.sum())} --real images not in --train")
    rest, held = split(train.data, HELDOUT_FRACTION, seed, by)
    if len(held) == 0:
        raise DataError(f"--train: {len(train.images)} image(s) in one group and --real holds "
                        f"{int(novel.sum())} images that are not training images; the copy threshold needs "
                        f"at least {MIN_HELDOUT} real images the model was not trained on")
    mask, gallery = np.zeros(len(train.images), bool), np.zeros(len(train.images), bool)
    mask[held], gallery[rest] = True, True
    how = "by group" if by == "group" else "in runs of consecutive images"
    return HeldOut("train", mask, gallery, f"{len(held)} --train images held out {how} and compared with "
                   f"{len(rest)} others{guard_note(len(train.images), len(rest), len(held))} (--real holds only "
                   f"{int(novel.sum())} images not in --train)")


def heldout_warning(copies: CopyAudit, held: HeldOut) -> str | None:
    """A warning when most held-out images are near-duplicates of training images (NCC >= 0.99): they are not
    disjoint from --train (neighbouring slices of one volume, one patient on both sides), so they set the copy
    threshold near 1 and the audit cannot see copies; None when the held-out images are fit to set it."""
    near = copies.heldout if copies.heldout is not None else np.zeros(0)
    share = near_duplicate_share(near) if len(near) else 0.0
    if share <= BLIND_SHARE:
        return None
    fix = ("give --real images of other patients or volumes" if held.side == "real" else
           "hold out runs of consecutive slices with --heldout-split contiguous, put each volume's slices in a "
           "sub-folder of its own, or give --real images of other patients")
    return (f"the copy audit cannot see: {int(round(share * len(near)))} of {len(near)} held-out images "
            f"({100 * share:.0f} %) have a training image at NCC ≥ {NEAR_DUPLICATE_NCC} (median "
            f"{float(np.median(near)):.4f}), so they are not disjoint from --train (neighbouring slices of one volume, "
            f"or one patient's images on both sides); they set the copy threshold at {copies.threshold:.4f} and "
            f"copies below it go unflagged; {fix}")


def copy_audit(generated: np.ndarray, train: LabelledImages, real: LabelledImages, held: HeldOut,
               quantile: float = 0.99) -> CopyAudit:
    """generated (N, S, S) in [0, 1] against the training set, threshold from the held-out images."""
    return memorization_report(generated, train.images, held.images(real, train), quantile=quantile,
                               gallery=train.images[held.gallery])


@dataclass(frozen=True)
class Privacy:
    """The privacy figures of `meddiff evaluate`: copies by NCC and in feature space, how the held-out images
    that set both thresholds were chosen, and the warning when they cannot set them (`heldout_warning`)."""

    copies: CopyAudit
    feature_space: CopyAudit
    heldout: str
    warning: str | None = None

    def to_json(self) -> dict[str, Any]:
        near = near_duplicate_share(self.copies.heldout) if self.copies.heldout is not None else None
        return {**self.copies.to_json(), "heldout": self.heldout, "heldout_near_duplicate_share": near,
                "heldout_warning": self.warning, "feature_space": self.feature_space.to_json()}


def privacy_figures(fake: LabelledImages, train: LabelledImages, real: LabelledImages,
                    feats: dict[str, np.ndarray], feature_protocol: str, quantile: float = 0.99,
                    seed: int = 0, by: str = "group") -> Privacy:
    """The audit of the generated set against --train; feats: each set's features ("fake", "train", "real");
    `by`: how part of --train is held out when --real holds too few images (see `heldout_split`)."""
    held = heldout_split(real, train, seed, by)
    copies = copy_audit(fake.images, train, real, held, quantile)
    f_held = feats[held.side][held.mask]
    return Privacy(copies, feature_copy_audit(feats["fake"], feats["train"], f_held, feats["train"][held.gallery],
                                              feature_protocol, quantile), held.how, heldout_warning(copies, held))


# ---------------------------------------------------------------- during training (train --copy-check)

class TrainingAudit:
    """The copy audit run on the model as it trains (`meddiff train --copy-check N`): N images sampled with the
    weights the run exports, the same seeds, classes and label maps at every check, against the training images;
    the threshold is set once by the held-out (validation) images, as `meddiff audit` sets it. A latent run's
    images are audited decoded, against the training images in pixels.

    train (M, s, s), heldout (K, s, s): float in [0, 1] at the audit's size (`memorization.at_audit_size`);
    labels (N,) class indices or None; masks (N, S, S) label maps at the model's size, or None; seeds (N,)."""

    def __init__(self, train: np.ndarray, heldout: np.ndarray, labels: np.ndarray | None, masks: np.ndarray | None,
                 seeds: list[int], quantile: float = 0.99) -> None:
        self.train, self.labels, self.masks, self.seeds = train, labels, masks, seeds
        self.threshold, near = copy_threshold(heldout, train, quantile)
        share = near_duplicate_share(near)
        self.warning = None if share <= BLIND_SHARE else (
            f"--copy-check: {100 * share:.0f} % of the held-out images have a training image at NCC ≥ "
            f"{NEAR_DUPLICATE_NCC} (neighbouring slices of one volume, one patient on both sides of the split), so "
            f"the copy threshold is {self.threshold:.4f} and the check sees only near-exact copies; put each "
            "volume's or patient's images in a sub-folder of its own so that they are held out together, or hold "
            "out runs of consecutive slices with --val-split contiguous")

    def check(self, run: Any, precision: str = "fp32") -> CopyAudit:
        """Sample the audited images with `run` (a `sample.LoadedRun`) and audit them."""
        from .sample import generate

        images = np.zeros((len(self.seeds), *self.train.shape[1:]), np.float32)
        groups = [None] if self.labels is None else sorted(set(self.labels.tolist()))
        for label in groups:
            rows = list(range(len(self.seeds))) if label is None else np.flatnonzero(self.labels == label).tolist()
            images[rows] = at_audit_size(generate(run, [self.seeds[i] for i in rows], label, precision=precision,
                                                  masks=None if self.masks is None else self.masks[rows]))
        return memorization_report(images, self.train, threshold=self.threshold)


# ---------------------------------------------------------------- meddiff audit

@dataclass(frozen=True)
class AuditConfig:
    """Every option of `meddiff audit`. fake: a folder of generated images; train, real: a folder or builtin:…"""

    fake: str
    train: str
    real: str
    out: str
    size: int | None = None          # None: compare at the generated images' size
    label_depth: int = 1
    quantile: float = 0.99
    seed: int = 0
    heldout_split: str = "group"     # how part of --train is held out when --real holds too few images
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check_split(self.heldout_split)


@dataclass(frozen=True)
class AuditResult:
    """What `meddiff audit` did: the files kept (copied to `out`) and flagged, relative to --fake, the audit, and
    the warning when the held-out images cannot set the threshold."""

    kept: list[Path]
    flagged: list[Path]
    copies: CopyAudit
    heldout: str
    out: Path
    warning: str | None = None


def write_shareable(fake: Path, kept: list[Path], out: Path) -> None:
    """Copy the kept files (relative to `fake`) to `out` at their place, each with its label map where the manifest
    names one, and the manifest rows of those files; `out` appears complete or not at all."""
    try:
        maps = {r["file"]: r["mask"] for r in Manifest(fake).rows() if r.get("mask")}
    except RunError:  # another tool's manifest: its rows are kept as they are, it names no label maps
        maps = {}
    with atomic_folder(out) as tmp:
        for rel in kept:
            for name in (rel.as_posix(), maps.get(rel.as_posix())):  # an image, and its label map where it has one
                if name and (fake / name).is_file():
                    dest = tmp / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(fake / name, dest)
        Manifest(fake).keep_rows([rel.as_posix() for rel in kept], tmp)


def audit_folder(cfg: AuditConfig) -> AuditResult:
    """Screen every file of cfg.fake against cfg.train (threshold from real images the model never saw, see
    `heldout_split`) and write the files that are not copies to cfg.out."""
    out, fake = Path(cfg.out), Path(cfg.fake)
    check_out_dir(out, "--out", empty=True)
    files, generated = read_generated(cfg.fake, cfg.size)
    size = generated.shape[-1]
    train = load_images(cfg.train, "--train", size, cfg.label_depth, cfg.cache_dir)
    real = load_images(cfg.real, "--real", size, cfg.label_depth, cfg.cache_dir)
    held = heldout_split(real, train, cfg.seed, cfg.heldout_split)
    copies = copy_audit(generated, train, real, held, cfg.quantile)
    rel = [f.relative_to(fake.expanduser()) for f in files]
    kept = [r for r, k in zip(rel, copies.keep) if k]
    write_shareable(fake, kept, out)
    return AuditResult(kept, [r for r, k in zip(rel, copies.keep) if not k], copies, held.how, out,
                       heldout_warning(copies, held))
