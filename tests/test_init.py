"""The package's public API (meddiff/__init__.py): every exported name resolves to its module's object, lazily, and
`meddiff --help` loads none of the heavy dependencies."""
from __future__ import annotations

import importlib
import subprocess
import sys
import types

import pytest

import meddiff

HEAVY = ("torch", "diffusers", "scipy", "sklearn", "skimage", "nibabel", "pydicom", "matplotlib", "nilearn")


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("name", [n for n in meddiff.__all__ if n != "__version__"])
def test_every_exported_name_is_its_modules_object(name: str) -> None:
    obj = getattr(meddiff, name)
    assert not isinstance(obj, types.ModuleType)
    assert obj is getattr(importlib.import_module(meddiff._API[name], "meddiff"), name)


def test_version_and_unknown_names() -> None:
    assert isinstance(meddiff.__version__, str) and meddiff.__version__
    assert set(meddiff._API) <= set(dir(meddiff))
    with pytest.raises(AttributeError, match="module 'meddiff' has no attribute 'trian'"):
        meddiff.trian  # noqa: B018


def test_the_train_and_evaluate_functions_are_not_hidden_by_their_modules() -> None:
    # The modules imported first, as the CLI does: the package's names still mean the functions.
    out = _python("import meddiff.train, meddiff.evaluate, sys\n"
                  "from meddiff import train, evaluate\n"
                  "print(train is sys.modules['meddiff.train'].train, evaluate is sys.modules['meddiff.evaluate'].evaluate)")
    assert out == "True True"


def test_import_meddiff_and_the_help_parser_load_no_heavy_dependency() -> None:
    out = _python("import sys, contextlib, io\n"
                  "import meddiff, meddiff.cli\n"
                  "for argv in (['--help'], ['train', '--help'], ['data', 'fetch', '--help']):\n"
                  "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
                  "        meddiff.cli.main(argv)\n"
                  f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert out == "[]"
