"""A data spec (a folder, `builtin:…`) → cached (N, 1, S, S) images in [-1, 1], labels, groups and a split.

Specs: a folder (searched recursively; immediate sub-folders are classes), `builtin:mni-mri` (axial slices of
the MNI152 T1 template shipped by nilearn), `builtin:phantoms` / `builtin:ct|xray|mri|us` (MedPhantom-4), each
with optional `?n=…&size=…&seed=…`; `medmnist:PATH.npz[?split=train|val|test|all]` (a MedMNIST+ file).
Only safe metadata leaves this module: counts, formats, sizes — never file names of patients' files in summaries.
"""
from __future__ import annotations

import hashlib
import math
import os
import signal
from concurrent.futures import ProcessPoolExecutor
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
from .phantoms import LABELS, LESION, MODALITIES, render, render_with_maps, render_with_mask

BUILTINS = ("mni-mri", "phantoms", "ct", "xray", "mri", "us")
# the parameters of `builtin:…?n=…&size=…&seed=…`; size is the phantoms' render size (MedPhantom-4's range)
BUILTIN_PARAMS: dict[str, Bounds] = {"n": IMAGES, "size": Bounds(32, 512, whole=True), "seed": SEEDS,
                                     "masks": Bounds(0, 2, whole=True)}
# masks=1: the phantoms' lesion maps; masks=2: their label maps of lesion and anatomy (phantoms.LABELS)
PAIR_FOLDERS = ("images", "masks")  # a data folder of images with label maps: images/… and masks/… by name
CONTIGUOUS_RUNS = 10  # runs a "contiguous" split cuts a set into


class ImageSet:
    """Images ready for training, with their labels (N,) int64 into `class_names` and groups (N,) int64 (images of
    one patient/volume share a group). The images stay where the loader left them (`stored`: the cache entry,
    read image by image, or an array): `take(indices)` reads only those as (k, 1, S, S) float32 in [-1, 1], so a
    set larger than memory trains; `images` is the whole set as one such tensor, made on first use (the evaluation
    sets, the tests). A tensor may be given instead of stored images.

    Images with label maps (issue 21): `masks` (stored beside the images, `StoredImages.masks`, or a (N, 1, S, S)
    integer tensor) hold each image's map of label values, 0 = background; `mask_values` are the label values
    the set uses (in the summary), `take_masks(indices)` reads the maps of a batch."""

    def __init__(self, images: torch.Tensor | cache.StoredImages, labels: torch.Tensor,
                 class_names: tuple[str, ...], groups: np.ndarray, skipped: list[tuple[str, str]] | None = None,
                 summary: dict[str, Any] | None = None, masks: torch.Tensor | None = None) -> None:
        self.stored = images if isinstance(images, cache.StoredImages) else None
        self._images = None if self.stored is not None else images
        self._masks = masks
        self._mask_store = self.stored.masks if self.stored is not None else None
        self.labels, self.class_names, self.groups = labels, class_names, groups
        self.skipped: list[tuple[str, str]] = list(skipped or [])
        self.summary: dict[str, Any] = dict(summary or {})

    def __len__(self) -> int:
        return len(self.stored) if self.stored is not None else len(self._images)

    @property
    def size(self) -> int:
        """The images' side in px."""
        return self.stored.size if self.stored is not None else int(self._images.shape[-1])

    @property
    def images(self) -> torch.Tensor:
        """(N, 1, S, S) float32 in [-1, 1], the whole set in memory."""
        if self._images is None:
            check_memory("the data set", len(self), len(self) * self.size**2 * 6)  # uint16 read + float32 made
            self._images = _signed(self.stored.all())
        return self._images

    @property
    def in_memory(self) -> bool:
        return self._images is not None

    def take(self, indices: Any) -> torch.Tensor:
        """(k, 1, S, S) float32 in [-1, 1]: the images at `indices` (ints, an array or a CPU tensor), only they read."""
        if self._images is not None:
            return self._images[torch.as_tensor(np.asarray(indices), dtype=torch.long)]
        return _signed(self.stored.read(np.asarray(indices)))

    def with_images(self, images: torch.Tensor, keep_masks: bool = True) -> "ImageSet":
        """The same set (labels, groups, label maps where stored and `keep_masks`, summary) over other images, one
        per image: the latent path trains on the set's latents with the set's maps; a model of label maps on the
        maps themselves, as channels, with no maps beside them."""
        if len(images) != len(self):
            raise ValueError(f"{len(images)} images for a set of {len(self)}")
        out = ImageSet(images, self.labels, self.class_names, self.groups, self.skipped, self.summary,
                       self._masks if keep_masks else None)
        out._mask_store = self._mask_store if keep_masks else None
        return out

    @property
    def has_masks(self) -> bool:
        return self._masks is not None or self._mask_store is not None

    @property
    def mask_values(self) -> tuple[int, ...]:
        """The label values the maps use (0, background, excluded), ascending."""
        if "mask_values" in self.summary:
            return tuple(int(v) for v in self.summary["mask_values"])
        if self._masks is not None:
            return tuple(int(v) for v in torch.unique(self._masks).tolist() if v != 0)
        return ()

    def take_masks(self, indices: Any) -> torch.Tensor:
        """(k, 1, S, S) int64: the label maps of the images at `indices`."""
        if not self.has_masks:
            raise DataError("these images have no label maps")
        if self._masks is not None:
            return self._masks[torch.as_tensor(np.asarray(indices), dtype=torch.long)].long()
        return torch.from_numpy(self._mask_store.read(np.asarray(indices)).astype(np.int64))[:, None]


def _signed(stored: np.ndarray) -> torch.Tensor:
    """(k, S, S) uint16 → (k, 1, S, S) float32 in [-1, 1]."""
    return torch.from_numpy(cache.from_uint16(stored))[:, None] * 2 - 1


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
            raise DataError(f"{flag} {spec!r}: unknown parameter(s) {', '.join(sorted(unknown))}; allowed: "
                            f"{', '.join(BUILTIN_PARAMS)}")
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


def _square(image: np.ndarray, crop: bool) -> np.ndarray:
    """(H, W) → the centred square: zero-padded to the longer side, or cropped to the shorter with `crop`."""
    h, w = image.shape
    s = min(h, w) if crop else max(h, w)
    if crop:
        top, left = (h - s) // 2, (w - s) // 2
        return image[top:top + s, left:left + s]
    square = np.zeros((s, s), image.dtype)
    top, left = (s - h) // 2, (s - w) // 2
    square[top:top + h, left:left + w] = image
    return square


def to_square(image: np.ndarray, size: int, crop: bool = False) -> np.ndarray:
    """(H, W) float in [0, 1] → (size, size) float32: aspect kept by zero-padding (or centre-cropping), then an
    antialiased bicubic resize."""
    square = _square(np.asarray(image, np.float32), crop)
    s = len(square)
    if s == size:
        return np.asarray(square, np.float32)
    t = torch.from_numpy(np.ascontiguousarray(square, np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0, 0].clamp(0, 1).numpy()


def labels_to_square(mask: np.ndarray, size: int, crop: bool = False) -> np.ndarray:
    """(H, W) integer label map → (size, size) uint16 with the geometry `to_square` gives its image (the same pad
    or crop), resized by nearest neighbour: label values are never blended."""
    square = _square(mask, crop)
    if len(square) != size:
        t = torch.from_numpy(np.ascontiguousarray(square, np.float32))[None, None]
        square = F.interpolate(t, size=(size, size), mode="nearest-exact")[0, 0].numpy()
    return np.asarray(square).astype(np.uint16)


def jitter_label_map(labels: np.ndarray, seed: int, degrees: float = 15.0, scale: tuple[float, float] = (0.85, 1.15),
                     shift: float = 0.1) -> np.ndarray:
    """A new (S, S) label map from `labels`: mirrored left-right half the time, rotated by up to `degrees`, scaled
    by a factor in `scale` and shifted by up to `shift` of the side, by nearest neighbour (label values are never
    blended; what leaves the square is lost, what enters is background 0), every draw a function of `seed`."""
    out = _jittered(labels, seed, degrees, scale, shift, "nearest")
    return out.round().astype(np.asarray(labels).dtype)


def jitter_image(image: np.ndarray, seed: int, degrees: float = 15.0, scale: tuple[float, float] = (0.85, 1.15),
                 shift: float = 0.1) -> np.ndarray:
    """(S, S) float image → the same geometric draw `jitter_label_map` makes for `seed`, bilinear (what enters the
    square is 0): the image a jittered map's source image becomes, for auditing what is generated from that map."""
    return _jittered(image, seed, degrees, scale, shift, "bilinear")


def _jittered(values: np.ndarray, seed: int, degrees: float, scale: tuple[float, float], shift: float,
              mode: str) -> np.ndarray:
    rng = np.random.default_rng([int(seed), 0x6D61736B])  # its own stream: not the noise of the image's seed
    flip = -1.0 if rng.random() < 0.5 else 1.0
    angle = math.radians(rng.uniform(-degrees, degrees))
    zoom = rng.uniform(*scale)
    dx, dy = rng.uniform(-shift, shift, 2) * 2  # in the grid's [-1, 1] units
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[[cos * flip, -sin, dx], [sin * flip, cos, dy]]], dtype=torch.float32)
    src = torch.from_numpy(np.ascontiguousarray(values, np.float32))[None, None]
    grid = F.affine_grid(theta, list(src.shape), align_corners=False)
    return F.grid_sample(src, grid, mode=mode, padding_mode="zeros", align_corners=False)[0, 0].numpy()


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


DECODE_WINDOW = 256  # files decoded per window: what building holds at once, whatever the set's size


def _decode(item: tuple[Path, int, bool, str]) -> tuple[str, Any]:
    """One file → ("ok", [(uint16 image, format, source shape)]) or ("skip", (path, reason)); runs in a worker, so
    it returns plain values (never raises an UnreadableFile across the process boundary)."""
    path, size, crop, nifti_axis = item
    try:
        items = readers.read_file(path, nifti_axis=nifti_axis)
    except UnreadableFile as err:
        return "skip", (err.path, err.reason)
    return "ok", [(cache.to_uint16(to_square(image, size, crop)), meta.format, "x".join(map(str, image.shape)))
                  for image, meta in items]


def _decode_pair(item: tuple[Path, Path | None, int, bool, str]) -> tuple[str, Any]:
    """An image and its label map → ("ok", [(uint16 image, format, source shape, uint16 map)]) or ("skip", (path,
    reason)). A 2-D image's map is a label image of its size; a NIfTI volume's is a NIfTI label volume of its
    grid, sliced with it (the slices the image keeps)."""
    path, mask_path, size, crop, nifti_axis = item
    if mask_path is None:
        return "skip", (str(path), f"no label map of the same name in {PAIR_FOLDERS[1]}/")
    try:
        items = readers.read_file(path, nifti_axis=nifti_axis)
        if mask_path.name.lower().endswith((".nii", ".nii.gz")):
            masks = readers.read_label_slices(mask_path, nifti_axis, [meta.index for _image, meta in items])
        elif len(items) == 1 and items[0][1].format == "dicom" and readers.is_dicom_file(mask_path):
            masks = [readers.read_segmentation(mask_path, path)]
        elif len(items) == 1:
            masks = [readers.read_label_map(mask_path)]
        else:
            return "skip", (str(path), f"{len(items)} images in one file with a 2-D label image: give a label "
                                       "volume of the same grid (NIfTI)")
    except UnreadableFile as err:
        return "skip", (err.path, err.reason)
    out = []
    for (image, meta), mask in zip(items, masks):
        if mask.shape != image.shape:
            return "skip", (str(mask_path), f"label map of {mask.shape[1]}x{mask.shape[0]} px for an image of "
                                            f"{image.shape[1]}x{image.shape[0]} px")
        out.append((cache.to_uint16(to_square(image, size, crop)), meta.format, "x".join(map(str, image.shape)),
                    labels_to_square(mask, size, crop)))
    return "ok", out


def _mask_for(masks_root: Path, rel: Path) -> Path | None:
    """The label map of the image at `rel` (below images/): the file of the same stem in the same place below
    masks/, whatever its extension."""
    folder = masks_root / rel.parent
    exact = folder / rel.name
    if exact.is_file():
        return exact
    stem = rel.name[:-len(".nii.gz")] if rel.name.lower().endswith(".nii.gz") else rel.stem
    for suffix in (".png", ".tif", ".tiff", ".bmp", ".nii.gz", ".nii", ".dcm"):
        candidate = folder / (stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def pair_layout(root: Path) -> bool:
    """Whether a data folder holds images with label maps: images/ and masks/ side by side, nothing else."""
    return all((root / name).is_dir() for name in PAIR_FOLDERS)


def _worker_init() -> None:
    torch.set_num_threads(1)  # the workers share the CPUs: one thread each
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: no traceback per worker


def decode_in_order(items: list[Any], fn: Any, workers: int | None = None, window: int = DECODE_WINDOW) -> Any:
    """Yield fn(item) for every item, in order, computed by worker processes `window` items at a time, so that at
    most a window's results are held whatever the number of items. One process for a few items."""
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers == 1 or len(items) < 64:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(workers, initializer=_worker_init) as pool:
        for start in range(0, len(items), window):
            yield from pool.map(fn, items[start:start + window], chunksize=max(1, window // (4 * workers)))


def _read_folder(root: Path, size: int, crop: bool, label_depth: int, nifti_axis: str,
                 exclude: tuple[str, ...], flag: str, sink: cache.Sink) -> dict[str, Any]:
    """A folder of images (class sub-folders), or of images with label maps (`pair_layout`: images/ + masks/,
    each image's map found by name) → the sink; the sidecar."""
    masks_root = root / PAIR_FOLDERS[1] if sink.masks is not None else None
    root = root / PAIR_FOLDERS[0] if masks_root is not None else root
    files, skipped, flat = _scan_folder(root, label_depth, exclude, flag)
    n_ignored = len(skipped)  # not image files: counted among the files seen
    classes, groups, formats, shapes, values = [], [], {}, {}, set()
    inside = []
    for path in files:
        rel = path.relative_to(root)
        if not flat and len(rel.parts) <= label_depth:
            skipped.append((str(path), f"not inside a class folder ({label_depth} level(s) below {root})"))
        else:
            inside.append(path)
    if masks_root is None:
        decoded = decode_in_order([(p, size, crop, nifti_axis) for p in inside], _decode)
    else:
        decoded = decode_in_order([(p, _mask_for(masks_root, p.relative_to(root)), size, crop, nifti_axis)
                                   for p in inside], _decode_pair)
    for path, (status, value) in zip(inside, decoded):
        if status == "skip":
            skipped.append(value)
            continue
        rel = path.relative_to(root)
        if masks_root is None:
            sink.add([item[0] for item in value])
        else:
            sink.add([item[0] for item in value], [item[3] for item in value])
            values.update(int(v) for item in value for v in np.unique(item[3]) if v)
        for item in value:
            classes.append(_class_of(rel, label_depth, flat))
            groups.append(_group_of(rel, label_depth, flat))
            formats[item[1]] = formats.get(item[1], 0) + 1
            shapes[item[2]] = shapes.get(item[2], 0) + 1
    side = dict(classes=classes, groups=[_stable_id(g) for g in groups], skipped=skipped,
                formats=formats, source_shapes=shapes, files=len(files) + n_ignored)
    if masks_root is not None:
        side["mask_values"] = sorted(values)
    return side


def _folder_key(root: Path, size: int, crop: bool, label_depth: int, nifti_axis: str,
                exclude: tuple[str, ...], pairs: bool = False) -> str:
    stats = []
    for dirpath, _dirs, names in os.walk(root):
        for name in sorted(names):
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                continue
            stats.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return cache.cache_key("folder", sorted(stats), size, crop, label_depth, nifti_axis, exclude,
                           *(("pairs",) if pairs else ()))


# ---------------------------------------------------------------- built-in data

def _mni_volume() -> np.ndarray:
    """The 1 mm MNI152 T1 template (nilearn ships it) as (x, y, z) float32 scaled to [0, ~1], RAS."""
    from nilearn.datasets import load_mni152_template  # ~2 s to import: only when builtin:mni-mri is asked for

    vol = np.asarray(load_mni152_template(resolution=1).get_fdata(), np.float32)
    return vol / max(float(np.percentile(vol, 99.9)), 1e-6)


def _mni_slices(size: int, n: int | None, sink: cache.Sink) -> dict[str, Any]:
    """Axial slices of the MNI template, anterior up, slabs of 8 slices per group. Its slices are 233 x 197 px:
    at 256 px and above they are upsampled, which the data summary says (`upsampled`)."""
    vol = _mni_volume()
    levels = [z for z in range(vol.shape[2]) if (vol[:, :, z] > 0.1).mean() > 0.05]
    if n is not None and n < len(levels):
        levels = [levels[int(i)] for i in np.linspace(0, len(levels) - 1, n).round()]
    for z in levels:
        sink.add([to_square(np.clip(np.rot90(vol[:, :, z]), 0, 1), size)])
    return dict(classes=["mri"] * len(levels), groups=[z // 8 for z in levels], skipped=[],
                formats={"nifti": len(levels)}, source_shapes={f"{vol.shape[1]}x{vol.shape[0]}": len(levels)},
                files=1)


def phantom_items(name: str, n: int) -> list[tuple[str, int, bool]]:
    """(modality, index, abnormal) for the i-th image of `builtin:<name>`: modalities and findings interleaved
    so that any n is balanced."""
    mods = MODALITIES if name == "phantoms" else (name,)
    return [(mods[i % len(mods)], i, bool((i // len(mods)) % 2)) for i in range(n)]


def _render_one(item: tuple[str, int, bool, int, int, int, int]) -> np.ndarray:
    """One phantom rendered at its render size, then brought to `size`."""
    modality, index, abnormal, seed, render_size, size, _maps = item
    return to_square(render(modality, index, seed, render_size, abnormal), size)


def _render_pair(item: tuple[str, int, bool, int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One phantom and its map, both brought to `size`: maps 1, the lesion map (`LESION`, none in a normal image);
    maps 2, the label map of lesion and anatomy (`phantoms.render_with_maps`)."""
    modality, index, abnormal, seed, render_size, size, maps = item
    if maps == 2:
        image, labels = render_with_maps(modality, index, seed, render_size, abnormal)
    else:
        image, mask = render_with_mask(modality, index, seed, render_size, abnormal)
        labels = mask * np.uint8(LESION)
    return to_square(image, size), labels_to_square(labels.astype(np.uint16), size)


def render_phantoms(name: str, n: int, seed: int, size: int, workers: int | None = None,
                    render_size: int | None = None, masks: int = 0) -> Any:
    """Yield the n images of `builtin:<name>` in order as (size, size) float32 arrays in [0, 1] (with `masks` 1 or
    2: (image, uint16 map) pairs, see `_render_pair`), rendered at `render_size` (default `size`) by worker
    processes a window at a time."""
    items = [(m, i, a, seed, render_size or size, size, int(masks)) for m, i, a in phantom_items(name, n)]
    yield from decode_in_order(items, _render_pair if masks else _render_one, workers)


def _phantoms(name: str, n: int, seed: int, render_size: int, size: int, sink: cache.Sink,
              maps: int = 0) -> dict[str, Any]:
    values: set[int] = set()
    for rendered in render_phantoms(name, n, seed, size, render_size=render_size, masks=maps):
        if maps:
            sink.add([rendered[0]], [rendered[1]])
            values.update(np.unique(rendered[1]).tolist())
        else:
            sink.add([rendered])
    items = phantom_items(name, n)
    classes = [f"{m}/{'abnormal' if a else 'normal'}" for m, _i, a in items]
    side = dict(classes=classes, groups=list(range(n)), skipped=[], formats={"phantom": n},
                source_shapes={f"{render_size}x{render_size}": n}, files=0)
    if maps:
        side["mask_values"] = sorted(values - {0})
        side["mask_names"] = {str(v): LABELS[v] for v in side["mask_values"]}  # what each value is
    return side


def _medmnist_file(path: Path, part: str, size: int, crop: bool, sink: cache.Sink) -> dict[str, Any]:
    """A MedMNIST .npz split → uint16 images + sidecar; labels named from the catalogue (see medmnist.py).
    MedMNIST holds no patient ids, so each image is its own group."""
    images, labels, names = load_npz(path, part)
    for im in images:
        sink.add([to_square(im.astype(np.float32) / 255.0, size, crop)])
    shape = "x".join(map(str, images.shape[1:]))
    return dict(classes=[names[k] for k in labels], groups=list(range(len(images))), skipped=[],
                formats={"medmnist-npz": len(images)}, source_shapes={shape: len(images)}, files=1)


# ---------------------------------------------------------------- public entry points

def check_memory(what: str, n: int, need: int) -> None:
    """DataError before `n` images that need `need` bytes are made, when the system has less memory free."""
    free = available_memory(torch.device("cpu"))
    if need > free:
        raise DataError(f"{what}: {n} images need about {need / 2**30:.1f} GiB of memory and "
                        f"{free / 2**30:.1f} GiB are available; ask for fewer or smaller images")


def load_data(spec: str, size: int, *, crop: bool = False, label_depth: int = 1,
              cache_dir: str | Path | None = None, nifti_axis: str = "axial",
              exclude: tuple[str, ...] = (), flag: str = "--data", whole: bool = False) -> ImageSet:
    """Load a data spec at `size` px, using and filling the cache. Zero readable images is a DataError.
    `exclude`: file names to leave out of a folder (e.g. a sample folder's grid.png); errors name `flag`.
    `whole`: the caller will hold the whole set in memory (`ImageSet.images`: evaluation), so a built-in set too
    large for the free memory is refused before it is rendered; training reads batches and needs no such check."""
    kind, name, params = parse_spec(spec, flag)
    if kind == "folder":
        root = Path(name).expanduser()
        pairs = root.is_dir() and pair_layout(root)
        key = _folder_key(root, size, crop, label_depth, nifti_axis, exclude, pairs) if root.is_dir() else ""
        stored, side = cache.load_or_build(Path(cache_dir) if cache_dir and key else None, key, size,
                                           lambda sink: _read_folder(root, size, crop, label_depth, nifti_axis,
                                                                     exclude, flag, sink), masks=pairs)
    elif kind == "medmnist":
        path, part = Path(name).expanduser(), params.get("split", "train")
        st = path.stat() if path.is_file() else None
        key = cache.cache_key("medmnist", str(path.resolve()), st.st_size, st.st_mtime_ns, part, size,
                              crop) if st else ""
        stored, side = cache.load_or_build(Path(cache_dir) if cache_dir and key else None, key, size,
                                           lambda sink: _medmnist_file(path, part, size, crop, sink))
    elif name == "mni-mri":
        n = int(params["n"]) if "n" in params else None
        stored, side = cache.load_or_build(Path(cache_dir) if cache_dir else None, cache.cache_key(spec, size), size,
                                           lambda sink: _mni_slices(size, n, sink))
    else:
        n, seed = int(params.get("n", 400)), int(params.get("seed", 0))
        render_size = int(params.get("size", size))
        if not BUILTIN_PARAMS["size"].allows(render_size):
            raise DataError(f"{flag} {spec!r}: size={render_size} must be {BUILTIN_PARAMS['size'].describe()}")
        if whole or not cache_dir:  # with a cache and batch reads, the images go to disk as they are rendered
            check_memory(f"{flag} {spec!r}", n, n * size**2 * (6 if whole else 2))
        maps = int(params.get("masks", 0))
        stored, side = cache.load_or_build(Path(cache_dir) if cache_dir else None,
                                           cache.cache_key("phantoms", name, n, seed, render_size, size,
                                                           *(("masks", "maps")[maps - 1:maps] if maps else ())),
                                           size,
                                           lambda sink: _phantoms(name, n, seed, render_size, size, sink, maps),
                                           masks=bool(maps))
    if len(stored) == 0:
        reasons = "; ".join(f"{p}: {r}" for p, r in side["skipped"][:3])
        raise DataError(f"{flag} {spec!r}: no readable images found" + (f" (skipped {len(side['skipped'])}: "
                        f"{reasons}{' …' if len(side['skipped']) > 3 else ''})" if side["skipped"] else ""))
    class_names = tuple(sorted(set(side["classes"])))
    labels = torch.tensor([class_names.index(c) for c in side["classes"]], dtype=torch.long)
    counts = {c: int((labels == i).sum()) for i, c in enumerate(class_names)}
    summary = dict(images=len(stored), classes=counts, formats=side["formats"], source_shapes=side["source_shapes"],
                   size=size, files=int(side.get("files", 0)), skipped=len(side["skipped"]),
                   upsampled=upsampled(side["source_shapes"], size))
    if "mask_values" in side:
        summary["mask_values"] = [int(v) for v in side["mask_values"]]
    if "mask_names" in side:  # a source that knows what its label values are (the phantoms)
        summary["mask_names"] = dict(side["mask_names"])
    return ImageSet(stored, labels, class_names, np.asarray(side["groups"], np.int64),
                    [tuple(s) for s in side["skipped"]], summary)


def named_values(summary: dict[str, Any]) -> dict[int, str]:
    """The names a data set's summary gives its label values ({"1": "lesion", …}: the phantoms name theirs; a
    folder of label images does not) → {value: name}; anything else there (a hand-edited record) names nothing."""
    named = summary.get("mask_names")
    if not isinstance(named, dict):
        return {}
    return {int(v): str(n) for v, n in named.items() if str(v).isdigit()}


def lesion_value(names: dict[int, str]) -> int | None:
    """The label value named "lesion" (maps of anatomy hold other structures beside it), or None."""
    return next((v for v, n in sorted(names.items()) if n == "lesion"), None)


def loss_weighted_values(names: dict[int, str], mask_values: tuple[int, ...]) -> tuple[int, ...] | None:
    """The label values --mask-loss-weight weights: the lesion alone where the data name one among other structures
    (a map of anatomy labels nearly every pixel: weighting them all weights the whole body), else None, every
    labelled region."""
    lesion = lesion_value(names)
    return (lesion,) if lesion in mask_values and len(mask_values) > 1 else None


def upsampled(source_shapes: dict[str, int], size: int) -> int:
    """How many images were enlarged to reach `size` px (their longer side was shorter): a model trained on them
    learns the resize's smoothness, not finer detail, which users should know."""
    count = 0
    for shape, n in source_shapes.items():
        try:
            longest = max(int(v) for v in shape.split("x")[:2])
        except ValueError:
            continue
        count += n if longest < size else 0
    return count


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


def contiguous_guard(n: int, n_runs: int = CONTIGUOUS_RUNS) -> int:
    """Images left out on each side of a held-out run by a contiguous split: a quarter of a run, at least 1."""
    return max(1, int(round(n / n_runs / 4)))


def guard_note(n: int, n_train: int, n_held: int) -> str:
    """What a split left out of both sides (a contiguous split's guard band), for a report line; "" if none."""
    left = n - n_train - n_held
    return f", {left} beside them left out of both" if left else ""


def split(data: ImageSet, val_fraction: float, seed: int, by: str = "group") -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), split by group so one patient/volume never sits on both sides.
    Deterministic in the seed; at least one group is held out when val_fraction > 0 and there are ≥ 2 groups.
    by "contiguous": whole runs of consecutive images (`contiguous_runs`) instead, and the `contiguous_guard`
    images on each side of a held-out run are neither trained on nor held out (where that leaves training images),
    so that the held-out slices of a flat folder of one volume's slices are not the neighbours of training slices:
    a held-out run's end slice is otherwise almost its training neighbour, and it would set a copy threshold that
    only near-exact copies pass (benchmarks/_heldout.py holds out 8-slice slabs with a guard of 4 the same way)."""
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
    train = ~val
    if by == "contiguous":
        guard = contiguous_guard(len(groups))
        near = np.convolve(val.astype(np.int64), np.ones(2 * guard + 1, np.int64), mode="same") > 0
        train = train if not (train & ~near).any() else train & ~near
    return idx[train], idx[val]


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
        sink = cache.Sink(size)
        classes = _mni_slices(size, n, sink)["classes"]
        images = cache.from_uint16(sink.array())
    else:  # rendered and written a window at a time: any n fits in memory
        images = render_phantoms(name, n, seed, size)
        classes = [f"{m}/{'abnormal' if a else 'normal'}" for m, _i, a in phantom_items(name, n)]
    return write_class_folders(out, ((cls, f"{i:06d}", np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
                                     for i, (image, cls) in enumerate(zip(images, classes))))
