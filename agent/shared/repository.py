"""The signed update repository as both sides read it: its format, its signature
checks and bounded fetching. The agent verifies with it before every download and
install; the control plane's ``sync_releases`` reads releases with it; building and
signing a repository is the control side's (updates/repository.py).

Trust model: the index lists every package with its size and sha256 and is signed
with an Ed25519 key. A node that has verified the index therefore only needs the
hash check to trust a package, wherever the bytes came from.
"""

from __future__ import annotations

import base64
import binascii
import json
import ssl
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.shared.env import ConfigError
from agent.shared.errors import DownloadError as DownloadError
from agent.shared.errors import RepositoryError as RepositoryError
from agent.shared.fetch import FetchError as FetchError
from agent.shared.fetch import fetch_bounded
from agent.shared.protocol import CHANNELS, PACKAGE_NAME_RE, SHA256_RE, VERSION_RE, version_key
from agent.shared.signing import pinned_key

INDEX_FORMAT = 1
INDEX_NAME = "index.json"
SIGNATURE_NAME = "index.json.sig"
POOL_DIR = "pool"
RELEASE_META = "release.json"
PACKAGE_SUFFIX = ".tar.gz"
# A hostile or broken server must not make a node buffer an unbounded index, nor keep
# it waiting for one: each of index.json and its signature within these (agent/shared/fetch.py).
MAX_INDEX_BYTES = 16 * 1024 * 1024
INDEX_DEADLINE = 120.0


class IndexFormatError(RepositoryError):
    """Broken or malformed index/source, hostile names or paths."""


class SignatureError(RepositoryError):
    pass


class ExpiredIndexError(RepositoryError):
    pass


class SerialRollbackError(RepositoryError):
    """The index serial is lower than the last one accepted (replay/rollback)."""


class PackageVerificationError(RepositoryError):
    """Size or sha256 mismatch: permanent, retrying the same bytes will not help."""


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class PackageEntry:
    name: str
    version: str
    file: str
    size: int
    sha256: str

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "file": self.file,
            "size": self.size,
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class ReleaseEntry:
    version: str
    channel: str
    needs_reboot: bool
    hotfix: bool
    notes: str
    packages: tuple[PackageEntry, ...]

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "channel": self.channel,
            "needs_reboot": self.needs_reboot,
            "hotfix": self.hotfix,
            "notes": self.notes,
            "packages": [p.to_dict() for p in self.packages],
        }


@dataclass(frozen=True)
class RepositoryIndex:
    serial: int
    generated: datetime
    expires: datetime
    releases: tuple[ReleaseEntry, ...]

    def release(self, version: str) -> ReleaseEntry:
        for rel in self.releases:
            if rel.version == version:
                return rel
        raise RepositoryError(f"release {version} is not in the repository")

    def newest(self, channel: str) -> ReleaseEntry | None:
        candidates = [r for r in self.releases if r.channel == channel]
        return max(candidates, key=lambda r: version_key(r.version), default=None)

    def to_dict(self) -> dict:
        return {
            "format": INDEX_FORMAT,
            "serial": self.serial,
            "generated": _format_time(self.generated),
            "expires": _format_time(self.expires),
            "releases": [r.to_dict() for r in self.releases],
        }

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), sort_keys=True, indent=1) + "\n").encode("utf-8")


# --------------------------------------------------------------------------- names


def validate_package_name(name: str) -> str:
    if not isinstance(name, str) or not PACKAGE_NAME_RE.match(name):
        raise IndexFormatError(f"invalid package name {name!r} (allowed: {PACKAGE_NAME_RE.pattern})")
    return name


def validate_version(version: Any, what: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise IndexFormatError(f"{what}: invalid version {version!r}")
    return version


def package_filename(name: str, version: str) -> str:
    return f"{name}_{version}{PACKAGE_SUFFIX}"


def package_url(base_url: str, entry: PackageEntry) -> str:
    _check_pool_path(entry.file, entry.name, entry.version)
    return base_url.rstrip("/") + "/" + entry.file


def _check_pool_path(file: Any, name: str, version: str) -> str:
    # Only the one canonical form is accepted, so no path from the index can
    # ever point outside the pool directory.
    expected = f"{POOL_DIR}/{package_filename(name, version)}"
    if file != expected:
        raise IndexFormatError(f"package {name} {version}: file must be {expected!r}, got {file!r}")
    return expected


# --------------------------------------------------------------------------- keys


def _load_public_key(public_key_b64: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(public_key_b64.strip(), validate=True)
    except (binascii.Error, ValueError, AttributeError) as exc:
        raise SignatureError("repository public key is not valid base64") from exc
    if len(raw) != 32:
        raise SignatureError(f"repository public key must be 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def pinned_public_key(key_b64: str, key_file: Path) -> str:
    """The repository key a reader trusts: given inline (base64), else read from its file."""
    try:
        return pinned_key(key_b64, key_file, "TGP_REPO_PUBKEY")
    except ConfigError as exc:
        raise RepositoryError(f"repository: {exc}") from None


# --------------------------------------------------------------------------- verify


def parse_and_verify(
    index_bytes: bytes,
    signature: bytes,
    public_key_b64: str,
    *,
    now: datetime | None = None,
    min_serial: int = 0,
) -> RepositoryIndex:
    _verify_signature(index_bytes, signature, public_key_b64)
    index = parse_index(index_bytes)
    now = aware_utc(now) if now is not None else datetime.now(UTC)
    if index.expires <= now:
        raise ExpiredIndexError(
            f"repository index (serial {index.serial}) expired at {_format_time(index.expires)}; "
            "the repository must be re-signed"
        )
    if index.serial < min_serial:
        raise SerialRollbackError(
            f"repository index serial {index.serial} is older than the last accepted serial {min_serial}"
        )
    return index


def _verify_signature(index_bytes: bytes, signature: bytes, public_key_b64: str) -> None:
    public = _load_public_key(public_key_b64)
    try:
        raw_sig = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError("index signature is not valid base64") from exc
    if len(raw_sig) != 64:
        raise SignatureError(f"index signature must be 64 bytes, got {len(raw_sig)}")
    try:
        public.verify(raw_sig, index_bytes)
    except InvalidSignature:
        raise SignatureError("index signature does not match the repository public key") from None


def parse_index(index_bytes: bytes) -> RepositoryIndex:
    """Parse index.json WITHOUT verifying it; use parse_and_verify for anything fetched."""
    try:
        data = json.loads(index_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise IndexFormatError(f"index.json is not valid JSON: {exc}") from exc
    obj = _Obj(data, "index")
    if obj.get("format", int) != INDEX_FORMAT:
        raise IndexFormatError(f"index format {data.get('format')!r} is not supported (want {INDEX_FORMAT})")
    serial = obj.get("serial", int)
    if serial < 0:
        raise IndexFormatError(f"index serial {serial} is negative")
    releases = tuple(_parse_release(r, i) for i, r in enumerate(obj.get("releases", list)))
    versions = [r.version for r in releases]
    if len(set(versions)) != len(versions):
        raise IndexFormatError("index lists the same release version twice")
    return RepositoryIndex(
        serial=serial,
        generated=_parse_time(obj.get("generated", str), "generated"),
        expires=_parse_time(obj.get("expires", str), "expires"),
        releases=releases,
    )


class _Obj:
    """Typed field access on a JSON object with operator-readable errors."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise IndexFormatError(f"{where}: expected a JSON object")
        self.data, self.where = data, where

    def get(self, key: str, typ: type) -> Any:
        if key not in self.data:
            raise IndexFormatError(f"{self.where}: missing field {key!r}")
        value = self.data[key]
        # bool is a subclass of int; a serial of `true` is a broken index.
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise IndexFormatError(f"{self.where}: field {key!r} must be {typ.__name__}")
        return value


def _parse_release(data: Any, pos: int) -> ReleaseEntry:
    obj = _Obj(data, f"release #{pos}")
    version = validate_version(obj.get("version", str), obj.where)
    obj.where = f"release {version}"
    channel = obj.get("channel", str)
    if channel not in CHANNELS:
        raise IndexFormatError(f"{obj.where}: unknown channel {channel!r}")
    packages = tuple(_parse_package(p, obj.where) for p in obj.get("packages", list))
    if not packages:
        raise IndexFormatError(f"{obj.where}: has no packages")
    names = [p.name for p in packages]
    if len(set(names)) != len(names):
        raise IndexFormatError(f"{obj.where}: lists a package twice")
    return ReleaseEntry(
        version=version,
        channel=channel,
        needs_reboot=obj.get("needs_reboot", bool),
        hotfix=obj.get("hotfix", bool),
        notes=obj.get("notes", str),
        packages=packages,
    )


def _parse_package(data: Any, where: str) -> PackageEntry:
    obj = _Obj(data, f"{where}: package")
    name = validate_package_name(obj.get("name", str))
    obj.where = f"{where}: package {name}"
    version = validate_version(obj.get("version", str), obj.where)
    size = obj.get("size", int)
    if size < 0:
        raise IndexFormatError(f"{obj.where}: negative size")
    sha256 = obj.get("sha256", str)
    if not SHA256_RE.match(sha256):
        raise IndexFormatError(f"{obj.where}: sha256 must be 64 lowercase hex digits")
    file = _check_pool_path(obj.get("file", str), name, version)
    return PackageEntry(name=name, version=version, file=file, size=size, sha256=sha256)


def aware_utc(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        raise ValueError("naive datetime; pass an aware datetime (UTC)")
    return dt.astimezone(UTC)


def _format_time(dt: datetime) -> str:
    return aware_utc(dt).isoformat().replace("+00:00", "Z")


def _parse_time(value: str, field: str) -> datetime:
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise IndexFormatError(f"index field {field!r} is not an ISO 8601 time: {value!r}") from None
    if dt.tzinfo is None:
        raise IndexFormatError(f"index field {field!r} has no time zone: {value!r}")
    return dt.astimezone(UTC)


# --------------------------------------------------------------------------- fetch


_tls_lock = threading.Lock()
_tls: ssl.SSLContext | None = None


def _tls_context() -> ssl.SSLContext:
    # Loading the CA bundle takes 20-100 ms of CPU: once per process, not once per
    # download, nor once per thread when several threads start downloading at once.
    global _tls
    with _tls_lock:
        if _tls is None:
            _tls = httpx.create_ssl_context()
        return _tls


def repo_client(timeout: float) -> httpx.Client:
    """An HTTP client for the repository. Redirects are not followed: the index
    names the only place a package may come from. TLS is always verified against
    the system CA bundle: there is deliberately no option to turn that off."""
    return httpx.Client(timeout=timeout, follow_redirects=False, verify=_tls_context())


def fetch_index(
    base_url: str,
    public_key_b64: str,
    *,
    min_serial: int = 0,
    client: httpx.Client | None = None,
    timeout: float = 30.0,
    deadline: float = INDEX_DEADLINE,
) -> tuple[RepositoryIndex, bytes, bytes]:
    """Fetch and verify the index. Fetching fails with FetchError (a DownloadError,
    retried); what is fetched but wrong with a RepositoryError that is not."""
    own_client = client is None
    client = client or repo_client(timeout)
    try:
        base = base_url.rstrip("/")
        index_bytes = fetch_bounded(client, f"{base}/{INDEX_NAME}", MAX_INDEX_BYTES, deadline=deadline)
        signature = fetch_bounded(client, f"{base}/{SIGNATURE_NAME}", MAX_INDEX_BYTES, deadline=deadline)
    finally:
        if own_client:
            client.close()
    index = parse_and_verify(index_bytes, signature, public_key_b64, min_serial=min_serial)
    return index, index_bytes, signature
