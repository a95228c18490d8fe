"""Real, generated and training image sets (folders or builtin:…) → the figures of `meddiff evaluate` as typed
records (`Results`, `to_json()` for the JSON): SSIM, MS-SSIM diversity, FID/KID and PRDC with intervals and counts,
per class, class consistency, utility, mask adherence (generated images with the label maps they were asked for),
and the privacy audit (meddiff.audit). Sets are loaded by meddiff.imagesets;
each figure is computed in meddiff.metrics, and this module only composes them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .audit import Privacy, check_split, privacy_figures
from .data.dataset import lesion_value, named_values, split
from .errors import ConfigError
from .imagesets import LabelledImages, check_class_folders, images01, load_images, native_size
from .metrics.classifier import class_consistency, classifier_features, utility_study
from .metrics.features import RandConvFeatures, get_extractor
from .metrics.fid import FeatureStats, cached_stats, compute_stats, feature_scores
from .metrics.figure import Figure, json_or_none
from .metrics.intervals import fid_interval, kid_interval, prdc_intervals
from .metrics.msssim import diversity_figure, n_scales
from .metrics.msssim import protocol as msssim_protocol
from .metrics.prdc import prdc_scores
from .metrics.ssim import PROTOCOL as SSIM_PROTOCOL
from .metrics.ssim import ssim_figure


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
    adherence: bool = False                # --fake holds images/ + masks/: Dice of a segmenter against the maps
    segmenter_steps: int = 600
    heldout_fraction: float = 0.3          # real images held out (by group) for the classifier's test
    heldout_split: str = "group"           # how images are held out: by "group", or in "contiguous" runs
    seed: int = 0
    n_boot: int = 200
    prdc_k: int = 5
    ssim_shortlist: int = 32
    diversity_pairs: int = 500
    class_diversity_pairs: int = 200
    copy_quantile: float = 0.99
    cache_dir: str | None = None           # the data cache; feature statistics go to <cache_dir>/features

    def __post_init__(self) -> None:
        check_split(self.heldout_split)


# Every figure of a generated set against a real set, in report order: name → (label, how it reads). Image-space
# figures compare pixels (SSIM); feature-space ones compare the metric's features (`feature_figures`).
IMAGE_FIGURES: dict[str, tuple[str, str]] = {
    "ssim": ("SSIM to the nearest real image", "higher is closer to real; copies score 1"),
    "ms_ssim": ("MS-SSIM among images (diversity)", "lower is more diverse; reference: among real images"),
}
FEATURE_FIGURES: dict[str, tuple[str, str]] = {
    "fid": ("FID", "lower is better"),
    "kid": ("KID", "lower is better"),
    "precision": ("Precision", "fidelity: share of generated images inside the real manifold"),
    "recall": ("Recall", "diversity: share of real images inside the generated manifold"),
    "density": ("Density", "fidelity, robust to outliers (1 for matching sets)"),
    "coverage": ("Coverage", "diversity, robust to outliers"),
}
FIGURES: dict[str, tuple[str, str]] = {**IMAGE_FIGURES, **FEATURE_FIGURES}


@dataclass
class SetFigures:
    """The figures (FIGURES) of one generated set against one real set; a figure the counts cannot carry is None
    or absent."""

    n_fake: int
    n_real: int
    figures: dict[str, Figure | None] = field(default_factory=dict)

    def get(self, name: str) -> Figure | None:
        """The figure called `name` ("ssim", "fid", …); a KeyError for a name not in FIGURES."""
        if name not in FIGURES:
            raise KeyError(f"{name!r}: not a figure; choose from {', '.join(FIGURES)}")
        return self.figures.get(name)

    def figures_json(self) -> dict[str, Any]:
        """{"ssim": {...} | None, "ms_ssim": …, …}: every figure, without the counts."""
        return {name: json_or_none(self.figures.get(name)) for name in FIGURES}


@dataclass
class Results:
    """Every figure of one evaluation. class_consistency and utility are the JSON-ready dicts of
    meddiff.metrics.classifier."""

    size: int
    seed: int
    counts: dict[str, Any]
    protocol: dict[str, str]
    overall: SetFigures
    per_class: dict[str, SetFigures] | None = None
    class_consistency: dict[str, Any] | None = None
    utility: dict[str, Any] | None = None
    adherence: dict[str, Any] | None = None
    privacy: Privacy | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON of `meddiff evaluate --json`."""
        per_class = None if self.per_class is None else {
            name: {"n_fake": s.n_fake, "n_real": s.n_real, **s.figures_json()} for name, s in self.per_class.items()}
        return {"size": self.size, "seed": self.seed, "counts": self.counts, "protocol": self.protocol,
                **self.overall.figures_json(), "per_class": per_class, "class_consistency": self.class_consistency,
                "utility": self.utility, "adherence": self.adherence,
                "privacy": None if self.privacy is None else self.privacy.to_json(), "seconds": self.seconds}


@dataclass
class Evaluation:
    """The figures and what the report draws from: the sets and each generated image's nearest real image."""

    figures: Results
    real: LabelledImages
    fake: LabelledImages
    train: LabelledImages | None = None
    nearest_real: np.ndarray | None = None        # (N,) index in real of each generated image's nearest by SSIM
    nearest_real_ssim: np.ndarray | None = None   # (N,) that SSIM

    @property
    def results(self) -> dict[str, Any]:
        """The figures as JSON (`Results.to_json`)."""
        return self.figures.to_json()


# ---------------------------------------------------------------- loading

def load_sets(cfg: EvalConfig, size: int) -> tuple[LabelledImages, LabelledImages, LabelledImages | None]:
    """(real, fake, train or None), class folders checked: every generated class must be a real (and training) class."""
    real = load_images(cfg.real, "--real", size, cfg.label_depth or 1, cfg.cache_dir)
    depth = cfg.label_depth or (real.depth() if real.labelled else 1)
    fake = load_images(cfg.fake, "--fake", size, depth, None)
    check_class_folders(fake, real, "--real")
    if cfg.utility and (len(real.class_names) < 2 or not real.labelled):
        raise ConfigError(f"--utility: --real {cfg.real!r} has {len(real.class_names) if real.labelled else 0} "
                          "class folder(s); the classifier needs 2 or more")
    if cfg.utility and not fake.labelled:
        raise ConfigError(f"--utility: --fake {cfg.fake!r} has no class folders; sample with --per-class")
    train = None
    if cfg.train is not None:
        train = load_images(cfg.train, "--train", size, depth, cfg.cache_dir)
        if train.labelled:
            check_class_folders(fake, train, "--train")
    return real, fake, train


# ---------------------------------------------------------------- quality and diversity

def feature_figures(f_fake: np.ndarray, f_real: np.ndarray, protocol: str, cfg: EvalConfig) -> dict[str, Figure | None]:
    """FID, KID and precision/recall/density/coverage of features (N, D) and (M, D), each with its interval and the
    reference of two random halves of the real set; a figure the counts cannot carry is None."""
    n = {"n_fake": len(f_fake), "n_real": len(f_real)}
    out: dict[str, Figure | None] = dict.fromkeys(FEATURE_FIGURES)
    if min(len(f_fake), len(f_real)) < 2:
        return out
    scores = feature_scores(FeatureStats.from_features(f_fake, protocol), FeatureStats.from_features(f_real, protocol),
                            seed=cfg.seed)
    fid_boot = cfg.n_boot if f_fake.shape[1] <= 512 else max(20, cfg.n_boot // 10)  # 2048-d square roots are slow
    out["fid"] = Figure(scores["fid"], tuple(fid_interval(f_fake, f_real, fid_boot, cfg.seed)),
                        scores["fid_real_halves"], n, protocol, {"ci_resamples": fid_boot})
    out["kid"] = Figure(scores["kid"], tuple(kid_interval(f_fake, f_real, cfg.n_boot, cfg.seed)),
                        scores["kid_real_halves"], n, protocol, {"std": scores["kid_std"]})
    if min(len(f_fake), len(f_real)) > cfg.prdc_k:
        halves = None
        if len(f_real) // 2 > cfg.prdc_k:
            order = np.random.default_rng(cfg.seed).permutation(len(f_real))
            half = len(f_real) // 2
            halves = prdc_scores(f_real[order[:half]], f_real[order[half:]], cfg.prdc_k)
        for name, fig in prdc_intervals(f_real, f_fake, cfg.prdc_k, cfg.n_boot, cfg.seed).items():
            out[name] = Figure(fig["value"], tuple(fig["ci95"]), halves[name] if halves else None, n, protocol,
                               {"k": cfg.prdc_k})
    return out


def set_figures(fake: np.ndarray, real: np.ndarray, f_fake: np.ndarray, f_real: np.ndarray, protocol: str,
                cfg: EvalConfig, pairs: int) -> tuple[SetFigures, np.ndarray, np.ndarray]:
    """Every quality and diversity figure of one generated set against one real set → (figures, nearest-real
    SSIM (N,), nearest-real index (N,))."""
    ssim, values, index = ssim_figure(fake, real, cfg.seed, cfg.n_boot, cfg.ssim_shortlist)
    figs = SetFigures(len(fake), len(real), {"ssim": ssim,
                                             "ms_ssim": diversity_figure(fake, real, pairs, cfg.seed, cfg.n_boot),
                                             **feature_figures(f_fake, f_real, protocol, cfg)})
    return figs, values, index


# ---------------------------------------------------------------- classes

def _classifier_inputs(sets: dict[str, LabelledImages], cfg: EvalConfig, feats: dict[str, np.ndarray],
                       extractor: Any) -> dict[str, np.ndarray]:
    """The classifier's features of each set: random-conv features (reused when they are the metric's) + thumbnail."""
    same = isinstance(extractor, RandConvFeatures) and extractor.resolution == 64
    conv = extractor if same else RandConvFeatures(64)
    return {k: classifier_features(s.images, feats[k] if same else conv(s.images)) for k, s in sets.items()}


def _labels_in(fake: LabelledImages, names: tuple[str, ...]) -> np.ndarray:
    """The generated images' labels as indices into another set's class names."""
    return np.array([names.index(fake.class_names[k]) for k in fake.labels], np.int64)


def _heldout_masks(images: LabelledImages, cfg: EvalConfig) -> tuple[np.ndarray, np.ndarray]:
    """(used, held): boolean masks over the images, the images on either side of the split and the held-out
    ones; a contiguous split's guard band is in neither."""
    kept, held = split(images.data, cfg.heldout_fraction, cfg.seed, cfg.heldout_split)
    used, mask = np.zeros(len(images.labels), bool), np.zeros(len(images.labels), bool)
    used[kept], used[held], mask[held] = True, True, True
    return used, mask


def consistency_figures(fake: LabelledImages, lab: LabelledImages, flag: str, x: dict[str, np.ndarray], lab_key: str,
                        cfg: EvalConfig) -> dict:
    """Accuracy per requested class of a classifier fitted on the labelled real set `lab` (--train or --real)."""
    used, held = _heldout_masks(lab, cfg)
    out = class_consistency(x[lab_key][used], lab.labels[used], x["fake"], _labels_in(fake, lab.class_names),
                            lab.class_names, held[used], cfg.seed, cfg.n_boot)
    out["labelled_set"] = flag
    return out


def utility_figures(fake: LabelledImages, real: LabelledImages, x: dict[str, np.ndarray], cfg: EvalConfig) -> dict:
    """Train-on-real, train-on-synthetic and train-on-both, each tested on held-out real images."""
    used, held = _heldout_masks(real, cfg)
    out = utility_study(x["real"][used], real.labels[used], held[used], x["fake"],
                        _labels_in(fake, real.class_names), real.class_names, cfg.seed, cfg.n_boot)
    how = "by group" if cfg.heldout_split == "group" else "in runs of consecutive images"
    out["split"] = (f"--real split {how} (meddiff.data.dataset.split), {cfg.heldout_fraction:g} held out, "
                    f"seed {cfg.seed}")
    return out


def per_class_figures(fake: LabelledImages, real: LabelledImages, feats: dict[str, np.ndarray], protocol: str,
                      cfg: EvalConfig) -> dict[str, SetFigures]:
    """set_figures for each generated class against the real images of that class."""
    out = {}
    for name in fake.class_names:
        mf, mr = fake.mask(name), real.mask(name)
        if not mr.any():
            out[name] = SetFigures(int(mf.sum()), 0)
            continue
        out[name], _, _ = set_figures(fake.images[mf], real.images[mr], feats["fake"][mf], feats["real"][mr],
                                      protocol, cfg, cfg.class_diversity_pairs)
    return out


# ---------------------------------------------------------------- label maps

def _lesion_maps(images: LabelledImages, value: int | None = None) -> np.ndarray:
    """(N, S, S) bool: where a set's label maps hold the lesion: label `value`, or (None) any non-zero label."""
    maps = images.data.take_masks(np.arange(len(images.labels)))[:, 0].numpy()
    return maps > 0 if value is None else maps == value


def _lesion_value(*sets: LabelledImages | None) -> int | None:
    """The label value the real sets name "lesion" (`builtin:phantoms?masks=2` maps hold anatomy beside it), or
    None: a set whose values are unnamed (a folder of label images) counts every label as lesion."""
    found = [lesion_value(named_values(s.data.summary)) for s in sets if s is not None]
    return next((v for v in found if v is not None), None)


def _groups(images: LabelledImages) -> list[str]:
    return [images.class_names[k] for k in images.labels]


def check_adherence_sets(fake: LabelledImages, real: LabelledImages, train: LabelledImages | None,
                         cfg: EvalConfig) -> None:
    """--adherence needs the generated images' requested maps and real pairs to fit the segmenter on."""
    if not fake.data.has_masks:
        raise ConfigError(f"--adherence: --fake {cfg.fake!r} has no label maps; sample with --masks (it writes "
                          "images/ + masks/) and evaluate that folder")
    if not real.data.has_masks and not (train is not None and train.data.has_masks):
        raise ConfigError(f"--adherence: neither --real {cfg.real!r} nor --train has label maps; give a folder of "
                          "images/ + masks/ or builtin:phantoms?masks=1")


def adherence_study(fake: LabelledImages, real: LabelledImages, train: LabelledImages | None,
                    cfg: EvalConfig) -> dict[str, Any]:
    """Mask adherence of generated images with the maps they were asked for (--fake as `meddiff sample --masks`
    writes it: images/ + masks/): a segmenter (meddiff.metrics.segmentation) fitted on the labelled real pairs
    (--train's where it has maps, else --real's outside its held-out part) segments them; Dice against the
    requested maps per class and overall, beside its Dice on real images it did not fit (--real, or --real's
    held-out part): the ceiling a perfect generator reaches. The sets passed `check_adherence_sets` (evaluate
    checks them before computing anything)."""
    from .metrics.segmentation import PROTOCOL, WORK_SIZE, adherence_figures, to_work_size, train_segmenter

    lesion = _lesion_value(real, train)  # the generated maps follow the real ones' numbering
    if train is not None and train.data.has_masks:
        fit = (train.images, _lesion_maps(train, lesion))
        ref, ref_rows, fitted_on = real, np.arange(len(real.labels)), "--train"
        if not real.data.has_masks:  # no unseen real pairs: hold part of --train out for the ceiling
            used, held = _heldout_masks(train, cfg)
            fit = (train.images[used & ~held], fit[1][used & ~held])
            ref, ref_rows, fitted_on = train, np.flatnonzero(held), "--train (held-out part: the ceiling)"
    else:
        used, held = _heldout_masks(real, cfg)
        fit_rows = used & ~held
        fit, ref, ref_rows, fitted_on = ((real.images[fit_rows], _lesion_maps(real, lesion)[fit_rows]), real,
                                         np.flatnonzero(held), "--real (held-out part: the ceiling)")
    if not fit[1].any():
        raise ConfigError(f"--adherence: the label maps of {fitted_on.split()[0]} are all empty; the segmenter needs "
                          "images with a lesion")
    x, y = to_work_size(*fit)
    net = train_segmenter(x, y, cfg.segmenter_steps, seed=cfg.seed)
    gen, asked = to_work_size(fake.images, _lesion_maps(fake, lesion))
    real_x, real_y = to_work_size(ref.images[ref_rows], _lesion_maps(ref, lesion)[ref_rows])
    figures = adherence_figures(net, gen, asked, real_x, real_y, _groups(fake) if fake.labelled else None,
                                [_groups(ref)[i] for i in ref_rows] if ref.labelled else None,
                                seed=cfg.seed, n_boot=cfg.n_boot)
    return dict(figures=figures, fitted_on=fitted_on, n_fit=len(x), ceiling_images=len(real_x),
                lesion_label="any non-zero" if lesion is None else lesion,
                work_size=min(fake.images.shape[-1], WORK_SIZE), steps=cfg.segmenter_steps, protocol=PROTOCOL)


# ---------------------------------------------------------------- the whole evaluation

class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.t = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self.t, 3)
        self.t = now


def _features(sets: dict[str, LabelledImages], cfg: EvalConfig) -> tuple[Any, dict[str, np.ndarray]]:
    """The metric's extractor and each set's features; real and train statistics cached per set and protocol."""
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
    """Every figure of `meddiff evaluate` (see docs/evaluation.md) → an Evaluation."""
    if cfg.n_boot < 10:
        raise ConfigError(f"bootstrap resamples: {cfg.n_boot}; allowed: 10 or more")
    clock = _Clock()
    size = cfg.size or native_size(cfg.fake)
    real, fake, train = load_sets(cfg, size)
    if cfg.adherence:  # before any figure is computed
        check_adherence_sets(fake, real, train, cfg)
    sets = {"real": real, "fake": fake, **({"train": train} if train is not None else {})}
    clock("load")
    extractor, feats = _features(sets, cfg)
    clock("features")
    overall, ssim_values, ssim_index = set_figures(fake.images, real.images, feats["fake"], feats["real"],
                                                   extractor.protocol, cfg, cfg.diversity_pairs)
    clock("overall")
    res = Results(size, cfg.seed,
                  {k: len(s.images) for k, s in sets.items()} | {f"{k}_classes": s.counts() for k, s in sets.items()},
                  {"features": extractor.protocol, "ssim": SSIM_PROTOCOL,
                   "ms_ssim": msssim_protocol(n_scales(size, size)),
                   "intervals": f"95 % percentile bootstrap over images, {cfg.n_boot} resamples, seed {cfg.seed}"},
                  overall)
    if fake.labelled:
        res.per_class = per_class_figures(fake, real, feats, extractor.protocol, cfg)
        clock("per_class")
    if fake.labelled or cfg.utility:
        use_train = train is not None and train.labelled
        x = _classifier_inputs(sets, cfg, feats, extractor)
        if fake.labelled:
            lab, flag, key = (train, "--train", "train") if use_train else (real, "--real", "real")
            if len(lab.class_names) > 1:
                res.class_consistency = consistency_figures(fake, lab, flag, x, key, cfg)
        if cfg.utility:
            res.utility = utility_figures(fake, real, x, cfg)
        clock("classifier")
    if cfg.adherence:
        res.adherence = adherence_study(fake, real, train, cfg)
        clock("adherence")
    if train is not None:
        res.privacy = privacy_figures(fake, train, real, feats, extractor.protocol, cfg.copy_quantile, cfg.seed,
                                      cfg.heldout_split)
        clock("privacy")
    res.seconds = clock.seconds
    return Evaluation(res, real, fake, train, ssim_index, ssim_values)


def evaluate_ssim(real: str, fake: str, size: int | None = None, seed: int = 0,
                  cache_dir: str | Path | None = None) -> dict[str, Any]:
    """The SSIM figure (meddiff.metrics.ssim.ssim_figure, exhaustive search) under the seed project's keys:
    {"ssim_mean", "ssim_median", "ssim_ci95", "n_fake", "n_real", "band", "reference_real_halves",
    "reference_n_query", "reference_n_gallery", "protocol", "size"}."""
    size = size or native_size(fake)
    fig, _, _ = ssim_figure(images01(fake, size, None), images01(real, size, cache_dir), seed=seed)
    return {"ssim_mean": fig.value, "ssim_median": fig.details["median"], "ssim_ci95": list(fig.interval or ()),
            **fig.counts, "band": fig.details["band"], "reference_real_halves": fig.reference,
            "protocol": fig.protocol, "size": size}
