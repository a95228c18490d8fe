"""meddiff evaluate end to end: every figure with its interval and counts, per class, class consistency, utility, the
privacy audit with canary copies, and one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meddiff.cli import main
from meddiff.evaluate import EvalConfig, evaluate, evaluate_ssim
from meddiff.imagesets import load_images
from meddiff.metrics.memorization import memorization_report
from synthetic import disguised, textured, volume, write

FIGURES = ("ssim", "ms_ssim", "fid", "kid", "precision", "recall", "density", "coverage")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """real/, train/, fake/ (independent) and copies/ (disguised training images), classes a and b, 12 PNGs each."""
    root = tmp_path_factory.mktemp("eval")
    out = {}
    for name, seed in (("real", 1), ("train", 2), ("fake", 3)):
        for k, cls in enumerate("ab"):
            write(root / name / cls, textured(12, seed * 10 + k))
    for k, cls in enumerate("ab"):
        write(root / "copies" / cls, disguised(textured(12, 20 + k)))
    out.update({n: root / n for n in ("real", "train", "fake", "copies")})
    run = root / "run"
    run.mkdir()
    lines = [{"step": s, "loss": 1 / s, "lr": 1e-4} for s in (1, 10, 20, 30)] + [{"step": 20, "val_loss": 0.06}]
    (run / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out["run"] = run
    return out


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def full(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One CLI run with every option: JSON, report, utility, privacy, loss curve."""
    out = tmp_path_factory.mktemp("full")
    code = main(["evaluate", "--real", str(folders["real"]), "--fake", str(folders["fake"]), "--train",
                 str(folders["train"]), "--json", str(out / "e.json"), "--report", str(out / "report"), "--utility",
                 "--run", str(folders["run"]), "--bootstrap", "50", "--cache-dir", str(out / "cache")])
    assert code == 0
    return {"json": json.loads((out / "e.json").read_text()), "out": out}


def test_every_figure_carries_an_interval_and_its_image_counts(full):
    res = full["json"]
    assert res["size"] == 32 and res["counts"]["fake"] == res["counts"]["real"] == res["counts"]["train"] == 24
    assert res["counts"]["fake_classes"] == {"a": 12, "b": 12}
    for key in FIGURES:
        fig = res[key]
        lo, hi = fig["ci95"]
        assert lo <= fig["value"] <= hi or key == "kid", key    # KID's unbiased value may sit outside by rounding
        assert fig["n_fake"] == 24 and fig["n_real"] == 24, key
        assert fig["reference"] is not None, key
    assert res["protocol"]["features"] == "meddiff-randconv-v1@64px"
    assert res["ms_ssim"]["scales"] == 2 and res["ms_ssim"]["n_pairs"] == 24 * 23 // 2


def test_per_class_consistency_and_utility_figures(full):
    res = full["json"]
    assert set(res["per_class"]) == {"a", "b"}
    for fig in res["per_class"].values():
        assert fig["n_fake"] == fig["n_real"] == 12
        assert fig["fid"]["ci95"] and fig["ssim"]["ci95"] and fig["precision"]["k"] == 5
    cons = res["class_consistency"]
    assert cons["labelled_set"] == "--train" and cons["n"] == 24 and set(cons["per_class"]) == {"a", "b"}
    util = res["utility"]
    assert {"real", "synthetic", "real+synthetic"} <= set(util)
    assert util["synthetic"]["n_train"] == 24 and util["real+synthetic"]["n_train"] == util["real"]["n_train"] + 24
    assert 0 <= util["real"]["auc"]["value"] <= 1 and len(util["real"]["accuracy"]["ci95"]) == 2


def test_independent_images_are_not_flagged_and_the_threshold_says_how_it_was_set(full):
    priv = full["json"]["privacy"]
    assert priv["flagged_share"] <= 0.1
    assert priv["heldout"] == "24 --real images not in --train"
    assert "quantile 0.99" in priv["threshold_source"] and priv["n_train"] == 24
    assert 0 <= priv["feature_space"]["flagged_share"] <= 1
    assert len(list((full["out"] / "report" / "pairs").glob("*.png"))) == 24


def test_a_folder_of_disguised_training_copies_is_flagged_completely(folders, tmp_path, capsys):
    code, out, err = run_cli(["evaluate", "--real", str(folders["real"]), "--fake", str(folders["copies"]),
                              "--train", str(folders["train"]), "--json", str(tmp_path / "c.json"),
                              "--bootstrap", "20", "--cache-dir", str(tmp_path / "cache")], capsys)
    assert code == 0, err
    priv = json.loads((tmp_path / "c.json").read_text())["privacy"]
    assert priv["flagged_share"] == 1.0 and priv["train_copied_share"] == 1.0
    assert "24 of 24 generated images flagged as copies" in out


def test_the_privacy_figures_are_memorization_report_s(folders):
    ev = evaluate(EvalConfig(real=str(folders["real"]), fake=str(folders["copies"]), train=str(folders["train"]),
                             n_boot=20))
    train = load_images(str(folders["train"]), "--train", 32, 1, None).images
    held = load_images(str(folders["real"]), "--real", 32, 1, None).images
    report = memorization_report(ev.fake.images, train, held).to_json()
    own = ("heldout", "heldout_near_duplicate_share", "heldout_warning", "feature_space")
    assert {k: v for k, v in ev.results["privacy"].items() if k not in own} == report


def test_when_real_is_the_training_set_the_threshold_comes_from_held_out_training_images(folders, tmp_path):
    train = str(folders["train"] / "a")
    ev = evaluate(EvalConfig(real=train, fake=str(folders["copies"] / "a"), train=train, n_boot=20))
    priv = ev.results["privacy"]
    assert priv["heldout"].startswith("2 --train images held out by group") and priv["threshold"] < 1.0
    assert priv["flagged_share"] == 1.0


def test_flat_sets_give_overall_figures_only(folders, tmp_path):
    ev = evaluate(EvalConfig(real=str(folders["real"] / "a"), fake=str(folders["fake"] / "b"), n_boot=20))
    res = ev.results
    assert res["per_class"] is None and res["class_consistency"] is None and res["privacy"] is None
    assert res["counts"]["fake"] == 12 and res["fid"]["n_real"] == 12


def test_generated_class_folders_follow_the_depth_of_builtin_classes(tmp_path):
    real = "builtin:xray?n=8&size=32"
    fake = write(tmp_path / "fake" / "xray" / "normal", textured(4, 5))
    ev = evaluate(EvalConfig(real=real, fake=str(tmp_path / "fake"), n_boot=20))
    assert set(ev.results["per_class"]) == {"xray/normal"}
    assert ev.results["per_class"]["xray/normal"]["n_real"] == 4 and fake.exists()


def test_evaluate_ssim_keeps_its_keys(folders):
    report = evaluate_ssim(str(folders["real"]), str(folders["fake"]))
    assert {"ssim_mean", "ssim_median", "ssim_ci95", "n_fake", "n_real", "band", "reference_real_halves",
            "size"} <= set(report)


def _one_line_error(code: int, err: str, text: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meddiff: error: ") and text in lines[0], err


@pytest.mark.parametrize("flag", ["--real", "--train"])
def test_missing_folders_are_one_line_errors(flag, folders, tmp_path, capsys):
    argv = {"--real": str(folders["real"]), "--fake": str(folders["fake"]), "--train": str(folders["train"])}
    argv[flag] = str(tmp_path / "missing")
    code, _, err = run_cli(["evaluate", *[x for kv in argv.items() for x in kv]], capsys)
    _one_line_error(code, err, f"{flag} '{tmp_path / 'missing'}': no such folder")


def test_mismatched_classes_are_one_line_errors(folders, tmp_path, capsys):
    write(tmp_path / "fake" / "c", textured(3, 7))
    code, _, err = run_cli(["evaluate", "--real", str(folders["real"]), "--fake", str(tmp_path / "fake")], capsys)
    _one_line_error(code, err, "--fake: class folder(s) c not among the --real classes (a, b)")
    code, _, err = run_cli(["evaluate", "--real", str(folders["real"] / "a"), "--fake", str(folders["fake"])], capsys)
    _one_line_error(code, err, "--fake: class folders (a, b) but --real has none")


def test_unusable_option_combinations_are_one_line_errors(folders, tmp_path, capsys):
    base = ["evaluate", "--real", str(folders["real"]), "--fake", str(folders["fake"] / "a")]
    code, _, err = run_cli([*base, "--utility"], capsys)
    _one_line_error(code, err, "--utility: --fake")
    code, _, err = run_cli([*base, "--run", str(folders["run"])], capsys)
    _one_line_error(code, err, "add --report DIR")
    code, _, err = run_cli([*base, "--report", str(tmp_path / "r"), "--run", str(tmp_path)], capsys)
    _one_line_error(code, err, "no log.jsonl")


@pytest.mark.parametrize("real_volume, blind", [(0, True), (1, False)])
def test_a_held_out_reference_of_neighbouring_slices_is_reported_loudly(real_volume, blind, tmp_path, capsys):
    """--train: the even slices of a volume; --real: its odd slices (each one a neighbour of two training slices)
    or the slices of another volume (disjoint)."""
    train = write(tmp_path / "train", volume(100, 0)[::2])
    real = write(tmp_path / "real", volume(100, real_volume)[1::2])
    fake = write(tmp_path / "fake", volume(100, 2)[::12])
    code, out, err = run_cli(["evaluate", "--real", str(real), "--fake", str(fake), "--train", str(train),
                              "--json", str(tmp_path / "e.json"), "--report", str(tmp_path / "report"),
                              "--bootstrap", "20"], capsys)
    assert code == 0, err
    priv = json.loads((tmp_path / "e.json").read_text())["privacy"]
    page = (tmp_path / "report" / "index.html").read_text()
    if blind:
        assert priv["heldout_near_duplicate_share"] > 0.5 and priv["threshold"] > 0.99
        assert priv["heldout_warning"].startswith("the copy audit cannot see: ")
        assert "\n  warning: the copy audit cannot see: " in out
        assert page.count("Warning: the copy audit cannot see: ") == 2   # at the top and in the privacy section
    else:
        assert priv["heldout_near_duplicate_share"] < 0.5 and priv["heldout_warning"] is None
        assert "warning" not in out and "Warning:" not in page


def test_set_figures_name_every_figure_once_in_report_order() -> None:
    from meddiff.evaluate import FEATURE_FIGURES, SetFigures
    from meddiff.evaluate import FIGURES as NAMES
    from meddiff.metrics.figure import Figure

    assert tuple(NAMES) == FIGURES and set(FEATURE_FIGURES) < set(NAMES)
    fid = Figure(12.5, (10.0, 15.0), 3.0, {"n_fake": 4, "n_real": 5}, "randconv-64")
    figs = SetFigures(4, 5, {"fid": fid})
    assert figs.get("fid") is fid and figs.get("kid") is None
    assert list(figs.figures_json()) == list(FIGURES) and figs.figures_json()["kid"] is None
    with pytest.raises(KeyError, match="'fdi': not a figure; choose from ssim, ms_ssim, fid"):
        figs.get("fdi")


# ---------------------------------------------------------------- mask adherence

def _square_pairs(root: Path, n: int, seed: int, shift: int = 0) -> Path:
    """images/<a|b>/ + masks/<a|b>/: a bright square on faint noise and its map (label 1), the map moved by
    `shift` px (a generator that put the lesion elsewhere than asked)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = "ab"[i % 2]
        img = (rng.random((32, 32)) * 60).astype(np.uint8)
        top, left = rng.integers(2, 14, 2)
        img[top:top + 9, left:left + 9] = 230
        lab = np.zeros((32, 32), np.uint8)
        lab[top:top + 9, left:left + 9] = 1
        for sub, picture in (("images", img), ("masks", np.roll(lab, (shift, shift), axis=(0, 1)))):
            (root / sub / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture).save(root / sub / cls / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pairs")
    return {"real": _square_pairs(root / "real", 48, 1), "faithful": _square_pairs(root / "faithful", 16, 2),
            "moved": _square_pairs(root / "moved", 16, 3, shift=14)}


def test_adherence_tells_lesions_where_asked_from_lesions_elsewhere(pairs, tmp_path, capsys):
    figures = {}
    for name in ("faithful", "moved"):
        out = tmp_path / name
        code, text, _ = run_cli(["evaluate", "--real", str(pairs["real"]), "--fake", str(pairs[name]), "--adherence",
                                 "--segmenter-steps", "150", "--bootstrap", "20", "--json", str(out / "e.json"),
                                 "--report", str(out / "report")], capsys)
        assert code == 0 and "mask adherence" in text
        adh = json.loads((out / "e.json").read_text())["adherence"]
        assert set(adh["figures"]) == {"all", "a", "b"} and adh["fitted_on"].startswith("--real")
        assert adh["figures"]["all"]["generated"]["images"] == 16
        assert 0 < adh["ceiling_images"] < 48 and adh["n_fit"] + adh["ceiling_images"] == 48  # held out by group
        assert "Mask adherence" in (out / "report" / "index.html").read_text()
        figures[name] = adh["figures"]
    assert figures["faithful"]["all"]["generated"]["dice"] > 0.7 > 0.3 > figures["moved"]["all"]["generated"]["dice"]
    assert figures["faithful"]["all"]["real"]["dice"] > 0.7  # the ceiling: same segmenter, same real images


def test_adherence_fits_on_the_training_pairs_and_takes_the_ceiling_from_real(pairs, tmp_path):
    ev = evaluate(EvalConfig(real=str(pairs["faithful"]), fake=str(pairs["moved"]), train=str(pairs["real"]),
                             adherence=True, segmenter_steps=20, n_boot=20))
    adh = ev.results["adherence"]
    assert adh["fitted_on"] == "--train" and adh["n_fit"] == 48 and adh["ceiling_images"] == 16


def test_adherence_needs_maps_on_both_sides(pairs, folders, capsys):
    code, _, err = run_cli(["evaluate", "--real", str(pairs["real"]), "--fake", str(folders["fake"]),
                            "--adherence"], capsys)
    _one_line_error(code, err, "--fake")
    assert "--masks" in err
    code, _, err = run_cli(["evaluate", "--real", str(folders["real"]), "--fake", str(pairs["faithful"]),
                            "--adherence"], capsys)
    _one_line_error(code, err, "label maps")
    with pytest.raises(SystemExit) as exit_:  # refused while parsing, before any loading
        main(["evaluate", "--real", str(pairs["real"]), "--fake", str(pairs["faithful"]), "--adherence",
              "--segmenter-steps", "0"])
    _one_line_error(exit_.value.code, capsys.readouterr().err, "--segmenter-steps 0")


def test_a_contiguous_held_out_part_keeps_its_guard_band_out_of_the_fitted_side() -> None:
    import torch

    from meddiff.data.dataset import ImageSet
    from meddiff.evaluate import _heldout_masks
    from meddiff.imagesets import LabelledImages

    n = 100  # a flat folder of one volume's slices: every file a group of its own
    data = ImageSet(torch.zeros(n, 1, 8, 8), torch.zeros(n, dtype=torch.long), ("all",), np.arange(n))
    images = LabelledImages(np.zeros((n, 8, 8), np.float32), np.zeros(n, np.int64), ("all",), data)
    used, held = _heldout_masks(images, EvalConfig(real="r", fake="f", heldout_split="contiguous", heldout_fraction=0.2))
    fitted = np.flatnonzero(used & ~held)
    assert held.sum() == 20 and not (held & ~used).any()
    assert np.abs(fitted[:, None] - np.flatnonzero(held)[None, :]).min() > 1  # no fitted slice beside a held-out one
    assert used.sum() < n  # the guard band is on neither side
