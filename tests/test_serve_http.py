"""Tests for meddiff.serve_http under abuse: files behind symbolic links, deep JSON, slow and half-sent requests,
too many connections, HEAD and other methods, and the token a server off loopback requires."""
from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from meddiff import serve_http
from meddiff.modelcard import shown_card
from meddiff.serve_http import json_depth_exceeds
from test_serve import _call, _finish, _serving

SECRET = "root:x:0:0:the secret outside the run"


@pytest.fixture(scope="module")
def server(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[serve_http.Server]:
    with _serving(trained_run, tmp_path_factory.mktemp("served")) as srv:
        yield srv


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file the server user can read that is no part of any run or batch."""
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_text(SECRET)
    return path


@pytest.fixture
def linked_run(trained_run: Path, tmp_path: Path, outside: Path) -> Path:
    """A copy of the trained run whose README.md is a symbolic link to a file outside it."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "README.md").unlink(missing_ok=True)
    (run / "README.md").symlink_to(outside)
    return run


def test_info_never_shows_a_card_behind_a_link(linked_run: Path, tmp_path: Path) -> None:
    with _serving(linked_run, tmp_path / "out") as srv:
        status, _, data = _call(srv, "GET", "/api/info")
    info = json.loads(data)
    assert status == 200 and info["card_source"] == "meddiff.json" and SECRET not in info["card"]
    (linked_run / "README.md").unlink()  # the card built from the record, as for a run without README.md
    assert info["card"] == shown_card(linked_run, 10**6)[0] and "synthetic" in info["card"]


def test_files_behind_links_in_the_output_folder_are_not_served(trained_run: Path, tmp_path: Path,
                                                                outside: Path) -> None:
    with _serving(trained_run, tmp_path / "out") as srv:
        state = _finish(srv, {"class": "a", "n": 2, "steps": 1})
        folder = srv.app.out / state["id"]
        assert _call(srv, "GET", state["images"][0])[0] == 200
        (folder / "seed000000.png").unlink()
        (folder / "seed000000.png").symlink_to(outside)
        (folder / "batch.zip").unlink()
        (folder / "batch.zip").symlink_to(outside)
        for url in (state["images"][0], state["zip"]):
            status, _, data = _call(srv, "GET", url)
            assert status == 404 and SECRET.encode() not in data, url
        decoy = tmp_path / "decoy"  # the whole job folder swapped for a link to a folder with the same names
        shutil.copytree(folder, decoy, symlinks=False)
        shutil.rmtree(folder)
        folder.symlink_to(decoy, target_is_directory=True)
        status, _, data = _call(srv, "GET", state["images"][1])
        assert status == 404 and "no longer in the output folder" in json.loads(data)["error"]


def test_json_depth_is_counted_outside_strings() -> None:
    assert not json_depth_exceeds('{"class": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"[["}', limit=2)
    assert not json_depth_exceeds("[" * 32 + "]" * 32) and json_depth_exceeds("[" * 33 + "]" * 33)
    assert json_depth_exceeds('{"a": ' * 40 + "1" + "}" * 40)


@pytest.mark.parametrize("body", [b"[" * 5000 + b"]" * 5000, b'{"n": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}",
                                  b"[" * 5000])
def test_deeply_nested_json_gets_400(server: serve_http.Server, body: bytes) -> None:
    status, _, data = _call(server, "POST", "/api/jobs", body, {"Content-Type": "application/json"})
    assert status == 400 and "nests more than 32 levels" in json.loads(data)["error"]


def test_deep_json_under_the_limit_is_still_validated(server: serve_http.Server) -> None:
    body = json.dumps({"class": "a", "n": [[[[1]]]]}).encode()
    status, _, data = _call(server, "POST", "/api/jobs", body, {"Content-Type": "application/json"})
    assert status == 400 and "n [[[[1]]]]: must be a whole number from 1 to 64" in json.loads(data)["error"]


def test_head_answers_like_get_without_a_body(server: serve_http.Server) -> None:
    for path in ("/", "/app.js", "/api/info"):
        get_status, get_headers, get_body = _call(server, "GET", path)
        status, headers, body = _call(server, "HEAD", path)
        assert (status, body) == (200, b"") and get_status == 200, path
        assert headers["Content-Type"] == get_headers["Content-Type"] and int(headers["Content-Length"]) == len(get_body)
    assert _call(server, "HEAD", "/nothing")[0] == 404
    status, headers, data = _call(server, "PUT", "/api/jobs", b"{}")
    assert status == 405 and headers["Allow"] == "GET, HEAD, POST, DELETE" and "not allowed" in json.loads(data)["error"]


def _half_request(port: int) -> socket.socket:
    """A connection that sends the start of a request and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def quick_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_http._Handler, "timeout", 0.5)
    monkeypatch.setattr(serve_http, "REQUEST_SECONDS", 1.5)


def test_slow_clients_are_dropped(trained_run: Path, tmp_path: Path, quick_timeouts: None) -> None:
    with _serving(trained_run, tmp_path / "out") as srv:
        port = srv.server_address[1]
        silent = _half_request(port)
        start = time.monotonic()
        assert _closed_by_server(silent)  # silent for the read timeout
        dripping = _half_request(port)  # one header byte every 0.2 s: never silent, but past the deadline
        closed = False
        for _ in range(100):
            try:
                dripping.sendall(b"X")
            except OSError:
                closed = True
                break
            time.sleep(0.2)
            dripping.setblocking(False)
            try:
                closed = dripping.recv(1) == b""
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed = True
            dripping.setblocking(True)
            if closed:
                break
        assert closed and time.monotonic() - start < 15
        silent.close()
        dripping.close()
        assert _call(srv, "GET", "/api/info")[0] == 200


def _handler_threads() -> int:
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def test_half_requests_cannot_take_every_thread(trained_run: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_http, "MAX_CONNECTIONS", 4)
    with _serving(trained_run, tmp_path / "out") as srv:
        port = srv.server_address[1]
        before = _handler_threads()
        held = [_half_request(port) for _ in range(40)]
        time.sleep(0.5)
        assert _handler_threads() - before <= 4
        answered = 0  # the 36 over the cap were answered 503 (or closed) at once, without a thread
        for sock in held[4:]:
            sock.settimeout(5)
            data = b""
            try:
                while chunk := sock.recv(4096):
                    data += chunk
            except ConnectionResetError:
                pass
            assert data == b"" or data.startswith(b"HTTP/1.0 503"), data[:80]
            answered += data.startswith(b"HTTP/1.0 503")
        assert answered >= 1
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/api/info")
            assert conn.getresponse().status == 503
        except ConnectionError:
            pass  # closed before the answer was read: refused all the same, and at once
        finally:
            conn.close()
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 30
        while _call(srv, "GET", "/api/info")[0] != 200:  # the slots come back when the clients go
            assert time.monotonic() < deadline
            time.sleep(0.05)


@pytest.fixture
def remote(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[serve_http.Server]:
    """The server listening on every address (0.0.0.0) with --allow-remote: requests need its token."""
    with _serving(trained_run, tmp_path_factory.mktemp("remote"), host="0.0.0.0", allow_remote=True) as srv:
        yield srv


def _remote(srv: serve_http.Server, method: str, path: str, headers: dict[str, str] | None = None,
            body: Any = None) -> tuple[int, dict[str, str], bytes]:
    return _call(srv, method, path, body, {"Host": "meddiff.example:7860", **(headers or {})})


def test_off_loopback_every_request_needs_the_token(remote: serve_http.Server) -> None:
    token = remote.app.token
    assert token and len(token) >= 40
    for method, path in [("GET", "/"), ("GET", "/app.js"), ("GET", "/api/info"), ("HEAD", "/"),
                         ("GET", f"/api/info?token={token}"), ("DELETE", "/api/jobs/0123456789abcdef")]:
        status, _, data = _remote(remote, method, path)
        assert status == 401, (method, path)
        assert method == "HEAD" or "needs its token" in json.loads(data)["error"]
    status, _, _ = _remote(remote, "POST", "/api/jobs", body={"class": "a", "n": 1, "steps": 1})
    assert status == 401
    for wrong in ("Bearer nope", f"Bearer {token[:-1]}", f"Basic {token}", token):
        assert _remote(remote, "GET", "/api/info", {"Authorization": wrong})[0] == 401, wrong
    assert _remote(remote, "GET", "/api/info", {"Cookie": "meddiff_token=nope"})[0] == 401
    assert _remote(remote, "GET", "/?token=nope")[0] == 401


def test_the_printed_link_sets_a_cookie_that_opens_everything(remote: serve_http.Server) -> None:
    token = remote.app.token
    status, headers, body = _remote(remote, "GET", f"/?token={token}")
    assert status == 303 and headers["Location"] == "/" and body == b""
    cookie = headers["Set-Cookie"]
    assert cookie.startswith(f"meddiff_token={token};") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    jar = {"Cookie": f"other=1; meddiff_token={token}"}
    status, _, page = _remote(remote, "GET", "/", jar)
    assert status == 200 and b'id="generate"' in page
    assert json.loads(_remote(remote, "GET", "/api/info", jar)[2])["classes"] == ["a", "b"]
    bearer = {"Authorization": f"Bearer {token}"}
    status, _, data = _remote(remote, "POST", "/api/jobs", bearer, {"class": "a", "n": 1, "steps": 1})
    assert status == 202
    assert _remote(remote, "GET", json.loads(data)["url"], bearer)[0] == 200
