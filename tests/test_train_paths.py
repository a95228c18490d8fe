"""Tests under the training paths the published speed and memory figures rest on: bf16 and channels-last steps on
the CPU, gradient checkpointing, `--micro-batch auto`, and the precision `auto` picks. Each compares a few steps
of the tiny model with a plain fp32 run of the same seed; each says which bug it would catch."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch

import meddiff.runtime as R
from meddiff import runfolder
from meddiff.config import model_config
from meddiff.errors import ConfigError
from meddiff.model import build_unet

T = importlib.import_module("meddiff.train")  # the module: `meddiff.train` is the function

STEPS = 3
# constant lr with no warm-up, so that three steps move the weights; no EMA, so unet/ holds the trained weights
FAST = dict(max_steps=STEPS, val_every=100, lr_schedule="constant", warmup_steps=0, warmup_fraction=0.0,
            ema_decay=0.0, checkpoint_every=1, keep_checkpoints=STEPS, conditional="off")


def _quiet(_line: str) -> None:
    pass


def _run(image_folder: Path, out: Path, train_config, echo=_quiet, **changes: Any) -> dict[str, Any]:
    """Train the tiny model for STEPS steps → its result, per-step weights, logged losses and run record."""
    result = T.train(train_config(image_folder, out, **{**FAST, **changes}), echo=echo)
    weights = {s: runfolder.load_checkpoint(runfolder.checkpoint_folder(out, s))[0]["model"]
               for s in range(1, STEPS + 1)}
    return dict(result=result, weights=weights, log=[r for r in runfolder.read_log(out) if "loss" in r],
                record=runfolder.read_record(out))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """L2 distance between two sets of weights, over all parameters."""
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5


def _relative_gap(run: dict[str, Any], ref: dict[str, Any], step: int) -> float:
    """How far a run's weights at `step` are from the reference run's, relative to how far the reference moved
    between its first and last step (0.57 here). Adam divides by the gradient's size, so an element whose gradient
    is mere rounding noise moves by up to lr either way: an element-wise bound would measure that noise."""
    return _distance(run["weights"][step], ref["weights"][step]) / _distance(ref["weights"][STEPS], ref["weights"][1])


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory, image_folder: Path, train_config) -> dict[str, Any]:
    return _run(image_folder, tmp_path_factory.mktemp("paths") / "fp32", train_config)


def test_fp32_reference_steps_move_the_weights(fp32: dict[str, Any]) -> None:
    w = fp32["weights"]
    assert _max_diff(w[1], w[STEPS]) > 1e-3, "three steps at lr 1e-3 left the weights where they were"
    assert fp32["record"].hardware.endswith(", fp32")


# ---------------------------------------------------------------- bf16 and channels-last on the CPU

def test_bf16_training_step_on_cpu_is_finite_and_close_to_fp32(tmp_path: Path, image_folder: Path, train_config,
                                                              fp32: dict[str, Any]) -> None:
    # Catches bf16 that is asked for but not used (weights equal to fp32's), a loss or gradient that overflows
    # or is cast away under autocast (non-finite loss, or weights that do not move), and a bf16 step that learns
    # something else than the fp32 step (weights far from fp32's, relative to how far the steps moved them).
    bf16 = _run(image_folder, tmp_path / "bf16", train_config, precision="bf16")
    assert bf16["record"].hardware.endswith(", bf16")
    losses = [r["loss"] for r in bf16["log"]]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert bf16["result"].final_loss == pytest.approx(fp32["result"].final_loss, rel=0.02)
    assert bf16["log"][0]["loss"] == pytest.approx(fp32["log"][0]["loss"], rel=0.02)
    w, ref = bf16["weights"], fp32["weights"]
    assert _max_diff(w[1], w[STEPS]) > 1e-3, "bf16 steps did not change the parameters"
    assert _max_diff(w[STEPS], ref[STEPS]) > 0, "bf16 gave fp32's weights bit for bit: autocast is not on"
    assert _relative_gap(bf16, fp32, STEPS) < 0.3  # measured 0.12 on AVX512-BF16


def test_channels_last_training_equals_the_default_layout(tmp_path: Path, image_folder: Path, train_config,
                                                          fp32: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # Catches --channels-last that is ignored (the UNet's convolutions not in channels-last after training) and a
    # layout change that changes the maths (weights or losses away from the default layout's by more than rounding).
    built: list[torch.nn.Module] = []
    monkeypatch.setattr(T, "build_unet", lambda cfg: built.append(build_unet(cfg)) or built[-1])
    cl = _run(image_folder, tmp_path / "cl", train_config, channels_last=True)
    assert len(built) == 1
    conv = built[0].down_blocks[0].resnets[0].conv1.weight  # 16 -> 16 channels: the two layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for step in range(1, STEPS + 1):
        assert _relative_gap(cl, fp32, step) < 1e-3  # measured 2e-4: float rounding of another summation order
    assert [r["loss"] for r in cl["log"]] == pytest.approx([r["loss"] for r in fp32["log"]], rel=1e-5)
    assert cl["result"].final_loss == pytest.approx(fp32["result"].final_loss, rel=1e-5)


# ---------------------------------------------------------------- gradient checkpointing

def test_gradient_checkpointing_equals_no_checkpointing(tmp_path: Path, image_folder: Path, train_config,
                                                        fp32: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # Catches --grad-checkpointing that is ignored (no block recomputed: torch's checkpoint never called) and a
    # recomputation that differs from the first pass (e.g. a random draw inside the forward): other weights.
    calls = [0]
    original = torch.utils.checkpoint.checkpoint

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    gc = _run(image_folder, tmp_path / "gc", train_config, grad_checkpointing=True)
    assert calls[0] > 0, "gradient checkpointing was asked for but no block was checkpointed"
    for step in range(1, STEPS + 1):
        assert _max_diff(gc["weights"][step], fp32["weights"][step]) < 1e-6
    assert gc["result"].final_loss == pytest.approx(fp32["result"].final_loss, rel=1e-6)


# ---------------------------------------------------------------- --micro-batch auto

def _saved_bytes(unet: torch.nn.Module, batch: int, size: int) -> int:
    """Bytes autograd keeps for backward in one training forward of `batch` images: measured on the real batch."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    x = torch.randn(batch, 1, size, size)
    t = torch.randint(0, 1000, (batch,))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, t).sample.float().mean().backward()
    unet.zero_grad(set_to_none=True)
    return total


def _fake_memory(monkeypatch: pytest.MonkeyPatch, nbytes: int) -> None:
    monkeypatch.setattr(R, "available_memory", lambda device: nbytes)
    monkeypatch.setattr(T, "available_memory", lambda device: nbytes, raising=False)


@pytest.mark.parametrize("memory_in_images", [0.01, 2, 7, 1000])
def test_auto_micro_batch_picks_a_size_that_fits(monkeypatch: pytest.MonkeyPatch, memory_in_images: float) -> None:
    # Free memory worth `memory_in_images` images' activations (measured here on real batches), half of it the
    # budget. Catches a size over the budget (out of memory on the GPU), under 1, over the batch, or needlessly
    # small (more passes than needed, slower training).
    torch.manual_seed(0)
    mcfg = model_config("tiny", 32)
    unet = build_unet(mcfg)
    batch, per_image = 8, _saved_bytes(unet, 1, 32)
    memory = int(memory_in_images * per_image)
    _fake_memory(monkeypatch, memory)
    mb = T.auto_micro_batch(unet, mcfg, batch, torch.device("cpu"), "fp32")
    assert 1 <= mb <= batch
    if memory_in_images >= 1000:
        assert mb == batch
    elif memory_in_images < 1:
        assert mb == 1  # nothing fits: one image at a time is the best there is
    else:
        budget = memory / 2
        assert _saved_bytes(unet, mb, 32) <= budget, f"micro-batch {mb} needs more than the budget"
        assert _saved_bytes(unet, 2 * mb + 2, 32) > budget, f"micro-batch {mb} is far below what fits"


def test_auto_micro_batch_training_equals_the_whole_batch(tmp_path: Path, image_folder: Path, train_config,
                                                          fp32: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # Catches `--micro-batch auto` that does not split the batch when memory is short, or that splits it into
    # passes whose accumulated gradients differ from the whole batch's (wrong scaling of the loss per pass).
    torch.manual_seed(0)
    per_image = _saved_bytes(build_unet(model_config("tiny", 32)), 1, 32)
    _fake_memory(monkeypatch, int(2.5 * 1.3 * per_image * 2))  # room for two images' activations, not three
    lines: list[str] = []
    auto = _run(image_folder, tmp_path / "auto", train_config, echo=lines.append, micro_batch=0)
    assert "micro-batch auto: 2 of 4 images per forward pass" in lines
    for step in range(1, STEPS + 1):
        assert _relative_gap(auto, fp32, step) < 1e-3  # measured 5e-5
    assert auto["result"].final_loss == pytest.approx(fp32["result"].final_loss, rel=1e-5)


# ---------------------------------------------------------------- the precision `auto` picks

def test_auto_precision_on_a_cpu_follows_its_bf16_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    # Catches bf16 chosen on a CPU without AMX/AVX512-BF16, where it runs ~65x slower than fp32.
    cpu = torch.device("cpu")
    monkeypatch.setattr(R, "cpu_has_fast_bf16", lambda: False)
    assert R.pick_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(R, "cpu_has_fast_bf16", lambda: True)
    assert R.pick_precision("auto", cpu) == "bf16"
    assert R.pick_precision("fp32", cpu) == "fp32" and R.pick_precision("bf16", cpu) == "bf16"


def test_fp16_on_a_cpu_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"--precision fp16: only on CUDA"):
        R.pick_precision("fp16", torch.device("cpu"))


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda_follows_bf16_support(monkeypatch: pytest.MonkeyPatch, bf16_supported: bool,
                                                     expected: str) -> None:
    # Catches fp16 on a GPU with bf16 (needless loss scaling) and bf16 on one without it (emulated, slow).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    monkeypatch.setattr(R, "cpu_has_fast_bf16", lambda: not bf16_supported)  # the CPU must not decide
    assert R.pick_precision("auto", torch.device("cuda")) == expected
    assert R.pick_precision("fp16", torch.device("cuda")) == "fp16"
