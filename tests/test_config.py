"""Tests for meddiff.config: presets and recipes, resolve() and its validation, JSON round trips."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from meddiff.config import (ARCHITECTURES, DEFAULT_PRESET, RECIPES, RESUME_FIELDS, STOP_RULES, Bounds,
                            ModelConfig, Option, SampleConfig, TrainConfig, from_json, model_config, options, to_json)
from meddiff.errors import ConfigError


POSITIVE = Bounds(0, math.inf, lo_open=True)


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
    (dict(preset="huge"), r"--preset 'huge': choose from seed, small, lean, tiny"),
    (dict(objective="x-start"), r"--objective 'x-start': choose from eps, v, x0"),
    (dict(loss_weighting="p2"), r"--loss-weighting 'p2': choose from none, min-snr"),
    (dict(min_snr_gamma=0.0), r"--min-snr-gamma 0.0: must be a number in \(0, 10000\]"),
    (dict(beta_schedule="sigmoid"), r"--beta-schedule 'sigmoid': choose from linear, cosine"),
    (dict(lr_schedule="step"), r"--lr-schedule 'step'"),
    (dict(timestep_spacing="even"), r"--timestep-spacing 'even'"),
    (dict(precision="fp8"), r"--precision 'fp8'"),
    (dict(device="tpu"), r"--device 'tpu'"),
    (dict(conditional="yes"), r"--conditional 'yes'"),
    (dict(size=20), r"--size 20: must be a multiple of 8 from 16 to 1024"),
    (dict(size=8), r"--size 8: must be a multiple of 8"),
    (dict(size=2048), r"--size 2048"),
    (dict(batch_size=0), r"--batch-size 0: must be a whole number from 1 to 4096"),
    (dict(max_steps=0), r"--max-steps 0: must be a whole number from 1 to 1000000000"),
    (dict(epochs=-1), r"--epochs -1"),
    (dict(batch_size=4, micro_batch=8), r"--micro-batch 8: must not exceed --batch-size 4"),
    (dict(lr=0.0), r"--lr 0.0: must be a number in \(0, 10\]"),
    (dict(ema_decay=1.0), r"--ema-decay 1.0: must be a number in \[0, 1\)"),
    (dict(val_fraction=0.5), r"--val-fraction 0.5: must be a number in \[0, 0.5\)"),
    (dict(max_minutes=0.0), r"--max-minutes 0.0: must be a number in \(0, 1000000\]"),
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
    with pytest.raises(ConfigError, match=r"--size 40: preset 'lean' reduces the image by 16 \(patch 2 x 8 in the "
                                          r"UNet\), so the size must be a multiple of 16"):
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


def test_every_recipe_value_is_an_option_with_a_default_recipe() -> None:
    with_recipe = {f.name for f, opt in options(TrainConfig) if opt.recipe is not None}
    for preset, recipe in RECIPES.items():
        assert set(recipe) <= with_recipe, preset
    assert _cfg(preset="small").resolve().lr == {f.name: o.recipe for f, o in options(TrainConfig)}["lr"]


def test_stopping_rules_have_one_home() -> None:
    assert STOP_RULES == ("epochs", "max_steps", "max_minutes")
    assert RESUME_FIELDS == (*STOP_RULES, "patience", "copy_check", "max_copies")


@pytest.mark.parametrize("opt, raw, kind, expected", [
    (Option("", bounds=POSITIVE), "2.5", float, 2.5),
    (Option("", bounds=POSITIVE), 3, float, 3.0),
    (Option("", bounds=Bounds(1, 64, whole=True)), " +7", int, 7),
    (Option("", bounds=Bounds(1, 9, whole=True), auto=0), "auto", int, 0),
    (Option("", choices=("a", "b")), "b", str, "b"),
    (Option("", choices=("cpu",), pattern=("cuda:N", r"cuda:\d")), "cuda:3", str, "cuda:3"),
])
def test_option_parses_text_and_json_values(opt: Option, raw: object, kind: type, expected: object) -> None:
    assert opt.parse("--x", raw, kind) == expected


@pytest.mark.parametrize("opt, raw, kind, message", [
    (Option("", bounds=POSITIVE), "nan", float, r"--x nan: must be a number > 0"),
    (Option("", bounds=POSITIVE), "-inf", float, r"--x -inf: must be a number > 0"),
    (Option("", bounds=POSITIVE), "lots", float, r"--x 'lots': must be a number > 0"),
    (Option("", bounds=Bounds(0, 1, hi_open=True)), "1", float, r"--x 1.0: must be a number in \[0, 1\)"),
    (Option("", bounds=Bounds(1, 64, whole=True)), "1e20", int, r"--x '1e20': must be a whole number from 1 to 64"),
    (Option("", bounds=Bounds(1, 64, whole=True)), 2.0, int, r"--x 2.0: must be a whole number from 1 to 64"),
    (Option("", bounds=Bounds(1, 64, whole=True)), True, int, r"--x True: must be a whole number"),
    (Option("", bounds=Bounds(16, 64, whole=True, step=8)), "20", int, r"--x 20: must be a multiple of 8 from 16"),
    (Option("", bounds=Bounds(1, 9, whole=True), auto=0), "-1", int, r"--x -1: must be a whole number from 1 to 9 "
                                                                      r"or auto"),
    (Option("", choices=("a", "b")), 5, str, r"--x 5: choose from a, b"),
    (Option("", choices=("cpu",), pattern=("cuda:N", r"cuda:\d")), "tpu", str, r"--x 'tpu': choose from cpu, cuda:N"),
])
def test_option_refusals_name_the_value_and_what_is_allowed(opt: Option, raw: object, kind: type,
                                                            message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        opt.parse("--x", raw, kind)


@pytest.mark.parametrize("changes, match", [
    (dict(fmt="gif"), r"--format 'gif': choose from png, png16, dicom, nifti"),
    (dict(n=0), r"--n 0: must be a whole number from 1 to 1000000"),
    (dict(guidance=float("nan")), r"--guidance nan: must be a number from 0 to 100"),
    (dict(steps=1001), r"--steps 1001: must be a whole number from 1 to 1000"),
    (dict(sampler="plms"), r"--sampler 'plms': choose from ddpm"),
    (dict(seed=-1), r"--seed -1: must be a whole number from 0 to"),
    (dict(device="tpu"), r"--device 'tpu': choose from auto, cpu, cuda, cuda:N"),
])
def test_sample_config_checks_itself(changes: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SampleConfig(run="r", out="o", **changes)
    with pytest.raises(ConfigError, match=match):  # a config read back from JSON is checked too
        from_json(SampleConfig, {**to_json(SampleConfig(run="r", out="o")), **changes})


def test_web_limits_lie_inside_the_sample_limits() -> None:
    webbed = {f.name: opt for f, opt in options(SampleConfig) if opt.web is not None}
    assert set(webbed) == {"n", "steps", "seed", "guidance", "fmt"}
    for name, opt in webbed.items():
        if isinstance(opt.web, Bounds):
            assert opt.bounds.lo <= opt.web.lo and opt.web.hi <= opt.bounds.hi, name
        else:
            assert set(opt.web) <= set(opt.choices), name
