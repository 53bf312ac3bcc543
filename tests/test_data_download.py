"""smallNORB download against a local HTTP server (127.0.0.1, in a thread): resume, checksums, offline."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import time

import pytest

from harness.data import DataError
from harness.data import smallnorb as sn


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    honour_range = True
    requests: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802
        name = self.path.rsplit("/", 1)[-1]
        rng = self.headers.get("Range")
        type(self).requests.append((name, rng))
        if name not in self.files:
            self.send_error(404)
            return
        body, status = self.files[name], 200
        if rng and self.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            body, status = body[start:], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.files = {"a.bin": bytes(range(256)) * 40, "b.bin": b"hello smallnorb" * 3}
    _Handler.honour_range = True
    _Handler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/norb"
    httpd.shutdown()
    httpd.server_close()


def _table(**override):
    out = {}
    for name, body in _Handler.files.items():
        out[name] = sn.RemoteFile(name, len(body), override.get(name, hashlib.sha256(body).hexdigest()))
    return out


def test_download_and_skip(server, tmp_path):
    paths = sn.download(tmp_path, base_url=server, files=_table(), progress=False)
    assert [p.read_bytes() for p in paths] == list(_Handler.files.values())
    assert not list(tmp_path.glob("*.part"))
    n = len(_Handler.requests)
    sn.download(tmp_path, base_url=server, files=_table(), progress=False)  # present and correct: no request
    assert len(_Handler.requests) == n
    assert set(sn.verify(tmp_path, _table()).values()) == {"ok"}


def test_resume_with_range(server, tmp_path):
    body = _Handler.files["a.bin"]
    (tmp_path / "a.bin.part").write_bytes(body[:1000])
    sn.download(tmp_path, base_url=server, files=_table(), progress=False)
    assert ("a.bin", "bytes=1000-") in _Handler.requests
    assert (tmp_path / "a.bin").read_bytes() == body


def test_server_ignoring_range_restarts(server, tmp_path):
    _Handler.honour_range = False
    body = _Handler.files["a.bin"]
    (tmp_path / "a.bin.part").write_bytes(b"x" * 1000)  # wrong bytes: must not be kept
    sn.download(tmp_path, base_url=server, files=_table(), progress=False)
    assert (tmp_path / "a.bin").read_bytes() == body


def test_complete_part_is_used(server, tmp_path):
    body = _Handler.files["b.bin"]
    (tmp_path / "b.bin.part").write_bytes(body)  # server answers 416: nothing left
    sn.download(tmp_path, base_url=server, files=_table(), progress=False)
    assert (tmp_path / "b.bin").read_bytes() == body


def test_checksum_mismatch_removes_part(server, tmp_path):
    with pytest.raises(DataError, match="a.bin: downloaded .* expected .* run the download again"):
        sn.download(tmp_path, base_url=server, files=_table(**{"a.bin": "0" * 64}), progress=False)
    assert not (tmp_path / "a.bin").exists() and not (tmp_path / "a.bin.part").exists()


def test_corrupt_file_on_disk_is_replaced(server, tmp_path):
    sn.download(tmp_path, base_url=server, files=_table(), progress=False)
    (tmp_path / "b.bin").write_bytes(b"garbage" * 6 + b"!!!")  # same size, wrong content
    status = sn.verify(tmp_path, _table())
    assert status["b.bin"].startswith("sha256") and status["a.bin"] == "ok"
    sn.download(tmp_path, base_url=server, files=_table(), progress=False)
    assert (tmp_path / "b.bin").read_bytes() == _Handler.files["b.bin"]


def test_http_error(server, tmp_path):
    files = {"missing.bin": sn.RemoteFile("missing.bin", 3, "0" * 64)}
    with pytest.raises(DataError, match="HTTP 404"):
        sn.download(tmp_path, base_url=server, files=files, progress=False)


def test_offline_fails_at_once(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="cannot reach .*check the internet connection"):
        sn.download(tmp_path, base_url=f"http://127.0.0.1:{port}", files=_table(), progress=False)
    assert time.perf_counter() - t0 < 5


def test_verify_reports_missing(tmp_path):
    status = sn.verify(tmp_path)
    assert len(status) == 6 and set(status.values()) == {"missing"}
