"""`meddiff demo`: built-in data → one class-conditional model → samples of every class, a grid with one row per
class, a short evaluation and the HTML report, all in one folder (DemoConfig in, DemoResult out).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlencode

from .atomic import check_out_dir, write_bytes, write_json
from .config import (DEFAULT_PRESET, GUIDANCE, IMAGES, MINUTES, PRESETS, RESAMPLES, SEEDS, STEP_COUNT, Checked,
                     SampleConfig, TrainConfig, device_option, option)
from .errors import ConfigError, RunError

if TYPE_CHECKING:  # the heavy modules load when the demo runs, not when the CLI builds its --help
    from .evaluate import Evaluation, Results
    from .metrics.figure import Figure
    from .train import TrainResult

# Sizes and time estimates, measured on a 2-core AVX2 CPU that other processes kept busy (load 4-6):
DEMO_DATA = "builtin:phantoms?n=800"   # MedPhantom-4, 100 a class: with the 400 held-out ones ~20 s to render, once
REAL_MAX = 400           # held-out real phantoms the samples are compared with
SAMPLE_SECONDS = 2.0     # a guided 64 px `lean` image, UniPC 10 steps: 1.5 s measured
EVAL_SECONDS = 60.0      # evaluation + report of 48 samples at 64 px: 25 s measured (140 s when BLAS threads contend)
MIN_TRAIN_MINUTES = 0.5
# A fixed amount of work, so that the picture does not depend on the machine's speed or load (issue 19: a busy
# 2-core machine trained 268 steps in the time budget instead of ~2,700 and showed blobs, 48 % class consistency).
# 3,000 steps of 8 images: the Zen 5 demo reached 75 % class consistency (real 85 %) after 2,744, and the
# conditional benchmark 91.7 % after 5,261 (docs/history.md). About 8 min of training on a 2-core Zen 5 (bf16),
# about 45 on an older 2-core AVX2 CPU (9.4 img/s); DEMO_MINUTES is only a safety stop above that.
DEMO_STEPS = 3000
DEMO_MINUTES = 60.0


@dataclass(frozen=True)
class DemoConfig(Checked):
    """Everything `meddiff demo` needs; checked on construction. Training runs `max_steps` steps: the same work,
    and so the same result, on any machine. `minutes` is only a safety stop for the whole demo: training stops
    early when what preparing the data and an estimate of sampling and evaluation (SAMPLE_SECONDS a sample,
    EVAL_SECONDS) leave of it runs out, and the demo then says that its samples come from an under-trained model."""

    out: str = option("demo", "the folder the demo writes into")
    data: str = option(DEMO_DATA, "training data with 2 or more classes; MedPhantom-4, the default, holds CT, "
                       "X-ray, MRI and ultrasound, each normal and abnormal")
    real: str | None = option(None, "real images to evaluate against (default: the built-in set rendered with the "
                              "next seed, at most 400 images the model never saw)")
    minutes: float = option(DEMO_MINUTES, "safety stop for the whole demo: training stops early when what data, "
                            "sampling and evaluation leave of it runs out, and the demo says the model is "
                            "under-trained", bounds=MINUTES)
    max_steps: int = option(DEMO_STEPS, "training steps: a fixed amount of work, so a slower or busier machine "
                            "takes longer instead of drawing a worse model", bounds=STEP_COUNT)
    preset: str = option(DEFAULT_PRESET, "architecture + recipe", choices=PRESETS)
    per_class: int = option(6, "samples of each class: one grid row", bounds=IMAGES)
    guidance: float = option(2.0, "classifier-free guidance scale (1 = none)", bounds=GUIDANCE)
    n_boot: int = option(100, "bootstrap resamples of the evaluation's intervals", bounds=RESAMPLES, cli=False)
    seed: int = option(0, "seed of training and sampling", bounds=SEEDS)
    device: str = device_option()
    cache_dir: str | None = option(None, "image and feature cache")
    progress: bool = option(True, "no progress bar")


@dataclass
class DemoResult:
    """What the demo made: the training result, the evaluation (figures in `evaluation.figures`), the files."""

    train: TrainResult
    evaluation: Evaluation
    grid: Path
    samples: Path
    report: Path
    figures: Path
    seconds: float
    warning: str | None = None       # set when the --minutes safety stop ended training before max_steps


def heldout_spec(data: str) -> str:
    """Real images the model never saw, for the evaluation: a MedPhantom-4 spec rendered with the next seed (at
    most REAL_MAX images); any other data set is compared with itself."""
    from .data.dataset import parse_spec

    kind, name, params = parse_spec(data)
    if kind != "builtin" or name == "mni-mri":
        return data
    n = min(int(params["n"]), REAL_MAX) if "n" in params else REAL_MAX
    return f"builtin:{name}?" + urlencode({**params, "n": n, "seed": int(params.get("seed", 0)) + 1})


def train_minutes(cfg: DemoConfig, n_samples: int, spent_s: float) -> float:
    """The training time the safety limit leaves after `spent_s` seconds of preparation and the estimated
    sampling of `n_samples` images and evaluation; a limit that leaves under MIN_TRAIN_MINUTES is refused."""
    after = (n_samples * SAMPLE_SECONDS + EVAL_SECONDS) / 60
    left = cfg.minutes - spent_s / 60 - after
    if left < MIN_TRAIN_MINUTES:
        need = spent_s / 60 + after + MIN_TRAIN_MINUTES
        raise ConfigError(f"--minutes {cfg.minutes:g}: too short; preparing the data took {spent_s / 60:.1f} min and "
                          f"sampling {n_samples} images and evaluating them take about {after:.1f} min, leaving "
                          f"{max(left, 0):.1f} min to train; give --minutes {need:.1f} or more, or fewer --per-class")
    return left


def _refuse_existing_run(cfg: DemoConfig) -> None:
    from .runfolder import has_record  # loads torch: not when the CLI builds its --help

    check_out_dir(cfg.out, "--out")
    if has_record(Path(cfg.out) / "run"):
        raise RunError(f"--out {cfg.out}: already holds a demo run; choose another --out or delete it")


def _check_grid_classes(cfg: DemoConfig, class_names: tuple[str, ...]) -> None:
    from .sample import GRID_MAX_IMAGES, GRID_ROW_MAX

    if len(class_names) < 2:
        raise ConfigError(f"--data {cfg.data}: {len(class_names)} class ({', '.join(class_names)}); the demo trains "
                          "a class-conditional model and needs 2 or more classes, e.g. builtin:phantoms")
    if cfg.per_class > GRID_ROW_MAX or cfg.per_class * len(class_names) > GRID_MAX_IMAGES:
        raise ConfigError(f"--per-class {cfg.per_class}: the grid holds at most {GRID_ROW_MAX} images a class and "
                          f"{GRID_MAX_IMAGES} in all ({len(class_names)} classes here); use meddiff sample for more")


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = print) -> DemoResult:
    """Prepare the data, train, sample cfg.per_class images of every class, evaluate them and write the report
    into cfg.out: run/, samples/ (class folders + manifest), grid.png, eval.json, report/index.html. A demo that
    fails before its run is saved leaves no empty cfg.out behind."""
    created = not Path(cfg.out).exists()
    try:
        return _run_demo(cfg, echo)
    except BaseException:
        if created and Path(cfg.out).is_dir() and not any(Path(cfg.out).iterdir()):
            Path(cfg.out).rmdir()
        raise


def _run_demo(cfg: DemoConfig, echo: Callable[[str], None]) -> DemoResult:
    from .data.dataset import load_data
    from .evaluate import EvalConfig, evaluate
    from .imagesets import load_images
    from .report import write_report
    from .sample import sample_to_folder
    from .train import train

    t0 = time.perf_counter()
    _refuse_existing_run(cfg)
    out = Path(cfg.out)
    run, samples = out / "run", out / "samples"
    real = cfg.real or heldout_spec(cfg.data)
    tcfg = TrainConfig(data=cfg.data, out=str(run), preset=cfg.preset, max_steps=cfg.max_steps, seed=cfg.seed,
                       device=cfg.device, cache_dir=cfg.cache_dir, progress=cfg.progress).resolve()
    echo(f"demo: preparing {cfg.data} (training) and {real} (evaluation) at {tcfg.size} px; rendered once, then cached")
    data = load_data(cfg.data, tcfg.size, cache_dir=cfg.cache_dir)
    _check_grid_classes(cfg, data.class_names)
    if real != cfg.data:  # now: inside the budget, into the cache the evaluation reads, and a wrong --real fails early
        load_images(real, "--real", tcfg.size, 1, cfg.cache_dir)
    n_samples = cfg.per_class * len(data.class_names)
    minutes = train_minutes(cfg, n_samples, time.perf_counter() - t0)
    echo(f"demo: training {cfg.preset} on {len(data)} images of {len(data.class_names)} classes for "
         f"{cfg.max_steps} steps (safety stop: {minutes:.1f} of the --minutes {cfg.minutes:g}) …")
    trained = train(dataclasses.replace(tcfg, max_minutes=minutes), data=data, echo=echo)
    if trained.stopped == "interrupted":  # Ctrl-C: the checkpoint is saved; sampling a half-trained model would mislead
        raise KeyboardInterrupt
    warning = safety_stop_warning(cfg, trained.steps, trained.stopped)
    if warning:
        echo(f"demo: WARNING: {warning}")
    echo(f"demo: sampling {cfg.per_class} image(s) of each class with guidance {cfg.guidance:g} …")
    sample_to_folder(SampleConfig(run=str(run), out=str(samples), per_class=cfg.per_class, guidance=cfg.guidance,
                                  seed=cfg.seed, device=cfg.device, progress=cfg.progress), echo=echo)
    grid = out / "grid.png"
    write_bytes(grid, (samples / "grid.png").read_bytes())
    echo(f"demo: evaluating the {n_samples} samples against {real} and, for copies, the training images …")
    ev = evaluate(EvalConfig(real=real, fake=str(samples), train=cfg.data, n_boot=cfg.n_boot, seed=cfg.seed,
                             cache_dir=cfg.cache_dir))
    figures = out / "eval.json"
    training = dict(steps=trained.steps, planned_steps=cfg.max_steps, minutes=trained.seconds / 60,
                    stopped=trained.stopped, warning=warning)
    write_json(figures, {**ev.results, "training": training})
    report = write_report(ev, out / "report", run_dir=run)
    return DemoResult(trained, ev, grid, samples, report, figures, time.perf_counter() - t0, warning)


def safety_stop_warning(cfg: DemoConfig, steps: int, stopped: str) -> str | None:
    """The demo's words when the --minutes safety stop, not the planned steps, ended training; else None."""
    if stopped != "max-minutes":
        return None
    return (f"stopped by the --minutes {cfg.minutes:g} safety limit after {steps} of {cfg.max_steps} steps: the "
            f"samples are from an under-trained model; give more --minutes to train all {cfg.max_steps}")


def _pct(fig: dict | None) -> str:
    return "n/a" if not fig or fig.get("value") is None else f"{100 * fig['value']:.0f} %"


def _fixed(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _value_and_reference(fig: Figure | None, digits: int) -> tuple[str, str]:
    return (_fixed(fig.value, digits), _fixed(fig.reference, digits)) if fig else ("n/a", "n/a")


def key_figures(results: Results) -> list[str]:
    """The demo's few figures of an evaluation as printable lines, each with its real-image reference: SSIM to
    the nearest real image, KID, class consistency (overall and per class), the share flagged as copies."""
    ssim, ssim_ref = _value_and_reference(results.overall.get("ssim"), 3)
    kid, kid_ref = _value_and_reference(results.overall.get("kid"), 4)
    cons, priv = results.class_consistency, results.privacy
    lines = [f"  SSIM to the nearest real image  {ssim:>7}   real vs real {ssim_ref}",
             f"  KID (lower is better)           {kid:>7}   real vs real {kid_ref}"]
    if cons:
        per = ", ".join(f"{name} {_pct(fig)}" for name, fig in cons["per_class"].items())
        lines.append(f"  class consistency               {_pct(cons):>7}   real held-out {_pct(cons.get('reference'))}"
                     f"; per class: {per}")
    if priv:
        cp = priv.copies
        lines.append(f"  flagged as training copies      {100 * cp.flagged_share:>5.1f} %   "
                     f"{cp.n_flagged} of {len(cp.nearest)} (NCC ≥ {cp.threshold:.3f})")
        if priv.warning:
            lines.append(f"  warning: {priv.warning}")
    return lines
