"""Tests for meddiff.checkpoint: atomic folders and JSON, pruning, "latest", optimizer state round trips."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from meddiff import checkpoint as ckpt
from meddiff.errors import RunError


def test_atomic_folder_replaces_target_on_success(tmp_path: Path) -> None:
    target = tmp_path / "unet"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with ckpt.atomic_folder(target) as tmp:
        assert tmp != target and tmp.parent == tmp_path
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").exists(), "the old folder stays until the new one is complete"
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"], "no temporary folder left behind"


def test_atomic_folder_leaves_the_old_folder_intact_if_the_body_raises(tmp_path: Path) -> None:
    target = tmp_path / "unet"
    target.mkdir()
    (target / "weights").write_bytes(b"good")
    with pytest.raises(RuntimeError, match="disk full"):
        with ckpt.atomic_folder(target) as tmp:
            (tmp / "weights").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert (target / "weights").read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]


def test_write_json_is_atomic_and_read_json_errors_are_run_errors(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "meddiff.json"
    ckpt.write_json(path, {"a": [1, 2]})
    assert ckpt.read_json(path) == {"a": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["meddiff.json"]
    with pytest.raises(RunError, match=r"nothing\.json: missing; is this a meddiff run folder\?"):
        ckpt.read_json(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(RunError, match=r"bad\.json: unreadable JSON"):
        ckpt.read_json(tmp_path / "bad.json")


def _weights(value: float) -> dict[str, dict[str, torch.Tensor]]:
    return {"model": {"w": torch.full((2, 2), value)}}


def test_save_checkpoint_prunes_to_keep_complete_checkpoints(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        folder = ckpt.save_checkpoint(tmp_path, step, _weights(step), {"step": step}, keep=2)
        assert folder.name == f"step_{step:08d}"
    names = [p.name for p in ckpt.complete_checkpoints(tmp_path)]
    assert names == ["step_00000003", "step_00000004"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == names
    weights, state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert state == {"step": 4}
    assert torch.equal(weights["model"]["w"], torch.full((2, 2), 4.0))


def test_incomplete_checkpoints_are_ignored_and_not_counted(tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path, 1, _weights(1), {"step": 1}, keep=2)
    ckpt.save_checkpoint(tmp_path, 2, _weights(2), {"step": 2}, keep=2)
    broken = tmp_path / "checkpoints" / "step_00000009"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"cut off")  # no state.json: a crash mid-write
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002"
    ckpt.save_checkpoint(tmp_path, 3, _weights(3), {"step": 3}, keep=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000003"


def test_no_checkpoint_means_none(tmp_path: Path) -> None:
    assert ckpt.latest_checkpoint(tmp_path) is None
    assert ckpt.complete_checkpoints(tmp_path / "missing") == []


def test_checkpoint_files_are_safetensors_and_json_only(tmp_path: Path) -> None:
    folder = ckpt.save_checkpoint(tmp_path, 7, {"model": {"w": torch.ones(3)}, "ema": {"w": torch.zeros(3)}},
                                  {"step": 7}, keep=1)
    assert sorted(p.name for p in folder.iterdir()) == ["ema.safetensors", "model.safetensors", "state.json"]
    assert json.loads((folder / "state.json").read_text()) == {"step": 7}


def test_state_dict_cpu_is_contiguous_and_detached() -> None:
    lin = torch.nn.Linear(3, 2)
    lin.weight.data = lin.weight.data.t().contiguous().t()  # a strided view
    sd = ckpt.state_dict_cpu(lin)
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
    tensors, meta = ckpt.optimizer_tensors(opt)
    folder = ckpt.save_checkpoint(tmp_path, 2, {"model": ckpt.state_dict_cpu(model), "optimizer": tensors},
                                  {"optimizer": meta})

    fresh = _model(99)
    fresh_groups = [{"params": [p for p in fresh.parameters() if p.ndim > 1], "weight_decay": 0.5},
                    {"params": [p for p in fresh.parameters() if p.ndim <= 1], "weight_decay": 0.5}]
    fresh_opt = torch.optim.AdamW(fresh_groups, lr=1.0, fused=fused)
    weights, state = ckpt.load_checkpoint(folder)
    fresh.load_state_dict(weights["model"])
    ckpt.load_optimizer(fresh_opt, weights["optimizer"], state["optimizer"])
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
