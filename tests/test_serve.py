"""Tests for meddiff.serve: request validation, the model card, the HTTP API (400s, no way out of the output folder,
zips of valid images) and the page itself in a headless Chromium driven by Selenium (skipped without one)."""
from __future__ import annotations

import contextlib
import csv
import http.client
import importlib.util
import io
import json
import re
import shutil
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pydicom
import pytest
from PIL import Image

from meddiff import serve as serve_mod
from meddiff.cli import main
from meddiff.config import default_sampler
from meddiff.errors import ConfigError
from meddiff.sample import class_index, generate, load_run
from meddiff.modelcard import shown_card
from meddiff.serve import (GenerateRequest, ServeConfig, check_budget, make_server, parse_request, request_cost,
                           request_defaults)

CLASSES = ("a", "b")
SEED_DEFAULTS = request_defaults("seed")  # the seed preset's sampler: DDIM, 20 steps
CHROME_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-proxy-server")


def _quiet(_line: str) -> None:
    pass


@contextlib.contextmanager
def _serving(run: Path, out: Path, **changes: Any) -> Iterator[serve_mod.Server]:
    """The app on a free port of 127.0.0.1 (or as `changes` say), served from a thread."""
    cfg = ServeConfig(run=str(run), out=str(out), **{"port": 0, "device": "cpu", "precision": "fp32", **changes})
    srv = make_server(cfg, echo=_quiet)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[serve_mod.Server]:
    with _serving(trained_run, tmp_path_factory.mktemp("served")) as srv:
        yield srv


@pytest.fixture(scope="module")
def uncond_server(uncond_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[serve_mod.Server]:
    with _serving(uncond_run, tmp_path_factory.mktemp("served_uncond")) as srv:
        yield srv


def _call(srv: serve_mod.Server, method: str, path: str, body: Any = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP exchange with 127.0.0.1 (the path is sent exactly as given); returns (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
    try:
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _post(srv: serve_mod.Server, body: Any) -> tuple[int, dict[str, Any]]:
    status, _, data = _call(srv, "POST", "/api/jobs", body)
    return status, json.loads(data)


def _finish(srv: serve_mod.Server, body: dict[str, Any]) -> dict[str, Any]:
    """Submit a batch and poll it until it is done (a guard of 120 s against a hang, not a timing check)."""
    status, job = _post(srv, body)
    assert status == 202, job
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = json.loads(_call(srv, "GET", job["url"])[2])
        if state["status"] in ("done", "error"):
            assert state["status"] == "done", state["error"]
            return state
        time.sleep(0.1)
    raise AssertionError(f"batch {job['id']} did not finish")


def _zip(srv: serve_mod.Server, url: str) -> zipfile.ZipFile:
    status, headers, data = _call(srv, "GET", url)
    assert status == 200 and headers["Content-Type"] == "application/zip"
    return zipfile.ZipFile(io.BytesIO(data))


def _png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "L"
        return np.asarray(im)


# --- validation and the model card ---------------------------------------------------------------------------

def test_parse_request_takes_form_strings_and_fills_defaults() -> None:
    req = parse_request({"class": "b", "n": " 3", "steps": "7", "guidance": "2.5", "seed": "+11"}, CLASSES,
                        SEED_DEFAULTS)
    assert req == GenerateRequest("b", 3, "ddim", 7, 2.5, 11, "png")
    assert parse_request({"class": "a", "n": 64, "steps": 200, "guidance": 0, "format": "dicom",
                          "sampler": "heun"}, CLASSES, SEED_DEFAULTS) == GenerateRequest("a", 64, "heun", 200, 0.0,
                                                                                         0, "dicom")


@pytest.mark.parametrize("preset, sampler, steps", [("seed", "ddim", 20), ("tiny", "unipc", 10), ("lean", "unipc", 10)])
def test_the_default_sampler_is_the_runs_default(preset: str, sampler: str, steps: int) -> None:
    assert default_sampler(preset) == (sampler, steps)
    assert parse_request({"class": "a"}, CLASSES, request_defaults(preset)) == GenerateRequest(
        "a", 4, sampler, steps, 1.0, 0, "png")


@pytest.mark.parametrize("body, message", [
    ({"class": "a", "n": -1}, r"n -1: must be a whole number from 1 to 64"),
    ({"class": "a", "n": 0}, r"n 0: must be a whole number from 1 to 64"),
    ({"class": "a", "n": "65"}, r"n 65: must be a whole number from 1 to 64"),
    ({"class": "a", "n": "abc"}, r"n 'abc': must be a whole number from 1 to 64"),
    ({"class": "a", "n": 2.5}, r"n 2.5: must be a whole number"),
    ({"class": "a", "n": True}, r"n True: must be a whole number"),
    ({"class": "a", "n": ""}, r"n '': must be a whole number"),
    ({"class": "a", "steps": "1000"}, r"steps 1000: must be a whole number from 1 to 200"),
    ({"class": "a", "guidance": "-1"}, r"guidance -1.0: must be a number from 0 to 20"),
    ({"class": "a", "guidance": "nan"}, r"guidance nan: must be a number from 0 to 20"),
    ({"class": "a", "guidance": "lots"}, r"guidance 'lots': must be a number from 0 to 20"),
    ({"class": "a", "guidance": [1]}, r"guidance \[1\]: must be a number"),
    ({"class": "a", "seed": -5}, r"seed -5: must be a whole number from 0 to 4294967295"),
    ({"class": "a", "seed": 2**32 - 2, "n": 4}, r"seed 4294967294: with 4 images it runs past the largest seed"),
    ({"class": "zzz"}, r"class 'zzz': not a class this model knows; choose from a, b"),
    ({"class": "../../etc"}, r"class '../../etc': not a class this model knows"),
    ({}, r"class None: not a class this model knows"),
    ({"class": "a", "sampler": "magic"}, r"sampler 'magic': choose from ddpm, ddim"),
    ({"class": "a", "format": "nifti"}, r"format 'nifti': choose from png, dicom"),
    ({"class": "a", "out": "/tmp/x"}, r"request: unknown field\(s\) 'out'; allowed: class, n, sampler"),
    ([1, 2], r"request: expected a JSON object"),
])
def test_parse_request_refuses_bad_parameters(body: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_request(body, CLASSES, SEED_DEFAULTS)


def test_unconditional_model_takes_no_class() -> None:
    assert parse_request({"n": 1}, (), SEED_DEFAULTS).class_name is None
    assert parse_request({"n": 1, "class": ""}, (), SEED_DEFAULTS).class_name is None
    with pytest.raises(ConfigError, match=r"class 'a': given, but this model is unconditional"):
        parse_request({"class": "a"}, (), SEED_DEFAULTS)


def _runs(labels: np.ndarray) -> list[int]:
    """A label map → the page's run-length encoding [label, count, …], row by row."""
    flat = labels.ravel().tolist()
    runs, value, count = [], flat[0], 0
    for v in flat:
        if v == value:
            count += 1
        else:
            runs += [value, count]
            value, count = v, 1
    return runs + [value, count]


def test_a_mask_request_decodes_to_its_label_map_and_bad_ones_say_why() -> None:
    labels = np.zeros((8, 8), np.uint16)
    labels[2:5, 3:7], labels[6, :2] = 1, 2
    req = parse_request({"n": 1, "mask": _runs(labels)}, (), SEED_DEFAULTS, (1, 2), 8)
    assert req.mask.dtype == np.uint16 and np.array_equal(req.mask, labels)
    assert parse_request({"n": 1}, (), SEED_DEFAULTS, (1, 2), 8).mask is None  # no map: drawn without one
    for runs, message in (([0, 63], r"add up to 8×8 = 64 px \(they add up to 63\)"),
                          ([0, 60, 3, 4], r"label value\(s\) 3 this model does not know; it knows 0 .* and 1, 2"),
                          ([0, 64, 1], r"expected a list \[label, count"),
                          ([0, 65, 1, -1], r"counts must be positive"),
                          ([0, 64.0], r"whole number"), ("0,64", r"expected a list"), ([0, True], r"whole number")):
        with pytest.raises(ConfigError, match=r"^mask: .*" + message):
            parse_request({"n": 1, "mask": runs}, (), SEED_DEFAULTS, (1, 2), 8)
    with pytest.raises(ConfigError, match=r"mask: given, but this model was not trained on label maps"):
        parse_request({"class": "a", "mask": [0, 64]}, CLASSES, SEED_DEFAULTS, (), 8)


def test_a_map_makes_guidance_cost_two_passes_without_a_class() -> None:
    plain = GenerateRequest(None, 2, "ddim", 10, 3.0, 0, "png")
    mapped = GenerateRequest(None, 2, "ddim", 10, 3.0, 0, "png", mask=np.zeros((8, 8), np.uint16))
    assert request_cost(mapped, 8) == 2 * request_cost(plain, 8)


def test_the_page_draws_a_map_and_gets_the_pair_back(mask_run: Path, tmp_path: Path) -> None:
    labels = np.zeros((32, 32), np.uint16)
    labels[8:20, 10:24] = 1
    with _serving(mask_run, tmp_path / "served") as srv:
        info = json.loads(_call(srv, "GET", "/api/info")[2])
        assert info["size"] == 32 and info["mask_values"] and "label maps" in info["title"]
        value = info["mask_values"][0]
        state = _finish(srv, {"class": "mri/abnormal", "n": 2, "steps": 2, "seed": 5, "guidance": 2,
                              "mask": _runs(labels * value)})
        with _zip(srv, state["zip"]) as zf:
            names = sorted(zf.namelist())
            assert names == ["images/seed000005.png", "images/seed000006.png", "manifest.csv",
                             "masks/seed000005.png", "masks/seed000006.png"]
            maps = [np.asarray(Image.open(io.BytesIO(zf.read(f"masks/seed00000{s}.png")))) for s in (5, 6)]
            image = _png_pixels(zf.read("images/seed000006.png"))
            rows = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
        assert all(np.array_equal(m, labels * value) for m in maps)  # the map the page sent, as sent
        assert [(r["file"], r["mask"]) for r in rows] == [(f"images/seed00000{s}.png", f"masks/seed00000{s}.png")
                                                          for s in (5, 6)]
        # the image is the one `generate` draws for that seed and map, with the same guidance
        run = load_run(mask_run, device="cpu")
        expected = generate(run, [6], class_index(run, "mri/abnormal"), "unipc", 2, 2.0,
                            masks=(labels * value)[None])[0]
        assert np.array_equal(image, np.round(expected * 255).astype(np.uint8))
        status, body = _post(srv, {"class": "mri/abnormal", "n": 1, "mask": [0, 5]})
        assert status == 400 and "add up to 32×32" in body["error"]


def test_a_body_beyond_the_limit_is_refused_before_it_is_read(server: serve_mod.Server) -> None:
    from meddiff.serve_http import MAX_BODY

    status, _, data = _call(server, "POST", "/api/jobs", {"n": 1, "mask": [0, 1] * (MAX_BODY // 4)})
    assert status == 413 and f"at most {MAX_BODY}" in json.loads(data)["error"]


# --- the HTTP API --------------------------------------------------------------------------------------------

def test_page_and_info(server: serve_mod.Server) -> None:
    status, headers, page = _call(server, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b'id="generate"' in page
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert _call(server, "GET", "/app.js")[0] == 200
    info = json.loads(_call(server, "GET", "/api/info")[2])
    assert info["classes"] == ["a", "b"] and "ddim" in info["samplers"] and info["formats"] == ["png", "dicom"]
    assert info["limits"]["n"] == [1, 64] and info["limits"]["steps"] == [1, 200]
    assert (info["defaults"]["sampler"], info["defaults"]["steps"]) == default_sampler("tiny") == ("unipc", 10)
    run = Path(server.app.cfg.run)  # README.md when training wrote one, else the summary
    assert (info["card"], info["card_source"]) == shown_card(run, serve_mod.MAX_CARD)


def test_server_listens_on_loopback_by_default() -> None:
    assert ServeConfig(run="r", out="o").host == "127.0.0.1" and ServeConfig(run="r", out="o").port == 7860


@pytest.mark.parametrize("body, status, message", [
    ({"class": "a", "n": "-3"}, 400, "n -3: must be a whole number from 1 to 64"),
    ({"class": "nope", "n": 1}, 400, "class 'nope': not a class this model knows"),
    ({"class": "a", "steps": "99999"}, 400, "steps 99999: must be a whole number from 1 to 200"),
    ({"class": "a", "seed": "x1"}, 400, "seed 'x1': must be a whole number"),
    (b"{not json", 400, "request: the body is not valid JSON"),
    (b"\xff\xfe", 400, "request: the body is not valid JSON"),
])
def test_bad_parameters_get_400_with_a_message(server: serve_mod.Server, body: Any, status: int,
                                               message: str) -> None:
    before = sorted(p.name for p in server.app.out.iterdir())
    headers = {"Content-Type": "application/json"} if isinstance(body, bytes) else None
    got, _, data = _call(server, "POST", "/api/jobs", body, headers)
    assert got == status and message in json.loads(data)["error"]
    assert sorted(p.name for p in server.app.out.iterdir()) == before, "a refused request must write nothing"


def test_form_posts_and_foreign_hosts_are_refused(server: serve_mod.Server) -> None:
    status, _, data = _call(server, "POST", "/api/jobs", "n=1", {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415 and "application/json" in json.loads(data)["error"]
    status, _, data = _call(server, "GET", "/api/info", headers={"Host": "evil.example:7860"})
    assert status == 403 and "Host 'evil.example' refused" in json.loads(data)["error"]
    status, _, data = _call(server, "POST", "/api/jobs", {"class": "a"}, {"Host": "evil.example"})
    assert status == 403


def test_busy_server_says_so(server: serve_mod.Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_mod, "MAX_PENDING", 0)
    status, body = _post(server, {"class": "a", "n": 1})
    assert status == 429 and "busy" in body["error"]


def test_batch_zip_holds_n_valid_pngs_named_by_seed(server: serve_mod.Server, trained_run: Path) -> None:
    state = _finish(server, {"class": "b", "n": "3", "steps": "2", "seed": "10", "sampler": "ddim", "guidance": "1"})
    assert state["done"] == state["total"] == 3 and state["seeds"] == [10, 11, 12]
    with _zip(server, state["zip"]) as zf:
        names = sorted(zf.namelist())
        assert names == ["manifest.csv", "seed000010.png", "seed000011.png", "seed000012.png"]
        pixels = {n: _png_pixels(zf.read(n)) for n in names if n.endswith(".png")}
        rows = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
        text = Image.open(io.BytesIO(zf.read("seed000011.png"))).text
    assert all(p.shape == (32, 32) and p.dtype == np.uint8 for p in pixels.values())
    assert [(r["file"], r["class"], r["seed"], r["steps"]) for r in rows] == [
        (f"seed0000{s}.png", "b", str(s), "2") for s in (10, 11, 12)]
    assert json.loads(text["meddiff"])["synthetic"] is True
    # the page's image for seed 11 is the image `generate` gives for seed 11 alone (per-image seeds)
    expected = generate(load_run(trained_run, device="cpu"), [11], 1, "ddim", 2)[0]
    assert np.array_equal(pixels["seed000011.png"], np.round(expected * 255).astype(np.uint8))
    status, headers, preview = _call(server, "GET", state["images"][1])
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert np.array_equal(_png_pixels(preview), pixels["seed000011.png"])


def test_dicom_batch_zips_dicoms_and_previews_pngs(server: serve_mod.Server) -> None:
    state = _finish(server, {"class": "a", "n": 1, "steps": 1, "seed": 3, "format": "dicom"})
    with _zip(server, state["zip"]) as zf:
        assert sorted(zf.namelist()) == ["manifest.csv", "seed000003.dcm"]
        ds = pydicom.dcmread(io.BytesIO(zf.read("seed000003.dcm")))
    assert ds.ConversionType == "SYN" and ds.Rows == ds.Columns == 32 and ds.PatientName == ""
    status, _, preview = _call(server, "GET", state["images"][0])
    assert status == 200 and _png_pixels(preview).shape == (32, 32)


def test_unconditional_model_serves_without_classes(uncond_server: serve_mod.Server) -> None:
    assert json.loads(_call(uncond_server, "GET", "/api/info")[2])["classes"] == []
    status, body = _post(uncond_server, {"class": "a", "n": 1})
    assert status == 400 and "this model is unconditional" in body["error"]
    state = _finish(uncond_server, {"n": 1, "steps": 1, "seed": 4})
    with _zip(uncond_server, state["zip"]) as zf:
        rows = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
        assert _png_pixels(zf.read("seed000004.png")).shape == (32, 32)
    assert [(r["file"], r["class"], r["sampler"]) for r in rows] == [("seed000004.png", "", "unipc")]  # the run's


def test_requests_cannot_reach_files_outside_the_batches(server: serve_mod.Server) -> None:
    state = _finish(server, {"class": "a", "n": 1, "steps": 1})
    job = state["id"]
    for path in ["/../../../../etc/passwd", "/jobs/../../meddiff.json", f"/jobs/{job}/image/../../../etc/passwd",
                 f"/jobs/{job}/image/..%2f..%2fmanifest.csv", "/jobs/%2e%2e/batch.zip", f"/jobs/{job}/image/5.png",
                 f"/jobs/{job}/image/-1.png", "/jobs/0000000000000000/batch.zip", f"/jobs/{job}/manifest.csv",
                 f"/api/jobs/{job}/../../../etc/passwd", "/api/jobs/..", f"/jobs/{job.upper()}/batch.zip",
                 "//etc/passwd", "/static/../../etc/hosts"]:
        status, headers, data = _call(server, "GET", path)
        assert status == 404 and headers["Content-Type"] == "application/json", path
        assert "error" in json.loads(data) and b"root:" not in data, path
    status, _, _ = _call(server, "POST", f"/api/jobs/{job}", {"class": "a"})
    assert status == 404
    # everything written lies in server-named job folders directly under the output folder
    assert all(re.fullmatch(r"[0-9a-f]{16}", p.name) and p.is_dir() for p in server.app.out.iterdir())


def test_cli_serve_reports_a_missing_run_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--port", "0"]) == 1
    assert re.fullmatch(r"meddiff: error: .*nothing/meddiff.json: missing; is this a meddiff run folder\?\n",
                        capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--run", str(tmp_path), "--port", "70000"])
    assert exit_info.value.code == 2
    assert "--port 70000: must be a whole number from 0 to 65535" in capsys.readouterr().err


# --- compute budget, cancellation, kept jobs, remote opt-in ---------------------------------------------------

def test_request_cost_counts_unet_evaluations_times_pixels() -> None:
    req = GenerateRequest("a", 64, "heun", 200, 20.0, 0, "png")
    assert request_cost(req, 64) == 64 * 200 * 2 * 2 * 64 * 64  # Heun: 2 evaluations a step; guidance: 2 passes
    assert request_cost(GenerateRequest("a", 4, "ddim", 20, 1.0, 0, "png"), 128) == 4 * 20 * 128 * 128
    assert request_cost(GenerateRequest(None, 4, "ddim", 20, 3.0, 0, "png"), 128) == 4 * 20 * 128 * 128  # uncond.
    with pytest.raises(ConfigError, match=r"request: 64 images × 200 steps × 2 \(heun\) × 2 \(guidance\) at 64×64 px "
                                          r"is 209\.7 M pixel-evaluations; one request may use at most 25 M: use at "
                                          r"most 7 images or at most 23 steps for 64 images or guidance 1"):
        check_budget(req, 64, 25.0)
    budget = ServeConfig(run="r", out="o").compute_budget
    for preset in ("seed", "lean"):  # the page's defaults, with guidance, fit 2x over even at 256 px
        d = request_defaults(preset)
        default = GenerateRequest("a", d["n"], d["sampler"], d["steps"], 3.0, 0, "png")
        assert 2 * check_budget(default, 256, budget) <= budget * 1e6


def test_an_over_budget_request_gets_400_and_writes_nothing(server: serve_mod.Server) -> None:
    before = sorted(p.name for p in server.app.out.iterdir())
    status, body = _post(server, {"class": "a", "n": 64, "steps": 200, "sampler": "heun", "guidance": 20})
    assert status == 400 and "at most 25 M" in body["error"] and "at most 30 images" in body["error"]
    assert sorted(p.name for p in server.app.out.iterdir()) == before


class _SlowGenerate:
    """Stands in for sample.generate: each image waits until the test lets it through (gate.release)."""

    def __init__(self) -> None:
        self.calls, self.gate = 0, threading.Semaphore(0)

    @contextlib.contextmanager
    def installed(self, monkeypatch: pytest.MonkeyPatch) -> Iterator["_SlowGenerate"]:
        monkeypatch.setattr(serve_mod, "generate", self)
        try:
            yield self
        finally:
            self.gate.release(10_000)  # whatever happened, let the worker finish

    def __call__(self, run: Any, seeds: list[int], *args: Any, **kwargs: Any) -> np.ndarray:
        self.calls += 1
        assert self.gate.acquire(timeout=60), "the test never let this image through"
        return np.zeros((len(seeds), 32, 32), np.float32)


def _state(srv: serve_mod.Server, job_id: str) -> tuple[int, dict[str, Any]]:
    status, _, data = _call(srv, "GET", f"/api/jobs/{job_id}")
    return status, json.loads(data)


def _wait_for(srv: serve_mod.Server, job_id: str, *statuses: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60  # a guard against a hang, not a timing check
    while (state := _state(srv, job_id)[1])["status"] not in statuses:
        assert time.monotonic() < deadline, state
        time.sleep(0.02)
    return state


def test_jobs_can_be_cancelled_queued_or_running(trained_run: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with _serving(trained_run, tmp_path / "out") as srv, _SlowGenerate().installed(monkeypatch) as slow:
        first = _post(srv, {"class": "a", "n": 3, "steps": 1})[1]["id"]
        second = _post(srv, {"class": "a", "n": 2, "steps": 1})[1]["id"]
        _wait_for(srv, first, "running")
        status, _, data = _call(srv, "DELETE", f"/api/jobs/{second}")  # queued: never starts
        assert status == 202 and json.loads(data) == {"id": second, "status": "cancelled"}
        assert _state(srv, second)[1]["status"] == "cancelled"
        assert _call(srv, "DELETE", f"/api/jobs/{first}")[0] == 202  # running: stops after its current image
        assert _state(srv, first)[1]["status"] == "cancelled"
        slow.gate.release(5)
        deadline = time.monotonic() + 60
        while srv.app._current is not None or slow.calls < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        state = _state(srv, first)[1]
        assert (state["status"], state["done"], state["zip"]) == ("cancelled", 1, None) and slow.calls == 1
        assert not any((srv.app.out / second).iterdir()), "a cancelled queued job writes nothing"
        # DELETE of a finished job forgets it and deletes its folder
        status, _, data = _call(srv, "DELETE", f"/api/jobs/{first}")
        assert status == 200 and json.loads(data)["status"] == "deleted"
        assert _state(srv, first)[0] == 404 and not (srv.app.out / first).exists()
        assert _call(srv, "DELETE", "/api/jobs/0123456789abcdef")[0] == 404


def test_the_queue_has_a_compute_budget(trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _serving(trained_run, tmp_path / "out", compute_budget=0.01) as srv, \
            _SlowGenerate().installed(monkeypatch) as slow:  # a budget of 10 000: 9 images of 1 step
        ids = [_post(srv, {"class": "a", "n": 9, "steps": 1})[1]["id"] for _ in range(4)]  # 4 x 9 216
        status, body = _post(srv, {"class": "a", "n": 9, "steps": 1})
        assert status == 429 and "0.03686 M pixel-evaluations are queued and this batch needs 0.009216 M (at most " \
            "0.04 M in all)" in body["error"]
        assert _post(srv, {"class": "a", "n": 10, "steps": 1})[0] == 400  # over one request's budget
        for job_id in ids:
            _call(srv, "DELETE", f"/api/jobs/{job_id}")
        slow.gate.release(1)
        _wait_for(srv, ids[0], "cancelled")
        assert _post(srv, {"class": "a", "n": 9, "steps": 1})[0] == 202  # cancelled work no longer counts


def test_only_the_newest_jobs_keep_their_folders(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "0123456789abcdef").mkdir()  # looks like a job folder, but not one of this server's
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("keep")
    with _serving(trained_run, out, keep_jobs=2) as srv:
        ids = [_finish(srv, {"class": "a", "n": 1, "steps": 1, "seed": k})["id"] for k in range(3)]
        assert not (out / ids[0]).exists() and _state(srv, ids[0])[0] == 404
        assert (out / ids[1]).is_dir() and (out / ids[2]).is_dir()
        shutil.rmtree(out / ids[1])  # a job folder swapped for a link: pruning must not follow it
        (out / ids[1]).symlink_to(precious, target_is_directory=True)
        _finish(srv, {"class": "a", "n": 1, "steps": 1})
        assert _state(srv, ids[1])[0] == 404 and (precious / "keep.txt").read_text() == "keep"
    assert (out / "notes.txt").read_text() == "mine" and (out / "0123456789abcdef").is_dir()
    assert sum(len(p.name) == 16 for p in out.iterdir()) == 4  # 2 kept + the link left alone + the stranger


@pytest.mark.parametrize("args, code, message", [
    (["--host", "0.0.0.0"], 1, r"--host '0.0.0.0' lets other machines reach the server; add --allow-remote"),
    (["--device", "bogus"], 1, r"--device 'bogus': not a device; use auto, cpu, cuda or cuda:N"),
    (["--keep-jobs", "0"], 2, r"--keep-jobs 0: must be a whole number from 1 to 10000"),
    (["--compute-budget", "nan"], 2, r"--compute-budget nan: must be a number in \(0, 1000000\]"),
])
def test_cli_serve_refuses_bad_options_in_one_line(trained_run: Path, tmp_path: Path, args: list[str], code: int,
                                                   message: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["serve", "--run", str(trained_run), "--out", str(tmp_path / "o"), "--port", "0", *args]
    if code == 1:
        assert main(argv) == 1
    else:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert re.fullmatch(f"meddiff: error: {message}.*\n", err) and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    (tmp_path / "file").write_text("x")
    assert main(["serve", "--run", str(trained_run), "--out", str(tmp_path / "file"), "--port", "0"]) == 1
    assert "exists and is not a folder" in capsys.readouterr().err


def test_serve_config_checks_its_own_limits() -> None:
    with pytest.raises(ConfigError, match=r"--keep-jobs 0: must be a whole number from 1 to 10000"):
        ServeConfig(run="r", out="o", keep_jobs=0)
    with pytest.raises(ConfigError, match=r"--compute-budget inf: must be a number in \(0, 1000000\]"):
        ServeConfig(run="r", out="o", compute_budget=float("inf"))
    with pytest.raises(ConfigError, match=r"--host '192\.168\.1\.5' lets other machines reach the server"):
        ServeConfig(run="r", out="o", host="192.168.1.5")
    assert ServeConfig(run="r", out="o", host="192.168.1.5", allow_remote=True).allow_remote
    assert ServeConfig(run="r", out="o", host="::1").host == "::1"  # loopback needs no opt-in


def test_serve_off_loopback_prints_a_link_with_its_token(trained_run: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    tokens: list[str | None] = []

    def stop_at_once(srv: serve_mod.Server, **_: Any) -> None:
        tokens.append(srv.app.token)
    monkeypatch.setattr(serve_mod.Server, "serve_forever", stop_at_once)
    serve_mod.serve(ServeConfig(run=str(trained_run), out=str(tmp_path), host="0.0.0.0", port=0, allow_remote=True,
                                device="cpu"), echo=lines.append)
    token = tokens[0]
    assert token and len(token) >= 40 and sum(token in line for line in lines) == 1
    assert any(re.search(rf"http://0\.0\.0\.0:\d+/\?token={re.escape(token)} ", line) for line in lines)
    serve_mod.serve(ServeConfig(run=str(trained_run), out=str(tmp_path), port=0, device="cpu"), echo=lines.append)
    assert tokens[1] is None and "token" not in lines[-1]


# --- the page in a real browser ---------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _chrome(profile: Path) -> Any:
    """A headless Debian Chromium driven through the given chromedriver (so Selenium never downloads one)."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (*CHROME_ARGS, f"--user-data-dir={profile}"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


# skipif, not pytest.skip in the test: decided before the fixtures train their models
@pytest.mark.skipif(not CHROMIUM or not CHROMEDRIVER,
                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
@pytest.mark.skipif(importlib.util.find_spec("selenium") is None, reason="needs selenium (pip install selenium)")
def test_page_generates_two_images_in_a_headless_browser(server: serve_mod.Server, uncond_server: serve_mod.Server,
                                                         tmp_path: Path) -> None:
    browser = _chrome(tmp_path / "profile")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def field(name: str, value: str) -> None:
        box = browser.find_element(By.ID, name)
        box.clear()
        box.send_keys(value)

    try:
        browser.get(server.url)
        wait = WebDriverWait(browser, 90)
        wait.until(lambda b: b.find_element(By.ID, "generate").is_enabled())
        card = browser.find_element(By.ID, "card")
        assert card.find_elements(By.CSS_SELECTOR, "h3") and "synthetic" in card.text.lower()
        assert "library_name" not in card.text, "README front matter is not part of the card shown"
        Select(browser.find_element(By.ID, "class")).select_by_visible_text("b")
        field("n", "2")
        field("steps", "500")  # first a bad value: the page shows the server's message
        browser.find_element(By.ID, "generate").click()
        message = browser.find_element(By.ID, "message")
        wait.until(lambda b: message.is_displayed())
        assert "steps 500: must be a whole number from 1 to 200" in message.text
        field("steps", "2")
        browser.find_element(By.ID, "generate").click()
        download = browser.find_element(By.ID, "download")
        wait.until(lambda b: download.is_displayed())
        assert not message.is_displayed()
        images = browser.find_elements(By.CSS_SELECTOR, "#images img")
        assert len(images) == 2
        wait.until(lambda b: all(b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                                 == 32 for i in images))
        assert "2 images" in browser.find_element(By.ID, "progress-text").text
        href = download.get_attribute("href")
        browser.get(uncond_server.url)  # a model without classes: no class or guidance to choose
        wait.until(lambda b: b.find_element(By.ID, "generate").is_enabled())
        assert not browser.find_element(By.ID, "class-row").is_displayed()
        assert not browser.find_element(By.ID, "guidance-row").is_displayed()
        assert browser.find_element(By.ID, "steps").is_displayed()
    finally:
        browser.quit()
    assert href.startswith(server.url)
    with _zip(server, "/" + href.removeprefix(server.url)) as zf:
        pngs = [n for n in zf.namelist() if n.endswith(".png")]
        assert sorted(pngs) == ["seed000000.png", "seed000001.png"]
        assert all(_png_pixels(zf.read(n)).shape == (32, 32) for n in pngs)


@pytest.mark.skipif(not CHROMIUM or not CHROMEDRIVER,
                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
@pytest.mark.skipif(importlib.util.find_spec("selenium") is None, reason="needs selenium (pip install selenium)")
def test_page_loads_and_draws_a_label_map_and_shows_each_pair(mask_run: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    value = int(load_run(mask_run, device="cpu").model.mask_values[0])
    upload = np.zeros((32, 32), np.uint8)
    upload[4:12, 6:20] = value
    Image.fromarray(upload).save(tmp_path / "map.png")
    Image.fromarray((upload > 0).astype(np.uint8) * 255).save(tmp_path / "region.png")
    labels = "return Array.from(mask.labels)"
    with _serving(mask_run, tmp_path / "served") as srv:
        browser = _chrome(tmp_path / "profile")
        try:
            browser.set_window_size(1000, 1400)  # the whole canvas in view: a stroke lands where it is aimed
            browser.get(srv.url)
            wait = WebDriverWait(browser, 90)
            wait.until(lambda b: b.find_element(By.ID, "generate").is_enabled())
            assert browser.find_element(By.ID, "mask-panel").is_displayed()
            brush = Select(browser.find_element(By.ID, "brush-label"))
            assert [o.text for o in brush.options][-1] == "0" and str(value) in [o.text for o in brush.options]
            browser.find_element(By.ID, "mask-file").send_keys(str(tmp_path / "map.png"))
            wait.until(lambda b: any(b.execute_script(labels)))
            assert np.array_equal(np.array(browser.execute_script(labels)).reshape(32, 32), upload)
            browser.find_element(By.ID, "mask-file").send_keys(str(tmp_path / "region.png"))  # 0/255: one region
            message = browser.find_element(By.ID, "message")
            wait.until(lambda b: message.is_displayed())
            assert f"drawn as label {value}" in message.text
            assert np.array_equal(np.array(browser.execute_script(labels)).reshape(32, 32), upload)
            canvas = browser.find_element(By.ID, "mask")  # 256 css px for 32 px: a stroke across the lower half
            brush.select_by_visible_text(str(value))
            ActionChains(browser).move_to_element_with_offset(canvas, -60, 60).click_and_hold() \
                .move_by_offset(120, 0).release().perform()
            drawn = np.array(browser.execute_script(labels)).reshape(32, 32)
            assert drawn[20:25].any() and set(np.unique(drawn).tolist()) == {0, value}
            Select(browser.find_element(By.ID, "class")).select_by_visible_text("mri/abnormal")
            for name, text in (("n", "1"), ("steps", "2")):
                box = browser.find_element(By.ID, name)
                box.clear()
                box.send_keys(text)
            browser.find_element(By.ID, "generate").click()
            download = browser.find_element(By.ID, "download")
            wait.until(lambda b: download.is_displayed())
            pairs = browser.find_elements(By.CSS_SELECTOR, "#images .pair")
            assert len(pairs) == 1 and pairs[0].find_elements(By.TAG_NAME, "img") \
                and pairs[0].find_elements(By.TAG_NAME, "canvas")
            href = download.get_attribute("href")
        finally:
            browser.quit()
        with _zip(srv, "/" + href.removeprefix(srv.url)) as zf:
            sent = np.asarray(Image.open(io.BytesIO(zf.read("masks/seed000000.png"))))
            assert _png_pixels(zf.read("images/seed000000.png")).shape == (32, 32)
    assert np.array_equal(sent, drawn)  # the server drew for, and wrote, the map the page showed
