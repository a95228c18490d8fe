"""Several processes under torchrun (gloo, CPU, loopback only): results must not depend on the world size,
and a lost rank ends the run with an error, leaving its last complete checkpoint loadable."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from safetensors.torch import load_file

from meddiff.runfolder import latest_checkpoint, load_checkpoint, read_json, read_log

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
TRAIN = ["--preset", "tiny", "--size", "32", "--batch-size", "8", "--lr-schedule", "constant", "--warmup-steps", "1",
         "--val-fraction", "0", "--no-progress", "--device", "cpu", "--precision", "fp32"]
pytestmark = pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun is not installed")
needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers in /proc")


def _env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp / "cache")}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's pairs on loopback too, not on the address the hostname has
    return env


def _torchrun(procs: int, *options: str) -> list[str]:
    return [TORCHRUN, *options, "--nproc_per_node", str(procs), "--no-python"]


def _run(args: list[str], tmp: Path, procs: int) -> None:
    launcher = _torchrun(procs, "--standalone") if procs > 1 else []
    done = subprocess.run([*launcher, "meddiff", *args], env=_env(tmp), capture_output=True, text=True, timeout=240)
    own = [line for line in done.stderr.splitlines() if "meddiff: error" in line]  # a rank's one-line reason
    assert done.returncode == 0, "\n".join(own) + "\n" + done.stderr[-3000:]


def _workers(launcher: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes a torchrun launcher started (Linux /proc; empty elsewhere)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == launcher:  # field 4: the parent's pid
                env = (stat.parent / "environ").read_bytes().decode(errors="replace").split("\0")
                found[int(dict(kv.split("=", 1) for kv in env if "=" in kv)["RANK"])] = int(stat.parent.name)
    return found


@contextlib.contextmanager
def _launched(command: list[str], tmp: Path, log: str) -> Iterator[subprocess.Popen]:
    """A torchrun launch in the background, its output in tmp/log; on the way out, whatever still runs is killed
    (torchrun puts each worker in a session of its own, so they are killed one by one)."""
    with open(tmp / log, "w") as out:
        proc = subprocess.Popen(command, env=_env(tmp), stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                for pid in _workers(proc.pid).values():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.kill()
            proc.wait()


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the launcher exited ({proc.returncode}) before it was ready"
        assert time.monotonic() < deadline, f"not ready after {timeout} s"
        time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _logged_losses(run: Path) -> tuple[list[tuple[int, float, float]], list[float]]:
    """(step, loss, lr) of each training line of RUN/log.jsonl, and the loss of every step the last checkpoint kept."""
    logged = [(r["step"], r["loss"], r["lr"]) for r in read_log(run) if "loss" in r]
    return logged, list(load_checkpoint(latest_checkpoint(run))[1]["recent_losses"])


def test_two_processes_log_the_losses_of_one(runs: dict[str, Path]) -> None:
    # Catches a logged loss that is one rank's share instead of the global batch's (half of it, with two ranks),
    # or that is averaged over ranks twice, and a step that the two runs number differently.
    (log_one, steps_one), (log_two, steps_two) = _logged_losses(runs["one"]), _logged_losses(runs["two"])
    assert log_one and [r[0] for r in log_one] == [r[0] for r in log_two]
    for (step, a, lr_a), (_, b, lr_b) in zip(log_one, log_two):
        assert b == pytest.approx(a, rel=1e-5), f"step {step}: loss {a} on one process, {b} on two"
        assert lr_a == lr_b
    assert len(steps_one) == 4 and steps_two == pytest.approx(steps_one, rel=1e-5)
    _, steps_other_seed = _logged_losses(runs["seed1"])
    assert steps_other_seed != pytest.approx(steps_one, rel=1e-3)  # the comparison can tell runs apart


def test_a_checkpoint_written_by_two_processes_resumes_on_one(runs: dict[str, Path]) -> None:
    assert _max_diff(_weights(runs["one"], 4), _weights(runs["split"], 4)) < 1e-4


def test_two_processes_run_the_copy_check_once_on_the_main_process(tmp_path: Path, image_folder: Path) -> None:
    """Rank 0 samples and audits while rank 1 waits for its verdict: the run ends, and each validation has one
    copy-check row."""
    out = tmp_path / "run"
    _run(["train", "--data", str(image_folder), "--out", str(out), "--max-steps", "4", *TRAIN, "--val-fraction", "0.25",
          "--val-every", "2", "--copy-check", "2", "--max-copies", "0.5"], tmp_path, 2)
    assert [r["step"] for r in read_log(out) if "copies" in r] == [2, 4]


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


@needs_proc
def test_a_rank_that_dies_ends_the_run_and_leaves_a_checkpoint_that_loads(tmp_path: Path, image_folder: Path) -> None:
    run = tmp_path / "run"
    train = ["meddiff", "train", "--data", str(image_folder), "--out", str(run), "--max-steps", "100000",
             "--val-every", "2", *TRAIN]  # no validation set: a checkpoint every 2 steps
    with _launched([*_torchrun(2, "--standalone"), *train], tmp_path, "launch.log") as launcher:
        _wait_until(lambda: latest_checkpoint(run) is not None and len(_workers(launcher.pid)) == 2, launcher, 120)
        os.kill(_workers(launcher.pid)[1], signal.SIGKILL)  # rank 0, the writer, has to notice on its own
        killed = time.monotonic()
        code = launcher.wait(timeout=120)
        took = time.monotonic() - killed
    assert code != 0, (tmp_path / "launch.log").read_text()[-3000:]
    assert took < 60
    last = latest_checkpoint(run)
    weights, state = load_checkpoint(last)
    assert last.name == f"step_{state['step']:08d}"
    assert {"model", "ema", "optimizer"} <= set(weights) and weights["model"]


def test_two_nodes_on_loopback_train_the_weights_of_one_process(runs: dict[str, Path], image_folder: Path,
                                                                 tmp_path: Path) -> None:
    run, port = tmp_path / "nodes", _free_port()
    train = ["meddiff", "train", "--data", str(image_folder), "--out", str(run), "--max-steps", "4", *TRAIN]
    nodes = [[*_torchrun(1, "--nnodes", "2", "--node-rank", str(r), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                         f"127.0.0.1:{port}", "--rdzv-conf", f"is_host={int(r == 0)}", "--local-addr", "127.0.0.1"),
              *train] for r in (0, 1)]
    with _launched(nodes[0], tmp_path, "node0.log") as n0, _launched(nodes[1], tmp_path, "node1.log") as n1:
        codes = n0.wait(timeout=240), n1.wait(timeout=240)
    assert codes == (0, 0), (tmp_path / "node0.log").read_text()[-2000:] + (tmp_path / "node1.log").read_text()[-2000:]
    assert _max_diff(_weights(runs["one"], 4), _weights(run, 4)) < 1e-4
    assert read_json(run / "meddiff.json")["processes"] == 2
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert files == sorted(str(p.relative_to(runs["two"])) for p in runs["two"].rglob("*"))
