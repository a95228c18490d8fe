"""Images → PNG class folders (`out/<class>/<name>.png`), the layout a folder data spec reads back: how built-in
and MedMNIST+ sets are exported so that any other tool trains on exactly the same images."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from ..atomic import write_file


def write_class_folders(out: str | Path, items: Iterable[tuple[str, str, np.ndarray]]) -> dict[str, int]:
    """Write (class folder, file stem, (H, W) uint8 image) items as `out/<class>/<stem>.png`, each atomically;
    returns the count per class in the order the classes first appear."""
    counts: dict[str, int] = {}
    for cls, stem, image in items:
        picture = Image.fromarray(np.asarray(image, dtype=np.uint8))
        write_file(Path(out) / cls / f"{stem}.png", lambda f: picture.save(f, format="PNG"))
        counts[cls] = counts.get(cls, 0) + 1
    return counts
