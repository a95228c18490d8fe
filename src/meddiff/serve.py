"""`meddiff serve`: a run folder → a local web page that generates images (form → JSON job → PNG previews, zip).

Standard library only (http.server; the page itself is in serve_page.py): one generation thread works through a
small queue of jobs; every file it writes lies in a server-named job folder under the output folder, and
requests only ever pick files by index.
"""
from __future__ import annotations

import ipaddress
import json
import queue
import re
import secrets
import socket
import sys
import threading
import traceback
import zipfile
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO, Callable
from urllib.parse import urlsplit

from . import export
from .atomic import write_file
from .config import SAMPLERS, SampleConfig, default_sampler, field_type, flag, options, show, web_option
from .errors import ConfigError, MeddiffError, RunError
from .modelcard import shown_card
from .runtime import pick_device, pick_precision
from .sample import LoadedRun, class_index, generate, load_run
from .serve_page import CSP, PAGE, SCRIPT

FIELDS: tuple[str, ...] = ("class", "n", "sampler", "steps", "guidance", "seed", "format")
# each field of a request is a SampleConfig option (its flag without dashes), with the web page's narrower limits
_OPTIONS = {flag(f).lstrip("-"): (f, web_option(opt)) for f, opt in options(SampleConfig)
            if flag(f).lstrip("-") in FIELDS}
LIMITS: dict[str, tuple[float, float]] = {k: (o.bounds.lo, o.bounds.hi) for k, (_f, o) in _OPTIONS.items() if o.bounds}
SERVE_FORMATS: tuple[str, ...] = _OPTIONS["format"][1].choices or ()
DEFAULTS: dict[str, Any] = {k: f.default for k, (f, _o) in _OPTIONS.items()   # + the run's sampler and steps
                            if f.default is not None}
MAX_PENDING = 8            # queued or running jobs; more is refused (HTTP 429) rather than piling up work
MAX_BODY = 16 * 1024       # bytes of a POST body
MAX_CARD = 200 * 1024      # characters of README.md shown
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
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


@dataclass(frozen=True)
class GenerateRequest:
    """One batch asked for by the page, validated: class_name is None for an unconditional model."""

    class_name: str | None
    n: int
    sampler: str
    steps: int
    guidance: float
    seed: int
    fmt: str


# --- request validation -----------------------------------------------------------------------------------

def request_defaults(preset: str) -> dict[str, Any]:
    """The form's defaults for a run of `preset`: DEFAULTS plus `config.default_sampler`'s sampler and steps."""
    sampler, steps = default_sampler(preset)
    return {**DEFAULTS, "sampler": sampler, "steps": steps}


def _field(body: dict[str, Any], key: str) -> Any:
    """One field of a request (a JSON value or the text an HTML form holds), parsed and checked like its flag."""
    f, opt = _OPTIONS[key]
    return opt.parse(key, body[key], field_type(SampleConfig, f))


def parse_request(body: Any, classes: tuple[str, ...], defaults: dict[str, Any]) -> GenerateRequest:
    """A decoded JSON body → a GenerateRequest, or ConfigError naming the field, the value and what is allowed.

    `classes`: the class names a conditional model knows; () for an unconditional model (no class allowed).
    `defaults` (`request_defaults`) fill the fields the body leaves out. Numbers may come as JSON numbers or as
    the strings an HTML form holds.
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
    return GenerateRequest(class_name=name if classes else None, n=n, sampler=_field(body, "sampler"),
                           steps=_field(body, "steps"), guidance=_field(body, "guidance"), seed=seed,
                           fmt=_field(body, "format"))


# --- jobs ---------------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One batch: its folder (server-named) and, as they are written, the files of the chosen format and the
    PNG previews the page shows. Fields change under App.lock."""

    id: str
    request: GenerateRequest
    folder: Path
    files: list[str] = field(default_factory=list)
    previews: list[Path] = field(default_factory=list)
    status: str = "queued"     # queued | running | done | error
    error: str | None = None
    zip_path: Path | None = None


class App:
    """The loaded model, the output folder and the jobs; one worker thread generates, one job at a time."""

    def __init__(self, cfg: ServeConfig, echo: Callable[[str], None] = print) -> None:
        self.cfg, self.echo = cfg, echo
        self.device = pick_device(cfg.device)
        self.precision = pick_precision(cfg.precision, self.device)
        self.run: LoadedRun = load_run(cfg.run, cfg.weights, self.device)
        self.classes: tuple[str, ...] = self.run.class_names if self.run.conditional else ()
        self.defaults = request_defaults(self.run.train.preset)
        self.card, self.card_source = shown_card(cfg.run, MAX_CARD)
        self.out = Path(cfg.out).resolve()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunError(f"--out {cfg.out}: cannot create the output folder ({err.strerror})") from None
        self.lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="meddiff-generate", daemon=True)
        self._worker.start()

    def info(self) -> dict[str, Any]:
        """What the page needs to build its form and show the model card."""
        size = self.run.model.sample_size
        kind = f"{len(self.classes)} classes" if self.classes else "unconditional"
        return {"title": f"{self.run.model_id} · {size}×{size} px · {kind}", "classes": list(self.classes),
                "samplers": list(SAMPLERS), "formats": list(SERVE_FORMATS), "defaults": self.defaults,
                "limits": {k: list(v) for k, v in LIMITS.items()}, "card": self.card, "card_source": self.card_source}

    def submit(self, body: Any) -> Job:
        """Validate a request and queue it; ConfigError (→ 400) or RunError (→ 429 busy)."""
        request = parse_request(body, self.classes, self.defaults)
        with self.lock:
            pending = sum(j.status in ("queued", "running") for j in self.jobs.values())
            if pending >= MAX_PENDING:
                raise RunError(f"the server is busy with {pending} batches; try again when one has finished")
            job_id = secrets.token_hex(8)
            folder = self.out / job_id  # the server's own name: nothing from the request reaches a path
            folder.mkdir()
            job = self.jobs[job_id] = Job(job_id, request, folder)
        self._queue.put(job)
        return job

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
                job.status = "running"
            try:
                self._generate(job)
                zip_path = self._zip(job)
                with self.lock:
                    job.zip_path, job.status = zip_path, "done"
            except Exception as err:  # the job fails, the server carries on
                message = str(err) if isinstance(err, MeddiffError) else "generation failed; see the server's log"
                if not isinstance(err, MeddiffError):
                    traceback.print_exc(file=sys.stderr)
                with self.lock:
                    job.status, job.error = "error", message

    def _generate(self, job: Job) -> None:
        """One image at a time, so that the page shows each as it finishes; image k has seed seed + k."""
        req = job.request
        label = class_index(self.run, req.class_name)
        manifest = export.Manifest(job.folder)
        for k in range(req.n):
            if self._stop.is_set():
                raise RunError("the server is shutting down")
            seed = req.seed + k
            image = generate(self.run, [seed], label, sampler=req.sampler, steps=req.steps, guidance=req.guidance,
                             precision=self.precision)[0]
            info = export.SyntheticInfo(self.run.model_id, seed, req.class_name, req.sampler, req.steps,
                                        req.guidance)
            name = export.image_filename(seed, req.fmt)
            export.write_image(image, job.folder / name, req.fmt, info)
            manifest.add(name, info, req.fmt)
            preview = job.folder / name
            if req.fmt != "png":
                preview = export.write_image(image, job.folder / "preview" / export.image_filename(seed, "png"),
                                             "png", info)
            with self.lock:
                job.files.append(name)
                job.previews.append(preview)

    def _zip(self, job: Job) -> Path:
        """The batch (files of the chosen format + manifest.csv) as one zip, written then renamed into place."""
        def write(f: BinaryIO) -> None:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for name in [*job.files, export.MANIFEST_NAME]:
                    zf.write(job.folder / name, arcname=name)

        return write_file(job.folder / "batch.zip", write)


# --- HTTP -----------------------------------------------------------------------------------------------------

class HttpError(Exception):
    """An answer other than 200 with a message for the page."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _host_name(header: str) -> str:
    """'127.0.0.1:7860' → '127.0.0.1', '[::1]:7860' → '::1'."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class _Handler(BaseHTTPRequestHandler):
    server: "Server"
    server_version = "meddiff"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(self._post)

    def _not_allowed(self) -> None:
        self._send_json({"error": f"method {self.command} is not allowed here: use GET or POST"},
                        HTTPStatus.METHOD_NOT_ALLOWED)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if isinstance(code, int) and code >= 400:  # the page polls: log only what went wrong
            super().log_request(code, size)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        self.server.app.echo(f"{self.address_string()} {format % args}")

    def _dispatch(self, route: Callable[[str], None]) -> None:
        try:
            host = _host_name(self.headers.get("Host", ""))
            # on loopback, a page on another site that resolves its name to 127.0.0.1 is refused (DNS rebinding)
            if _is_loopback(self.server.app.cfg.host) and host not in LOOPBACK_NAMES:
                raise HttpError(HTTPStatus.FORBIDDEN, f"Host {host[:60]!r} refused: open the page as http://127.0.0.1")
            route(urlsplit(self.path).path)
        except HttpError as err:
            self._send_json({"error": str(err)}, err.status)
        except MeddiffError as err:
            self._send_json({"error": str(err)}, HTTPStatus.BAD_REQUEST)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self._send_json({"error": "internal error; see the server's log"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def _job(self, job_id: str) -> Job:
        job = self.server.app.jobs.get(job_id) if _JOB_ID.fullmatch(job_id) else None
        if job is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no batch {job_id[:40]!r} on this server")
        return job

    def _get(self, path: str) -> None:
        app = self.server.app
        if path in ("/", "/index.html"):
            return self._send(PAGE.encode(), "text/html; charset=utf-8")
        if path == "/favicon.ico":  # no icon, and no error in the browser's console either
            self.send_response(HTTPStatus.NO_CONTENT)
            return self.end_headers()
        if path == "/app.js":
            return self._send(SCRIPT.encode(), "text/javascript; charset=utf-8")
        if path == "/api/info":
            return self._send_json(app.info())
        if m := re.fullmatch(r"/api/jobs/([^/]+)", path):
            return self._send_json(app.status(self._job(m[1])))
        if m := re.fullmatch(r"/jobs/([^/]+)/image/(\d{1,3})\.png", path):
            job, k = self._job(m[1]), int(m[2])
            with app.lock:
                preview = job.previews[k] if k < len(job.previews) else None
            if preview is None:
                raise HttpError(HTTPStatus.NOT_FOUND, f"image {k} of batch {job.id} is not ready")
            return self._send_file(preview, "image/png")
        if m := re.fullmatch(r"/jobs/([^/]+)/batch\.zip", path):
            job = self._job(m[1])
            if job.zip_path is None:
                raise HttpError(HTTPStatus.NOT_FOUND, f"batch {job.id} is not finished")
            return self._send_file(job.zip_path, "application/zip",
                                   {"Content-Disposition": f'attachment; filename="meddiff-{job.id}.zip"'})
        raise HttpError(HTTPStatus.NOT_FOUND, f"no page at {path[:80]!r}")

    def _post(self, path: str) -> None:
        if path != "/api/jobs":
            raise HttpError(HTTPStatus.NOT_FOUND, f"no page at {path[:80]!r}")
        # a JSON content type cannot be sent across sites without a CORS preflight, which this server never grants
        if self.headers.get_content_type() != "application/json":
            raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the parameters as application/json")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required") from None
        if not 0 <= length <= MAX_BODY:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body of {length} bytes: at most {MAX_BODY}")
        try:
            body = json.loads(self.rfile.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise HttpError(HTTPStatus.BAD_REQUEST, "request: the body is not valid JSON") from None
        try:
            job = self.server.app.submit(body)
        except RunError as err:
            raise HttpError(HTTPStatus.TOO_MANY_REQUESTS, str(err)) from None
        self._send_json({"id": job.id, "url": f"/api/jobs/{job.id}"}, HTTPStatus.ACCEPTED)

    def _send_file(self, path: Path, content_type: str, headers: dict[str, str] | None = None) -> None:
        try:
            payload = path.read_bytes()
        except FileNotFoundError:
            raise HttpError(HTTPStatus.NOT_FOUND, "this file was removed from the output folder") from None
        self._send(payload, content_type, headers)

    def _send_json(self, data: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(json.dumps(data).encode(), "application/json", status=status)

    def _send(self, payload: bytes, content_type: str, headers: dict[str, str] | None = None,
              status: HTTPStatus = HTTPStatus.OK) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)


class Server(ThreadingHTTPServer):
    """The HTTP server with its App; `url` is where the page is."""

    daemon_threads = True

    def __init__(self, app: App) -> None:
        self.app = app
        self.address_family = socket.AF_INET6 if ":" in app.cfg.host else socket.AF_INET
        try:
            super().__init__((app.cfg.host, app.cfg.port), _Handler)
        except OSError as err:
            app.close()
            raise RunError(f"--host {app.cfg.host} --port {app.cfg.port}: cannot listen there ({err.strerror}); "
                           "choose another --port") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in str(host) else host}:{port}/"

    def server_close(self) -> None:
        super().server_close()
        self.app.close()


def make_server(cfg: ServeConfig, echo: Callable[[str], None] = print) -> Server:
    """Load the run and bind (port 0: a free port); call serve_forever() on the result, then server_close()."""
    return Server(App(cfg, echo))


def serve(cfg: ServeConfig, echo: Callable[[str], None] = print) -> None:
    """Serve until Ctrl-C."""
    server = make_server(cfg, echo)
    if not _is_loopback(cfg.host):
        echo(f"warning: listening on {cfg.host}: anyone who can reach it can use the model and read its card")
    echo(f"meddiff serve: {server.url} (batches are written under {server.app.out}); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
