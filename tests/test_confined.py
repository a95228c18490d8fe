"""Tests for meddiff.confined: read_inside reads only regular files inside their folder, never through a link."""
from __future__ import annotations

import os
from pathlib import Path

from meddiff.confined import read_inside


def test_read_inside_reads_only_regular_files_inside_without_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside" / "secret.txt"
    outside.parent.mkdir()
    outside.write_text("secret")
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "card.md").write_text("inside")
    assert read_inside(root, "sub/card.md") == b"inside" and read_inside(root, root / "sub" / "card.md", 3) == b"ins"
    (root / "out.md").symlink_to(outside)
    (root / "in.md").symlink_to(root / "sub" / "card.md")
    (root / "dir").symlink_to(outside.parent, target_is_directory=True)
    os.mkfifo(root / "fifo.md")  # opening a FIFO for reading would wait for a writer for ever
    for path in ["out.md", "in.md", "dir/secret.txt", "../outside/secret.txt", str(outside), "sub", "fifo.md",
                 "missing.md", root / ".." / "outside" / "secret.txt"]:
        assert read_inside(root, path) is None, path
    linked_root = tmp_path / "linked-root"  # the folder itself may be reached through a link
    linked_root.symlink_to(root, target_is_directory=True)
    assert read_inside(linked_root, "sub/card.md") == b"inside"
