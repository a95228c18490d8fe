"""A data spec (a folder, `builtin:…`) → cached (N, 1, S, S) images in [-1, 1], labels, groups and a split.

Specs: a folder (searched recursively; immediate sub-folders are classes), `builtin:mni-mri` (axial slices of
the MNI152 T1 template shipped by nilearn), `builtin:phantoms` / `builtin:ct|xray|mri|us` (MedPhantom-4), each
with optional `?n=…&size=…&seed=…`; `medmnist:PATH.npz[?split=train|val|test|all]` (a MedMNIST+ file).
Only safe metadata leaves this module: counts, formats, sizes — never file names of patients' files in summaries.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import check_out_dir
from ..config import HELDOUT_SPLITS, IMAGE_SIZE, IMAGES, SEEDS, Bounds, check_value, show
from ..errors import ConfigError, DataError, UnreadableFile
from ..runtime import available_memory
from . import cache, readers
from .folders import write_class_folders
from .medmnist import load_npz
from .phantoms import MODALITIES, render

BUILTINS = ("mni-mri", "phantoms", "ct", "xray", "mri", "us")
# the parameters of `builtin:…?n=…&size=…&seed=…`; size is the phantoms' render size (MedPhantom-4's range)
BUILTIN_PARAMS: dict[str, Bounds] = {"n": IMAGES, "size": Bounds(32, 256, whole=True), "seed": SEEDS}
CONTIGUOUS_RUNS = 10  # runs a "contiguous" split cuts a set into


@dataclass
class ImageSet:
    """Images ready for training. `images`: (N, 1, S, S) float32 in [-1, 1]."""

    images: torch.Tensor
    labels: torch.Tensor                 # (N,) int64 index into class_names
    class_names: tuple[str, ...]
    groups: np.ndarray                   # (N,) int64: images of one patient/volume share a group
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)
    summary: dict[str, Any] = field(default_factory=dict)          # counts per class/format, sizes

    def __len__(self) -> int:
        return len(self.images)


def parse_spec(spec: str, flag: str = "--data") -> tuple[str, str, dict[str, str]]:
    """'builtin:phantoms?n=200' → ('builtin', 'phantoms', {'n': '200'}); a path → ('folder', path, {}).
    Errors name `flag`, the option the spec came from."""
    if spec.startswith("builtin:"):
        name, _, query = spec[len("builtin:"):].partition("?")
        if name not in BUILTINS:
            raise DataError(f"{flag} {spec!r}: unknown built-in data set {name!r}; "
                            f"choose from {', '.join('builtin:' + b for b in BUILTINS)}")
        try:  # keep blank values so that `n=` is refused below instead of silently meaning the default
            params = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
        except ValueError:
            raise DataError(f"{flag} {spec!r}: malformed parameters {query!r}; expected e.g. "
                            f"builtin:{name}?n=200&seed=1") from None
        unknown = set(params) - set(BUILTIN_PARAMS)
        if unknown:
            raise DataError(f"{flag} {spec!r}: unknown parameter(s) {', '.join(sorted(unknown))}; allowed: n, size, seed")
        for k, v in params.items():
            bounds = BUILTIN_PARAMS[k]
            if not (v.isascii() and v.isdigit() and len(v) <= 20 and bounds.allows(int(v))):
                raise DataError(f"{flag} {spec!r}: {k}={show(v)} must be {bounds.describe()}")
        return "builtin", name, params
    if spec.startswith("medmnist:"):
        path, params = _parse_medmnist(spec, flag)
        return "medmnist", path, params
    return "folder", spec, {}


def _parse_medmnist(spec: str, flag: str) -> tuple[str, dict[str, str]]:
    """'medmnist:PATH.npz?split=all' → ('PATH.npz', {'split': 'all'}); split defaults to train."""
    path, _, query = spec[len("medmnist:"):].partition("?")
    params = dict(parse_qsl(query, keep_blank_values=True))
    if set(params) - {"split"} or params.get("split", "train") not in ("train", "val", "test", "all"):
        raise DataError(f"{flag} {spec!r}: allowed parameter: split=train|val|test|all (e.g. "
                        "medmnist:pneumoniamnist_64.npz?split=all)")
    if not path.endswith(".npz"):
        raise DataError(f"{flag} {spec!r}: expected a MedMNIST .npz file after medmnist:")
    return path, params


def to_square(image: np.ndarray, size: int, crop: bool = False) -> np.ndarray:
    """(H, W) float in [0, 1] → (size, size) float32: aspect kept by zero-padding (or centre-cropping), then an
    antialiased bicubic resize."""
    h, w = image.shape
    if crop:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        square = image[top:top + s, left:left + s]
    else:
        s = max(h, w)
        square = np.zeros((s, s), np.float32)
        top, left = (s - h) // 2, (s - w) // 2
        square[top:top + h, left:left + w] = image
    if s == size:
        return np.asarray(square, np.float32)
    t = torch.from_numpy(np.ascontiguousarray(square, np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0, 0].clamp(0, 1).numpy()


def _stable_id(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")


# ---------------------------------------------------------------- folders

def _class_of(rel: Path, label_depth: int, flat: bool) -> str:
    if flat:
        return "all"
    return "/".join(rel.parts[:label_depth])


def _group_of(rel: Path, label_depth: int, flat: bool) -> str:
    """Images in a sub-folder below the class folder (a patient or a study) form one group; else each file does."""
    below = rel.parts[0 if flat else label_depth:]
    return "/".join(rel.parts[:len(rel.parts) - len(below) + 1]) if len(below) > 1 else str(rel)


def _scan_folder(root: Path, label_depth: int, exclude: tuple[str, ...] = (),
                 flag: str = "--data") -> tuple[list[Path], list[tuple[str, str]], bool]:
    if not root.exists():
        raise DataError(f"{flag} {str(root)!r}: no such file or folder")
    if not root.is_dir():
        raise DataError(f"{flag} {str(root)!r}: not a folder (give a folder of images, or builtin:…)")
    files, ignored = readers.find_image_files(root)
    files = [f for f in files if f.name not in exclude]
    flat = all(len(f.relative_to(root).parts) <= label_depth for f in files)
    return files, [(str(p), r) for p, r in ignored], flat


def _read_folder(root: Path, size: int, crop: bool, label_depth: int, nifti_axis: str,
                 exclude: tuple[str, ...] = (), flag: str = "--data") -> tuple[np.ndarray, dict[str, Any]]:
    files, skipped, flat = _scan_folder(root, label_depth, exclude, flag)
    n_ignored = len(skipped)  # not image files: counted among the files seen
    images, classes, groups, formats, shapes = [], [], [], {}, {}
    for path in files:
        try:
            items = readers.read_file(path, nifti_axis=nifti_axis)
        except UnreadableFile as err:
            skipped.append((err.path, err.reason))
            continue
        rel = path.relative_to(root)
        if not flat and len(rel.parts) <= label_depth:
            skipped.append((str(path), f"not inside a class folder ({label_depth} level(s) below {root})"))
            continue
        for image, meta in items:
            images.append(to_square(image, size, crop))
            classes.append(_class_of(rel, label_depth, flat))
            groups.append(_group_of(rel, label_depth, flat))
            formats[meta.format] = formats.get(meta.format, 0) + 1
            key = "x".join(map(str, image.shape))
            shapes[key] = shapes.get(key, 0) + 1
    sidecar = dict(classes=classes, groups=[_stable_id(g) for g in groups], skipped=skipped,
                   formats=formats, source_shapes=shapes, files=len(files) + n_ignored)
    return cache.to_uint16(np.stack(images)) if images else np.zeros((0, size, size), np.uint16), sidecar


def _folder_key(root: Path, size: int, crop: bool, label_depth: int, nifti_axis: str,
                exclude: tuple[str, ...]) -> str:
    stats = []
    for dirpath, _dirs, names in os.walk(root):
        for name in sorted(names):
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                continue
            stats.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return cache.cache_key("folder", sorted(stats), size, crop, label_depth, nifti_axis, exclude)


# ---------------------------------------------------------------- built-in data

def _mni_slices(size: int, n: int | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Axial slices of the 1 mm MNI152 T1 template (nilearn ships it), anterior up, slabs of 8 slices per group."""
    from nilearn.datasets import load_mni152_template  # ~2 s to import: only when builtin:mni-mri is asked for

    vol = np.asarray(load_mni152_template(resolution=1).get_fdata(), np.float32)  # (x, y, z), RAS
    vol = vol / max(float(np.percentile(vol, 99.9)), 1e-6)
    levels = [z for z in range(vol.shape[2]) if (vol[:, :, z] > 0.1).mean() > 0.05]
    if n is not None and n < len(levels):
        levels = [levels[int(i)] for i in np.linspace(0, len(levels) - 1, n).round()]
    images = [to_square(np.clip(np.rot90(vol[:, :, z]), 0, 1), size) for z in levels]
    sidecar = dict(classes=["mri"] * len(levels), groups=[z // 8 for z in levels], skipped=[],
                   formats={"nifti": len(levels)}, source_shapes={f"{vol.shape[1]}x{vol.shape[0]}": len(levels)},
                   files=1)
    return cache.to_uint16(np.stack(images)), sidecar


def phantom_items(name: str, n: int) -> list[tuple[str, int, bool]]:
    """(modality, index, abnormal) for the i-th image of `builtin:<name>`: modalities and findings interleaved
    so that any n is balanced."""
    mods = MODALITIES if name == "phantoms" else (name,)
    return [(mods[i % len(mods)], i, bool((i // len(mods)) % 2)) for i in range(n)]


def _render_one(item: tuple[str, int, bool, int, int]) -> np.ndarray:
    modality, index, abnormal, seed, size = item
    return render(modality, index, seed, size, abnormal)


def render_phantoms(name: str, n: int, seed: int, size: int, workers: int | None = None) -> list[np.ndarray]:
    """The n images of `builtin:<name>` as (size, size) float32 arrays in [0, 1], rendered in parallel."""
    items = [(m, i, a, seed, size) for m, i, a in phantom_items(name, n)]
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers == 1 or n < 64:
        return [_render_one(it) for it in items]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_render_one, items, chunksize=16))


def _phantoms(name: str, n: int, seed: int, render_size: int, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    items = phantom_items(name, n)
    images = [to_square(im, size) for im in render_phantoms(name, n, seed, render_size)]
    classes = [f"{m}/{'abnormal' if a else 'normal'}" for m, _i, a in items]
    sidecar = dict(classes=classes, groups=list(range(n)), skipped=[], formats={"phantom": n},
                   source_shapes={f"{render_size}x{render_size}": n}, files=0)
    return cache.to_uint16(np.stack(images)), sidecar


def _medmnist_file(path: Path, part: str, size: int, crop: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """A MedMNIST .npz split → uint16 images + sidecar; labels named from the catalogue (see medmnist.py).
    MedMNIST holds no patient ids, so each image is its own group."""
    images, labels, names = load_npz(path, part)
    out = [to_square(im.astype(np.float32) / 255.0, size, crop) for im in images]
    shape = "x".join(map(str, images.shape[1:]))
    sidecar = dict(classes=[names[k] for k in labels], groups=list(range(len(images))), skipped=[],
                   formats={"medmnist-npz": len(images)}, source_shapes={shape: len(images)}, files=1)
    return cache.to_uint16(np.stack(out)), sidecar


# ---------------------------------------------------------------- public entry points

def check_memory(what: str, n: int, need: int) -> None:
    """DataError before `n` images that need `need` bytes are made, when the system has less memory free."""
    free = available_memory(torch.device("cpu"))
    if need > free:
        raise DataError(f"{what}: {n} images need about {need / 2**30:.1f} GiB of memory and "
                        f"{free / 2**30:.1f} GiB are available; ask for fewer or smaller images")


def load_data(spec: str, size: int, *, crop: bool = False, label_depth: int = 1,
              cache_dir: str | Path | None = None, nifti_axis: str = "axial",
              exclude: tuple[str, ...] = (), flag: str = "--data") -> ImageSet:
    """Load a data spec at `size` px, using and filling the cache. Zero readable images is a DataError.
    `exclude`: file names to leave out of a folder (e.g. a sample folder's grid.png); errors name `flag`."""
    kind, name, params = parse_spec(spec, flag)
    if kind == "folder":
        root = Path(name).expanduser()
        key = _folder_key(root, size, crop, label_depth, nifti_axis, exclude) if root.is_dir() else ""
        stored, side = cache.load_or_build(Path(cache_dir) if cache_dir and key else None, key,
                                           lambda: _read_folder(root, size, crop, label_depth, nifti_axis, exclude, flag))
    elif kind == "medmnist":
        path, part = Path(name).expanduser(), params.get("split", "train")
        st = path.stat() if path.is_file() else None
        key = cache.cache_key("medmnist", str(path.resolve()), st.st_size, st.st_mtime_ns, part, size,
                              crop) if st else ""
        stored, side = cache.load_or_build(Path(cache_dir) if cache_dir and key else None, key,
                                           lambda: _medmnist_file(path, part, size, crop))
    elif name == "mni-mri":
        n = int(params["n"]) if "n" in params else None
        stored, side = cache.load_or_build(Path(cache_dir) if cache_dir else None, cache.cache_key(spec, size),
                                           lambda: _mni_slices(size, n))
    else:
        n, seed = int(params.get("n", 400)), int(params.get("seed", 0))
        render_size = int(params.get("size", size))
        if not BUILTIN_PARAMS["size"].allows(render_size):
            raise DataError(f"{flag} {spec!r}: size={render_size} must be {BUILTIN_PARAMS['size'].describe()}")
        check_memory(f"{flag} {spec!r}", n, n * (render_size**2 * 4 + size**2 * 12))
        stored, side = cache.load_or_build(Path(cache_dir) if cache_dir else None,
                                           cache.cache_key("phantoms", name, n, seed, render_size, size),
                                           lambda: _phantoms(name, n, seed, render_size, size))
    if len(stored) == 0:
        reasons = "; ".join(f"{p}: {r}" for p, r in side["skipped"][:3])
        raise DataError(f"{flag} {spec!r}: no readable images found" + (f" (skipped {len(side['skipped'])}: "
                        f"{reasons}{' …' if len(side['skipped']) > 3 else ''})" if side["skipped"] else ""))
    class_names = tuple(sorted(set(side["classes"])))
    labels = torch.tensor([class_names.index(c) for c in side["classes"]], dtype=torch.long)
    images = torch.from_numpy(cache.from_uint16(np.asarray(stored)))[:, None] * 2 - 1
    counts = {c: int((labels == i).sum()) for i, c in enumerate(class_names)}
    summary = dict(images=len(images), classes=counts, formats=side["formats"], source_shapes=side["source_shapes"],
                   size=size, files=int(side.get("files", 0)), skipped=len(side["skipped"]))
    return ImageSet(images, labels, class_names, np.asarray(side["groups"], np.int64),
                    [tuple(s) for s in side["skipped"]], summary)


def skipped_listing(data: ImageSet, spec: str) -> str:
    """The skipped files as text, one `path: reason` line each in path order, paths relative to the data folder `spec`: no
    patient data beyond the file names the user chose (reasons never quote DICOM attributes). Empty if none."""
    kind, name, _params = parse_spec(spec)
    root = Path(name).expanduser() if kind == "folder" else None
    lines = []
    for path, reason in sorted(data.skipped):
        shown = os.path.relpath(path, root) if root is not None and Path(path).is_relative_to(root) else path
        lines.append(f"{shown}: {reason}".replace("\r", "\\r").replace("\n", "\\n"))  # one line per file
    return "".join(line + "\n" for line in lines)


def contiguous_runs(groups: np.ndarray, n_runs: int = CONTIGUOUS_RUNS) -> np.ndarray:
    """(N,) group ids in load order → (N,) run ids: the images cut into about `n_runs` runs of consecutive images
    (files in name order), cut only where the group changes, so a patient or a volume stays in one run."""
    runs = np.zeros(len(groups), np.int64)
    target, start = len(groups) / n_runs, 0
    for i in range(1, len(groups)):
        if groups[i] != groups[i - 1] and i - start >= target:
            start = i
        runs[i] = runs[i - 1] + (start == i)
    return runs


def split(data: ImageSet, val_fraction: float, seed: int, by: str = "group") -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), split by group so one patient/volume never sits on both sides.
    Deterministic in the seed; at least one group is held out when val_fraction > 0 and there are ≥ 2 groups.
    by "contiguous": whole runs of consecutive images (`contiguous_runs`) instead, so that the held-out slices of a
    flat folder of one volume's slices are not the neighbours of training slices."""
    if by not in HELDOUT_SPLITS:
        raise ConfigError(f"split by {by!r}; allowed: {', '.join(HELDOUT_SPLITS)}")
    groups = contiguous_runs(data.groups) if by == "contiguous" else data.groups
    idx = np.arange(len(data))
    uniq = np.unique(groups)
    if val_fraction <= 0 or len(uniq) < 2:
        return idx, idx[:0]
    rng = np.random.default_rng([seed, 7919])
    order = rng.permutation(uniq)
    n_val = min(max(1, int(round(val_fraction * len(uniq)))), len(uniq) - 1)
    val = np.isin(groups, order[:n_val])
    return idx[~val], idx[val]


def export_builtin(spec: str, out: str | Path, n: int, size: int, seed: int = 0) -> dict[str, int]:
    """Write a built-in data set as 8-bit PNGs in class folders (`ct/normal/000012.png`), so that any other tool
    trains on exactly the same images. Returns the count per class."""
    check_out_dir(out, "--out")
    kind, name, params = parse_spec(spec)
    if kind != "builtin":
        raise DataError(f"{spec!r}: data export takes a built-in data set (builtin:…)")
    if params:
        raise DataError(f"{spec!r}: give --n, --size and --seed as flags, not in the spec")
    check_value("--n", n, bounds=IMAGES)
    check_value("--seed", seed, bounds=SEEDS)
    check_value("--size", size, bounds=IMAGE_SIZE if name == "mni-mri" else BUILTIN_PARAMS["size"])
    if name == "mni-mri":  # at most the template's ~190 axial slices, whatever n asks for
        stored, side = _mni_slices(size, n)
        images = list(cache.from_uint16(stored))
        classes = ["mri"] * len(images)
    else:
        check_memory(f"--n {n}", n, n * size**2 * 4)
        images = render_phantoms(name, n, seed, size)
        classes = [f"{m}/{'abnormal' if a else 'normal'}" for m, _i, a in phantom_items(name, n)]
    return write_class_folders(out, ((cls, f"{i:06d}", np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
                                     for i, (image, cls) in enumerate(zip(images, classes))))
