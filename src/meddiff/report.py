"""An Evaluation → the report: one self-contained HTML page (inline CSS; plots and pictures as base64 PNG), the
closest generated/training pairs as PNG files beside it, and the short text summary the CLI prints.

Nothing from an input file's metadata reaches the page: images are named by their index in their set.
"""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure as PlotFigure
from PIL import Image

from . import runfolder
from .atomic import write_text
from .audit import Privacy
from .errors import RunError
from .evaluate import FIGURES, Evaluation, Results, SetFigures
from .export import make_grid, save_png
from .metrics.figure import Figure

MAX_PAIRS = 32   # closest generated/training pairs saved as PNGs
SHOWN_PAIRS = 8  # of those, shown on the page
GRID = 16        # images per class grid
CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}.note{color:#666;font-size:.9em}
.flag{color:#b00;font-weight:bold}figure{display:inline-block;margin:.4em;vertical-align:top}
figcaption{font-size:.85em;color:#444;max-width:420px}img{image-rendering:pixelated}"""


# ---------------------------------------------------------------- text

def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}" if abs(value) >= 1000 or (value != 0 and abs(value) < 1e-3) else f"{value:.{digits}f}"


def _interval(interval: tuple[float, float] | list[float] | None) -> str:
    if interval is None:
        return ""
    lo, hi = interval
    return f"[{_num(lo)}, {_num(hi)}]"


def _ci(fig: dict | Figure | None) -> str:
    """The 95 % interval of a Figure or of a classifier figure ({"value", "ci95", ...})."""
    if isinstance(fig, Figure):
        return _interval(fig.interval)
    return _interval(fig.get("ci95")) if fig else ""


def summary_lines(results: Results) -> list[str]:
    """The figures of an evaluation as a few printable lines: value [95 % CI], real-vs-real reference, counts."""
    c = results.counts
    lines = [f"{c['fake']} generated vs {c['real']} real images at {results.size} px"
             + (f", {c['train']} training images" if "train" in c else "")
             + f"; features {results.protocol['features']}"]
    for key, (label, _) in FIGURES.items():
        fig = results.overall.get(key)
        if fig:
            lines.append(f"  {label:<34} {_num(fig.value):>8} {_ci(fig):<20} real-vs-real {_num(fig.reference)}")
    cons = results.class_consistency
    if cons:
        lines.append(f"  class consistency (accuracy)       {_num(cons['value']):>8} {_ci(cons):<20} "
                     f"real held-out {_num((cons.get('reference') or {}).get('value'))}")
    util = results.utility
    if util:
        parts = [f"{k} {_num(util[k]['accuracy']['value'])}" for k in ("real", "synthetic", "real+synthetic")
                 if "accuracy" in util[k]]
        lines.append(f"  utility: held-out real accuracy, trained on " + ", ".join(parts))
    adh = results.adherence
    if adh:
        lines.append("  mask adherence (lesion Dice against the requested maps; segmenter fitted on "
                     f"{adh['fitted_on']}):")
        for name, f in adh["figures"].items():
            gen, real = f["generated"], f["real"]
            lines.append(f"    {name:<32} {_num(gen['dice']):>8} {_interval(gen['dice_ci95']):<20} real images "
                         f"{_num(real['dice']) if real else 'n/a'} ({gen['images']} generated with a lesion)")
    if results.privacy:
        cp = results.privacy.copies
        lines.append(f"  privacy: {cp.n_flagged} of {len(cp.nearest)} generated images flagged as copies "
                     f"({100 * cp.flagged_share:.1f} %), {100 * cp.train_copied_share:.1f} % of training "
                     f"images copied; NCC threshold {cp.threshold:.3f} ({cp.threshold_source})")
        if results.privacy.warning:
            lines.append(f"  warning: {results.privacy.warning}")
    return lines


# ---------------------------------------------------------------- pictures

def _png_uri(image_u8: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image_u8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, caption: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    text = html.escape(caption)
    return f'<figure><img src="{uri}"{w} alt="{text}"><figcaption>{text}</figcaption></figure>'


def _grid(images: np.ndarray) -> np.ndarray:
    return make_grid(images[:GRID], ncols=min(len(images[:GRID]), 8))


def _upscale(image_u8: np.ndarray, min_height: int = 128) -> np.ndarray:
    k = max(1, math.ceil(min_height / image_u8.shape[0]))
    return np.kron(image_u8, np.ones((k, k), np.uint8)) if k > 1 else image_u8


def histogram_plot(real: np.ndarray, fake: np.ndarray) -> str:
    """Intensity histograms of real and generated images (all pixels, 64 bins, density) → a PNG data URI."""
    fig = PlotFigure(figsize=(6, 3.2))
    ax = fig.add_subplot()
    bins = np.linspace(0, 1, 65)
    for data, name in ((real, "real"), (fake, "generated")):
        ax.hist(data.ravel(), bins=bins, density=True, histtype="step", linewidth=1.6, label=f"{name} ({len(data)})")
    ax.set_yscale("log")
    ax.set_xlabel("intensity (0 = black, 1 = white)")
    ax.set_ylabel("density")
    ax.legend()
    return _figure_uri(fig)


def read_loss_log(run_dir: str | Path) -> dict[str, list[float]]:
    """A run's log → {"step", "loss", "val_step", "val_loss"}: the training loss and validation loss lines."""
    out: dict[str, list[float]] = {"step": [], "loss": [], "val_step": [], "val_loss": []}
    for rec in runfolder.read_log(run_dir):
        if "loss" in rec:
            out["step"].append(rec["step"])
            out["loss"].append(rec["loss"])
        if "val_loss" in rec:
            out["val_step"].append(rec["step"])
            out["val_loss"].append(rec["val_loss"])
    if not out["loss"]:
        raise RunError(f"--run {run_dir}: {runfolder.LOG_FILE} holds no loss lines yet")
    return out


def loss_plot(log: dict[str, list[float]]) -> str:
    """Training and validation loss against the step → a PNG data URI."""
    fig = PlotFigure(figsize=(6, 3.2))
    ax = fig.add_subplot()
    ax.plot(log["step"], log["loss"], label="training loss (mean of 10 steps)")
    if log["val_loss"]:
        ax.plot(log["val_step"], log["val_loss"], "o-", label="validation loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    return _figure_uri(fig)


def save_pairs(ev: Evaluation, out_dir: Path) -> list[tuple[str, str]]:
    """The generated images closest to a training image (by NCC) beside it, as PNGs in out_dir/pairs/ →
    [(data URI, caption)] of the first few, for the page."""
    if ev.train is None or ev.figures.privacy is None:
        return []
    copies = ev.figures.privacy.copies
    order = np.argsort(-copies.nearest, kind="stable")[:MAX_PAIRS]
    shown = []
    for rank, g in enumerate(order):
        t = int(copies.index[g])
        ncc = float(copies.nearest[g])
        pair = make_grid(np.stack([ev.fake.images[g], ev.train.images[t]]), ncols=2)
        save_png(pair, out_dir / "pairs" / f"{rank:02d}_generated{g}_train{t}.png")
        if rank < SHOWN_PAIRS:
            flag = "FLAGGED copy" if ncc >= copies.threshold else "below threshold"
            shown.append((_png_uri(_upscale(pair)), f"generated #{g} | training #{t}: NCC {ncc:.3f} ({flag})"))
    return shown


# ---------------------------------------------------------------- the page

def _cell(text: str, num: bool = False) -> str:
    return f'<td class="num">{html.escape(text)}</td>' if num else f"<td>{html.escape(text)}</td>"


def _table(head: list[str], rows: list[list[str]], num: tuple[int, ...] = ()) -> str:
    """An HTML table; columns `num` right-aligned."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(_cell(v, i in num) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def metrics_table(figs: SetFigures) -> str:
    """The metric rows of one set of figures: value, 95 % CI, the real-vs-real reference, image counts."""
    rows = []
    for key, (label, reads) in FIGURES.items():
        fig = figs.get(key)
        if not fig:
            continue
        counts = f"{fig.n_fake} / {fig.n_real}"
        if key == "ms_ssim":
            counts += f" ({fig.details['n_pairs']} / {fig.details['reference_n_pairs']} pairs)"
        rows.append([label, _num(fig.value), _ci(fig), _num(fig.reference), counts, reads])
    return _table(["metric", "generated", "95 % CI", "real vs real", "images (generated / real)", "reads"], rows,
                  num=(1, 2, 3, 4))


def _classes_section(res: Results) -> str:
    parts = []
    if res.per_class:
        cons = (res.class_consistency or {}).get("per_class", {})
        rows = []
        for name, f in res.per_class.items():
            def v(key: str) -> str:
                fig = f.get(key)
                return f"{_num(fig.value)} {_ci(fig)}" if fig else "n/a"

            def ref(key: str) -> str:
                fig = f.get(key)
                return _num(fig.reference if fig else None)
            acc = cons.get(name)
            rows.append([name, str(f.n_fake), str(f.n_real), v("ssim"), v("ms_ssim"), ref("ms_ssim"), v("fid"),
                         ref("fid"), v("precision"), v("recall"), f"{_num(acc['value'])} {_ci(acc)}" if acc else "n/a"])
        parts.append("<h2>Per class</h2>" + _table(
            ["class", "generated", "real", "SSIM", "MS-SSIM", "MS-SSIM real", "FID", "FID real halves", "precision",
             "recall", "class consistency"], rows, num=tuple(range(1, 11))))
    cons = res.class_consistency
    if cons:
        ref = cons.get("reference")
        parts.append(f"<p>Class consistency: a classifier ({html.escape(cons['classifier'])}) fitted on the "
                     f"{cons['n_labelled']} labelled images of {html.escape(cons['labelled_set'])} classifies every "
                     f"generated image; accuracy {_num(cons['value'])} {_ci(cons)} over {cons['n']} images"
                     + (f"; the same classifier on held-out real images: {_num(ref['value'])} {_ci(ref)} "
                        f"({ref['n']} images)" if ref else "") + ".</p>")
    util = res.utility
    if util:
        rows = []
        for k in ("real", "synthetic", "real+synthetic"):
            u = util[k]
            if "error" in u:
                rows.append([k, str(u["n_train"]), u["error"], "", "", ""])
                continue
            rows.append([k, str(u["n_train"]), _num(u["accuracy"]["value"]), _ci(u["accuracy"]),
                         _num(u["auc"]["value"]), _ci(u["auc"])])
        parts.append("<h2>Utility: train on synthetic, test on real</h2>" + _table(
            ["trained on", "training images", "accuracy", "95 % CI", "AUC", "95 % CI"], rows, num=(1, 2, 3, 4, 5))
            + f"<p class=note>Tested on {util['n_heldout']} held-out real images ({html.escape(util['split'])}); "
              f"classifier: {html.escape(util['classifier'])}.</p>")
    return "".join(parts)


def _adherence_section(adh: dict[str, Any] | None) -> str:
    if not adh:
        return ""
    rows = [[name, _num(f["generated"]["dice"]), _interval(f["generated"]["dice_ci95"]), str(f["generated"]["images"]),
             _num(f["real"]["dice"]) if f["real"] else "n/a", str(f["real"]["images"]) if f["real"] else "0"]
            for name, f in adh["figures"].items()]
    return ("<h2>Mask adherence: the lesion where the map asked for it</h2>" + _table(
        ["class", "Dice, generated vs requested map", "95 % CI", "images with a lesion", "Dice, real images",
         "real images with a lesion"], rows, num=(1, 2, 3, 4, 5))
        + f"<p class=note>A segmenter fitted on {adh['n_fit']} real pairs of {html.escape(adh['fitted_on'])} "
          f"({adh['steps']} steps at {adh['work_size']} px; {html.escape(adh['protocol'])}) segments every generated "
          f"image; its Dice on {adh['ceiling_images']} real images it did not fit is the ceiling.</p>")


def _privacy_section(privacy: Privacy | None, pairs: list[tuple[str, str]]) -> str:
    if privacy is None:
        return ""
    p, fs = privacy.copies, privacy.feature_space
    rows = [["generated images flagged as copies",
             f"{100 * p.flagged_share:.1f} % ({p.n_flagged} of {len(p.nearest)})"],
            ["training images copied", f"{100 * p.train_copied_share:.1f} % (of {p.n_train})"],
            ["copy threshold (NCC)", f"{p.threshold:.4f}"],
            ["how the threshold was set", f"{p.threshold_source}; held-out images: {privacy.heldout}"],
            ["median nearest NCC: generated / held-out real",
             f"{np.median(p.nearest):.3f} / {np.median(p.heldout):.3f}"],
            ["feature space: flagged", f"{100 * fs.flagged_share:.1f} % (threshold {fs.threshold:.4f})"],
            ["NCC protocol", p.protocol], ["feature-space protocol", fs.protocol]]
    figs = "".join(_img(uri, cap) for uri, cap in pairs)
    flagged = '<p class="flag">Some generated images copy training images.</p>' if p.n_flagged else ""
    flagged += _warning(privacy)
    return ("<h2>Privacy audit: copies of training images</h2>" + flagged + _table(["", ""], rows)
            + f"<p>The closest pairs (generated | training), most similar first; all {MAX_PAIRS} closest are saved "
              "in pairs/ beside this page.</p>" + figs)


def _warning(privacy: Privacy | None) -> str:
    if privacy is None or not privacy.warning:
        return ""
    return f'<p class="flag">Warning: {html.escape(privacy.warning)}.</p>'


def _grids_section(ev: Evaluation) -> str:
    parts = ["<h2>Samples per class</h2>"]
    names = ev.fake.class_names if ev.fake.labelled else ("all",)
    for name in names:
        fake = ev.fake.images[ev.fake.mask(name)] if ev.fake.labelled else ev.fake.images
        real = ev.real.images[ev.real.mask(name)] if ev.fake.labelled else ev.real.images
        parts.append(f"<h3>{html.escape(name)}</h3>"
                     + _img(_png_uri(_upscale(_grid(fake), 64)), f"generated ({len(fake)})", 480))
        if len(real):
            parts.append(_img(_png_uri(_upscale(_grid(real), 64)), f"real ({len(real)})", 480))
    return "".join(parts)


def _nearest_real_section(ev: Evaluation) -> str:
    if ev.nearest_real is None:
        return ""
    order = np.argsort(-ev.nearest_real_ssim, kind="stable")[:SHOWN_PAIRS]
    figs = [_img(_png_uri(_upscale(make_grid(np.stack([ev.fake.images[g], ev.real.images[ev.nearest_real[g]]]),
                                             ncols=2))),
                 f"generated #{g} | real #{int(ev.nearest_real[g])}: SSIM {float(ev.nearest_real_ssim[g]):.3f}")
            for g in order]
    return ("<h2>Nearest real images</h2><p>The generated images most similar (SSIM) to a real image, beside "
            "it.</p>" + "".join(figs))


def write_report(ev: Evaluation, out_dir: str | Path, run_dir: str | Path | None = None) -> Path:
    """Write out_dir/index.html (self-contained) and out_dir/pairs/*.png → the index.html path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = ev.figures
    log = read_loss_log(run_dir) if run_dir is not None else None
    c, proto = res.counts, res.protocol
    counts = f"{c['fake']} generated, {c['real']} real" + (f", {c['train']} training" if "train" in c else "")
    body = [f"<h1>meddiff evaluation</h1><p>{html.escape(counts)} images at {res.size} px. Feature network: "
            f"<b>{html.escape(proto['features'])}</b> — FID, KID and PRDC are only comparable between evaluations "
            f"with the same feature network, image counts and size. Intervals: {html.escape(proto['intervals'])}.</p>",
            _warning(res.privacy),
            "<h2>Metrics</h2>", metrics_table(res.overall),
            "<p class=note>Real vs real: the same figure between two random halves of the real set (for MS-SSIM: "
            "among real images), what a perfect generator would reach; half sets make FID/KID references "
            "slightly pessimistic.</p>",
            _classes_section(res), _adherence_section(res.adherence), _privacy_section(res.privacy, save_pairs(ev, out)),
            "<h2>Intensity histograms</h2>",
            _img(histogram_plot(ev.real.images, ev.fake.images), "all pixels, real vs generated"),
            _grids_section(ev), _nearest_real_section(ev)]
    if log is not None:
        body += ["<h2>Training loss</h2>", _img(loss_plot(log), f"{len(log['loss'])} loss lines, "
                                                                 f"{len(log['val_loss'])} validation lines")]
    body.append("<h2>Protocols</h2>" + _table(["figure", "protocol"], [[k, str(v)] for k, v in proto.items()]))
    page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>meddiff evaluation</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    return write_text(out / "index.html", page)
