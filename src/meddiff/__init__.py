"""meddiff: diffusion models for medical images. The public Python API, mirroring the CLI; each name is imported
from its module on first use, so `import meddiff` (and `meddiff --help`) loads neither torch nor diffusers.

    from meddiff import TrainConfig, SampleConfig, load_data, train, load_run, generate
"""
from __future__ import annotations

import importlib
import sys
import types
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:  # first, so that any module may `from . import __version__` while the package is still importing
    __version__ = version("meddiff")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "unknown"

# name → the module that owns it (relative to this package)
_API: dict[str, str] = {
    "TrainConfig": ".config", "SampleConfig": ".config", "ModelConfig": ".config",
    "load_data": ".data.dataset", "ImageSet": ".data.dataset",
    "train": ".train", "TrainResult": ".runfolder",
    "AutoencoderConfig": ".config", "train_autoencoder": ".train_autoencoder",
    "load_run": ".sample", "generate": ".sample", "sample_to_folder": ".sample", "LoadedRun": ".sample",
    "EvalConfig": ".evaluate", "evaluate": ".evaluate", "Evaluation": ".evaluate",
    "write_report": ".report",
    "AuditConfig": ".audit", "audit_folder": ".audit",
    "DemoConfig": ".demo", "run_demo": ".demo",
    "MeddiffPipeline": ".pipeline", "export_diffusers": ".pipeline",
    "MeddiffError": ".errors", "ConfigError": ".errors", "DataError": ".errors", "RunError": ".errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name], __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


class _Package(types.ModuleType):
    """`meddiff.train`, `meddiff.train_autoencoder` and `meddiff.evaluate` are the functions: importing the module of the same name (which
    binds it on its package) does not hide them. Their modules: `from meddiff.train import …`."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
del PackageNotFoundError, version
