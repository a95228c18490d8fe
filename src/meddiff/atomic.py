"""Atomic writing of files and folders, with one durability rule: a reader sees the old version or the new one,
never half of one, and a writer that fails leaves the old version exactly as it was and no temporary behind.

The rule: write into a temporary sibling (same folder, hidden, unique name), flush and fsync it, `os.replace` it
onto the target, then fsync the parent folder so that the rename itself survives a power cut. Bottom level: it
imports nothing from meddiff, so data/, metrics/, export, the run folder, report and serve all write through it.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator


def _sibling(target: Path, kind: str) -> Path:
    """A hidden, unique name beside `target`: same folder (so os.replace is a rename), never a user's file."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}")


def fsync_folder(folder: Path) -> None:
    """Make the entries of a folder (renames, new files) durable; a no-op where folders cannot be opened."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_file(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(f)` on a binary file that becomes `path` only once it is complete and on disk; returns `path`.
    Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        with open(tmp, "xb") as f:  # "x": never follow or clobber an existing name; the umask applies
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """`data` as the whole content of `path`, atomically."""
    return write_file(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> Path:
    """`text` as UTF-8, atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    """`data` as indented JSON, atomically."""
    return write_text(path, json.dumps(data, indent=2))


def replace_file(done: str | Path, path: str | Path) -> Path:
    """Move a file written elsewhere in the same folder (e.g. a verified download's `.part`) onto `path`, under the
    same rule: fsync it, rename, fsync the folder."""
    done, path = Path(done), Path(path)
    _fsync_file(done)
    os.replace(done, path)
    fsync_folder(path.parent)
    return path


def _fsync_tree(folder: Path) -> None:
    """fsync every file, then every folder (deepest first), so the whole tree is on disk before its rename."""
    entries = sorted(folder.rglob("*"))
    for p in entries:
        if p.is_file() and not p.is_symlink():
            _fsync_file(p)
    for p in sorted((p for p in entries if p.is_dir() and not p.is_symlink()), key=lambda p: -len(p.parts)):
        fsync_folder(p)
    fsync_folder(folder)


@contextlib.contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling folder to fill; when the block ends without an error it replaces `target`
    (the old folder is set aside and removed only after the new one is in place). On an error the temporary
    folder is removed and `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = _sibling(target, "old")
        had_old = target.exists()
        if had_old:
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            if had_old:
                os.rename(old, target)
            raise
        fsync_folder(target.parent)
        if had_old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
