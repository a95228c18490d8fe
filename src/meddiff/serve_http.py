"""HTTP for `meddiff serve`: routes → the App in serve.py, and what keeps a hostile client in check.

Owns the request handler (GET/HEAD/POST/DELETE, JSON errors, the Host check on loopback, the token off loopback),
the threaded server (a cap on connections, a deadline for each request). Files are sent through
`confined.read_inside`: a regular file inside the output folder, reached without a symbolic link.
"""
from __future__ import annotations

import io
import ipaddress
import json
import re
import secrets
import socket
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qs, urlsplit

from .confined import read_inside
from .errors import MeddiffError, RunError
from .serve_page import CSP, PAGE, SCRIPT

if TYPE_CHECKING:
    from .serve import App, Job

MAX_BODY = 256 * 1024      # bytes of a POST body: the fields and a run-length encoded label map
MAX_DEPTH = 32             # nesting of a JSON body: deeper is refused before parsing (json recurses per level)
MAX_CONNECTIONS = 32       # connections handled at once; more are answered 503 at once, with no thread
READ_TIMEOUT = 15.0        # seconds a client may stay silent while sending its request
REQUEST_SECONDS = 30.0     # seconds a client has to send its whole request (request line, headers, body)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
TOKEN_COOKIE = "meddiff_token"
ALLOW = "GET, HEAD, POST, DELETE"


def is_loopback(host: str) -> bool:
    """True for an address of this machine only (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def json_depth_exceeds(text: str, limit: int = MAX_DEPTH) -> bool:
    """True when brackets outside strings nest deeper than `limit` (checked before json.loads recurses)."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


class HttpError(Exception):
    """An answer other than 200 with a message for the page."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _host_name(header: str) -> str:
    """'127.0.0.1:7860' → '127.0.0.1', '[::1]:7860' → '::1'."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def _same(given: str | None, token: str) -> bool:
    return given is not None and secrets.compare_digest(given.encode("utf-8", "replace"), token.encode())


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


class _ClientBytes(io.RawIOBase):
    """The client's side of a connection: each read waits at most `timeout` s, and all of them end by `deadline`
    (a client that sends one byte every few seconds cannot hold its thread for ever)."""

    def __init__(self, sock: socket.socket, timeout: float, deadline: float) -> None:
        self.sock, self.timeout, self.deadline = sock, timeout, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client took too long to send its request")
        self.sock.settimeout(min(self.timeout, left))
        return self.sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    server: "Server"
    server_version = "meddiff"
    sys_version = ""
    timeout = READ_TIMEOUT  # StreamRequestHandler sets it on the socket; _ClientBytes applies it to every read

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the plain reader, replaced by one with a deadline
        deadline = time.monotonic() + REQUEST_SECONDS
        self.rfile = io.BufferedReader(_ClientBytes(self.connection, self.timeout, deadline))

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch(self._get)

    do_HEAD = do_GET  # noqa: N815 (the same answer; _send leaves out the body)

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(self._post)

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch(self._delete)

    def _not_allowed(self) -> None:
        self._send_json({"error": f"method {self.command} is not allowed here: use {ALLOW}"},
                        HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": ALLOW})

    do_PUT = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if isinstance(code, int) and code >= 400:  # the page polls: log only what went wrong
            super().log_request(code, size)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        self.server.app.echo(f"{self.address_string()} {format % args}")

    def _dispatch(self, route: Callable[[str], None]) -> None:
        try:
            url = urlsplit(self.path)
            if not self._check_origin(url.path, url.query):
                route(url.path)
        except HttpError as err:
            self._send_json({"error": str(err)}, err.status)
        except MeddiffError as err:
            self._send_json({"error": str(err)}, HTTPStatus.BAD_REQUEST)
        except (TimeoutError, ConnectionError):  # a slow or vanished client: drop the connection
            self.close_connection = True
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self._send_json({"error": "internal error; see the server's log"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def _check_origin(self, path: str, query: str) -> bool:
        """On loopback, the Host header must name loopback; off loopback, the request must carry the token.
        True when this has answered the request already (the printed link's redirect)."""
        app = self.server.app
        host = _host_name(self.headers.get("Host", ""))
        # on loopback, a page on another site that resolves its name to 127.0.0.1 is refused (DNS rebinding)
        if is_loopback(app.cfg.host) and host not in LOOPBACK_NAMES:
            raise HttpError(HTTPStatus.FORBIDDEN, f"Host {host[:60]!r} refused: open the page as http://127.0.0.1")
        if app.token is None:
            return False
        scheme, _, bearer = self.headers.get("Authorization", "").partition(" ")
        if _same(_cookie(self.headers.get("Cookie", ""), TOKEN_COOKIE), app.token) or (
                scheme.lower() == "bearer" and _same(bearer.strip(), app.token)):
            return False
        given = parse_qs(query).get("token", [None])[-1]
        if path in ("/", "/index.html") and self.command in ("GET", "HEAD") and _same(given, app.token):
            # the printed link: keep the token in a cookie the page's script cannot read, and drop it from the URL
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Location", "/")
            self.send_header("Set-Cookie", f"{TOKEN_COOKIE}={app.token}; HttpOnly; SameSite=Strict; Path=/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True
        raise HttpError(HTTPStatus.UNAUTHORIZED, "this server needs its token: open the link it printed at start "
                                                 "(…/?token=…), or send 'Authorization: Bearer TOKEN'")

    def _job(self, job_id: str) -> "Job":
        job = self.server.app.job(job_id)
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
            text = self.rfile.read(length).decode("utf-8")
            if json_depth_exceeds(text):
                raise HttpError(HTTPStatus.BAD_REQUEST, f"request: the JSON nests more than {MAX_DEPTH} levels deep; "
                                                        "send one flat object of fields")
            body = json.loads(text)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise HttpError(HTTPStatus.BAD_REQUEST, "request: the body is not valid JSON") from None
        try:
            job = self.server.app.submit(body)
        except RunError as err:
            raise HttpError(HTTPStatus.TOO_MANY_REQUESTS, str(err)) from None
        self._send_json({"id": job.id, "url": f"/api/jobs/{job.id}"}, HTTPStatus.ACCEPTED)

    def _delete(self, path: str) -> None:
        m = re.fullmatch(r"/api/jobs/([^/]+)", path)
        if not m:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no batch at {path[:80]!r}")
        job = self._job(m[1])
        status = self.server.app.cancel(job)
        self._send_json({"id": job.id, "status": status},
                        HTTPStatus.ACCEPTED if status == "cancelled" else HTTPStatus.OK)

    def _send_file(self, path: Path, content_type: str, headers: dict[str, str] | None = None) -> None:
        try:
            payload = read_inside(self.server.app.out, path.relative_to(self.server.app.out))
        except ValueError:
            payload = None
        if payload is None:
            raise HttpError(HTTPStatus.NOT_FOUND, "this file is no longer in the output folder")
        self._send(payload, content_type, headers)

    def _send_json(self, data: Any, status: HTTPStatus = HTTPStatus.OK, headers: dict[str, str] | None = None) -> None:
        self._send(json.dumps(data).encode(), "application/json", headers, status)

    def _send(self, payload: bytes, content_type: str, headers: dict[str, str] | None = None,
              status: HTTPStatus = HTTPStatus.OK) -> None:
        self.connection.settimeout(self.timeout)  # the request's deadline is over: writing has its own timeout
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


class Server(ThreadingHTTPServer):
    """The HTTP server with its App; `url` is where the page is. At most MAX_CONNECTIONS connections get a
    thread; the rest are answered 503 at once."""

    daemon_threads = True
    request_queue_size = 128  # connections the kernel holds until accepted (socketserver's 5 drops a burst's SYNs)

    def __init__(self, app: "App") -> None:
        self.app = app
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.address_family = socket.AF_INET6 if ":" in app.cfg.host else socket.AF_INET
        try:
            super().__init__((app.cfg.host, app.cfg.port), _Handler)
        except socket.gaierror as err:
            app.close()
            raise RunError(f"--host {app.cfg.host}: not an address this machine can listen on ({err.strerror})") from None
        except OSError as err:
            app.close()
            raise RunError(f"--host {app.cfg.host} --port {app.cfg.port}: cannot listen there "
                           f"({err.strerror or err}); choose another --port") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in str(host) else host}:{port}/"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            return self._refuse(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        body = json.dumps({"error": f"the server is busy with {MAX_CONNECTIONS} connections; try again"}).encode()
        head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 5\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(0.0)  # never wait on this client: the accept loop must go on
            request.sendall(head + body)
            request.recv(MAX_BODY)   # what has arrived, so that closing does not reset the connection
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, OSError):  # a client that vanished or stalled: one line, no traceback
            self.app.echo(f"{client_address[0]} connection dropped ({type(err).__name__})")
        else:
            super().handle_error(request, client_address)

    def server_close(self) -> None:
        super().server_close()
        self.app.close()
