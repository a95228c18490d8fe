"""Tests for meddiff.runfolder: the typed record, the log, the weights folders, checkpoints (pruning, "latest",
verification) and optimizer state round trips. (Atomic folders and files: test_atomic.py.)"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from meddiff import atomic
from meddiff import runfolder
from meddiff.config import TrainConfig, model_config
from meddiff.errors import ConfigError, RunError


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
