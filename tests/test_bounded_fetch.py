"""Bounded fetching (agent/shared/fetch.py) against hostile servers on loopback: gzip
bombs, endless data, lying lengths, redirects, slow retrieval, bad TLS; and the same
through python-tuf's client (BoundedFetcher, trusted_index)."""

from __future__ import annotations

import hashlib
import http.server
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from tuf.api import exceptions as tuf_errors
from tuf.ngclient import UpdaterConfig

from agent.download import download_package  # also: httpcore reads 1 MiB at a time, as in the agent
from agent.shared.fetch import FetchError, fetch_bounded
from agent.shared.repository import (
    BoundedFetcher,
    DownloadError,
    IndexFormatError,
    MetadataExpired,
    MetadataRefused,
    PackageVerificationError,
    RepositoryError,
    repo_client,
    trusted_index,
)
from tests.servers import Heads, body, endless, gzip_bomb, measured

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024
METADATA = b'{"signed": {"_type": "timestamp"}}\n' * 100
TS = "/metadata/timestamp.json"


BOMB = gzip_bomb(1100)  # 1.1 MB on the wire, 1.1 GiB inflated


def test_the_bomb_really_inflates_beyond_a_gib():
    inflater, total = zlib.decompressobj(31), 0
    for i in range(0, len(BOMB), 64 * 1024):
        total += len(inflater.decompress(BOMB[i : i + 64 * 1024], MiB))
        while inflater.unconsumed_tail:
            total += len(inflater.decompress(inflater.unconsumed_tail, MiB))
    assert inflater.eof and total > 1024 * MiB and len(BOMB) < 1.2 * MiB


# --------------------------------------------------------------------------- server

Route = Callable[["_Handler"], None]


class _Handler(Heads, http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def do_GET(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        server.requests.append((self.path, dict(self.headers.items())))
        route = server.routes.get(self.path)
        try:
            if route is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                route(self)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.stop = threading.Event()  # ends the stalling routes at teardown
        self.hung_up = threading.Event()  # the endless route saw the client go
        self.sent = 0

    def handle_error(self, request, client_address) -> None:
        pass  # clients hanging up on hostile answers is what these tests provoke


@pytest.fixture
def server() -> Iterator[_Server]:
    httpd = _Server()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    yield httpd
    httpd.stop.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5, follow_redirects=False) as c:
        yield c


def trickle(every: float, length: int = 60) -> Route:
    def route(h: _Handler) -> None:
        server: _Server = h.server  # type: ignore[assignment]
        h.head(200, Content_Length=length)
        for _ in range(length):
            h.wfile.write(b"x")
            h.wfile.flush()
            if server.stop.wait(every):
                return

    return route


def stall_after(first: bytes, **headers: str | int) -> Route:
    def route(h: _Handler) -> None:
        h.head(200, **headers)
        h.wfile.write(first)
        h.wfile.flush()
        h.server.stop.wait(30)  # type: ignore[attr-defined]
        h.close_connection = True

    return route


# --------------------------------------------------------------------------- the fetcher


def test_normal_file_is_fetched_asking_for_identity(server, client):
    server.routes[TS] = body(METADATA)
    assert fetch_bounded(client, server.url + TS, 4096, deadline=5) == METADATA
    assert server.requests[0][1]["Accept-Encoding"] == "identity"


@pytest.mark.parametrize("encoding", ["gzip", "gzip, gzip", "br", "deflate", "x-gzip"])
def test_any_content_encoding_but_identity_is_refused(server, client, encoding):
    server.routes[TS] = body(METADATA, Content_Encoding=encoding)
    with pytest.raises(FetchError, match=f"Content-Encoding {encoding} refused"):
        fetch_bounded(client, server.url + TS, 4096, deadline=5)


def test_identity_content_encoding_is_fine(server, client):
    server.routes[TS] = body(METADATA, Content_Encoding="identity")
    assert fetch_bounded(client, server.url + TS, 4096, deadline=5) == METADATA


def test_gzip_bomb_is_refused_without_inflating_it(server, client):
    server.routes[TS] = body(BOMB, Content_Encoding="gzip")
    result, peak = measured(lambda: fetch_bounded(client, server.url + TS, 16 * MiB, deadline=10))
    assert peak < 6 * MiB, f"{peak / MiB:.1f} MiB"  # the first read and h11's copy of it
    assert isinstance(result, FetchError) and "Content-Encoding gzip refused" in str(result)


def test_endless_data_stops_just_after_the_cap(server, client):
    server.routes[TS] = endless
    cap = 2 * MiB
    result, peak = measured(lambda: fetch_bounded(client, server.url + TS, cap, deadline=10))
    assert isinstance(result, FetchError) and f"more than {cap} bytes" in str(result)
    # The cap, one network read (1 MiB) beyond it, and the last reads on their way
    # through httpcore and h11's buffers (4.4 to 8 MiB in all, measured): a few MiB,
    # not the 256 MiB on offer.
    assert peak < cap + 8 * MiB, f"{peak / MiB:.1f} MiB"
    assert server.hung_up.wait(5), "the client should hang up, not drain the rest"
    assert server.sent < 64 * MiB


def test_content_length_above_the_cap_is_refused_before_reading(server, client):
    # Announces 10 GiB, sends one byte and waits: a client that reads would wait too.
    server.routes[TS] = stall_after(b"x", Content_Length=10 * 1024 * MiB)
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"Content-Length 10737418240 is more than 4096 bytes"):
        fetch_bounded(client, server.url + TS, 4096, deadline=10)
    assert time.monotonic() - start < 1


def test_content_length_at_the_cap_is_fine(server, client):
    server.routes[TS] = body(METADATA)
    assert fetch_bounded(client, server.url + TS, len(METADATA), deadline=5) == METADATA


@pytest.mark.parametrize("follow", [False, True], ids=["plain-client", "client-following-redirects"])
def test_redirect_is_refused_naming_the_location(server, follow):
    server.routes[TS] = lambda h: h.head(302, Location="/elsewhere/timestamp.json", Content_Length=0)
    server.routes["/elsewhere/timestamp.json"] = body(METADATA)
    refused = pytest.raises(FetchError, match=r"redirects \(HTTP 302\) to /elsewhere/timestamp.json")
    with httpx.Client(timeout=5, follow_redirects=follow) as c, refused:
        fetch_bounded(c, server.url + TS, 4096, deadline=5)
    assert [path for path, _ in server.requests] == [TS]


def test_slow_retrieval_fails_within_the_deadline(server, client):
    # One byte every 0.5 s: no read ever waits the client's 5 s read timeout.
    server.routes[TS] = trickle(0.5)
    start = time.monotonic()
    with pytest.raises(FetchError, match="not complete within the deadline of 2 s"):
        fetch_bounded(client, server.url + TS, 4096, deadline=2)
    assert time.monotonic() - start < 3


def test_a_stalled_server_fails_at_the_deadline_not_after_the_read_timeout(server):
    server.routes[TS] = stall_after(b"x", Content_Length=100)
    start = time.monotonic()
    with httpx.Client(timeout=30) as c, pytest.raises(FetchError, match="deadline of 2 s"):
        fetch_bounded(c, server.url + TS, 4096, deadline=2)
    assert time.monotonic() - start < 3


def test_http_errors_and_unreachable_servers_are_fetch_errors(server, client):
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_bounded(client, server.url + "/missing", 4096, deadline=5)
    with pytest.raises(FetchError, match="failed"):
        fetch_bounded(client, "http://127.0.0.1:1/metadata/timestamp.json", 4096, deadline=5)


def test_fetch_errors_are_retried_like_network_errors_and_refused_metadata_is_not():
    # The agent's download task retries DownloadError (autoretry_for); the control side
    # catches RepositoryError and keeps the releases it knows. An expired repository may
    # heal (re-signed, or this machine's clock set right): retried; a refused one is not.
    assert issubclass(FetchError, DownloadError) and issubclass(FetchError, RepositoryError)
    assert issubclass(MetadataExpired, FetchError)
    for permanent in (MetadataRefused, PackageVerificationError, IndexFormatError):
        assert issubclass(permanent, RepositoryError) and not issubclass(permanent, DownloadError)


# --------------------------------------------------------------------------- through python-tuf


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real repository (updates/repository.py), to serve from the routes."""
    from updates.repository import build_repository

    base = tmp_path_factory.mktemp("tuf-repo")
    release = base / "src" / "stable" / "2.1.0"
    release.mkdir(parents=True)
    (release / "tgpro-base_2.1.0.tar.gz").write_bytes(b"package" * 100)
    build_repository(base / "src", base / "out", base / "keys")
    return base / "out"


def serve_repository(server: _Server, out: Path) -> bytes:
    """Routes for every file of the repository; returns the root to pin."""
    for path in out.rglob("*"):
        if path.is_file():
            server.routes["/" + path.relative_to(out).as_posix()] = body(path.read_bytes())
    return (out / "metadata" / "1.root.json").read_bytes()


def test_bounded_fetcher_turns_a_404_into_tufs_http_error_no_newer_root(server, client):
    fetcher = BoundedFetcher(client, deadline=5)
    with pytest.raises(tuf_errors.DownloadHTTPError) as exc:
        fetcher.download_bytes(server.url + "/metadata/2.root.json", 4096)
    assert exc.value.status_code == 404  # ngclient: the current root is the newest


def test_bounded_fetcher_keeps_other_http_statuses_as_errors(server, client):
    server.routes["/metadata/2.root.json"] = lambda h: h.head(500, Content_Length=0)
    with pytest.raises(tuf_errors.DownloadHTTPError) as exc:
        BoundedFetcher(client, deadline=5).download_bytes(server.url + "/metadata/2.root.json", 4096)
    assert exc.value.status_code == 500


@pytest.mark.parametrize(
    ("route", "why"),
    [
        (stall_after(b"x", Content_Length=10 * MiB), "Content-Length 10485760 is more than 4096 bytes"),
        (body(METADATA, Content_Encoding="gzip"), "Content-Encoding gzip refused"),
        (lambda h: h.head(302, Location="/elsewhere", Content_Length=0), "redirects"),
        (endless, "more than 4096 bytes"),
    ],
    ids=["too-long", "gzip", "redirect", "endless"],
)
def test_bounded_fetcher_turns_other_failures_into_tufs_download_error(server, client, route, why):
    server.routes[TS] = route
    with pytest.raises(tuf_errors.DownloadError, match=why) as exc:
        BoundedFetcher(client, deadline=5).download_bytes(server.url + TS, 4096)
    assert not isinstance(exc.value, tuf_errors.DownloadHTTPError)
    assert isinstance(exc.value.__cause__, FetchError)


def test_bounded_fetcher_an_unreachable_server_is_tufs_download_error(client):
    with pytest.raises(tuf_errors.DownloadError) as exc:
        BoundedFetcher(client, deadline=5).download_bytes("http://127.0.0.1:1/metadata/timestamp.json", 4096)
    assert not isinstance(exc.value, tuf_errors.DownloadHTTPError)


def test_bounded_fetcher_notes_the_servers_clock(server, client):
    server.routes[TS] = body(METADATA)
    fetcher = BoundedFetcher(client, deadline=5)
    assert fetcher.download_bytes(server.url + TS, 4096) == METADATA
    assert fetcher.server_time is not None
    assert abs((fetcher.server_time - datetime.now(UTC)).total_seconds()) < 5


def test_trusted_index_reads_the_served_repository_asking_for_identity(server, client, repository, tmp_path):
    pin = serve_repository(server, repository)
    index = trusted_index(tmp_path / "tuf", server.url, pin, client=client, deadline=5)
    assert [r.version for r in index.releases] == ["2.1.0"]
    paths = [path for path, _ in server.requests]
    assert paths[:2] == ["/metadata/2.root.json", TS]  # 404 for the next root: no newer one
    assert all(headers["Accept-Encoding"] == "identity" for _, headers in server.requests)


def test_trusted_index_a_500_for_the_next_root_is_a_fetch_error_not_no_newer_root(server, client, repository, tmp_path):
    pin = serve_repository(server, repository)
    server.routes["/metadata/2.root.json"] = lambda h: h.head(500, Content_Length=0)
    with pytest.raises(FetchError, match="HTTP 500"):
        trusted_index(tmp_path / "tuf", server.url, pin, client=client, deadline=5)
    assert TS not in [path for path, _ in server.requests]


def test_gzip_bomb_as_the_timestamp_is_a_retried_fetch_error_not_an_inflated_gib(server, repository, tmp_path):
    pin = serve_repository(server, repository)
    server.routes[TS] = body(BOMB, Content_Encoding="gzip")
    with repo_client(5) as c:
        result, peak = measured(lambda: trusted_index(tmp_path / "tuf", server.url, pin, client=c, deadline=5))
    assert peak < 6 * MiB, f"{peak / MiB:.1f} MiB"  # the first read and h11's copy of it
    assert isinstance(result, FetchError) and "Content-Encoding gzip refused" in str(result)
    assert not isinstance(result, MetadataRefused)


def test_endless_timestamp_is_cut_at_tufs_length_cap_with_bounded_memory(server, repository, tmp_path):
    pin = serve_repository(server, repository)
    server.routes[TS] = endless
    with repo_client(5) as c:
        result, peak = measured(lambda: trusted_index(tmp_path / "tuf", server.url, pin, client=c, deadline=10))
    cap = UpdaterConfig().timestamp_max_length
    assert isinstance(result, FetchError) and f"more than {cap} bytes" in str(result), result
    assert peak < 8 * MiB, f"{peak / MiB:.1f} MiB"  # one network read beyond the cap, and h11's copy
    assert server.hung_up.wait(5), "the client should hang up, not drain the rest"
    assert server.sent < 64 * MiB


def test_trusted_index_refuses_a_timestamp_longer_than_tufs_cap_before_reading_it(server, client, repository, tmp_path):
    pin = serve_repository(server, repository)
    cap = UpdaterConfig().timestamp_max_length
    server.routes[TS] = stall_after(b"x", Content_Length=cap + 1)
    start = time.monotonic()
    with pytest.raises(FetchError, match=f"Content-Length {cap + 1} is more than {cap} bytes"):
        trusted_index(tmp_path / "tuf", server.url, pin, client=client, deadline=10)
    assert time.monotonic() - start < 2


def test_trusted_index_a_trickling_timestamp_fails_at_the_deadline(server, client, repository, tmp_path):
    pin = serve_repository(server, repository)
    server.routes[TS] = trickle(0.5)
    start = time.monotonic()
    with pytest.raises(FetchError, match="deadline of 2 s"):
        trusted_index(tmp_path / "tuf", server.url, pin, client=client, deadline=2)
    assert time.monotonic() - start < 3


# --------------------------------------------------------------------------- TLS


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def test_tls_is_verified_a_self_signed_repository_is_refused(server, tmp_path):
    cert_file, key_file = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.routes[TS] = body(METADATA)
    url = f"https://127.0.0.1:{server.server_address[1]}{TS}"
    with repo_client(5) as c, pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED"):
        fetch_bounded(c, url, 4096, deadline=5)
    # The same server, its certificate trusted: the refusal was the verification.
    with httpx.Client(verify=ssl.create_default_context(cafile=str(cert_file))) as c:
        assert fetch_bounded(c, url, 4096, deadline=5) == METADATA


# --------------------------------------------------------------------------- the package downloader


def test_package_downloader_asks_for_identity_and_never_inflates(server, client, tmp_path):
    # A server that labels a .tar.gz Content-Encoding: gzip (Apache's AddEncoding) still
    # serves the file's bytes: they are stored and hashed as they came, never inflated.
    server.routes["/pool/x_1.0.tar.gz"] = body(BOMB, Content_Encoding="gzip")
    dest = tmp_path / "x_1.0.tar.gz"
    result, peak = measured(
        lambda: download_package(
            client,
            server.url + "/pool/x_1.0.tar.gz",
            dest,
            size=len(BOMB),
            sha256=hashlib.sha256(BOMB).hexdigest(),
            chunk_size=256 * 1024,
        )
    )
    assert result == dest and dest.read_bytes() == BOMB
    assert peak < 8 * MiB, f"{peak / MiB:.1f} MiB"
    assert server.requests[0][1]["Accept-Encoding"] == "identity"
