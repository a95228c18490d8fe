#!/usr/bin/env python3
"""Images with their label maps (issue 21), on MedPhantom-4 with its true lesion maps, one command:

    python benchmarks/masks.py                  # --minutes 15 at 64 px (about 30 min on 2 cores)
    python benchmarks/masks.py --quick          # seconds: a smoke test, not a figure
    python benchmarks/masks.py --reuse --guidance 4   # score the run in --out again, without training
    python benchmarks/masks.py --steps 8538 --out bench_out/masks_steps2x   # train by steps, not minutes
    python benchmarks/masks.py --reuse --steps 17076 --out bench_out/masks_steps4x   # train a run in --out on
    python benchmarks/masks.py --conditioning spade --out bench_out/masks_spade   # the map through SPADE too
    python benchmarks/masks.py --conditioning controlnet --out bench_out/masks_controlnet   # or a ControlNet copy
    python benchmarks/masks.py --maps anatomy --out bench_out/masks_anatomy   # maps of lesion and anatomy
    python benchmarks/masks.py --maps anatomy --reuse --utility-maps new --parts utility,copies ...   # new maps

1. meddiff trains its default recipe, conditioned on the maps, on `builtin:phantoms?masks=1` (seed 0) for --minutes.
   Every test image comes from other phantoms (`seed=1`): no test pair was trained on. --maps anatomy conditions
   on the label maps of lesion and anatomy (`masks=2`) instead: every figure below still reads the lesion alone.
   --conditioning spade or controlnet trains the same recipe with a path that carries the map to every level
   added to its input channels (benchmarks/_mask_conditioning.py): the measurement that decides whether meddiff
   should take one.
2. Mask adherence: a segmenter (`meddiff.metrics.segmentation`) trained on real training pairs segments images
   generated for the test set's abnormal maps (class <modality>/abnormal, default sampler, --guidance); Dice
   against the requested map per modality, beside the same segmenter on the real test images (its ceiling).
   With maps of anatomy, CT's contrast phase too: the share of generated CT slices whose liver lies in the middle
   of the gap between the plain and the enhanced livers of the training images, and the share drawn plain
   (`phase_figures`), beside the real test images' shares.
3. Segmentation utility: segmenters trained on synthetic pairs only (one generated image per training map, same
   classes; --utility-maps new: per new map, each training map jittered by its own seed as `meddiff sample
   --augment-masks` draws them, so that no pair is made from a training map as it is) and on the real pairs, both
   tested on the real test pairs; the ratio of their Dice. And with only
   --few real pairs: real alone against real + every synthetic pair, the real pairs filling --real-share of every
   batch (so 50 real pairs are not drowned by 1,200 synthetic ones). Both comparisons are paired over the same test
   images, with 95 % bootstrap intervals on the ratio and the difference; synthetic-only against real-only per
   modality too.
4. Inpainting: healthy test images given the lesion region of an abnormal test image of the same modality and
   class <modality>/abnormal: the largest change outside the region (must be 0), the share a lesion detector
   trained on real phantoms (`meddiff.metrics.segmentation.train_detector`, --seg-steps) calls abnormal (beside the
   share of real abnormal test images it calls abnormal, the reference, and of the healthy images before
   inpainting; the random-conv feature classifier of earlier files reads them too), and the seam: mean gradient
   magnitude on the region's border ring against the same on real lesions' rings, beside the contrast across that
   ring (inside against outside), which raises the gradient without any seam.
5. Copies: the share of the generated adherence images flagged as copies of a training image (held-out test
   images set the threshold); and of 200 images generated from training maps (or the new maps of --utility-maps
   new), at that threshold, with how often the nearest training image is the map's own image (with new maps the
   gallery also holds each source image moved as its map was: a copy turned with its map is caught too).
Writes benchmarks/results/masks.json and docs/masks_grid.png (requested map, generated image, per modality; with
--utility-maps new or model and the utility part, the new or drawn maps the synthetic-only segmenter trains on).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import _results as R

MODALITIES = ("ct", "mri", "us", "xray")
MAPS = ("lesion", "anatomy")  # --maps: what the model is conditioned on (builtin:phantoms?masks=1, masks=2)
PARTS = ("adherence", "utility", "inpainting", "copies")
UTILITY_MAPS = ("training", "new", "model")  # --utility-maps: the training maps, new ones jittered from them, or
# maps drawn from a model of label maps trained on the training maps (`meddiff train --learn maps`)


def load_pairs(n: int, seed: int, size: int, maps: str = "lesion") -> dict:
    """n phantoms of `seed` with their maps: `masks` what the model is conditioned on (maps "lesion": the lesion
    maps; "anatomy": the label maps of lesion and anatomy), `lesions` the bool lesion maps every Dice reads."""
    from meddiff.data.dataset import load_data
    from meddiff.data.phantoms import LESION

    data = load_data(phantom_spec(n, maps, seed), size)
    idx = np.arange(len(data))
    masks = data.take_masks(idx)[:, 0].numpy()
    return dict(images=((data.take(idx)[:, 0] + 1) / 2).numpy(), masks=masks, lesions=masks == LESION,
                classes=[data.class_names[k] for k in data.labels.tolist()])


def phantom_spec(n: int, maps: str, seed: int | None = None) -> str:
    """The data spec of n phantoms with --maps' label maps (lesion: masks=1, anatomy: masks=2)."""
    return f"builtin:phantoms?n={n}&masks={MAPS.index(maps) + 1}" + ("" if seed is None else f"&seed={seed}")


def train_model(out: Path, n: int, size: int, minutes: float, extra: list[str],
                conditioning: str = "channel", steps: int | None = None, maps: str = "lesion") -> dict:
    trainer = (["-m", "meddiff.cli", "train"] if conditioning == "channel" else
               [str(Path(__file__).with_name("_mask_conditioning.py")), "train", conditioning])
    budget = ["--max-steps", str(steps)] if steps else ["--max-minutes", str(minutes)]
    return _train_call([*trainer, "--data", phantom_spec(n, maps), "--size", str(size), *budget,
                        "--out", str(out / "run"), "--no-progress", *extra])


def extend_run(out: Path, trained: dict, steps: int, run: Path | None = None) -> dict:
    """--reuse --steps N on a run (`run`, else --out/run) trained fewer steps: resume it to N (`meddiff train
    --resume --max-steps`: the rate warms up again from where it stands towards the new goal's schedule) and note in
    --out every goal it was trained to (`from_steps`, the goals `through` which it went, `to_steps`): each resume
    starts from where the run stands, so 8 → 16 → 32 is not the run 8 → 32, and this and any later scoring of the
    run name every call."""
    history = out / "extended.json"
    past = json.loads(history.read_text()) if history.exists() else {}
    if trained["steps"] < steps:
        first = past.get("from_steps", trained["steps"])
        through = [*past.get("through", []), past["to_steps"]] if past else []
        trained = _train_call(["-m", "meddiff.cli", "train", "--resume", str(run or out / "run"), "--max-steps",
                               str(steps), "--no-progress"])
        past = dict(from_steps=first, through=through, to_steps=steps)
        history.write_text(json.dumps(past))
    if past:
        trained = dict(trained, extended_from=past["from_steps"], extended_through=past.get("through", []))
    return trained


def _train_call(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"training failed:\n{done.stderr[-2000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def by_class(classes: list[str], seed0: int, draw) -> np.ndarray:
    """One sample per entry of `classes`, seeds seed0, seed0 + 1, …, in batches of one class:
    `draw(seeds, class name, rows)` → the batch's (len(rows), S, S) samples."""
    out = None
    for name in sorted(set(classes)):
        rows = [i for i, c in enumerate(classes) if c == name]
        for lo in range(0, len(rows), 16):
            part = rows[lo:lo + 16]
            got = draw([seed0 + i for i in part], name, part)
            out = np.zeros((len(classes), *got.shape[1:]), got.dtype) if out is None else out
            out[part] = got
    return out


def generate_for(run, masks: np.ndarray, classes: list[str], guidance: float, seed0: int,
                 cutoff: float = 0.0) -> np.ndarray:
    """One image per (map, class), seeds seed0, seed0 + 1, …, in batches of one class."""
    from meddiff.sample import class_index, generate

    return by_class(classes, seed0, lambda seeds, name, rows: generate(
        run, seeds, class_index(run, name), guidance=guidance, masks=masks[rows].astype(np.int64),
        guidance_cutoff=cutoff))


def _shown(labels: np.ndarray) -> np.ndarray:
    """A map as a grid tile (`export.label_map_tile`): lesion maps white on black; label maps of anatomy in grey
    levels, the lesion white."""
    from meddiff.data.phantoms import LESION
    from meddiff.export import label_map_tile

    return label_map_tile(labels, LESION)


def ring(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The pixels within `width` of a region's border, inside or out."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    grown = torch.nn.functional.max_pool2d(m, 2 * width + 1, 1, width)
    shrunk = -torch.nn.functional.max_pool2d(-m, 2 * width + 1, 1, width)
    return (grown - shrunk)[0, 0].numpy() > 0


def liver_means(images: np.ndarray, maps: np.ndarray, min_pixels: int = 20) -> np.ndarray:
    """Each CT slice's mean intensity over its liver (label `ct/liver` of the label maps of anatomy), its border
    and the lesion with 2 pixels round it left out; NaN where fewer than `min_pixels` remain (no liver: a thorax)."""
    from meddiff.data.phantoms import LABELS, LESION

    liver = next(v for v, name in LABELS.items() if name == "ct/liver")
    out = np.full(len(images), np.nan)
    for k, (image, labels) in enumerate(zip(images, maps)):
        lesion = labels == LESION
        inside = (labels == liver) & ~ring(labels == liver) & ~(lesion | ring(lesion, 2))
        if inside.sum() >= min_pixels:
            out[k] = float(image[inside].mean())
    return out


def phase_figures(generated: np.ndarray, real: np.ndarray, maps: np.ndarray, train: dict) -> dict | None:
    """Does the generator keep CT's contrast phase? MedPhantom-4's CT is contrast-enhanced in half the scans, which
    brightens the liver (about 0.55 of the window plain, 0.67 enhanced): real livers fall into two groups with
    a gap between them. The gap is read off the training images (the widest gap between consecutive sorted liver
    means); the share of generated slices (on `maps`) whose liver lands in its middle half (a quarter of the gap
    away from either group, so that a slice just past its group's training extreme is not counted) is a hedge
    between the phases; the share at or below the plain group's top is drawn plain. Both beside the real test
    images' shares on the same maps (the reference). None without maps of anatomy or CT livers."""
    if not (train["masks"] > 1).any():
        return None
    ct = np.array([c.startswith("ct/") for c in train["classes"]])
    known = np.sort(liver_means(train["images"][ct], train["masks"][ct]))
    known = known[~np.isnan(known)]
    gen, ref = liver_means(generated, maps), liver_means(real, maps)
    keep = ~np.isnan(ref)
    if len(known) < 2 or not keep.any():
        return None
    j = int(np.argmax(np.diff(known)))
    lo, hi = float(known[j]), float(known[j + 1])
    middle = [lo + (hi - lo) / 4, hi - (hi - lo) / 4]
    between = lambda v: float(np.mean((v > middle[0]) & (v < middle[1])))
    return dict(gap=[lo, hi], middle=middle, slices=int(keep.sum()), training_slices=len(known),
                generated_in_gap=between(gen[keep]), real_in_gap=between(ref[keep]),
                generated_below=float(np.mean(gen[keep] <= lo)), real_below=float(np.mean(ref[keep] <= lo)),
                generated_median=float(np.median(gen[keep])), real_median=float(np.median(ref[keep])))


def gradient_energy(image: np.ndarray, where: np.ndarray) -> float:
    gy, gx = np.gradient(image.astype(np.float64))
    return float(np.hypot(gx, gy)[where].mean()) if where.any() else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--steps", type=int, default=None,
                    help="train this many steps instead of --minutes: a budget that other work on the machine does "
                         "not shrink, to compare recipes at equal steps")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n-train", type=int, default=1200, help="training phantoms (seed 0)")
    ap.add_argument("--n-test", type=int, default=400, help="test phantoms (seed 1)")
    ap.add_argument("--few", type=int, default=50, help="real pairs of the small-data comparison")
    ap.add_argument("--real-share", type=float, default=0.5,
                    help="share of each batch the --few real pairs fill when trained with the synthetic ones")
    ap.add_argument("--seg-steps", type=int, default=600, help="segmenter training steps")
    ap.add_argument("--inpaint", type=int, default=40, help="healthy test images to inpaint a lesion into")
    ap.add_argument("--guidance", default="2",
                    help="guidance scale; a comma list (1,2,4) scores adherence at each, the other parts at the first")
    ap.add_argument("--guidance-cutoff", type=float, default=0.0,
                    help="guide only at timesteps from this share of the schedule up (meddiff sample's flag)")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"what to score, comma-separated from {', '.join(PARTS)}: adherence alone takes minutes, "
                         "utility and inpainting most of the time")
    ap.add_argument("--out", default="bench_out/masks")
    ap.add_argument("--grid", default=str(R.ROOT / "docs" / "masks_grid.png"))
    ap.add_argument("--meddiff-args", default="", help="extra flags for meddiff train, after '='")
    ap.add_argument("--reuse", action="store_true",
                    help="skip training: score the run an earlier call trained in --out (same data flags); with "
                         "--steps above its own, train it on to --steps first")
    ap.add_argument("--conditioning", choices=("channel", "spade", "controlnet"), default="channel",
                    help="channel: meddiff's (the map as input channels); spade / controlnet: the same plus SPADE in "
                         "every residual block / a ControlNet encoder copy (benchmarks/_mask_conditioning.py)")
    ap.add_argument("--maps", choices=MAPS, default="lesion",
                    help="condition on the lesion maps (masks=1) or on label maps of lesion and anatomy (masks=2)")
    ap.add_argument("--utility-maps", choices=UTILITY_MAPS, default="training",
                    help="the maps the synthetic pairs of the utility figures (and the copy audit of what they train "
                         "on) are generated from: the training maps themselves, or new maps drawn from them (each "
                         "jittered by its own seed, as `meddiff sample --augment-masks` draws them)")
    ap.add_argument("--map-steps", type=int, default=4269,
                    help="--utility-maps model: steps of the model of label maps (`meddiff train --learn maps` on the "
                         "training pairs' maps, kept in --out/maprun and reused when its data and steps match; "
                         "--out/maprun_ARGS where --map-args are given)")
    ap.add_argument("--map-args", default="",
                    help="--utility-maps model: more `meddiff train` flags for the model of label maps when it is "
                         "trained (e.g. \"--noise-shift 0\", the unshifted schedule of its first figures)")
    ap.add_argument("--map-guidance", type=float, default=1.0,
                    help="--utility-maps model: guidance of the model of label maps' class (`meddiff sample "
                         "--mask-guidance`)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 32 px, tiny preset, seconds")
    R.add_results_arg(ap, "masks")
    a = ap.parse_args()
    parts = [p for p in a.parts.split(",") if p]
    if not parts or set(parts) - set(PARTS):
        raise SystemExit(f"--parts {a.parts}: choose from {', '.join(PARTS)}")
    try:
        scales = [float(g) for g in a.guidance.split(",")]
    except ValueError:
        raise SystemExit(f"--guidance {a.guidance}: a number or a comma list of numbers") from None
    if a.quick:
        a.size, a.minutes, a.n_train, a.n_test, a.few, a.seg_steps, a.inpaint = 32, 0.1, 48, 32, 8, 20, 4
        a.map_steps = 20
        a.steps = None
        a.meddiff_args = a.meddiff_args or "--preset tiny"
        a.out = a.out if a.out != "bench_out/masks" else "bench_out/masks_quick"
        a.grid, a.results = str(Path(a.out) / "grid.png"), str(Path(a.out) / "results.json")
    from meddiff.export import make_grid, save_png
    from meddiff.metrics.memorization import memorization_report
    from meddiff.metrics.segmentation import adherence_figures
    from meddiff.runtime import pick_device, pick_precision
    from meddiff.sample import load_run

    mach = R.machine(pick_precision("auto", pick_device("auto")))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if a.reuse:  # the run an earlier call trained in --out: score it again (another --guidance, a fixed metric)
        if not (out / "run" / "meddiff.json").exists():
            raise SystemExit(f"--reuse: no trained run in {out / 'run'}; run once without --reuse first")
        record = json.loads((out / "run" / "meddiff.json").read_text())
        want = dict(size=a.size, data=phantom_spec(a.n_train, a.maps))
        if any(record["train"].get(k) != v for k, v in want.items()):
            raise SystemExit(f"--reuse: the run in {out / 'run'} trained on {record['train'].get('data')} at "
                             f"{record['train'].get('size')} px, not {want['data']} at {a.size} px")
        trained = record["result"]
        if a.steps and a.steps < trained["steps"]:
            raise SystemExit(f"--steps {a.steps}: the run in {out / 'run'} is trained {trained['steps']} steps already")
        if a.steps and a.steps > trained["steps"] and a.conditioning != "channel":
            raise SystemExit(f"--reuse --steps: extends runs of --conditioning channel only, not {a.conditioning}")
        trained = extend_run(out, trained, a.steps or trained["steps"])
    else:
        trained = train_model(out, a.n_train, a.size, a.minutes, a.meddiff_args.split(), a.conditioning, a.steps,
                              a.maps)
    print(f"trained: {trained['steps']} steps in {trained['seconds']:.0f} s", flush=True)
    if a.conditioning != "channel":
        from _mask_conditioning import load_variant_run
        try:
            run = load_variant_run(a.conditioning, out / "run")
        except RuntimeError:  # the weights of a run trained otherwise do not fit
            raise SystemExit(f"--conditioning {a.conditioning}: the run in {out / 'run'} was not trained with "
                             f"it") from None
    else:
        run = load_run(out / "run")
    train, test = load_pairs(a.n_train, 0, a.size, a.maps), load_pairs(a.n_test, 1, a.size, a.maps)
    if a.utility_maps == "model" and {"utility", "copies"} & set(parts):
        map_run, summary_maps = map_model(out, a)
        train["map_run"], train["map_guidance"] = map_run, a.map_guidance
        summary_maps["guidance"] = a.map_guidance
    seg_real = real_segmenter(out, train, a.seg_steps) if {"adherence", "utility"} & set(parts) else None
    summary: dict = dict(parts=parts, training=trained, guidance=scales[0], guidance_cutoff=a.guidance_cutoff,
                         mask_loss_weight=getattr(run.train, "mask_loss_weight", 0.0),
                         sampler="the run's default (UniPC 10)",
                         grid=a.grid, conditioning=a.conditioning, maps=a.maps, utility_maps=a.utility_maps,
                         parameters=sum(p.numel() for p in run.unet.parameters()))
    if "map_run" in train:
        summary["map_model"] = summary_maps

    # 2. adherence
    abn = [i for i, c in enumerate(test["classes"]) if c.endswith("abnormal")]
    modality = [test["classes"][i].split("/")[0] for i in abn]
    sweep, phases, gen = {}, {}, None
    for g in scales if "adherence" in parts else scales[:1]:
        gen_g = generate_for(run, test["masks"][abn], [test["classes"][i] for i in abn], g, 10_000, a.guidance_cutoff)
        gen = gen_g if gen is None else gen  # the first scale's images: the copies audit and the grid
        if "adherence" in parts:
            sweep[f"{g:g}"] = adherence_figures(seg_real, gen_g, test["lesions"][abn], test["images"][abn],
                                                test["lesions"][abn], modality, modality, overall=False)
            for m, f in sweep[f"{g:g}"].items():
                print(f"guidance {g:g}, adherence {m}: Dice {f['generated']['dice']:.3f} (real images "
                      f"{f['real']['dice']:.3f})", flush=True)
            ct = np.array([m == "ct" for m in modality])
            phase = phase_figures(gen_g[ct], test["images"][abn][ct], test["masks"][abn][ct], train)
            if phase:
                phases[f"{g:g}"] = phase
                print(f"guidance {g:g}, CT liver between the contrast phases: {phase['generated_in_gap']:.0%} of "
                      f"{phase['slices']} slices (real images {phase['real_in_gap']:.0%})", flush=True)
    if sweep:
        summary["adherence"] = sweep[f"{scales[0]:g}"]
        if len(sweep) > 1:
            summary["adherence_by_guidance"] = sweep
    if phases:
        summary["ct_phase"] = phases  # by guidance scale
    if "utility" in parts:
        utility = utility_figures(run, seg_real, train, test, a, scales[0])
        shown = utility.pop("pairs")
        summary.update(utility)
    if "inpainting" in parts:
        summary["inpainting"] = inpainting_figures(run, train, test, abn, a, scales[0])
    if "copies" in parts:  # 5. the generated adherence images against the training images
        audit = memorization_report(gen, train["images"], test["images"])
        summary["copies"] = dict(share=audit.n_flagged / max(len(gen), 1), threshold=float(audit.threshold))
        key = f"from_{a.utility_maps}_maps"
        summary["copies"][key] = training_map_copies(run, train, scales[0], a.guidance_cutoff, audit.threshold,
                                                     a.utility_maps)
        if a.utility_maps == "model":
            summary["map_copies"] = drawn_map_copies(train, test)

    if "utility" in parts and a.utility_maps != "training":  # the grid shows the pairs made from new or drawn maps
        summary["grid_shows"] = a.utility_maps
        asked, made, classes = shown
    else:  # the first scale's adherence pairs
        asked, made, classes = test["masks"][abn], gen, [test["classes"][i] for i in abn]
    per_mod = [next((k for k, c in enumerate(classes) if c == m + "/abnormal"), None) for m in MODALITIES]
    tiles = [t for k in per_mod if k is not None for t in (_shown(asked[k]), made[k])]
    if tiles:
        Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
        save_png(make_grid(np.stack(tiles), ncols=2), Path(a.grid))
    summary["seconds"] = time.time() - t0
    R.write_results(a.results, "masks", mach, vars(a), [], summary)


def pair_maps(train: dict, rows: np.ndarray, mode: str, seed0: int) -> tuple[np.ndarray, np.ndarray]:
    """The maps images are generated from for training rows `rows`, and their bool lesion maps (--utility-maps
    `mode`): the training maps themselves; (new) each one jittered by seed seed0 + its place in `rows`, as
    `meddiff sample --augment-masks` draws a new map from a given one; or (model) one drawn by the model of label
    maps for the row's class, seed seed0 + its place, as `meddiff sample --mask-run` draws them."""
    from meddiff.data.dataset import jitter_label_map
    from meddiff.data.phantoms import LESION

    maps = train["masks"][rows]
    if mode == "new":
        maps = np.stack([jitter_label_map(m, seed0 + k) for k, m in enumerate(maps)])
    elif mode == "model":
        maps = drawn_maps(train["map_run"], [train["classes"][i] for i in rows], seed0,
                          train.get("map_guidance", 1.0))
    return maps, maps == LESION


def map_model(out: Path, a: argparse.Namespace) -> tuple[object, dict]:
    """--utility-maps model: the model of label maps trained on the training pairs' maps (`meddiff train --learn
    maps`, the image run's data, --map-steps), in --out/maprun (--out/maprun_ARGS with --map-args, so a model
    trained with other flags is never taken for it); a run there with the same data is reused, trained on to
    --map-steps first where it has fewer (`extend_run`: the run resumed towards the farther goal, noted in
    maprun/extended.json), and one with more steps refused. → (the loaded run, what the results keep of it)."""
    from meddiff.sample import load_run

    folder = out / "".join(["maprun", *("_" + re.sub(r"[^A-Za-z0-9.+=-]", "", f) for f in a.map_args.split())])
    want = dict(size=a.size, data=phantom_spec(a.n_train, a.maps), learn="maps")
    if (folder / "meddiff.json").exists():
        record = json.loads((folder / "meddiff.json").read_text())
        if any(record["train"].get(k) != v for k, v in want.items()):
            raise SystemExit(f"--utility-maps model: the run in {folder} is not one of {want}; move it away")
        trained = record["result"]
        if trained["steps"] > a.map_steps:
            raise SystemExit(f"--map-steps {a.map_steps}: the run in {folder} is trained {trained['steps']} steps")
        trained = extend_run(folder, trained, a.map_steps, run=folder)
    else:
        extra = ["--preset", "tiny"] if a.quick else []
        trained = _train_call(["-m", "meddiff.cli", "train", "--data", want["data"], "--size", str(a.size),
                               "--learn", "maps", "--max-steps", str(a.map_steps), "--out", str(folder),
                               "--no-progress", *extra, *a.map_args.split()])
    print(f"model of label maps: {trained['steps']} steps in {trained['seconds']:.0f} s", flush=True)
    run = load_run(folder, maps=True)
    return run, dict(steps=trained["steps"], seconds=trained["seconds"], preset=run.train.preset,
                     noise_shift=run.train.noise_shift, noise_shift_clean=run.train.noise_shift_clean,
                     parameters=sum(p.numel() for p in run.unet.parameters()), values=list(run.model.map_values),
                     **{k: trained[k] for k in ("extended_from", "extended_through") if k in trained})


def drawn_maps(map_run, classes: list[str], seed0: int, guidance: float = 1.0) -> np.ndarray:
    """One map per class in `classes` from the model of label maps, seeds seed0, seed0 + 1, … in batches of one
    class, at `guidance` (`meddiff.sample.draw_maps`, the sampler `meddiff sample --mask-run` uses)."""
    from meddiff.sample import class_index, draw_maps

    return by_class(classes, seed0, lambda seeds, name, _rows: draw_maps(
        map_run, seeds, class_index(map_run, name), guidance=guidance))


def map_agreement(maps: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each map, its nearest in `gallery` (as it is or mirrored left-right, as training flips): the share of
    the pixels labelled in either map that hold the same label in both (1: the same map). → (agreement, index)."""
    flat = gallery.reshape(len(gallery), -1)
    mirrored = gallery[..., ::-1].reshape(len(gallery), -1)
    best, index = np.zeros(len(maps)), np.zeros(len(maps), np.int64)
    for k, m in enumerate(maps):
        m = m.reshape(1, -1)
        scores = []
        for g in (flat, mirrored):
            either = ((m != 0) | (g != 0)).sum(1)
            scores.append(((m == g) & (m != 0)).sum(1) / np.maximum(either, 1))
        score = np.maximum(*scores)
        index[k], best[k] = int(score.argmax()), float(score.max())
    return best, index


def drawn_map_copies(train: dict, test: dict, n: int = 200) -> dict:
    """The model of label maps against the training maps: each drawn map's nearest training map by label
    agreement (`map_agreement`), with the held-out test maps' nearest as the reference (the threshold: their 0.99
    quantile, as the image audit sets its own); the share of drawn maps above it, medians, and how often a drawn
    map for an abnormal class holds a lesion (and for a normal class none), beside the training maps' rates."""
    from meddiff.data.phantoms import LESION

    rows = np.random.default_rng(1).choice(len(train["images"]), min(n, len(train["images"])), replace=False)
    classes = [train["classes"][i] for i in rows]
    drawn = drawn_maps(train["map_run"], classes, 60_000, train.get("map_guidance", 1.0))
    ref, _ = map_agreement(test["masks"], train["masks"])
    near, _ = map_agreement(drawn, train["masks"])
    threshold = float(np.quantile(ref, 0.99))

    def lesion_rates(maps: np.ndarray, names: list[str]) -> dict:
        has = (maps == LESION).any(axis=(1, 2))
        abnormal = np.array([c.endswith("abnormal") for c in names])
        area = (maps == LESION).mean(axis=(1, 2))
        return dict(abnormal_with_lesion=float(has[abnormal].mean()), normal_with_lesion=float(has[~abnormal].mean()),
                    lesion_area_abnormal=float(area[abnormal].mean()))

    modality = np.array([c.split("/")[0] for c in classes])
    test_modality = np.array([c.split("/")[0] for c in test["classes"]])
    by_modality = {m: dict(median_nearest=float(np.median(near[modality == m])),
                           heldout_median_nearest=float(np.median(ref[test_modality == m])))
                   for m in MODALITIES if (modality == m).any() and (test_modality == m).any()}
    out = dict(maps=len(drawn), threshold=threshold, share_flagged=float(np.mean(near > threshold)),
               median_nearest=float(np.median(near)), heldout_median_nearest=float(np.median(ref)),
               by_modality=by_modality,
               drawn=lesion_rates(drawn, classes), training=lesion_rates(train["masks"], train["classes"]))
    print(f"drawn maps against the training maps: {json.dumps(out)}", flush=True)
    return out


def training_map_copies(run, train: dict, guidance: float, cutoff: float, threshold: float, mode: str = "training",
                        n: int = 200) -> dict:
    """Images generated from training maps (what the utility figures train on; with `mode` new or model, from new
    maps jittered from them or drawn by the model of label maps) against the training images, at the adherence
    images' copy threshold: the share flagged, the median nearest NCC, and how often the nearest training image is
    the one the map came from (a drawn map came from none: the row only gave its class): a map that carries the
    anatomy can carry the patient with it. With new maps the gallery also holds each source image moved by its
    map's jitter (`jitter_image`): a copy of a training image turned, scaled or shifted with its map is flagged."""
    from meddiff.data.dataset import jitter_image
    from meddiff.metrics.memorization import memorization_report

    new = mode == "new"
    rows = np.random.default_rng(1).choice(len(train["images"]), min(n, len(train["images"])), replace=False)
    maps, _ = pair_maps(train, rows, mode, 40_000)
    own = generate_for(run, maps, [train["classes"][i] for i in rows], guidance, 40_000, cutoff)
    gallery = train["images"]
    if new:
        moved = np.stack([jitter_image(train["images"][i], 40_000 + k) for k, i in enumerate(rows)])
        gallery = np.concatenate([gallery, moved])
    audit = memorization_report(own, gallery, threshold=threshold)
    source = (audit.index == rows) | (audit.index == len(train["images"]) + np.arange(len(rows)))
    out = dict(share=audit.n_flagged / len(own), images=len(own), median_ncc=float(np.median(audit.nearest)),
               nearest_is_source=float(np.mean(source)))
    if new:  # the nearest is one of the moved source images (its own or another map's), not an image as it was
        out["nearest_is_moved_source"] = float(np.mean(audit.index >= len(train["images"])))
    if mode == "model":
        del out["nearest_is_source"]
    print(f"copies from {mode} maps: {json.dumps(out)}", flush=True)
    return out


def real_segmenter(out: Path, train: dict, steps: int):
    """The segmenter trained on the real training pairs (what reads adherence), kept in --out as safetensors
    and taken from there when the same pairs and steps made it: a guidance sweep trains it once."""
    from safetensors.torch import load_file, save_file

    from meddiff.metrics.segmentation import Segmenter, train_segmenter

    key = f"{len(train['images'])}-{train['images'].shape[-1]}-{steps}"
    path = out / f"segmenter_real_{key}.safetensors"
    if path.exists():
        net = Segmenter()
        net.load_state_dict(load_file(str(path)))
        return net.eval()
    net = train_segmenter(train["images"], train["lesions"], steps)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return net


def utility_figures(run, seg_real, train: dict, test: dict, a: argparse.Namespace, guidance: float) -> dict:
    """3. Segmenters trained on synthetic pairs (from the training maps or new maps: --utility-maps), on real ones,
    on a few real ones with and without the synthetic ones, all tested on the real test pairs. `pairs`: the
    synthetic pairs' maps, images and classes, for the grid (not a figure)."""
    from meddiff.metrics.segmentation import dice_comparison, dice_figure, segment, train_segmenter

    asked, lesions = pair_maps(train, np.arange(len(train["images"])), a.utility_maps, 20_000)
    syn = generate_for(run, asked, train["classes"], guidance, 20_000, a.guidance_cutoff)
    seg_syn = train_segmenter(syn, lesions, a.seg_steps)
    rng = np.random.default_rng(0)
    few = rng.choice(len(train["images"]), min(a.few, len(train["images"])), replace=False)
    seg_few = train_segmenter(train["images"][few], train["lesions"][few], a.seg_steps)
    # the few real pairs fill --real-share of every batch, the synthetic ones the rest, whatever their counts
    share = np.r_[np.full(len(few), a.real_share / len(few)), np.full(len(syn), (1 - a.real_share) / len(syn))]
    seg_mix = train_segmenter(np.concatenate([train["images"][few], syn]),
                              np.concatenate([train["lesions"][few], lesions]), a.seg_steps, weights=share)
    maps = {name: segment(net, test["images"])
            for name, net in (("real", seg_real), ("synthetic", seg_syn), (f"real_{a.few}", seg_few),
                              (f"real_{a.few}_plus_synthetic", seg_mix))}
    on_test = {name: dice_figure(m, test["lesions"]) for name, m in maps.items()}
    for name, f in on_test.items():
        print(f"utility {name}: Dice {f['dice']:.3f} {f['dice_ci95']}", flush=True)
    # paired over the same test images: synthetic-only against real-only, real + synthetic against the few real
    paired = dict(synthetic_vs_real=dice_comparison(maps["real"], maps["synthetic"], test["lesions"]),
                  plus_synthetic_vs_few=dice_comparison(maps[f"real_{a.few}"], maps[f"real_{a.few}_plus_synthetic"],
                                                        test["lesions"]))
    print(f"utility paired: {json.dumps(paired)}", flush=True)
    # the same comparison within each modality: where synthetic-only training falls short of real-only
    modality = np.array([c.split("/")[0] for c in test["classes"]])
    by_modality = {m: dice_comparison(maps["real"][modality == m], maps["synthetic"][modality == m],
                                      test["lesions"][modality == m]) for m in MODALITIES if (modality == m).any()}
    for m, f in by_modality.items():
        print(f"utility {m}: synthetic / real Dice {f['ratio']} {f['ratio_ci95']}", flush=True)
    return dict(utility=on_test, utility_paired=paired, utility_ratio=paired["synthetic_vs_real"]["ratio"],
                utility_by_modality=by_modality, real_share=a.real_share, pairs=(asked, syn, train["classes"]))


def edge_contrast(image: np.ndarray, region: np.ndarray, edge: np.ndarray | None = None) -> float:
    """How far the region's border pixels inside it stand from those just outside: |mean in - mean out| on the
    border ring (`edge`, the region's `ring` when not given). A lesion drawn brighter or darker than real ones
    raises the seam's gradient energy without any seam; this says which it is."""
    edge = ring(region) if edge is None else edge
    inside, outside = edge & region, edge & ~region
    if not inside.any() or not outside.any():
        return float("nan")
    return float(abs(image[inside].mean() - image[outside].mean()))


def inpainting_figures(run, train: dict, test: dict, abn: list[int], a: argparse.Namespace, guidance: float) -> dict:
    """4. Healthy test images given an abnormal test image's lesion region: the change outside it, the share a
    detector trained on real phantoms calls abnormal (beside its reach on real lesions and on healthy images), the
    seam. The feature classifier earlier files used reads the same images too (`feature_classifier`)."""
    from meddiff.metrics.classifier import DESCRIPTION, classifier_features, fit_classifier
    from meddiff.metrics.features import get_extractor
    from meddiff.data.phantoms import LESION
    from meddiff.metrics.segmentation import DETECTOR, detect, train_detector
    from meddiff.sample import inpaint

    extractor = get_extractor("randconv", resolution=a.size)
    is_abn = np.array([c.endswith("abnormal") for c in train["classes"]])
    clf = fit_classifier(classifier_features(train["images"], extractor(train["images"])), is_abn.astype(np.int64))
    det = train_detector(train["images"], is_abn, a.seg_steps)
    healthy = [i for i, c in enumerate(test["classes"]) if c.endswith("/normal")][:a.inpaint]
    changed, outside, seam_gen, seam_real, results = [], [], [], [], []
    contrast_gen, contrast_real = [], []
    for j, i in enumerate(healthy):
        modality = test["classes"][i].split("/")[0]
        donors = [k for k in abn if test["classes"][k].startswith(modality + "/") and test["lesions"][k].any()]
        if not donors:
            continue
        donor = donors[j % len(donors)]
        region = test["lesions"][donor]
        # the map the region is asked with: the healthy image's own (its anatomy, with --maps anatomy), the lesion
        # drawn over it
        cond = np.where(region, LESION, test["masks"][i]).astype(np.int64)
        img = inpaint(run, test["images"][i], region, [30_000 + j], run.class_names.index(f"{modality}/abnormal"),
                      guidance=guidance, cond_mask=cond, guidance_cutoff=a.guidance_cutoff)[0]
        results.append(img)
        outside.append(float(np.abs(img - test["images"][i])[~region].max()))
        edge = ring(region)  # one border ring for the seam and the contrast, generated and real
        seam_gen.append(gradient_energy(img, edge))
        seam_real.append(gradient_energy(test["images"][donor], edge))
        contrast_gen.append(edge_contrast(img, region, edge))
        contrast_real.append(edge_contrast(test["images"][donor], region, edge))
        changed.append(i)

    def share(calls: np.ndarray) -> dict:
        return dict(share=float(np.mean(calls)), ci95=R.bootstrap_mean(np.asarray(calls, float))["ci95"],
                    images=len(calls)) if len(calls) else {}

    # each reader's reach: real abnormal test images of the inpainted modalities (the reference), and the healthy
    # images before inpainting (how often it calls a healthy image abnormal)
    mods = {test["classes"][i].split("/")[0] for i in changed}
    real_rows = [k for k in abn if test["classes"][k].split("/")[0] in mods]
    real_abnormal = [test["images"][k] for k in real_rows]
    readers = dict(detector=lambda x: detect(det, x),
                   feature_classifier=lambda x: clf.predict(classifier_features(x, extractor(x))))
    said = {name: {what: read(np.stack(images)) if len(images) else np.zeros(0, bool)
                   for what, images in (("inpainted", results), ("real_abnormal_called", real_abnormal),
                                        ("healthy_before_called", [test["images"][i] for i in changed]))}
            for name, read in readers.items()}  # each reader's call on each image, read once
    calls = {name: {what: share(c) for what, c in by_what.items()} for name, by_what in said.items()}
    detected = calls["detector"]["inpainted"]
    # the detector per modality: inpainted lesions beside real ones of the same modality
    modality_of = lambda rows: np.array([test["classes"][i].split("/")[0] for i in rows])
    on = said["detector"]
    by_modality = {m: dict(inpainted=share(on["inpainted"][modality_of(changed) == m]),
                           real=share(on["real_abnormal_called"][modality_of(real_rows) == m])) for m in sorted(mods)}
    inpainting = dict(images=len(results), max_change_outside=max(outside) if outside else None,
                      detected_abnormal=detected.get("share"), detected_ci95=detected.get("ci95"),
                      detector=DETECTOR, detected_by_modality=by_modality,
                      real_abnormal_called=calls["detector"]["real_abnormal_called"],
                      healthy_before_called=calls["detector"]["healthy_before_called"],
                      feature_classifier=dict(protocol=DESCRIPTION, **calls["feature_classifier"]),
                      seam_gradient_generated=float(np.nanmean(seam_gen)) if seam_gen else None,
                      seam_gradient_real_lesions=float(np.nanmean(seam_real)) if seam_real else None,
                      edge_contrast_generated=float(np.nanmean(contrast_gen)) if contrast_gen else None,
                      edge_contrast_real_lesions=float(np.nanmean(contrast_real)) if contrast_real else None)
    print(f"inpainting: {json.dumps(inpainting)}", flush=True)
    return inpainting


if __name__ == "__main__":
    main()
