"""Signed update repository: index format, signing, verification and building.

Node agents import this module without a database, so it must never import
Django models (or Django at all).

Trust model: the index lists every package with its size and sha256 and is signed
with an Ed25519 key. A node that has verified the index therefore only needs the
hash check to trust a package, wherever the bytes came from.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import shutil
import ssl
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

INDEX_FORMAT = 1
INDEX_NAME = "index.json"
SIGNATURE_NAME = "index.json.sig"
POOL_DIR = "pool"
CHANNELS = ("stable", "oldstable")
RELEASE_META = "release.json"
PACKAGE_SUFFIX = ".tar.gz"
# A hostile or broken server must not make a node buffer an unbounded index.
MAX_INDEX_BYTES = 16 * 1024 * 1024
_HASH_CHUNK = 1024 * 1024

VERSION_RE = re.compile(r"^[0-9]{1,9}(\.[0-9]{1,9}){0,3}$")
PACKAGE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.+-]{1,62}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class RepositoryError(Exception):
    """Base class; the message is meant for operators."""


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


class DownloadError(RepositoryError):
    """Transient: network error, 5xx, cut connection."""


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


def version_key(version: str) -> tuple[int, ...]:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in version.split("."))


def validate_package_name(name: str) -> str:
    if not isinstance(name, str) or not PACKAGE_NAME_RE.match(name):
        raise IndexFormatError(f"invalid package name {name!r} (allowed: {PACKAGE_NAME_RE.pattern})")
    return name


def _validate_version(version: Any, what: str) -> str:
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


def generate_keypair(private_path: Path, public_path: Path) -> str:
    private_path, public_path = Path(private_path), Path(public_path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: never clobber a key that nodes already trust.
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise RepositoryError(f"signing key {private_path} already exists; refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    public_b64 = _public_b64(key.public_key())
    public_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(public_path, (public_b64 + "\n").encode("ascii"))
    return public_b64


def _public_b64(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def _load_private_key(private_path: Path) -> Ed25519PrivateKey:
    private_path = Path(private_path)
    try:
        data = private_path.read_bytes()
    except FileNotFoundError:
        raise RepositoryError(f"signing key {private_path} does not exist") from None
    except OSError as exc:
        raise RepositoryError(f"cannot read signing key {private_path}: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise RepositoryError(f"signing key {private_path} is not an unencrypted PEM key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise RepositoryError(f"signing key {private_path} is not an Ed25519 key")
    return key


def public_key_from_private(private_path: Path) -> str:
    return _public_b64(_load_private_key(private_path).public_key())


def _load_public_key(public_key_b64: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(public_key_b64.strip(), validate=True)
    except (binascii.Error, ValueError, AttributeError) as exc:
        raise SignatureError("repository public key is not valid base64") from exc
    if len(raw) != 32:
        raise SignatureError(f"repository public key must be 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


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
    now = _aware(now) if now is not None else datetime.now(UTC)
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
    version = _validate_version(obj.get("version", str), obj.where)
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
    version = _validate_version(obj.get("version", str), obj.where)
    size = obj.get("size", int)
    if size < 0:
        raise IndexFormatError(f"{obj.where}: negative size")
    sha256 = obj.get("sha256", str)
    if not SHA256_RE.match(sha256):
        raise IndexFormatError(f"{obj.where}: sha256 must be 64 lowercase hex digits")
    file = _check_pool_path(obj.get("file", str), name, version)
    return PackageEntry(name=name, version=version, file=file, size=size, sha256=sha256)


def _aware(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        raise ValueError("naive datetime; pass an aware datetime (UTC)")
    return dt.astimezone(UTC)


def _format_time(dt: datetime) -> str:
    return _aware(dt).isoformat().replace("+00:00", "Z")


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
    names the only place a package may come from."""
    return httpx.Client(timeout=timeout, follow_redirects=False, verify=_tls_context())


def fetch_index(
    base_url: str,
    public_key_b64: str,
    *,
    min_serial: int = 0,
    client: httpx.Client | None = None,
    timeout: float = 30.0,
) -> tuple[RepositoryIndex, bytes, bytes]:
    own_client = client is None
    client = client or repo_client(timeout)
    try:
        base = base_url.rstrip("/")
        index_bytes = _get_bounded(client, f"{base}/{INDEX_NAME}", timeout)
        signature = _get_bounded(client, f"{base}/{SIGNATURE_NAME}", timeout)
    finally:
        if own_client:
            client.close()
    index = parse_and_verify(index_bytes, signature, public_key_b64, min_serial=min_serial)
    return index, index_bytes, signature


def _get_bounded(client: httpx.Client, url: str, timeout: float) -> bytes:
    try:
        with client.stream("GET", url, timeout=timeout) as resp:
            if resp.status_code != 200:
                raise DownloadError(f"GET {url} answered HTTP {resp.status_code}")
            body = bytearray()
            for chunk in resp.iter_bytes():
                body += chunk
                if len(body) > MAX_INDEX_BYTES:
                    raise IndexFormatError(f"{url} is larger than {MAX_INDEX_BYTES} bytes")
            return bytes(body)
    except httpx.HTTPError as exc:
        raise DownloadError(f"GET {url} failed: {exc or type(exc).__name__}") from exc


# --------------------------------------------------------------------------- build


@dataclass(frozen=True)
class _SourcePackage:
    entry: PackageEntry
    path: Path


def build_repository(
    source: Path,
    out: Path,
    signing_key: Path,
    *,
    expires_in: timedelta = timedelta(days=30),
    serial: int | None = None,
    now: datetime | None = None,
) -> RepositoryIndex:
    source, out = Path(source), Path(out)
    if expires_in <= timedelta(0):
        raise RepositoryError("expiry must be in the future")
    # Everything that can fail is checked before the first byte is written to OUT.
    key = _load_private_key(signing_key)
    releases, files = _scan_source(source)
    serial = _next_serial(out, serial)
    now = _aware(now) if now is not None else datetime.now(UTC)
    now = now.replace(microsecond=0)
    index = RepositoryIndex(serial=serial, generated=now, expires=now + expires_in, releases=releases)
    index_bytes = index.to_bytes()
    signature = base64.b64encode(key.sign(index_bytes)) + b"\n"
    _write_pool(out, files)
    atomic_write(out / INDEX_NAME, index_bytes)
    atomic_write(out / SIGNATURE_NAME, signature)
    return index


def _next_serial(out: Path, requested: int | None) -> int:
    existing = _existing_serial(out)
    if requested is None:
        return existing + 1 if existing is not None else 1
    if requested < 1:
        raise SerialRollbackError(f"serial must be >= 1, got {requested}")
    if existing is not None and requested <= existing:
        raise SerialRollbackError(
            f"serial {requested} is not higher than the published serial {existing}; serials never go down"
        )
    return requested


def _existing_serial(out: Path) -> int | None:
    path = out / INDEX_NAME
    if not path.exists():
        return None
    try:
        return parse_index(path.read_bytes()).serial
    except (OSError, RepositoryError) as exc:
        raise IndexFormatError(
            f"cannot read the serial of the existing {path} ({exc}); fix or remove it first"
        ) from exc


def _scan_source(source: Path) -> tuple[tuple[ReleaseEntry, ...], dict[str, Path]]:
    if not source.is_dir():
        raise IndexFormatError(f"source directory {source} does not exist")
    releases: list[ReleaseEntry] = []
    pool: dict[str, _SourcePackage] = {}
    seen_versions: dict[str, Path] = {}
    for channel_dir in _sorted_children(source):
        if channel_dir.name not in CHANNELS or not channel_dir.is_dir():
            raise IndexFormatError(f"{channel_dir}: expected only the channel directories {CHANNELS}")
        for release_dir in _sorted_children(channel_dir):
            release, packages = _scan_release(release_dir, channel_dir.name)
            if release.version in seen_versions:
                raise IndexFormatError(
                    f"{release_dir}: release {release.version} also exists at {seen_versions[release.version]}"
                )
            seen_versions[release.version] = release_dir
            for pkg in packages:
                _add_to_pool(pool, pkg)
            releases.append(release)
    if not releases:
        raise IndexFormatError(f"source directory {source} holds no releases")
    releases.sort(key=lambda r: (version_key(r.version), r.channel))
    return tuple(releases), {p.entry.file: p.path for p in pool.values()}


def _sorted_children(path: Path) -> list[Path]:
    return sorted(path.iterdir(), key=lambda p: p.name)


def _add_to_pool(pool: dict[str, _SourcePackage], pkg: _SourcePackage) -> None:
    # Two releases may ship the same package version, but then it must be the same file.
    other = pool.get(pkg.entry.file)
    if other is not None and other.entry != pkg.entry:
        raise IndexFormatError(f"{pkg.path} differs from {other.path} although name and version are the same")
    pool.setdefault(pkg.entry.file, pkg)


def _scan_release(release_dir: Path, channel: str) -> tuple[ReleaseEntry, list[_SourcePackage]]:
    version = release_dir.name
    if not release_dir.is_dir() or not VERSION_RE.match(version):
        raise IndexFormatError(f"{release_dir}: expected a release directory named like 2.1.0")
    meta: dict[str, Any] = {}
    packages: list[_SourcePackage] = []
    for path in _sorted_children(release_dir):
        if path.name == RELEASE_META:
            meta = _read_release_meta(path)
        else:
            packages.append(_scan_package(path))
    if not packages:
        raise IndexFormatError(f"{release_dir}: release has no packages")
    names = [p.entry.name for p in packages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise IndexFormatError(f"{release_dir}: package(s) {', '.join(dupes)} present in several versions")
    release = ReleaseEntry(
        version=version,
        channel=channel,
        needs_reboot=meta.get("needs_reboot", True),
        hotfix=meta.get("hotfix", False),
        notes=meta.get("notes", ""),
        packages=tuple(sorted((p.entry for p in packages), key=lambda e: e.name)),
    )
    return release, packages


def _read_release_meta(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IndexFormatError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise IndexFormatError(f"{path}: expected a JSON object")
    types = {"notes": str, "needs_reboot": bool, "hotfix": bool}
    for key, value in data.items():
        if key not in types:
            raise IndexFormatError(f"{path}: unknown field {key!r} (allowed: {', '.join(types)})")
        if not isinstance(value, types[key]):
            raise IndexFormatError(f"{path}: field {key!r} must be {types[key].__name__}")
    return data


def _scan_package(path: Path) -> _SourcePackage:
    name, version = _parse_package_filename(path)
    if not path.is_file() or path.is_symlink():
        raise IndexFormatError(f"{path}: packages must be regular files")
    size, sha256 = _hash_file(path)
    entry = PackageEntry(name=name, version=version, file=f"{POOL_DIR}/{path.name}", size=size, sha256=sha256)
    return _SourcePackage(entry=entry, path=path)


def _parse_package_filename(path: Path) -> tuple[str, str]:
    filename = path.name
    stem = filename[: -len(PACKAGE_SUFFIX)] if filename.endswith(PACKAGE_SUFFIX) else None
    if stem is None or stem.count("_") != 1:
        raise IndexFormatError(f"{path}: expected a package file named <name>_<version>{PACKAGE_SUFFIX}")
    name, version = stem.split("_")
    try:
        validate_package_name(name)
        _validate_version(version, "package")
    except IndexFormatError as exc:
        raise IndexFormatError(f"{path}: {exc}") from None
    return name, version


def _hash_file(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _write_pool(out: Path, files: dict[str, Path]) -> None:
    (out / POOL_DIR).mkdir(parents=True, exist_ok=True)
    for rel, src in sorted(files.items()):
        dest = out / rel
        # Re-copying an identical file would briefly change what nodes download.
        if dest.is_file() and _hash_file(dest) == _hash_file(src):
            continue
        _atomic_copy(src, dest)


def _atomic_copy(src: Path, dest: Path) -> None:
    with src.open("rb") as fh_in:
        _atomic_write_stream(dest, [fh_in])


def atomic_write(dest: Path, data: bytes) -> None:
    """Replace dest with data, synced to disk first: never half a file."""
    _atomic_write_stream(dest, [data])


def _atomic_write_stream(dest: Path, parts: Iterable[Any]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for part in parts:
                if isinstance(part, bytes):
                    fh.write(part)
                else:
                    shutil.copyfileobj(part, fh, _HASH_CHUNK)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
