"""A run's record (meddiff.json) + optional metrics → the model card, RUN/README.md (Markdown); and the card a
page shows (`shown_card`: the README.md as written, else the card built from the record).

The card holds only what the record holds that is safe to share: architecture, settings, counts per class,
image sizes and formats, timing, metrics. Never a data path, a file name or anything read from a patient's file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from . import runfolder
from .atomic import write_text
from .confined import read_inside
from .data.dataset import loss_weighted_values
from .data.medmnist import entry_for_file
from .runfolder import RunRecord

SYNTHETIC = ("Every image this model generates is **synthetic**: it does not show a real patient, it is not a "
             "measurement, and it must never be presented or archived as one. meddiff marks the images it "
             "writes as synthetic (PNG text chunks; DICOM Secondary Capture with Conversion Type `SYN`).")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _markdown_table(rows: list[tuple[str, Any]], head: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v).replace('|', '/')} |" for k, v in rows if v is not None]
    return "\n".join(lines)


def parameters_in_file(weights: Path) -> int | None:
    """Parameters stored in a safetensors file, read from its header alone (no tensors loaded); None when the
    file is missing or unreadable. (model.count_parameters counts a module's.)"""
    try:
        with safe_open(str(weights), framework="np") as f:
            total = 0
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
        return total
    except (OSError, ValueError, SafetensorError):
        return None


def describe_source(spec: str) -> str:
    """What the training data were, without a local path: built-in and public MedMNIST+ sets by name, a local
    folder only as such."""
    if spec.startswith("builtin:"):
        return f"meddiff's built-in data `{spec}` (simulated or public template images)"
    if spec.startswith("medmnist:"):
        path, _, query = spec[len("medmnist:"):].partition("?")
        entry = entry_for_file(path)
        split = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("split", "train")
        if entry is not None:
            return (f"MedMNIST+ {entry.title} (`{os.path.basename(path)}`, {split} split; {entry.source}; "
                    f"licence {entry.licence})")
        return f"a MedMNIST-format .npz file ({split} split; its name is not recorded here)"
    if not spec:
        return "images given from Python (no data spec recorded)"
    return "a local image folder (its path and file names are deliberately not recorded in this card)"


def _model_section(record: RunRecord, run: Path) -> str:
    m = record.model
    n_params = parameters_in_file(runfolder.weights_file(run, "ema"))
    ae = record.autoencoder
    recon = ae.get("heldout_reconstruction") or {}
    latent = (f"diffusion in the {m.in_channels} x {m.sample_size} x {m.sample_size} latent grid of a KL autoencoder "
              f"({m.latent_factor}x smaller; RUN/vae/, trained by meddiff train-autoencoder; held-out "
              f"reconstruction PSNR {recon.get('psnr_db', float('nan')):.2f} dB, SSIM {recon.get('ssim', float('nan')):.3f} "
              f"on {recon.get('images', '?')} images)") if m.latent else None
    rows = [("preset", record.train.preset),
            ("backbone", "diffusers UNet2DModel on latents" if m.latent else
             f"diffusers UNet2DModel, {m.in_channels} channels, one per label value" if m.makes_maps else
             "diffusers UNet2DModel, 1 channel"),
            ("image size", f"{m.image_size} x {m.image_size} px"), ("latent path", latent),
            ("block widths", m.block_out_channels), ("layers per block", m.layers_per_block),
            ("down blocks", m.down_block_types), ("up blocks", m.up_block_types),
            ("patch size", f"{m.patch_size} (space-to-depth)" if m.patch_size > 1 else 1),
            ("parameters", f"{n_params / 1e6:.2f} M" if n_params else None),
            ("conditioning", f"class-conditional, {m.num_classes} classes + a null class for classifier-free "
                             "guidance" if m.num_classes else "unconditional"),
            ("label maps", f"conditioned on label maps: one input channel for each label value "
                           f"({_values(record)}); `meddiff sample --masks DIR` makes image + map "
                           "pairs" if m.cond_channels else None),
            ("makes", f"label maps, not images: each pixel the label value whose channel is highest "
                      f"({_values(record, m.map_values)}); `meddiff sample --run IMAGES --mask-run THIS_FOLDER` "
                      "draws each image's map from it" if m.makes_maps else None),
            ("classes", record.class_names if m.num_classes else None)]
    return "## Model\n\n" + _markdown_table(rows, ("", "value"))


def _values(record: RunRecord, values: tuple[int, ...] | None = None) -> str:
    """The label values (those the model conditions on unless `values` are given), each with its name where the
    training data named it: "1 lesion, 2 ct/body"."""
    names = record.mask_names()
    return ", ".join(f"{v} {names[v]}" if v in names else str(v)
                     for v in (record.model.mask_values if values is None else values))


def _data_section(record: RunRecord) -> str:
    s, split = record.data, record.split
    text = [f"## Training data\n\nSource: {describe_source(record.train.data)}.\n",
            f"{s.get('images', '?')} images, resized to {s.get('size', '?')} px; "
            f"{split.get('train', '?')} used for training and {split.get('val', '?')} held out for validation "
            f"(split by patient/volume folder where the data have one); {s.get('skipped', 0)} file(s) skipped "
            "as unreadable.\n"]
    if s.get("classes"):
        text.append(_markdown_table(list(s["classes"].items()), ("class", "images")) + "\n")
    if s.get("formats"):
        text.append(_markdown_table(list(s["formats"].items()), ("format", "images")) + "\n")
    if s.get("source_shapes"):
        text.append(_markdown_table(list(s["source_shapes"].items()), ("source size (H x W)", "images")) + "\n")
    return "\n".join(text)


def _copy_check_rows(record: RunRecord, run: Path) -> list[tuple[str, Any]]:
    """What `--copy-check` found while the run trained (its log rows), for the card."""
    t = record.train
    if not t.copy_check:
        return []
    log = runfolder.read_log(run) if (run / runfolder.LOG_FILE).exists() else []
    checks = [row for row in log if "copies" in row]
    kept = next((row["exported_weights_step"] for row in reversed(log) if "exported_weights_step" in row), None)
    rows: list[tuple[str, Any]] = [("copy check", f"{t.copy_check} images sampled at each validation and audited "
                                    "against the training images" + (f"; stop above {t.max_copies:.0%}" if
                                                                     t.max_copies is not None else ""))]
    if checks:
        worst = max(checks, key=lambda row: row["copies"])
        rows.append(("copies found", f"{len(checks)} checks; the last (step {checks[-1]['step']}): "
                     f"{checks[-1]['copies']:.0%}; the most (step {worst['step']}): {worst['copies']:.0%}"))
    if kept is not None:
        rows.append(("exported weights", f"step {kept}'s, the last check at or under the limit"))
    return rows


def _training_section(record: RunRecord, run: Path) -> str:
    t, r = record.train, record.result
    keys = ("batch_size", "micro_batch", "lr", "lr_schedule", "warmup_steps", "weight_decay", "ema_decay",
            "objective", "loss_weighting", "beta_schedule", "noise_shift", "noise_shift_clean", "num_train_timesteps",
            "zero_terminal_snr", "timestep_spacing", "grad_clip", "flip", "cond_drop_prob", "val_fraction", "precision", "seed")
    rows = [(k.replace("_", " "), getattr(t, k)) for k in keys]
    if t.mask_loss_weight:
        values = loss_weighted_values(record.mask_names(), record.model.mask_values)
        where = "label maps" if values is None else f"the lesion (label value {values[0]})"
        rows.append((f"loss inside {where}", f"weighted {1 + t.mask_loss_weight:g}x"))
    rows.append(("stopping rule", ", ".join(f"{k.replace('_', ' ')} {getattr(t, k)}" for k in
                                            ("max_steps", "epochs", "max_minutes") if getattr(t, k) is not None)))
    if r:
        rows += [("steps", r.steps), ("images seen", r.images_seen), ("training time", _duration(r.seconds)),
                 ("throughput", f"{r.train_img_per_s:.1f} images/s" if r.train_img_per_s else None),
                 ("stopped by", r.stopped)]
    rows += _copy_check_rows(record, run)
    rows += [("hardware", record.hardware), ("meddiff version", record.meddiff_version)]
    status = "" if r else "\nTraining had not finished when this card was written.\n"
    return "## Training\n\n" + _markdown_table(rows, ("setting", "value")) + "\n" + status


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _flatten(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in metrics.items():
        if isinstance(v, dict):
            rows += _flatten(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def _metrics_section(record: RunRecord, metrics: dict[str, Any] | None) -> str:
    r = record.result
    rows = [("training loss (mean of the last 50 steps)", r.final_loss if r else None),
            ("best validation loss (eps-MSE at fixed noise)", r.best_val_loss if r else None)]
    text = "## Metrics\n\n" + _markdown_table(rows, ("loss", "value")) + "\n"
    if metrics:
        text += ("\nEvaluation (numbers are comparable only with numbers of the same protocol):\n\n"
                 + _markdown_table(_flatten(metrics), ("metric", "value")) + "\n")
    else:
        text += "\nNo evaluation of generated images was recorded with this card (see `meddiff evaluate`).\n"
    return text


def _usage_section(record: RunRecord) -> str:
    m, classes = record.model, record.class_names
    if not m.num_classes and m.patch_size == 1:
        load = ("from diffusers import DDIMPipeline\n"
                "pipe = DDIMPipeline.from_pretrained(\"THIS_FOLDER\")\n"
                "images = pipe(batch_size=4, num_inference_steps=50).images")
    else:
        pick = f", class_name=\"{classes[0]}\", guidance_scale=2.0" if m.num_classes and classes else ""
        load = ("from meddiff.pipeline import MeddiffPipeline\n"
                "pipe = MeddiffPipeline.from_pretrained(\"THIS_FOLDER\")\n"
                f"images = pipe(batch_size=4, num_inference_steps=50{pick}).images")
    if m.makes_maps:
        return ("## How to use\n\nBeside a run trained on the same data's images with their maps, each image's map "
                "drawn from this model:\n\n```\nmeddiff sample --run IMAGES --mask-run THIS_FOLDER --n 16 "
                "--out pairs/\n```\n")
    return ("## How to use\n\n```\nmeddiff sample --run THIS_FOLDER --n 16 --out samples/\n```\n\n"
            "or, in Python (after `meddiff export-diffusers`, or on the run folder itself):\n\n"
            f"```python\n{load}\n```\n")


def _use_and_limits(record: RunRecord) -> str:
    s = record.data
    return f"""## Intended use

Research on generative models for medical images: method development, teaching, benchmarking, and experiments
with synthetic data (e.g. augmentation) whose results are checked against real, held-out data.

Not for diagnosis, treatment or any clinical decision; not a substitute for real images of a patient; not a
source of anatomical or physical measurements (intensities are not calibrated, e.g. not in Hounsfield units).

## Limitations

- Trained on {s.get('images', 'an unknown number of')} images at {s.get('size', '?')} px: fine detail, rare
  findings and classes with few images are learned poorly, and the model inherits the biases of its data
  (scanners, sites, populations, label noise such as text-mined labels).
- Diffusion models trained on small medical data sets can reproduce their training images (Dar et al. 2024
  report copies for a large share of CT, MRI and X-ray training images). Measure memorization (meddiff's
  nearest-neighbour check) before sharing generated images, and treat the weights as derived from the
  training data: share a model trained on non-public patient data only where its data agreement allows.
- A class label only means what the training labels meant; generated images of a class are not verified to
  show that finding.

## Synthetic outputs

{SYNTHETIC}
"""


def model_card_text(run: str | Path, metrics: dict[str, Any] | None = None, record: RunRecord | None = None) -> str:
    """The model card of a run folder as Markdown (with a Hugging Face metadata header); `record`: the run's
    record when the caller holds it, else it is read."""
    run = Path(run)
    record = record or runfolder.read_record(run)
    m = record.model
    header = ("---\nlibrary_name: diffusers\npipeline_tag: unconditional-image-generation\n"
              "tags:\n- meddiff\n- medical-imaging\n- diffusion\n- synthetic-data\n---\n")
    kind = "class-conditional" if m.num_classes else "unconditional"
    makes = ("label maps (one label value per pixel) for the images of another model to be drawn on"
             if m.makes_maps else "single-channel medical-style images")
    title = (f"# meddiff diffusion model ({kind}, {m.image_size} px, preset "
             f"{record.train.preset})\n\nA denoising diffusion model trained with meddiff that "
             f"generates {makes}. {SYNTHETIC}\n")
    parts = [header, title, _model_section(record, run), _data_section(record), _training_section(record, run),
             _metrics_section(record, metrics), _usage_section(record), _use_and_limits(record)]
    return "\n".join(p.rstrip() + "\n" for p in parts)


def write_model_card(run: str | Path, metrics: dict[str, Any] | None = None, record: RunRecord | None = None) -> Path:
    """Write RUN/README.md (atomically) from the run's record and optional evaluation metrics."""
    return write_text(runfolder.card_path(run), model_card_text(run, metrics, record))


def shown_card(run: str | Path, max_chars: int) -> tuple[str, str]:
    """(Markdown, source) for a page: RUN/README.md as written, cut at `max_chars` (source "README.md"), else,
    for a run without one (training not finished) or whose README.md is a link or not a regular file inside the
    run folder (`confined.read_inside`), the card built from its record (source "meddiff.json")."""
    card = read_inside(run, runfolder.card_path(run).relative_to(run), 4 * max_chars)  # never through a link
    if card is not None:
        return card.decode("utf-8", errors="replace")[:max_chars], runfolder.CARD_FILE
    return model_card_text(run), runfolder.RECORD_FILE
