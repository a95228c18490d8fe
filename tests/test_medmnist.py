"""Tests for meddiff.data.medmnist: downloads from a local HTTP server on 127.0.0.1 (checksum, retry, refusal,
resume), named labels, class folders, and the `medmnist:PATH.npz` data spec."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from meddiff.cli import main as cli_main
from meddiff.data import medmnist as M
from meddiff.data.dataset import load_data
from meddiff.errors import ConfigError, DataError

FILE = "pneumoniamnist_64.npz"


def make_npz(path: Path | None = None, n: tuple[int, int, int] = (6, 2, 2), size: int = 16,
             labels: np.ndarray | None = None) -> bytes:
    """A small file in the MedMNIST layout: {train,val,test}_images (N, S, S) uint8, *_labels (N, 1) uint8."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % 2).astype(np.uint8)[:, None]
    if labels is not None:
        arrays["train_labels"] = labels
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    if path is not None:
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


class _Server:
    """State of the test server: what to serve and how to misbehave; every request's Range header is kept."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.corrupt_first = 0      # this many responses carry flipped bytes (-1: all)
        self.truncate_first = 0     # this many responses stop half-way (Content-Length still says the full size)
        self.honour_range = True
        self.status = 200
        self.ranges: list[str | None] = []
        self.url = ""


def _handler(state: _Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            state.ranges.append(self.headers.get("Range"))
            k = len(state.ranges)
            if state.status != 200 or not self.path.endswith(FILE):
                self.send_error(state.status if state.status != 200 else 404)
                return
            body = state.payload
            if state.corrupt_first < 0 or k <= state.corrupt_first:
                body = bytes(b ^ 0xFF for b in body[:64]) + body[64:]
            start = 0
            rng = self.headers.get("Range")
            if rng and state.honour_range:
                start = int(rng.removeprefix("bytes=").rstrip("-"))
            part = body[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(part)))
            self.end_headers()
            if k <= state.truncate_first:
                part = part[:len(part) // 2]
                self.close_connection = True
            self.wfile.write(part)

    return Handler


@pytest.fixture
def server() -> Iterator[_Server]:
    state = _Server(make_npz())
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/files"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _fetch(server: _Server, out: Path, **kw: object) -> Path:
    md5 = hashlib.md5(server.payload).hexdigest()
    return M.fetch("pneumoniamnist", 64, out, url_base=server.url, md5=md5, timeout=5, backoff=0, **kw)


# ---------------------------------------------------------------- catalogue

def test_catalogue_names_files_and_checksums_as_medmnist_does() -> None:
    for flag in ("pneumoniamnist", "chestmnist", "breastmnist", "organamnist", "organcmnist", "organsmnist"):
        entry = M.lookup(flag)
        assert set(entry.md5) == set(M.SIZES)
        assert all(len(v) == 32 and int(v, 16) >= 0 for v in entry.md5.values())
    assert M.lookup("PneumoniaMNIST").filename(64) == "pneumoniamnist_64.npz"
    assert M.lookup("breastmnist").filename(28) == "breastmnist.npz"
    assert M.url_for(M.lookup("chestmnist"), 224) == \
        "https://zenodo.org/records/10519652/files/chestmnist_224.npz?download=1"
    assert M.url_for(M.lookup("chestmnist"), 128, "http://mirror/x/") == "http://mirror/x/chestmnist_128.npz"
    assert M.lookup("breastmnist").labels == ("malignant", "normal-or-benign")
    assert M.lookup("organsmnist").labels[6] == "liver"


def test_unknown_set_or_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'dermamnist': not in the MedMNIST\+ catalogue; choose from pneumon"):
        M.fetch("dermamnist", 64, tmp_path)
    with pytest.raises(ConfigError, match=r"--size 32: MedMNIST\+ files exist at 28, 64, 128, 224 px"):
        M.fetch("pneumoniamnist", 32, tmp_path)


# ---------------------------------------------------------------- download

def test_fetch_verifies_the_checksum_and_keeps_a_verified_file(server: _Server, tmp_path: Path) -> None:
    path = _fetch(server, tmp_path)
    assert path == tmp_path / FILE and path.read_bytes() == server.payload
    assert not (tmp_path / f"{FILE}.part").exists()
    _fetch(server, tmp_path)
    assert len(server.ranges) == 1  # the verified file was kept, not downloaded again
    path.write_bytes(b"damaged")
    assert _fetch(server, tmp_path).read_bytes() == server.payload and len(server.ranges) == 2


def test_a_corrupted_download_is_detected_and_retried(server: _Server, tmp_path: Path) -> None:
    server.corrupt_first = 1
    messages: list[str] = []
    path = _fetch(server, tmp_path, echo=messages.append)
    assert path.read_bytes() == server.payload
    assert server.ranges == [None, None]  # the corrupt bytes were discarded, never resumed
    assert len(messages) == 1 and "differs from the expected" in messages[0]


def test_an_always_corrupt_download_is_refused(server: _Server, tmp_path: Path) -> None:
    server.corrupt_first = -1
    with pytest.raises(DataError, match=r"download refused after 3 attempt\(s\): MD5 [0-9a-f]{32} differs from "
                                        r"the expected [0-9a-f]{32}\. No file was kept"):
        _fetch(server, tmp_path)
    assert len(server.ranges) == 3
    assert list(tmp_path.iterdir()) == []


def test_a_partial_file_is_resumed_with_a_range_request(server: _Server, tmp_path: Path) -> None:
    half = len(server.payload) // 2
    (tmp_path / f"{FILE}.part").write_bytes(server.payload[:half])
    path = _fetch(server, tmp_path)
    assert server.ranges == [f"bytes={half}-"]
    assert path.read_bytes() == server.payload


def test_a_dropped_connection_is_resumed_where_it_stopped(server: _Server, tmp_path: Path) -> None:
    server.truncate_first = 1
    path = _fetch(server, tmp_path)
    assert server.ranges == [None, f"bytes={len(server.payload) // 2}-"]
    assert path.read_bytes() == server.payload


def test_a_server_ignoring_range_restarts_the_file(server: _Server, tmp_path: Path) -> None:
    server.honour_range = False
    (tmp_path / f"{FILE}.part").write_bytes(b"x" * 100)
    assert _fetch(server, tmp_path).read_bytes() == server.payload


def test_a_missing_file_is_refused_without_retrying(server: _Server, tmp_path: Path) -> None:
    server.status = 404
    with pytest.raises(DataError, match=r"pneumoniamnist_64\.npz: HTTP 404 .*check the data set name"):
        _fetch(server, tmp_path)
    assert len(server.ranges) == 1


# ---------------------------------------------------------------- reading and class folders

def test_load_npz_names_labels_from_the_catalogue(tmp_path: Path) -> None:
    make_npz(tmp_path / FILE)
    images, labels, names = M.load_npz(tmp_path / FILE)
    assert images.dtype == np.uint8 and images.shape == (6, 16, 16)
    assert names == ("normal", "pneumonia") and labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert len(M.load_npz(tmp_path / FILE, "all")[0]) == 10
    make_npz(tmp_path / "mine.npz")
    assert M.load_npz(tmp_path / "mine.npz")[2] == ("class-0", "class-1")


def test_multi_label_rows_fold_into_one_named_class(tmp_path: Path) -> None:
    rows = np.zeros((6, 14), np.uint8)
    rows[1, 2] = 1                  # effusion only
    rows[2, [0, 5]] = 1             # two findings
    rows[3, 13] = 1                 # hernia only
    make_npz(tmp_path / "chestmnist_64.npz", labels=rows)
    _images, labels, names = M.load_npz(tmp_path / "chestmnist_64.npz")
    assert [names[k] for k in labels] == ["no-finding", "effusion", "multiple", "hernia", "no-finding",
                                          "no-finding"]


def test_colour_images_become_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((2, 4, 4, 3), np.uint8)
    rgb[..., 1] = 200
    np.savez(tmp_path / "x.npz", train_images=rgb, train_labels=np.zeros((2, 1), np.uint8))
    images = M.load_npz(tmp_path / "x.npz")[0]
    assert images.shape == (2, 4, 4) and int(images[0, 0, 0]) == round(0.587 * 200)


def test_malformed_files_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"missing array\(s\) train_images, train_labels; .*found images"):
        M.load_npz(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", train_images=np.array([object()] * 2), train_labels=np.zeros((2, 1), np.uint8))
    with pytest.raises(DataError, match=r"b\.npz: unreadable arrays"):  # object arrays are never unpickled
        M.load_npz(tmp_path / "b.npz")
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"c\.npz: not a readable \.npz file"):
        M.load_npz(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros((3, 1)))
    with pytest.raises(DataError, match=r"labels float64 \(3, 1\) do not fit 2 images"):
        M.load_npz(tmp_path / "d.npz")


def test_class_folders_hold_pngs_under_named_labels(tmp_path: Path) -> None:
    make_npz(tmp_path / FILE)
    counts = M.to_class_folders(tmp_path / FILE, tmp_path / "png")
    assert counts == {"normal": 3, "pneumonia": 3}
    files = sorted(p.relative_to(tmp_path / "png").as_posix() for p in (tmp_path / "png").rglob("*.png"))
    assert files[0] == "normal/train-000000.png" and files[-1] == "pneumonia/train-000005.png"
    images = M.load_npz(tmp_path / FILE)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "png/pneumonia/train-000001.png")), images[1])
    assert M.to_class_folders(tmp_path / FILE, tmp_path / "all", split="all") == {"normal": 5, "pneumonia": 5}


def test_medmnist_data_spec_loads_the_named_classes(tmp_path: Path) -> None:
    make_npz(tmp_path / FILE)
    data = load_data(f"medmnist:{tmp_path / FILE}", 32, cache_dir=tmp_path / "cache")
    assert data.class_names == ("normal", "pneumonia") and data.images.shape == (6, 1, 32, 32)
    assert data.summary["classes"] == {"normal": 3, "pneumonia": 3}
    assert data.summary["formats"] == {"medmnist-npz": 6} and len(np.unique(data.groups)) == 6
    assert float(data.images.min()) >= -1 and float(data.images.max()) <= 1
    again = load_data(f"medmnist:{tmp_path / FILE}?split=all", 32, cache_dir=tmp_path / "cache")
    assert len(again) == 10 and len(list((tmp_path / "cache").glob("*.npy"))) == 2
    with pytest.raises(DataError, match=r"allowed parameter: split=train\|val\|test\|all"):
        load_data(f"medmnist:{tmp_path / FILE}?split=bogus", 32)
    with pytest.raises(DataError, match=r"medmnist:.*nothing\.npz: no such file; fetch it with"):
        load_data(f"medmnist:{tmp_path / 'nothing.npz'}", 32)


def test_cli_fetch_writes_class_folders(server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    entry = M.CATALOGUE["pneumoniamnist"]
    monkeypatch.setitem(M.CATALOGUE, "pneumoniamnist",
                        dataclasses.replace(entry, md5={**entry.md5, 64: hashlib.md5(server.payload).hexdigest()}))
    rc = cli_main(["data", "fetch", "pneumoniamnist", "--size", "64", "--out", str(tmp_path / "png"),
                   "--url-base", server.url, "--download-dir", str(tmp_path / "dl")])
    assert rc == 0
    assert (tmp_path / "dl" / FILE).read_bytes() == server.payload
    assert len(list((tmp_path / "png" / "pneumonia").glob("*.png"))) == 3
    assert '"classes": {"normal": 3, "pneumonia": 3}' in capsys.readouterr().out
