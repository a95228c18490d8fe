"""Tests for meddiff.config: presets and recipes, resolve() and its validation, JSON round trips."""
from __future__ import annotations

import dataclasses
import json

import pytest

from meddiff.config import (ARCHITECTURES, DEFAULT_PRESET, RECIPES, ModelConfig, SampleConfig, TrainConfig,
                            from_json, model_config, to_json)
from meddiff.errors import ConfigError


def _cfg(**changes: object) -> TrainConfig:
    return TrainConfig(data="d", out="o", **changes)


def test_seed_preset_fills_the_student_recipe() -> None:
    cfg = _cfg(preset="seed").resolve()
    assert (cfg.lr, cfg.lr_schedule, cfg.warmup_steps) == (1e-4, "constant", 0)
    assert cfg.ema_decay == 0.0
    assert (cfg.objective, cfg.loss_weighting, cfg.beta_schedule) == ("eps", "none", "linear")
    assert (cfg.batch_size, cfg.size) == (10, 128)
    assert cfg.flip is False and cfg.grad_clip == 0.0 and cfg.timestep_spacing == "leading"


def test_default_preset_fills_meddiffs_recipe() -> None:
    cfg = _cfg().resolve()
    assert cfg.preset == DEFAULT_PRESET
    assert (cfg.objective, cfg.loss_weighting, cfg.beta_schedule) == ("v", "none", "cosine")
    assert cfg.size == 64 and cfg.ema_decay == 0.999 and cfg.flip is True


def test_resolve_keeps_given_values_and_leaves_nothing_unset() -> None:
    cfg = _cfg(preset="seed", lr=3e-4, size=64, flip=True).resolve()
    assert (cfg.lr, cfg.size, cfg.flip) == (3e-4, 64, True)
    assert cfg.batch_size == 10  # still the preset's
    for name in RECIPES["seed"]:
        assert getattr(cfg, name) is not None, name
    assert cfg.resolve() == cfg  # idempotent


def test_every_preset_resolves_and_builds_its_model_config() -> None:
    for preset in ARCHITECTURES:
        cfg = _cfg(preset=preset).resolve()
        mcfg = model_config(preset, cfg.size)
        assert mcfg.sample_size == cfg.size


@pytest.mark.parametrize("changes, match", [
    (dict(preset="huge"), r"--preset 'huge': unknown preset; choose from seed, small, lean, tiny"),
    (dict(objective="x0"), r"--objective 'x0': choose from eps, v"),
    (dict(loss_weighting="p2"), r"--loss-weighting 'p2': choose from none, min-snr"),
    (dict(min_snr_gamma=0.0), r"--min-snr-gamma 0.0: must be positive"),
    (dict(beta_schedule="sigmoid"), r"--beta-schedule 'sigmoid': choose from linear, cosine"),
    (dict(lr_schedule="step"), r"--lr-schedule 'step'"),
    (dict(timestep_spacing="even"), r"--timestep-spacing 'even'"),
    (dict(precision="fp8"), r"--precision 'fp8'"),
    (dict(device="tpu"), r"--device 'tpu'"),
    (dict(conditional="yes"), r"--conditional 'yes'"),
    (dict(size=20), r"--size 20: must be a multiple of 8 between 16 and 1024"),
    (dict(size=8), r"--size 8: must be a multiple of 8"),
    (dict(size=2048), r"--size 2048"),
    (dict(batch_size=0), r"--batch-size 0: must be a positive whole number"),
    (dict(max_steps=0), r"--max-steps 0: must be a positive whole number"),
    (dict(epochs=-1), r"--epochs -1"),
    (dict(batch_size=4, micro_batch=8), r"--micro-batch 8: must not exceed --batch-size 4"),
    (dict(lr=0.0), r"--lr 0.0: must be positive"),
    (dict(ema_decay=1.0), r"--ema-decay 1.0: must be in \[0, 1\)"),
    (dict(val_fraction=0.5), r"--val-fraction 0.5: must be in \[0, 0.5\)"),
    (dict(max_minutes=0.0), r"--max-minutes 0.0: must be positive"),
])
def test_validation_errors_name_the_flag_and_value(changes: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _cfg(**changes).resolve()


def test_cuda_device_with_index_is_accepted_by_validation() -> None:
    assert _cfg(device="cuda:1").resolve().device == "cuda:1"


def test_negative_patience_is_refused() -> None:
    with pytest.raises(ConfigError, match="--patience -1"):
        _cfg(patience=-1).resolve()


def test_negative_warmup_is_refused() -> None:
    with pytest.raises(ConfigError, match="--warmup-steps -5"):
        _cfg(warmup_steps=-5).resolve()


def test_model_config_size_must_be_a_multiple_of_the_reduction() -> None:
    with pytest.raises(ConfigError, match=r"--size 40: preset 'lean' reduces the image by 16, so the size must be "
                                          r"a multiple of 16"):
        model_config("lean", 40)
    with pytest.raises(ConfigError, match=r"--size 36: preset 'seed' reduces the image by 32"):
        model_config("seed", 36)
    with pytest.raises(ConfigError, match=r"--preset 'nope'"):
        model_config("nope", 64)
    assert model_config("lean", 48).patch_size == 2


def test_model_config_carries_classes() -> None:
    m = model_config("tiny", 32, num_classes=3)
    assert m.num_classes == 3 and m.sample_size == 32
    assert m.block_out_channels == ARCHITECTURES["tiny"]["block_out_channels"]


def test_train_config_json_round_trip() -> None:
    cfg = _cfg(preset="small", micro_batch=4, zero_terminal_snr=True, max_minutes=2.5).resolve()
    data = to_json(cfg)
    assert json.loads(json.dumps(data)) == data
    assert from_json(TrainConfig, json.loads(json.dumps(data))) == cfg


def test_model_config_json_round_trip_restores_tuples() -> None:
    m = model_config("seed", 128, num_classes=2)
    data = json.loads(json.dumps(to_json(m)))
    assert isinstance(data["block_out_channels"], list)
    back = from_json(ModelConfig, data)
    assert back == m and isinstance(back.down_block_types, tuple)


def test_from_json_ignores_unknown_keys() -> None:
    data = to_json(SampleConfig(run="r", out="o", n=7))
    data["added_in_a_later_version"] = 1
    assert from_json(SampleConfig, data) == SampleConfig(run="r", out="o", n=7)


def test_configs_are_frozen() -> None:
    cfg = _cfg()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]
