"""The image sets that evaluation and the audit compare: a data spec (folder or builtin:…) or a folder of generated
images → LabelledImages, (N, S, S) float32 in [0, 1] at one size with labels; errors name the flag the set came from.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.dataset import PAIR_FOLDERS, ImageSet, load_data, pair_layout, parse_spec, to_square
from .data.readers import find_image_files, read_file
from .errors import DataError

SAMPLE_EXTRAS = ("grid.png",)  # files of a sample folder that are not generated images
FLAT = "all"                   # the class name load_data gives every image of a folder without class folders


@dataclass
class LabelledImages:
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

    def depth(self) -> int:
        """Folder levels of the deepest class name ("ct/normal": 2)."""
        return max(n.count("/") + 1 for n in self.class_names)


def images01(spec: str, size: int, cache_dir: str | Path | None = None) -> np.ndarray:
    """(N, size, size) float32 in [0, 1] from a data spec (a sample folder's grid.png left out)."""
    data = load_data(spec, size, cache_dir=cache_dir, exclude=SAMPLE_EXTRAS, whole=True)
    return ((data.images[:, 0] + 1) / 2).clamp(0, 1).numpy()


def _require_folder(folder: str, flag: str) -> None:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"{flag} {folder!r}: {'not a folder' if root.exists() else 'no such folder'}")


def native_size(folder: str, flag: str = "--fake") -> int:
    """The size of the first readable image in a folder (generated images are square at the training size)."""
    _require_folder(folder, flag)
    for f in find_image_files(Path(folder))[0]:
        if f.name in SAMPLE_EXTRAS:
            continue
        image, _meta = read_file(f)[0]
        return int(max(image.shape))
    raise DataError(f"{flag} {folder!r}: no images found")


def load_images(spec: str, flag: str, size: int, label_depth: int,
                cache_dir: str | Path | None) -> LabelledImages:
    """A data spec → LabelledImages at `size` px; errors name `flag` (--real, --fake, --train)."""
    kind, name, _ = parse_spec(spec, flag)
    if kind == "folder":
        _require_folder(name, flag)
    data = load_data(spec, size, label_depth=label_depth, cache_dir=cache_dir, exclude=SAMPLE_EXTRAS, flag=flag,
                     whole=True)
    images = ((data.images[:, 0] + 1) / 2).clamp(0, 1).numpy()
    return LabelledImages(images, data.labels.numpy(), data.class_names, data)


def read_generated(folder: str, size: int | None = None, flag: str = "--fake") -> tuple[list[Path], np.ndarray]:
    """A folder of generated images (any readable format, searched recursively, grid.png left out; in a folder of
    images with label maps, images/ only) → the files and their images (N, S, S) float32 in [0, 1] (S: `size`, or
    the images' own size), one image (the first frame) per file, in the same order."""
    root = Path(folder).expanduser()
    if root.is_dir() and pair_layout(root):  # images with label maps: the images only
        root = root / PAIR_FOLDERS[0]
    size = size or native_size(str(root), flag)  # native_size also refuses a missing or empty folder
    files = [f for f in find_image_files(root)[0] if f.name not in SAMPLE_EXTRAS]
    return files, np.stack([to_square(read_file(f)[0][0], size) for f in files])


def check_class_folders(fake: LabelledImages, ref: LabelledImages, flag: str) -> None:
    """Every class folder of the generated set must be a class of `ref` (the set given as `flag`)."""
    if not fake.labelled:
        return
    if not ref.labelled:
        raise DataError(f"--fake: class folders ({', '.join(fake.class_names)}) but {flag} has none; give {flag} "
                        "with class folders, or generated images without them")
    missing = sorted(set(fake.class_names) - set(ref.class_names))
    if missing:
        raise DataError(f"--fake: class folder(s) {', '.join(missing)} not among the {flag} classes "
                        f"({', '.join(ref.class_names)}); name them like the training classes or set --label-depth")
