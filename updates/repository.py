"""Building and signing the update repository (``manage.py build_repo``, the demo).

Its format and the signature checks are shared with the node agents and live in
agent/shared/repository.py; this module writes what they read.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.shared import signing
from agent.shared.files import atomic_write, atomic_write_stream, hash_file
from agent.shared.protocol import CHANNELS, VERSION_RE, version_key
from agent.shared.repository import (
    INDEX_NAME,
    PACKAGE_SUFFIX,
    POOL_DIR,
    RELEASE_META,
    SIGNATURE_NAME,
    IndexFormatError,
    PackageEntry,
    ReleaseEntry,
    RepositoryError,
    RepositoryIndex,
    SerialRollbackError,
    aware_utc,
    parse_index,
    validate_package_name,
    validate_version,
)

# --------------------------------------------------------------------------- keys


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """A new signing key in its own file (never over one that nodes already trust), and
    its public half, which nodes pin (base64)."""
    try:
        key = signing.create_private(Path(private_path))
    except FileExistsError:
        raise RepositoryError(f"signing key {private_path} already exists; refusing to overwrite it") from None
    return signing.write_public(Path(public_path), key)


def _load_private_key(private_path: Path) -> Ed25519PrivateKey:
    try:
        return signing.load_private(Path(private_path))
    except FileNotFoundError:
        raise RepositoryError(f"signing key {private_path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"signing key {private_path}: {exc}") from exc


def public_key_from_private(private_path: Path) -> str:
    return signing.public_b64(_load_private_key(private_path))


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
    now = aware_utc(now) if now is not None else datetime.now(UTC)
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
    size, sha256 = hash_file(path)
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
        validate_version(version, "package")
    except IndexFormatError as exc:
        raise IndexFormatError(f"{path}: {exc}") from None
    return name, version


def _write_pool(out: Path, files: dict[str, Path]) -> None:
    (out / POOL_DIR).mkdir(parents=True, exist_ok=True)
    for rel, src in sorted(files.items()):
        dest = out / rel
        # Re-copying an identical file would briefly change what nodes download.
        if dest.is_file() and hash_file(dest) == hash_file(src):
            continue
        _atomic_copy(src, dest)


def _atomic_copy(src: Path, dest: Path) -> None:
    with src.open("rb") as fh_in:
        atomic_write_stream(dest, [fh_in])
