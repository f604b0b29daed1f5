"""Signed repository: building, signing, verification, fetch over real HTTP, build_repo command."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from django.core.management import CommandError, call_command

from agent.shared.protocol import version_key
from agent.shared.repository import (
    DownloadError,
    ExpiredIndexError,
    IndexFormatError,
    PackageEntry,
    RepositoryError,
    SerialRollbackError,
    SignatureError,
    fetch_index,
    package_url,
    parse_and_verify,
    validate_package_name,
)
from updates.demo import DEMO_RELEASES, write_demo_sources
from updates.repository import build_repository, generate_keypair, public_key_from_private

pytestmark = pytest.mark.timeout(60)

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, str]:
    private = tmp_path / "keys" / "repo.key"
    return private, generate_keypair(private, tmp_path / "keys" / "repo.pub")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    write_demo_sources(src, package_bytes=4096)
    return src


def _sign(private: Path, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    signer = serialization.load_pem_private_key(private.read_bytes(), password=None)
    return base64.b64encode(signer.sign(data))


def _build(source: Path, out: Path, key: tuple[Path, str], **kw) -> None:
    build_repository(source, out, key[0], now=NOW, **kw)


def _read(out: Path) -> tuple[bytes, bytes]:
    return (out / "index.json").read_bytes(), (out / "index.json.sig").read_bytes()


# --------------------------------------------------------------------------- keys and names


def test_generated_private_key_is_owner_only_and_public_key_matches(key, tmp_path):
    private, public_b64 = key
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert (tmp_path / "keys" / "repo.pub").read_text().strip() == public_b64
    assert len(base64.b64decode(public_b64)) == 32
    assert public_key_from_private(private) == public_b64


def test_existing_private_key_is_never_overwritten(key, tmp_path):
    private, _ = key
    before = private.read_bytes()
    with pytest.raises(RepositoryError, match="already exists"):
        generate_keypair(private, tmp_path / "other.pub")
    assert private.read_bytes() == before


def test_version_key_orders_numerically_not_lexically():
    assert version_key("2.10.1") > version_key("2.9.0")
    assert version_key("2.1.0.3") > version_key("2.1.0")
    assert sorted(["2.2.0", "2.10.0", "2.1.0", "10.0"], key=version_key) == [
        "2.1.0",
        "2.2.0",
        "2.10.0",
        "10.0",
    ]
    for bad in ["", "2.x", "v2.1", "1.2.3.4.5", "2..1", "-1"]:
        with pytest.raises(ValueError):
            version_key(bad)


@pytest.mark.parametrize("bad", ["", "a", "../x", "a/b", "Tgpro", "tgpro_base", ".hidden", "-x", "x" * 64])
def test_hostile_package_names_are_rejected(bad):
    with pytest.raises(IndexFormatError):
        validate_package_name(bad)


def test_debian_style_package_names_are_accepted():
    for good in ["tgpro-base", "libc6", "g++", "python3.11"]:
        assert validate_package_name(good) == good


# --------------------------------------------------------------------------- build + verify


def test_build_and_verify_round_trip(source, tmp_path, key):
    out = tmp_path / "out"
    _build(source, out, key)
    index_bytes, sig = _read(out)
    index = parse_and_verify(index_bytes, sig, key[1], now=NOW)
    assert index.serial == 1
    assert index.expires - index.generated == timedelta(days=30)
    assert {(r.channel, r.version) for r in index.releases} == {(c, v) for c, v, *_ in DEMO_RELEASES}
    assert index.newest("stable").version == "2.2.0"
    assert index.newest("oldstable").version == "2.0.0"
    assert index.release("2.2.0").needs_reboot is True
    # 2.2.0 ships tgpro-base unchanged: one pool file shared by both releases.
    base_220 = next(p for p in index.release("2.2.0").packages if p.name == "tgpro-base")
    assert base_220.version == "2.1.0" and base_220.file == "pool/tgpro-base_2.1.0.tar.gz"
    for rel in index.releases:
        for pkg in rel.packages:
            data = (out / pkg.file).read_bytes()
            assert len(data) == pkg.size
    assert not [p for p in out.rglob("*.tmp")]
    data = json.loads(index_bytes)
    assert data["format"] == 1 and list(data) == sorted(data)


def test_unknown_release_and_missing_channel(source, tmp_path, key):
    out = tmp_path / "out"
    _build(source, out, key)
    index = parse_and_verify(*_read(out), key[1], now=NOW)
    with pytest.raises(RepositoryError, match="release 9.9 is not in the repository"):
        index.release("9.9")
    assert index.newest("nightly") is None


def test_demo_sources_are_deterministic(tmp_path):
    write_demo_sources(tmp_path / "a", package_bytes=2048)
    write_demo_sources(tmp_path / "b", package_bytes=2048)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files_a
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_tampered_index_byte_is_rejected(source, tmp_path, key):
    out = tmp_path / "out"
    _build(source, out, key)
    index_bytes, sig = _read(out)
    tampered = bytearray(index_bytes)
    tampered[len(tampered) // 2] ^= 0x01
    with pytest.raises(SignatureError):
        parse_and_verify(bytes(tampered), sig, key[1], now=NOW)


def test_signature_by_another_key_is_rejected(source, tmp_path, key):
    out = tmp_path / "out"
    other = tmp_path / "other.key"
    generate_keypair(other, tmp_path / "other.pub")
    build_repository(source, out, other, now=NOW)
    with pytest.raises(SignatureError):
        parse_and_verify(*_read(out), key[1], now=NOW)


@pytest.mark.parametrize("sig", [b"", b"not base64!!", base64.b64encode(b"short")])
def test_garbage_signature_is_a_signature_error(source, tmp_path, key, sig):
    out = tmp_path / "out"
    _build(source, out, key)
    with pytest.raises(SignatureError):
        parse_and_verify(_read(out)[0], sig, key[1], now=NOW)


def test_expired_index_is_rejected(source, tmp_path, key):
    out = tmp_path / "out"
    _build(source, out, key, expires_in=timedelta(days=1))
    parse_and_verify(*_read(out), key[1], now=NOW + timedelta(hours=23))
    with pytest.raises(ExpiredIndexError):
        parse_and_verify(*_read(out), key[1], now=NOW + timedelta(days=1))


def test_serial_lower_than_accepted_is_a_rollback(source, tmp_path, key):
    out = tmp_path / "out"
    _build(source, out, key, serial=5)
    assert parse_and_verify(*_read(out), key[1], now=NOW, min_serial=5).serial == 5
    with pytest.raises(SerialRollbackError):
        parse_and_verify(*_read(out), key[1], now=NOW, min_serial=6)


def test_serial_auto_increments_and_explicit_lower_serial_changes_nothing(source, tmp_path, key):
    out = tmp_path / "out"
    _build(source, out, key)
    _build(source, out, key)
    assert json.loads((out / "index.json").read_bytes())["serial"] == 2
    _build(source, out, key, serial=10)
    before = _read(out)
    for bad in (10, 3):
        with pytest.raises(SerialRollbackError):
            _build(source, out, key, serial=bad)
    assert _read(out) == before
    _build(source, out, key)
    assert parse_and_verify(*_read(out), key[1], now=NOW).serial == 11


@pytest.mark.parametrize(
    "filename",
    [
        "../evil_1.0.tar.gz",
        "Tgpro-base_1.0.tar.gz",
        "tgpro_base_1.0.tar.gz",
        "tgpro-base_1.0.zip",
        "x_1.0.tar.gz",
    ],
)
def test_hostile_source_file_names_are_refused_and_nothing_written(tmp_path, key, filename):
    src = tmp_path / "src"
    rel = src / "stable" / "2.1.0"
    rel.mkdir(parents=True)
    (rel / "tgpro-base_2.1.0.tar.gz").write_bytes(b"ok")
    target = rel / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"evil")
    out = tmp_path / "out"
    with pytest.raises(IndexFormatError) as exc_info:
        _build(src, out, key)
    assert target.name in str(exc_info.value) or str(target.parent) in str(exc_info.value)
    assert not out.exists()


@pytest.mark.parametrize(
    "layout",
    [
        "nightly/2.1.0/tgpro-base_2.1.0.tar.gz",  # unknown channel
        "stable/latest/tgpro-base_2.1.0.tar.gz",  # release dir is not a version
        "stable/2.1.0/tgpro-base_2.x.tar.gz",  # package version is not a version
    ],
)
def test_bad_source_layout_names_the_offending_path(tmp_path, key, layout):
    path = tmp_path / "src" / layout
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    with pytest.raises(IndexFormatError, match=str(tmp_path / "src")):
        _build(tmp_path / "src", tmp_path / "out", key)
    assert not (tmp_path / "out").exists()


def test_bad_release_json_is_refused(tmp_path, key):
    rel = tmp_path / "src" / "stable" / "2.1.0"
    rel.mkdir(parents=True)
    (rel / "tgpro-base_2.1.0.tar.gz").write_bytes(b"x")
    (rel / "release.json").write_text('{"needs_reboot": "yes"}')
    with pytest.raises(IndexFormatError, match="release.json"):
        _build(tmp_path / "src", tmp_path / "out", key)


def test_release_json_defaults(tmp_path, key):
    rel = tmp_path / "src" / "stable" / "2.1.0"
    rel.mkdir(parents=True)
    (rel / "tgpro-base_2.1.0.tar.gz").write_bytes(b"x")
    _build(tmp_path / "src", tmp_path / "out", key)
    release = parse_and_verify(*_read(tmp_path / "out"), key[1], now=NOW).release("2.1.0")
    assert (release.notes, release.needs_reboot, release.hotfix) == ("", True, False)


def _resign(out: Path, key: tuple[Path, str], mutate) -> tuple[bytes, bytes]:
    data = json.loads((out / "index.json").read_bytes())
    mutate(data)
    index_bytes = json.dumps(data).encode()
    return index_bytes, _sign(key[0], index_bytes)


@pytest.mark.parametrize(
    "file",
    [
        "pool/../../etc/passwd",
        "/etc/passwd",
        "pool/tgpro-base_2.0.0.tar.gz/..",
        "other/tgpro-base_2.0.0.tar.gz",
    ],
)
def test_hostile_file_path_in_signed_index_is_rejected(source, tmp_path, key, file):
    out = tmp_path / "out"
    _build(source, out, key)

    def mutate(data):
        data["releases"][0]["packages"][0]["file"] = file

    with pytest.raises(IndexFormatError):
        parse_and_verify(*_resign(out, key, mutate), key[1], now=NOW)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["releases"][0]["packages"][0].update(name="../evil"),
        lambda d: d["releases"][0]["packages"][0].update(size="12"),
        lambda d: d["releases"][0]["packages"][0].update(sha256="ABC"),
        lambda d: d["releases"][0].update(channel="nightly"),
        lambda d: d["releases"][0].pop("version"),
        lambda d: d.update(serial=True),
        lambda d: d.update(expires="tomorrow"),
        lambda d: d.update(format=2),
        lambda d: d.update(releases={}),
    ],
)
def test_malformed_fields_in_signed_index_are_rejected(source, tmp_path, key, mutate):
    out = tmp_path / "out"
    _build(source, out, key)
    with pytest.raises(IndexFormatError):
        parse_and_verify(*_resign(out, key, mutate), key[1], now=NOW)


@pytest.mark.parametrize("body", [b"{not json", b"[]", b"\xff\xfe", b""])
def test_malformed_json_with_valid_signature_is_an_index_format_error(key, body):
    with pytest.raises(IndexFormatError):
        parse_and_verify(body, _sign(key[0], body), key[1], now=NOW)


def test_package_url_joins_base_and_pool_path():
    entry = PackageEntry("tgpro-base", "2.1.0", "pool/tgpro-base_2.1.0.tar.gz", 1, "0" * 64)
    assert package_url("http://repo/x/", entry) == "http://repo/x/pool/tgpro-base_2.1.0.tar.gz"
    assert package_url("http://repo/x", entry) == "http://repo/x/pool/tgpro-base_2.1.0.tar.gz"
    with pytest.raises(IndexFormatError):
        package_url("http://repo", PackageEntry("tgpro-base", "2.1.0", "../x", 1, "0" * 64))


# --------------------------------------------------------------------------- fetch over HTTP


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[callable]:
    servers = []

    def start(directory: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_fetch_index_over_http(source, tmp_path, key, serve):
    out = tmp_path / "out"
    build_repository(source, out, key[0])
    base = serve(out)
    index, index_bytes, sig = fetch_index(base, key[1], timeout=5)
    assert (index_bytes, sig) == _read(out)
    assert index.newest("stable").version == "2.2.0"
    entry = index.release("2.1.0").packages[0]
    resp = httpx.get(package_url(base, entry), timeout=5)
    assert resp.status_code == 200 and len(resp.content) == entry.size
    with pytest.raises(SerialRollbackError):
        fetch_index(base, key[1], min_serial=2, timeout=5)


def test_fetch_index_missing_repository_is_a_download_error(tmp_path, key, serve):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DownloadError, match="404"):
        fetch_index(serve(tmp_path / "empty"), key[1], timeout=5)


def test_fetch_index_unreachable_server_is_a_download_error(key):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError):
        fetch_index(f"http://127.0.0.1:{port}", key[1], timeout=2)


# --------------------------------------------------------------------------- build_repo command


def test_build_repo_command_demo_generates_key_and_builds(tmp_path):
    keyfile = tmp_path / "keys" / "repo.key"
    out = tmp_path / "out"
    stdout = __import__("io").StringIO()
    call_command("build_repo", str(tmp_path / "src"), str(out), "--key", str(keyfile), "--demo", stdout=stdout)
    public_b64 = (tmp_path / "keys" / "repo.key.pub").read_text().strip()
    assert public_b64 in stdout.getvalue() and "serial 1" in stdout.getvalue()
    index = parse_and_verify(*_read(out), public_b64)
    assert len(index.releases) == len(DEMO_RELEASES)
    call_command("build_repo", str(tmp_path / "src"), str(out), "--key", str(keyfile), stdout=stdout)
    assert parse_and_verify(*_read(out), public_b64).serial == 2


def test_build_repo_command_bad_source_is_a_command_error_and_writes_no_index(tmp_path):
    bad = tmp_path / "src" / "stable" / "2.1.0" / "Evil_1.0.tar.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"x")
    out = tmp_path / "out"
    with pytest.raises(CommandError, match="Evil_1.0.tar.gz"):
        call_command("build_repo", str(tmp_path / "src"), str(out), "--key", str(tmp_path / "k.key"))
    assert not (out / "index.json").exists()


def test_build_repo_command_rejects_zero_expiry_days(tmp_path):
    with pytest.raises(CommandError, match="at least 1"):
        call_command("build_repo", "src", "out", "--key", str(tmp_path / "k.key"), "--expires-days", "0")
    assert not (tmp_path / "k.key").exists()


def test_threads_that_start_downloading_at_once_load_the_ca_bundle_once(monkeypatch):
    from agent.shared import repository

    built = []
    real = httpx.create_ssl_context

    def slow_build(*args, **kwargs):  # as slow as on a loaded machine, so that the threads overlap
        built.append(1)
        threading.Event().wait(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(repository, "_tls", None)
    monkeypatch.setattr(httpx, "create_ssl_context", slow_build)
    clients = []
    threads = [threading.Thread(target=lambda: clients.append(repository.repo_client(5))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(clients) == 8 and len(built) == 1
    for client in clients:
        client.close()
