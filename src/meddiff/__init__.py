"""meddiff: diffusion models for medical images."""
from importlib.metadata import PackageNotFoundError, version

try:  # first, so that any module may `from . import __version__` while the package is still importing
    __version__ = version("meddiff")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "unknown"
del PackageNotFoundError, version
