"""Held-out quality for the benchmarks: which `builtin:mni-mri` slices train and which are held out (whole slabs,
with a guard band of dropped slices between), or which MedPhantom-4 subjects train and which are held out (two
render seeds: distinct simulated subjects), and scoring a generated set against the held-out images with
bootstrap intervals, beside the real-vs-real reference (two disjoint held-out halves).

Why slabs: the MNI152 template is one brain (the only T1 volume nilearn ships offline; its grey/white-matter
maps are the same brain), so no held-out *subject* exists locally. Adjacent 1 mm axial slices are near copies
of each other, so the held-out slabs are kept `guard` slices away from every training slice. With the defaults
(every 4th 8-slice slab held out, guard 4) 32 slices are held out, 73 train, 32 are dropped; a held-out slice
is at least 5 mm and on average 8.5 mm from the nearest training slice.

The phantoms (`phantom_split`) have what the template lacks: as many subjects as wanted. Every phantom's anatomy is
drawn from its own (seed, modality, index) generator, so the held-out phantoms (another seed) share no subject
with the training ones, and an abnormal image's normal twin is never on the other side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class HeldOutSplit:
    """Images (N, H, W) float32 in [0, 1] and which of them train, which are held out (two halves)."""

    images: np.ndarray
    train: np.ndarray      # indices
    heldout: np.ndarray    # indices
    half_a: np.ndarray     # indices into images: held-out slabs 1, 3, 5 …
    half_b: np.ndarray     # held-out slabs 2, 4, 6 …
    description: str
    classes: tuple[str, ...] | None = None  # per image, where the data have classes (the phantoms)

    def as_dict(self) -> dict[str, Any]:
        return dict(description=self.description, n_train=len(self.train), n_heldout=len(self.heldout),
                    n_half_a=len(self.half_a), n_half_b=len(self.half_b),
                    train=self.train.tolist(), heldout=self.heldout.tolist())


def mni_split(size: int, every: int = 4, guard: int = 4) -> HeldOutSplit:
    """`builtin:mni-mri` at `size` px: every `every`-th slab of 8 axial slices (starting with the 4th, so the
    thin end slabs train) is held out; training slices closer than `guard` slices to a held-out one are dropped."""
    from meddiff.data.dataset import load_data

    data = load_data("builtin:mni-mri", size)
    images = ((data.images[:, 0] + 1) / 2).numpy()
    groups = np.asarray(data.groups)
    slabs = np.unique(groups)
    held_slabs = slabs[every - 1::every]
    if len(held_slabs) < 2:
        raise ValueError(f"--holdout-every {every}: leaves {len(held_slabs)} held-out slab(s); need 2 or more")
    # consecutive images are consecutive 1 mm slices (dataset.py keeps every brain slice, in order)
    pos = np.arange(len(images))
    held = np.isin(groups, held_slabs)
    dist = np.abs(pos[:, None] - pos[held][None, :]).min(axis=1)
    train = pos[(~held) & (dist > guard)]
    which = np.searchsorted(held_slabs, groups[held])
    half_a, half_b = pos[held][which % 2 == 0], pos[held][which % 2 == 1]
    desc = (f"builtin:mni-mri at {size} px: 8-slice axial slabs {held_slabs.tolist()} held out "
            f"({held.sum()} slices), training slices at least {guard + 1} slices (mm) from any held-out one "
            f"({len(train)} slices; {len(images) - held.sum() - len(train)} dropped as guard)")
    return HeldOutSplit(images, train, pos[held], half_a, half_b, desc)


def phantom_split(size: int, n_train: int = 800, n_heldout: int = 96, modalities: tuple[str, ...] | None = None,
                  train_seed: int = 0, heldout_seed: int = 1) -> HeldOutSplit:
    """MedPhantom-4 rendered natively at `size` px, its `modalities` (default all four) normal and abnormal,
    balanced: `n_train` phantoms of render seed `train_seed` train, `n_heldout` of `heldout_seed` are held out, in
    two halves that each keep the classes balanced. Class names are `<modality>_<finding>` (flat class folders)."""
    from meddiff.data.dataset import phantom_items, render_phantoms
    from meddiff.data.phantoms import MODALITIES

    mods = tuple(modalities or MODALITIES)
    if set(mods) - set(MODALITIES) or not mods:
        raise ValueError(f"phantoms: modalities {','.join(mods)}; choose from {','.join(MODALITIES)}")
    k = 2 * len(mods)  # classes
    if n_heldout < 2 * k or n_train < k:
        raise ValueError(f"phantoms: {n_train} training and {n_heldout} held-out images; need at least {k} and "
                         f"{2 * k} for {k} classes")
    if train_seed == heldout_seed:
        raise ValueError(f"phantoms: training and held-out seeds are both {train_seed}: the same subjects")

    def part(n: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
        """n phantoms: builtin:phantoms itself for all four modalities, else builtin:<modality> of each in turn
        (its normal/abnormal in turn)."""
        if mods == tuple(MODALITIES):
            return (list(render_phantoms("phantoms", n, seed, size)),
                    [f"{m}_{'abnormal' if a else 'normal'}" for m, _i, a in phantom_items("phantoms", n)])
        per = [(n + len(mods) - 1 - j) // len(mods) for j in range(len(mods))]
        rendered = {m: iter(render_phantoms(m, c, seed, size)) for m, c in zip(mods, per)}
        items = {m: iter(phantom_items(m, c)) for m, c in zip(mods, per)}
        order = [mods[i % len(mods)] for i in range(n)]
        names = [f"{m}_{'abnormal' if next(items[m])[2] else 'normal'}" for m in order]
        return [next(rendered[m]) for m in order], names

    (train_images, train_names), (held_images, held_names) = part(n_train, train_seed), part(n_heldout, heldout_seed)
    images = np.stack(train_images + held_images).astype(np.float32)
    pos = np.arange(len(images))
    held = pos[n_train:]
    # the classes cycle every k images: alternate blocks of k keep each half balanced
    half_a, half_b = held[(held - n_train) // k % 2 == 0], held[(held - n_train) // k % 2 == 1]
    desc = (f"MedPhantom-4 ({', '.join(mods)}) at {size} px (rendered at {size}): {n_train} training phantoms "
            f"(render seed {train_seed}), {n_heldout} held-out phantoms (seed {heldout_seed}: other simulated "
            f"subjects), normal/abnormal balanced")
    return HeldOutSplit(images, pos[:n_train], held, half_a, half_b, desc, tuple(train_names + held_names))


def _feature_figures(fake: np.ndarray, real: np.ndarray, extractor: Any, n_boot: int) -> dict[str, Any]:
    from meddiff.metrics.fid import compute_stats, feature_scores
    from meddiff.metrics.intervals import fid_interval, kid_interval

    fs, rs = compute_stats(fake, extractor), compute_stats(real, extractor)
    f = feature_scores(fs, rs, kid_subset_size=min(len(fake), len(real)))
    return dict(kid=f["kid"], kid_ci95=kid_interval(fs.features, rs.features, n_boot=n_boot),
                fid=f["fid"], fid_ci95=fid_interval(fs.features, rs.features, n_boot=n_boot),
                feature_protocol=f["protocol"])


def fine_energy(images: np.ndarray) -> np.ndarray:
    """Per image, the mean squared discrete Laplacian (4 x - its 4 neighbours) of (N, H, W) images in [0, 1]: the
    energy of pixel-scale detail. Residual noise ("grain") raises it far above a real image's."""
    x = images.astype(np.float64)
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return (lap ** 2).mean(axis=(1, 2))


def fine_energy_ratio(fake: np.ndarray, real: np.ndarray, n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Mean `fine_energy` of the fake set over the real set's (1: as much pixel-scale detail as real images; well
    above 1: grain), with a 95 % bootstrap interval resampling both sets."""
    f, r = fine_energy(fake), fine_energy(real)
    rng = np.random.default_rng(seed)
    boots = [f[rng.integers(0, len(f), len(f))].mean() / r[rng.integers(0, len(r), len(r))].mean()
             for _ in range(n_boot)]
    return dict(fine_energy_ratio=float(f.mean() / r.mean()),
                fine_energy_ratio_ci95=[float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))])


def score_heldout(fake: np.ndarray, split: HeldOutSplit, n_boot: int = 200) -> dict[str, Any]:
    """fake (N, H, W) in [0, 1] → KID, FID (random-conv features) and SSIM to the nearest held-out image, each
    with its 95 % bootstrap interval; the pixel-scale detail against the held-out images' (`fine_energy_ratio`,
    1 for real images, far above for grain); and the share of samples that copy a training slice."""
    from meddiff.metrics.features import get_extractor
    from meddiff.metrics.memorization import memorization_report
    from meddiff.metrics.ssim import bootstrap_ci, nearest_ssim

    heldout, train = split.images[split.heldout], split.images[split.train]
    extractor = get_extractor("randconv", resolution=fake.shape[-1])
    nearest, _ = nearest_ssim(fake, heldout)
    m = memorization_report(fake, train, heldout, size=fake.shape[-1])
    return dict(n_fake=len(fake), n_real=len(heldout), **_feature_figures(fake, heldout, extractor, n_boot),
                **fine_energy_ratio(fake, heldout, n_boot), ssim=float(nearest.mean()), ssim_ci95=bootstrap_ci(nearest),
                ssim_per_sample=nearest.tolist(),
                copies_share=m.flagged_share, copies_threshold_ncc=m.threshold)


def reference_rows(split: HeldOutSplit, n_boot: int = 200) -> dict[str, dict[str, Any]]:
    """The same figures for real images: held-out half A against half B (what a perfect model reaches at
    these counts), the training slices against the held-out set (what copying the training set reaches), and
    the guard band's slices, real slices no model trained on but 1–4 mm from a training one: on this one-brain set
    they are what a perfect model of *the brain* draws between its training slices, so their share flagged by the
    copy audit is the copies figure's real reference."""
    from meddiff.metrics.features import get_extractor
    from meddiff.metrics.memorization import memorization_report
    from meddiff.metrics.ssim import bootstrap_ci, nearest_ssim

    ims = split.images
    guard = np.setdiff1d(np.arange(len(ims)), np.concatenate([split.train, split.heldout]))
    extractor = get_extractor("randconv", resolution=ims.shape[-1])
    rows = {}
    for name, fake, real in (("real vs real (held-out half A vs half B)", ims[split.half_a], ims[split.half_b]),
                             ("training slices vs held-out (a copier)", ims[split.train], ims[split.heldout]),
                             ("unseen real slices 1–4 mm from a training slice (the guard band)", ims[guard],
                              ims[split.heldout])):
        if len(fake) < 2:
            continue
        nearest, _ = nearest_ssim(fake, real)
        audit = memorization_report(fake, ims[split.train], ims[split.heldout], size=ims.shape[-1])
        rows[name] = dict(n_fake=len(fake), n_real=len(real), **_feature_figures(fake, real, extractor, n_boot),
                          **fine_energy_ratio(fake, real, n_boot), ssim=float(nearest.mean()),
                          ssim_ci95=bootstrap_ci(nearest), copies_share=audit.flagged_share)
    return rows
