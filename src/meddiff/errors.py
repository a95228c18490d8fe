"""The errors users can cause: each message names the file or flag, the value received and what is allowed."""
from __future__ import annotations


class MeddiffError(Exception):
    """Base class: the CLI prints the message as one line and exits non-zero."""


class DataError(MeddiffError):
    """A data path, a data spec or the images it holds cannot be used."""


class UnreadableFile(DataError):
    """One input file cannot be read; a loader skips it and reports `path: reason`."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ConfigError(MeddiffError):
    """An option or a combination of options is not allowed."""


class RunError(MeddiffError):
    """A run folder is missing, incomplete or inconsistent, or training failed (non-finite loss)."""


class OutputError(MeddiffError):
    """The disk filled up (or a file grew past `ulimit -f`) while writing: the message names what was being
    written and what is kept as it was."""
