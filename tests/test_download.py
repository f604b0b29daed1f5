"""Streaming package downloader against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import http.server
import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from agent.download import download_package
from agent.shared.repository import DownloadError, PackageVerificationError

pytestmark = pytest.mark.timeout(60)

PAYLOAD = random.Random("download-tests").randbytes(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()
CHUNK = 16 * 1024


@dataclass
class Behaviour:
    """What the server does for the next requests; tests mutate it between calls."""

    body: bytes = PAYLOAD
    fail_times: int = 0  # answer 500 this many times first
    status: int | None = None  # fixed status without body (e.g. 404, 416)
    cut_at: int | None = None  # advertise the full length, send this many bytes, drop the connection
    ignore_range: bool = False
    endless: bool = False  # keep sending without Content-Length until the client hangs up
    requests: list[dict[str, str]] = field(default_factory=list)
    bytes_sent: int = 0


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def do_GET(self) -> None:
        b: Behaviour = self.server.behaviour  # type: ignore[attr-defined]
        b.requests.append(dict(self.headers.items()))
        try:
            self._respond(b)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _respond(self, b: Behaviour) -> None:
        if b.fail_times > 0:
            b.fail_times -= 1
            return self._empty(500)
        if b.status is not None:
            return self._empty(b.status)
        if b.endless:
            return self._send_endless(b)
        start = self._range_start()
        if start is not None and not b.ignore_range:
            body = b.body[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(b.body) - 1}/{len(b.body)}")
        else:
            start, body = 0, b.body
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if b.cut_at is not None and b.cut_at - start < len(body):
            body = body[: max(0, b.cut_at - start)]
            self.close_connection = True
        self.wfile.write(body)
        self.wfile.flush()
        b.bytes_sent += len(body)

    def _range_start(self) -> int | None:
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        return int(match.group(1)) if match else None

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_endless(self, b: Behaviour) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        block = b"\0" * 65536
        # Bounded so a broken client cannot hang the test run.
        for _ in range(2000):
            self.wfile.write(block)
            b.bytes_sent += len(block)


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # clients hanging up mid-body is exactly what these tests provoke


@pytest.fixture
def server() -> Iterator[tuple[str, Behaviour]]:
    behaviour = Behaviour()
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    httpd.behaviour = behaviour  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/pool/pkg_1.0.tar.gz", behaviour
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as c:
        yield c


def _download(client, url, dest, **kw):
    kw.setdefault("size", len(PAYLOAD))
    kw.setdefault("sha256", SHA)
    return download_package(client, url, dest, chunk_size=CHUNK, **kw)


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def test_full_download_verifies_and_lands_atomically(server, client, tmp_path):
    url, b = server
    dest = tmp_path / "pkgs" / "pkg_1.0.tar.gz"
    seen: list[tuple[int, int]] = []
    assert _download(client, url, dest, progress=lambda d, t: seen.append((d, t))) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not _part(dest).exists()
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert "Range" not in b.requests[0]


def test_flipped_byte_is_rejected_and_part_file_removed(server, client, tmp_path):
    url, b = server
    body = bytearray(PAYLOAD)
    body[12345] ^= 0xFF
    b.body = bytes(body)
    dest = tmp_path / "pkg.tar.gz"
    with pytest.raises(PackageVerificationError):
        _download(client, url, dest)
    assert not dest.exists() and not _part(dest).exists()


def test_more_bytes_than_listed_is_rejected_with_bounded_read(server, client, tmp_path):
    url, b = server
    b.endless = True
    dest = tmp_path / "pkg.tar.gz"
    seen: list[int] = []
    with pytest.raises(PackageVerificationError, match="larger than listed"):
        _download(client, url, dest, progress=lambda d, t: seen.append(d))
    assert not dest.exists() and not _part(dest).exists()
    assert max(seen, default=0) <= len(PAYLOAD)


def test_longer_content_length_than_listed_is_rejected(server, client, tmp_path):
    url, b = server
    b.body = PAYLOAD + b"trailing junk"
    dest = tmp_path / "pkg.tar.gz"
    with pytest.raises(PackageVerificationError, match="larger than listed"):
        _download(client, url, dest)
    assert not dest.exists() and not _part(dest).exists()


def test_connection_cut_half_way_then_resume_with_range(server, client, tmp_path):
    url, b = server
    half = len(PAYLOAD) // 2
    b.cut_at = half
    dest = tmp_path / "pkg.tar.gz"
    with pytest.raises(DownloadError):
        _download(client, url, dest)
    assert _part(dest).read_bytes() == PAYLOAD[:half]
    assert not dest.exists()

    b.cut_at = None
    seen: list[int] = []
    _download(client, url, dest, progress=lambda d, t: seen.append(d))
    assert b.requests[-1]["Range"] == f"bytes={half}-"
    assert dest.read_bytes() == PAYLOAD and not _part(dest).exists()
    assert seen[0] >= half and seen[-1] == len(PAYLOAD), "progress counts on from the resumed offset"


def test_server_ignoring_range_restarts_from_zero(server, client, tmp_path):
    url, b = server
    b.ignore_range = True
    dest = tmp_path / "pkg.tar.gz"
    _part(dest).write_bytes(b"stale bytes from an older attempt")
    _download(client, url, dest)
    assert b.requests[-1]["Range"] == f"bytes={len(b'stale bytes from an older attempt')}-"
    assert dest.read_bytes() == PAYLOAD and not _part(dest).exists()


def test_server_error_is_transient_and_part_is_kept(server, client, tmp_path):
    url, b = server
    dest = tmp_path / "pkg.tar.gz"
    _part(dest).write_bytes(PAYLOAD[:1000])
    b.fail_times = 1
    with pytest.raises(DownloadError, match="500"):
        _download(client, url, dest)
    assert _part(dest).read_bytes() == PAYLOAD[:1000]
    _download(client, url, dest)
    assert b.requests[-1]["Range"] == "bytes=1000-"
    assert dest.read_bytes() == PAYLOAD


def test_not_found_is_a_download_error_naming_the_status(server, client, tmp_path):
    url, b = server
    b.status = 404
    with pytest.raises(DownloadError, match="404"):
        _download(client, url, tmp_path / "pkg.tar.gz")


def test_range_not_satisfiable_discards_part(server, client, tmp_path):
    url, b = server
    b.status = 416
    dest = tmp_path / "pkg.tar.gz"
    _part(dest).write_bytes(PAYLOAD[:10])
    with pytest.raises(DownloadError, match="416"):
        _download(client, url, dest)
    assert not _part(dest).exists()


def test_already_complete_dest_returns_without_any_request(server, client, tmp_path):
    url, b = server
    dest = tmp_path / "pkg.tar.gz"
    dest.write_bytes(PAYLOAD)
    seen: list[tuple[int, int]] = []
    assert _download(client, url, dest, progress=lambda d, t: seen.append((d, t))) == dest
    assert b.requests == []
    assert seen == [(len(PAYLOAD), len(PAYLOAD))]


def test_complete_part_is_verified_without_a_request(server, client, tmp_path):
    url, b = server
    dest = tmp_path / "pkg.tar.gz"
    _part(dest).write_bytes(PAYLOAD)
    _download(client, url, dest)
    assert b.requests == [] and dest.read_bytes() == PAYLOAD


def test_corrupt_complete_part_is_discarded_and_fetched_again_next_time(server, client, tmp_path):
    # What a power cut can leave behind: downloads are not fsynced (see agent.download).
    url, b = server
    dest = tmp_path / "pkg.tar.gz"
    _part(dest).write_bytes(b"\0" * len(PAYLOAD))
    with pytest.raises(DownloadError, match="after resuming"):
        _download(client, url, dest)
    assert b.requests == [] and not _part(dest).exists()
    _download(client, url, dest)
    assert dest.read_bytes() == PAYLOAD and "Range" not in b.requests[-1]


def test_a_resumed_download_that_does_not_match_starts_over(server, client, tmp_path):
    url, b = server
    dest = tmp_path / "pkg.tar.gz"
    kept = bytearray(PAYLOAD[:1000])
    kept[-1] ^= 0xFF  # the tail of a .part a power cut left behind
    _part(dest).write_bytes(bytes(kept))
    with pytest.raises(DownloadError, match="after resuming"):
        _download(client, url, dest)
    assert b.requests[-1]["Range"] == "bytes=1000-" and not _part(dest).exists()
    _download(client, url, dest)
    assert dest.read_bytes() == PAYLOAD


def test_wrong_existing_dest_is_replaced(server, client, tmp_path):
    url, b = server
    dest = tmp_path / "pkg.tar.gz"
    dest.write_bytes(b"old version")
    _download(client, url, dest)
    assert dest.read_bytes() == PAYLOAD and len(b.requests) == 1


def test_unreachable_server_is_a_download_error(client, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError):
        _download(client, f"http://127.0.0.1:{port}/x", tmp_path / "pkg.tar.gz")


def test_install_fetches_again_a_package_a_power_cut_ate(tmp_path, agent_settings):
    """The node's download and install steps against a signed repository on loopback:
    a downloaded file lost before the install (downloads are not fsynced) is fetched
    again and checked, instead of failing the run."""
    from agent import steps
    from agent.drivers.simulated import SimulatedDriver
    from agent.shared.protocol import StepCommand
    from tests.conftest import Repo
    from tests.servers import RepoServer
    from updates.demo import DEMO_RELEASES

    repo = Repo(tmp_path / "repo")
    driver = SimulatedDriver("gw-cut", tmp_path / "node")
    packages = next(p for _, v, *_, p in DEMO_RELEASES if v == "2.1.0")
    driver.seed(version="2.1.0", packages=packages, users=[], cluster=False)
    payload = StepCommand(run=7, node="gw-cut", version="2.2.0")
    reports: list[tuple[str, dict]] = []
    with RepoServer(repo.dir) as server:
        agent_settings(repo_url=server.url, repo_root_file=repo.root_file)
        steps.download(driver, payload, lambda event, **kw: reports.append((event, kw)))
        victim = sorted(driver.download_dir("2.2.0").glob("*.tar.gz"))[0]
        victim.write_bytes(victim.read_bytes()[:100])  # what was on disk when the power went
        fetched_before = len(server.behaviour.requests)
        steps.install(driver, payload, lambda event, **kw: reports.append((event, kw)))
        again = [r["path"] for r in server.behaviour.requests[fetched_before:]]
    assert len(again) == 1 and again[0].startswith("/targets/releases/2.2.0/"), again
    assert again[0].endswith(f".{victim.name}"), "only the damaged package is fetched again, by its hash-named file"
    assert driver.snapshot()["installed_version"] == "2.2.0"
    assert reports[-1][0] == "succeeded"


def test_a_server_trickling_a_package_is_cut_for_slow_retrieval_and_the_next_attempt_resumes(tmp_path, client):
    # TUF's slow retrieval attack: a byte now and then keeps every read within its timeout.
    from agent.download import MinRate, TooSlow

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            for i in range(0, len(PAYLOAD), 10):
                self.wfile.write(PAYLOAD[i : i + 10])
                self.wfile.flush()
                time.sleep(0.05)

        def log_message(self, *args: object) -> None:
            pass

    httpd = _QuietServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    dest = tmp_path / "pkg_1.0.tar.gz"
    began = time.monotonic()
    try:
        with pytest.raises(TooSlow, match="too slow"):
            _download(client, f"http://127.0.0.1:{httpd.server_address[1]}/p", dest, min_rate=MinRate(1000, 0.5))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert time.monotonic() - began < 3, "cut after its window, not when the server is done"
    assert issubclass(TooSlow, DownloadError), "retried like a network error"
    assert 0 < _part(dest).stat().st_size < len(PAYLOAD), "what came is kept for the resume"
    assert not dest.exists()
