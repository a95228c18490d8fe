"""The `meddiff` command: flags → config dataclasses → library calls → a printed result.

Errors users can cause are printed as one line (`meddiff: error: …`) with a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, NoReturn

from .atomic import check_out_dir, check_out_file, no_space, write_json
from .config import (COMPUTE_BUDGET, DEFAULT_PRESET, DEPTH, HELDOUT_SPLITS, IMAGE_SIZE, IMAGES, JOBS_KEPT, RECIPES,
                     RESAMPLES, RESUME_FIELDS, SEEDS, STEP_COUNT, AutoencoderConfig, Bounds, InpaintConfig, Option,
                     SampleConfig, TrainConfig, field_type, flag, options, show)
from .data.medmnist import CATALOGUE, SIZES, ZENODO, fetch, to_class_folders
from .demo import DemoConfig
from .errors import ConfigError, MeddiffError

HELDOUT_SPLIT_HELP = ("how images the model never saw are held out of a set (the copy threshold's part of --train "
                      "when --real holds too few such images; evaluate's classifier test): group (default) keeps a "
                      "patient sub-folder or a volume file together; contiguous holds out runs of consecutive files, "
                      "with a guard band on each side used by neither, for a flat folder of one volume's slices, "
                      "whose single slices are neighbours of training slices")
MAIN_EXAMPLES = """examples:
  meddiff train --data builtin:mni-mri --out runs/mri --max-minutes 5
  meddiff sample --run runs/mri --n 16 --out samples/
  meddiff evaluate --real builtin:mni-mri --fake samples/
  meddiff COMMAND --help                                     # each command's options and examples
"""
TRAIN_EXAMPLES = """examples:
  meddiff train --data builtin:mni-mri --out runs/mri --max-minutes 5
  meddiff train --data ~/data/chest_xray --out runs/cxr --preset small --size 64 --epochs 50
  meddiff train --data builtin:phantoms?n=2000 --out runs/ph --max-steps 3000
  meddiff train --preset seed --data DIR --out runs/seed   # the student project's recipe, exactly
  meddiff train --resume runs/mri                            # continue an interrupted run
  meddiff train --resume runs/mri --max-steps 20000          # extend a finished run
  torchrun --standalone --nproc_per_node 4 --no-python meddiff train --data DIR --out runs/ddp
"""
SAMPLE_EXAMPLES = """examples:
  meddiff sample --run runs/mri --n 4 --steps 20 --out samples/
  meddiff sample --run runs/ph --class ct/abnormal --guidance 2 --n 16 --out ct_abn/
  meddiff sample --run runs/ph --per-class 100 --format dicom --out synthetic/
  torchrun --standalone --nproc_per_node 4 --no-python meddiff sample --run-dir runs/ph --count 100000 --out big/
"""
EVAL_EXAMPLES = """examples:
  meddiff evaluate --real builtin:mni-mri --fake samples/ --json eval.json
  meddiff evaluate --real heldout/ --fake synthetic/ --train train/ --report report/ --run runs/ph
  meddiff evaluate --real builtin:phantoms?n=400 --fake synthetic/ --utility --json eval.json
  meddiff evaluate --real 'builtin:phantoms?n=400&seed=1&masks=1' --fake pairs/ --adherence   # pairs: sample --masks
"""
DEMO_EXAMPLES = """examples:
  meddiff demo                  # 3,000 steps: ~9 min on a 2-core Zen 5 CPU, ~45 min on an older AVX2 one
  meddiff demo --max-steps 6000 --minutes 120 --per-class 8 --out demo6k
  meddiff demo --guidance 3 --out demo_g3
  meddiff demo --preset tiny --max-steps 20 --per-class 1 --out quick   # a smoke test, under a minute

writes OUT/grid.png (one row per class), OUT/samples/ (class folders + manifest.csv), OUT/eval.json,
OUT/report/index.html and OUT/run/ (sample more with: meddiff sample --run OUT/run --per-class 16 --out more/)
"""
INFO_EXAMPLES = """examples:
  meddiff info ~/data/chest_xray
  meddiff info builtin:phantoms?n=80
"""
DATA_EXAMPLES = """examples:
  meddiff data export builtin:phantoms --n 200 --out phantoms_png/
  meddiff train --data phantoms_png/ --label-depth 2 --out runs/ph
  meddiff data fetch pneumoniamnist --size 64 --out pneumonia_png/   # MedMNIST+, checksum-verified
  meddiff train --data pneumonia_png/ --out runs/pneumonia
"""


def default_cache_dir() -> str:
    """XDG_CACHE_HOME/meddiff or ~/.cache/meddiff (read here, at the edge, never in the library)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "meddiff")


THREADS_HELP = ("CPU threads for torch (default: OMP_NUM_THREADS when set, else the CPUs this process may use less "
                "those other processes keep busy, from the load average)")


def _set_threads(a: argparse.Namespace) -> None:
    """Torch's CPU threads, chosen here at the edge: --threads, else OMP_NUM_THREADS (torch follows it already),
    else what the load leaves: a core taken by another process stalls all of torch's threads (issue 19)."""
    import torch

    from .runtime import threads_from_load

    if a.threads is not None:
        torch.set_num_threads(a.threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads_from_load())


def _add_threads(parser: argparse.ArgumentParser) -> None:
    _number(parser, "--threads", bounds=Bounds(1, 1024, whole=True), help=THREADS_HELP)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`meddiff: error: …`) like every other error (rule 6)."""

    def error(self, message: str) -> NoReturn:
        own = re.fullmatch(r"argument [^:]+: (--\S+ .*)", message)  # an option's own check, as the library words it
        if own:
            self.exit(2, f"meddiff: error: {own[1]}\n")
        where = self.prog.removeprefix("meddiff").strip()
        self.exit(2, f"meddiff: error: {where + ': ' if where else ''}{message} "
                     f"(see {self.prog} --help)\n")


# --- flags derived from the config dataclasses' options (config.Option) -------------------------------------

def _value_type(name: str, opt: Option, type_: type) -> Callable[[str], Any]:
    """argparse's `type`: the option's own parser, so a flag is refused with the library's message."""
    def parse(text: str) -> Any:
        try:
            return opt.parse(name, text, type_)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def _default_text(cls: type, f: dataclasses.Field, opt: Option) -> str:
    """' (default 64; seed 128, tiny 32)' from the presets' recipes, ' (default 5)' from the field, or ''."""
    if opt.recipe is not None:
        values = {p: {f.name: opt.recipe, **RECIPES[p]}[f.name] for p in RECIPES}
        main = values[DEFAULT_PRESET]
        others = ", ".join(f"{p} {_plain(v)}" for p, v in values.items() if v != main)
        return f" (default {_plain(main)}{'; ' + others if others else ''})"
    if f.default in (None, dataclasses.MISSING) or isinstance(f.default, bool):
        return ""
    return f" (default {_plain(f.default)})"


def _plain(value: Any) -> str:
    return "on" if value is True else "off" if value is False else show(value).strip("'")


def _add_options(parser: argparse.ArgumentParser, cls: type, *, optional: tuple[str, ...] = (),
                 shown: dict[str, str] | None = None) -> None:
    """One flag for every option of a config dataclass that the CLI offers: name, type, choices, default and
    help all come from the dataclass (fields without a default are required unless named in `optional`).
    `shown`: defaults the CLI fills in at the edge (e.g. the cache folder), for the help text."""
    groups: dict[str, Any] = {}
    for f, opt in options(cls):
        if not opt.cli:
            continue
        if opt.group and opt.group not in groups:
            groups[opt.group] = parser.add_mutually_exclusive_group()
        target = groups[opt.group] if opt.group else parser
        required = f.default is dataclasses.MISSING and f.name not in optional
        default = None if f.default is dataclasses.MISSING else f.default
        text = (opt.help + (f" (default {shown[f.name]})" if shown and f.name in shown
                            else _default_text(cls, f, opt))).replace("%", "%%")
        type_ = field_type(cls, f)
        if type_ is bool and default is True:
            target.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=text)
        elif type_ is bool:
            action = argparse.BooleanOptionalAction if default is None else "store_true"
            target.add_argument(flag(f), dest=f.name, action=action, default=default, help=text)
        else:
            metavar = "{" + ",".join(opt.choices) + "}" if opt.choices and not opt.pattern else None
            target.add_argument(*(opt.flags or (flag(f),)), dest=f.name, default=default, required=required,
                                metavar=metavar, help=text,
                                type=_value_type(flag(f), opt, type_) if opt.choices or type_ is not str else None)


def _command(sub: Any, name: str, *, help: str, epilog: str) -> argparse.ArgumentParser:
    """A sub-command whose --help ends with its examples (`epilog`), line breaks kept."""
    return sub.add_parser(name, help=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)


def _number(parser: Any, *flags: str, bounds: Bounds, kind: type = int, **how: Any) -> None:
    """A numeric flag outside the config dataclasses, parsed and checked the same way (config's limits)."""
    parser.add_argument(*flags, type=_value_type(flags[0], Option(help="", bounds=bounds), kind), **how)


def _given(a: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of a config's CLI options in parsed flags, by field name."""
    return {f.name: getattr(a, f.name) for f, opt in options(cls) if opt.cli}


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="meddiff", description="Diffusion models for medical images: train, "
                 "sample, evaluate.", epilog=MAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_train_autoencoder(sub)
    _add_sample(sub)
    _add_inpaint(sub)
    ev = _command(sub, "evaluate", help="quality, diversity, utility and privacy of generated images",
                  epilog=EVAL_EXAMPLES)
    ev.add_argument("--real", required=True, help="real images: a folder or builtin:…")
    ev.add_argument("--fake", required=True, help="generated images: a folder")
    _number(ev, "--size", bounds=IMAGE_SIZE, help="compare at this size (default: the generated images' size)")
    ev.add_argument("--json", help="also write the figures to this JSON file")
    _number(ev, "--seed", bounds=SEEDS, default=0, help="seed of the bootstrap and the real-halves split")
    ev.add_argument("--train", help="the model's training images: audit the generated ones for copies")
    ev.add_argument("--report", metavar="DIR", help="write a self-contained HTML report (DIR/index.html)")
    ev.add_argument("--run", metavar="RUN_DIR", help="the run folder: its training loss curve goes into the report")
    ev.add_argument("--utility", action="store_true",
                    help="train a classifier on real, synthetic and both; test each on held-out real images")
    ev.add_argument("--adherence", action="store_true",
                    help="--fake holds images with their requested label maps (sample --masks): train a segmenter on "
                         "the real pairs and report its Dice against the requested maps, beside real images")
    _number(ev, "--segmenter-steps", bounds=STEP_COUNT, default=600,
            help="training steps of the --adherence segmenter (default 600: ~2 one-thread min at 64 px)")
    _number(ev, "--label-depth", bounds=DEPTH,
            help="folder levels naming a class (default: 1 for --real, as deep as its classes for the rest)")
    ev.add_argument("--features", choices=["randconv", "inception"], default="randconv",
                    help="feature network of FID/KID/PRDC (inception: local torch-fidelity weights only)")
    ev.add_argument("--inception-weights", metavar="PATH", help="the FID Inception weights file (implies --features inception)")
    _number(ev, "--bootstrap", bounds=RESAMPLES, default=200, help="bootstrap resamples of every interval")
    ev.add_argument("--heldout-split", choices=HELDOUT_SPLITS, default="group", help=HELDOUT_SPLIT_HELP)
    ev.add_argument("--cache-dir", default=None, help=f"image and feature cache (default {default_cache_dir()})")
    _add_threads(ev)
    au = _command(sub, "audit", help="copy the generated images that are not copies of training images into a "
                  "shareable folder", epilog="examples:\n  meddiff audit --fake synthetic/ --train train/ "
                  "--real heldout/ --out shareable/\n  meddiff audit --fake ph/ --train "
                  "'builtin:phantoms?n=800' --real 'builtin:phantoms?n=400&seed=1' --out share/\n")
    au.add_argument("--fake", required=True, help="generated images: a folder (class sub-folders are kept)")
    au.add_argument("--train", required=True, help="the model's training images: a folder or builtin:…")
    au.add_argument("--real", required=True, help="real images the model never saw, to set the copy threshold")
    au.add_argument("--out", required=True, help="the shareable folder (must not exist or be empty)")
    _number(au, "--size", bounds=IMAGE_SIZE, help="compare at this size (default: the generated images' size)")
    _number(au, "--label-depth", bounds=DEPTH, default=1, help="folder levels naming a class (default 1)")
    au.add_argument("--heldout-split", choices=HELDOUT_SPLITS, default="group", help=HELDOUT_SPLIT_HELP)
    au.add_argument("--cache-dir", default=None, help=f"image cache (default {default_cache_dir()})")
    info = _command(sub, "info", help="what the loader sees in a data path", epilog=INFO_EXAMPLES)
    info.add_argument("path", help="a folder or builtin:…")
    _number(info, "--label-depth", bounds=DEPTH, default=1, help="folder levels naming a class (default 1)")
    _number(info, "--size", bounds=IMAGE_SIZE, default=64, help="read the images at this size (default 64)")
    _add_demo(sub)
    data = _command(sub, "data", help="built-in and public data sets", epilog=DATA_EXAMPLES)
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    exp = _command(dsub, "export", help="write a built-in data set as PNGs in class folders", epilog=DATA_EXAMPLES)
    exp.add_argument("spec", help="builtin:phantoms, builtin:ct, builtin:xray, builtin:mri, builtin:us, builtin:mni-mri")
    _number(exp, "--n", bounds=IMAGES, default=200, help="number of images (default 200)")
    _number(exp, "--size", bounds=IMAGE_SIZE, default=128,
            help="image size in px (default 128; the phantoms render at 32 to 256)")
    _number(exp, "--seed", bounds=SEEDS, default=0, help="seed of the rendering (default 0)")
    exp.add_argument("--out", required=True, help="folder for the PNG class folders")
    _add_fetch(dsub)
    _add_export_diffusers(sub)
    _add_serve(sub)
    return ap


def _add_fetch(dsub: Any) -> None:
    fe = _command(dsub, "fetch", help="download a MedMNIST+ set (MD5-verified, resumable) into class folders",
                  epilog=DATA_EXAMPLES)
    fe.add_argument("name", help=", ".join(CATALOGUE))
    fe.add_argument("--size", type=int, choices=SIZES, default=64, help="image size of the MedMNIST+ file")
    fe.add_argument("--out", required=True, help="folder for the PNG class folders")
    fe.add_argument("--split", choices=["train", "val", "test", "all"], default="train",
                    help="which official split to write (default train: keep test images for evaluation)")
    fe.add_argument("--url-base", default=ZENODO, help="a mirror holding the official files (default Zenodo)")
    fe.add_argument("--download-dir", help=f"where the .npz is kept (default {default_cache_dir()}/medmnist)")
    _number(fe, "--retries", bounds=Bounds(1, 100, whole=True), default=3,
            help="download attempts before giving up (default 3)")


def _add_export_diffusers(sub: Any) -> None:
    ex = _command(sub, "export-diffusers", help="write a run as a diffusers pipeline folder",
                  epilog="examples:\n  meddiff export-diffusers runs/mri exported/mri\n")
    ex.add_argument("run", metavar="RUN_DIR", help="a run folder written by meddiff train")
    ex.add_argument("out", metavar="OUT_DIR", help="the pipeline folder to write")
    ex.add_argument("--weights", choices=["ema", "best"], default="ema",
                    help="ema: the averaged weights, best: the lowest validation loss (default ema)")


def _add_train(sub: Any) -> None:
    tr = _command(sub, "train", help="train a diffusion model on a data folder or built-in data",
                  epilog=TRAIN_EXAMPLES)
    tr.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run (no other flags needed)")
    _add_options(tr, TrainConfig, optional=("data", "out"), shown={"cache_dir": default_cache_dir()})
    _add_threads(tr)


def _add_train_autoencoder(sub: Any) -> None:
    ta = _command(sub, "train-autoencoder", help="train the autoencoder of the latent path on your images",
                  epilog="examples:\n  meddiff train-autoencoder --data 'builtin:mni-mri' --size 256 --max-minutes 10 "
                  "--out runs/ae256\n  meddiff train --autoencoder runs/ae256 --data 'builtin:mni-mri' --max-minutes 30 "
                  "--out runs/latent256\n")
    _add_options(ta, AutoencoderConfig, shown={"cache_dir": default_cache_dir()})
    _add_threads(ta)


def _add_sample(sub: Any) -> None:
    sa = _command(sub, "sample", help="generate images from a trained run", epilog=SAMPLE_EXAMPLES)
    _add_options(sa, SampleConfig)
    _add_threads(sa)


def _add_inpaint(sub: Any) -> None:
    ip = _command(sub, "inpaint", help="regenerate a masked region of a real image (e.g. add a lesion)",
                  epilog="examples:\n  meddiff inpaint --run runs/ph --image healthy.png --mask region.png --class "
                  "ct/abnormal --n 4 --out lesions/\n")
    _add_options(ip, InpaintConfig)
    _add_threads(ip)


def _dist_from_env() -> Any:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK (read here, at the edge); a plain run is rank 0 of 1."""
    from .runtime import Dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def cmd_train(a: argparse.Namespace) -> int:
    from .runtime import init_distributed
    from .train import train

    given = _given(a, TrainConfig)
    if a.resume:
        # the run continues with its stored settings: a flag given here would be silently ignored, so refuse it
        # (stopping criteria excepted: they extend the run; and whether to show progress)
        defaults = vars(_parser().parse_args(["train"]))
        fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
        refused = [flag(fields[n]) for n, v in given.items()
                   if v != defaults[n] and n not in (*RESUME_FIELDS, "progress")]
        if refused:
            allowed = ", ".join(flag(fields[n]) for n in RESUME_FIELDS)
            raise MeddiffError(f"train --resume {a.resume}: takes no other flags than {allowed} (got "
                               f"{', '.join(refused)}); the run continues with the settings stored in its meddiff.json")
    elif not a.data or not a.out:
        raise MeddiffError("train: --data and --out are required (or --resume RUN_DIR)")
    dist = _dist_from_env()
    device = init_distributed(dist, a.device) if dist.active else None
    if a.resume:
        cfg = TrainConfig(data="", out=a.resume, progress=a.progress, **{n: given[n] for n in RESUME_FIELDS})
        result = train(cfg, resume=True, dist=dist, device=device)
    else:
        cfg = TrainConfig(**{**given, "cache_dir": a.cache_dir or default_cache_dir()})
        result = train(cfg, dist=dist, device=device)
    if not dist.main:
        return 0
    print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}))
    if result.stopped == "interrupted":
        print(f"interrupted at step {result.steps}; a checkpoint is saved. Continue with: "
              f"meddiff train --resume {result.run}")
    return 0


def cmd_train_autoencoder(a: argparse.Namespace) -> int:
    from .train_autoencoder import train_autoencoder

    given = _given(a, AutoencoderConfig)
    result = train_autoencoder(AutoencoderConfig(**{**given, "cache_dir": a.cache_dir or default_cache_dir()}))
    print(json.dumps(result.to_json()))
    print(f"autoencoder written to {result.folder}; train a latent diffusion model with: meddiff train "
          f"--autoencoder {result.folder} --data …")
    return 0


def cmd_inpaint(a: argparse.Namespace) -> int:
    from .sample import inpaint_to_folder

    print(json.dumps(inpaint_to_folder(InpaintConfig(**_given(a, InpaintConfig)))))
    return 0


def cmd_sample(a: argparse.Namespace) -> int:
    from .runtime import init_distributed
    from .sample import sample_to_folder

    cfg = SampleConfig(**_given(a, SampleConfig))
    dist = _dist_from_env()
    device = init_distributed(dist, a.device) if dist.active else None
    result = sample_to_folder(cfg, dist=dist, device=device)
    if dist.main:
        print(json.dumps(result))
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, evaluate
    from .report import read_loss_log, summary_lines, write_report

    cfg = EvalConfig(real=a.real, fake=a.fake, train=a.train, size=a.size, label_depth=a.label_depth,
                     features="inception" if a.inception_weights else a.features,
                     inception_weights=a.inception_weights, utility=a.utility, adherence=a.adherence,
                     segmenter_steps=a.segmenter_steps, seed=a.seed, n_boot=a.bootstrap,
                     heldout_split=a.heldout_split, cache_dir=a.cache_dir or default_cache_dir())
    if a.run and not a.report:
        raise MeddiffError(f"evaluate --run {a.run}: the loss curve goes into the report; add --report DIR")
    if a.run:
        read_loss_log(a.run)  # a wrong run folder fails now, not after the evaluation
    if a.json:
        check_out_file(a.json, "--json")
    if a.report:
        check_out_dir(a.report, "--report")
    result = evaluate(cfg)
    print("\n".join(summary_lines(result.figures)))
    if a.json:
        write_json(a.json, result.results)
    if a.report:
        print(f"report: {write_report(result, a.report, run_dir=a.run)}")
    return 0


def cmd_audit(a: argparse.Namespace) -> int:
    from .audit import AuditConfig, audit_folder

    result = audit_folder(AuditConfig(fake=a.fake, train=a.train, real=a.real, out=a.out, size=a.size,
                                      label_depth=a.label_depth, heldout_split=a.heldout_split,
                                      cache_dir=a.cache_dir or default_cache_dir()))
    n = len(result.kept) + len(result.flagged)
    lines = [f"audit: {len(result.kept)} of {n} image(s) copied to {result.out}; {len(result.flagged)} flagged as "
             f"copies of training images (NCC ≥ {result.copies.threshold:.3f}, threshold from {result.heldout})",
             *(f"  flagged: {f}" for f in result.flagged)]
    if result.warning:
        lines.append(f"warning: {result.warning}")
    print("\n".join(lines))
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from .data.dataset import load_data

    data = load_data(a.path, a.size, label_depth=a.label_depth, cache_dir=default_cache_dir())
    s = data.summary
    print("\n".join([f"{s['images']} images in {len(data.class_names)} class(es)",
                     *(f"  class {name}: {count}" for name, count in s["classes"].items()),
                     *(f"  format {fmt}: {count}" for fmt, count in s["formats"].items()),
                     f"skipped {len(data.skipped)} file(s)",
                     *(f"  {path}: {reason}" for path, reason in data.skipped)]))
    return 0


def cmd_data(a: argparse.Namespace) -> int:
    from .data.dataset import export_builtin

    if a.data_command == "fetch":
        return cmd_data_fetch(a)
    counts = export_builtin(a.spec, a.out, n=a.n, size=a.size, seed=a.seed)
    print(json.dumps({"out": a.out, "classes": counts}))
    depth = max(c.count("/") for c in counts) + 1
    print(f"train on it with: meddiff train --data {a.out}" + (f" --label-depth {depth}" if depth > 1 else "")
          + " --out RUN_DIR")
    return 0


def cmd_data_fetch(a: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    check_out_dir(a.out, "--out")
    bar = tqdm(unit="B", unit_scale=True, dynamic_ncols=True, desc=a.name)

    def progress(done: int, total: int | None) -> None:
        bar.total = total
        bar.update(done - bar.n)

    download_dir = a.download_dir or os.path.join(default_cache_dir(), "medmnist")
    try:
        npz = fetch(a.name, a.size, download_dir, url_base=a.url_base, retries=a.retries, progress=progress,
                    echo=print)
    finally:
        bar.close()
    counts = to_class_folders(npz, a.out, split=a.split)
    print(json.dumps({"npz": str(npz), "out": a.out, "split": a.split, "classes": counts}))
    print(f"train on it with: meddiff train --data {a.out} --out RUN_DIR   (or --data medmnist:{npz})")
    return 0


def cmd_export_diffusers(a: argparse.Namespace) -> int:
    from .pipeline import export_diffusers

    out, pipeline = export_diffusers(a.run, a.out, weights=a.weights)
    print(json.dumps({"out": str(out), "pipeline": pipeline}))
    where = "diffusers" if pipeline == "DDIMPipeline" else "meddiff.pipeline"
    print(f"load it with: from {where} import {pipeline}; pipe = {pipeline}.from_pretrained({str(out)!r})")
    return 0


def _add_demo(sub: Any) -> None:
    de = _command(sub, "demo", help="train one class-conditional model on MedPhantom-4 (3,000 steps, ~9 min on "
                  "a 2-core Zen 5 CPU), then sample a grid with one row per class, evaluate it and write the "
                  "report", epilog=DEMO_EXAMPLES)
    _add_options(de, DemoConfig, shown={"cache_dir": default_cache_dir()})
    _add_threads(de)


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import key_figures, run_demo

    cfg = DemoConfig(**{**_given(a, DemoConfig), "cache_dir": a.cache_dir or default_cache_dir()})
    result = run_demo(cfg)
    t, res = result.train, result.evaluation.figures
    print(f"demo: {t.steps} training steps ({t.images_seen} images, {t.train_img_per_s:.1f} img/s, "
          f"{t.seconds / 60:.1f} min); {res.counts['fake']} samples vs {res.counts['real']} real images at "
          f"{res.size} px:")
    print("\n".join(key_figures(res)))
    print(f"demo: grid {result.grid} (one row per class), samples {result.samples}/, report {result.report}, "
          f"figures {result.figures}; {result.seconds / 60:.1f} min in all")
    if result.warning:
        print(f"demo: WARNING: {result.warning}")
    return 0


def _add_serve(sub: Any) -> None:
    se = _command(sub, "serve", help="a local web page that generates images from a trained run",
                  epilog="examples:\n  meddiff serve --run runs/ph\n  meddiff serve --run runs/ph --port 8000 "
                         "--out served/\n")
    se.add_argument("--run", required=True, help="a run folder written by meddiff train")
    se.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only); "
                    "any other address needs --allow-remote")
    se.add_argument("--allow-remote", action="store_true",
                    help="let other machines reach the server: it prints a link with a secret token, and every "
                         "request must carry that token")
    _number(se, "--port", bounds=Bounds(0, 65535, whole=True), default=7860, help="0: any free port")
    se.add_argument("--out", help="folder the batches are written into (default: a new temporary folder)")
    _number(se, "--keep-jobs", bounds=JOBS_KEPT, default=20,
            help="keep the files of the newest N batches; older finished ones are deleted (default 20)")
    _number(se, "--compute-budget", bounds=COMPUTE_BUDGET, kind=float, default=25.0,
            help="most work one batch may ask for, in millions of pixel-evaluations: images x steps x (2 for heun) "
                 "x (2 with guidance) x pixels (default 25; the queue holds 4 such)")
    se.add_argument("--weights", choices=["ema", "best", "raw"], default="ema",
                    help="ema: the averaged weights, best: the lowest validation loss, raw: the last checkpoint's")
    se.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    _add_threads(se)


def cmd_serve(a: argparse.Namespace) -> int:
    from .serve import ServeConfig, serve

    out = a.out or tempfile.mkdtemp(prefix="meddiff-serve-")
    if threading.current_thread() is threading.main_thread():  # `kill` stops it as Ctrl-C does: cleanly
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve(ServeConfig(run=a.run, out=out, host=a.host, port=a.port, weights=a.weights, device=a.device,
                          allow_remote=a.allow_remote, keep_jobs=a.keep_jobs, compute_budget=a.compute_budget))
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
        if not a.out and not any(Path(out).iterdir()):  # nothing generated: leave no empty folder behind
            Path(out).rmdir()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train, "train-autoencoder": cmd_train_autoencoder, "sample": cmd_sample,
    "inpaint": cmd_inpaint, "evaluate": cmd_evaluate, "audit": cmd_audit, "info": cmd_info,
    "data": cmd_data, "demo": cmd_demo, "export-diffusers": cmd_export_diffusers, "serve": cmd_serve}


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        if hasattr(args, "threads"):  # the commands that compute: train, sample, evaluate, demo, serve
            _set_threads(args)
        return COMMANDS[args.command](args)
    except MeddiffError as err:
        print(f"meddiff: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if isinstance(err, BrokenPipeError) or not no_space(err):
            raise
        print(f"meddiff: error: no space left on the device while writing {err.filename or 'a file'} "
              f"({err.strerror})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("meddiff: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    """The `meddiff` command. A reader that stops early (`meddiff sample … | head -1`) ends it quietly with
    SIGPIPE's exit status, 141, as well-kept Unix tools do, instead of a BrokenPipeError traceback."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # the rest of the output has nowhere to go: point stdout at /dev/null so the final flush cannot fail
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # stdout is no file descriptor (captured): nothing to flush
            pass
        return 141


if __name__ == "__main__":
    sys.exit(main())
