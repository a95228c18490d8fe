"""Benchmark code that tests can reach: gpu_check.py --dry-run (the GPU owner's one command runs its whole path on
the CPU in seconds), the held-out sets and figures, the mask-conditioning candidates, how quality_per_compute
samples, the launcher that keeps a measured program's peak memory its own, and the rendered docs."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED = next((p / "shared" / "baselines" / "seed_recipe.py" for p in ROOT.parents
             if (p / "shared" / "baselines" / "seed_recipe.py").exists()), None)


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args], capture_output=True,
                          text=True, env=env, timeout=300, cwd=ROOT)


def bench(name: str):
    """A module of benchmarks/ (run as scripts, they import each other as top-level modules)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.skipif(SEED is None, reason="the seed recipe (../shared/baselines/seed_recipe.py) is not beside the repo")
def test_gpu_check_dry_run_runs_every_part_and_records_it(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = _run("--dry-run", "--results", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    s = doc["summary"]
    assert s["dry_run"] is True and doc["machine"]["cpu"]
    assert s["train128"]["seed"]["img_per_s"]["median"] > 0 and s["train128"]["meddiff"]["img_per_s"]["median"] > 0
    assert s["big"]["train_flops_per_image"] > 0 and s["big"]["achieved_tflops"] > 0
    assert s["big"]["share_of_peak"] is None  # no GPU, no peak to compare with
    assert set(s["sample"]["unet_calls"].values()) == {20, 10}
    q = s["quality"]
    assert q["steps"] > 0 and q["meddiff"]["n_fake"] == 4 and q["meddiff"]["kid_ci95"]
    assert any(k.startswith("real vs real") for k in q["reference"])
    parts = {r["part"] for r in doc["runs"]}
    assert parts == {"train128", "big", "sample"}


def test_gpu_check_without_a_gpu_says_so_in_one_line() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = _run("--parts", "train128")
    assert done.returncode == 2 and "no CUDA GPU here" in done.stdout and not done.stderr


def test_the_peak_table_matches_names_and_takes_an_override() -> None:
    peak_tflops = bench("gpu_check").peak_tflops
    assert peak_tflops("NVIDIA H200", None)[0] == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", None)[0] == 312.0
    assert peak_tflops("Some GPU", None) == (None, "unknown GPU: pass --peak-tflops")
    assert peak_tflops("NVIDIA H200", 500.0) == (500.0, "--peak-tflops")


def test_the_grain_figure_is_one_for_real_images_and_far_above_for_residual_noise() -> None:
    fine_energy_ratio = bench("_heldout").fine_energy_ratio

    yy, xx = np.mgrid[:32, :32] / 32
    smooth = np.stack([np.exp(-((xx - c) ** 2 + (yy - 0.5) ** 2) * 20) for c in np.linspace(0.3, 0.7, 12)])
    noisy = np.clip(smooth + np.random.default_rng(0).normal(0, 0.05, smooth.shape), 0, 1)
    same = fine_energy_ratio(smooth[:6], smooth[6:], n_boot=50)
    grain = fine_energy_ratio(noisy[:6], smooth[6:], n_boot=50)
    assert 0.8 < same["fine_energy_ratio"] < 1.25
    assert grain["fine_energy_ratio"] > 20 and grain["fine_energy_ratio_ci95"][0] > 20


def test_the_phantom_split_holds_out_other_subjects_with_balanced_halves() -> None:
    phantom_split = bench("_heldout").phantom_split

    from meddiff.data.dataset import load_data

    s = phantom_split(32, 16, 32)
    assert len(s.train) == 16 and len(s.heldout) == 32 and not set(s.train) & set(s.heldout)
    for half in (s.half_a, s.half_b):  # every class in each half, equally often
        names = [s.classes[i] for i in half]
        assert len(set(names)) == 8 and all(names.count(c) == 2 for c in set(names))
    # the training images are builtin:phantoms itself (what `meddiff train --data builtin:phantoms?n=16` sees)
    same = load_data("builtin:phantoms?n=16", 32)
    assert np.abs((same.images[:, 0].numpy() + 1) / 2 - s.images[s.train]).max() < 1e-4
    assert [c.replace("_", "/") for c in s.classes[:16]] == [same.class_names[k] for k in same.labels]
    # another render seed: no held-out image is a training image
    assert min(np.abs(s.images[h] - s.images[s.train]).max(axis=(1, 2)).min() for h in s.heldout) > 0.01
    two = phantom_split(32, 8, 16, ("ct", "xray"))
    assert set(two.classes) == {"ct_normal", "ct_abnormal", "xray_normal", "xray_abnormal"}
    with pytest.raises(ValueError, match="modalities"):
        phantom_split(32, 8, 16, ("pet",))
    with pytest.raises(ValueError, match="same subjects"):
        phantom_split(32, 8, 16, train_seed=3, heldout_seed=3)


@pytest.mark.parametrize("variant", ["spade", "controlnet"])
def test_a_mask_path_starts_as_the_input_channel_unet_and_then_carries_the_map(variant: str) -> None:
    import copy

    import torch

    from meddiff.config import model_config
    from meddiff.model import build_unet, denoise

    cond_mod = bench("_mask_conditioning")
    m = model_config("tiny", 32, 2, mask_values=(1,))
    plain, var = build_unet(m), cond_mod.build_variant_unet(variant, m)
    own = {k.replace(".norm.", ".") if variant == "spade" else k: v for k, v in var.state_dict().items()}
    plain.load_state_dict({k: own[k] for k in plain.state_dict()})  # the weights both have, alike
    x, t, lab = torch.randn(2, 1, 32, 32), torch.tensor([10, 500]), torch.tensor([0, 1])
    cond = -torch.ones(2, 1, 32, 32)
    cond[:, :, 8:20, 8:20] = 1
    with torch.no_grad():
        assert torch.allclose(denoise(plain, x, t, lab, m.patch_size, cond),
                              denoise(var, x, t, lab, m.patch_size, cond), atol=1e-5)  # zero-initialised: the same
        for name, p in var.named_parameters():
            if name.endswith(("scale.weight", "shift.weight")) or name.startswith("control_zero"):
                p.normal_(0, 0.05)
        ema = copy.deepcopy(var)  # what training's EMA does: the copy must read its own input's map
        moved = torch.roll(cond, 8, dims=-1)
        a = denoise(var, x, t, lab, m.patch_size, cond)
        assert not torch.allclose(a, denoise(plain, x, t, lab, m.patch_size, cond), atol=1e-3)
        assert not torch.allclose(a, denoise(var, x, t, lab, m.patch_size, moved), atol=1e-3)  # the map matters
        b = denoise(ema, x, t, lab, m.patch_size, moved)
        assert torch.allclose(a, denoise(var, x, t, lab, m.patch_size, cond), atol=1e-5)  # unaffected by the copy
        assert torch.allclose(b, denoise(var, x, t, lab, m.patch_size, moved), atol=1e-5)
    with pytest.raises(ValueError, match="label maps"):
        cond_mod.build_variant_unet(variant, model_config("tiny", 32, 2))


@pytest.mark.parametrize("variant", ["spade", "controlnet"])
def test_a_variant_run_trains_through_meddiff_train_and_loads_back(variant: str, tmp_path: Path,
                                                                   mask_run: Path) -> None:
    import importlib

    from meddiff.model import build_unet
    from meddiff.sample import generate

    cond_mod = bench("_mask_conditioning")
    code = cond_mod.train(variant, ["--data", "builtin:phantoms?n=16&masks=1", "--size", "32", "--preset", "tiny",
                                    "--max-steps", "3", "--out", str(tmp_path / "run"), "--no-progress", "--threads",
                                    "1"])
    assert code == 0
    run = cond_mod.load_variant_run(variant, tmp_path / "run")
    assert any((".norm1.scale." if variant == "spade" else "control_zero_mid") in k for k in run.unet.state_dict())
    maps = np.zeros((2, 32, 32), np.int64)
    maps[:, 4:12, 4:12] = 1
    assert generate(run, [0, 1], 0, masks=maps, guidance=2).shape == (2, 32, 32)
    with pytest.raises(RuntimeError):  # a run trained without the variant does not load as one
        cond_mod.load_variant_run(variant, mask_run)
    assert importlib.import_module("meddiff.train").build_unet is build_unet  # meddiff train is itself again
    with pytest.raises(ValueError, match="choose from"):
        cond_mod.train("film", [])


def test_quality_per_compute_samples_each_class_in_turn_at_the_guidance_asked(trained_run: Path) -> None:
    qpc = bench("quality_per_compute")

    from meddiff.sample import generate, load_run

    row = dict(who="meddiff", run=trained_run, unet=trained_run / "unet", class_names=["a", "b"])
    assert qpc.requested(row, 5) == ["a", "b", "a", "b", "a"]
    plain, guided = qpc.sample(row, 4), qpc.sample(row, 4, guidance=3.0)
    loaded = load_run(trained_run)
    # sample i is seed i of class i mod 2, exactly as `meddiff sample` draws it
    assert np.array_equal(plain[1], generate(loaded, [1, 3], 1, "ddim", 20)[0])
    assert np.array_equal(guided[2], generate(loaded, [0, 2], 0, "ddim", 20, 3.0)[1])
    assert np.abs(plain - guided).max() > 1e-3  # the scale reaches the sampler


def test_quality_per_compute_runs_its_training_longest_first_never_more_at_once_than_the_cores() -> None:
    import time

    qpc = bench("quality_per_compute")
    jobs = qpc.training_jobs([10.0, 30.0], ["seed", "meddiff", "latent"])
    assert jobs == [("seed", 30.0), ("meddiff", 30.0), ("latent", 30.0), ("meddiff", 10.0), ("latent", 10.0)]
    assert qpc.core_slots(1) >= 1 and qpc.core_slots(10_000) == 1

    def start(who: str, m: float) -> subprocess.Popen:  # a stand-in run: its start and end times, after m/100 s
        code = ("import json, sys, time; t = time.time(); time.sleep(float(sys.argv[1]));"
                "print('progress'); print(json.dumps(dict(start=t, end=time.time())))")
        return subprocess.Popen([sys.executable, "-c", code, str(m / 100)], stdout=subprocess.PIPE, text=True)
    stats = qpc.run_jobs(jobs, start, slots=2)
    assert list(stats) == ["seed", "meddiff_30min", "latent_30min", "meddiff_10min", "latent_10min"]
    edges = sorted([(s["start"], 1) for s in stats.values()] + [(s["end"], -1) for s in stats.values()])
    assert max(np.cumsum([d for _, d in edges])) == 2  # two at a time, never three
    assert stats["latent_30min"]["start"] >= min(stats["seed"]["end"], stats["meddiff_30min"]["end"]) - 0.05

    def failing(who: str, m: float) -> subprocess.Popen:  # one run fails at once: the long one is stopped
        code = "import sys, time; time.sleep(float(sys.argv[1])); sys.exit(sys.argv[2] == 'bad')"
        return subprocess.Popen([sys.executable, "-c", code, "0" if who == "bad" else "30", who],
                                stdout=subprocess.PIPE, text=True, start_new_session=who == "slow")
    t0 = time.time()
    with pytest.raises(SystemExit, match="a training process failed"):
        qpc.run_jobs([("slow", 30.0), ("bad", 10.0), ("never", 10.0)], failing, slots=2)
    assert time.time() - t0 < 15


def _qpc_row(who: str, minutes: float, ssim: float, detail: bool = True) -> dict:
    row = dict(who=who, minutes=minutes, ssim=ssim, ssim_ci95=[ssim - 0.01, ssim + 0.01], kid=0.01,
               kid_ci95=[0.0, 0.02], fid=0.3, fid_ci95=[0.1, 0.5], copies_share=0.0, steps=100)
    return {**row, "fine_energy_ratio": 0.5} if detail else row


def test_the_size_table_gathers_every_run_and_names_the_cells_still_missing(tmp_path: Path) -> None:
    render = bench("render")
    ref = {"real vs real (held-out half A vs half B)": dict(ssim=0.6, ssim_ci95=[0.5, 0.7], kid=0.0,
                                                            kid_ci95=[-0.01, 0.01])}

    def write(name: str, size: int, threads: int, rows: dict, meddiff_args: str = "") -> None:
        doc = dict(settings=dict(size=size, threads=threads, data="mni", meddiff_args=meddiff_args),
                   summary=dict(rows=rows, order=list(rows), reference=ref))
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))

    write("quality_per_compute_128", 128, 1, {"seed_10min": _qpc_row("seed", 10, 0.04),
                                              "meddiff_10min": _qpc_row("meddiff", 10, 0.55),
                                              "meddiff_30min": _qpc_row("meddiff", 30, 0.61, detail=False)})
    write("quality_per_compute_256_2core", 256, 2, {"meddiff_30min": _qpc_row("meddiff", 30, 0.7)})
    # the latent path before and after its sampler stopped clipping latents to [-1, 1]
    write("quality_per_compute_256_table", 256, 1, {"latent_10min": _qpc_row("latent", 10, 0.3),
                                                    "latent_30min": {**_qpc_row("latent", 30, 0.5),
                                                                     "clip_sample": False}})
    # meddiff trained with other flags (its copy check stopped it): its own row, filling no cell of the default
    write("quality_per_compute_256_guard", 256, 1, {"meddiff_30min": {**_qpc_row("meddiff", 30, 0.6),
                                                                      "stopped": "copies", "seconds": 720.0}},
          meddiff_args="--copy-check 16 --max-copies 0.1")
    # a later file that reused the 10-minute seed run: one row, naming both files
    write("quality_per_compute_128_seed", 128, 1, {"seed_10min": _qpc_row("seed", 10, 0.04)})
    (tmp_path / "masks.json").write_text("{}")  # other figures are not read
    sizes = {"128": dict(seed=dict(img_per_s=[0.1], peak_rss_mib=9e3)), "256": dict(seed=dict(need_gib=51.2))}
    (tmp_path / "size_table.json").write_text(json.dumps(dict(summary=dict(cases=dict(sizes=dict(table=sizes))))))
    lines = render.size_quality_rows(tmp_path)
    table = [line for line in lines if line.startswith("| 1") or line.startswith("| 2")]
    assert len(table) == 7 and all(line.count("|") == lines[0].count("|") for line in table)
    guarded = next(line for line in table if "guard" in line)
    assert "meddiff pixel (default), `--copy-check 16 --max-copies 0.1`" in guarded
    assert "stopped by the copy check after 12 min" in guarded
    seed = next(line for line in table if "seed recipe" in line)
    assert seed.endswith("| `quality_per_compute_128.json`, `quality_per_compute_128_seed.json` |")
    assert "latents clipped" in next(line for line in table if "latent" in line and "10 min" in line)
    assert "latents clipped" not in next(line for line in table if "latent" in line and "30 min" in line)
    assert "0.55 [0.54, 0.56]" in next(line for line in table if "10 min on 1 thread" in line and "pixel" in line)
    assert "v-prediction" in next(line for line in table if "128 px" in line and "30 min" in line)
    missing = lines[-1]
    assert missing.startswith("Not yet measured") and "(21 of 24 cells)" in missing
    # measured: 128 px seed and pixel at 10 min; the earlier-default and the 2-thread rows do not fill a cell
    assert "128 px seed recipe 10 min;" not in missing and "128 px meddiff pixel (default) 30 min" in missing
    assert "256 px meddiff pixel (default) 30 min" in missing
    assert "256 px meddiff latent 10 min" in missing and "256 px meddiff latent 30 min" not in missing
    assert "256 px seed recipe 10 min (its `seed` UNet does not fit: needs ~51 GiB, size table);" in missing
    assert "64 px seed recipe 10 min;" in missing, "no reason where the size table shows none"


def test_the_inpainting_line_sets_the_detection_beside_the_classifiers_own_reach() -> None:
    render = bench("render")
    doc = json.loads((ROOT / "benchmarks" / "results" / "masks.json").read_text())
    ip = doc["summary"]["inpainting"]
    ip.pop("real_abnormal_called", None), ip.pop("healthy_before_called", None)
    before = next(line for line in render.render_masks(doc) if line.startswith("Inpainting"))
    assert "the reference" not in before, "files measured before the reference rates render as they were"
    ip["real_abnormal_called"] = dict(share=0.9, ci95=[0.85, 0.95], images=200)
    ip["healthy_before_called"] = dict(share=0.05, ci95=[0.0, 0.125], images=40)
    line = next(line for line in render.render_masks(doc) if line.startswith("Inpainting"))
    assert "real abnormal test images it calls abnormal (the reference): 0.9 [0.85, 0.95] (n=200)" in line
    assert "the healthy images before inpainting: 0.05 [0, 0.125] (n=40)" in line
    assert "random-conv features + logistic regression" in line, "an earlier file names its reader"
    # a file read by the lesion detector names it, and sets the feature classifier's reading of the same images after
    ip["detector"] = "encoder + head"
    ip["feature_classifier"] = dict(protocol="features", inpainted=dict(share=0.7, ci95=[0.6, 0.8], images=40),
                                    real_abnormal_called=dict(share=0.8, ci95=[0.75, 0.85], images=200))
    line = next(line for line in render.render_masks(doc) if line.startswith("Inpainting"))
    assert "called abnormal by a lesion detector trained on real phantoms" in line
    head, tail = line.split("The random-conv feature classifier of earlier files on the same images: ")
    assert "the reference): 0.9 [0.85, 0.95]" in head and tail.startswith("0.7 [0.6, 0.8]; real abnormal")
    assert "the reference): 0.8 [0.75, 0.85] (n=200)" in tail
    ip["detected_by_modality"] = dict(ct=dict(inpainted=dict(share=0.6, ci95=[0.4, 0.8], images=20),
                                              real=dict(share=0.85, ci95=[0.8, 0.9], images=50)))
    line = next(line for line in render.render_masks(doc) if line.startswith("Inpainting"))
    assert f"{ip['detected_abnormal']:.3g} " in line and "real lesions: ct 0.60 of 20 against 0.85)" in line


def test_a_guidance_sweep_scored_for_adherence_alone_renders_as_such() -> None:
    render = bench("render")
    doc = json.loads((ROOT / "benchmarks" / "results" / "masks_seg2000.json").read_text())
    s = doc["summary"]
    for part in ("utility", "utility_paired", "utility_ratio", "inpainting", "copies"):
        s.pop(part)
    s["parts"] = ["adherence"]
    s["adherence_by_guidance"] = {"2": s["adherence"], "1": {m: dict(generated=dict(dice=0.5, dice_ci95=[0.4, 0.6],
                                                                                    images=50), real=f["real"])
                                                             for m, f in s["adherence"].items()}}
    text = "\n".join(render.render_masks(doc))
    assert "Scored: adherence only (`--parts`)." in text
    assert "| guidance | ct | xray | mri | us |" in text and "| 1 | 0.5 [0.4, 0.6] (n=50) |" in text
    assert "Synthetic-only" not in text and "Inpainting" not in text and "Copies" not in text
    # trained by steps, scored by a later --reuse call: the training call is named with its steps and folder
    s["training"]["stopped"], doc["settings"]["out"] = "max-steps", "bench_out/masks_x"
    assert render.masks_commands(doc).startswith("python benchmarks/masks.py --steps 4269 --out bench_out/masks_x`, "
                                                 "then `python benchmarks/masks.py --reuse")


def test_a_run_trained_on_by_reuse_steps_resumes_once_and_keeps_where_it_started(tmp_path: Path, monkeypatch) -> None:
    masks, render = bench("masks"), bench("render")
    calls = []

    def train_call(args: list[str]) -> dict:
        calls.append(args)
        return dict(steps=int(args[args.index("--max-steps") + 1]), seconds=1.0, stopped="max-steps")

    monkeypatch.setattr(masks, "_train_call", train_call)
    first = dict(steps=5, seconds=1.0, stopped="max-steps")
    assert masks.extend_run(tmp_path, first, 5) == first and not calls, "at its own steps: scored as it is"
    got = masks.extend_run(tmp_path, first, 12)
    assert calls[-1][-5:] == ["--resume", str(tmp_path / "run"), "--max-steps", "12", "--no-progress"]
    assert got["steps"] == 12 and got["extended_from"] == 5
    assert masks.extend_run(tmp_path, got, 20)["extended_from"] == 5, "trained on twice: it started at 5"
    assert len(calls) == 2 and masks.extend_run(tmp_path, dict(first, steps=20), 20)["extended_from"] == 5
    doc = json.loads((ROOT / "benchmarks" / "results" / "masks_seg2000.json").read_text())
    doc["summary"]["training"] = dict(got, extended_from=5)
    doc["settings"]["out"] = "bench_out/masks_x"
    assert render.masks_commands(doc).startswith("python benchmarks/masks.py --steps 5 --out bench_out/masks_x`, then "
                                                 "`python benchmarks/masks.py --reuse --steps 12 --out bench_out/masks_x`"
                                                 ", then `python benchmarks/masks.py --reuse --seg-steps"), \
        "a later scoring of the run names the call that trained it on"
    doc["command"] += " --steps 12"
    assert render.masks_commands(doc).count("`, then `") == 1, "the call that trained it on is the file's own"
    assert "trained 5 steps by an earlier call" in render.render_masks(doc)[0]
    # the goals it went through on the way are kept and named: each resume stretches the schedule from where it is
    assert json.loads((tmp_path / "extended.json").read_text()) == dict(from_steps=5, through=[12], to_steps=20)
    third = masks.extend_run(tmp_path, dict(first, steps=20), 30)
    assert third["extended_from"] == 5 and third["extended_through"] == [12, 20]
    doc["summary"]["training"], doc["command"] = third, doc["command"].replace("--steps 12", "--steps 30")
    assert render.masks_commands(doc).startswith("python benchmarks/masks.py --steps 5 --out bench_out/masks_x`, then "
                                                 "`python benchmarks/masks.py --reuse --steps 12 --out bench_out/masks_x"
                                                 "`, then `python benchmarks/masks.py --reuse --steps 20 --out "
                                                 "bench_out/masks_x`, then `python benchmarks/masks.py --reuse --seg")
    assert "then on to 12, then on to 20, then on to these" in render.render_masks(doc)[0]


def test_a_run_on_label_maps_of_anatomy_is_named_so_and_read_on_its_lesions() -> None:
    masks, render = bench("masks"), bench("render")
    assert masks.phantom_spec(8, "lesion") == "builtin:phantoms?n=8&masks=1"
    assert masks.phantom_spec(8, "anatomy", 1) == "builtin:phantoms?n=8&masks=2&seed=1"
    pairs = masks.load_pairs(8, 1, 32, "anatomy")
    assert (pairs["masks"] > 1).any() and np.array_equal(pairs["lesions"], pairs["masks"] == 1)
    assert pairs["lesions"].any() and not pairs["lesions"][[not c.endswith("abnormal") for c in pairs["classes"]]].any()
    doc = json.loads((ROOT / "benchmarks" / "results" / "masks_seg2000.json").read_text())
    doc["summary"]["maps"], doc["settings"]["maps"], doc["settings"]["out"] = "anatomy", "anatomy", "bench_out/x"
    doc["summary"]["training"].update(stopped="max-steps", extended_from=5, extended_through=[])
    calls = render.masks_commands(doc).split("`, then `")
    assert calls[0] == "python benchmarks/masks.py --maps anatomy --steps 5 --out bench_out/x"
    assert calls[1].startswith("python benchmarks/masks.py --maps anatomy --reuse --steps 4269 --out bench_out/x")
    assert "conditioned on the label maps of lesion and anatomy" in render.render_masks(doc)[0]
    doc["summary"]["maps"] = "lesion"
    assert "conditioned on the maps," in render.render_masks(doc)[0]


def test_images_made_from_training_maps_are_audited_against_their_own_source(monkeypatch) -> None:
    masks, render = bench("masks"), bench("render")
    train = dict(images=np.random.default_rng(0).random((12, 32, 32)).astype(np.float32),
                 masks=np.zeros((12, 32, 32), np.int64), classes=["ct/normal"] * 12)
    chosen = np.random.default_rng(1).choice(12, 5, replace=False)  # the rows training_map_copies draws
    # a generator that gives back each map's own training image: every one a copy of its source
    monkeypatch.setattr(masks, "generate_for", lambda run, maps, classes, g, s0, c=0.0: train["images"][chosen])
    got = masks.training_map_copies(None, train, 2.0, 0.0, 0.9, n=5)
    assert got == dict(share=1.0, images=5, median_ncc=pytest.approx(1.0), nearest_is_source=1.0)
    monkeypatch.setattr(masks, "generate_for", lambda run, maps, classes, g, s0, c=0.0:
                        np.random.default_rng(2).random((5, 32, 32)).astype(np.float32))
    fresh = masks.training_map_copies(None, train, 2.0, 0.0, 0.9, n=5)
    assert fresh["share"] == 0.0 and fresh["median_ncc"] < 0.5
    doc = json.loads((ROOT / "benchmarks" / "results" / "masks_seg2000.json").read_text())
    doc["summary"]["copies"]["from_training_maps"] = dict(got, share=0.25, nearest_is_source=0.5)
    line = next(line for line in render.render_masks(doc) if line.startswith("Copies"))
    assert "Among 5 images generated from training maps" in line and "25% flagged" in line
    assert "the map's own image for 50%" in line


def test_images_made_from_new_maps_are_audited_against_their_moved_source(monkeypatch) -> None:
    from meddiff.data.dataset import jitter_image, jitter_label_map

    masks, render = bench("masks"), bench("render")
    rng = np.random.default_rng(0)
    maps = np.zeros((12, 32, 32), np.int64)
    maps[:, 8:20, 10:18] = 1
    train = dict(images=rng.random((12, 32, 32)).astype(np.float32), masks=maps, classes=["ct/abnormal"] * 12)
    chosen = np.random.default_rng(1).choice(12, 5, replace=False)
    asked = []

    def moved_copies(run, m, classes, g, s0, c=0.0):  # each source image turned as its map was: a copy all the same
        asked.append(m)
        return np.stack([jitter_image(train["images"][i], s0 + k) for k, i in enumerate(chosen)])

    monkeypatch.setattr(masks, "generate_for", moved_copies)
    got = masks.training_map_copies(None, train, 2.0, 0.0, 0.9, "new", n=5)
    assert all(np.array_equal(asked[0][k], jitter_label_map(maps[i], 40_000 + k)) for k, i in enumerate(chosen))
    assert not np.array_equal(asked[0], maps[chosen]), "new maps, not the training maps"
    assert got["share"] == 1.0 and got["nearest_is_source"] == 1.0 and got["nearest_is_moved_source"] == 1.0
    plain = masks.training_map_copies(None, train, 2.0, 0.0, 0.9, "training", n=5)
    assert plain["share"] < 0.5, "against the training images alone, a turned copy is not caught"
    # the utility's synthetic segmenter learns the new maps' lesions, not the training maps'
    seen = {}
    monkeypatch.setattr(masks, "generate_for", lambda run, m, c, g, s, cutoff=0.0: np.zeros(m.shape, np.float32))
    import meddiff.metrics.segmentation as seg
    monkeypatch.setattr(seg, "train_segmenter", lambda images, m, steps, weights=None: seen.setdefault(len(seen), m))
    monkeypatch.setattr(seg, "segment", lambda net, images: maps == 1)
    import argparse
    a = argparse.Namespace(few=4, real_share=0.5, seg_steps=1, guidance_cutoff=0.0, utility_maps="new")
    test = dict(images=train["images"], masks=maps, lesions=maps == 1, classes=train["classes"])
    masks.utility_figures(None, np.zeros((12, 32, 32)), dict(train, lesions=maps == 1), test, a, 2.0)
    assert np.array_equal(seen[0], np.stack([jitter_label_map(m, 20_000 + k) for k, m in enumerate(maps)]) == 1)
    doc = json.loads((ROOT / "benchmarks" / "results" / "masks_seg2000.json").read_text())
    doc["summary"]["utility_maps"] = "new"
    doc["summary"]["copies"]["from_new_maps"] = dict(got, share=0.02)
    text = "\n".join(render.render_masks(doc))
    assert "made from new maps: each training map jittered" in text
    assert "Among 5 images generated from new maps" in text and "2% flagged" in text
    assert "a source image moved with its map for 100%." in text


def test_drawn_maps_are_audited_against_the_training_maps_by_label_agreement(monkeypatch) -> None:
    masks = bench("masks")
    maps = np.zeros((6, 16, 16), np.int64)
    for k in range(6):  # each training map: a body (2) at its own place, a lesion (1) in the abnormal ones
        maps[k, k:k + 8, 2:10] = 2
        maps[k, k + 2:k + 4, 3:5] = 1 if k % 2 else 2
    agreement, index = masks.map_agreement(np.stack([maps[3], maps[4][:, ::-1], np.full((16, 16), 5)]), maps)
    assert agreement[:2].tolist() == [1.0, 1.0] and index[:2].tolist() == [3, 4]  # as it is, or mirrored
    assert agreement[2] == 0.0  # no label in common
    classes = ["ct/normal", "ct/abnormal"] * 3
    train = dict(images=np.zeros((6, 16, 16)), masks=maps, classes=classes, map_run=None)
    test = dict(masks=np.roll(maps, 1, axis=2), classes=classes)  # held-out maps: near the training ones, not equal
    monkeypatch.setattr(masks, "drawn_maps",
                        lambda run, names, seed0, g=1.0: maps[[classes.index(c) for c in names]])
    copied = masks.drawn_map_copies(train, test, n=6)
    assert copied["share_flagged"] == 1.0 and copied["median_nearest"] == 1.0 > copied["threshold"]
    assert copied["drawn"]["abnormal_with_lesion"] == 1.0 and copied["drawn"]["normal_with_lesion"] == 0.0
    assert copied["by_modality"]["ct"]["median_nearest"] == 1.0 > copied["by_modality"]["ct"]["heldout_median_nearest"]
    monkeypatch.setattr(masks, "drawn_maps", lambda run, names, seed0, g=1.0: test["masks"][:len(names)])
    assert masks.drawn_map_copies(train, test, n=6)["share_flagged"] == 0.0


def test_a_model_of_maps_trained_with_other_flags_gets_its_own_folder(monkeypatch, tmp_path: Path) -> None:
    import argparse
    import types

    import torch

    import meddiff.sample

    masks = bench("masks")
    calls = []
    monkeypatch.setattr(masks, "_train_call", lambda args: calls.append(args) or dict(steps=5, seconds=1.0))
    fake = types.SimpleNamespace(train=types.SimpleNamespace(preset="tiny", noise_shift=0.0, noise_shift_clean=None),
                                 unet=torch.nn.Linear(2, 2), model=types.SimpleNamespace(map_values=(0, 1)))
    monkeypatch.setattr(meddiff.sample, "load_run", lambda folder, maps: fake)
    a = argparse.Namespace(size=32, n_train=8, maps="anatomy", map_steps=5, quick=False, map_args="--noise-shift -1.5")
    _run, kept = masks.map_model(tmp_path, a)
    out = calls[0][calls[0].index("--out") + 1]
    assert out == str(tmp_path / "maprun_--noise-shift_-1.5") and calls[0][-2:] == ["--noise-shift", "-1.5"]
    assert kept["noise_shift"] == 0.0 and kept["noise_shift_clean"] is None and kept["parameters"] == 6
    masks.map_model(tmp_path, argparse.Namespace(**dict(vars(a), map_args="")))
    assert calls[1][calls[1].index("--out") + 1] == str(tmp_path / "maprun")  # the default flags: maprun itself


def test_the_map_models_schedule_is_named_as_it_was_trained() -> None:
    render = bench("render")
    assert render.map_schedule(dict(noise_shift=-3.0, noise_shift_clean=0.0)) == \
        "its schedule's log SNR shifted +0 at the clean end to -3 at the noisy end"
    assert render.map_schedule(dict(noise_shift=-1.5, noise_shift_clean=None)) == "its schedule's log SNR shifted -1.5"
    assert render.map_schedule({}) == render.map_schedule(dict(noise_shift=0.0)) == "its noise schedule unshifted"


def test_the_rendered_docs_match_the_results_files() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "render.py"), "--check"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_program_started_fresh_reports_its_own_peak_not_the_benchmarks() -> None:
    R = bench("_results")
    # a program that reports ru_maxrss (as the seed recipe does), started by a benchmark holding 1 GiB
    report = "import json, resource; print(json.dumps(dict(mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))"
    held = bytearray(2**30)
    held[::4096] = b"x" * len(held[::4096])
    try:
        plain = subprocess.run([sys.executable, "-c", report], capture_output=True, text=True, timeout=60)
        inherited = json.loads(plain.stdout)["mib"]
        own = R.last_json([sys.executable, "-c", report])["mib"]
    finally:
        del held
    assert inherited > 1024 and own < 200, (inherited, own)
    with pytest.raises(SystemExit, match="failed"):  # the launcher hands back the program's exit code
        R.last_json([sys.executable, "-c", "import sys; sys.exit(3)"])


def test_utility_is_compared_within_each_modality_too(monkeypatch) -> None:
    import argparse

    import meddiff.metrics.segmentation as seg

    masks, render = bench("masks"), bench("render")
    rng = np.random.default_rng(0)
    classes = [f"{m}/abnormal" for m in ("ct", "mri", "us", "xray") for _ in range(5)]
    maps = np.zeros((20, 8, 8), np.int64)
    for i in range(20):
        y, x = rng.integers(0, 5, 2)
        maps[i, y:y + 3, x:x + 3] = 1
    test = dict(images=rng.random((20, 8, 8)).astype(np.float32), masks=maps, lesions=maps == 1, classes=classes)
    train = dict(images=rng.random((20, 8, 8)).astype(np.float32), masks=maps.copy(), lesions=maps == 1,
                 classes=classes)
    marker = 7.0  # what the fake generator draws: how the fake trainer knows the synthetic-only segmenter
    monkeypatch.setattr(masks, "generate_for", lambda run, m, c, g, s, cutoff=0.0: np.full(m.shape, marker, np.float32))
    monkeypatch.setattr(seg, "train_segmenter",
                        lambda images, m, steps, weights=None: "synthetic" if (images == marker).all() else "other")

    def segment(net, images):  # every segmenter finds every lesion, but the synthetic-only one misses CT's
        out = test["masks"] > 0
        return np.where(np.array([c.startswith("ct/") for c in classes])[:, None, None] & (net == "synthetic"),
                        False, out)

    monkeypatch.setattr(seg, "segment", segment)
    a = argparse.Namespace(few=5, real_share=0.5, seg_steps=1, guidance_cutoff=0.0, utility_maps="training")
    got = masks.utility_figures(None, "real", train, test, a, 2.0)
    by = got["utility_by_modality"]
    assert by["ct"]["ratio"] == 0 and by["ct"]["images"] == 5
    assert all(by[m]["ratio"] == 1 for m in ("mri", "us", "xray"))
    assert got["utility_ratio"] == pytest.approx(0.75)
    doc = json.loads((ROOT / "benchmarks" / "results" / "masks_steps4x.json").read_text())
    doc["summary"]["utility_by_modality"] = by
    line = next(line for line in render.render_masks(doc) if line.startswith("Synthetic-only"))
    assert "by modality: ct 0 [0, 0] (n=5), mri 1 [1, 1] (n=5)" in line


def test_edge_contrast_tells_a_brighter_lesion_from_a_seam() -> None:
    masks, render = bench("masks"), bench("render")
    region = np.zeros((16, 16), bool)
    region[5:11, 5:11] = True
    flat = np.full((16, 16), 0.4)
    assert masks.edge_contrast(flat, region) == 0
    assert masks.edge_contrast(np.where(region, 0.9, 0.4), region) == pytest.approx(0.5)
    assert masks.edge_contrast(np.where(region, 0.1, 0.4), region) == pytest.approx(0.3), "darker counts too"
    assert np.isnan(masks.edge_contrast(flat, np.ones((16, 16), bool))), "a region with no outside has no edge"
    doc = json.loads((ROOT / "benchmarks" / "results" / "masks_steps4x.json").read_text())
    line = lambda: next(line for line in render.render_masks(doc) if line.startswith("Inpainting"))
    assert "contrast across it" not in line(), "files measured before render as they were"
    doc["summary"]["inpainting"].update(edge_contrast_generated=0.21, edge_contrast_real_lesions=0.15)
    assert line().endswith("; the contrast across it (inside against outside) 0.210 against 0.150.")


def test_a_ct_liver_between_the_two_contrast_phases_is_counted_as_a_hedge() -> None:
    masks, render = bench("masks"), bench("render")
    from meddiff.data.phantoms import LABELS, LESION

    liver = next(v for v, name in LABELS.items() if name == "ct/liver")
    labels = np.full((16, 16), 2, np.int64)  # CT's body
    labels[3:13, 3:13] = liver
    labels[6:8, 6:8] = LESION
    image = np.where(labels == liver, 0.55, 0.2)
    image[6:8, 6:8] = 0.9
    image[3, 3:13] = 0.0  # the liver's border and the lesion's surroundings are left out
    image[4:10, 4:10] = np.where(labels[4:10, 4:10] == liver, 0.0, image[4:10, 4:10])  # within 2 of the lesion
    means = masks.liver_means(np.stack([image, np.where(labels == liver, 0.7, 0.2)]), np.stack([labels, labels]))
    assert means == pytest.approx([0.55, 0.7])
    thorax = np.full((16, 16), 2, np.int64)
    assert np.isnan(masks.liver_means(image[None], thorax[None])[0]), "a slice with no liver has no figure"

    plain, enhanced = 0.54 + 0.01 * np.arange(3), 0.66 + 0.01 * np.arange(3)
    slices = lambda levels: np.stack([np.where(labels == liver, v, 0.2) for v in levels])
    train = dict(images=slices([*plain, *enhanced, 0.1]), masks=np.stack([labels] * 7),
                 classes=["ct/abnormal"] * 6 + ["mri/abnormal"])
    real, hedged = slices([0.55, 0.67, 0.57, 0.68]), slices([0.55, 0.6, 0.61, 0.62])
    f = masks.phase_figures(hedged, real, np.stack([labels] * 4), train)
    assert f["gap"] == pytest.approx([0.56, 0.66]) and f["training_slices"] == 6, "MRI slices are not read"
    assert f["middle"] == pytest.approx([0.585, 0.635]), "a slice just past its phase's training extreme is no hedge"
    assert f["generated_in_gap"] == 0.75 and f["real_in_gap"] == 0 and f["slices"] == 4
    assert masks.phase_figures(hedged, real, np.stack([labels] * 4), dict(train, masks=train["masks"] * 0 + 1)) is None

    doc = json.loads((ROOT / "benchmarks" / "results" / "masks_anatomy_4x_guidance.json").read_text())
    assert "ct_phase" not in doc["summary"]
    assert not any(line.startswith("CT's contrast phase") for line in render.render_masks(doc)), \
        "files scored before the figure render as they were"
    doc["summary"]["ct_phase"] = {"2": dict(f, generated_in_gap=0.4), "1": f}
    line = next(line for line in render.render_masks(doc) if line.startswith("CT's contrast phase"))
    assert "below 0.560 or above 0.660" in line and "(0.585–0.635)" in line
    assert "75% at guidance 1, 40% at guidance 2" in line
    assert "the real test images on the same maps 0%." in line
    assert line.endswith("Livers of the plain phase (below the gap): 25% at guidance 1, 25% at guidance 2; real 25%.")


def test_the_grid_of_a_file_scored_on_new_or_drawn_maps_is_captioned_as_those_pairs() -> None:
    render = bench("render")
    doc = json.loads((ROOT / "benchmarks" / "results" / "masks_anatomy_4x_modelmaps_shift_2x.json").read_text())
    caption = lambda: render.render_masks(doc)[-1]
    assert caption().startswith("![requested map and generated image, one pair per modality]"), \
        "files from before the grid showed the utility pairs keep their caption"
    doc["summary"]["grid_shows"] = "model"
    assert caption().startswith("![a map the model of label maps drew and the image generated on it")
    doc["summary"]["grid_shows"] = "new"
    assert caption().startswith("![a new (jittered) map and the image generated on it")
