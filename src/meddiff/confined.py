"""Reading a file confined to a folder: a regular file inside it, reached without a symbolic link → its bytes.

The one rule for every file meddiff hands to someone else (the web page's model card, previews and zips): a link
planted in a run or output folder never makes the server read, let alone send, a file from elsewhere, and a FIFO
or a device is never opened in a way that could wait. Bottom level: it imports nothing from meddiff.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path


def read_inside(root: str | Path, path: str | Path, limit: int = -1) -> bytes | None:
    """The bytes (at most `limit`; -1: all) of `path`, relative to `root` (an absolute path must lie inside it),
    when it is a regular file inside `root` reached without a symbolic link below `root`; else None.

    `root` itself may be reached through links (it is resolved first)."""
    base = Path(root).resolve()
    target = base / path
    try:
        if not target.is_relative_to(base) or target.resolve(strict=True) != target:
            return None  # outside, '..', or a link on the way
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except (OSError, RuntimeError):
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(limit)
