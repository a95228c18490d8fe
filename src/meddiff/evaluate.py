"""Real, generated and training image sets (folders or builtin:…) → the figures of `meddiff evaluate`, JSON-ready:
SSIM, MS-SSIM diversity, FID/KID and PRDC with intervals and counts, per class, class consistency, utility, and the
privacy audit. Sets are loaded with the project's readers at one size, in [0, 1]; the maths is in meddiff.metrics.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data.dataset import ImageSet, load_data, parse_spec, split
from .data.readers import find_image_files, read_file
from .errors import ConfigError, DataError

SAMPLE_EXTRAS = ("grid.png",)
FLAT = "all"                  # the class name load_data gives every image of a folder without class folders
EXHAUSTIVE_PIXEL_PAIRS = 2**28  # nearest SSIM is exhaustive up to (fake x real pairs) x pixels, shortlisted above
MIN_HELDOUT = 10              # held-out real images needed to set the copy threshold from --real


@dataclass(frozen=True)
class EvalConfig:
    """Every option of `meddiff evaluate`. real/train: a folder or builtin:…; fake: a folder of generated images."""

    real: str
    fake: str
    train: str | None = None               # the model's training set: turns the privacy audit on
    size: int | None = None                # None: the generated images' size
    label_depth: int | None = None         # None: 1 for --real; --fake/--train: as deep as --real's class names
    features: str = "randconv"             # "randconv" (offline) or "inception" (local weights only)
    inception_weights: str | None = None
    feature_resolution: int = 64
    utility: bool = False
    heldout_fraction: float = 0.3          # real images held out (by group) for the classifier's test
    seed: int = 0
    n_boot: int = 200
    prdc_k: int = 5
    ssim_shortlist: int = 32
    diversity_pairs: int = 500
    class_diversity_pairs: int = 200
    copy_quantile: float = 0.99
    cache_dir: str | None = None           # the data cache; feature statistics go to <cache_dir>/features


@dataclass
class Images:
    """One set at the evaluation size: images (N, S, S) float32 in [0, 1], labels (N,) into class_names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    data: ImageSet

    @property
    def labelled(self) -> bool:
        return self.class_names != (FLAT,)

    def mask(self, name: str) -> np.ndarray:
        """(N,) bool: the images of class `name` (none when the set does not have it)."""
        if name not in self.class_names:
            return np.zeros(len(self.labels), bool)
        return self.labels == self.class_names.index(name)

    def counts(self) -> dict[str, int]:
        return {c: int((self.labels == k).sum()) for k, c in enumerate(self.class_names)}


@dataclass
class Evaluation:
    """The figures (`results`, JSON-ready) and what the report draws from: the sets and the nearest images."""

    results: dict[str, Any]
    real: Images
    fake: Images
    train: Images | None = None
    nearest_real: np.ndarray | None = None        # (N,) index in real of each generated image's nearest by SSIM
    nearest_real_ssim: np.ndarray | None = None   # (N,) that SSIM
    nearest_train: np.ndarray | None = None       # (N,) index in train of each generated image's nearest by NCC
    nearest_train_ncc: np.ndarray | None = None   # (N,) that NCC
    seconds: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- loading

def images01(spec: str, size: int, cache_dir: str | Path | None = None) -> np.ndarray:
    """(N, size, size) float32 in [0, 1] from a data spec (a sample folder's grid.png left out)."""
    data = load_data(spec, size, cache_dir=cache_dir, exclude=SAMPLE_EXTRAS)
    return ((data.images[:, 0] + 1) / 2).clamp(0, 1).numpy()


def native_size(folder: str) -> int:
    """The size of the first readable image in a folder (generated images are square at the training size)."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"--fake {folder!r}: {'not a folder' if root.exists() else 'no such folder'}")
    files, _ = find_image_files(root)
    for f in files:
        if f.name in SAMPLE_EXTRAS:
            continue
        image, _meta = read_file(f)[0]
        return int(max(image.shape))
    raise DataError(f"--fake {folder!r}: no images found")


def load_images(spec: str, flag: str, size: int, label_depth: int, cache_dir: str | Path | None) -> Images:
    """A data spec → Images at `size` px; errors name `flag` (--real, --fake, --train)."""
    try:
        kind, name, _ = parse_spec(spec)
        if kind == "folder" and not Path(name).expanduser().is_dir():
            raise DataError(f"--data {spec!r}: {'not a folder' if Path(name).exists() else 'no such folder'}")
        data = load_data(spec, size, label_depth=label_depth, cache_dir=cache_dir, exclude=SAMPLE_EXTRAS)
    except DataError as err:
        text = str(err)
        raise DataError(flag + text[len("--data"):] if text.startswith("--data") else f"{flag}: {text}") from None
    images = ((data.images[:, 0] + 1) / 2).clamp(0, 1).numpy()
    return Images(images, data.labels.numpy(), data.class_names, data)


def _depth(names: tuple[str, ...]) -> int:
    return max(n.count("/") + 1 for n in names)


def _check_classes(fake: Images, ref: Images, flag: str) -> None:
    if not fake.labelled:
        return
    if not ref.labelled:
        raise DataError(f"--fake: class folders ({', '.join(fake.class_names)}) but {flag} has none; give {flag} "
                        "with class folders, or generated images without them")
    missing = sorted(set(fake.class_names) - set(ref.class_names))
    if missing:
        raise DataError(f"--fake: class folder(s) {', '.join(missing)} not among the {flag} classes "
                        f"({', '.join(ref.class_names)}); name them like the training classes or set --label-depth")


def load_sets(cfg: EvalConfig, size: int) -> tuple[Images, Images, Images | None]:
    """(real, fake, train or None), class folders checked: every generated class must be a real (and training) class."""
    real = load_images(cfg.real, "--real", size, cfg.label_depth or 1, cfg.cache_dir)
    depth = cfg.label_depth or (_depth(real.class_names) if real.labelled else 1)
    fake = load_images(cfg.fake, "--fake", size, depth, None)
    _check_classes(fake, real, "--real")
    if cfg.utility and (len(real.class_names) < 2 or not real.labelled):
        raise ConfigError(f"--utility: --real {cfg.real!r} has {len(real.class_names) if real.labelled else 0} "
                          "class folder(s); the classifier needs 2 or more")
    if cfg.utility and not fake.labelled:
        raise ConfigError(f"--utility: --fake {cfg.fake!r} has no class folders; sample with --per-class")
    train = None
    if cfg.train is not None:
        train = load_images(cfg.train, "--train", size, depth, cfg.cache_dir)
        if train.labelled:
            _check_classes(fake, train, "--train")
    return real, fake, train


# ---------------------------------------------------------------- quality and diversity

def _nearest(fake: np.ndarray, real: np.ndarray, cfg: EvalConfig) -> tuple[np.ndarray, np.ndarray, str]:
    from .metrics.msssim import nearest_ssim_shortlist
    from .metrics.ssim import nearest_ssim

    pixel_pairs = len(fake) * len(real) * fake.shape[1] * fake.shape[2]
    if pixel_pairs <= EXHAUSTIVE_PIXEL_PAIRS or cfg.ssim_shortlist >= len(real):
        return (*nearest_ssim(fake, real), "exhaustive: every real image")
    values, index = nearest_ssim_shortlist(fake, real, cfg.ssim_shortlist)
    return values, index, (f"shortlist: exact SSIM against the {cfg.ssim_shortlist} real images most correlated "
                           "with it at 32 px")


def ssim_figures(fake: np.ndarray, real: np.ndarray, cfg: EvalConfig) -> tuple[dict, np.ndarray, np.ndarray]:
    """Nearest-real SSIM of each generated image with a bootstrap interval, and the real-halves reference (real
    images of one random half against the other, at most 256 queries) → (figure, values (N,), indices (N,))."""
    from .metrics.ssim import PROTOCOL, bootstrap_ci, ssim_band

    values, index, search = _nearest(fake, real, cfg)
    mean = float(values.mean())
    out = {"value": mean, "ci95": bootstrap_ci(values, seed=cfg.seed, n_boot=cfg.n_boot),
           "median": float(np.median(values)), "band": ssim_band(mean), "n_fake": len(fake), "n_real": len(real),
           "reference": None, "reference_n_query": 0, "reference_n_gallery": 0}
    if len(real) >= 2:
        order = np.random.default_rng(cfg.seed).permutation(len(real))
        query, gallery = real[order[:len(real) // 2][:256]], real[order[len(real) // 2:]]
        ref, _, _ = _nearest(query, gallery, cfg)
        out.update(reference=float(ref.mean()), reference_n_query=len(query), reference_n_gallery=len(gallery))
    out.update(search=search, protocol=PROTOCOL)
    return out, values, index


def diversity_figures(fake: np.ndarray, real: np.ndarray, n_pairs: int, cfg: EvalConfig) -> dict | None:
    """MS-SSIM among generated images (lower = more diverse), the same among real images as the reference."""
    from .metrics.msssim import diversity

    if len(fake) < 2:
        return None
    out = diversity(fake, n_pairs, cfg.seed, cfg.n_boot)
    out["n_fake"] = out.pop("n_images")
    if len(real) >= 2:
        ref = diversity(real, n_pairs, cfg.seed, cfg.n_boot)
        out.update(reference=ref["value"], reference_ci95=ref["ci95"], reference_n_pairs=ref["n_pairs"],
                   n_real=ref["n_images"])
    else:
        out.update(reference=None, reference_ci95=None, reference_n_pairs=0, n_real=len(real))
    return out


def feature_figures(f_fake: np.ndarray, f_real: np.ndarray, protocol: str, cfg: EvalConfig) -> dict[str, Any]:
    """FID, KID and precision/recall/density/coverage of features (N, D) and (M, D), each {"value", "ci95",
    "reference" (two random halves of the real set), "n_fake", "n_real"}; a figure the counts cannot carry is None."""
    from .metrics.fid import FeatureStats, feature_scores
    from .metrics.intervals import fid_interval, kid_interval, prdc_intervals
    from .metrics.prdc import prdc_scores

    n = {"n_fake": len(f_fake), "n_real": len(f_real)}
    out: dict[str, Any] = dict.fromkeys(("fid", "kid", "precision", "recall", "density", "coverage"))
    if min(len(f_fake), len(f_real)) < 2:
        return out
    scores = feature_scores(FeatureStats.from_features(f_fake, protocol), FeatureStats.from_features(f_real, protocol),
                            seed=cfg.seed)
    fid_boot = cfg.n_boot if f_fake.shape[1] <= 512 else max(20, cfg.n_boot // 10)  # 2048-d square roots are slow
    out["fid"] = {"value": scores["fid"], "ci95": fid_interval(f_fake, f_real, fid_boot, cfg.seed),
                  "ci_resamples": fid_boot, "reference": scores["fid_real_halves"], **n}
    out["kid"] = {"value": scores["kid"], "std": scores["kid_std"],
                  "ci95": kid_interval(f_fake, f_real, cfg.n_boot, cfg.seed), "reference": scores["kid_real_halves"], **n}
    if min(len(f_fake), len(f_real)) > cfg.prdc_k:
        halves = None
        if len(f_real) // 2 > cfg.prdc_k:
            order = np.random.default_rng(cfg.seed).permutation(len(f_real))
            half = len(f_real) // 2
            halves = prdc_scores(f_real[order[:half]], f_real[order[half:]], cfg.prdc_k)
        for name, fig in prdc_intervals(f_real, f_fake, cfg.prdc_k, cfg.n_boot, cfg.seed).items():
            out[name] = {**fig, "reference": halves[name] if halves else None, "k": cfg.prdc_k, **n}
    return out


def set_figures(fake: np.ndarray, real: np.ndarray, f_fake: np.ndarray, f_real: np.ndarray, protocol: str,
                cfg: EvalConfig, pairs: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Every quality and diversity figure of one generated set against one real set → (figures, nearest-real
    SSIM (N,), nearest-real index (N,))."""
    ssim, values, index = ssim_figures(fake, real, cfg)
    return ({"ssim": ssim, "ms_ssim": diversity_figures(fake, real, pairs, cfg),
             **feature_figures(f_fake, f_real, protocol, cfg)}, values, index)


# ---------------------------------------------------------------- privacy

def _image_key(image: np.ndarray) -> bytes:
    return hashlib.sha256(np.round(image * 65535).astype(np.uint16).tobytes()).digest()


def heldout_split(real: Images, train: Images, seed: int) -> tuple[np.ndarray, np.ndarray, str, str]:
    """Real images that are not training images, to set the copy threshold → ("heldout" mask over real or over
    train, "gallery" mask over train, which set the held-out mask is over ("real" | "train"), how it was chosen).

    The held-out images are the --real images not found (pixel for pixel) in --train; when fewer than 10
    remain, --train itself is split by group (20 %) and its held-out part is compared with the rest."""
    keys = {_image_key(im) for im in train.images}
    novel = np.array([_image_key(im) not in keys for im in real.images])
    if novel.sum() >= MIN_HELDOUT:
        return novel, np.ones(len(train.images), bool), "real", f"{int(novel.sum())} --real images not in --train"
    rest, held = split(train.data, 0.2, seed)
    if len(held) == 0:
        raise DataError(f"--train: {len(train.images)} image(s) in one group and --real holds "
                        f"{int(novel.sum())} images that are not training images; the copy threshold needs "
                        f"at least {MIN_HELDOUT} real images the model was not trained on")
    mask = np.zeros(len(train.images), bool)
    mask[held] = True
    return mask, ~mask, "train", (f"{len(held)} --train images held out by group and compared with the other "
                                  f"{len(rest)} (--real holds only {int(novel.sum())} images not in --train)")


def audit_copies(generated: np.ndarray, train: np.ndarray, heldout: np.ndarray, gallery: np.ndarray | None = None,
                 quantile: float = 0.99) -> tuple[dict, np.ndarray, np.ndarray]:
    """`memorization_report` (same keys, same figures: a test pins it), keeping every generated image's nearest NCC.

    generated (N, H, W), train (M, H, W), heldout (K, H, W) float in [0, 1]; the threshold is the `quantile` of
    the nearest NCC of heldout against `gallery` (default: train) → (report, NCC (N,), nearest train index (N,)).
    One NCC search of the generated set serves the figures, the closest pairs and the screen."""
    from .metrics.memorization import copy_threshold, nearest_ncc, protocol

    threshold, held = copy_threshold(heldout, train if gallery is None else gallery, quantile)
    values, index = nearest_ncc(generated, train)
    flagged = np.flatnonzero(values >= threshold)
    flagged = flagged[np.argsort(-values[flagged], kind="stable")]
    report = {"heldout_ncc_median": float(np.median(held)), "flagged_share": len(flagged) / len(values),
              "n_flagged": int(len(flagged)), "train_copied_share": len(np.unique(index[flagged])) / len(train),
              "n_generated": len(values), "n_train": len(train), "threshold": float(threshold),
              "threshold_source": f"quantile {quantile} of nearest NCC of {len(held)} held-out real images",
              "nearest_ncc_median": float(np.median(values)),
              "pairs": [[int(i), int(index[i]), float(values[i])] for i in flagged],
              "protocol": protocol(2, 64, True)}
    return report, values, index


def screen_copies(generated: np.ndarray, train: np.ndarray, heldout: np.ndarray, gallery: np.ndarray | None = None,
                  quantile: float = 0.99) -> tuple[np.ndarray, float]:
    """Which generated images may be shared: generated (N, H, W), train (M, H, W), heldout (K, H, W) real images
    the model never saw, float in [0, 1] at one size → (keep (N,) bool: False for a flagged copy, the threshold;
    `gallery` as in `audit_copies`)."""
    report, values, _ = audit_copies(generated, train, heldout, gallery, quantile)
    return values < report["threshold"], report["threshold"]


def read_generated(folder: str, size: int | None = None) -> tuple[list[Path], np.ndarray]:
    """A folder of generated images (any readable format, searched recursively, grid.png left out) → the files
    and their images (N, S, S) float32 in [0, 1] (S: `size`, or the images' own size), one image (the first
    frame) per file, in the same order."""
    from .data.dataset import to_square

    size = size or native_size(folder)  # native_size also refuses a missing or empty folder
    files = [f for f in find_image_files(Path(folder))[0] if f.name not in SAMPLE_EXTRAS]
    return files, np.stack([to_square(read_file(f)[0][0], size) for f in files])


def screen_folder(fake: str, train: str, real: str, size: int | None = None, label_depth: int = 1,
                  quantile: float = 0.99, cache_dir: str | Path | None = None
                  ) -> tuple[list[Path], list[Path], float, str]:
    """Which generated files may be shared: every file of `fake` against the training set `train`, the copy
    threshold set from real images the model never saw (see `heldout_split`) → (kept files, flagged files,
    the NCC threshold, how the held-out images were chosen). `size`: None compares at the generated size."""
    files, generated = read_generated(fake, size)
    size = generated.shape[-1]
    tr = load_images(train, "--train", size, label_depth, cache_dir)
    rl = load_images(real, "--real", size, label_depth, cache_dir)
    held, gallery, side, how = heldout_split(rl, tr, 0)
    source = rl if side == "real" else tr
    keep, threshold = screen_copies(generated, tr.images, source.images[held], tr.images[gallery], quantile)
    return ([f for f, k in zip(files, keep) if k], [f for f, k in zip(files, keep) if not k], threshold, how)


def feature_audit(f_fake: np.ndarray, f_train: np.ndarray, f_held: np.ndarray, f_gallery: np.ndarray,
                  protocol: str, quantile: float = 0.99) -> dict:
    """The same audit in feature space: cosine similarity of features standardised by the training set's mean
    and spread; threshold: the `quantile` of held-out real images' nearest similarity to the gallery."""
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6

    def unit(f: np.ndarray) -> np.ndarray:
        z = (np.asarray(f, np.float64) - mu) / sd
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)

    def nearest(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.concatenate([(unit(a[i:i + 1024]) @ unit(b).T).max(1) for i in range(0, len(a), 1024)])

    threshold = float(np.quantile(nearest(f_held, f_gallery), quantile))
    sims = nearest(f_fake, f_train)
    return {"flagged_share": float((sims >= threshold).mean()), "n_flagged": int((sims >= threshold).sum()),
            "threshold": threshold, "nearest_similarity_median": float(np.median(sims)),
            "protocol": f"cosine similarity of {protocol} features standardised by --train; threshold: quantile "
                        f"{quantile} of {len(f_held)} held-out real images' nearest similarity"}


def privacy_figures(fake: Images, train: Images, real: Images, feats: dict[str, np.ndarray], protocol: str,
                    cfg: EvalConfig) -> tuple[dict, np.ndarray, np.ndarray]:
    """The privacy audit of the generated set against --train → (figures, nearest NCC (N,), train index (N,))."""
    held, gallery, side, how = heldout_split(real, train, cfg.seed)
    source = real if side == "real" else train
    report, values, index = audit_copies(fake.images, train.images, source.images[held], train.images[gallery],
                                         cfg.copy_quantile)
    report["heldout"] = how
    report["feature_space"] = feature_audit(feats["fake"], feats["train"], feats[side][held], feats["train"][gallery],
                                            protocol, cfg.copy_quantile)
    return report, values, index


# ---------------------------------------------------------------- classes

def _classifier_inputs(sets: dict[str, Images], cfg: EvalConfig, feats: dict[str, np.ndarray],
                       extractor: Any) -> dict[str, np.ndarray]:
    """The classifier's features of each set: random-conv features (reused when they are the metric's) + thumbnail."""
    from .metrics.classifier import classifier_features
    from .metrics.features import RandConvFeatures

    same = isinstance(extractor, RandConvFeatures) and extractor.resolution == 64
    conv = extractor if same else RandConvFeatures(64)
    return {k: classifier_features(s.images, feats[k] if same else conv(s.images)) for k, s in sets.items()}


def _labels_in(fake: Images, names: tuple[str, ...]) -> np.ndarray:
    """The generated images' labels as indices into another set's class names."""
    return np.array([names.index(fake.class_names[k]) for k in fake.labels], np.int64)


def _heldout_mask(images: Images, cfg: EvalConfig) -> np.ndarray:
    _, held = split(images.data, cfg.heldout_fraction, cfg.seed)
    mask = np.zeros(len(images.labels), bool)
    mask[held] = True
    return mask


def consistency_figures(fake: Images, lab: Images, flag: str, x: dict[str, np.ndarray], lab_key: str,
                        cfg: EvalConfig) -> dict:
    """Accuracy per requested class of a classifier fitted on the labelled real set `lab` (--train or --real)."""
    from .metrics.classifier import class_consistency

    out = class_consistency(x[lab_key], lab.labels, x["fake"], _labels_in(fake, lab.class_names), lab.class_names,
                            _heldout_mask(lab, cfg), cfg.seed, cfg.n_boot)
    out["labelled_set"] = flag
    return out


def utility_figures(fake: Images, real: Images, x: dict[str, np.ndarray], cfg: EvalConfig) -> dict:
    """Train-on-real, train-on-synthetic and train-on-both, each tested on held-out real images."""
    from .metrics.classifier import utility_study

    out = utility_study(x["real"], real.labels, _heldout_mask(real, cfg), x["fake"],
                        _labels_in(fake, real.class_names), real.class_names, cfg.seed, cfg.n_boot)
    out["split"] = (f"--real split by group (meddiff.data.dataset.split), {cfg.heldout_fraction:g} held out, "
                    f"seed {cfg.seed}")
    return out


def per_class_figures(fake: Images, real: Images, feats: dict[str, np.ndarray], protocol: str,
                      cfg: EvalConfig) -> dict[str, dict]:
    """set_figures for each generated class against the real images of that class."""
    out = {}
    for name in fake.class_names:
        mf, mr = fake.mask(name), real.mask(name)
        if not mr.any():
            out[name] = {"n_fake": int(mf.sum()), "n_real": 0}
            continue
        figs, _, _ = set_figures(fake.images[mf], real.images[mr], feats["fake"][mf], feats["real"][mr], protocol,
                                 cfg, cfg.class_diversity_pairs)
        out[name] = {"n_fake": int(mf.sum()), "n_real": int(mr.sum()), **figs}
    return out


# ---------------------------------------------------------------- the whole evaluation

class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.t = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self.t, 3)
        self.t = now


def _features(sets: dict[str, Images], cfg: EvalConfig) -> tuple[Any, dict[str, np.ndarray]]:
    """The metric's extractor and each set's features; real and train statistics cached per set and protocol."""
    from .metrics.features import get_extractor
    from .metrics.fid import cached_stats, compute_stats

    extractor = get_extractor(cfg.features, cfg.feature_resolution, cfg.inception_weights)
    cache = Path(cfg.cache_dir) / "features" if cfg.cache_dir else None
    feats = {}
    for key, s in sets.items():
        if len(s.images) < 2:
            feats[key] = extractor(s.images)
            continue
        cacheable = cache is not None and key != "fake"   # generated sets change with every model
        stats = cached_stats(s.images, extractor, cache) if cacheable else compute_stats(s.images, extractor)
        feats[key] = stats.features
    return extractor, feats


def evaluate(cfg: EvalConfig) -> Evaluation:
    """Every figure of `meddiff evaluate` (see docs/evaluation.md) → an Evaluation (results JSON-ready)."""
    from .metrics.msssim import n_scales, protocol as msssim_protocol
    from .metrics.ssim import PROTOCOL as SSIM_PROTOCOL

    if cfg.n_boot < 10:
        raise ConfigError(f"bootstrap resamples: {cfg.n_boot}; allowed: 10 or more")
    clock = _Clock()
    size = cfg.size or native_size(cfg.fake)
    real, fake, train = load_sets(cfg, size)
    sets = {"real": real, "fake": fake, **({"train": train} if train is not None else {})}
    clock("load")
    extractor, feats = _features(sets, cfg)
    clock("features")
    figs, ssim_values, ssim_index = set_figures(fake.images, real.images, feats["fake"], feats["real"],
                                                extractor.protocol, cfg, cfg.diversity_pairs)
    clock("overall")
    res: dict[str, Any] = {
        "size": size, "seed": cfg.seed,
        "counts": {k: len(s.images) for k, s in sets.items()} | {f"{k}_classes": s.counts() for k, s in sets.items()},
        "protocol": {"features": extractor.protocol, "ssim": SSIM_PROTOCOL,
                     "ms_ssim": msssim_protocol(n_scales(size, size)),
                     "intervals": f"95 % percentile bootstrap over images, {cfg.n_boot} resamples, seed {cfg.seed}"},
        **figs, "per_class": None, "class_consistency": None, "utility": None, "privacy": None}
    ev = Evaluation(res, real, fake, train, ssim_index, ssim_values)
    if fake.labelled:
        res["per_class"] = per_class_figures(fake, real, feats, extractor.protocol, cfg)
        clock("per_class")
    if fake.labelled or cfg.utility:
        use_train = train is not None and train.labelled
        x = _classifier_inputs(sets, cfg, feats, extractor)
        if fake.labelled:
            lab, flag, key = (train, "--train", "train") if use_train else (real, "--real", "real")
            if len(lab.class_names) > 1:
                res["class_consistency"] = consistency_figures(fake, lab, flag, x, key, cfg)
        if cfg.utility:
            res["utility"] = utility_figures(fake, real, x, cfg)
        clock("classifier")
    if train is not None:
        res["privacy"], ev.nearest_train_ncc, ev.nearest_train = privacy_figures(fake, train, real, feats,
                                                                                 extractor.protocol, cfg)
        clock("privacy")
    res["seconds"] = ev.seconds = clock.seconds
    return ev


def evaluate_ssim(real: str, fake: str, size: int | None = None, seed: int = 0,
                  cache_dir: str | Path | None = None) -> dict[str, Any]:
    """SSIM of each generated image against its most similar real image (see meddiff.metrics.ssim)."""
    from .metrics.ssim import ssim_report

    size = size or native_size(fake)
    fake_images = images01(fake, size, None)
    real_images = images01(real, size, cache_dir)
    report = ssim_report(fake_images, real_images, seed=seed)
    report["size"] = size
    return report
