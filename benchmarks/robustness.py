#!/usr/bin/env python3
"""Robustness harness: hostile command lines, broken run folders, odd data files, hard kills and abuse of
`meddiff serve`, each tried as a user would, with counts of what happened.

    python benchmarks/robustness.py                      # about 3-6 minutes on a 2-core CPU
    python benchmarks/robustness.py --only cli,runs      # some groups only
    python benchmarks/robustness.py --list               # the cases, without running them

Each CLI case runs `meddiff.cli.main(argv)` in a forked child of a process that imported meddiff once (so a
hundred cases cost seconds, not a hundred torch imports); kills use real subprocesses. Every case is judged:
- clean: the expected outcome — for bad input one line `meddiff: error: …` on stderr and a non-zero exit; for
  input meddiff must cope with (a damaged newest checkpoint, one odd file among good ones), exit 0;
- traceback: "Traceback" anywhere in the output, or an unexpected exit code;
- hang: no exit within the case's timeout (the child is killed);
- leftover: a file or folder that the failed command should not have left (its --out, temporary names);
- network: a connection to the local listener that HF_ENDPOINT and the proxy variables point at;
- served outside: the web page returned the contents of a file that is not the model's.
Writes every case with its outcome to --results (default benchmarks/results/robustness.json) and prints the table.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- the network trap

class NetTrap:
    """A TCP listener on 127.0.0.1 that HF_ENDPOINT and the proxy variables point at: every connection is a
    request that tried to leave the machine. It answers 503 so that a client fails fast instead of waiting."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.hits: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    first = conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
                except OSError:
                    first = "?"
                self.hits.append(first)
                with contextlib.suppress(OSError):
                    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# ----------------------------------------------------------------------------- cases and outcomes

@dataclass
class Case:
    group: str
    name: str
    argv: list[str]
    expect: str = "error"                      # "error": one clean line, exit != 0; "ok": exit 0
    must_not_exist: list[str] = field(default_factory=list)   # paths a failed command must not leave
    scan: list[str] = field(default_factory=list)             # folders to search for temporary leftovers
    setup: Callable[[Path], None] | None = None        # builds shared inputs in the work folder
    local_setup: Callable[[Path], None] | None = None  # builds inputs in the case's own folder
    timeout: float = 60.0
    check: Callable[[Path, str, str], str | None] | None = None  # extra judgement → problem or None


@dataclass
class Outcome:
    group: str
    name: str
    argv: list[str]
    verdict: str          # clean | traceback | hang | leftover | unexpected | network | served-outside
    exit_code: int | None
    seconds: float
    stderr_tail: str
    detail: str = ""


TEMP_MARKERS = (".tmp", ".old", ".partial")


def _temporaries(folders: list[Path]) -> list[str]:
    found = []
    for folder in folders:
        if not folder.exists():
            continue
        for p in folder.rglob("*"):
            if any(m in p.name for m in TEMP_MARKERS) and p.name.startswith("."):
                found.append(str(p))
    return found


def _run_forked(argv: list[str], cwd: Path, timeout: float) -> tuple[int | None, str, str, float]:
    """cli.main(argv) in a forked child; (exit code or None on hang, stdout, stderr, seconds)."""
    out_f = tempfile.TemporaryFile()
    err_f = tempfile.TemporaryFile()
    t0 = time.time()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.chdir(cwd)
            os.dup2(out_f.fileno(), 1)
            os.dup2(err_f.fileno(), 2)
            sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), write_through=True)
            sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), write_through=True)
            os.setsid()  # its own process group: a hang is killed with everything it started
            from meddiff import cli

            try:
                code = cli.main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # what a user would see: Python's traceback
                import traceback

                traceback.print_exc()
                code = 1
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    code: int | None = None
    while time.time() - t0 < timeout:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
        time.sleep(0.02)
    if code is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    seconds = time.time() - t0
    out_f.seek(0)
    err_f.seek(0)
    return code, out_f.read().decode("utf-8", "replace"), err_f.read().decode("utf-8", "replace"), seconds


def judge(case: Case, work: Path, trap: NetTrap) -> Outcome:
    if case.local_setup:
        case.local_setup(work)
    hits_before = len(trap.hits)
    code, out, err, seconds = _run_forked(case.argv, work, case.timeout)
    tail = "\n".join(err.strip().splitlines()[-3:])[-400:]
    res = Outcome(case.group, case.name, case.argv, "clean", code, round(seconds, 2), tail)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if len(trap.hits) > hits_before:  # the worst outcome: data left the machine
        res.verdict, res.detail = "network", "; ".join(trap.hits[hits_before:])[:200]
    elif code is None:
        res.verdict = "hang"
    elif "Traceback (most recent call last)" in out + err:
        res.verdict = "traceback"
    elif case.expect == "error":
        if code == 0:
            res.verdict, res.detail = "unexpected", "exit 0 where an error was expected"
        elif not lines or not lines[-1].startswith("meddiff: error:"):
            res.verdict, res.detail = "unexpected", "no `meddiff: error:` line"
        elif sum(ln.startswith("meddiff: error:") for ln in lines) != 1:
            res.verdict, res.detail = "unexpected", "more than one error line"
    elif code != 0:
        res.verdict, res.detail = "unexpected", f"exit {code} where success was expected"
    if res.verdict == "clean" and case.check:
        problem = case.check(work, out, err)
        if problem:
            res.verdict, res.detail = "unexpected", problem
    if res.verdict in ("clean", "unexpected") and (code or 0) != 0:
        left = [p for p in case.must_not_exist if (work / p).exists()]
        left += _temporaries([work / s for s in case.scan])
        if left:
            res.verdict, res.detail = "leftover", ", ".join(left)[:300]
    return res


# ----------------------------------------------------------------------------- fixtures

def _png_folder(folder: Path, classes: tuple[str, ...] = ("a", "b"), n: int = 6, size: int = 32) -> Path:
    import numpy as np
    from PIL import Image

    for k, c in enumerate(classes):
        (folder / c).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(k)
        for i in range(n):
            Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).save(folder / c / f"{i:03d}.png")
    return folder


def _png_bomb(path: Path, width: int = 60000, height: int = 60000) -> None:
    """A ~100-byte PNG whose header declares width x height 8-bit grey pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _dicom(path: Path, **attrs) -> None:
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = attrs.pop("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    pixels = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.Modality = attrs.pop("Modality", "CT")
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


ODD_FILES: dict[str, Callable[[Path], None]] = {
    "fifo": lambda d: os.mkfifo(d / "pipe"),
    "fifo-with-suffix": lambda d: os.mkfifo(d / "pipe.png"),
    "png-declaring-60000x60000": lambda d: _png_bomb(d / "bomb.png"),
    "png-declaring-1x60000": lambda d: _png_bomb(d / "tall.png", 1, 60000),
    "dicom-nan-rescale-slope": lambda d: _dicom(d / "nan.dcm", RescaleSlope="NaN", RescaleIntercept="0"),
    "dicom-segmentation": lambda d: _dicom(d / "seg.dcm", SOPClassUID="1.2.840.10008.5.1.4.1.1.66.4",
                                           Modality="SEG"),
    "dicom-declaring-huge-rows": lambda d: _dicom(d / "rows.dcm", Rows=65535, Columns=65535),
    "empty-png": lambda d: (d / "empty.png").write_bytes(b""),
    "truncated-png": lambda d: (d / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0"),
    "text-named-dcm": lambda d: (d / "notes.dcm").write_text("not a dicom file\n"),
    "folder-named-png": lambda d: (d / "dir.png").mkdir(),
    "broken-symlink": lambda d: (d / "gone.png").symlink_to(d / "does-not-exist.png"),
    "symlink-loop": lambda d: ((d / "loop1.png").symlink_to(d / "loop2.png"),
                               (d / "loop2.png").symlink_to(d / "loop1.png")),
    "garbage-nifti": lambda d: (d / "vol.nii.gz").write_bytes(os.urandom(300)),
    "garbage-tiff": lambda d: (d / "x.tif").write_bytes(b"II*\0" + os.urandom(200)),
}


# ----------------------------------------------------------------------------- the groups

# entries an odd file makes `info` skip: a folder named like an image is walked into (it holds nothing), a loop of
# two links is two unreadable names
SKIPPED_BY = {"folder-named-png": 0, "symlink-loop": 2}


def cli_cases(fx: dict[str, Path]) -> list[Case]:
    data, run = str(fx["data"]), str(fx["run"])
    base_train = ["train", "--data", data, "--preset", "tiny", "--size", "32", "--no-progress"]
    cases: list[Case] = []
    bad_train = {
        "--lr": ["nan", "inf", "-1", "0", "abc"],
        "--max-minutes": ["nan", "inf", "-1", "0"],
        "--min-snr-gamma": ["nan", "inf", "-1"],
        "--ema-decay": ["nan", "inf", "-0.5", "1.5"],
        "--val-fraction": ["nan", "-0.1", "0.9"],
        "--size": ["100000", "0", "-8", "nan", "33"],
        "--batch-size": ["0", "-1", "1e11", "nan"],
        "--micro-batch": ["0", "-2", "nan"],
        "--epochs": ["0", "1e11", "nan"],
        "--max-steps": ["0", "-5", "1e20"],
        "--seed": ["1e20", "nan", "-1", "99999999999999999999999"],
        "--warmup-steps": ["-1", "nan"],
        "--patience": ["-1", "nan"],
        "--num-train-timesteps": ["0", "1e9", "nan"],
        "--label-depth": ["0", "nan"],
        "--val-every": ["0", "nan"],
    }
    for flag, values in bad_train.items():
        for v in values:
            stop = [] if flag in ("--max-steps", "--epochs", "--max-minutes") else ["--max-steps", "1"]
            cases.append(Case("cli", f"train {flag} {v}", base_train + stop + ["--out", "run", flag, v],
                              must_not_exist=["run"]))
    for spec in ("builtin:phantoms?n=1e12", "builtin:phantoms?n=999999999999", "builtin:phantoms?n=-1",
                 "builtin:phantoms?n=nan", "builtin:phantoms?size=100000", "builtin:phantoms?seed=1e20",
                 "builtin:nope", "builtin:phantoms?x=1", "does/not/exist"):
        cases.append(Case("cli", f"train --data {spec}", ["train", "--data", spec, "--preset", "tiny", "--out", "run",
                                                         "--max-steps", "1", "--no-progress"], must_not_exist=["run"]))
        cases.append(Case("cli", f"info {spec}", ["info", spec]))
    bad_sample = {"--n": ["0", "1e11", "nan"], "--steps": ["0", "nan", "100000"],
                  "--guidance": ["nan", "inf", "-1", "1e9"], "--seed": ["1e20", "-1", "nan"],
                  "--batch-size": ["0", "nan"], "--cache-interval": ["0", "nan"], "--per-class": ["0", "1e11"],
                  "--format": ["bmp"], "--weights": ["foo"], "--class": ["nope"], "--sampler": ["foo"],
                  "--precision": ["fp8"], "--device": ["tpu"]}
    for flag, values in bad_sample.items():
        for v in values:
            cases.append(Case("cli", f"sample {flag} {v}", ["sample", "--run", run, "--out", "smp", "--no-progress",
                                                           "--steps", "2", "--n", "1", flag, v], must_not_exist=["smp"]))
    for flag, v in (("--size", "100000"), ("--bootstrap", "0"), ("--bootstrap", "1e12"), ("--seed", "nan"),
                    ("--label-depth", "0")):
        cases.append(Case("cli", f"evaluate {flag} {v}", ["evaluate", "--real", data, "--fake", data, flag, v]))
    for flag, v in (("--minutes", "nan"), ("--minutes", "-1"), ("--minutes", "inf"), ("--per-class", "1000000"),
                    ("--guidance", "nan"), ("--max-steps", "0"), ("--seed", "1e20")):
        cases.append(Case("cli", f"demo {flag} {v}", ["demo", "--out", "demo", "--no-progress", flag, v],
                          must_not_exist=["demo"]))
    for flag, v in (("--n", "1e12"), ("--n", "-1"), ("--size", "100000"), ("--seed", "1e20")):
        cases.append(Case("cli", f"data export {flag} {v}", ["data", "export", "builtin:phantoms", "--out", "exp",
                                                             flag, v], must_not_exist=["exp"]))
    for flag, v in (("--port", "99999"), ("--port", "nan"), ("--host", "999.1.1.1"), ("--run", "no/such/run"),
                    ("--host", "0.0.0.0")):
        opts = {"--run": run, "--port": "0", "--out": "srv", flag: v}
        cases.append(Case("cli", f"serve {flag} {v}", ["serve", *[x for kv in opts.items() for x in kv]], timeout=30))
    # output paths
    def a_file(name: str) -> Callable[[Path], None]:
        return lambda w: (w / name).write_text("a user's file\n")

    for cmd, argv, out in (
        ("train", base_train + ["--max-steps", "1", "--out"], "afile"),
        ("train", base_train + ["--max-steps", "1", "--out"], "afile/sub"),
        ("train", base_train + ["--max-steps", "1", "--out"], "/proc/meddiff-cannot"),
        ("sample", ["sample", "--run", run, "--n", "1", "--steps", "2", "--no-progress", "--out"], "afile"),
        ("sample", ["sample", "--run", run, "--n", "1", "--steps", "2", "--no-progress", "--out"], "afile/sub"),
        ("audit", ["audit", "--fake", data, "--train", data, "--real", data, "--out"], "afile"),
        ("export-diffusers", ["export-diffusers", run], "afile"),
        ("data export", ["data", "export", "builtin:phantoms", "--n", "8", "--size", "32", "--out"], "afile/sub"),
        ("demo", ["demo", "--preset", "tiny", "--max-steps", "1", "--no-progress", "--out"], "afile"),
    ):
        check = _unchanged("afile", "a user's file\n")
        cases.append(Case("paths", f"{cmd} --out {out}", argv + [out], local_setup=a_file("afile"), check=check,
                          must_not_exist=[] if out == "afile" else [out]))
    return cases


def _unchanged(name: str, text: str) -> Callable[[Path, str, str], str | None]:
    def check(work: Path, _out: str, _err: str) -> str | None:
        p = work / name
        return None if p.is_file() and p.read_text() == text else f"{name} was changed or removed"
    return check


def broken_run_cases(fx: dict[str, Path]) -> list[Case]:
    good = fx["run"]

    def damaged(name: str, damage: Callable[[Path], None]) -> Callable[[Path], None]:
        def setup(work: Path) -> None:
            target = work / name
            if not target.exists():
                shutil.copytree(good, target, symlinks=True)
                damage(target)
        return setup

    def truncate(rel: str, keep: int = 100) -> Callable[[Path], None]:
        return lambda r: (r / rel).write_bytes((r / rel).read_bytes()[:keep])

    def garbage(rel: str) -> Callable[[Path], None]:
        return lambda r: (r / rel).write_bytes(os.urandom(4096))

    def edit_json(rel: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
        def go(r: Path) -> None:
            d = json.loads((r / rel).read_text())
            change(d)
            (r / rel).write_text(json.dumps(d))
        return go

    def pickle_weights(r: Path) -> None:
        import torch
        from safetensors.torch import load_file

        w = r / "unet" / "diffusion_pytorch_model.safetensors"
        torch.save(load_file(str(w)), r / "unet" / "diffusion_pytorch_model.bin")
        w.unlink()

    def newest_ckpt(r: Path) -> Path:
        return sorted((r / "checkpoints").iterdir())[-1]

    def truncate_newest(r: Path) -> None:
        w = newest_ckpt(r) / "model.safetensors"
        w.write_bytes(w.read_bytes()[:200])

    def drop_state_key(r: Path) -> None:
        s = newest_ckpt(r) / "state.json"
        d = json.loads(s.read_text())
        d.pop("images_seen", None)
        s.write_text(json.dumps(d))

    damages: dict[str, Callable[[Path], None]] = {
        "truncated-unet-weights": truncate("unet/diffusion_pytorch_model.safetensors"),
        "garbage-unet-weights": garbage("unet/diffusion_pytorch_model.safetensors"),
        "unet-config-not-json": lambda r: (r / "unet/config.json").write_text("{not json"),
        "unet-config-wrong-types": edit_json("unet/config.json", lambda d: d.update(block_out_channels="abc")),
        "unet-config-wrong-shape": edit_json("unet/config.json", lambda d: d.update(block_out_channels=[8, 16])),
        "meddiff-json-not-json": lambda r: (r / "meddiff.json").write_text("[1, 2"),
        "meddiff-json-wrong-types": edit_json("meddiff.json", lambda d: d.update(model=5)),
        "meddiff-json-class-count": edit_json("meddiff.json", lambda d: d.update(class_names=["a", "b", "c"])),
        "missing-scheduler": lambda r: shutil.rmtree(r / "scheduler"),
        "missing-unet": lambda r: shutil.rmtree(r / "unet"),
        "pickle-instead-of-safetensors": pickle_weights,
        "missing-meddiff-json": lambda r: (r / "meddiff.json").unlink(),
    }
    cases = []
    for name, damage in damages.items():
        setup = damaged(name, damage)
        cases.append(Case("runs", f"sample {name}", ["sample", "--run", name, "--out", f"{name}-smp", "--n", "1",
                                                     "--steps", "2", "--no-progress"], setup=setup,
                          must_not_exist=[f"{name}-smp"]))
        cases.append(Case("runs", f"export-diffusers {name}", ["export-diffusers", name, f"{name}-exp"], setup=setup,
                          must_not_exist=[f"{name}-exp"]))
    raw = damaged("no-checkpoint", lambda r: shutil.rmtree(r / "checkpoints"))
    cases.append(Case("runs", "sample --weights raw before any checkpoint",
                      ["sample", "--run", "no-checkpoint", "--weights", "raw", "--out", "raw-smp", "--n", "1",
                       "--steps", "2", "--no-progress"], setup=raw, must_not_exist=["raw-smp"]))
    for name, damage in (("truncated-newest-checkpoint", truncate_newest), ("state-missing-key", drop_state_key)):
        cases.append(Case("runs", f"resume with {name} (falls back to the older one)",
                          ["train", "--resume", name, "--max-steps", "8", "--no-progress"],
                          setup=damaged(name, damage), expect="ok", scan=[name]))
    left = damaged("tmp-left", lambda r: (r / ".best.tmp12345").mkdir())
    cases.append(Case("runs", "resume cleans a killed save's temporary folder",
                      ["train", "--resume", "tmp-left", "--max-steps", "8", "--no-progress"], setup=left, expect="ok",
                      check=lambda w, o, e: "the .best.tmp folder is still there" if (w / "tmp-left/.best.tmp12345").exists()
                      else None))
    return cases


def odd_file_cases(fx: dict[str, Path]) -> list[Case]:
    cases = []

    def folder_with(name: str, make: Callable[[Path], None]) -> Callable[[Path], None]:
        def setup(work: Path) -> None:
            d = work / f"data-{name}"
            if not d.exists():
                shutil.copytree(fx["data"], d)
                make(d / "a")
        return setup

    for name, make in ODD_FILES.items():
        expected = SKIPPED_BY.get(name, 1)

        def reported(_w: Path, out: str, _e: str, expected: int = expected) -> str | None:
            return None if f"skipped {expected} file" in out else f"not reported as {expected} skipped file(s)"
        cases.append(Case("files", f"info with {name}", ["info", f"data-{name}", "--size", "32"],
                          setup=folder_with(name, make), expect="ok", timeout=30, check=reported))
    def all_odd(work: Path) -> None:
        d = work / "data-all-odd"
        if not d.exists():
            shutil.copytree(fx["data"], d)
            for make in ODD_FILES.values():
                make(d / "a")

    def train_reports(work: Path, out: str, err: str) -> str | None:
        said = out + err
        n = sum(SKIPPED_BY.get(name, 1) for name in ODD_FILES)
        if f"skipped {n} of" not in said and f"skipped {n} file" not in said:
            return "train does not say how many files it skipped"
        return None
    cases.append(Case("files", "train on a folder with every odd file", ["train", "--data", "data-all-odd", "--out",
                      "run-odd", "--preset", "tiny", "--size", "32", "--max-steps", "2", "--no-progress"],
                      setup=all_odd, expect="ok", timeout=120, check=train_reports))
    return cases


def kill_cases(fx: dict[str, Path], work: Path, n: int, seed: int = 0) -> list[Outcome]:
    """Start `meddiff train` as a real process, SIGKILL it at a random moment, then check the run folder: either
    nothing (killed before it started) or a run that `sample` loads and `train --resume` continues, with no
    temporary names left after the resume."""
    import random

    rng = random.Random(seed)
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for i in range(n):
        run = work / f"killed{i}"
        argv = [sys.executable, "-m", "meddiff.cli", "train", "--data", str(fx["data"]), "--out", str(run),
                "--preset", "tiny", "--size", "32", "--max-steps", "400", "--val-every", "5",
                "--no-progress"]
        delay = rng.uniform(3.0, 12.0)
        t0 = time.time()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=work)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        verdict, detail = "clean", f"killed after {delay:.1f} s"
        if (run / "meddiff.json").exists():
            code, _o, err, _s = _run_forked(["train", "--resume", str(run), "--max-steps", "403", "--no-progress"],
                                            work, 120)
            if code is None:
                verdict = "hang"
            elif "Traceback" in err:
                verdict, detail = "traceback", err.strip().splitlines()[-1][:200]
            elif code != 0 and not err.strip().startswith("meddiff: error:"):
                verdict, detail = "unexpected", err.strip()[-200:]
            elif code == 0:
                left = _temporaries([run])
                if left:
                    verdict, detail = "leftover", ", ".join(left)[:200]
                code2, _o, err2, _s = _run_forked(["sample", "--run", str(run), "--out", str(work / f"ks{i}"),
                                                   "--n", "1", "--steps", "2", "--no-progress"], work, 120)
                if code2 != 0:
                    verdict, detail = ("traceback" if "Traceback" in err2 else "unexpected"), err2.strip()[-200:]
        results.append(Outcome("kills", f"kill -9 train #{i}", argv[3:], verdict, None, round(time.time() - t0, 1),
                               "", detail))
    return results


# ----------------------------------------------------------------------------- the web page

def _http(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
          timeout: float = 20) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Host": "127.0.0.1", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def serve_cases(fx: dict[str, Path], work: Path) -> list[Outcome]:
    """Start `meddiff serve` (forked) on a copy of the run whose README.md links to a secret file, then abuse it."""
    run = work / "served-run"
    secret = work / "secret.txt"
    secret.write_text("SECRET-PATIENT-LIST\n")
    if not run.exists():
        shutil.copytree(fx["run"], run)
    with contextlib.suppress(FileNotFoundError):
        (run / "README.md").unlink()
    (run / "README.md").symlink_to(secret)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    out_f = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        os.dup2(out_f.fileno(), 1)
        os.dup2(out_f.fileno(), 2)
        from meddiff import cli

        try:
            code = cli.main(["serve", "--run", str(run), "--port", str(port), "--out", str(work / "served")])
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code or 0)
    results: list[Outcome] = []

    def record(name: str, ok: bool, verdict_if_bad: str, detail: str = "") -> None:
        results.append(Outcome("serve", name, [], "clean" if ok else verdict_if_bad, None, 0.0, "", detail))

    for _ in range(300):  # wait for the page
        try:
            _http(port, "GET", "/", timeout=2)
            break
        except OSError:
            time.sleep(0.1)
    try:
        status, body = _http(port, "GET", "/api/info")
        record("README.md is a link to a file outside the run", b"SECRET-PATIENT-LIST" not in body, "served-outside",
               f"HTTP {status}")
        for path in ("/jobs/../../secret.txt", "/../secret.txt", "/jobs/%2e%2e/%2e%2e/secret.txt",
                     "/jobs/0123456789abcdef/image/0.png", "//etc/passwd"):
            status, body = _http(port, "GET", path)
            record(f"GET {path}", status == 404 and b"SECRET" not in body and b"root:" not in body, "served-outside",
                   f"HTTP {status}")
        deep = b"[" * 5000 + b"]" * 5000
        status, body = _http(port, "POST", "/api/jobs", deep, {"Content-Type": "application/json"})
        record("5000-deep JSON body", 400 <= status < 500, "traceback", f"HTTP {status}")
        status, _ = _http(port, "HEAD", "/")
        record("HEAD /", status in (200, 405), "unexpected", f"HTTP {status}")
        heavy = json.dumps({"class": "a", "n": 64, "sampler": "heun", "steps": 200, "guidance": 20, "seed": 0}).encode()
        status, body = _http(port, "POST", "/api/jobs", heavy, {"Content-Type": "application/json"})
        record("one request of hours of CPU (64 images x 200 Heun steps)", 400 <= status < 500, "unexpected",
               f"HTTP {status}: {body[:120]!r}")
        # a client that sends half a request must not hold a thread forever
        slow = []
        for _ in range(20):
            c = socket.create_connection(("127.0.0.1", port))
            c.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            slow.append(c)
        time.sleep(1)
        t0 = time.time()
        closed = 0
        for c in slow:
            c.settimeout(max(0.5, 45 - (time.time() - t0)))
            try:
                closed += c.recv(1024) == b"" or True
            except (TimeoutError, socket.timeout):
                pass
            except OSError:
                closed += 1
            c.close()
        record("20 clients that send half a request", closed == len(slow), "hang",
               f"{closed} of {len(slow)} closed by the server within 45 s")
        # a job can be cancelled
        small = json.dumps({"class": "a", "n": 8, "steps": 50, "seed": 0}).encode()
        status, body = _http(port, "POST", "/api/jobs", small, {"Content-Type": "application/json"})
        if status == 202:
            job = json.loads(body)["id"]
            cstatus, _ = _http(port, "DELETE", f"/api/jobs/{job}")
            time.sleep(2)
            _s, sbody = _http(port, "GET", f"/api/jobs/{job}")
            state = json.loads(sbody).get("status") if _s == 200 else f"HTTP {_s}"
            record("a job can be cancelled (DELETE /api/jobs/ID)", cstatus in (200, 202, 204)
                   and state in ("cancelled", "canceled", "HTTP 404"), "unexpected", f"DELETE {cstatus}, then {state}")
        else:
            record("a job can be cancelled (DELETE /api/jobs/ID)", False, "unexpected", f"submit HTTP {status}")
    finally:
        os.killpg(pid, signal.SIGINT)
        for _ in range(100):
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    out_f.seek(0)
    log = out_f.read().decode("utf-8", "replace")
    if "Traceback" in log:
        results.append(Outcome("serve", "server log", [], "traceback", None, 0.0, log[-400:]))
    return results


# ----------------------------------------------------------------------------- main

def build_fixtures(work: Path) -> dict[str, Path]:
    data = _png_folder(work / "data")
    run = work / "run"
    if not (run / "unet").exists():
        code, _o, err, _s = _run_forked(["train", "--data", str(data), "--out", str(run), "--preset", "tiny",
                                         "--size", "32", "--max-steps", "6", "--val-every", "3", "--no-progress",
                                         "--precision", "fp32"], work, 300)
        if code != 0:
            sys.exit(f"robustness: could not train the fixture run: {err.strip()[-500:]}")
    return {"data": data, "run": run}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="bench_out/robustness", help="scratch folder (emptied first)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "robustness.json"))
    ap.add_argument("--only", default="cli,paths,runs,files,kills,serve")
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--start", type=int, default=0, help="skip the first N cases (debugging)")
    ap.add_argument("--verbose", action="store_true", help="one line per case instead of one character")
    a = ap.parse_args()
    groups = set(a.only.split(","))
    trap = NetTrap()
    # before anything imports huggingface_hub: every hub or proxied request lands in the trap
    for var in ("HF_ENDPOINT",):
        os.environ[var] = trap.url
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        os.environ[var] = trap.url
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = ""
    os.environ.pop("HF_HUB_OFFLINE", None)
    os.environ["OMP_NUM_THREADS"] = "1"
    work = Path(a.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    import meddiff.cli  # noqa: F401  imported once, before forking

    fx = build_fixtures(work)
    cases = [c for c in cli_cases(fx) + broken_run_cases(fx) + odd_file_cases(fx) if c.group in groups]
    if a.list:
        for c in cases:
            print(f"{c.group:6} {c.name}")
        return 0
    outcomes: list[Outcome] = []
    t0 = time.time()
    for i, case in enumerate(cases):
        if i < a.start:
            continue
        cwd = work / "cases" / f"{i:03d}"
        cwd.mkdir(parents=True)
        if case.setup:  # broken copies are shared between the commands that try them
            case.setup(work)
            for p in work.iterdir():
                if p.is_dir() and p.name not in ("cases", "data", "run") and not (cwd / p.name).exists():
                    (cwd / p.name).symlink_to(p)
            case.setup = None
        outcome = judge(case, cwd, trap)
        outcomes.append(outcome)
        if a.verbose:
            print(f"[{i}] {outcome.verdict:10} {outcome.seconds:6.1f}s {case.group}/{case.name}", flush=True)
        else:
            print("." if outcome.verdict == "clean" else outcome.verdict[0].upper(), end="", flush=True)
    print()
    if "kills" in groups:
        outcomes += kill_cases(fx, work, a.kills)
    if "serve" in groups:
        outcomes += serve_cases(fx, work)
    seconds = time.time() - t0
    verdicts = ("clean", "traceback", "hang", "leftover", "network", "served-outside", "unexpected")
    table = {g: {v: sum(o.group == g and o.verdict == v for o in outcomes) for v in verdicts}
             for g in sorted({o.group for o in outcomes})}
    print(f"\n| group | tried | {' | '.join(verdicts)} |")
    print("| --- | --- |" + " --- |" * len(verdicts))
    for g, counts in table.items():
        print(f"| {g} | {sum(counts.values())} | " + " | ".join(str(counts[v]) for v in verdicts) + " |")
    total = {v: sum(t[v] for t in table.values()) for v in verdicts}
    print(f"| **all** | {sum(total.values())} | " + " | ".join(str(total[v]) for v in verdicts) + " |")
    print(f"network requests that reached the trap: {len(trap.hits)}")
    for o in outcomes:
        if o.verdict != "clean":
            print(f"  {o.verdict:10} {o.group}/{o.name}: {o.detail or o.stderr_tail.splitlines()[-1:] }")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=ROOT).stdout.strip())
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(json.dumps({
        "figure": "robustness", "command": " ".join(["python", *sys.argv]), "commit": commit, "dirty": dirty,
        "machine": platform.processor() or platform.machine(), "seconds": round(seconds, 1),
        "network_requests": trap.hits, "table": table, "cases": [asdict(o) for o in outcomes]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
