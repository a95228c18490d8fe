"""Atomic writing of files and folders, with one durability rule: a reader sees the old version or the new one,
never half of one, and a writer that fails leaves the old version exactly as it was and no temporary behind.

The rule: write into a temporary sibling (same folder, hidden, unique name), flush and fsync it, `os.replace` it
onto the target, then fsync the parent folder so that the rename itself survives a power cut. Bottom level: it
imports only meddiff.errors, so data/, metrics/, export, the run folder, report and serve all write through it.

Also here, because they are the other half of "a failed write leaves the old state as it was": the check made
before a command starts work on an output path (`check_out_dir`, `check_out_file`), the cleanup of temporaries
that a killed writer left (`remove_temporaries`), and the one message for a full disk (`no_space_is_an_error`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from .errors import ConfigError, OutputError

NO_SPACE = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})   # disk full, over `ulimit -f`, over quota
# the temporary siblings this module makes (`.name.<pid>.<hex>.tmp` / `.old`), and any `.name.tmp…` alike
_TEMPORARY = re.compile(r"^\..+\.(tmp|old)[^.]*$")


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


# ---------------------------------------------------------------- temporaries a killed writer left

def is_temporary(name: str) -> bool:
    """Whether a file or folder name is one of this module's temporary siblings (`.unet.123.ab12.tmp`, `.old`),
    or named like one (`.best.tmp12345`)."""
    return bool(_TEMPORARY.match(name))


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary siblings that a killed writer left directly in `folder` → what was removed. Only
    call it where no other writer is at work (a run folder at the start of training)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if is_temporary(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ---------------------------------------------------------------- output paths and full disks

def _first_existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists (as anything: a folder, a file, a link)."""
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path(".")


class _Changed(Exception):
    """A folder came or went between two steps of the check: most likely a concurrent check of the same path
    (another torchrun rank's) made or removed it, so the check starts over. `error` is what to report if it keeps
    happening (a missing folder again and again: the file system itself refuses, as /proc answers mkdir)."""

    def __init__(self, error: ConfigError) -> None:
        super().__init__(str(error))
        self.error = error


def _check_creatable(path: Path, flag: str, shown: Path) -> None:
    """That a folder can be made at `path` (which does not exist): make it and every missing parent, then remove
    what was made, so that a command that fails later leaves nothing behind. Errors name `flag` and `shown`."""
    made: list[Path] = []
    try:
        for p in reversed((path, *path.parents)):
            if not os.path.lexists(p):
                try:
                    p.mkdir()
                except FileExistsError:  # another process (a torchrun rank) made it meanwhile: not ours to remove
                    continue
                made.append(p)
    except OSError as err:
        error = ConfigError(f"{flag} {shown}: cannot be created ({err.strerror}: {err.filename})")
        raise (_Changed(error) if isinstance(err, FileNotFoundError) else error) from None
    finally:
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()


def _check_folder_once(path: Path, flag: str, shown: Path) -> None:
    if path.is_dir():
        probe = _sibling(path / "probe", "tmp")  # can anything be made here (permissions, a read-only mount)?
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as err:
            error = ConfigError(f"{flag} {shown}: cannot write into the folder {path} ({err.strerror})")
            raise (_Changed(error) if isinstance(err, FileNotFoundError) else error) from None
        return
    existing = _first_existing(path)
    is_folder = existing.is_dir()
    if existing == path and is_folder or not is_folder and not os.path.lexists(existing):  # came or went meanwhile
        raise _Changed(ConfigError(f"{flag} {shown}: the folder keeps appearing and disappearing while it is "
                                   "checked (another process is making and removing it)"))
    if existing == shown:
        raise ConfigError(f"{flag} {shown}: exists and is not a folder; choose a folder name")
    if not is_folder:
        raise ConfigError(f"{flag} {shown}: {existing} is not a folder, so nothing can be made under it")
    _check_creatable(path, flag, shown)


def _check_folder(path: Path, flag: str, shown: Path, tries: int = 20) -> None:
    """That `path` is a writable folder or can be made one (not a file, nothing under a file). Several processes
    may check one path at once (the ranks of a torchrun job), each making and removing its missing folders: a
    folder that comes or goes under one check is looked at again, not reported as unwritable at once."""
    for attempt in range(tries):
        try:
            return _check_folder_once(path, flag, shown)
        except _Changed as changed:
            if attempt == tries - 1:
                raise changed.error from None


def check_out_dir(path: str | Path, flag: str, empty: bool = False) -> Path:
    """Check, before any work starts, that a command can write the folder `path` (given as `flag`): it is a
    folder or can be made one (not a file, not under a file), writable, and with `empty` not holding anything.
    ConfigError naming the flag, the path and what is wrong; nothing is left created."""
    path = Path(path)
    _check_folder(path, flag, path)
    if empty and path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"{flag} {path}: exists and is not an empty folder; choose a new folder")
    return path


def check_out_file(path: str | Path, flag: str) -> Path:
    """Check, before any work starts, that a command can write the file `path` (given as `flag`): not a folder,
    and its folder exists or can be made. ConfigError naming the flag, the path and what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; give a file name")
    _check_folder(path.parent, flag, path)
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {path}: the file is not writable")
    return path


def no_space(err: BaseException) -> bool:
    """Whether `err` says the disk is full, a file grew past `ulimit -f`, or a quota is spent: an OSError with
    one of those numbers, or a writer (safetensors) that reports the OS error inside its message."""
    if isinstance(err, OSError) and err.errno in NO_SPACE:
        return True
    found = re.search(r"os error (\d+)", str(err))
    return bool(found) and int(found.group(1)) in NO_SPACE


@contextlib.contextmanager
def no_space_is_an_error(what: str, kept: str) -> Iterator[None]:
    """Turn a full disk while writing `what` into one OutputError that says so and what is `kept` as it was."""
    try:
        yield
    except Exception as err:
        if not no_space(err):
            raise
        raise OutputError(f"no space left on the device while writing {what} ({_reason(err)}); {kept}") from None


def _reason(err: BaseException) -> str:
    number = err.errno if isinstance(err, OSError) and err.errno in NO_SPACE else None
    if number is None:
        found = re.search(r"os error (\d+)", str(err))
        number = int(found.group(1)) if found else errno.ENOSPC
    return os.strerror(number)
