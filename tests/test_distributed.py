"""Several processes under torchrun (gloo, CPU, loopback only): results must not depend on the world size."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
TRAIN = ["--preset", "tiny", "--size", "32", "--batch-size", "8", "--lr-schedule", "constant", "--warmup-steps", "1",
         "--val-fraction", "0", "--no-progress", "--device", "cpu", "--precision", "fp32"]
pytestmark = pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun is not installed")


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp / "cache")}


def _run(args: list[str], tmp: Path, procs: int) -> None:
    launcher = [TORCHRUN, "--standalone", "--nproc_per_node", str(procs), "--no-python"] if procs > 1 else []
    done = subprocess.run([*launcher, "meddiff", *args], env=_env(tmp), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def _weights(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> dict[str, Path]:
    """1-process and 2-process runs of 4 steps, a second seed, and a 2-process run of 2 steps resumed on 1."""
    tmp = tmp_path_factory.mktemp("dist")
    out = {name: tmp / name for name in ("one", "two", "seed1", "split")}
    _run(["train", "--data", str(image_folder), "--out", str(out["one"]), "--max-steps", "4", *TRAIN], tmp, 1)
    _run(["train", "--data", str(image_folder), "--out", str(out["two"]), "--max-steps", "4", *TRAIN], tmp, 2)
    _run(["train", "--data", str(image_folder), "--out", str(out["seed1"]), "--max-steps", "4", "--seed", "1",
          *TRAIN], tmp, 1)
    _run(["train", "--data", str(image_folder), "--out", str(out["split"]), "--max-steps", "2", *TRAIN], tmp, 2)
    _run(["train", "--resume", str(out["split"]), "--max-steps", "4", "--no-progress"], tmp, 1)
    out["tmp"] = tmp
    return out


def test_two_processes_train_the_same_weights_as_one(runs: dict[str, Path]) -> None:
    one, two, other_seed = _weights(runs["one"], 4), _weights(runs["two"], 4), _weights(runs["seed1"], 4)
    assert _max_diff(one, two) < 1e-4
    assert _max_diff(one, other_seed) > 100 * max(_max_diff(one, two), 1e-7)


def test_a_checkpoint_written_by_two_processes_resumes_on_one(runs: dict[str, Path]) -> None:
    assert _max_diff(_weights(runs["one"], 4), _weights(runs["split"], 4)) < 1e-4


def test_sharded_sampling_writes_the_files_of_one_process(runs: dict[str, Path]) -> None:
    tmp, a, b = runs["tmp"], runs["tmp"] / "s1", runs["tmp"] / "s2"
    common = ["sample", "--run-dir", str(runs["one"]), "--count", "5", "--steps", "3", "--sampler", "ddim",
              "--class", "a", "--no-progress", "--device", "cpu"]
    _run([*common, "--out", str(a)], tmp, 1)
    _run([*common, "--out", str(b)], tmp, 2)
    names = sorted(p.name for p in a.glob("seed*.png"))
    assert names == sorted(p.name for p in b.glob("seed*.png")) and len(names) == 5
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "manifest.csv").read_text() == (b / "manifest.csv").read_text()
    assert not list(b.glob("manifest.rank*.csv"))
