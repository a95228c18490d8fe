"""MedMNIST+ 2-D grey sets: catalogue (official file names, MD5s, named labels) → verified, resumable HTTP download →
`.npz` → (N, H, W) uint8 images + named labels (`load_npz`) → PNG class folders (`to_class_folders`).

File names, MD5 checksums and label names are those of MedMNIST v3 (`medmnist/info.py`, INFO; Zenodo record
10519652). Yang et al., "MedMNIST v2", Scientific Data 2023.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import replace_file
from ..errors import ConfigError, DataError

ZENODO = "https://zenodo.org/records/10519652/files"
SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
NO_FINDING, MULTIPLE = "no-finding", "multiple"
CHUNK = 1 << 20

_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
           "lung-right", "pancreas", "spleen")


@dataclass(frozen=True)
class MedMNISTSet:
    """One MedMNIST+ data set. `labels[k]` names label k, made a safe folder name (INFO's "normal, benign" →
    "normal-or-benign"); `md5[size]` is the official checksum of `filename(size)`."""

    flag: str
    title: str
    modality: str
    labels: tuple[str, ...]
    md5: dict[int, str]
    source: str
    licence: str = "CC BY 4.0"
    multi_label: bool = False

    def filename(self, size: int) -> str:
        """'pneumoniamnist.npz' at 28 px, 'pneumoniamnist_64.npz' at 64 px (MedMNIST's own names)."""
        return f"{self.flag}.npz" if size == 28 else f"{self.flag}_{size}.npz"


# The MD5 of every official file, as `md5sum` prints them (so `md5sum -c` can check a download folder).
_MD5SUMS = """
28209eda62fecd6e6a2d98b1501bb15f  pneumoniamnist.npz
8f4eceb4ccffa70c672198ea285246c6  pneumoniamnist_64.npz
05b46931834c231683c68f40c47b2971  pneumoniamnist_128.npz
d6a3c71de1b945ea11211b03746c1fe1  pneumoniamnist_224.npz
02c8a6516a18b556561a56cbdd36c4a8  chestmnist.npz
9de6cd0b934ebb5b7426cfba5efbae16  chestmnist_64.npz
db107e5590b27930b62dbaf558aebee3  chestmnist_128.npz
45bd33e6f06c3e8cdb481c74a89152aa  chestmnist_224.npz
750601b1f35ba3300ea97c75c52ff8f6  breastmnist.npz
742edef2a1fd1524b2efff4bd7ba9364  breastmnist_64.npz
363e4b3f8d712e9b5de15470a2aaadf1  breastmnist_128.npz
b56378a6eefa9fed602bb16d192d4c8b  breastmnist_224.npz
68e3f8846a6bd62f0c9bf841c0d9eacc  organamnist.npz
2dcccc29b88e6da5a01161ef20cda288  organamnist_64.npz
eeae80d0a227a8d099027e1b3cfd3b60  organamnist_128.npz
50747347e05c87dd3aaf92c49f9f3170  organamnist_224.npz
b9ceb9546e10131b32923c5bbeaea2b1  organcmnist.npz
3ce34a8724ea6f548e6db4744d03b6a9  organcmnist_64.npz
773c1f009daa3fe5d9a2a201b2a7ed94  organcmnist_128.npz
050f5e875dc056f6768abf94ec9995d1  organcmnist_224.npz
9ab87b696fb54e2a387ebe992d6ed5f1  organsmnist.npz
53a6d115339d874c25e309a994ff46d3  organsmnist_64.npz
ded0c5fa01a95dc4978b956f613e9b8e  organsmnist_128.npz
b354719e553fbbb2513d5533f52a4cb1  organsmnist_224.npz
"""
_MD5 = {name: md5 for md5, name in (line.split() for line in _MD5SUMS.strip().splitlines())}


def _entry(flag: str, title: str, modality: str, labels: tuple[str, ...], source: str,
           multi_label: bool = False) -> MedMNISTSet:
    """A catalogue entry, its checksums taken from _MD5SUMS by file name."""
    entry = MedMNISTSet(flag, title, modality, labels, {}, source, multi_label=multi_label)
    return dataclasses.replace(entry, md5={size: _MD5[entry.filename(size)] for size in SIZES})


CATALOGUE: dict[str, MedMNISTSet] = {s.flag: s for s in (
    _entry("pneumoniamnist", "PneumoniaMNIST", "xray", ("normal", "pneumonia"),
           "5,856 paediatric chest X-rays (Kermany et al. 2018)"),
    _entry("chestmnist", "ChestMNIST", "xray",
           ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
            "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"),
           "NIH ChestX-ray14: 112,120 frontal chest X-rays, 14 text-mined findings", multi_label=True),
    _entry("breastmnist", "BreastMNIST", "ultrasound", ("malignant", "normal-or-benign"),
           "780 breast ultrasound images (Al-Dhabyani et al. 2020, BUSI)"),
    # One abdominal CT collection cut along three axes: OrganAMNIST, OrganCMNIST, OrganSMNIST.
    *(_entry(f"organ{view[0]}mnist", f"Organ{view[0].upper()}MNIST", "ct", _ORGANS,
             f"abdominal CT of the LiTS benchmark, {view} organ crops") for view in ("axial", "coronal", "sagittal")),
)}


def lookup(name: str) -> MedMNISTSet:
    """A catalogue entry by flag or title, any case: 'pneumoniamnist', 'PneumoniaMNIST'."""
    entry = CATALOGUE.get(name.lower())
    if entry is None:
        raise ConfigError(f"data set {name!r}: not in the MedMNIST+ catalogue; choose from "
                          f"{', '.join(s.flag for s in CATALOGUE.values())}")
    return entry


def url_for(entry: MedMNISTSet, size: int, url_base: str = ZENODO) -> str:
    """Where the file lives: Zenodo wants `?download=1`; a mirror gets the plain file name."""
    url = f"{url_base.rstrip('/')}/{entry.filename(size)}"
    return url + "?download=1" if url_base.rstrip("/") == ZENODO else url


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- download

class _Retry(Exception):
    """An attempt failed in a way that another attempt may fix (connection, 5xx, short body, bad checksum)."""


def _download_once(url: str, part: Path, timeout: float,
                   progress: Callable[[int, int | None], None] | None) -> None:
    """Fetch `url` into `part`, continuing a partial file with an HTTP Range request (RFC 9110 §14) when the
    server honours it (206 and a matching Content-Range), else starting again."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "meddiff", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416:  # our partial file is not a prefix the server can continue: start afresh
            part.unlink(missing_ok=True)
            raise _Retry("the server refused to resume; starting again") from None
        if err.code in (408, 429) or err.code >= 500:
            raise _Retry(f"HTTP {err.code} {err.reason}") from None
        raise DataError(f"{url}: HTTP {err.code} {err.reason}; check the data set name, --size and "
                        "--url-base") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise _Retry(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from None
    with resp:
        resumed = have > 0 and resp.status == 206 and \
            resp.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        if not resumed:
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        try:
            with open(part, "ab" if resumed else "wb") as f:
                while block := resp.read(CHUNK):
                    f.write(block)
                    have += len(block)
                    if progress is not None:
                        progress(have, total)
        except (OSError, http.client.HTTPException) as err:  # a dropped connection: keep the part, resume
            raise _Retry(f"connection lost after {have} bytes ({type(err).__name__})") from None
    if total is not None and have < total:
        raise _Retry(f"connection closed after {have} of {total} bytes")


def fetch(name: str, size: int, out: str | Path, url_base: str = ZENODO, retries: int = 3, *,
          md5: str | None = None, timeout: float = 60.0, backoff: float = 2.0,
          progress: Callable[[int, int | None], None] | None = None,
          echo: Callable[[str], None] | None = None) -> Path:
    """Download a MedMNIST+ file into `out` (as `<flag>_<size>.npz`) and verify its MD5; returns its path.

    A verified file already there is kept. Bytes go to `<file>.part`, continued with Range requests after a
    dropped connection; a file whose checksum differs is deleted and fetched again; after `retries` attempts
    the download is refused with a DataError. `md5` replaces the catalogue's checksum (a test server's file)."""
    entry = lookup(name)
    if size not in SIZES:
        raise ConfigError(f"--size {size}: MedMNIST+ files exist at {', '.join(map(str, SIZES))} px")
    if retries < 1:
        raise ConfigError(f"retries={retries}: must be at least 1")
    expected = (md5 or entry.md5[size]).lower()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target, part = out / entry.filename(size), out / f"{entry.filename(size)}.part"
    if target.exists():
        if md5_of(target) == expected:
            return target
        target.unlink()  # damaged or from another release: never handed out
    url = url_for(entry, size, url_base)
    reason = "no attempt made"
    for attempt in range(1, retries + 1):
        if attempt > 1:
            if echo is not None:
                echo(f"{url}: attempt {attempt - 1} of {retries} failed ({reason}); retrying")
            time.sleep(backoff * 2 ** (attempt - 2))
        try:
            _download_once(url, part, timeout, progress)
        except _Retry as err:
            reason = str(err)
            continue
        got = md5_of(part)
        if got == expected:
            replace_file(part, target)
            return target
        part.unlink()  # a corrupt file is never resumed: the next attempt starts from byte 0
        reason = f"MD5 {got} differs from the expected {expected}"
    raise DataError(f"{url}: download refused after {retries} attempt(s): {reason}. No file was kept at "
                    f"{target}; try again later or pass --url-base with a mirror holding the official file")


# ---------------------------------------------------------------- reading

_NAME = re.compile(r"^([a-z0-9]+?)(?:_(\d+))?$")


def entry_for_file(path: str | Path) -> MedMNISTSet | None:
    """The catalogue entry an official file name belongs to ('organamnist_128.npz' → OrganAMNIST), else None."""
    match = _NAME.match(Path(path).name.removesuffix(".npz").lower())
    return CATALOGUE.get(match.group(1)) if match else None


def fold_multi_label(onehot: np.ndarray, names: tuple[str, ...]) -> tuple[np.ndarray, tuple[str, ...]]:
    """(N, K) 0/1 multi-label rows → one class per image: the finding's name when exactly one is present,
    "no-finding" when none, "multiple" when two or more. Returns (N,) int64 labels and the class names
    (the K findings, then "multiple", then "no-finding")."""
    counts = onehot.sum(axis=1)
    labels = np.where(counts == 1, onehot.argmax(axis=1), np.where(counts == 0, len(names) + 1, len(names)))
    return labels.astype(np.int64), tuple(names) + (MULTIPLE, NO_FINDING)


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    if not path.is_file():
        raise DataError(f"medmnist:{path}: no such file; fetch it with `meddiff data fetch NAME --size S --out DIR`")
    try:
        return np.load(path, allow_pickle=False)  # never unpickle: an .npz may carry object arrays
    except (OSError, ValueError) as err:
        raise DataError(f"medmnist:{path}: not a readable .npz file ({err})") from None


def _split_arrays(npz: np.lib.npyio.NpzFile, path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    splits = SPLITS if split == "all" else (split,)
    missing = [f"{s}_{k}" for s in splits for k in ("images", "labels") if f"{s}_{k}" not in npz.files]
    if missing:
        raise DataError(f"medmnist:{path}: missing array(s) {', '.join(missing)}; a MedMNIST file holds "
                        f"train_images, train_labels, val_*, test_* (found {', '.join(npz.files) or 'none'})")
    try:
        return (np.concatenate([npz[f"{s}_images"] for s in splits]),
                np.concatenate([npz[f"{s}_labels"] for s in splits]))
    except (ValueError, OSError) as err:  # damaged members, or splits of different image sizes
        raise DataError(f"medmnist:{path}: unreadable arrays ({err})") from None


def load_npz(path: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """A MedMNIST .npz → (images (N, H, W) uint8 in [0, 255], labels (N,) int64, class names).

    split: "train", "val", "test" or "all" (the three concatenated). Label names come from the catalogue
    when the file has an official name, else "class-K". Multi-label sets (ChestMNIST) are folded by
    `fold_multi_label`. Colour images (N, H, W, 3) become BT.601 luminance, as the image readers do."""
    from .readers import LUMA_601  # Pillow and pydicom load when reading, not when the CLI builds its --help

    path = Path(path).expanduser()
    if split not in SPLITS + ("all",):
        raise ConfigError(f"split {split!r}: choose from train, val, test, all")
    with _open_npz(path) as npz:
        images, labels = _split_arrays(npz, path, split)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise DataError(f"medmnist:{path}: images are {images.dtype} {images.shape}; expected uint8 (N, H, W) "
                        "or (N, H, W, 3)")
    if images.ndim == 4:
        images = np.round(images.astype(np.float64) @ LUMA_601).astype(np.uint8)
    if len(images) == 0:
        raise DataError(f"medmnist:{path}: the {split} split holds no images")
    if len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise DataError(f"medmnist:{path}: labels {labels.dtype} {labels.shape} do not fit {len(images)} images; "
                        "expected non-negative whole numbers, one row per image")
    labels = labels.reshape(len(labels), -1)  # MedMNIST stores (N, 1) for one label, (N, K) for K findings
    entry = entry_for_file(path)
    multi = labels.shape[1] > 1
    k = labels.shape[1] if multi else int(labels.max(initial=0)) + 1
    names = entry.labels if entry is not None and len(entry.labels) >= k else tuple(f"class-{i}" for i in range(k))
    if multi:
        if labels.max(initial=0) > 1:
            raise DataError(f"medmnist:{path}: multi-label rows must hold 0 or 1 (found {int(labels.max())})")
        flat, names = fold_multi_label(labels, names[:k])
    else:
        flat = labels[:, 0].astype(np.int64)
    return images, flat, names


def to_class_folders(npz_path: str | Path, out: str | Path, split: str = "train") -> dict[str, int]:
    """Write a MedMNIST .npz as 8-bit PNGs in class folders named by label (`out/pneumonia/train-000012.png`,
    the split and the image's index in it); returns the count per class. Files are written atomically."""
    from .folders import write_class_folders  # Pillow loads when writing, not when the CLI builds its --help

    npz_path = Path(npz_path)
    counts: dict[str, int] = {}
    for part in (SPLITS if split == "all" else (split,)):
        images, labels, names = load_npz(npz_path, part)
        written = write_class_folders(out, ((names[label], f"{part}-{i:06d}", image)
                                            for i, (image, label) in enumerate(zip(images, labels))))
        for name, n in written.items():
            counts[name] = counts.get(name, 0) + n
    return dict(sorted(counts.items()))
