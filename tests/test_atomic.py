"""Tests for meddiff.atomic: whole files and folders or nothing, the old version kept when a writer fails, no
temporary left behind, and the durability rule (the file and its folder are fsynced); the temporaries a killed
writer leaves, output paths checked before any work, and a full disk as one error."""
from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import BinaryIO

import pytest

from meddiff import atomic
from meddiff.errors import ConfigError, OutputError


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


# ---------------------------------------------------------------- temporaries a killed writer left

def test_the_writers_temporaries_are_recognised_and_removed_and_nothing_else(tmp_path: Path) -> None:
    assert atomic.is_temporary(atomic._sibling(tmp_path / "unet", "tmp").name)
    assert atomic.is_temporary(atomic._sibling(tmp_path / "meddiff.json", "old").name)
    left = [tmp_path / ".best.tmp12345", tmp_path / ".unet.99.ab12cd34.old"]
    for p in left:
        p.mkdir()
        (p / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    (tmp_path / ".meddiff.json.99.ab12cd34.tmp").write_text("{")
    kept = ["best", "notes.tmp", ".hidden", ".tmp", "log.jsonl"]
    for name in kept:
        (tmp_path / name).write_text("mine")
    removed = atomic.remove_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".best.tmp12345", ".meddiff.json.99.ab12cd34.tmp",
                                                ".unet.99.ab12cd34.old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert atomic.remove_temporaries(tmp_path / "missing") == []


# ---------------------------------------------------------------- output paths, checked before any work

def test_an_out_folder_that_is_a_file_lies_under_a_file_or_cannot_be_made_is_refused(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("a user's file\n")
    with pytest.raises(ConfigError, match=r"^--out .*afile: exists and is not a folder; choose a folder name$"):
        atomic.check_out_dir(afile, "--out")
    with pytest.raises(ConfigError, match=r"^--out .*afile/sub/deeper: .*afile is not a folder, so nothing can be"):
        atomic.check_out_dir(afile / "sub" / "deeper", "--out")
    with pytest.raises(ConfigError, match=r"^--out /proc/meddiff-cannot/x: cannot be created \("):
        atomic.check_out_dir("/proc/meddiff-cannot/x", "--out")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x.png").write_bytes(b"x")
    assert atomic.check_out_dir(tmp_path / "used", "--out") == tmp_path / "used"
    with pytest.raises(ConfigError, match=r"^OUT_DIR .*used: exists and is not an empty folder; choose a new"):
        atomic.check_out_dir(tmp_path / "used", "OUT_DIR", empty=True)
    assert afile.read_text() == "a user's file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "used"]


def test_a_new_out_folder_is_checked_by_making_it_and_nothing_is_left(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c"
    assert atomic.check_out_dir(target, "--out") == target
    assert list(tmp_path.iterdir()) == [], "the check leaves no folder behind"


def test_a_folder_another_rank_makes_and_removes_during_the_check_is_not_called_unwritable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ranks of a torchrun job check one --out at once: one sees the folder another's check made, which is
    gone by the time it probes it. That is looked at again, not reported as "cannot write into the folder"."""
    target, made_by_other = tmp_path / "out", []
    real = atomic._sibling

    def vanishing(where: Path, kind: str) -> Path:
        if not made_by_other:  # the other rank's check ends between this check's look and its probe
            made_by_other.append(target)
            target.rmdir()
        return real(where, kind)

    target.mkdir()  # the other rank's check, under way
    monkeypatch.setattr(atomic, "_sibling", vanishing)
    assert atomic.check_out_dir(target, "--out") == target
    assert made_by_other and list(tmp_path.iterdir()) == [], "checked as a new folder; nothing left behind"

    calls = []

    def always_vanishing(*_args: object) -> None:
        calls.append(1)
        raise atomic._Changed(ConfigError("--out x: cannot be created (No such file or directory: x)"))

    monkeypatch.setattr(atomic, "_check_folder_once", always_vanishing)
    with pytest.raises(ConfigError, match=r"^--out x: cannot be created \(No such file or directory: x\)$"):
        atomic.check_out_dir(target, "--out")
    assert len(calls) == 20, "looked at again a bounded number of times, then the last reason is reported"


def test_two_processes_checking_one_new_folder_at_once_both_pass(tmp_path: Path) -> None:
    target = tmp_path / "a" / "out"
    errors: list[BaseException] = []

    def check_many() -> None:
        try:
            for _ in range(300):
                atomic.check_out_dir(target, "--out")
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    other = threading.Thread(target=check_many)
    other.start()
    check_many()
    other.join()
    assert errors == []
    left = list(tmp_path.rglob("*"))
    assert all(p.is_dir() for p in left), "at most a parent one check made while the other was inside it"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_a_folder_that_is_not_writable_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(ConfigError, match=r"locked: cannot write into the folder .*locked \(Permission denied"):
            atomic.check_out_dir(locked, "--out")
        with pytest.raises(ConfigError, match=r"locked/new: cannot be created \(Permission denied"):
            atomic.check_out_dir(locked / "new", "--out")
    finally:
        locked.chmod(0o700)


def test_an_out_file_must_not_be_a_folder_or_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    assert atomic.check_out_file(tmp_path / "new" / "eval.json", "--json") == tmp_path / "new" / "eval.json"
    with pytest.raises(ConfigError, match=r"^--json .*: is a folder; give a file name$"):
        atomic.check_out_file(tmp_path, "--json")
    with pytest.raises(ConfigError, match=r"^--json .*afile/eval.json: .*afile is not a folder"):
        atomic.check_out_file(tmp_path / "afile" / "eval.json", "--json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# ---------------------------------------------------------------- a full disk

@pytest.mark.parametrize("error, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (OSError(errno.EFBIG, "File too large"), "File too large"),
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "No space left on device"),
])
def test_a_full_disk_is_one_output_error_saying_what_is_kept(error: Exception, reason: str) -> None:
    with pytest.raises(OutputError, match=rf"^no space left on the device while writing X \({reason}\); Y is intact$"):
        with atomic.no_space_is_an_error("X", "Y is intact"):
            raise error


def test_other_errors_pass_through_unchanged() -> None:
    with pytest.raises(PermissionError):
        with atomic.no_space_is_an_error("X", "Y"):
            raise PermissionError(errno.EACCES, "Permission denied")


def test_a_file_writer_that_fills_the_disk_halfway_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    atomic.write_json(path, {"old": True})

    def fill(f: BinaryIO) -> None:
        f.write(b'{"new": ')
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OutputError, match=r"while writing .*x.json \(No space left on device\); the old one"):
        with atomic.no_space_is_an_error(str(path), "the old one is intact"):
            atomic.write_file(path, fill)
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_read_only_folder_is_found_by_trying_even_for_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """os.access says yes to root on a read-only mount; making something there says no."""
    real_mkdir = Path.mkdir

    def read_only(self: Path, *args: object, **kwargs: object) -> None:
        if self.parent == tmp_path:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        real_mkdir(self, *args, **kwargs)
    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ConfigError, match=r"^--out .*: cannot write into the folder .* \(Read-only file system\)$"):
        atomic.check_out_dir(tmp_path, "--out")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
