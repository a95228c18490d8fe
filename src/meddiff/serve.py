"""`meddiff serve`: a run folder → a local web page that generates images (form → JSON job → PNG previews, zip).

Standard library only (HTTP in serve_http.py, the page in serve_page.py): one generation thread works through a
small queue of jobs, each within a compute budget; every file it writes lies in a server-named job folder under
the output folder, only the last jobs' folders are kept, and requests only ever pick files by index.
"""
from __future__ import annotations

import queue
import re
import secrets
import shutil
import sys
import threading
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from . import export
from .atomic import check_out_dir, write_file
from .config import (COMPUTE_BUDGET, JOBS_KEPT, SAMPLERS, SampleConfig, check_value, default_sampler, field_type, flag,
                     options, show, web_option)
from .data.dataset import PAIR_FOLDERS
from .errors import ConfigError, MeddiffError, RunError
from .modelcard import shown_card
from .runtime import pick_device, pick_precision
from .sample import LoadedRun, class_index, generate, load_run, mask_file
from .serve_http import Server, is_loopback

FIELDS: tuple[str, ...] = ("class", "n", "sampler", "steps", "guidance", "seed", "format", "mask")
# each field of a request but the mask is a SampleConfig option (its flag without dashes), with the web page's
# narrower limits; the mask is a label map, run-length encoded (`decode_mask`)
_OPTIONS = {flag(f).lstrip("-"): (f, web_option(opt)) for f, opt in options(SampleConfig)
            if flag(f).lstrip("-") in FIELDS}
LIMITS: dict[str, tuple[float, float]] = {k: (o.bounds.lo, o.bounds.hi) for k, (_f, o) in _OPTIONS.items() if o.bounds}
SERVE_FORMATS: tuple[str, ...] = _OPTIONS["format"][1].choices or ()
DEFAULTS: dict[str, Any] = {k: f.default for k, (f, _o) in _OPTIONS.items()   # + the run's sampler and steps
                            if f.default is not None}
MAX_PENDING = 8            # queued or running jobs; more is refused (HTTP 429) rather than piling up work
MAX_CARD = 200 * 1024      # characters of README.md shown
QUEUE_BUDGETS = 4          # the queue holds at most this many requests' worth of compute (ServeConfig.compute_budget)
EVALS_PER_STEP = {"heun": 2}  # UNet evaluations per step (Heun's 2nd-order correction); the others take one
FINISHED = ("done", "error", "cancelled")
_JOB_ID = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class ServeConfig:
    """What `meddiff serve` needs: the run to load, the folder jobs write into, where to listen."""

    run: str
    out: str
    host: str = "127.0.0.1"
    port: int = 7860           # 0: any free port (tests)
    weights: str = "ema"
    device: str = "auto"
    precision: str = "auto"
    allow_remote: bool = False     # listen on an address other machines can reach; requests then need the token
    keep_jobs: int = 20            # the newest jobs whose folders are kept; older finished ones are deleted
    compute_budget: float = 25.0   # one request's work, in millions of pixel-evaluations (`request_cost`)

    def __post_init__(self) -> None:
        if not is_loopback(self.host) and not self.allow_remote:
            raise ConfigError(f"--host {self.host!r} lets other machines reach the server; add --allow-remote to "
                              "mean it (every request must then carry the token printed at start), or use 127.0.0.1")
        check_value("--keep-jobs", self.keep_jobs, bounds=JOBS_KEPT)
        check_value("--compute-budget", self.compute_budget, bounds=COMPUTE_BUDGET)


@dataclass(frozen=True)
class GenerateRequest:
    """One batch asked for by the page, validated: class_name is None for an unconditional model; mask is the
    label map (S, S) every image of the batch is drawn for, or None."""

    class_name: str | None
    n: int
    sampler: str
    steps: int
    guidance: float
    seed: int
    fmt: str
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)


# --- request validation -----------------------------------------------------------------------------------

def request_defaults(preset: str) -> dict[str, Any]:
    """The form's defaults for a run of `preset`: DEFAULTS plus `config.default_sampler`'s sampler and steps."""
    sampler, steps = default_sampler(preset)
    return {**DEFAULTS, "sampler": sampler, "steps": steps}


def _field(body: dict[str, Any], key: str) -> Any:
    """One field of a request (a JSON value or the text an HTML form holds), parsed and checked like its flag."""
    f, opt = _OPTIONS[key]
    return opt.parse(key, body[key], field_type(SampleConfig, f))


def decode_mask(value: Any, mask_values: tuple[int, ...], size: int) -> np.ndarray:
    """The request's "mask": a run-length encoded label map of the model's size, row by row, as one flat list
    [label, count, label, count, …] of whole numbers (label 0 is background, the others the model's label values;
    the counts add up to size × size) → (size, size) uint16, or ConfigError saying what is wrong."""
    if not mask_values:
        raise ConfigError("mask: given, but this model was not trained on label maps")
    if not isinstance(value, list) or len(value) % 2 or not value:
        raise ConfigError(f"mask: expected a list [label, count, label, count, …] covering {size}×{size} px")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError("mask: every label and count must be a whole number")
    labels, counts = np.asarray(value[0::2], np.int64), np.asarray(value[1::2], np.int64)
    if (counts < 1).any() or int(counts.sum()) != size * size:
        raise ConfigError(f"mask: the counts must be positive and add up to {size}×{size} = {size * size} px "
                          f"(they add up to {int(counts.clip(min=0).sum())})")
    unknown = sorted(set(labels.tolist()) - set(mask_values) - {0})
    if unknown:
        raise ConfigError(f"mask: label value(s) {', '.join(map(str, unknown[:5]))} this model does not know; it "
                          f"knows 0 (background) and {', '.join(map(str, mask_values))}")
    return np.repeat(labels, counts).astype(np.uint16).reshape(size, size)


def parse_request(body: Any, classes: tuple[str, ...], defaults: dict[str, Any], mask_values: tuple[int, ...] = (),
                  size: int = 0) -> GenerateRequest:
    """A decoded JSON body → a GenerateRequest, or ConfigError naming the field, the value and what is allowed.

    `classes`: the class names a conditional model knows; () for an unconditional model (no class allowed).
    `mask_values`: the label values a model trained on label maps knows (() for one that was not), `size` its
    image size: a "mask" (`decode_mask`) is allowed only then. `defaults` (`request_defaults`) fill the fields
    the body leaves out. Numbers may come as JSON numbers or as the strings an HTML form holds.
    """
    if not isinstance(body, dict):
        raise ConfigError(f"request: expected a JSON object with fields {', '.join(FIELDS)}")
    unknown = sorted(str(k) for k in body if k not in FIELDS)
    if unknown:
        raise ConfigError(f"request: unknown field(s) {', '.join(map(show, unknown))}; allowed: {', '.join(FIELDS)}")
    body = {**defaults, **body}
    name = body.get("class")
    if classes and name not in classes:
        raise ConfigError(f"class {show(name)}: not a class this model knows; choose from {', '.join(classes)}")
    if not classes and name not in (None, ""):
        raise ConfigError(f"class {show(name)}: given, but this model is unconditional (it knows no classes)")
    n, seed = _field(body, "n"), _field(body, "seed")
    if seed + n - 1 > LIMITS["seed"][1]:
        raise ConfigError(f"seed {seed}: with {n} images it runs past the largest seed {int(LIMITS['seed'][1])}")
    mask = None if body.get("mask") is None else decode_mask(body["mask"], mask_values, size)
    return GenerateRequest(class_name=name if classes else None, n=n, sampler=_field(body, "sampler"),
                           steps=_field(body, "steps"), guidance=_field(body, "guidance"), seed=seed,
                           fmt=_field(body, "format"), mask=mask)


# --- compute budget -----------------------------------------------------------------------------------------

def request_cost(req: GenerateRequest, size: int) -> int:
    """A request's work in pixel-evaluations: images × steps × UNet evaluations per step (2 for Heun) × 2 with
    classifier-free guidance (a conditional and an unconditional pass, for a class or a label map) × size² pixels."""
    guided = _guided(req)
    return req.n * req.steps * EVALS_PER_STEP.get(req.sampler, 1) * (2 if guided else 1) * size * size


def check_budget(req: GenerateRequest, size: int, budget: float) -> int:
    """request_cost, or ConfigError when it exceeds `budget` (millions of pixel-evaluations) saying how to fit."""
    cost = request_cost(req, size)
    if cost <= budget * 1e6:
        return cost
    guided = _guided(req)
    what = (f"{req.n} images × {req.steps} steps" + (" × 2 (heun)" if req.sampler in EVALS_PER_STEP else "")
            + (" × 2 (guidance)" if guided else "") + f" at {size}×{size} px")
    hints = [f"at most {n} images" for n in [int(budget * 1e6 // (cost // req.n))] if n >= 1]
    hints += [f"at most {k} steps for {req.n} images" for k in [int(budget * 1e6 // (cost // req.steps))] if k >= 1]
    hints += ["guidance 1 (half the work)"] if guided else []
    raise ConfigError(f"request: {what} is {cost / 1e6:.4g} M pixel-evaluations; one request may use at most "
                      f"{budget:g} M: use {' or '.join(hints) or 'a smaller request'}")


def _guided(req: GenerateRequest) -> bool:
    """Whether guidance doubles the work: a scale other than 1 and something to guide towards."""
    return (req.class_name is not None or req.mask is not None) and req.guidance != 1.0


# --- jobs ---------------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One batch: its folder (server-named) and, as they are written, the files of the chosen format and the
    PNG previews the page shows. Fields change under App.lock."""

    id: str
    request: GenerateRequest
    folder: Path
    cost: int = 0              # pixel-evaluations (request_cost)
    files: list[str] = field(default_factory=list)
    previews: list[Path] = field(default_factory=list)
    status: str = "queued"     # queued | running | done | error | cancelled
    error: str | None = None
    zip_path: Path | None = None


class App:
    """The loaded model, the output folder and the jobs; one worker thread generates, one job at a time.

    Off loopback, `token` is the secret every request must carry (serve_http); on loopback it is None."""

    def __init__(self, cfg: ServeConfig, echo: Callable[[str], None] = print) -> None:
        self.cfg, self.echo = cfg, echo
        check_out_dir(cfg.out, "--out")  # before the model loads: a file in the way fails at once
        self.token: str | None = None if is_loopback(cfg.host) else secrets.token_urlsafe(32)
        self.device = pick_device(cfg.device)
        self.precision = pick_precision(cfg.precision, self.device)
        self.run: LoadedRun = load_run(cfg.run, cfg.weights, self.device)
        self.classes: tuple[str, ...] = self.run.class_names if self.run.conditional else ()
        self.mask_values: tuple[int, ...] = tuple(self.run.model.mask_values) if self.run.model.cond_channels else ()
        self.defaults = request_defaults(self.run.train.preset)
        self.card, self.card_source = shown_card(cfg.run, MAX_CARD)
        self.out = Path(cfg.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.jobs: dict[str, Job] = {}   # in submission order: the oldest are pruned first
        self._current: Job | None = None
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="meddiff-generate", daemon=True)
        self._worker.start()

    def info(self) -> dict[str, Any]:
        """What the page needs to build its form and show the model card."""
        size = self.run.model.image_size
        kind = f"{len(self.classes)} classes" if self.classes else "unconditional"
        kind += f" · label maps {', '.join(map(str, self.mask_values))}" if self.mask_values else ""
        return {"title": f"{self.run.model_id} · {size}×{size} px · {kind}", "classes": list(self.classes),
                "size": size, "mask_values": list(self.mask_values),
                "samplers": list(SAMPLERS), "formats": list(SERVE_FORMATS), "defaults": self.defaults,
                "limits": {k: list(v) for k, v in LIMITS.items()}, "compute_budget": self.cfg.compute_budget,
                "card": self.card, "card_source": self.card_source}

    def job(self, job_id: str) -> Job | None:
        """The job of that id, if this server still knows it."""
        with self.lock:
            return self.jobs.get(job_id) if _JOB_ID.fullmatch(job_id) else None

    def submit(self, body: Any) -> Job:
        """Validate a request and queue it; ConfigError (→ 400) or RunError (→ 429 busy)."""
        request = parse_request(body, self.classes, self.defaults, self.mask_values, self.run.model.image_size)
        cost = check_budget(request, self.run.model.image_size, self.cfg.compute_budget)
        with self.lock:
            pending = [j for j in self.jobs.values() if j.status in ("queued", "running")]
            if len(pending) >= MAX_PENDING:
                raise RunError(f"the server is busy with {len(pending)} batches; try again when one has finished")
            queued = sum(j.cost * (j.request.n - len(j.previews)) // j.request.n for j in pending)
            if queued + cost > QUEUE_BUDGETS * self.cfg.compute_budget * 1e6:
                raise RunError(f"the server is busy: {queued / 1e6:.4g} M pixel-evaluations are queued and this "
                               f"batch needs {cost / 1e6:.4g} M (at most {QUEUE_BUDGETS * self.cfg.compute_budget:g} M "
                               "in all); try again when a batch has finished")
            job_id = secrets.token_hex(8)
            folder = self.out / job_id  # the server's own name: nothing from the request reaches a path
            folder.mkdir()
            job = self.jobs[job_id] = Job(job_id, request, folder, cost)
        self._queue.put(job)
        return job

    def cancel(self, job: Job) -> str:
        """Stop a queued job before it starts, a running one after its current image ("cancelled"); forget a
        finished one and delete its folder ("deleted")."""
        with self.lock:
            if job.status in ("queued", "running"):
                job.status = "cancelled"
                return "cancelled"
            forget = job is not self._current and self.jobs.pop(job.id, None) is not None
        if forget:
            self._remove(job.folder)
        return "deleted" if forget else job.status

    def status(self, job: Job) -> dict[str, Any]:
        with self.lock:
            done = len(job.previews)
            return {"id": job.id, "status": job.status, "total": job.request.n, "done": done, "error": job.error,
                    "images": [f"/jobs/{job.id}/image/{k}.png" for k in range(done)],
                    "seeds": [job.request.seed + k for k in range(done)],
                    "zip": f"/jobs/{job.id}/batch.zip" if job.zip_path else None}

    def close(self) -> None:
        """Stop the worker after the image it is making."""
        self._stop.set()
        self._queue.put(None)
        self._worker.join(timeout=60)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None and not self._stop.is_set():
            with self.lock:
                if job.status != "queued":  # cancelled while it waited
                    continue
                job.status, self._current = "running", job
            try:
                zip_path = self._zip(job) if self._generate(job) else None
                with self.lock:
                    if job.status == "running":
                        job.zip_path, job.status = zip_path, "done"
            except Exception as err:  # the job fails, the server carries on
                message = str(err) if isinstance(err, MeddiffError) else "generation failed; see the server's log"
                if not isinstance(err, MeddiffError):
                    traceback.print_exc(file=sys.stderr)
                with self.lock:
                    if job.status == "running":
                        job.status, job.error = "error", message
            finally:
                with self.lock:
                    self._current = None
                self._prune()

    def _prune(self) -> None:
        """Forget finished jobs older than the newest `keep_jobs` and delete their folders."""
        with self.lock:
            old = list(self.jobs.values())[:-self.cfg.keep_jobs]
            gone = [j for j in old if j.status in FINISHED and j is not self._current]
            for job in gone:
                del self.jobs[job.id]
        for job in gone:
            self._remove(job.folder)

    def _remove(self, folder: Path) -> None:
        """Delete a job folder: only a real folder with a server-made name directly inside the output folder."""
        if folder.parent != self.out or not _JOB_ID.fullmatch(folder.name) or folder.is_symlink():
            self.echo(f"warning: {folder} was left in place: not a job folder of this server")
            return
        try:
            shutil.rmtree(folder)
        except OSError as err:
            self.echo(f"warning: could not delete {folder} ({err.strerror or err})")

    def _generate(self, job: Job) -> bool:
        """One image at a time, so that the page shows each as it finishes; image k has seed seed + k. With a
        label map, images/<name> and its map masks/<name> (the same map for every image of the batch), as
        `meddiff sample --masks` writes pairs. False when the job was cancelled before its last image."""
        req = job.request
        label = class_index(self.run, req.class_name)
        manifest = export.Manifest(job.folder)
        for k in range(req.n):
            if self._stop.is_set():
                raise RunError("the server is shutting down")
            if job.status != "running":
                return False
            seed = req.seed + k
            image = generate(self.run, [seed], label, sampler=req.sampler, steps=req.steps, guidance=req.guidance,
                             precision=self.precision, masks=None if req.mask is None else req.mask[None])[0]
            name = export.image_filename(seed, req.fmt)
            if req.mask is not None:
                name = f"{PAIR_FOLDERS[0]}/{name}"
            mask = None if req.mask is None else mask_file(name.removesuffix(export.SUFFIX[req.fmt]), req.fmt)
            info = export.SyntheticInfo(self.run.model_id, seed, req.class_name, req.sampler, req.steps,
                                        req.guidance, mask)
            export.write_image(image, job.folder / name, req.fmt, info)
            written = [name]
            if mask is not None:
                export.write_label_map(req.mask, job.folder / mask, req.fmt, info, image=job.folder / name,
                                       names=self.run.mask_names)
                written.append(mask)
            manifest.add(name, info, req.fmt)
            preview = job.folder / name
            if req.fmt != "png":
                preview = export.write_image(image, job.folder / "preview" / export.image_filename(seed, "png"),
                                             "png", info)
            with self.lock:
                job.files.extend(written)
                job.previews.append(preview)
        return True

    def _zip(self, job: Job) -> Path:
        """The batch (files of the chosen format + manifest.csv) as one zip, written then renamed into place."""
        def write(f: BinaryIO) -> None:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for name in [*job.files, export.MANIFEST_NAME]:
                    zf.write(job.folder / name, arcname=name)

        return write_file(job.folder / "batch.zip", write)


# --- serving ---------------------------------------------------------------------------------------------------

def make_server(cfg: ServeConfig, echo: Callable[[str], None] = print) -> Server:
    """Load the run and bind (port 0: a free port); call serve_forever() on the result, then server_close()."""
    return Server(App(cfg, echo))


def serve(cfg: ServeConfig, echo: Callable[[str], None] = print) -> None:
    """Serve until Ctrl-C."""
    server = make_server(cfg, echo)
    url = server.url
    if server.app.token is not None:
        url += f"?token={server.app.token}"
        echo(f"listening on {cfg.host}: other machines can reach the server; every request must carry the token in "
             "this link (once opened, the browser keeps it in a cookie) or 'Authorization: Bearer TOKEN'")
    echo(f"meddiff serve: {url} (batches are written under {server.app.out}); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
