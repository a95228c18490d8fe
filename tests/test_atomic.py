"""Tests for meddiff.atomic: whole files and folders or nothing, the old version kept when a writer fails, no
temporary left behind, and the durability rule (the file and its folder are fsynced)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import BinaryIO

import pytest

from meddiff import atomic


class Halfway(RuntimeError):
    pass


def _raise_halfway(f: BinaryIO) -> None:
    f.write(b"half of the new")
    raise Halfway("disk full")


def test_write_file_replaces_the_content_and_creates_parents(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "x.bin"
    assert atomic.write_file(path, lambda f: f.write(b"one")) == path
    atomic.write_file(path, lambda f: f.write(b"two"))
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["x.bin"], "no temporary left behind"


def test_a_writer_that_raises_halfway_leaves_the_old_file_exactly_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"the old content")
    with pytest.raises(Halfway, match="disk full"):
        atomic.write_file(path, _raise_halfway)
    assert path.read_bytes() == b"the old content"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_a_writer_that_raises_on_a_new_name_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(Halfway):
        atomic.write_file(tmp_path / "new.bin", _raise_halfway)
    assert list(tmp_path.iterdir()) == []


def test_text_json_and_bytes_round_trip(tmp_path: Path) -> None:
    atomic.write_json(tmp_path / "r.json", {"a": [1, 2], "b": float("nan")})
    assert (tmp_path / "r.json").read_text() == json.dumps({"a": [1, 2], "b": float("nan")}, indent=2)
    atomic.write_text(tmp_path / "card.md", "é | ü\n")
    assert (tmp_path / "card.md").read_bytes() == "é | ü\n".encode("utf-8")
    atomic.write_bytes(tmp_path / "b", b"\x00\x01")
    assert (tmp_path / "b").read_bytes() == b"\x00\x01"


def test_replace_file_moves_a_finished_file_into_place(tmp_path: Path) -> None:
    (tmp_path / "f.npz.part").write_bytes(b"verified")
    (tmp_path / "f.npz").write_bytes(b"stale")
    atomic.replace_file(tmp_path / "f.npz.part", tmp_path / "f.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["f.npz"] and (tmp_path / "f.npz").read_bytes() == b"verified"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced descriptors")
def test_the_file_and_its_folder_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(atomic.os, "fsync", spy)
    atomic.write_bytes(tmp_path / "x.bin", b"data")
    assert len(synced) == 2
    assert Path(synced[0]).parent == tmp_path and Path(synced[0]).name.startswith(".x.bin."), "the temporary file"
    assert synced[1] == str(tmp_path), "then the folder, after the rename"


def test_atomic_folder_replaces_target_on_success(tmp_path: Path) -> None:
    target = tmp_path / "unet"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic.atomic_folder(target) as tmp:
        assert tmp != target and tmp.parent == tmp_path and list(tmp.iterdir()) == []
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("new")
        assert (target / "old.txt").exists(), "the old folder stays until the new one is complete"
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["sub", "sub/new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"], "no temporary or old folder left behind"


def test_atomic_folder_leaves_the_old_folder_intact_if_the_body_raises(tmp_path: Path) -> None:
    target = tmp_path / "unet"
    target.mkdir()
    (target / "weights").write_bytes(b"good")
    with pytest.raises(Halfway, match="disk full"):
        with atomic.atomic_folder(target) as tmp:
            (tmp / "weights").write_bytes(b"half")
            raise Halfway("disk full")
    assert (target / "weights").read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]


def test_atomic_folder_on_a_new_name_leaves_nothing_if_the_body_raises(tmp_path: Path) -> None:
    with pytest.raises(Halfway):
        with atomic.atomic_folder(tmp_path / "deep" / "new") as tmp:
            (tmp / "w").write_bytes(b"half")
            raise Halfway("disk full")
    assert list((tmp_path / "deep").iterdir()) == []


def test_atomic_folder_puts_the_old_folder_back_if_the_final_rename_fails(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "best"
    target.mkdir()
    (target / "w").write_bytes(b"good")
    real = os.rename

    def rename(src: str | Path, dst: str | Path) -> None:
        if Path(dst) == target and ".tmp" in Path(src).name:
            raise OSError("no space left on device")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="no space left"):
        with atomic.atomic_folder(target) as tmp:
            (tmp / "w").write_bytes(b"new")
    assert (target / "w").read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
