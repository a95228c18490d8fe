"""Tests for meddiff.runfolder: the typed record, the log, the weights folders, checkpoints (pruning, "latest",
verification, the newest that verifies) and optimizer state round trips; damaged run folders (one RunError
naming the file, no request to the network), full disks. (Atomic folders and files: test_atomic.py.)"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from meddiff import atomic
from meddiff import runfolder
from meddiff.config import TrainConfig, model_config
from meddiff.errors import ConfigError, OutputError, RunError
from meddiff.model import build_unet


def test_write_json_is_atomic_and_read_json_errors_are_run_errors(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "meddiff.json"
    atomic.write_json(path, {"a": [1, 2]})
    assert runfolder.read_json(path) == {"a": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["meddiff.json"]
    with pytest.raises(RunError, match=r"nothing\.json: missing; is this a meddiff run folder\?"):
        runfolder.read_json(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(RunError, match=r"bad\.json: unreadable JSON"):
        runfolder.read_json(tmp_path / "bad.json")


def _record(**changes: object) -> runfolder.RunRecord:
    cfg = TrainConfig(data="builtin:ct", out="run", preset="tiny").resolve()
    base = runfolder.RunRecord(train=cfg, model=model_config("tiny", 32, 2), class_names=("a", "b"),
                               data={"images": 16, "classes": {"a": 8, "b": 8}}, split={"train": 14, "val": 2},
                               hardware="cpu fp32", processes=1, meddiff_version="0.1")
    return dataclasses.replace(base, **changes)


def test_the_record_round_trips_typed_in_the_order_it_always_had(tmp_path: Path) -> None:
    result = runfolder.TrainResult(tmp_path, 6, 48, 1.5, 32.0, 0.25, None, 512.0, "max-steps")
    record = _record(result=result)
    runfolder.write_record(tmp_path, record)
    assert runfolder.has_record(tmp_path) and not runfolder.has_record(tmp_path / "other")
    stored = json.loads((tmp_path / "meddiff.json").read_text())
    assert list(stored) == ["train", "model", "class_names", "data", "split", "hardware", "processes",
                            "meddiff_version", "result"]
    assert stored["result"]["run"] == str(tmp_path) and stored["class_names"] == ["a", "b"]
    again = runfolder.read_record(tmp_path)
    assert again == record and isinstance(again.result.run, Path) and again.conditional


def test_a_record_with_only_the_required_fields_reads_with_defaults(tmp_path: Path) -> None:
    record = _record()
    stored = {k: v for k, v in record.to_json().items() if k in ("train", "model", "class_names")}
    (tmp_path / "meddiff.json").write_text(json.dumps(stored))
    again = runfolder.read_record(tmp_path)
    assert again.model == record.model and again.data == {} and again.result is None and again.processes == 1


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", r"meddiff\.json: expected a JSON object \(a meddiff run record\), got list"),
    ('{"train": {}, "class_names": []}', r"meddiff\.json: no model; is this a meddiff run record\?"),
    ('{"train": {"data": "x", "out": "y"}, "model": {"sample_size": 32}, "class_names": []}',
     r"meddiff\.json: not a valid meddiff run record \(.*block_out_channels"),
])
def test_a_damaged_record_is_a_run_error_naming_the_file(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "meddiff.json").write_text(content)
    with pytest.raises(RunError, match=message):
        runfolder.read_record(tmp_path)


def test_the_log_appends_lines_and_skips_one_cut_off(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"no log\.jsonl; expected a run folder written by meddiff train"):
        runfolder.read_log(tmp_path)
    runfolder.append_log(tmp_path, {"step": 1, "loss": 0.5})
    runfolder.append_log(tmp_path, {"step": 2, "val_loss": 0.4})
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # an interrupted run
    assert runfolder.read_log(tmp_path) == [{"step": 1, "loss": 0.5}, {"step": 2, "val_loss": 0.4}]


def test_weights_lookup_names_the_folder_and_what_is_allowed(tmp_path: Path) -> None:
    assert runfolder.weights_file(tmp_path, "ema") == tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    assert runfolder.weights_file(tmp_path, "best").parent == tmp_path / "best"
    with pytest.raises(ConfigError, match=r"--weights 'raw': choose from ema, best$"):
        runfolder.weights_folder(tmp_path, "raw")
    with pytest.raises(ConfigError, match=r"--weights 'last': choose from ema, best, raw$"):
        runfolder.load_unet(tmp_path, "last")
    with pytest.raises(RunError, match=r"best/ is missing; has training finished \(or validated, for best\)\?"):
        runfolder.weights_folder(tmp_path, "best")
    runfolder.write_record(tmp_path, _record())
    with pytest.raises(RunError, match=r"no complete checkpoint for --weights raw"):
        runfolder.load_unet(tmp_path, "raw")


def test_model_index_picks_the_pipeline_class() -> None:
    plain, index = runfolder.model_index(model_config("tiny", 32), ("all",))
    assert plain == "DDIMPipeline" and index["_class_name"] == "DDIMPipeline" and "class_names" not in index
    cond, index = runfolder.model_index(model_config("tiny", 32, 2), ("a", "b"))
    assert cond == "MeddiffPipeline" and index["class_names"] == ["a", "b"] and index["patch_size"] == 1
    patched, index = runfolder.model_index(model_config("lean", 64), ("all",))
    assert patched == "MeddiffPipeline" and index["class_names"] == [] and index["patch_size"] == 2


def _weights(value: float) -> dict[str, dict[str, torch.Tensor]]:
    return {"model": {"w": torch.full((2, 2), value)}}


def test_save_checkpoint_prunes_to_keep_complete_checkpoints(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        folder = runfolder.save_checkpoint(tmp_path, step, _weights(step), {"step": step}, keep=2)
        assert folder.name == f"step_{step:08d}"
    names = [p.name for p in runfolder.complete_checkpoints(tmp_path)]
    assert names == ["step_00000003", "step_00000004"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == names
    weights, state = runfolder.load_checkpoint(runfolder.latest_checkpoint(tmp_path))
    assert state == {"step": 4}
    assert torch.equal(weights["model"]["w"], torch.full((2, 2), 4.0))


def test_incomplete_checkpoints_are_ignored_and_not_counted(tmp_path: Path) -> None:
    runfolder.save_checkpoint(tmp_path, 1, _weights(1), {"step": 1}, keep=2)
    runfolder.save_checkpoint(tmp_path, 2, _weights(2), {"step": 2}, keep=2)
    broken = tmp_path / "checkpoints" / "step_00000009"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"cut off")  # no state.json: a crash mid-write
    assert runfolder.latest_checkpoint(tmp_path).name == "step_00000002"
    runfolder.save_checkpoint(tmp_path, 3, _weights(3), {"step": 3}, keep=2)
    assert [p.name for p in runfolder.complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert runfolder.latest_checkpoint(tmp_path).name == "step_00000003"


def test_no_checkpoint_means_none(tmp_path: Path) -> None:
    assert runfolder.latest_checkpoint(tmp_path) is None
    assert runfolder.complete_checkpoints(tmp_path / "missing") == []


def test_checkpoint_files_are_safetensors_and_json_only(tmp_path: Path) -> None:
    folder = runfolder.save_checkpoint(tmp_path, 7, {"model": {"w": torch.ones(3)}, "ema": {"w": torch.zeros(3)}},
                                  {"step": 7}, keep=1)
    assert sorted(p.name for p in folder.iterdir()) == ["ema.safetensors", "model.safetensors", "state.json"]
    assert json.loads((folder / "state.json").read_text()) == {"step": 7}


def test_state_dict_cpu_is_contiguous_and_detached() -> None:
    lin = torch.nn.Linear(3, 2)
    lin.weight.data = lin.weight.data.t().contiguous().t()  # a strided view
    sd = runfolder.state_dict_cpu(lin)
    assert all(v.is_contiguous() and not v.requires_grad for v in sd.values())
    sd["weight"].add_(1)
    assert not torch.equal(sd["weight"], lin.weight), "a copy, not a view of the live weights"


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 3))


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_state_round_trips_through_a_checkpoint(tmp_path: Path, fused: bool) -> None:
    model = _model(0)
    groups = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 0.01},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2, fused=fused)
    _step(model, opt, 1)
    _step(model, opt, 2)
    tensors, meta = runfolder.optimizer_tensors(opt)
    folder = runfolder.save_checkpoint(tmp_path, 2, {"model": runfolder.state_dict_cpu(model), "optimizer": tensors},
                                  {"optimizer": meta})

    fresh = _model(99)
    fresh_groups = [{"params": [p for p in fresh.parameters() if p.ndim > 1], "weight_decay": 0.5},
                    {"params": [p for p in fresh.parameters() if p.ndim <= 1], "weight_decay": 0.5}]
    fresh_opt = torch.optim.AdamW(fresh_groups, lr=1.0, fused=fused)
    weights, state = runfolder.load_checkpoint(folder)
    fresh.load_state_dict(weights["model"])
    runfolder.load_optimizer(fresh_opt, weights["optimizer"], state["optimizer"])
    assert [g["weight_decay"] for g in fresh_opt.param_groups] == [0.01, 0.0]
    assert fresh_opt.param_groups[0]["lr"] == 1e-2

    _step(model, opt, 3)
    _step(fresh, fresh_opt, 3)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    for pa, pb in zip(model.parameters(), fresh.parameters()):
        sa, sb = opt.state[pa], fresh_opt.state[pb]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k


def test_a_damaged_checkpoint_file_is_a_run_error_naming_it(tmp_path: Path) -> None:
    folder = runfolder.save_checkpoint(tmp_path, 5, _weights(5), {"step": 5})
    assert runfolder.checkpoint_folder(tmp_path, 5) == folder == runfolder.latest_checkpoint(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{cut off")
    with pytest.raises(RunError, match=r"model\.safetensors: unreadable checkpoint weights"):
        runfolder.load_checkpoint(folder)


# ---------------------------------------------------------------- damaged run folders: one RunError naming the file

def _edit_json(rel: str, **changes: object) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        data = json.loads((run / rel).read_text())
        data.update(changes)
        (run / rel).write_text(json.dumps(data))
    return edit


def _cut(rel: str, keep: int) -> Callable[[Path], None]:
    return lambda run: (run / rel).write_bytes((run / rel).read_bytes()[:keep])


def _pickle_weights(run: Path) -> None:
    weights = run / "unet" / WEIGHTS
    torch.save(load_file(str(weights)), run / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()


def _weights_of_another_model(run: Path) -> None:
    other = build_unet(model_config("tiny", 32, 3))  # a class embedding of 4 rows where the run's has 3
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(run / "unet" / WEIGHTS))


WEIGHTS = "diffusion_pytorch_model.safetensors"
# damage → what the one-line error must say (after the run folder's path)
DAMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated-weights": (_cut(f"unet/{WEIGHTS}", 100), rf"unet/{WEIGHTS}: unreadable weights \("),
    "garbage-weights": (lambda r: (r / "unet" / WEIGHTS).write_bytes(os.urandom(4096)),
                        rf"unet/{WEIGHTS}: unreadable weights \("),
    "weights-of-another-model": (_weights_of_another_model,
                                 rf"unet/{WEIGHTS}: the weights do not fit the model \(size mismatch for "
                                 r"class_embedding.weight"),
    "pickle-instead-of-safetensors": (_pickle_weights, r"unet/diffusion_pytorch_model.bin: a pickle, which can run "
                                                       r"code when loaded; meddiff loads only"),
    "unet-config-not-json": (lambda r: (r / "unet" / "config.json").write_text("{not json"),
                             r"unet/config.json: unreadable JSON"),
    "unet-config-wrong-type": (_edit_json("unet/config.json", block_out_channels="abc"),
                               r"unet/config.json: block_out_channels is \"abc\"; the run's meddiff.json describes "
                               r"a model with block_out_channels \[16, 32\]"),
    "unet-config-wrong-shape": (_edit_json("unet/config.json", block_out_channels=[8, 16]),
                                r"unet/config.json: block_out_channels is \[8, 16\]"),
    "unet-config-a-list": (lambda r: (r / "unet" / "config.json").write_text("[]"),
                           r"unet/config.json: expected a JSON object"),
    "missing-unet": (lambda r: shutil.rmtree(r / "unet"), r": unet/ is missing; has training finished"),
    "missing-weights": (lambda r: (r / "unet" / WEIGHTS).unlink(), rf"unet/{WEIGHTS}: missing"),
    "missing-scheduler": (lambda r: shutil.rmtree(r / "scheduler"), r"/scheduler: missing"),
    "scheduler-config-wrong-type": (_edit_json("scheduler/scheduler_config.json", num_train_timesteps="abc"),
                                    r"scheduler_config.json: num_train_timesteps is \"abc\"; the run's meddiff.json "
                                    r"trained with 1000"),
    "scheduler-config-wrong-option-type": (_edit_json("scheduler/scheduler_config.json", clip_sample="yes"),
                                           r"scheduler_config.json: clip_sample is \"yes\"; expected bool"),
    "scheduler-config-unusable": (_edit_json("scheduler/scheduler_config.json", timestep_spacing="sideways"),
                                  r"scheduler_config.json: not a scheduler config diffusers can use \(sideways"),
    "record-not-json": (lambda r: (r / "meddiff.json").write_text("[1, 2"), r"meddiff.json: unreadable JSON"),
    "record-model-a-number": (_edit_json("meddiff.json", model=5),
                              r"meddiff.json: model is 5; expected a JSON object of ModelConfig fields"),
    "record-wrong-field-type": (_edit_json("meddiff.json", model={**model_config("tiny", 32, 2).__dict__,
                                                                  "num_classes": "2"}),
                                r"meddiff.json: model.num_classes is \"2\"; expected int"),
    "record-class-count": (_edit_json("meddiff.json", class_names=["a", "b", "c"]),
                           r"meddiff.json: 3 class_names \(a, b, c\) for a model of 2 classes"),
    "record-missing": (lambda r: (r / "meddiff.json").unlink(), r"meddiff.json: missing"),
}


def damaged_run(trained_run: Path, where: Path, name: str) -> Path:
    """A copy of the tiny conditional run with one damage of DAMAGES."""
    run = where / name
    shutil.copytree(trained_run, run)
    DAMAGES[name][0](run)
    return run


@pytest.mark.parametrize("name", DAMAGES)
def test_a_damaged_run_is_one_run_error_naming_the_file(trained_run: Path, tmp_path: Path, name: str) -> None:
    from meddiff.pipeline import MeddiffPipeline, export_diffusers
    from meddiff.sample import load_run

    run = damaged_run(trained_run, tmp_path, name)
    pattern = DAMAGES[name][1]
    loads = [lambda: load_run(run), lambda: export_diffusers(run, tmp_path / "exported")]
    if name != "record-missing":  # without meddiff.json the folder is still a complete diffusers pipeline
        loads.append(lambda: MeddiffPipeline.from_pretrained(run))
    for load in loads:
        with pytest.raises(RunError, match=pattern) as caught:
            load()
        assert "\n" not in str(caught.value) and str(run) in str(caught.value)
    assert not (tmp_path / "exported").exists(), "export-diffusers checks the run before it copies anything"


def test_an_exported_folder_loads_from_its_own_files_and_a_damaged_one_is_named(trained_run: Path,
                                                                                tmp_path: Path) -> None:
    from meddiff.pipeline import MeddiffPipeline, export_diffusers

    out, _ = export_diffusers(trained_run, tmp_path / "exported")
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json", WEIGHTS], "only the checked files"
    assert MeddiffPipeline.from_pretrained(out).config.class_names == ["a", "b"]
    _cut(f"unet/{WEIGHTS}", 100)(out)
    with pytest.raises(RunError, match=rf"exported/unet/{WEIGHTS}: unreadable weights"):
        MeddiffPipeline.from_pretrained(out)
    (out / "model_index.json").unlink()
    shutil.copy(trained_run / "unet" / WEIGHTS, out / "unet" / WEIGHTS)
    with pytest.raises(RunError, match=r"exported: cannot be loaded as a pipeline \(.*model_index.json"):
        MeddiffPipeline.from_pretrained(out)


def test_weights_raw_builds_the_records_model_with_the_newest_checkpoint_that_verifies(trained_run: Path,
                                                                                      tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    older, newest = runfolder.complete_checkpoints(run)
    _cut(f"checkpoints/{newest.name}/model.safetensors", 200)(run)
    unet, path = runfolder.load_unet(run, "raw")
    assert path == older / "model.safetensors"
    for key, value in load_file(str(path)).items():
        assert torch.equal(unet.state_dict()[key], value)


# ---------------------------------------------------------------- no request leaves the machine

NET_SCRIPT = r"""
import contextlib, io, json, os, socket, sys
from huggingface_hub import hf_hub_download
try:  # the control: a Hub request that must reach the trap, so that a miss cannot pass unnoticed
    hf_hub_download("meddiff-control/model", "config.json", cache_dir=sys.argv[1])
except Exception:
    pass
with socket.create_connection(os.environ["HF_ENDPOINT"][len("http://"):].split(":")) as s:
    s.sendall(b"CONTROL-END\r\n")  # what the trap sees after this line came from meddiff
from meddiff.cli import main
from meddiff.errors import MeddiffError
from meddiff.pipeline import MeddiffPipeline
results = []
for run in sys.argv[2:]:
    for argv in (["sample", "--run", run, "--out", run + "-smp", "--n", "1", "--steps", "1", "--no-progress"],
                 ["export-diffusers", run, run + "-exp"]):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                code = main(argv)
        except Exception as e:  # a traceback: reported below, after the network is checked
            code = f"Traceback: {e!r}"
        results.append([argv[0], run, code, err.getvalue()])
    try:
        MeddiffPipeline.from_pretrained(run)
        results.append(["pipeline", run, 0, ""])
    except MeddiffError as e:
        results.append(["pipeline", run, 1, f"meddiff: error: {e}\n"])
    except Exception as e:
        results.append(["pipeline", run, f"Traceback: {e!r}", ""])
print(json.dumps(results))
"""


class NetTrap:
    """A listener on 127.0.0.1 that HF_ENDPOINT and the proxy variables point at: each connection is a request
    that tried to leave the machine. It records the request line and answers 404."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    self.requests.append(conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1"))
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def close(self) -> None:
        self.sock.close()


def test_loading_damaged_runs_asks_nothing_of_the_network(trained_run: Path, tmp_path: Path) -> None:
    """Issue 19: for a missing sub-folder diffusers asked the Hugging Face Hub for RUN/unet. huggingface_hub reads
    HF_ENDPOINT when imported, hence a fresh interpreter."""
    runs = [damaged_run(trained_run, tmp_path, name).name for name in DAMAGES]  # relative, as users type them:
    # an absolute path is no valid Hub repository id, so diffusers would not even try to fetch "missing-unet/unet"
    trap = NetTrap()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k not in ("TRANSFORMERS_OFFLINE",)}
    env.update(HF_ENDPOINT=trap.url, HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5", NO_PROXY="",
               no_proxy="", OMP_NUM_THREADS="1",
               **{k: trap.url for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")})
    try:
        proc = subprocess.run([sys.executable, "-c", NET_SCRIPT, "hub", *runs], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    finally:
        trap.close()
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "CONTROL-END" in trap.requests, trap.requests
    control = trap.requests[:trap.requests.index("CONTROL-END")]
    assert any("meddiff-control" in r for r in control), f"the control request did not reach the trap: {control}"
    assert trap.requests[len(control) + 1:] == [], "a load asked the network"
    for command, run, code, err in json.loads(proc.stdout.splitlines()[-1]):
        if command == "pipeline" and run.endswith("record-missing"):
            assert code == 0  # without meddiff.json the folder is still a complete diffusers pipeline
            continue
        lines = err.splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith("meddiff: error: "), (command, run, err)
        assert not (tmp_path / f"{run}-smp").exists() and not (tmp_path / f"{run}-exp").exists(), (command, run)


# ---------------------------------------------------------------- resume from the newest checkpoint that verifies

def test_the_newest_checkpoint_that_verifies_is_found_and_the_damaged_ones_are_named(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        runfolder.save_checkpoint(tmp_path, step, _weights(step), {"step": step, "images_seen": step}, keep=4)
    ckpt = lambda step: runfolder.checkpoint_folder(tmp_path, step)  # noqa: E731
    (ckpt(4) / "model.safetensors").write_bytes((ckpt(4) / "model.safetensors").read_bytes()[:20])
    (ckpt(3) / "state.json").write_text(json.dumps({"step": 3}))
    last = runfolder.newest_verified_checkpoint(tmp_path, ("model",), ("step", "images_seen"))
    assert last.folder == ckpt(2) and last.state == {"step": 2, "images_seen": 2}
    assert torch.equal(last.weights["model"]["w"], torch.full((2, 2), 2.0))
    assert last.damaged[0].startswith("step_00000004 is damaged (model.safetensors: unreadable checkpoint weights (")
    assert last.damaged[1] == "step_00000003 is damaged (state.json: no images_seen)"
    with pytest.raises(RunError, match=r"no checkpoint can be resumed from: step_00000004 is damaged \(model\.safe"
                                       r"tensors: unreadable .*\); step_00000003 is damaged \(ema.safetensors: "
                                       r"missing\); .*step_00000001 is damaged \(ema.safetensors: missing\)$"):
        runfolder.newest_verified_checkpoint(tmp_path, ("ema",))
    assert runfolder.newest_verified_checkpoint(tmp_path / "empty") is None


def test_the_temporaries_of_a_killed_save_are_removed_from_the_run_and_its_checkpoints(tmp_path: Path) -> None:
    runfolder.save_checkpoint(tmp_path, 1, _weights(1), {"step": 1})
    left = [tmp_path / ".best.tmp12345", tmp_path / "checkpoints" / ".step_00000002.77.ab12cd34.tmp",
            tmp_path / ".unet.77.ab12cd34.old"]
    for p in left:
        p.mkdir()
    removed = runfolder.remove_temporaries(tmp_path)
    assert sorted(removed) == sorted(left) and not any(p.exists() for p in left)
    assert [p.name for p in runfolder.complete_checkpoints(tmp_path)] == ["step_00000001"]


def test_a_failed_new_run_is_discarded_unless_it_can_be_resumed(tmp_path: Path) -> None:
    created = tmp_path / "created"
    runfolder.write_record(created, _record())
    runfolder.discard_unsaved_run(created, created=True)
    assert not created.exists()
    given = tmp_path / "given"
    given.mkdir()
    (given / "notes.txt").write_text("the user's")
    runfolder.write_record(given, _record())
    runfolder.append_log(given, {"step": 1})
    runfolder.discard_unsaved_run(given, created=False)
    assert [p.name for p in given.iterdir()] == ["notes.txt"]
    resumable = tmp_path / "resumable"
    runfolder.write_record(resumable, _record())
    runfolder.save_checkpoint(resumable, 1, _weights(1), {"step": 1})
    runfolder.discard_unsaved_run(resumable, created=True)
    assert runfolder.has_record(resumable) and runfolder.latest_checkpoint(resumable)


# ---------------------------------------------------------------- a full disk

def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   SafetensorError("Error while serializing: I/O error: No space left on device "
                                                   "(os error 28)")])
def test_a_disk_that_fills_up_during_a_checkpoint_leaves_the_previous_one_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    runfolder.save_checkpoint(tmp_path, 1, _weights(1), {"step": 1})
    before = _snapshot(tmp_path)

    def half_then_full(tensors: dict[str, torch.Tensor], path: str) -> None:
        Path(path).write_bytes(b"\x08\x00\x00\x00half of it")
        raise error
    monkeypatch.setattr(runfolder, "save_file", half_then_full)
    with pytest.raises(OutputError, match=r"^no space left on the device while writing checkpoint .*step_00000002 "
                                          r"\(No space left on device\); the previous checkpoint is intact$"):
        runfolder.save_checkpoint(tmp_path, 2, _weights(2), {"step": 2})
    assert _snapshot(tmp_path) == before
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"], "no temporary left"


FSIZE_SCRIPT = r"""
import json, resource, signal, sys
from pathlib import Path
import torch
from meddiff import runfolder
from meddiff.config import TrainConfig, model_config
from meddiff.errors import OutputError
from meddiff.model import build_unet
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that a write past the limit fails with EFBIG, not kills
run = Path(sys.argv[1])
record = runfolder.RunRecord(TrainConfig(data="x", out=str(run), preset="tiny").resolve(), model_config("tiny", 32, 2),
                             ("a", "b"))
torch.manual_seed(0)
runfolder.save_model_folder(run, build_unet(record.model), record)
runfolder.save_checkpoint(run, 1, {"model": runfolder.state_dict_cpu(build_unet(record.model))}, {"step": 1})
print("saved", flush=True)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
errors = []
for save in (lambda: runfolder.save_model_folder(run, build_unet(record.model), record),
             lambda: runfolder.save_checkpoint(run, 2, {"model": runfolder.state_dict_cpu(build_unet(record.model))},
                                               {"step": 2})):
    try:
        save()
        errors.append(None)
    except OutputError as err:
        errors.append(str(err))
print(json.dumps(errors))
"""


def test_a_file_size_limit_during_real_saves_is_one_error_and_changes_nothing(tmp_path: Path) -> None:
    """`ulimit -f` for real: the kernel refuses the write with EFBIG (SIGXFSZ ignored), inside safetensors' and
    diffusers' own writers."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", FSIZE_SCRIPT, str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "saved\n", proc.stderr.read()
    before = _snapshot(run)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    unet_error, ckpt_error = json.loads(out)
    assert unet_error == f"no space left on the device while writing {run / 'unet'} (File too large); the previous " \
                         "unet/ is intact"
    assert ckpt_error == f"no space left on the device while writing checkpoint {run / 'checkpoints/step_00000002'} " \
                         "(File too large); the previous checkpoint is intact"
    assert _snapshot(run) == before
    assert not [p for p in run.rglob(".*")], "no temporary left behind"
